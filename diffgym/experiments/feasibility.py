"""``diffgym feasibility``: is a task's success criterion reachable from its start distribution?

A task's ``reward_threshold`` and success criterion need a measured reference: a controller that reaches
them. This module's reference is a **sampling planner on the exact simulator** (model-predictive path
integral control, MPPI; Williams et al. 2017): at every control step it perturbs a nominal action
sequence of ``horizon`` steps with ``samples`` Gaussian draws, rolls every candidate out through the
task's own batched ``DiffSim.step`` (no gradients), weights the candidates by ``exp(-cost / temperature)``
(cost = minus the discounted return over the horizon, normalized per episode) and executes the first
action of the weighted mean, then shifts the sequence by one step (receding horizon). It needs no
learning and no task knowledge beyond the reward, so what it reaches is reachable.

Success is the protocol's (``docs/protocol.md``): ``info["is_success"]`` on the episode's *last* step;
the first step with ``is_success`` is reported as well.

A second planner, ``--planner gradient``, measures what *first-order* optimisation reaches on the same
episodes: each episode gets its own open-loop action sequence for the whole horizon, improved by Adam on
the episode return through the exact gradient (one fused rollout per iteration, ``DiffSim.rollout``).
No policy, no estimator and no segmenting stand between it and the true objective, so a task on which
it stalls far below the sampling planner has a landscape that local gradient steps do not cross,
whatever a gradient-based learner does with the gradient.

Defaults. A task whose reference ``docs/tasks.md`` cites has that reference's settings as its defaults
(:data:`REFERENCES`): ``diffgym feasibility --env DiffGym/TPush-v1`` runs exactly the planner, the episodes
and the seeds behind ``docs/feasibility/TPush-v1.json`` and reproduces its figure. Other tasks get the
generic settings (:data:`GENERIC_SETTINGS`). Several planner seeds (``seeds``) run one after another,
``episodes`` each, and their episodes are reported together.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import gymnasium as gym
import numpy as np
import torch

from diffgym.core.state import SimState
from diffgym.training.spec import task_name

FEASIBILITY_SEED_OFFSET = 9_000_000
"""Episode ``i`` starts from seed ``FEASIBILITY_SEED_OFFSET + i`` (disjoint from training and evaluation)."""
SEED_STRIDE = 1000
"""Planner seed ``s`` draws its episodes' start states from ``FEASIBILITY_SEED_OFFSET + SEED_STRIDE s + i``:
seeds run together must each have at most this many episodes, or their episodes would repeat."""

GENERIC_SETTINGS: dict[str, dict[str, Any]] = {
    "mppi": {"samples": 64, "horizon": 16, "noise_std": 0.6, "temperature": 0.05, "knot_steps": 1,
             "replan_every": 1, "fine_noise_std": None, "terminal_weight": 0.0},
    "gradient": {"iterations": 200, "lr": 0.05},
}
"""Each planner's settings on a task without a documented reference."""
GENERIC_EPISODES = 256
"""Episodes (per seed) on a task without a documented reference, or when ``seeds`` alone is given."""


@dataclass(frozen=True)
class Reference:
    """A task's documented feasibility reference: the result file ``docs/tasks.md`` cites and the
    settings that produced it, which are the task's defaults for that planner."""

    result: str
    """The reference's result, relative to the repository root."""
    settings: Mapping[str, Any]
    """Planner settings that differ from :data:`GENERIC_SETTINGS`."""
    episodes: int
    """Episodes per planner seed."""
    seeds: int
    """Planner seeds 0..seeds-1, run one after another."""


_TPUSH_MPPI = {"samples": 64, "horizon": 32, "noise_std": 0.8, "knot_steps": 2, "replan_every": 2,
               "fine_noise_std": 0.2, "terminal_weight": 30.0}
