"""diffgym.training.gradients: per-env analytic and likelihood-ratio gradients against autograd, the
segment's returns-to-go against brute force, and the statistics behind grad-stats and the hybrid."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import pytest
import torch

import diffgym  # noqa: F401
from diffgym.training import ActorCritic, ObservationNormalizer, PolicySpec
from diffgym.training.gradients import (actor_parameters, compare_estimators, hybrid_weight,
                                        leave_one_out_baseline, per_env_analytic_gradients,
                                        per_env_likelihood_gradients, sample_statistics,
                                        surrogate_for_adjoints)
from diffgym.training.returns import returns_to_go
from diffgym.training.spec import NormalizerSpec


def rollout(env_id: str, num_envs: int = 6, steps: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    venv = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point")
    obs, _ = venv.reset(seed=seed)
    model = ActorCritic(venv.single_observation_space.shape[0], venv.single_action_space.shape[0], PolicySpec())
    with torch.no_grad():
        for p in actor_parameters(model):
            p.add_(0.3 * torch.randn_like(p))  # a policy whose mean is not ~0
    normalizer = ObservationNormalizer(venv.single_observation_space.shape[0], NormalizerSpec())
    normalizer.update(torch.as_tensor(obs))
    state, obs = venv.get_state(), torch.as_tensor(obs)
    actions, obs_norm, noises, pre_squash, rewards = [], [], [], [], []
    for _ in range(steps):
        o = normalizer(obs)
        action, u, eps = model.sample(o)
        out = venv.differentiable_step(state, action)
        actions.append(action)
        obs_norm.append(o.detach())
        noises.append(eps)
        pre_squash.append(u.detach())
        rewards.append(out.reward)
        state, obs = out.state, out.obs
    return model, actions, torch.stack(obs_norm), torch.stack(noises), torch.stack(pre_squash), torch.stack(rewards)


@pytest.mark.parametrize("env_id", ["DiffGym/PointMass1D-v0", "DiffGym/PointNav2D-v0"])
def test_per_env_analytic_gradients_sum_to_the_exact_gradient(env_id):
    """Parameters enter the return only through the actions: sum_i g_i (from the action adjoints and a
    pass through the policy alone) equals autograd's gradient through policy, observations and simulator."""
    model, actions, obs_norm, noise, _, rewards = rollout(env_id)
    objective = (rewards * torch.linspace(1.0, 2.0, rewards.shape[0])[:, None]).sum()
    params = actor_parameters(model)
    exact = torch.autograd.grad(objective, params, retain_graph=True)
    adjoints = torch.stack(torch.autograd.grad(objective, actions))
    per_env = per_env_analytic_gradients(model, obs_norm, noise, adjoints)
    assert per_env.shape == (rewards.shape[1], sum(p.numel() for p in params))
    flat_exact = torch.cat([g.flatten() for g in exact])
    assert float(flat_exact.norm()) > 1e-4
    torch.testing.assert_close(per_env.sum(dim=0), flat_exact, rtol=1e-4, atol=1e-6)
    surrogate = torch.autograd.grad(surrogate_for_adjoints(model, obs_norm, noise, adjoints), params)
    torch.testing.assert_close(torch.cat([g.flatten() for g in surrogate]), flat_exact, rtol=1e-4, atol=1e-6)


def test_per_env_likelihood_gradients_are_the_score_function_terms():
    model, _, obs_norm, _, pre_squash, _ = rollout("DiffGym/PointNav2D-v0")
    weights = torch.randn(obs_norm.shape[:2])
    per_env = per_env_likelihood_gradients(model, obs_norm, pre_squash, weights)
    for env in (0, 3):
        log_prob = model.distribution(obs_norm[:, env]).log_prob(pre_squash[:, env]).sum(-1)
        expected = torch.autograd.grad((log_prob * weights[:, env]).sum(), actor_parameters(model))
        torch.testing.assert_close(per_env[env], torch.cat([g.flatten() for g in expected]), rtol=1e-4, atol=1e-6)


