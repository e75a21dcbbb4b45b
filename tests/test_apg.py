"""The APG trainer plugin (trainers/apg): its loss and value targets against brute force, every bootstrap
mode on every registered task, exact resume, NaN robustness, the CLI, and (slow) the learning check."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import gymnasium as gym
import pytest
import torch
import yaml

import diffgym
from diffgym.cli import main as diffgym_main
from diffgym.plugins import load_trainer, resolve_config
from diffgym.training import TrainConfig

from diffgym.training.returns import MonteCarloReturns, td_lambda_targets
from diffgym.training.rollout import EnvBatch, unroll
from diffgym_apg import BOOTSTRAP_MODES, segment_actor_loss
from diffgym_apg.apg import Learner, apg_update, policy_gradient, train
from diffgym_apg.config import APGConfig
from diffgym_apg.estimators import clip_env_gradients
from diffgym_apg.segments import AdaptiveSegmentLength, SegmentConfig

POINT_MASS = "DiffGym/PointMass1D-v0"


def random_segment(seed: int, steps: int = 7, envs: int = 5):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(steps, envs, generator=gen, dtype=torch.float64)
    values = torch.randn(steps, envs, generator=gen, dtype=torch.float64)
    ends = torch.rand(steps, envs, generator=gen)
    terminated, truncated = ends < 0.15, (ends >= 0.15) & (ends < 0.3)
    return rewards, values, terminated, truncated


def pieces(terminated, truncated, env):
    """(first step, last step) of each piece of one env's segment: split after every episode end."""
    steps, start, out = terminated.shape[0], 0, []
    for t in range(steps):
        if terminated[t, env] or truncated[t, env] or t == steps - 1:
            out.append((start, t))
            start = t + 1
    return out


# ------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("seed", range(4))
def test_segment_actor_loss_matches_piecewise_definition(seed):
    rewards, values, terminated, truncated = random_segment(seed)
    values.requires_grad_(True)
    gamma = 0.9
    loss = segment_actor_loss(rewards, values, terminated, truncated, gamma)
    steps, envs = rewards.shape
    expected, expected_grad = 0.0, torch.zeros_like(values)
    for env in range(envs):
        for start, end in pieces(terminated, truncated, env):
            expected += sum(gamma ** (t - start) * float(rewards[t, env]) for t in range(start, end + 1))
            if not terminated[end, env]:  # a terminated piece gets no tail; truncated and cut ones do
                expected += gamma ** (end - start + 1) * float(values[end, env].detach())
                expected_grad[end, env] = -gamma ** (end - start + 1) / (envs * steps)
    assert float(loss.detach()) == pytest.approx(-expected / (envs * steps), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, values)
    torch.testing.assert_close(grad, expected_grad)  # the tail's gradient reaches exactly the boundaries


@pytest.mark.parametrize("lam", [0.0, 0.6, 1.0])
def test_td_lambda_targets_match_weighted_n_step_returns(lam):
    rewards, values, terminated, truncated = random_segment(7)
    gamma = 0.9
    targets = td_lambda_targets(rewards, values, terminated, truncated, gamma, lam)
    steps, envs = rewards.shape
    for env in range(envs):
        for start, end in pieces(terminated, truncated, env):
            tail = 0.0 if terminated[end, env] else float(values[end, env])
            for t in range(start, end + 1):
                # n-step returns G_t^(n) closed by V(s_{t+n}); the lambda-return weights them
                # (1 - lam) lam^(n-1) and gives the rest of the weight to the return closed at the piece end
                def n_step(n):
                    last = t + n - 1
                    closing = tail if last == end else float(values[last, env])
                    return sum(gamma ** k * float(rewards[t + k, env]) for k in range(n)) + gamma ** n * closing
                horizon = end - t + 1
                expected = sum((1 - lam) * lam ** (n - 1) * n_step(n) for n in range(1, horizon)) \
                    + lam ** (horizon - 1) * n_step(horizon)
                assert float(targets[t, env]) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_monte_carlo_returns_are_emitted_once_when_episodes_end():
    gamma, envs, obs_dim = 0.9, 3, 2
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 9, 4]  # env e runs episodes of lengths[e] steps back to back
    total_steps, segment = 24, 4
    rewards = torch.randn(total_steps, envs, generator=gen, dtype=torch.float64)
    obs = torch.randn(total_steps, envs, obs_dim, generator=gen, dtype=torch.float64)
    done = torch.zeros(total_steps, envs, dtype=torch.bool)
    for env, length in enumerate(lengths):
        done[length - 1::length, env] = True
    expected = {}  # (t, env) -> return-to-go, for every step whose episode ends within total_steps
    for env in range(envs):
        for t in range(total_steps):
            ends = [u for u in range(t, total_steps) if done[u, env]]
            if ends:
                expected[(t, env)] = sum(gamma ** (u - t) * float(rewards[u, env]) for u in range(t, ends[0] + 1))
    mc = MonteCarloReturns(gamma)
    got_obs, got_returns = [], []
    for start in range(0, total_steps, segment):
        chunk = slice(start, start + segment)
        o, g = mc.add(obs[chunk], rewards[chunk], done[chunk])
        got_obs.append(o)
        got_returns.append(g)
        assert mc.rewards.shape[0] <= max(lengths) + segment  # only unfinished episodes stay pending
    got_obs, got_returns = torch.cat(got_obs), torch.cat(got_returns)
    assert got_returns.shape[0] == len(expected)  # every known return exactly once
    for (t, env), value in expected.items():
        match = (got_obs == obs[t, env]).all(dim=1).nonzero()
        assert match.numel() == 1
        assert float(got_returns[match[0, 0]]) == pytest.approx(value, rel=1e-12)


# ------------------------------------------------------------------------------------ helpers
def small_config(tmp_path: Path, env_id: str, bootstrap: str, name: str = "run", **changes) -> TrainConfig:
    """Two updates of 4 envs x 4 steps. ``gae`` (the value network the proximal path's joint steps fit) is
    trainer apg-ppo's; its first proximal update (after 400 steps per env) lies beyond these runs."""
    overrides = {"num_envs": 4, "total_env_steps": 2 * 4 * 4, "eval_every_env_steps": 10**6, "eval_episodes": 2,
                 "algo_params.segment.length": 4, "algo_params.value.bootstrap": bootstrap,
                 "algo_params.value.epochs": 1, "algo_params.value.minibatches": 2,
                 "run_dir": str(tmp_path / name), **changes}
    return resolve_config("apg-ppo" if bootstrap == "gae" else "apg", env_id, overrides)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def latest_checkpoint(run_dir: Path) -> dict:
    path = max((run_dir / "checkpoints").glob("step_*.pt"))
    return torch.load(path, weights_only=False)