REFERENCES: dict[tuple[str, str], Reference] = {
    ("DiffGym/TPush-v0", "mppi"): Reference("docs/feasibility/TPush.json", _TPUSH_MPPI, 256, 1),
    ("DiffGym/TPush-v1", "mppi"): Reference("docs/feasibility/TPush-v1.json", _TPUSH_MPPI, 128, 2),
    ("DiffGym/TPush-v1", "gradient"): Reference("docs/feasibility/TPush-v1_gradient.json", {}, 64, 1),
}
"""``(task, planner)`` -> its documented reference."""


def planner_settings(env_id: str, planner: str = "mppi", episodes: int | None = None, seeds: int | None = None,
                     seed: int | None = None, **given: Any) -> dict[str, Any]:
    """The settings a run of ``planner`` on ``env_id`` uses: the task's reference settings (or the
    generic ones), then every ``given`` value that is not ``None``.

    ``episodes`` (per seed) and ``seeds`` are one choice, the episode sample: left both unset they are
    the reference's (TPush-v1: 128 episodes from each of seeds 0 and 1); set, the unset one is generic
    (256 episodes, 1 seed), so a documented single-seed command such as ``--episodes 128 --seed 1`` means
    what it always meant. Raises ``ValueError`` (one line) for a setting out of range."""
    if planner not in GENERIC_SETTINGS:
        raise ValueError(f"unknown planner {planner!r}; choose from {', '.join(GENERIC_SETTINGS)}")
    reference = REFERENCES.get((env_id, planner))
    unknown = sorted(set(given) - set(GENERIC_SETTINGS[planner]))
    if unknown:
        raise ValueError(f"the {planner} planner has no setting {', '.join(unknown)}")
    settings = {**GENERIC_SETTINGS[planner], **(reference.settings if reference else {})}
    settings.update({key: value for key, value in given.items() if value is not None})
    if episodes is None and seeds is None and reference is not None:
        episodes, seeds = reference.episodes, reference.seeds
    episodes = GENERIC_EPISODES if episodes is None else int(episodes)
    seeds = 1 if seeds is None else int(seeds)
    checks = {"episodes >= 1": episodes >= 1, "seeds >= 1": seeds >= 1,
              f"episodes <= {SEED_STRIDE} with several seeds": seeds == 1 or episodes <= SEED_STRIDE}
    if planner == "mppi":
        checks.update({"samples >= 2": settings["samples"] >= 2, "horizon >= 1": settings["horizon"] >= 1})
    else:
        checks.update({"iterations >= 1": settings["iterations"] >= 1, "lr > 0": settings["lr"] > 0})
    failed = [rule for rule, ok in checks.items() if not ok]
    if failed:
        raise ValueError(f"need {', '.join(failed)}; got " + ", ".join(
            f"{key} {value}" for key, value in {"episodes": episodes, "seeds": seeds, **settings}.items()))
    return {"planner": planner, "episodes": episodes, "seeds": seeds, "seed": 0 if seed is None else int(seed),
            **settings}


def run_planner(env_id: str, settings: Mapping[str, Any], env_kwargs: dict[str, Any] | None = None,
                progress: bool = False) -> dict[str, Any]:
    """Run the planner ``settings`` (from :func:`planner_settings`) names: ``episodes`` episodes for each
    of the seeds ``seed .. seed + seeds - 1``; one seed's result as it is, several merged
    (:func:`merge_seeds`)."""
    planner = settings["planner"]
    run = mppi_episodes if planner == "mppi" else gradient_episodes
    params = {key: settings[key] for key in GENERIC_SETTINGS[planner]}
    results = []
    for seed in range(settings["seed"], settings["seed"] + settings["seeds"]):
        if progress and settings["seeds"] > 1:
            print(f"seed {seed}: {settings['episodes']} episodes", flush=True)
        results.append(run(env_id, settings["episodes"], seed=seed, progress=progress, env_kwargs=env_kwargs,
                           **params))
    return results[0] if len(results) == 1 else merge_seeds(results)


_PER_EPISODE = ("returns", "first_success_steps")
_SUMMED = ("wall_time", "env_steps_simulated")
_EPISODE_WEIGHTED = ("success_rate", "mean_best_return")  # a seed's statistic over its episodes
_RECOMPUTED = ("reached_rate", "median_first_success_step", "mean_return", "return_std", "mean_return_of_reached")


