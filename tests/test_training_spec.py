"""The shared training spec: config round trip, actor-critic, normalizer, optimizer, run outputs, evaluation."""

import json
import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

import diffgym  # noqa: F401
from diffgym.training.evaluation import SEED_STRIDE
from diffgym.training import (EVAL_SEED_OFFSET, ActorCritic, NormalizerSpec, ObservationNormalizer,
                              OptimizerSpec, PolicySpec, Run, TrainConfig, clip_gradients, evaluate_policy,
                              make_optimizer)

ENV_ID = "DiffGym/PointMass1D-v0"


def _config(tmp_path, **kwargs) -> TrainConfig:
    return TrainConfig(algo="test", env_id=ENV_ID, run_dir=str(tmp_path / "run"), **kwargs)


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_round_trips(tmp_path, suffix):
    config = _config(tmp_path, seed=3, policy=PolicySpec(hidden_sizes=(32, 16), activation="elu", squash="clip"),
                     normalizer=NormalizerSpec(enabled=False), optimizer=OptimizerSpec(lr=1e-3, betas=(0.8, 0.99)),
                     algo_params={"n_steps": 16, "nested": {"a": [1, 2]}, "none": None})
    config.save(tmp_path / f"config{suffix}")
    loaded = TrainConfig.load(tmp_path / f"config{suffix}")
    assert loaded == config
    assert isinstance(loaded.policy.hidden_sizes, tuple) and isinstance(loaded.optimizer.betas, tuple)


def test_config_overrides_and_coercion(tmp_path):
    config = _config(tmp_path).with_overrides({
        "optimizer.lr": "1e-3", "total_env_steps": "2e5", "policy.hidden_sizes": [128, 128],
        "algo_params.n_steps": 32})
    assert config.optimizer.lr == 1e-3 and config.total_env_steps == 200_000
    assert config.policy.hidden_sizes == (128, 128) and config.algo_params == {"n_steps": 32}
    assert config.replace(seed=7, optimizer={"lr": 0.1}).optimizer == OptimizerSpec(lr=0.1)
    assert config.task_name == "PointMass1D"


@pytest.mark.parametrize("bad, match", [
    ({"optimizer.learning_rate": 1.0}, r"^unknown config key 'optimizer.learning_rate'; the keys optimizer holds: betas, "
                                       r"eps, lr, max_grad_norm$"),
    ({"policy.activation": "sigmoid"}, "activation"),
    ({"policy.squash": "none"}, "squash"),
    ({"num_envs": 0}, "num_envs"),
    ({"num_envs": 2.5}, "integer"),
    ({"normalizer.enabled": "yes"}, "true or false"),
    ({"optimizer.betas": [0.9]}, "2 items"),
    ({"seeds": 1}, "unknown config key"),
    ({"policy.log_std_init": "abc"}, "^policy.log_std_init must be a number, got 'abc'$"),  # the key as typed
])
def test_config_rejects_bad_values(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path).with_overrides(bad)


def test_config_load_rejects_unknown_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo: x\nenv_id: y\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.load(path)


# ------------------------------------------------------------------------------ actor-critic
def test_actor_critic_is_built_from_the_spec():
    spec = PolicySpec(hidden_sizes=(32, 16), activation="relu", log_std_init=-1.0)
    model = ActorCritic(5, 3, spec)
    linears = [m for m in model.actor if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(5, 32), (32, 16), (16, 3)]
    assert [(l.in_features, l.out_features) for l in model.critic if isinstance(l, torch.nn.Linear)] == \
        [(5, 32), (32, 16), (16, 1)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in model.actor) == 2
    assert torch.equal(model.log_std.detach(), torch.full((3,), -1.0))
    assert set(dict(model.named_parameters())) >= {"log_std"}
    # PPO-style init: near-zero initial mean (gain 0.01 on the actor output), zero biases
    assert linears[-1].weight.abs().max() < 0.05 and all(torch.all(l.bias == 0) for l in linears)


