"""Trainer ``sapo`` (the APG components with the ``entropy`` section and twin critics, docs/apg.md "SAPO"): its
config rules, the entropy bonus's gradient against finite differences, the temperature, the twin critics'
targets, exact resume and a short run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gymnasium as gym
import pytest
import torch

from diffgym.plugins import load_trainer, resolve_config
from diffgym.training import TrainConfig
from diffgym.training.returns import td_lambda_targets
from diffgym.training.rollout import EnvBatch, unroll
from diffgym_apg import APGConfig, EntropyConfig, SAPOConfig, Temperature
from diffgym_apg.apg import Learner, policy_gradient, train
from diffgym_apg.entropy import SegmentLogProb, squash_log_jacobian

POINT_MASS = "DiffGym/PointMass1D-v0"


def sapo_config(tmp_path: Path, name: str = "run", **changes) -> TrainConfig:
    """Two updates of 4 envs x 4 steps, SAPO's sections otherwise as sapo.yml has them."""
    overrides = {"num_envs": 4, "total_env_steps": 2 * 4 * 4, "eval_every_env_steps": 10**6, "eval_episodes": 2,
                 "algo_params.segment.length": 4, "algo_params.value.epochs": 1, "algo_params.value.minibatches": 2,
                 "run_dir": str(tmp_path / name), **changes}
    return resolve_config("sapo", POINT_MASS, overrides)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def latest_checkpoint(run_dir: Path) -> dict:
    return torch.load(max((run_dir / "checkpoints").glob("step_*.pt")), weights_only=False)


def test_config_sections_validate_and_name_what_they_need(tmp_path):
    config = resolve_config("sapo", POINT_MASS)
    params = SAPOConfig.from_config(config)
    assert (params.entropy.alpha_init, params.entropy.lr, params.entropy.target_entropy) == (1.0, 5e-3, None)
    assert (params.value.critics, params.value.target_tau, params.segment.length) == (2, 1.0, 32)
    cases = [
        ({"policy_gradient": {"estimator": "hybrid"}}, "needs policy_gradient.estimator 'analytic'"),
        ({"reuse": {"epochs": 2}}, "needs reuse.epochs 0"),
        ({"value": {"bootstrap": "mc", "critics": 2}}, "needs value.bootstrap 'critic', not 'mc'$"),
        ({"value": {"bootstrap": "gae", "critics": 2}}, "not 'gae' \\(bootstrap 'gae' is trainer apg-ppo's"),
        ({"value": {"critics": 0}}, "value.critics must be >= 1"),
        ({"entropy": {"alpha_init": 0.0}}, "entropy.alpha_init must be"),
        ({"entropy": {"lr": -1.0}}, "entropy.lr must be > 0"),
        ({"entropy": {"betas": [0.9]}}, "entropy.betas must be two numbers"),
        ({"entropy": {"target_entropy": math.inf}}, "entropy.target_entropy must be"),
    ]
    for section, message in cases:
        with pytest.raises(ValueError, match=message):
            SAPOConfig.from_params({**config.algo_params, **section})
    with pytest.raises(ValueError, match="needs value.critics 1"):  # the proximal path reads one value network
        APGConfig.from_config(resolve_config("apg-ppo", POINT_MASS, {"algo_params.value.critics": 2,
                                                                      "algo_params.value.bootstrap": "critic"}))
    with pytest.raises(ValueError, match="'entropy' is not a section"):  # apg has no entropy section
        resolve_config("apg", POINT_MASS, {"algo_params.entropy.alpha_init": 0.5})
    with pytest.raises(ValueError, match="needs policy.squash 'tanh'"):
        resolve_config("sapo", POINT_MASS, {"policy.squash": "clip"})
    assert load_trainer("sapo").name == "sapo"


def test_squash_term_is_finite_where_tanh_rounds_to_one():
    pre_squash = torch.tensor([0.3, 12.0, -40.0], requires_grad=True)
    actions = torch.tanh(pre_squash)
    value = squash_log_jacobian(actions, pre_squash.detach())
    expected = torch.log(1 - torch.tanh(torch.tensor([0.3], dtype=torch.float64)) ** 2)
    assert float(value[0].detach()) == pytest.approx(float(expected), rel=1e-6)
    assert torch.isfinite(value).all() and float(value[2].detach()) == pytest.approx(2 * (math.log(2) - 40.0), rel=1e-6)
    value.sum().backward()
    assert torch.isfinite(pre_squash.grad).all()
    assert float(pre_squash.grad[0]) == pytest.approx(-2 * math.tanh(0.3), rel=1e-5)  # d/du log(1 - tanh(u)^2)