def test_returns_to_go_is_the_influenceable_part_of_the_segment_objective():
    """d(objective)/d(r_t) weights (brute force over pieces) equal piece_discount, and future sums the
    piece's rewards from t on plus its tail."""
    gen = torch.Generator().manual_seed(3)
    steps, envs, gamma = 7, 4, 0.9
    rewards = torch.randn(steps, envs, generator=gen, dtype=torch.float64)
    values = torch.randn(steps, envs, generator=gen, dtype=torch.float64)
    ends = torch.rand(steps, envs, generator=gen)
    terminated, truncated = ends < 0.2, (ends >= 0.2) & (ends < 0.35)
    future, discount = returns_to_go(rewards, values, terminated, truncated, gamma)
    for env in range(envs):
        start = 0
        for t in range(steps):
            end = next(u for u in range(t, steps) if terminated[u, env] or truncated[u, env] or u == steps - 1)
            expected = sum(gamma ** (u - t) * float(rewards[u, env]) for u in range(t, end + 1))
            if not terminated[end, env]:
                expected += gamma ** (end - t + 1) * float(values[end, env])
            assert float(future[t, env]) == pytest.approx(expected, rel=1e-10)
            assert float(discount[t, env]) == pytest.approx(gamma ** (t - start), rel=1e-12)
            if terminated[t, env] or truncated[t, env]:
                start = t + 1


def test_leave_one_out_baseline_excludes_the_env_itself():
    values = torch.tensor([[1.0, 2.0, 6.0]])
    assert leave_one_out_baseline(values).tolist() == [[4.0, 3.5, 1.5]]


def test_statistics_and_bias_signal_on_synthetic_samples():
    gen = torch.Generator().manual_seed(0)
    n, p = 400, 50
    truth = torch.zeros(p)
    truth[0] = 1.0
    likelihood = truth + 3.0 * torch.randn(n, p, generator=gen)       # unbiased, noisy
    unbiased = truth + 0.1 * torch.randn(n, p, generator=gen)         # unbiased, precise
    biased = -truth + 0.1 * torch.randn(n, p, generator=gen)          # precise, pointing the wrong way
    stats = sample_statistics(likelihood)
    assert stats.variance_trace == pytest.approx(9.0 * p, rel=0.1)
    assert stats.standard_error == pytest.approx(math.sqrt(9.0 * p / n), rel=0.1)
    assert not compare_estimators(unbiased, likelihood).biased
    assert compare_estimators(biased, likelihood).biased
    assert compare_estimators(biased, likelihood).bias_sq == pytest.approx(4.0, rel=0.35)  # ||2 truth||^2
    # the hybrid trusts the precise analytic samples unless they disagree beyond the noise
    alpha_good, parts = hybrid_weight(unbiased, likelihood)
    assert alpha_good > 0.9 and parts["analytic_mean_variance"] < 1e-2 * parts["likelihood_mean_variance"]
    alpha_bad, parts = hybrid_weight(biased, likelihood)
    # MSE-optimal: v0 / (||b||^2 + v0) = (9 * 50 / 400) / (4 + 9 * 50 / 400) ~ 0.22 with the exact bias;
    # the confidence bound on ||b||^2 (< 4) makes it a little larger
    assert alpha_bad < 0.4 and parts["analytic_bias_sq"] > 1.0
    alpha_nan, _ = hybrid_weight(torch.full((n, p), math.inf), likelihood)
    assert alpha_nan == 0.0


def test_grad_stats_shows_analytic_variance_far_below_likelihood_on_point_mass(tmp_path):
    from diffgym.cli import main

    out = tmp_path / "gs"
    assert main(["grad-stats", "--env", "DiffGym/PointMass1D-v0", "--horizons", "1,8,32", "--envs", "16",
                 "--samples", "2", "--out", str(out)]) == 0
    import json

    report = json.loads((out / "grad_stats.json").read_text())
    assert [r["horizon"] for r in report["rows"]] == [1, 8, 32]
    for row in report["rows"]:
        assert row["rollouts"] == 32 and row["nonfinite"] == 0
        assert row["likelihood_variance"] > 10 * row["analytic_variance"]
    assert (out / "grad_stats.png").stat().st_size > 10_000


def test_grad_stats_loads_a_run_and_names_a_bad_one(tmp_path):
    from diffgym import load_policy
    from diffgym.diagnostics import gradient_stats
    from diffgym.plugins import resolve_config
    from diffgym_apg import train

    config = resolve_config("apg", "DiffGym/PointMass1D-v0", {
        "num_envs": 2, "total_env_steps": 16, "eval_every_env_steps": 16, "eval_episodes": 2,
        "algo_params.segment_length": 8, "run_dir": str(tmp_path / "run")})
    run_dir = train(config, progress=False)
    policy = load_policy(run_dir)
    assert policy.config.env_id == "DiffGym/PointMass1D-v0" and float(policy.normalizer.count) > 0
    rows = gradient_stats("DiffGym/PointMass1D-v0", [4], num_envs=4, samples=1, policy=run_dir)
    assert rows[0]["analytic_norm"] > 0
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_policy(tmp_path)