def make_learner(config: TrainConfig, seed: int = 0) -> tuple[Learner, EnvBatch, APGConfig]:
    params = APGConfig.from_config(config)
    venv = gym.make_vec(config.env_id, num_envs=config.num_envs, vectorization_mode="vector_entry_point")
    envs = EnvBatch(venv, seed, torch.device("cpu"))
    torch.manual_seed(seed)
    learner = Learner.create(venv.single_observation_space.shape[0], venv.single_action_space.shape[0],
                             config, params, torch.device("cpu"))
    return learner, envs, params


@pytest.mark.parametrize("bootstrap", BOOTSTRAP_MODES)
def test_actor_gradient_through_the_simulator_matches_finite_differences(tmp_path, bootstrap):
    """The segment loss's gradient (through policy, normalizer, simulator, in-batch resets and the tail
    value) along a random direction in actor-parameter space, against central differences. 4-step
    episodes in a 6-step segment: pieces end by truncation and by the segment end."""
    config = small_config(tmp_path, POINT_MASS, bootstrap, **{"algo_params.gamma": 0.9})
    torch.manual_seed(0)
    params = APGConfig.from_config(config)
    venv = gym.make_vec(POINT_MASS, num_envs=3, vectorization_mode="vector_entry_point", max_episode_steps=4)
    envs = EnvBatch(venv, 0, torch.device("cpu"))
    learner = Learner.create(3, 1, config, params, torch.device("cpu"))
    learner.normalizer.update(torch.randn(64, 3) * 0.7 + 0.1)  # a non-trivial normalization
    with torch.no_grad():  # a non-trivial policy mean and value, so every path carries gradient
        for p in [*learner.actor_parameters, *learner.value.parameters]:
            p.add_(0.3 * torch.randn_like(p))
    start = (envs.state, envs.obs, dict(envs.seeds.bit_generator.state))

    def loss() -> torch.Tensor:
        envs.state, envs.obs, envs.seeds.bit_generator.state = start
        torch.manual_seed(1)  # the same action noise every time
        segment, _, _ = unroll(learner.model, learner.normalizer, envs, 6)
        assert segment.truncated[3].all() and not segment.truncated[:3].any()
        values = learner.value.tail(segment.next_obs)
        return segment_actor_loss(segment.rewards, values, segment.terminated, segment.truncated, params.gamma)

    direction = [torch.randn_like(p) for p in learner.actor_parameters]
    grads = torch.autograd.grad(loss(), learner.actor_parameters)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction))
    eps = 1e-3
    with torch.no_grad():
        def shifted(scale: float) -> float:
            for p, d in zip(learner.actor_parameters, direction):
                p.add_(scale * eps * d)
            value = float(loss())
            for p, d in zip(learner.actor_parameters, direction):
                p.sub_(scale * eps * d)
            return value
        numeric = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    assert abs(analytic) > 1e-3
    assert numeric == pytest.approx(analytic, rel=2e-2, abs=1e-4)


# ------------------------------------------------------------------------------------ training
def test_plugin_is_registered_with_every_hyperparameter():
    trainer = load_trainer("apg")
    assert trainer.name == "apg"
    config = resolve_config("apg", POINT_MASS)
    assert set(config.algo_params) == set(APGConfig.__dataclass_fields__) - {"proximal"}  # apg-ppo's section
    assert set(resolve_config("apg-ppo", POINT_MASS).algo_params) == set(APGConfig.__dataclass_fields__)
    with pytest.raises(ValueError, match="value.bootstrap must be one of"):
        APGConfig.from_config(config.with_overrides({"algo_params.value.bootstrap": "td"}))


@pytest.mark.parametrize("bootstrap", BOOTSTRAP_MODES)
@pytest.mark.parametrize("env_id", diffgym.TASK_IDS)
def test_every_bootstrap_mode_trains_on_every_task(tmp_path, env_id, bootstrap):
    config = small_config(tmp_path, env_id, bootstrap)
    torch.manual_seed(config.seed)
    initial = [p.detach().clone() for p in Learner.create(
        *_dims(env_id), config, APGConfig.from_config(config), torch.device("cpu")).actor_parameters]
    run_dir = train(config, progress=False)
    rows = read_metrics(run_dir)
    updates = [r for r in rows if "grad_norm" in r]
    evals = [r for r in rows if "eval_return" in r]
    assert [r["grad_steps"] for r in updates] == [1, 2]
    assert [r["env_steps"] for r in updates] == [16, 32]
    assert [r["env_steps"] for r in evals] == [0, 32]
    assert all(math.isfinite(r["actor_loss"]) and math.isfinite(r["grad_norm"]) for r in updates)
    assert updates[-1]["skipped_updates"] == 0
    assert ("critic_loss" in updates[-1]) == (bootstrap == "critic")  # mc fits once an episode has ended
    saved = latest_checkpoint(run_dir)
    assert saved["env_steps"] == 32 and saved["grad_steps"] == 2
    actor = [saved["actor_critic"][k] for k in saved["actor_critic"] if k.startswith("actor.")] + \
        [saved["actor_critic"]["log_std"]]
    assert all(torch.isfinite(p).all() for p in actor)
    assert any(not torch.equal(a, b) for a, b in zip(actor, initial))  # the policy was updated


def _dims(env_id: str) -> tuple[int, int]:
    env = gym.make(env_id)
    return env.observation_space.shape[0], env.action_space.shape[0]


def test_mc_value_network_is_fitted_once_episodes_end(tmp_path):
    # 2 envs x 50 steps per segment, 100-step episodes: the first returns are known after 2 segments
    config = small_config(tmp_path, POINT_MASS, "mc", num_envs=2, total_env_steps=300,
                          **{"algo_params.segment_length": 50})
    rows = [r for r in read_metrics(train(config, progress=False)) if "grad_norm" in r]
    assert ["critic_loss" in r for r in rows] == [False, True, False]


