"""Gradient diagnostics: how good are a task's analytic policy gradients, horizon by horizon?

``gradient_stats`` rolls a policy (a run's latest checkpoint, or the freshly initialised shared
actor-critic) out for ``h`` steps from the task's start distribution, and estimates the gradient of the
``h``-step discounted return with respect to the actor's parameters on the *same* rollouts by

* the **analytic** path: reparameterized actions through ``differentiable_step`` (exact gradients of
  the sampled rollouts), and
* the **likelihood-ratio** path: REINFORCE with a leave-one-out baseline (unbiased whatever the
  dynamics, but noisy).

Per horizon it reports each estimator's batch-mean norm and per-sample variance (trace), their cosine,
and the empirical bias test of Suh et al. 2022 (``diffgym.training.gradients.compare_estimators``).
The command ``diffgym grad-stats`` prints the table and writes ``grad_stats.json`` and ``grad_stats.png``.
How to read them: ``docs/diagnostics.md``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import torch

from diffgym.core.registration import task_spec
from diffgym.training.gradients import (compare_estimators, hybrid_weight, leave_one_out_baseline,
                                        per_env_analytic_gradients, per_env_likelihood_gradients,
                                        sample_statistics)
from diffgym.training.networks import ActorCritic
from diffgym.training.normalization import ObservationNormalizer
from diffgym.training.spec import NormalizerSpec, PolicySpec

DIAGNOSTICS_SEED_OFFSET = 7_000_000
"""Start states of the diagnostics are drawn from seeds ``DIAGNOSTICS_SEED_OFFSET + 1000 * seed + i``,
away from training and evaluation seeds."""


def default_horizons(env_id: str, start_after: int = 0) -> list[int]:
    """1, 2, 4, ... up to the steps left in an episode after ``start_after`` (which is included)."""
    episode = task_spec(env_id).max_episode_steps
    horizon = episode - start_after if episode else 256
    out, h = [], 1
    while h < horizon:
        out.append(h)
        h *= 2
    return out + [horizon]


def rollout_gradients(venv, model: ActorCritic, normalizer: ObservationNormalizer, seeds: list[int],
                       horizon: int, gamma: float, start_after: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Per-env analytic and likelihood-ratio gradients ``(M, P)`` of the ``horizon``-step return, measured
    from the reset state or, with ``start_after`` W, from where the policy's deterministic actions have
    taken it after W steps (the same state for every rollout of one start: the dynamics are deterministic)."""
    obs, _ = venv.reset(seed=seeds)
    state = venv.get_state()
    obs = torch.as_tensor(obs, dtype=torch.float32)
    with torch.no_grad():
        for _ in range(start_after):
            out = venv.differentiable_step(state, model.act(normalizer(obs), deterministic=True))
            state, obs = out.state, out.obs
    num_envs = len(seeds)
    alive = torch.ones(num_envs, dtype=torch.bool)
    rewards, actions, obs_norm, noises, pre_squash = [], [], [], [], []
    for _ in range(horizon):
        o = normalizer(obs)
        action, u, eps = model.sample(o)
        out = venv.differentiable_step(state, action)
        rewards.append(torch.where(alive, out.reward, torch.zeros_like(out.reward)))
        actions.append(action)
        obs_norm.append(o.detach())
        noises.append(eps.detach())
        pre_squash.append(u.detach())
        alive = alive & ~(out.terminated | out.truncated)  # no restarts: an ended episode earns nothing more
        state, obs = out.state, out.obs
    reward = torch.stack(rewards)
    discount = gamma ** torch.arange(horizon, dtype=reward.dtype)[:, None]
    returns = (discount * reward).sum(dim=0)  # (M,)
    finite = torch.isfinite(returns)
    adjoints = torch.autograd.grad(torch.where(finite, returns, torch.zeros_like(returns)).sum(), actions,
                                   allow_unused=True)
    adjoints = torch.stack([torch.zeros_like(a) if g is None else g for a, g in zip(actions, adjoints)])
    finite &= torch.isfinite(adjoints).all(dim=2).all(dim=0)
    adjoints = torch.where(finite[None, :, None], adjoints, torch.zeros_like(adjoints))
    with torch.no_grad():
        safe = torch.where(finite[None, :], reward.detach(), torch.zeros_like(reward))
        # the action at t influences gamma^t * (rewards from t on)
        to_go = torch.flip(torch.cumsum(torch.flip(discount * safe, [0]), 0), [0])
        weights = to_go - leave_one_out_baseline(to_go)
        weights = torch.where(finite[None, :], weights, torch.zeros_like(weights))
    obs_norm, noises, pre_squash = torch.stack(obs_norm), torch.stack(noises), torch.stack(pre_squash)
    analytic = per_env_analytic_gradients(model, obs_norm, noises, adjoints)[finite]
    likelihood = per_env_likelihood_gradients(model, obs_norm, pre_squash, weights)[finite]
    info = {"mean_return": float(returns.detach()[finite].mean()) if bool(finite.any()) else math.nan,
            "nonfinite": int((~finite).sum())}
    return analytic, likelihood, info