def test_entropy_bonus_gradient_through_the_simulator_matches_finite_differences(tmp_path):
    """The estimator's gradient plus the direct log-std term, of a segment objective whose rewards carry
    ``-alpha log pi``, along a random direction in actor-parameter space (log-std included), against
    central differences of the same objective; 4-step episodes in a 6-step segment."""
    config = sapo_config(tmp_path, **{"algo_params.gamma": 0.9, "algo_params.entropy.alpha_init": 2.0})
    params = SAPOConfig.from_config(config)
    torch.manual_seed(0)
    venv = gym.make_vec(POINT_MASS, num_envs=3, vectorization_mode="vector_entry_point", max_episode_steps=4)
    envs = EnvBatch(venv, 0, torch.device("cpu"))
    learner = Learner.create(3, 1, config, params, torch.device("cpu"))
    learner.normalizer.update(torch.randn(64, 3) * 0.7 + 0.1)
    with torch.no_grad():
        for p in [*learner.actor_parameters, *learner.value.parameters]:
            p.add_(0.3 * torch.randn_like(p))
    start = (envs.state, envs.obs, dict(envs.seeds.bit_generator.state))

    def objective(with_bonus: bool = True):
        envs.state, envs.obs, envs.seeds.bit_generator.state = start
        torch.manual_seed(1)  # the same action noise every time
        segment, _, _ = unroll(learner.model, learner.normalizer, envs, 6)
        log_prob = learner.entropy.log_prob(learner.model, segment) if with_bonus else None
        return policy_gradient(learner, segment, params, log_prob)[1]

    def directional(with_bonus: bool) -> float:
        for p in learner.actor_parameters:
            p.grad = None
        objective(with_bonus)
        return sum(float((p.grad * d).sum()) for p, d in zip(learner.actor_parameters, direction))

    direction = [torch.randn_like(p) for p in learner.actor_parameters]
    analytic = directional(True)
    bonus_part = analytic - directional(False)
    eps = 1e-3
    with torch.no_grad():
        def shifted(scale: float) -> float:
            for p, d in zip(learner.actor_parameters, direction):
                p.add_(scale * eps * d)
            with torch.enable_grad():
                value = float(objective().loss.detach())
            for p, d in zip(learner.actor_parameters, direction):
                p.sub_(scale * eps * d)
            return value
        numeric = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    assert abs(bonus_part) > 0.05 * abs(analytic) > 1e-4  # the entropy term carries a real share of it
    assert numeric == pytest.approx(analytic, rel=2e-2, abs=1e-4)


def test_temperature_moves_towards_the_target_entropy():
    spec = resolve_config("sapo", POINT_MASS).optimizer
    temperature = Temperature(EntropyConfig(alpha_init=1.0, target_entropy=-0.5), 1, spec, torch.device("cpu"))
    valid = torch.ones(3, dtype=torch.bool)
    high = SegmentLogProb(torch.full((4, 3), -1.0), torch.tensor(0.0))  # entropy 1.0 > target: alpha falls
    alphas = [temperature.step(high, valid)["alpha"] for _ in range(5)]
    assert alphas == sorted(alphas, reverse=True) and alphas[-1] < 1.0
    low = SegmentLogProb(torch.full((4, 3), 2.0), torch.tensor(0.0))  # entropy -2.0 < target: alpha rises
    rising = [temperature.step(low, valid)["alpha"] for _ in range(20)]
    assert rising[-1] > alphas[-1] and rising[-1] > rising[0]
    stats = temperature.step(high, torch.zeros(3, dtype=torch.bool))  # no env kept: nothing moves
    assert math.isnan(stats["entropy"]) and stats["alpha"] == rising[-1]
    assert Temperature(EntropyConfig(), 7, spec, torch.device("cpu")).target_entropy == -3.5