@pytest.mark.parametrize("bootstrap, extra", [
    ("mc", {}), ("critic", {}),
    ("critic", {"num_envs": 3, "algo_params.estimator": "hybrid"}),
    # the adaptive schedule changes K mid-run (patience 4 updates): its state must resume too
    ("none", {"num_envs": 3, "algo_params.segment_length": "adaptive", "algo_params.min_segment_length": 4,
              "algo_params.max_segment_length": 16, "eval_every_env_steps": 3 * 4 * 6,
              "total_env_steps": 3 * 4 * 6 * 4}),
])
def test_resume_from_checkpoint_continues_identically(tmp_path, bootstrap, extra):
    # 2 envs x 30-step segments over 100-step episodes; the checkpoint at 120 steps per env lies after
    # the first in-batch resets (the seed generator has moved) and inside the second episodes (pending
    # Monte-Carlo steps), and the run goes on past the second resets at 200
    changes = {"num_envs": 2, "eval_every_env_steps": 4 * 60, "total_env_steps": 8 * 60,
               "algo_params.segment_length": 30, **extra}
    straight = train(small_config(tmp_path, POINT_MASS, bootstrap, "straight", **changes), progress=False)
    halfway = straight_checkpoints(straight)[len(straight_checkpoints(straight)) // 2]
    train(small_config(tmp_path, POINT_MASS, bootstrap, "resumed", **{**changes, "total_env_steps": halfway}),
          progress=False)
    resumed = train(small_config(tmp_path, POINT_MASS, bootstrap, "resumed", **changes), progress=False)

    def updates(run_dir):
        return [{k: v for k, v in r.items() if k not in ("wall_time", "eval_wall_time")} for r in read_metrics(run_dir) if "grad_norm" in r]

    assert updates(resumed) == updates(straight)
    a, b = latest_checkpoint(straight), latest_checkpoint(resumed)
    assert a["env_steps"] == b["env_steps"] == updates(straight)[-1]["env_steps"]
    if "algo_params.segment_length" in extra:  # K changed before and after the resume point
        lengths = [r["segment_length"] for r in updates(straight)]
        assert len(set(lengths)) > 1 and a["segment_schedule"] == b["segment_schedule"]
    for key in ("actor_critic", "normalizer", "target_critic"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"


def straight_checkpoints(run_dir: Path) -> list[int]:
    """Env steps of a run's evaluations (each followed by a checkpoint)."""
    return [r["env_steps"] for r in read_metrics(run_dir) if "eval_return" in r]


class PoisonedEnv:
    """Delegates to a real vector env; ``poison`` decides what goes wrong in ``differentiable_step``."""

    def __init__(self, venv, poison: str | None):
        self.venv, self.poison, self.num_envs = venv, poison, venv.num_envs

    def __getattr__(self, name):
        return getattr(self.venv, name)

    def differentiable_step(self, state, action):
        out = self.venv.differentiable_step(state, action)
        if self.poison == "nan_gradient":
            out = dataclasses.replace(out, reward=_NaNGradient.apply(out.reward))
        elif self.poison == "nan_reward":
            out = dataclasses.replace(
                out, reward=out.reward + torch.where(torch.arange(self.num_envs) == 1, math.nan, 0.0))
        elif self.poison == "nan_obs":  # env 0 diverges: NaN observation and reward
            bad = (torch.arange(self.num_envs) == 0)[:, None]
            out = dataclasses.replace(out, obs=torch.where(bad, math.nan, out.obs),
                                      reward=torch.where(bad[:, 0], math.nan, out.reward))
        return out


class _NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, math.nan)


@pytest.mark.parametrize("bootstrap", BOOTSTRAP_MODES)
def test_non_finite_gradient_everywhere_skips_the_update(tmp_path, bootstrap):
    config = small_config(tmp_path, POINT_MASS, bootstrap)
    learner, envs, params = make_learner(config)
    clean_venv = envs.venv
    envs.venv = PoisonedEnv(clean_venv, "nan_gradient")
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    actor_before = [p.detach().clone() for p in learner.actor_parameters]
    stats = apg_update(learner, envs, params, config)
    assert stats["skipped_updates"] == learner.skipped_updates == 1
    assert stats["masked_envs"] == config.num_envs  # no env had a finite gradient
    assert not math.isfinite(stats["grad_norm"])
    assert all(torch.equal(p, q) for p, q in zip(learner.actor_parameters, actor_before))  # actor untouched
    assert not learner.optimizer.state  # Adam's moments never saw the NaN
    assert all(torch.isfinite(v).all() for v in learner.model.state_dict().values())
    # the next, clean update goes through
    envs.venv = clean_venv
    stats = apg_update(learner, envs, params, config)
    assert stats["skipped_updates"] == 1 and math.isfinite(stats["grad_norm"]) and stats["masked_envs"] == 0
    assert any(not torch.equal(before[k], v) for k, v in learner.model.state_dict().items() if k.startswith("actor."))


@pytest.mark.parametrize("poison", ["nan_reward", "nan_obs"])
@pytest.mark.parametrize("estimator", ["analytic", "hybrid"])
@pytest.mark.parametrize("bootstrap", BOOTSTRAP_MODES)
def test_a_diverged_env_is_masked_not_the_whole_update(tmp_path, poison, estimator, bootstrap):
    """One env's NaN (reward, or observation and reward) leaves that env out of the update; the others'
    gradient is applied, the env restarts, and nothing non-finite reaches the parameters or Adam."""
    config = small_config(tmp_path, POINT_MASS, bootstrap, **{"algo_params.estimator": estimator})
    learner, envs, params = make_learner(config)
    envs.venv = PoisonedEnv(envs.venv, poison)
    actor_before = [p.detach().clone() for p in learner.actor_parameters]
    stats = apg_update(learner, envs, params, config)
    assert stats["skipped_updates"] == 0 and math.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0
    assert stats["masked_envs"] == 1 and stats["masked_envs_total"] == 1
    assert math.isfinite(stats["actor_loss"]) and math.isfinite(stats["segment_reward"])
    assert any(not torch.equal(p, q) for p, q in zip(learner.actor_parameters, actor_before))
    assert all(torch.isfinite(v).all() for v in learner.model.state_dict().values())
    assert all(torch.isfinite(v).all() for state in learner.optimizer.state.values() for v in state.values()
               if torch.is_tensor(v))
    assert all(torch.isfinite(t).all() for t in envs.state.tensors() if t.is_floating_point())
    assert torch.isfinite(envs.obs).all()  # the diverged env restarted


def test_masked_update_equals_the_update_of_the_other_envs(tmp_path):
    """Masking is exact: with env 1 poisoned, the gradient is plain autograd of the segment loss of envs
    0 and 2 alone (a reference that shares no code with the masking or the action adjoints)."""
    config = small_config(tmp_path, POINT_MASS, "none", num_envs=3)
    learner, envs, params = make_learner(config)
    start = (envs.state, envs.obs, dict(envs.seeds.bit_generator.state))
    envs.venv = PoisonedEnv(envs.venv, "nan_reward")
    torch.manual_seed(5)
    segment, _, _ = unroll(learner.model, learner.normalizer, envs, 4)
    learner.optimizer.zero_grad()
    stats, _ = policy_gradient(learner, segment, params)
    assert stats["masked_envs"] == 1
    masked = torch.cat([p.grad.flatten() for p in learner.actor_parameters])

    envs.venv = envs.venv.venv  # the clean env, replayed from the same start with the same noise
    envs.state, envs.obs, envs.seeds.bit_generator.state = start
    torch.manual_seed(5)
    clean, _, _ = unroll(learner.model, learner.normalizer, envs, 4)
    kept = [0, 2]
    loss = segment_actor_loss(clean.rewards[:, kept], torch.zeros(4, 2), clean.terminated[:, kept],
                              clean.truncated[:, kept], params.gamma)
    reference = torch.cat([g.flatten() for g in torch.autograd.grad(loss, learner.actor_parameters)])
    assert float(reference.norm()) > 1e-4
    torch.testing.assert_close(masked, reference, rtol=1e-4, atol=1e-7)


def test_clip_env_gradients_bounds_each_row_by_a_multiple_of_the_median_norm():
    rows = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, -2.0], [30.0, 40.0], [1.0, 0.0]])  # norms 5, 1, 2, 50, 1
    clipped, fraction = clip_env_gradients(rows, 2.0)  # median 2: bound 4
    torch.testing.assert_close(clipped, torch.tensor([[2.4, 3.2], [0.0, 1.0], [0.0, -2.0], [2.4, 3.2], [1.0, 0.0]]))
    assert fraction == pytest.approx(0.4)
    unchanged, none = clip_env_gradients(rows, 100.0)
    assert torch.equal(unchanged, rows) and none == 0.0
    # envs without any gradient neither set the bound nor are counted: the median is over 5, 50 and 1
    sparse = torch.cat([torch.zeros(4, 2), torch.tensor([[3.0, 4.0], [30.0, 40.0], [1.0, 0.0]])])
    clipped, fraction = clip_env_gradients(sparse, 1.0)
    torch.testing.assert_close(clipped[4:], torch.tensor([[3.0, 4.0], [3.0, 4.0], [1.0, 0.0]]))
    assert torch.equal(clipped[:4], torch.zeros(4, 2)) and fraction == pytest.approx(1 / 7)
    assert torch.equal(clip_env_gradients(torch.zeros(3, 2), 1.0)[0], torch.zeros(3, 2))
    huge, _ = clip_env_gradients(torch.tensor([[3e30, 4e30], [0.0, 1.0], [0.0, 1.0]]), 2.0)  # norm overflows
    assert torch.equal(huge, torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))


