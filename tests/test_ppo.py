"""The PPO plugin: the SB3 VecEnv adapter, the spec-built policy, tiny learns on every task, and the
marked learning check."""

import dataclasses
import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv

import diffgym
from diffgym.plugins import load_trainer, resolve_config
from diffgym.training import ActorCritic, ObservationNormalizer, OptimizerSpec, PolicySpec
from diffgym.training.run import log_hook

pytest.importorskip("diffgym_ppo")
from diffgym_ppo import SB3VecEnvAdapter, SpecActorCriticPolicy, SpecPPO  # noqa: E402

ENV_ID = "DiffGym/PointMass1D-v0"


# ------------------------------------------------------------------------------ VecEnv adapter
def test_adapter_auto_resets_with_terminal_observations_and_truncation_flags():
    num_envs, horizon, seed = 3, 5, 11
    venv = SB3VecEnvAdapter.make(ENV_ID, num_envs, max_episode_steps=horizon)
    singles = [gym.make(ENV_ID, max_episode_steps=horizon) for _ in range(num_envs)]
    venv.seed(seed)
    obs = venv.reset()
    expected = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(singles)])
    np.testing.assert_allclose(obs, expected, atol=1e-6)
    rng = np.random.default_rng(0)
    for t in range(2 * horizon + 2):
        actions = rng.uniform(-1, 1, (num_envs, 1)).astype(np.float32)
        venv.step_async(actions)
        obs, rewards, dones, infos = venv.step_wait()
        assert obs.shape == (num_envs, 3) and rewards.shape == dones.shape == (num_envs,)
        assert isinstance(infos, list) and len(infos) == num_envs
        for i, env in enumerate(singles):
            single_obs, single_reward, terminated, truncated, single_info = env.step(actions[i])
            assert rewards[i] == pytest.approx(single_reward, abs=1e-5)
            assert dones[i] == (terminated or truncated) == ((t + 1) % horizon == 0)
            assert isinstance(infos[i]["is_success"], bool) and infos[i]["is_success"] == single_info["is_success"]
            if dones[i]:
                np.testing.assert_allclose(infos[i]["terminal_observation"], single_obs, atol=1e-6)
                assert infos[i]["TimeLimit.truncated"] is True
                single_obs, _ = env.reset()  # the next episode of the same stream: already returned
            else:
                assert "terminal_observation" not in infos[i]
            np.testing.assert_allclose(obs[i], single_obs, atol=1e-6)


class _TerminatingVectorEnv(VectorEnv):
    """Env 0 terminates at step 2, env 1 truncates at step 2 (Gymnasium SAME_STEP info layout)."""

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self):
        self.num_envs = 2
        self.single_observation_space = spaces.Box(-np.inf, np.inf, (1,), np.float32)
        self.single_action_space = spaces.Box(-1, 1, (1,), np.float32)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return np.zeros((2, 1), np.float32), {}

    def step(self, actions):
        self.t += 1
        done = self.t == 2
        terminated, truncated = np.array([done, False]), np.array([False, done])
        info = {"is_success": np.array([True, False]), "_is_success": np.ones(2, bool)}
        obs = np.full((2, 1), self.t, np.float32)
        if done:
            info["final_obs"] = np.array([obs[0], obs[1]], dtype=object)
            info["_final_obs"] = np.ones(2, bool)
            info["final_info"] = {**info, "_is_success": np.ones(2, bool)}
            info["_final_info"] = np.ones(2, bool)
            obs, self.t = np.zeros((2, 1), np.float32), 0
        return obs, np.ones(2, np.float32), terminated, truncated, info


def test_adapter_distinguishes_termination_from_truncation():
    venv = SB3VecEnvAdapter(_TerminatingVectorEnv())
    venv.reset()
    venv.step(np.zeros((2, 1), np.float32))
    obs, _, dones, infos = venv.step(np.zeros((2, 1), np.float32))
    assert dones.tolist() == [True, True] and obs.tolist() == [[0.0], [0.0]]
    assert [info["TimeLimit.truncated"] for info in infos] == [False, True]
    assert [info["terminal_observation"].tolist() for info in infos] == [[2.0], [2.0]]
    assert [info["is_success"] for info in infos] == [True, False]