def merge_seeds(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One result over the episodes of several seeds' results (same task and settings): the settings,
    ``episodes`` (all of them), ``seeds``, ``episodes_per_seed``, the per-episode lists concatenated in
    seed order and every statistic over all episodes (from the lists as stored, as the documented
    references were merged)."""
    counts = [int(r["episodes"]) for r in results]
    total = sum(counts)
    returns = np.concatenate([np.asarray(r["returns"], dtype=float) for r in results])
    first_success = np.concatenate([np.asarray(r["first_success_steps"]) for r in results])
    statistics = episode_statistics(returns, first_success)
    merged = {key: value for key, value in results[0].items()
              if key not in (*_PER_EPISODE, *_SUMMED, *_EPISODE_WEIGHTED, *_RECOMPUTED, "seed", "episodes")}
    merged.update({"episodes": total, "seeds": [int(r["seed"]) for r in results], "episodes_per_seed": counts})
    for key in _EPISODE_WEIGHTED:
        if key in results[0]:
            merged[key] = float(sum(r[key] * n for r, n in zip(results, counts)) / total)
    merged.update({key: statistics[key] for key in _RECOMPUTED})
    merged.update({"returns": returns.tolist(), "first_success_steps": first_success.tolist()})
    merged.update({key: sum(r[key] for r in results) for key in _SUMMED})
    return merged


def episode_statistics(returns: np.ndarray, first_success: np.ndarray) -> dict[str, float]:
    """Statistics over episodes of their returns and first-success steps (-1: never reached)."""
    reached = first_success > 0
    return {
        "reached_rate": float(reached.mean()),
        "median_first_success_step": float(np.median(first_success[reached])) if reached.any() else math.nan,
        "mean_return": float(returns.mean()), "return_std": float(returns.std()),
        "mean_return_of_reached": float(returns[reached].mean()) if reached.any() else math.nan,
    }


def describe(result: Mapping[str, Any]) -> str:
    """A planner result in one line, as ``diffgym feasibility`` prints it."""
    name = task_name(result["env_id"])
    seeds = result.get("seeds", [result.get("seed", 0)])
    sample = f"{result['episodes']} episodes (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"
    outcome = (f"success on the last step {result['success_rate']:.3f}, reached at least once "
               f"{result['reached_rate']:.3f}")
    if result.get("planner") == "gradient":
        return (f"{name}: open-loop gradient optimisation ({result['iterations']} Adam steps, lr {result['lr']}) over "
                f"{sample}: {outcome}, return {result['mean_return']:.2f} +- {result['return_std']:.2f} (best per "
                f"episode {result['mean_best_return']:.2f}); {result['wall_time']:.0f} s")
    return (f"{name}: MPPI ({result['samples']} samples x {result['horizon']} steps, knots of {result['knot_steps']}, "
            f"replanning every {result['replan_every']}) over {sample}: {outcome} (median first step "
            f"{result['median_first_success_step']:.0f}), return {result['mean_return']:.2f} +- "
            f"{result['return_std']:.2f}; {result['wall_time']:.0f} s")


def _planner_starts(env_id: str, episodes: int, seed: int, env_kwargs: dict[str, Any] | None):
    """The task's sim, its horizon and the planners' ``episodes`` start states: episode ``i`` from the
    stream ``(FEASIBILITY_SEED_OFFSET + SEED_STRIDE seed + i, 0)``, the same for both planners."""
    env = gym.make(env_id, **(env_kwargs or {}))
    sim = env.unwrapped.sim
    max_steps = env.spec.max_episode_steps
    env.close()
    seeds = torch.arange(episodes, dtype=torch.int32) + FEASIBILITY_SEED_OFFSET + SEED_STRIDE * seed
    return sim, max_steps, sim.reset(seeds.to(sim.device), torch.zeros(episodes, dtype=torch.int32, device=sim.device))


def _repeat(state: SimState, times: int) -> SimState:
    return type(state)(*(t.repeat_interleave(times, dim=0) for t in state.tensors()))


@torch.no_grad()
def mppi_episodes(env_id: str, episodes: int, samples: int = 64, horizon: int = 16, noise_std: float = 0.6,
                  temperature: float = 0.05, gamma: float = 0.99, seed: int = 0, knot_steps: int = 1,
                  replan_every: int = 1, terminal_weight: float = 0.0, fine_noise_std: float | None = None,
                  progress: bool = False,
                  env_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``episodes`` seeded episodes of the MPPI planner in one batch; return their statistics.

    The plan is piecewise constant: ``horizon // knot_steps`` knots, each held for ``knot_steps``
    control steps (long detours, such as walking the pusher around a block, are then a few coherent
    perturbations instead of many independent ones). The planner replans every ``replan_every``
    steps and executes the plan in between. ``temperature`` is relative: costs are rescaled per
    episode to [0, 1] before the softmax, so it is the fraction of the candidates' cost spread that
    separates weights by a factor e. Half the candidates are drawn with ``fine_noise_std`` when given
    (small corrections near the goal, large detours far from it). ``terminal_weight`` adds that many
    copies of the last step's reward to each candidate's return, a crude cost-to-go: it lets a plan
    pay for a detour (walking around an object) that ends in a better state than the horizon's reward
    sum alone would credit.
    """
    import diffgym  # noqa: F401  (registers the tasks)

    if horizon % knot_steps or replan_every > horizon or replan_every % knot_steps:
        raise ValueError(f"need horizon ({horizon}) and replan_every ({replan_every}) multiples of knot_steps "
                         f"({knot_steps}) and replan_every <= horizon")
    sim, max_steps, state = _planner_starts(env_id, episodes, seed, env_kwargs)
    generator = torch.Generator(device=sim.device).manual_seed(seed)
    knots = horizon // knot_steps
    # half the candidates explore at noise_std, half refine at fine_noise_std (precise final adjustments)
    scales = torch.full((samples,), noise_std, device=sim.device)
    scales[samples // 2:] = noise_std if fine_noise_std is None else fine_noise_std
    nominal = torch.zeros(episodes, knots, sim.act_dim, device=sim.device)
    discount = gamma ** torch.arange(horizon, dtype=torch.float32, device=sim.device)
    returns = np.zeros(episodes)
    first_success = np.full(episodes, -1)
    success = np.zeros(episodes, dtype=bool)
    ended = np.zeros(episodes, dtype=bool)
    knot_of_step = torch.arange(horizon, device=sim.device) // knot_steps
    start = time.perf_counter()
    for t in range(max_steps):
        if t % replan_every == 0:
            noise = scales[None, :, None, None] * torch.randn(episodes, samples, knots, sim.act_dim,
                                                              generator=generator, device=sim.device)
            noise[:, 0] = 0.0  # the nominal plan itself is always a candidate
            candidates = (nominal[:, None] + noise).clamp(-1.0, 1.0)
            # every candidate's whole horizon in one fused call: (horizon, episodes * samples, act_dim)
            sequences = candidates[:, :, knot_of_step].reshape(episodes * samples, horizon, sim.act_dim)
            rollout = sim.rollout(_repeat(state, samples), sequences.transpose(0, 1).contiguous())
            value = torch.zeros(episodes * samples, device=sim.device)
            alive = torch.ones(episodes * samples, dtype=torch.bool, device=sim.device)
            last = torch.zeros(episodes * samples, device=sim.device)
            for k in range(horizon):
                reward = torch.nan_to_num(rollout.reward[k], nan=-1e6)
                value = value + torch.where(alive, discount[k] * reward, torch.zeros_like(reward))
                last = torch.where(alive, reward, last)
                alive = alive & ~rollout.terminated[k]  # nothing is earned after a terminal state
            value = value + terminal_weight * discount[-1] * last
            cost = -value.view(episodes, samples)
            low, high = cost.min(dim=1, keepdim=True).values, cost.max(dim=1, keepdim=True).values
            weights = torch.softmax(-(cost - low) / ((high - low).clamp_min(1e-9) * temperature), dim=1)
            nominal = (weights[:, :, None, None] * candidates).sum(dim=1)
            executed = 0
        out = sim.step(state, nominal[:, executed // knot_steps])
        executed += 1
        state = out.state
        running = ~ended
        returns[running] += out.reward.double().cpu().numpy()[running]
        is_success = out.success.bool().cpu().numpy()
        first_success[(first_success < 0) & is_success & running] = t + 1
        success = np.where(running, is_success, success)  # an ended episode keeps its last step's success
        ended |= out.terminated.cpu().numpy()
        if executed == replan_every:  # receding horizon: drop what was executed, repeat the last knot
            shift = replan_every // knot_steps
            nominal = torch.cat([nominal[:, shift:], nominal[:, -1:].expand(-1, shift, -1)], dim=1)
        if progress and (t + 1) % 20 == 0:
            print(f"  step {t + 1}/{max_steps}: success now {is_success.mean():.2f}, "
                  f"reached once {(first_success > 0).mean():.2f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return {
        "env_id": env_id, "episodes": episodes, "samples": samples, "horizon": horizon, "noise_std": noise_std,
        "temperature": temperature, "gamma": gamma, "seed": seed, "knot_steps": knot_steps,
        "replan_every": replan_every, "terminal_weight": terminal_weight, "fine_noise_std": fine_noise_std,
        "success_rate": float(success.mean()), **episode_statistics(returns, first_success),
        "returns": returns.round(3).tolist(), "first_success_steps": first_success.tolist(),
        "wall_time": time.perf_counter() - start,
        "env_steps_simulated": int(math.ceil(max_steps / replan_every) * episodes * samples * horizon
                                   + max_steps * episodes),
    }


def gradient_episodes(env_id: str, episodes: int, iterations: int = 200, lr: float = 0.05, seed: int = 0,
                      progress: bool = False, env_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Open-loop trajectory optimisation with exact gradients on ``episodes`` seeded episodes (the same
    starts as :func:`mppi_episodes`): one action sequence ``tanh(logits)`` per episode over the whole
    horizon, from zero, ``iterations`` Adam steps on the episode return (each one fused rollout and its
    backward). Reports the final sequences' statistics and the mean of each episode's best return."""
    import diffgym  # noqa: F401  (registers the tasks)

    sim, max_steps, start_state = _planner_starts(env_id, episodes, seed, env_kwargs)
    logits = torch.zeros(max_steps, episodes, sim.act_dim, device=sim.device, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    best = torch.full((episodes,), -math.inf, dtype=torch.float64)
    start = time.perf_counter()
    for iteration in range(iterations + 1):
        rollout = sim.rollout(start_state, torch.tanh(logits))
        episode_return = rollout.reward.sum(dim=0)
        best = torch.maximum(best, episode_return.detach().double().cpu())
        if iteration == iterations:  # this rollout scores the final sequences; no step after it
            break
        optimizer.zero_grad()
        (-episode_return.sum()).backward()
        optimizer.step()
        if progress and (iteration + 1) % 20 == 0:
            print(f"  iteration {iteration + 1}/{iterations}: return {float(episode_return.mean()):.2f}, success on "
                  f"the last step {float(rollout.success[-1].float().mean()):.2f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    success = rollout.success.cpu().numpy()
    first_success = np.where(success.any(axis=0), success.argmax(axis=0) + 1, -1)
    returns = episode_return.detach().double().cpu().numpy()
    return {
        "env_id": env_id, "planner": "gradient", "episodes": episodes, "iterations": iterations, "lr": lr,
        "seed": seed, "env_kwargs": env_kwargs or {},
        "success_rate": float(success[-1].mean()), **episode_statistics(returns, first_success),
        "mean_best_return": float(best.mean()),
        "returns": returns.round(3).tolist(), "first_success_steps": first_success.tolist(),
        "wall_time": time.perf_counter() - start,
        "env_steps_simulated": int((iterations + 1) * max_steps * episodes),
    }