def test_env_gradient_clip_steps_on_the_mean_of_the_clipped_per_env_gradients(tmp_path):
    """With ``env_gradient_clip`` the actor's gradient is the mean of the per-env analytic gradients after
    clipping, each env's row computed here by plain autograd of that env's own segment loss; with a
    bound no env reaches it is the plain gradient."""
    def step(multiple: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
        config = small_config(tmp_path, POINT_MASS, "none", num_envs=5,
                              **{"algo_params.env_gradient_clip": multiple})
        learner, envs, params = make_learner(config)
        start = (envs.state, envs.obs, dict(envs.seeds.bit_generator.state))
        torch.manual_seed(5)
        segment, _, _ = unroll(learner.model, learner.normalizer, envs, 4)
        learner.optimizer.zero_grad()
        stats, _ = policy_gradient(learner, segment, params)
        gradient = torch.cat([p.grad.flatten() for p in learner.actor_parameters])
        rows = []
        for env in range(5):  # env i's share: the gradient of the loss with the other envs' rewards zeroed
            envs.state, envs.obs, envs.seeds.bit_generator.state = start
            torch.manual_seed(5)
            clean, _, _ = unroll(learner.model, learner.normalizer, envs, 4)
            only = torch.zeros_like(clean.rewards)
            only[:, env] = 1.0
            loss = segment_actor_loss(clean.rewards * only, torch.zeros(4, 5), clean.terminated, clean.truncated,
                                      params.gamma) * 5
            rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, learner.actor_parameters)]))
        return gradient, torch.stack(rows), stats

    gradient, rows, stats = step(1.0)
    assert float(rows.norm(dim=1).min()) > 1e-4
    reference, fraction = clip_env_gradients(rows, 1.0)
    assert 0.0 < fraction < 1.0 and stats["env_gradients_clipped"] == pytest.approx(fraction)
    torch.testing.assert_close(gradient, reference.mean(dim=0), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(gradient, rows.mean(dim=0), rtol=1e-3, atol=1e-6)  # the clip changed it
    unclipped, rows, stats = step(1e6)
    assert stats["env_gradients_clipped"] == 0.0
    torch.testing.assert_close(unclipped, rows.mean(dim=0), rtol=1e-4, atol=1e-7)
    plain, _, stats = step(0.0)  # off: the surrogate path, no per-env rows
    assert "env_gradients_clipped" not in stats
    torch.testing.assert_close(plain, unclipped, rtol=1e-4, atol=1e-7)


def test_env_gradient_clip_leaves_a_diverged_env_out_before_it_takes_the_median(tmp_path):
    config = small_config(tmp_path, POINT_MASS, "none", num_envs=5, **{"algo_params.env_gradient_clip": 1.0})
    learner, envs, params = make_learner(config)
    envs.venv = PoisonedEnv(envs.venv, "nan_reward")
    stats = apg_update(learner, envs, params, config)
    assert stats["masked_envs"] == 1 and math.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0
    assert stats["env_gradients_clipped"] in (0.25, 0.5)  # of the 4 kept envs, those above their median
    assert all(torch.isfinite(p).all() for p in learner.actor_parameters)


def test_per_env_estimators_need_three_envs(tmp_path):
    """Refused when the config is built (the trainer's check_config), before any run starts; and by
    train() itself for a config built another way."""
    for change in ({"algo_params.estimator": "hybrid"}, {"algo_params.segment_length": "adaptive"}):
        with pytest.raises(ValueError, match="num_envs >= 3"):
            small_config(tmp_path, POINT_MASS, "none", num_envs=2, **change)
        config = small_config(tmp_path, POINT_MASS, "none", num_envs=3, **change).replace(num_envs=2)
        with pytest.raises(ValueError, match="num_envs >= 3"):
            train(config, progress=False)


# ------------------------------------------------------------------------------------ estimators
@pytest.mark.parametrize("estimator, segment_length", [("likelihood", 4), ("hybrid", 4), ("analytic", "adaptive"),
                                                       ("hybrid", "adaptive")])
@pytest.mark.parametrize("env_id", diffgym.TASK_IDS)
def test_every_estimator_and_adaptive_length_train_on_every_task(tmp_path, env_id, estimator, segment_length):
    config = small_config(tmp_path, env_id, "critic", **{
        "algo_params.estimator": estimator, "algo_params.segment_length": segment_length,
        **({"algo_params.env_gradient_clip": 0.0} if estimator == "likelihood" else {}),
        "algo_params.min_segment_length": 4, "algo_params.max_segment_length": 8})
    rows = [r for r in read_metrics(train(config, progress=False)) if "grad_norm" in r]
    assert [r["segment_length"] for r in rows] == [4, 4]  # adaptive starts at its lower bound
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 and r["masked_envs"] == 0 for r in rows)
    assert ("hybrid_alpha" in rows[0]) == (estimator == "hybrid")
    assert ("variance_ratio" in rows[0]) == (segment_length == "adaptive")
    if estimator == "hybrid":
        assert all(0.0 <= r["hybrid_alpha"] <= 1.0 for r in rows)