@pytest.mark.parametrize("squash", ["tanh", "clip"])
def test_actor_critic_actions_are_bounded_and_reparameterized(squash):
    torch.manual_seed(0)
    model = ActorCritic(4, 2, PolicySpec(squash=squash, log_std_init=1.0))
    obs = torch.randn(256, 4, requires_grad=True)
    dist = model.distribution(obs)
    assert isinstance(dist, torch.distributions.Normal) and dist.mean.shape == (256, 2)
    assert torch.allclose(dist.stddev, model.log_std.exp().expand(256, 2))  # state independent
    action = model.act(obs)
    assert action.shape == (256, 2) and action.abs().max() <= 1.0
    action.sum().backward()
    assert model.log_std.grad is not None and model.log_std.grad.abs().sum() > 0
    assert obs.grad is not None and obs.grad.abs().sum() > 0
    mean_action = model.act(obs, deterministic=True)
    expected = torch.tanh(dist.mean) if squash == "tanh" else dist.mean.clamp(-1, 1)
    assert torch.allclose(mean_action, expected)
    assert model.value(obs).shape == (256,)


# -------------------------------------------------------------------------------- normalizer
def test_normalizer_statistics_are_exact_and_batching_independent():
    rng = np.random.default_rng(0)
    data = rng.normal([1.0, -3.0, 10.0], [0.5, 2.0, 4.0], size=(1000, 3)).astype(np.float32)
    one_batch, many_batches = (ObservationNormalizer(3, NormalizerSpec()) for _ in range(2))
    one_batch.update(data)
    for chunk in np.array_split(data, [1, 7, 300, 301, 900]):
        many_batches.update(torch.as_tensor(chunk))
    for norm in (one_batch, many_batches):
        np.testing.assert_allclose(norm.mean.numpy(), data.astype(np.float64).mean(0), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(norm.var.numpy(), data.astype(np.float64).var(0), rtol=1e-9)
        assert float(norm.count) == 1000


def test_normalizer_forward_clip_gradient_and_state_dict():
    spec = NormalizerSpec(clip=2.0, epsilon=1e-8)
    norm = ObservationNormalizer(2, spec)
    norm.update(torch.tensor([[0.0, 10.0], [2.0, 30.0]]))  # mean (1, 20), var (1, 100)
    obs = torch.tensor([[1.5, 20.0], [100.0, -100.0]], requires_grad=True)
    out = norm(obs)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([[0.5, 0.0], [2.0, -2.0]]), atol=1e-6)
    out.sum().backward()
    assert torch.allclose(obs.grad, torch.tensor([[1.0, 0.1], [0.0, 0.0]]), atol=1e-6)  # 1/std inside, 0 clipped
    restored = ObservationNormalizer(2, spec)
    restored.load_state_dict(norm.state_dict())
    assert set(norm.state_dict()) == {"mean", "var", "count"} and not list(norm.parameters())
    assert torch.equal(restored(obs), norm(obs))


def test_disabled_normalizer_is_the_identity():
    norm = ObservationNormalizer(2, NormalizerSpec(enabled=False))
    norm.update(torch.randn(10, 2) * 100)
    obs = torch.randn(4, 2) * 100
    assert float(norm.count) == 0 and torch.equal(norm(obs), obs)


def test_normalizer_rejects_wrong_width():
    with pytest.raises(ValueError, match="last dimension 3"):
        ObservationNormalizer(3, NormalizerSpec()).update(np.zeros((4, 2)))


# --------------------------------------------------------------------------------- optimizer
def test_make_optimizer_uses_the_spec():
    spec = OptimizerSpec(lr=1e-3, betas=(0.8, 0.95), eps=1e-6)
    opt = make_optimizer(torch.nn.Linear(2, 2).parameters(), spec)
    assert isinstance(opt, torch.optim.Adam)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"]) == (1e-3, (0.8, 0.95), 1e-6)