def test_adapter_requires_same_step_autoreset_and_whole_batch_attributes():
    with pytest.raises(ValueError, match="SAME_STEP"):
        SB3VecEnvAdapter(gym.make_vec(ENV_ID, num_envs=2, vectorization_mode="vector_entry_point"))
    venv = SB3VecEnvAdapter.make(ENV_ID, 2)
    assert venv.get_attr("num_envs") == [2, 2] and venv.env_is_wrapped(gym.Wrapper) == [False, False]
    with pytest.raises(ValueError, match="whole batched env"):
        venv.set_attr("render_mode", None, indices=[0])
    venv.reset()
    state = venv.env_method("get_state")[0]
    assert state.batch_size == 2


# --------------------------------------------------------------------------- spec-built policy
def _tiny_model(env, **kwargs):
    return SpecPPO(SpecActorCriticPolicy, env, n_steps=8, batch_size=16, n_epochs=2, seed=0, verbose=0,
                   learning_rate=1e-3, policy_kwargs=dict(policy_spec=PolicySpec(hidden_sizes=(16,)),
                                                          optimizer_spec=OptimizerSpec(betas=(0.8, 0.9), eps=1e-7)),
                   **kwargs)


def test_policy_network_is_the_shared_actor_critic():
    model = _tiny_model(SB3VecEnvAdapter.make(ENV_ID, 4))
    policy = model.policy
    assert isinstance(policy.actor_critic, ActorCritic) and isinstance(policy.normalizer, ObservationNormalizer)
    assert {id(p) for p in policy.parameters()} == {id(p) for p in policy.actor_critic.parameters()}
    group = policy.optimizer.param_groups[0]
    assert isinstance(policy.optimizer, torch.optim.Adam)
    assert (group["lr"], group["betas"], group["eps"]) == (1e-3, (0.8, 0.9), 1e-7)
    obs = torch.randn(5, 3)
    u, values, log_prob = policy(obs)
    values2, log_prob2, entropy = policy.evaluate_actions(obs, u)
    assert torch.allclose(values.squeeze(-1), values2) and torch.allclose(log_prob, log_prob2)
    dist = policy.actor_critic.distribution(policy.normalizer(obs))
    assert torch.allclose(log_prob, dist.log_prob(u).sum(-1)) and torch.allclose(entropy, dist.entropy().sum(-1))
    # the buffer holds pre-squash samples; the env and predict() get squash(u) in [-1, 1]
    np.testing.assert_allclose(policy.unscale_action(np.array([[-30.0], [0.3]])), np.tanh([[-30.0], [0.3]]), rtol=1e-6)
    action, _ = model.predict(obs.numpy(), deterministic=True)
    np.testing.assert_allclose(action, policy.act_deterministic(obs.numpy()), rtol=1e-5, atol=1e-7)