def test_each_section_validates_itself_and_names_what_another_needs():
    config = resolve_config("apg", POINT_MASS)
    for change, match in (({"algo_params.policy_gradient.estimator": "reinforce"}, "estimator must be one of"),
                          ({"algo_params.segment.length": "auto"}, "adaptive"),
                          ({"algo_params.segment.length": 0}, "segment.length"),
                          ({"algo_params.segment.length": "adaptive", "algo_params.policy_gradient.estimator": "likelihood"},
                           "needs an estimator with an analytic part"),
                          ({"algo_params.policy_gradient.env_gradient_clip": -1.0}, "env_gradient_clip must be >= 0"),
                          ({"algo_params.policy_gradient.env_gradient_clip": math.nan}, "env_gradient_clip must be >= 0"),
                          ({"algo_params.policy_gradient.env_gradient_clip": 2.0,
                            "algo_params.policy_gradient.estimator": "likelihood"},
                           "env_gradient_clip \\(2.0\\) clips the per-env analytic gradients: set it to 0 with estimator .likelihood."),
                          ({"algo_params.segment.length": "adaptive", "algo_params.segment.min_length": 40,
                            "algo_params.segment.max_length": 20}, "min_length"),
                          ({"algo_params.policy_gradient.estimator": "none"}, "needs the proximal section"),
                          ({"algo_params.value.bootstrap": "gae"}, "needs that section"),
                          ({"algo_params.value.normalize_reward": True}, "bootstrap 'none' does not have"),
                          ({"algo_params.gamma": 1.5}, "gamma")):
        with pytest.raises(ValueError, match=match):
            APGConfig.from_config(config.with_overrides(change))
    ppo = resolve_config("apg-ppo", POINT_MASS)
    for change, match in (({"algo_params.value.bootstrap": "none"}, "advantages need a value function"),
                          ({"algo_params.proximal.batch_size": 1}, "proximal.batch_size must be >= 2"),
                          ({"algo_params.proximal.vf_coef": 0.0}, "it needs vf_coef > 0")):
        with pytest.raises(ValueError, match=match):
            APGConfig.from_config(ppo.with_overrides(change))
    # a trainer refuses the other's config in one line
    with pytest.raises(ValueError, match="--algo apg-ppo"):
        load_trainer("apg").train(ppo, progress=False)
    with pytest.raises(ValueError, match="--algo apg"):
        load_trainer("apg-ppo").train(config, progress=False)


def test_adaptive_length_halves_on_exploding_and_doubles_on_precise_analytic_gradients():
    params = SegmentConfig(length="adaptive", min_length=4, max_length=16)
    schedule = AdaptiveSegmentLength(params, patience=2)
    gen = torch.Generator().manual_seed(0)
    likelihood = torch.randn(32, 10, generator=gen)
    precise, exploding = 0.01 * likelihood.flip(0), 100.0 * likelihood.flip(0)
    lengths = []
    for samples in [precise] * 6 + [exploding] * 6:
        schedule.observe(samples, likelihood)
        lengths.append(schedule.length)
    assert lengths == [4, 8, 8, 16, 16, 16, 8, 8, 4, 4, 4, 4]  # an explosion acts at once
    restored = AdaptiveSegmentLength(params, patience=2)
    restored.load_state_dict(schedule.state_dict())
    assert restored.state_dict() == schedule.state_dict()


def test_hybrid_weight_moves_to_the_likelihood_path_on_a_step_reward(tmp_path):
    """On a reward that is a step function of the state, the analytic gradient is zero and the
    likelihood ratio is not: the hybrid's alpha falls (towards the likelihood path), and the policy
    learns to push right; on PointMass1D (smooth) the same estimator keeps alpha near 1."""
    from tests import toy_step_reward  # registers DiffGymTest/StepReward-v0

    def alphas(env_id, **changes):
        config = resolve_config("apg", env_id, {
            "num_envs": 256, "total_env_steps": 256 * 20 * 6, "eval_every_env_steps": 10**6, "eval_episodes": 64,
            "optimizer.lr": 1e-2, "algo_params.segment_length": 20, "algo_params.bootstrap": "none",
            "algo_params.estimator": "hybrid", "run_dir": str(tmp_path / env_id.replace("/", "_")), **changes})
        rows = read_metrics(train(config, progress=False))
        # where the likelihood ratio sees nothing (every env already right of the origin: equal
        # returns, zero advantages) there is nothing to weigh; look at the updates where it does
        return ([r["hybrid_alpha"] for r in rows if r.get("likelihood_mean_variance", 0.0) > 1e-12],
                [r for r in rows if "eval_return" in r])

    step_alphas, evals = alphas(toy_step_reward.ENV_ID)
    assert step_alphas and max(step_alphas) < 0.3, step_alphas
    assert evals[-1]["eval_return"] > evals[0]["eval_return"] + 2.0, evals  # it learned from the likelihood path
    smooth_alphas, _ = alphas(POINT_MASS, num_envs=64, total_env_steps=64 * 20 * 6)
    assert sum(smooth_alphas) / len(smooth_alphas) > 0.8, smooth_alphas