def test_grad_stats_start_after_measures_from_where_the_deterministic_policy_is(tmp_path):
    """``start_after`` W: the measured h-step return is the return of steps W..W+h-1 of the policy's own
    deterministic rollout (here a policy with negligible noise, so the sampled rollout is that one)."""
    from diffgym.cli import main
    from diffgym.diagnostics import rollout_gradients

    env_id, seeds, start_after, horizon, gamma = "DiffGym/PointMass1D-v0", [3, 4, 5], 7, 5, 0.9
    model, *_ = rollout(env_id)
    with torch.no_grad():
        model.log_std.fill_(-30.0)
    venv = gym.make_vec(env_id, num_envs=len(seeds), vectorization_mode="vector_entry_point")
    normalizer = ObservationNormalizer(venv.single_observation_space.shape[0], NormalizerSpec())
    obs, _ = venv.reset(seed=seeds)
    normalizer.update(torch.as_tensor(obs) * 2.0)
    state, obs, rewards = venv.get_state(), torch.as_tensor(obs), []
    with torch.no_grad():
        for _ in range(start_after + horizon):
            out = venv.differentiable_step(state, model.act(normalizer(obs), deterministic=True))
            state, obs = out.state, out.obs
            rewards.append(out.reward)
    discount = gamma ** torch.arange(horizon, dtype=torch.float32)[:, None]
    expected = (discount * torch.stack(rewards[start_after:])).sum(dim=0).mean()
    _, _, info = rollout_gradients(venv, model, normalizer, seeds, horizon, gamma, start_after=start_after)
    _, _, from_reset = rollout_gradients(venv, model, normalizer, seeds, horizon, gamma)
    assert info["mean_return"] == pytest.approx(float(expected), rel=1e-5)
    assert abs(from_reset["mean_return"] - info["mean_return"]) > 1e-3  # it did start somewhere else
    with pytest.raises(SystemExit, match="--start-after 95 plus the longest horizon 8 must fit in the episode "
                                         "\\(100 steps\\): pass --horizons up to 5"):
        main(["grad-stats", "--env", env_id, "--horizons", "8", "--start-after", "95", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--start-after must be >= 0 and below the episode length 100, got -1"):
        main(["grad-stats", "--env", env_id, "--start-after", "-1", "--out", str(tmp_path)])
    # without --horizons the default ones end where the episode does
    assert main(["grad-stats", "--env", env_id, "--start-after", "90", "--envs", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "grad_stats.json").read_text())
    assert [r["horizon"] for r in report["rows"]] == [1, 2, 4, 8, 10] and report["start_after"] == 90


def test_grad_stats_shows_the_pre_contact_gradient_only_with_the_option(tmp_path):
    """TPush without the approach shaping: in the first two steps from the start states no pusher touches
    the T, so the analytic gradient is exactly zero, as docs/apg.md says; with contact_gradient_distance
    (``--env-kwarg``) it is not, while the likelihood-ratio estimate, which sees only the forward pass, is
    the same to the bit."""
    from diffgym.cli import main

    reports = {}
    for distance in (0.0, 0.1):
        out = tmp_path / str(distance)
        assert main(["grad-stats", "--env", "DiffGym/TPush-v1", "--horizons", "1,2", "--envs", "8", "--samples", "2",
                     "--env-kwarg", "shaping_weight=0", "--env-kwarg", f"contact_gradient_distance={distance}",
                     "--out", str(out)]) == 0
        reports[distance] = json.loads((out / "grad_stats.json").read_text())
    assert reports[0.1]["env_kwargs"] == {"shaping_weight": 0, "contact_gradient_distance": 0.1}
    for off, on in zip(reports[0.0]["rows"], reports[0.1]["rows"]):
        assert off["analytic_norm"] == 0.0 and on["analytic_norm"] > 0.0
        assert on["likelihood_norm"] == off["likelihood_norm"] and on["mean_return"] == off["mean_return"]
    with pytest.raises(SystemExit, match="^diffgym grad-stats: contact_gradient_distance must be a finite distance"):
        main(["grad-stats", "--env", "DiffGym/TPush-v1", "--env-kwarg", "contact_gradient_distance=-1",
              "--out", str(tmp_path)])