def test_clip_gradients_returns_the_norm_before_clipping():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    params[0].grad, params[1].grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert clip_gradients(params, OptimizerSpec(max_grad_norm=0.5)) == pytest.approx(5.0)
    assert math.sqrt(sum(float(p.grad.square().sum()) for p in params)) == pytest.approx(0.5, rel=1e-5)
    params[0].grad, params[1].grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert clip_gradients(params, OptimizerSpec(max_grad_norm=math.inf)) == pytest.approx(5.0)
    assert params[1].grad.item() == 4.0


# ---------------------------------------------------------------------------------------- run
def test_run_writes_config_metrics_tensorboard_and_checkpoints(tmp_path):
    config = _config(tmp_path, total_env_steps=1000)
    with Run(config, progress=False) as run:
        assert run.load_latest_checkpoint() is None
        run.log(100, 2, loss=0.5)
        run.log(200, 4, eval_return=-3.0, eval_success_rate=0.25, bad=float("nan"))
        run.save_checkpoint({"step": 200}, 200)
        run.save_checkpoint({"step": 1000}, 1000)
        run.save_checkpoint({"step": 300}, 300)
        assert run.load_latest_checkpoint() == {"step": 1000}
    run_dir = tmp_path / "run"
    assert TrainConfig.load(run_dir / "config.yaml") == config
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["env_steps"], r["grad_steps"]) for r in rows] == [(100, 2), (200, 4)]
    assert rows[1]["eval_success_rate"] == 0.25 and rows[1]["bad"] == "nan" and rows[0]["wall_time"] >= 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/return")] == [(200, -3.0)]
    assert [e.step for e in events.Scalars("loss")] == [100]


def test_run_default_directory_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = TrainConfig(algo="ppo", env_id=ENV_ID, seed=4)
    with Run(config, progress=False) as run:
        assert run.dir.parent == __import__("pathlib").Path("runs")
        assert run.dir.name.startswith("ppo__PointMass1D__s4__")
        assert TrainConfig.load(run.dir / "config.yaml").run_dir == str(run.dir)


# --------------------------------------------------------------------------------- evaluation
def _pd_controller(obs: np.ndarray) -> np.ndarray:
    x, v, goal = obs[:, 0], obs[:, 1], obs[:, 2]
    return np.clip(4.0 * (goal - x) - 3.0 * v, -1.0, 1.0)[:, None]


def test_evaluate_policy_matches_single_env_episodes_on_held_out_seeds():
    episodes, seed = 4, 2
    result = evaluate_policy(_pd_controller, ENV_ID, episodes, seed)
    returns, successes = [], []
    for i in range(episodes):
        env = gym.make(ENV_ID)
        obs, _ = env.reset(seed=EVAL_SEED_OFFSET + SEED_STRIDE * seed + i)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, info = env.step(_pd_controller(obs[None])[0])
            total, done = total + reward, terminated or truncated
        returns.append(total)
        successes.append(info["is_success"])
    assert result["eval_return"] == pytest.approx(np.mean(returns), rel=1e-5)
    assert result["eval_success_rate"] == np.mean(successes) == 1.0  # a PD controller solves the task
    assert result["eval_episode_length"] == 100