@pytest.mark.parametrize("changes", [{"algo_params.estimator": "hybrid"},
                                     {"algo_params.segment_length": "adaptive", "algo_params.max_segment_length": 32}])
def test_point_mass_still_learns_with_the_hybrid_and_the_adaptive_length(tmp_path, changes):
    """The learning check (90 % held-out success within 20k env steps, seed 0) with each new option."""
    config = resolve_config("apg", POINT_MASS, {"seed": 0, "total_env_steps": 20_000, "run_dir": str(tmp_path / "run"),
                                                **changes})
    rows = read_metrics(train(config, progress=False))
    evals = [(r["env_steps"], r["eval_success_rate"]) for r in rows if "eval_success_rate" in r]
    assert any(success >= 0.9 for _, success in evals), evals
    lengths = {r["segment_length"] for r in rows if "segment_length" in r}
    if "algo_params.max_segment_length" in changes:
        assert {8, 16, 32} <= lengths  # it grew from the lower bound to the upper on this smooth task


def test_point_mass_learns_from_the_likelihood_ratio_alone(tmp_path):
    """estimator: likelihood (REINFORCE with the critic's baseline, no simulator gradient) improves the
    policy too, only more slowly: the untrained policy scores about -61."""
    config = resolve_config("apg", POINT_MASS, {
        "seed": 0, "num_envs": 64, "total_env_steps": 50_000, "eval_every_env_steps": 10_000,
        "algo_params.estimator": "likelihood", "algo_params.bootstrap": "critic",
        "run_dir": str(tmp_path / "run")})
    evals = [r["eval_return"] for r in read_metrics(train(config, progress=False)) if "eval_return" in r]
    assert max(evals[1:]) > evals[0] + 25.0, evals


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bootstrap", BOOTSTRAP_MODES)
def test_trains_on_cuda(tmp_path, bootstrap):
    config = small_config(tmp_path, POINT_MASS, bootstrap, device="cuda")
    saved = latest_checkpoint(train(config, progress=False))
    assert saved["grad_steps"] == 2 and "cuda_rng" in saved
    assert all(torch.isfinite(v).all() for v in saved["actor_critic"].values())


def test_diffgym_train_cli_writes_every_output(tmp_path):
    run_dir = tmp_path / "cli"
    code = diffgym_main(["train", "--algo", "apg", "--env", POINT_MASS, "--num-envs", "4",
                         "--total-env-steps", "80", "--eval-every-env-steps", "40", "--eval-episodes", "2",
                         "--param", "segment_length=10", "--param", "bootstrap=critic",
                         "--run-dir", str(run_dir), "--no-progress"])
    assert code == 0
    config = TrainConfig.load(run_dir / "config.yaml")
    assert config.algo == "apg" and config.algo_params["segment"]["length"] == 10
    assert list(run_dir.glob("events.out.tfevents.*"))
    rows = read_metrics(run_dir)
    assert {"actor_loss", "grad_norm", "skipped_updates", "critic_loss", "policy_std", "segment_reward"} <= set(rows[1])
    assert all({"env_steps", "grad_steps", "wall_time"} <= set(r) for r in rows)
    assert [r["env_steps"] for r in rows if "eval_success_rate" in r] == [0, 40, 80]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        [f"step_{n:012d}.pt" for n in (0, 40, 80)]


# ------------------------------------------------------------------------------------ learning
@pytest.mark.slow
def test_apg_solves_point_mass_within_20k_env_steps(tmp_path):
    """Issue 6's learning check: 90 % deterministic-policy success on held-out seeds within 20,000 env
    steps, with the task's default APG hyperparameters (hyperparams/apg.yml), seed 0."""
    config = resolve_config("apg", POINT_MASS, {"seed": 0, "total_env_steps": 20_000,
                                                "run_dir": str(tmp_path / "learn")})
    rows = read_metrics(train(config, progress=False))
    evals = [(r["env_steps"], r["eval_success_rate"]) for r in rows if "eval_success_rate" in r]
    print("APG PointMass1D evaluations (env steps, success rate):", evals)
    solved = [steps for steps, success in evals if success >= 0.9 and steps <= 20_000]
    assert solved, f"no evaluation reached 90 % success within 20,000 env steps: {evals}"


def test_cli_segment_flags_reach_the_config(capsys):
    from diffgym.cli import main

    assert main(["train", "--algo", "apg", "--env", "DiffGym/PointMass1D-v0", "--segment-length", "16",
                 "--bootstrap", "mc", "--print-config"]) == 0
    algo_params = yaml.safe_load(capsys.readouterr().out)["algo_params"]
    assert algo_params["segment"]["length"] == 16 and algo_params["value"]["bootstrap"] == "mc"


def test_cli_segment_length_accepts_adaptive(capsys):
    from diffgym.cli import main

    assert main(["train", "--algo", "apg", "--env", "DiffGym/PointNav2D-v0", "--segment-length", "adaptive",
                 "--param", "estimator=hybrid", "--print-config"]) == 0
    algo_params = yaml.safe_load(capsys.readouterr().out)["algo_params"]
    assert algo_params["segment"]["length"] == "adaptive" and algo_params["policy_gradient"]["estimator"] == "hybrid"


# ------------------------------------------------------------------------------------ extending
def test_the_estimator_of_docs_apg_md_is_one_file_and_one_config_section(tmp_path, monkeypatch):
    """docs/apg.md, "Adding an estimator": the file registers itself, its section takes its own option
    (validated by it), and a run steps on the mix it computes."""
    import importlib
    import re

    from diffgym_apg import estimators as estimators_module

    text = (Path(__file__).resolve().parents[1] / "docs" / "apg.md").read_text()
    (source,) = re.findall(r"```python\n# my_estimator.py\n(.*?)```", text, re.S)
    (tmp_path / "my_estimator.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(estimators_module, "ESTIMATORS", dict(estimators_module.ESTIMATORS))
    importlib.import_module("my_estimator")
    section = {"estimator": "fixed-mix", "analytic_weight": 0.8}
    config = small_config(tmp_path, POINT_MASS, "critic").replace(
        algo_params={**small_config(tmp_path, POINT_MASS, "critic").algo_params, "policy_gradient": section})
    params = APGConfig.from_config(config)
    assert type(params.policy_gradient).__name__ == "FixedMixConfig" and params.policy_gradient.analytic_weight == 0.8
    rows = [r for r in read_metrics(train(config, progress=False)) if "grad_norm" in r]
    assert [r["analytic_weight"] for r in rows] == [0.8, 0.8]
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)
    with pytest.raises(ValueError, match="analytic_weight must be in"):
        APGConfig.from_params({"policy_gradient": {**section, "analytic_weight": 2.0}})
    from diffgym_apg.apg import checked_params
    with pytest.raises(ValueError, match="'fixed-mix' compares per-env gradient samples: it needs num_envs >= 3"):
        checked_params(config.replace(num_envs=2))
    with pytest.raises(ValueError, match="unknown config key 'policy_gradient.analytic_weight'; "
                                         "the keys policy_gradient holds"):  # another estimator's option
        APGConfig.from_params({"policy_gradient": {"estimator": "analytic", "analytic_weight": 0.8}})