def gradient_stats(env_id: str, horizons: Sequence[int] | None = None, num_envs: int = 64, samples: int = 4,
                   policy: str | Path | None = None, seed: int = 0, gamma: float | None = None,
                   env_kwargs: dict[str, Any] | None = None, start_after: int = 0) -> list[dict[str, Any]]:
    """One row per horizon: both estimators' statistics and their comparison.

    ``num_envs`` start states (the task's reset distribution), each rolled out ``samples`` times with
    independent action noise, so every statistic is over ``num_envs * samples`` rollouts. ``policy`` is
    a run directory (its latest checkpoint) or ``None`` for the freshly initialised shared actor-critic
    (``PolicySpec`` defaults, seeded by ``seed``). Gradients are with respect to the actor's parameters
    (MLP and log-std) of the ``h``-step discounted return ``sum_{t<h} gamma^t r_t`` (``gamma``: the
    policy's own ``algo_params.gamma`` when it has one, else 0.99). ``start_after`` W measures from the
    states the policy's deterministic actions reach in W steps instead of the reset states (for a trained
    policy: mid-task, e.g. in contact, rather than its first approach); ``W + h`` must fit in an episode.
    """
    import diffgym  # noqa: F401  (registers the tasks)

    episode = task_spec(env_id).max_episode_steps
    if start_after < 0 or (episode is not None and start_after >= episode):
        raise ValueError(f"--start-after must be >= 0 and below the episode length {episode}, got {start_after}")
    horizons = list(horizons or default_horizons(env_id, start_after))
    if start_after and episode is not None and start_after + max(horizons) > episode:
        raise ValueError(f"--start-after {start_after} plus the longest horizon {max(horizons)} must fit in the "
                         f"episode ({episode} steps): pass --horizons up to {episode - start_after}")
    torch.manual_seed(seed)
    venv = gym.make_vec(env_id, num_envs=num_envs * samples, vectorization_mode="vector_entry_point",
                        **(env_kwargs or {}))
    try:
        if policy is None:
            obs_dim = int(np.prod(venv.single_observation_space.shape))
            act_dim = int(np.prod(venv.single_action_space.shape))
            model = ActorCritic(obs_dim, act_dim, PolicySpec())
            normalizer = ObservationNormalizer(obs_dim, NormalizerSpec())
            # statistics from the start distribution, as a trainer's first update would see them
            obs, _ = venv.reset(seed=DIAGNOSTICS_SEED_OFFSET - 1)
            normalizer.update(torch.as_tensor(obs))
        else:
            from diffgym.policy import load_policy
            from diffgym.policy_commands import check_policy_fits

            loaded = load_policy(policy)
            check_policy_fits(loaded, env_id)
            model, normalizer = loaded.model, loaded.normalizer
            if gamma is None:  # the discount the policy was trained with, when its trainer has one
                gamma = float(loaded.config.algo_params.get("gamma", 0.99))
        gamma = 0.99 if gamma is None else gamma
        starts = [DIAGNOSTICS_SEED_OFFSET + 1000 * seed + i for i in range(num_envs)]
        seeds = [s for s in starts for _ in range(samples)]
        rows = []
        for h in horizons:
            analytic, likelihood, info = rollout_gradients(venv, model, normalizer, seeds, h, gamma, start_after)
            a, z = sample_statistics(analytic), sample_statistics(likelihood)
            comparison = compare_estimators(analytic, likelihood)
            alpha, _ = hybrid_weight(analytic, likelihood)
            rows.append({"horizon": h, "start_after": start_after, "rollouts": analytic.shape[0], "gamma": gamma,
                         **info,
                         "analytic_norm": a.norm, "analytic_variance": a.variance_trace,
                         "analytic_noise_to_signal": a.noise_to_signal,
                         "likelihood_norm": z.norm, "likelihood_variance": z.variance_trace,
                         "likelihood_noise_to_signal": z.noise_to_signal,
                         "cosine": comparison.cosine, "difference_norm": comparison.difference_norm,
                         "difference_se": comparison.difference_standard_error,
                         "bias_sq": comparison.bias_sq, "bias_sq_se": comparison.bias_sq_se,
                         "bias_z": comparison.bias_z, "biased": comparison.biased, "hybrid_alpha": alpha})
    finally:
        venv.close()
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("| h | analytic norm | analytic var | likelihood norm | likelihood var | var ratio (LR/AN) | "
              "cosine | bias z | biased | hybrid alpha | non-finite |")
    lines = [header, "|" + "---:|" * 11]
    for r in rows:
        ratio = r["likelihood_variance"] / r["analytic_variance"] if r["analytic_variance"] > 0 else math.inf
        lines.append(f"| {r['horizon']} | {r['analytic_norm']:.3g} | {r['analytic_variance']:.3g} | "
                     f"{r['likelihood_norm']:.3g} | {r['likelihood_variance']:.3g} | {ratio:.3g} | "
                     f"{r['cosine']:.2f} | {r['bias_z']:.1f} | {'yes' if r['biased'] else 'no'} | "
                     f"{r['hybrid_alpha']:.2f} | {r['nonfinite']} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], title: str, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = [r["horizon"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=110)
    for key, label, color in (("analytic", "analytic", "tab:blue"), ("likelihood", "likelihood ratio", "tab:orange")):
        axes[0].plot(h, [r[f"{key}_norm"] for r in rows], "o-", color=color, label=label)
        axes[1].plot(h, [r[f"{key}_variance"] for r in rows], "o-", color=color, label=label)
    axes[0].set_ylabel("norm of the batch-mean gradient")
    axes[1].set_ylabel("per-sample variance (trace)")
    axes[2].plot(h, [r["cosine"] for r in rows], "o-", color="tab:green", label="cosine")
    axes[2].plot(h, [r["hybrid_alpha"] for r in rows], "s--", color="tab:purple", label="hybrid alpha")
    biased = [r for r in rows if r["biased"]]
    if biased:
        axes[2].scatter([r["horizon"] for r in biased], [r["cosine"] for r in biased], s=120, facecolors="none",
                        edgecolors="red", label="bias detected")
    axes[2].set_ylim(-1.05, 1.05)
    axes[2].axhline(0.0, color="grey", lw=0.5)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("horizon h [steps]")
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