def test_evaluate_policy_scores_a_bad_policy_low():
    result = evaluate_policy(lambda obs: np.ones((len(obs), 1), np.float32), ENV_ID, 8, 0,
                             env_kwargs={"max_episode_steps": 20})
    assert result["eval_success_rate"] == 0.0 and result["eval_episode_length"] == 20
    assert result["eval_return"] < evaluate_policy(_pd_controller, ENV_ID, 8, 0,
                                                    env_kwargs={"max_episode_steps": 20})["eval_return"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_spec_modules_on_cuda():
    model = ActorCritic(3, 1, PolicySpec()).cuda()
    norm = ObservationNormalizer(3, NormalizerSpec()).cuda()
    norm.update(np.random.default_rng(0).normal(size=(64, 3)))  # NumPy input goes to the buffers' device
    obs = torch.randn(8, 3, device="cuda")
    assert model.act(norm(obs)).device.type == "cuda" and norm.mean.device.type == "cuda"
    result = evaluate_policy(lambda o: model.act(norm(torch.as_tensor(o, device="cuda")), True).cpu().numpy(),
                             ENV_ID, 4, 0, env_kwargs={"device": "cuda"})
    assert np.isfinite(result["eval_return"])


def test_rerun_starts_metrics_afresh_and_resume_keeps_rows_up_to_the_checkpoint(tmp_path):
    from diffgym.training import Run

    config = TrainConfig(algo="x", env_id=ENV_ID, total_env_steps=300, eval_every_env_steps=100,
                         run_dir=str(tmp_path / "run"))
    with Run(config, progress=False) as run:
        for steps in (0, 100, 200):
            run.log(steps, steps // 10, eval_success_rate=0.5)
    with Run(config, progress=False) as run:  # an attempt that cannot resume: no stale rows
        run.log(0, 0, eval_success_rate=0.0)
        assert [r["env_steps"] for r in run.read_metrics()] == [0]
    with Run(config, progress=False) as run:
        run.log(0, 0, eval_success_rate=0.1)
        run.log(100, 10, eval_success_rate=0.2)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        last_wall = [json.loads(line)["wall_time"] for line in f][-1]
    with Run(config, progress=False) as run:  # resuming from a checkpoint at 100 env steps
        run.resume_from(100)
        run.log(200, 20, eval_success_rate=0.3)
        rows = run.read_metrics()
    assert [r["env_steps"] for r in rows] == [0, 100, 200]
    assert rows[-1]["wall_time"] >= last_wall  # the clock continues


def test_task_names_keep_later_versions():
    from diffgym.training.spec import task_name
    assert task_name("DiffGym/PointMass1D-v0") == "PointMass1D"
    assert task_name("DiffGym/TPush-v1") == "TPush-v1"
    assert task_name("MyTask") == "MyTask"
    assert task_name("my_task:Mine/MyTask-v1") == task_name("my_task:MyTask-v1") == "MyTask-v1"  # gym's module:id


def test_env_kwargs_reach_training_and_evaluation_envs(tmp_path, monkeypatch):
    """A task argument set in the config (here TPush's success tolerance) holds in the training envs
    and in the evaluator's, for both trainers."""
    import gymnasium as gym

    made = []
    real_make_vec = gym.make_vec

    def recording_make_vec(env_id, *args, **kwargs):
        made.append((env_id, kwargs.get("success_distance"), kwargs.get("device")))
        return real_make_vec(env_id, *args, **kwargs)

    monkeypatch.setattr(gym, "make_vec", recording_make_vec)
    from diffgym.plugins import load_trainer
    for algo in ("apg", "ppo"):
        made.clear()
        config = TrainConfig(algo=algo, env_id="DiffGym/TPush-v0", num_envs=4, total_env_steps=64,
                             eval_every_env_steps=64, eval_episodes=2, run_dir=str(tmp_path / algo),
                             algo_params={"segment_length": 8, "bootstrap": "none"} if algo == "apg" else
                             {"n_steps": 16, "batch_size": 32},
                             env_kwargs={"success_distance": 0.05})
        load_trainer(algo).train(config, progress=False)
        assert len(made) >= 2 and all(entry == ("DiffGym/TPush-v0", 0.05, "cpu") for entry in made), made
        assert TrainConfig.load(tmp_path / algo / "config.yaml").env_kwargs == {"success_distance": 0.05}


def test_env_kwargs_overrides_and_reserved_keys():
    config = TrainConfig(algo="apg", env_id="DiffGym/TPush-v0")
    assert config.with_overrides({"env_kwargs.contact_stiffness": 2000.0}).env_kwargs == {"contact_stiffness": 2000.0}
    with pytest.raises(ValueError, match="may not set 'device'"):
        TrainConfig(algo="apg", env_id="DiffGym/TPush-v0", env_kwargs={"device": "cpu"})


def test_both_trainers_write_shared_tensorboard_tags(tmp_path):
    """What APG and PPO both log (policy std, evaluation, episode returns) has one TensorBoard tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from diffgym.plugins import load_trainer, resolve_config

    tags = {}
    for algo, params in (("apg", {"algo_params.segment_length": 8, "algo_params.bootstrap": "none"}),
                         ("ppo", {"algo_params.n_steps": 16, "algo_params.batch_size": 32})):
        config = resolve_config(algo, "DiffGym/PointMass1D-v0", {
            **params, "num_envs": 4, "total_env_steps": 128, "eval_every_env_steps": 128, "eval_episodes": 2,
            "run_dir": str(tmp_path / algo)})
        load_trainer(algo).train(config, progress=False)
        events = EventAccumulator(str(tmp_path / algo))
        events.Reload()
        tags[algo] = set(events.Tags()["scalars"])
    shared = {"policy/std", "eval/return", "eval/success_rate", "progress/grad_steps"}
    assert shared <= tags["apg"] and shared <= tags["ppo"], tags


def test_run_counts_time_inside_evaluating_as_evaluation_time_and_resume_continues_it(tmp_path, monkeypatch):
    from diffgym.training import run as run_module
    from diffgym.training.run import read_metrics

    clock = [100.0]
    monkeypatch.setattr(run_module.time, "perf_counter", lambda: clock[0])
    config = TrainConfig(algo="x", env_id=ENV_ID, total_env_steps=300, eval_every_env_steps=100,
                         run_dir=str(tmp_path / "run"))
    with Run(config, progress=False) as run:
        clock[0] += 2.0  # training
        with run.evaluating():
            clock[0] += 0.5
            with run.evaluating():  # nested: counted once
                clock[0] += 0.25
            run.log(100, 10, eval_success_rate=0.5)  # mid-evaluation: counted up to now
            clock[0] += 0.25  # the checkpoint after the row
        clock[0] += 1.0
        run.log(150, 15, loss=1.0)
    rows = read_metrics(tmp_path / "run")
    assert [(r["wall_time"], r["eval_wall_time"]) for r in rows] == [(2.75, 0.75), (4.0, 1.0)]
    with Run(config, progress=False) as run:  # resumed from the checkpoint at 100 env steps
        run.resume_from(100)
        with run.evaluating():
            clock[0] += 2.0
        run.log(200, 20, loss=1.0)
    assert read_metrics(tmp_path / "run")[-1]["eval_wall_time"] == 2.75
    # rows of an attempt that did not record it: the evaluation time of the resumed run stays unknown
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(
        json.dumps({k: v for k, v in json.loads(line).items() if k != "eval_wall_time"}) for line in lines) + "\n")
    with Run(config, progress=False) as run:
        run.resume_from(200)
        with run.evaluating():
            clock[0] += 1.0
        run.log(300, 30, loss=1.0)
    assert "eval_wall_time" not in read_metrics(tmp_path / "run")[-1]


def test_an_error_inside_evaluating_still_counts_its_time_and_an_evaluation_outside_it_leaves_the_split_unknown(
        tmp_path, monkeypatch):
    from diffgym.training import run as run_module
    from diffgym.training.run import read_metrics

    clock = [0.0]
    monkeypatch.setattr(run_module.time, "perf_counter", lambda: clock[0])
    config = TrainConfig(algo="x", env_id=ENV_ID, total_env_steps=300, eval_every_env_steps=100,
                         run_dir=str(tmp_path / "run"))
    with Run(config, progress=False) as run:
        with pytest.raises(RuntimeError):
            with run.evaluating():
                clock[0] += 1.5
                raise RuntimeError("evaluation failed")
        clock[0] += 1.0
        run.log(100, 1, loss=0.0)
        with pytest.warns(UserWarning, match=r"outside Run.evaluating\(\)"):  # once, naming the fix
            run.log(200, 2, eval_success_rate=0.5)  # a trainer evaluating without evaluating(): timed as training
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run.log(250, 2, eval_success_rate=0.5)  # said once per run
        run.log(300, 3, loss=0.0)
    rows = read_metrics(tmp_path / "run")
    assert rows[0]["eval_wall_time"] == 1.5 and rows[0]["wall_time"] == 2.5
    assert all("eval_wall_time" not in row for row in rows[1:])