@pytest.mark.parametrize("key, value, message", [
    ("gamma", "abc", "gamma must be a number, got 'abc'"),
    ("reuse.epochs", 1.5, "reuse.epochs must be an integer, got 1.5"),
    ("policy_gradient.lr_decay", "abc", "policy_gradient.lr_decay must be a number, got 'abc'"),
    ("proximal.n_steps", 1.5, "proximal.n_steps must be an integer, got 1.5"),
])
def test_a_bad_value_is_named_by_the_key_given_to_param(key, value, message):
    section, _, name = key.rpartition(".")
    params = {section: {name: value}} if section else {name: value}
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        APGConfig.from_params(params)


# ------------------------------------------------------------------------------------ rollout reuse
def test_lr_decay_shrinks_the_segment_steps_rate_after_every_update(tmp_path):
    """Two updates at ``lr_decay: 0.5``: the Adam the segment and reuse steps share ends at a quarter of
    its rate (and saves it, so a resumed run continues the schedule); 1 leaves it alone."""
    for decay, factor in ((0.5, 0.25), (1.0, 1.0)):
        config = small_config(tmp_path, POINT_MASS, "none", name=f"decay{decay}",
                              **{"algo_params.policy_gradient.lr_decay": decay, "algo_params.reuse.epochs": 1})
        saved = latest_checkpoint(train(config, progress=False))
        assert saved["actor_optimizer"]["param_groups"][0]["lr"] == pytest.approx(config.optimizer.lr * factor)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"policy_gradient.lr_decay must be in \(0, 1\]"):
            APGConfig.from_config(config.with_overrides({"algo_params.policy_gradient.lr_decay": bad}))


def test_reuse_steps_count_as_gradient_steps_and_no_env_steps(tmp_path):
    config = small_config(tmp_path, POINT_MASS, "critic", **{"algo_params.reuse.epochs": 3,
                                                            "algo_params.reuse.minibatches": 2})
    rows = [r for r in read_metrics(train(config, progress=False)) if "grad_norm" in r]
    assert [r["env_steps"] for r in rows] == [16, 32]  # 4 envs x K = 4 per update, as without reuse
    assert [r["policy_steps"] for r in rows] == [7, 7] and [r["grad_steps"] for r in rows] == [7, 14]
    assert all(r["reuse_grad_steps"] == 6 and 0.0 <= r["reuse_clip_fraction"] <= 1.0 for r in rows)
    for change in ({"algo_params.policy_gradient.estimator": "hybrid"},
                   {"algo_params.policy_gradient.env_gradient_clip": 1.0}):
        with pytest.raises(ValueError, match="reuse steps descend the segment's plain analytic surrogate"):
            APGConfig.from_config(config.with_overrides({"algo_params.reuse.epochs": 1, **change}))


class _Recording(torch.optim.Optimizer):
    """Records the gradients it is stepped with; moves nothing."""

    def __init__(self, params):
        super().__init__(params, {})
        self.seen = []

    def step(self, closure=None):
        self.seen.append(torch.cat([p.grad.flatten() for group in self.param_groups for p in group["params"]]))


def _analytic_step_on_a_segment(tmp_path, steps: int):
    """A 3-env PointMass1D learner, a segment of ``steps`` steps, and its objective after the analytic
    gradient (left in the actor's ``.grad``)."""
    config = small_config(tmp_path, POINT_MASS, "none", num_envs=3)
    learner, envs, params = make_learner(config)
    torch.manual_seed(5)
    segment, _, _ = unroll(learner.model, learner.normalizer, envs, steps)
    learner.optimizer.zero_grad()
    _, objective = policy_gradient(learner, segment, params)
    return learner, segment, objective


def test_the_first_reuse_step_is_the_analytic_gradient_and_the_clip_stops_moved_samples(tmp_path):
    """At the parameters that acted, the surrogate's gradient is the segment's analytic gradient (the
    action adjoints through the policy); a sample whose ratio left the clip range contributes nothing."""
    from diffgym.training import OptimizerSpec
    from diffgym_apg.reuse import ReuseBatch, ReuseConfig, reuse_steps

    learner, segment, objective = _analytic_step_on_a_segment(tmp_path, 6)
    analytic = torch.cat([p.grad.flatten() for p in learner.actor_parameters])
    assert float(analytic.norm()) > 1e-4
    recording = _Recording(learner.actor_parameters)
    no_clip = OptimizerSpec(max_grad_norm=1e9)
    batch = ReuseBatch.of(learner.model, objective)
    stats = reuse_steps(ReuseConfig(epochs=2), learner.model, batch, learner.actor_parameters, recording, no_clip)
    assert stats["reuse_grad_steps"] == 2 and stats["reuse_clip_fraction"] == 0.0
    torch.testing.assert_close(recording.seen[0], analytic, rtol=1e-5, atol=1e-8)
    # once the policy has moved, samples beyond the clip range drop out of the surrogate
    with torch.no_grad():
        learner.model.log_std.add_(0.5)
    recording = _Recording(learner.actor_parameters)
    stats = reuse_steps(ReuseConfig(epochs=1, clip_range=0.01), learner.model, batch, learner.actor_parameters,
                        recording, no_clip)
    assert stats["reuse_clip_fraction"] == 1.0
    # no trusted sample and no KL term: no step (one would only carry Adam's momentum past the clip)
    assert stats["reuse_grad_steps"] == 0 and recording.seen == []
    # several minibatches, an env left out: their mean at the acting parameters is still the analytic step
    with torch.no_grad():
        learner.model.log_std.sub_(0.5)
    objective.valid[1] = False
    objective.kept = int(objective.valid.sum())
    learner.optimizer.zero_grad()
    kept = objective.valid
    actions = learner.model.squash(learner.model.actor(segment.obs_normalized[:, kept])
                                   + learner.model.log_std.exp() * segment.noise[:, kept])
    surrogate = objective.num_envs / objective.kept * (actions * objective.action_adjoints[:, kept]).sum()
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(surrogate, learner.actor_parameters)])
    recording = _Recording(learner.actor_parameters)
    reuse_steps(ReuseConfig(epochs=1, minibatches=3), learner.model, ReuseBatch.of(learner.model, objective),
                learner.actor_parameters, recording, no_clip)
    assert len(recording.seen) == 3
    torch.testing.assert_close(torch.stack(recording.seen).mean(dim=0), expected, rtol=1e-4, atol=1e-7)