def test_twin_critics_tail_is_their_mean_and_targets_their_minimum_with_the_bonus(tmp_path, monkeypatch):
    config = sapo_config(tmp_path, **{"algo_params.value.target_tau": 0.5})
    params = SAPOConfig.from_config(config)
    torch.manual_seed(0)
    venv = gym.make_vec(POINT_MASS, num_envs=4, vectorization_mode="vector_entry_point", max_episode_steps=3)
    envs = EnvBatch(venv, 0, torch.device("cpu"))
    learner = Learner.create(3, 1, config, params, torch.device("cpu"))
    value = learner.value
    assert len(value.critics) == 2 and value.critics[0] is learner.model.critic
    with torch.no_grad():
        segment, _, _ = unroll(learner.model, learner.normalizer, envs, 5)
    inputs = learner.normalizer(segment.next_obs)
    each = torch.stack([critic(inputs).squeeze(-1) for critic in value.targets])
    assert not torch.allclose(each[0], each[1])
    torch.testing.assert_close(value.tail(segment.next_obs), each.mean(0))
    bonus = torch.randn(segment.rewards.shape)
    expected = td_lambda_targets(segment.rewards + bonus, each.min(0).values, segment.terminated, segment.truncated,
                                 params.gamma, params.value.td_lambda)
    seen = {}
    monkeypatch.setattr(value, "regress", lambda obs, targets: seen.update(obs=obs, targets=targets) or 0.0)
    before = [[p.clone() for p in target.parameters()] for target in value.targets]
    value.fit(segment, bonus)
    torch.testing.assert_close(seen["targets"], expected.flatten())
    assert segment.truncated.any()  # a piece closed by a truncation's tail, not only the segment end
    for target, critic, old in zip(value.targets, value.critics, before):  # Polyak steps of both copies
        for t, c, o in zip(target.parameters(), critic.parameters(), old):
            torch.testing.assert_close(t, 0.5 * o + 0.5 * c)


def test_short_run_trains_with_finite_losses_and_a_moving_temperature(tmp_path):
    run_dir = train(sapo_config(tmp_path), progress=False, params=SAPOConfig.from_config(sapo_config(tmp_path)))
    updates = [r for r in read_metrics(run_dir) if "grad_norm" in r]
    assert [r["env_steps"] for r in updates] == [16, 32]
    for row in updates:
        assert all(math.isfinite(row[key]) for key in ("actor_loss", "critic_loss", "grad_norm", "alpha", "entropy"))
    assert updates[0]["alpha"] != 1.0 and updates[1]["alpha"] != updates[0]["alpha"]
    saved = latest_checkpoint(run_dir)
    assert len(saved["twin_critics"]) == 1
    assert float(saved["log_alpha"]) == pytest.approx(math.log(updates[-1]["alpha"]))


def test_resume_from_checkpoint_continues_identically(tmp_path):
    # as test_apg.py's: the checkpoint lies after in-batch resets and inside the second episodes
    changes = {"num_envs": 2, "eval_every_env_steps": 4 * 60, "total_env_steps": 8 * 60,
               "algo_params.segment.length": 30}
    trainer = load_trainer("sapo")
    straight = trainer.train(sapo_config(tmp_path, "straight", **changes), progress=False)
    checkpoints = sorted(int(p.stem.split("_")[1]) for p in (straight / "checkpoints").glob("step_*.pt"))
    halfway = checkpoints[len(checkpoints) // 2]
    trainer.train(sapo_config(tmp_path, "resumed", **{**changes, "total_env_steps": halfway}), progress=False)
    resumed = trainer.train(sapo_config(tmp_path, "resumed", **changes), progress=False)

    def updates(run_dir):
        return [{k: v for k, v in r.items() if k not in ("wall_time", "eval_wall_time")} for r in read_metrics(run_dir) if "grad_norm" in r]

    assert updates(resumed) == updates(straight)
    a, b = latest_checkpoint(straight), latest_checkpoint(resumed)
    assert torch.equal(a["log_alpha"], b["log_alpha"])
    for key in ("actor_critic", "normalizer", "target_critic"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    for key in ("twin_critics", "twin_target_critics"):
        for saved_a, saved_b in zip(a[key], b[key]):
            assert all(torch.equal(saved_a[name], saved_b[name]) for name in saved_a), key


@pytest.mark.slow
def test_sapo_solves_point_mass_within_20k_env_steps(tmp_path):
    """At the task's sapo.yml defaults, seed 0 (docs/apg.md "SAPO": 90 % at 12,000 env steps there)."""
    config = resolve_config("sapo", POINT_MASS, {"seed": 0, "run_dir": str(tmp_path / "learn")})
    assert config.total_env_steps == 20_000
    rows = read_metrics(load_trainer("sapo").train(config, progress=False))
    evals = [(r["env_steps"], r["eval_success_rate"]) for r in rows if "eval_success_rate" in r]
    assert any(success >= 0.9 for _, success in evals), f"no evaluation reached 90 % success: {evals}"