def test_normalizer_updates_once_per_rollout_after_training():
    num_envs = 4
    model = _tiny_model(SB3VecEnvAdapter.make(ENV_ID, num_envs))
    seen = []

    def record_stats(*_):
        seen.append(float(model.policy.normalizer.count))

    model.policy.optimizer.register_step_pre_hook(record_stats)
    model.learn(total_timesteps=2 * 8 * num_envs)
    per_rollout = 8 * num_envs
    # first rollout: trained with the reset statistics only; second: with the first rollout added
    assert set(seen[: len(seen) // 2]) == {num_envs} and set(seen[len(seen) // 2:]) == {num_envs + per_rollout}
    assert float(model.policy.normalizer.count) == num_envs + 2 * per_rollout
    assert model.grad_steps == len(seen) == 2 * 2 * (per_rollout // 16)


# ------------------------------------------------------------------------- tiny learn per task
@pytest.mark.parametrize("env_id", diffgym.TASK_IDS)
def test_tiny_learn_writes_run_outputs(env_id, tmp_path):
    config = resolve_config("ppo", env_id, {
        "num_envs": 4, "total_env_steps": 64, "eval_every_env_steps": 32, "eval_episodes": 2,
        "run_dir": str(tmp_path / "run"), "algo_params.n_steps": 8, "algo_params.batch_size": 16,
        "algo_params.n_epochs": 1})
    run_dir = load_trainer("ppo").train(config, progress=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_success_rate" in r]
    assert [r["env_steps"] for r in evals] == [0, 32, 64]
    assert all(np.isfinite(r["eval_return"]) for r in evals)
    train_rows = [r for r in rows if "train/loss" in r]
    assert train_rows and train_rows[-1]["grad_steps"] == 2 and np.isfinite(train_rows[-1]["train/loss"])
    checkpoint = torch.load(sorted((run_dir / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert checkpoint["env_steps"] == 64 and {"actor_critic", "normalizer", "config"} <= set(checkpoint)
    assert (run_dir / "config.yaml").exists() and (run_dir / "sb3_model.zip").exists()
    assert any(f.name.startswith("events.out.tfevents") for f in run_dir.iterdir())


def test_unknown_ppo_params_are_rejected(tmp_path):
    # by resolve_config (the CLI and sweeps), against the keys PPO's defaults list ...
    with pytest.raises(ValueError, match="unknown algo_params \\['n_step'\\] for trainer 'ppo'"):
        resolve_config("ppo", ENV_ID, {"algo_params.n_step": 8, "run_dir": str(tmp_path / "r")})
    # ... and by the trainer itself, for a config built another way
    config = resolve_config("ppo", ENV_ID, {"run_dir": str(tmp_path / "r")})
    config = config.replace(algo_params={**config.algo_params, "n_step": 8})
    with pytest.raises(ValueError, match="unknown PPO algo_params \\['n_step'\\]"):
        load_trainer("ppo").train(config, progress=False)


# ------------------------------------------------------------------------------ exact resume
def _resume_config(tmp_path, name, **changes):
    # 2 envs x 25-step rollouts (50 env steps) over 100-step episodes; evaluations every 60 env steps fall
    # inside rollouts, and the budget (620) ends with a partial rollout of 10 env steps
    return resolve_config("ppo", ENV_ID, {
        "num_envs": 2, "total_env_steps": 620, "eval_every_env_steps": 60, "eval_episodes": 2,
        "run_dir": str(tmp_path / name), "algo_params.n_steps": 25, "algo_params.batch_size": 25,
        "algo_params.n_epochs": 2, **changes})


def _rows(run_dir):
    """Every metrics row without the wall-clock columns."""
    return [{k: v for k, v in r.items() if k not in ("wall_time", "eval_wall_time", "time/fps")}
            for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def _latest(run_dir):
    return torch.load(sorted((run_dir / "checkpoints").glob("*.pt"))[-1], weights_only=True)


@pytest.mark.parametrize("normalize_reward", [False, True])
def test_resume_from_checkpoint_continues_identically(tmp_path, normalize_reward):
    # The checkpoint at 300 env steps (150 per env) lies after the first episode ends (the monitor's
    # episode buffer and the envs' reset streams have moved) and inside the second episodes; the run
    # goes on past the second episode ends at 400.
    extra = {"algo_params.normalize_reward": normalize_reward}
    train = load_trainer("ppo").train
    straight = train(_resume_config(tmp_path, "straight", **extra), progress=False)
    train(_resume_config(tmp_path, "resumed", total_env_steps=300, **extra), progress=False)
    logged: list[int] = []
    with log_hook(lambda env_steps, _: logged.append(env_steps)):
        resumed = train(_resume_config(tmp_path, "resumed", **extra), progress=False)

    assert min(logged) > 300  # it continued from its checkpoint (a restart would repeat the same rows)

    assert _rows(resumed) == _rows(straight)
    assert any("rollout/ep_rew_mean" in r for r in _rows(straight) if r["env_steps"] > 300)
    a, b = _latest(straight), _latest(resumed)
    assert a["env_steps"] == b["env_steps"] == 620
    for key in ("actor_critic", "normalizer"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    for group_a, group_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(group_a[k], group_b[k]) for k in group_a)


def test_final_partial_rollout_and_mid_rollout_evaluations(tmp_path):
    # every checkpoint kept (keep_checkpoints=0): the test reads what each save wrote
    run_dir = load_trainer("ppo").train(_resume_config(tmp_path, "run").replace(keep_checkpoints=0), progress=False)
    rows = _rows(run_dir)
    assert [r["env_steps"] for r in rows if "eval_return" in r] == [0, *range(60, 601, 60), 620]
    # 12 full rollouts of 50 env steps (2 minibatches x 2 epochs each), then one of 10 (1 x 2)
    assert _latest(run_dir)["grad_steps"] == 12 * 4 + 2
    # an evaluation inside a rollout scores the policy of the update before it and saves it (policy
    # only); the resumable checkpoint follows at the next update boundary
    saved = {int(p.stem.split("_")[1]): torch.load(p, weights_only=True)
             for p in (run_dir / "checkpoints").glob("*.pt")}
    assert sorted(saved) == sorted({0, *range(60, 601, 60), 620, 100, 150, 200, 250, 400, 450, 500, 550})
    resumable = sorted(step for step, s in saved.items() if "sb3" in s)
    assert resumable == [0, 100, 150, 200, 250, 300, 400, 450, 500, 550, 600, 620]
    # the snapshot at 60 holds the parameters of the update at 50, unchanged until the one at 100
    assert saved[60]["grad_steps"] == 4 and saved[100]["grad_steps"] == 8


# ------------------------------------------------------------------------------ learning check
@pytest.mark.slow
def test_ppo_reaches_90_percent_success_on_point_mass(tmp_path):
    """Budget: the PointMass1D entry of hyperparams/ppo.yml (see trainers/README.md for its run time)."""
    config = resolve_config("ppo", ENV_ID, {"run_dir": str(tmp_path / "run"), "seed": 0})
    run_dir = load_trainer("ppo").train(config, progress=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "eval_success_rate" in r][-1]
    assert final["env_steps"] <= config.total_env_steps + config.num_envs * config.algo_params["n_steps"]
    assert final["eval_success_rate"] >= 0.9, final


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiny_learn_on_cuda(tmp_path):
    config = resolve_config("ppo", ENV_ID, {
        "device": "cuda", "num_envs": 8, "total_env_steps": 128, "eval_every_env_steps": 64, "eval_episodes": 4,
        "run_dir": str(tmp_path / "run"), "algo_params.n_steps": 8, "algo_params.batch_size": 32})
    run_dir = load_trainer("ppo").train(config, progress=False)
    checkpoint = torch.load(sorted((run_dir / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert checkpoint["actor_critic"]["log_std"].device.type == "cuda"
    assert float(checkpoint["normalizer"]["count"]) == 8 + 128


def test_ppo_reads_numbers_yaml_keeps_as_text_and_numpy_scalars():
    """YAML reads ``1e-5`` (no dot) as text, a config built in Python may hold numpy scalars: PPO's check
    takes both as the numbers they are, and hands SB3 floats."""
    from diffgym.plugins import load_trainer, resolve_config

    config = resolve_config("ppo", "DiffGym/PointMass1D-v0", {})
    config = dataclasses.replace(config, algo_params={**config.algo_params, "ent_coef": "1e-5",
                                                      "gamma": np.float32(0.99), "target_kl": None})
    assert isinstance(config.algo_params["gamma"], np.float32)  # kept as given (``replace`` would convert it)
    params = load_trainer("ppo").check_config(config)
    assert params["ent_coef"] == 1e-5 and params["gamma"] == pytest.approx(0.99) and params["target_kl"] is None
    assert type(params["ent_coef"]) is float and type(params["gamma"]) is float


def test_a_batch_size_that_does_not_divide_the_rollout_names_the_divisors_to_use_instead():
    """``--num-envs 8`` alone on TPush-v1 (n_steps 400, batch_size 512): the one line says what would run."""
    from diffgym.plugins import load_trainer, resolve_config

    with pytest.raises(ValueError, match=r"^batch_size 512 must divide n_steps \* num_envs = 3200 \(400 x 8\): "
                                         r"set --param batch_size=400 or 640, or another n_steps$"):
        resolve_config("ppo", "DiffGym/TPush-v1", {"num_envs": 8})
    fixed = resolve_config("ppo", "DiffGym/TPush-v1", {"num_envs": 8, "algo_params.batch_size": 640})
    assert load_trainer("ppo").check_config(fixed)["batch_size"] == 640