def test_the_kl_term_descends_where_every_sample_left_the_clip(tmp_path):
    """With ``kl_coef`` > 0 and no trusted sample, a reuse step descends ``kl_coef`` times the mean
    KL(pi_old || pi_theta) alone: its gradient through the actor's means and the log-std."""
    from diffgym.training import OptimizerSpec
    from diffgym_apg.reuse import ReuseBatch, ReuseConfig, reuse_steps

    learner, segment, objective = _analytic_step_on_a_segment(tmp_path, 6)
    batch = ReuseBatch.of(learner.model, objective)
    with torch.no_grad():
        learner.model.log_std.add_(0.5)
        learner.model.actor[-1].bias.add_(0.3)
    model = learner.model
    moved = torch.distributions.Normal(model.actor(batch.obs), model.log_std.exp().expand(batch.obs.shape[0], -1))
    kl = torch.distributions.kl_divergence(batch.acting, moved).sum(-1).mean()
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(0.5 * kl, learner.actor_parameters)])
    recording = _Recording(learner.actor_parameters)
    stats = reuse_steps(ReuseConfig(epochs=1, clip_range=1e-6, kl_coef=0.5), model, batch, learner.actor_parameters,
                        recording, OptimizerSpec(max_grad_norm=1e9))
    assert stats["reuse_clip_fraction"] == 1.0 and stats["reuse_grad_steps"] == 1
    assert stats["reuse_kl"] == pytest.approx(float(kl), rel=1e-5)
    torch.testing.assert_close(recording.seen[0], expected, rtol=1e-5, atol=1e-8)


def test_reuse_takes_no_more_minibatches_than_kept_samples(tmp_path):
    """A segment that keeps fewer samples than ``reuse.minibatches`` splits them one per minibatch: no
    empty minibatch (whose share would divide by zero and whose statistics would be NaN)."""
    from diffgym.training import OptimizerSpec
    from diffgym_apg.reuse import ReuseBatch, ReuseConfig, reuse_steps

    learner, _, objective = _analytic_step_on_a_segment(tmp_path, 1)  # 3 samples
    recording = _Recording(learner.actor_parameters)
    stats = reuse_steps(ReuseConfig(epochs=1, minibatches=5, kl_coef=0.1), learner.model,
                        ReuseBatch.of(learner.model, objective), learner.actor_parameters, recording,
                        OptimizerSpec(max_grad_norm=1e9))
    assert stats["reuse_grad_steps"] == 3 and len(recording.seen) == 3
    assert math.isfinite(stats["reuse_clip_fraction"]) and math.isfinite(stats["reuse_kl"])


def test_an_ablation_over_flat_and_sectioned_keys_reports_each_cell(tmp_path):
    """The grid may name APG's first-format keys (``segment_length``) or sectioned ones (``reuse.epochs``):
    each cell is reported under the name the grid gave it, though the config stores it in its section."""
    from diffgym.experiments.ablate import ablate
    from diffgym.experiments.sweep import LocalRunner

    report = ablate(POINT_MASS, {"segment_length": [4], "reuse.epochs": [0, 1]}, 1, 32, tmp_path, "apg",
                    runner=LocalRunner(workers=1), eval_every=16, overrides={"num_envs": 4, "eval_episodes": 2})
    text = Path(report).read_text()
    assert "segment_length=4 reuse.epochs=0" in text and "segment_length=4 reuse.epochs=1" in text
    config = TrainConfig.load(tmp_path / "runs" / "segment_length4__reuse.epochs1__s0" / "config.yaml")
    assert config.algo_params["segment"]["length"] == 4 and config.algo_params["reuse"]["epochs"] == 1


def test_a_run_resumed_from_its_first_checkpoint_continues_as_if_uninterrupted(tmp_path):
    """A run stopped right after its env-step-0 evaluation resumes on the schedule: no extra evaluation,
    no shortened first segment (the checkpoint at 0 follows the evaluation there)."""
    changes = {"eval_every_env_steps": 16, "total_env_steps": 32}
    straight = train(small_config(tmp_path, POINT_MASS, "critic", "straight", **changes), progress=False)
    config = small_config(tmp_path, POINT_MASS, "critic", "resumed", **changes)
    interrupted = Path(config.run_dir)
    # what a run killed during its first segment leaves: the checkpoint at env step 0 is the latest
    train(config.replace(total_env_steps=1), progress=False)  # evaluates at 0, checkpoints, one update
    for path in (interrupted / "checkpoints").glob("step_*.pt"):
        if not path.name.endswith("000000000000.pt"):
            path.unlink()
    resumed = train(config, progress=False)

    def rows(run_dir):
        return [{k: v for k, v in r.items() if k not in ("wall_time", "eval_wall_time")} for r in read_metrics(run_dir)]

    assert [r["env_steps"] for r in rows(resumed) if "eval_return" in r] == [0, 16, 32]
    assert rows(resumed) == rows(straight)


@pytest.mark.parametrize("algo", ["apg", "apg-ppo", "sapo"])
def test_every_point_of_a_search_space_is_a_config_the_trainer_accepts(algo):
    """optuna's real sampler draws the trainer's tune search space; every point resolves (apg's includes
    rollout reuse, beside the analytic estimator only)."""
    import optuna

    trainer = load_trainer(algo)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    estimators_with_reuse = set()
    for _ in range(30):
        trial = study.ask()
        config = resolve_config(algo, POINT_MASS, trainer.suggest_hyperparams(trial, POINT_MASS))  # raises if invalid
        if config.algo_params["reuse"]["epochs"]:
            estimators_with_reuse.add(config.algo_params["policy_gradient"]["estimator"])
        study.tell(trial, 0.0)
    assert estimators_with_reuse == ({"analytic"} if algo == "apg" else set())
