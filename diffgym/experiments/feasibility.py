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
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from diffgym.core.state import SimState
from diffgym.training.spec import task_name

FEASIBILITY_SEED_OFFSET = 9_000_000
"""Episode ``i`` starts from seed ``FEASIBILITY_SEED_OFFSET + i`` (disjoint from training and evaluation)."""


def _planner_starts(env_id: str, episodes: int, seed: int, env_kwargs: dict[str, Any] | None):
    """The task's sim, its horizon and the planners' ``episodes`` start states: episode ``i`` from the
    stream ``(FEASIBILITY_SEED_OFFSET + 1000 seed + i, 0)``, the same for both planners."""
    env = gym.make(env_id, **(env_kwargs or {}))
    sim = env.unwrapped.sim
    max_steps = env.spec.max_episode_steps
    env.close()
    seeds = torch.arange(episodes, dtype=torch.int32) + FEASIBILITY_SEED_OFFSET + 1000 * seed
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
    reached = first_success[first_success > 0]
    return {
        "env_id": env_id, "episodes": episodes, "samples": samples, "horizon": horizon, "noise_std": noise_std,
        "temperature": temperature, "gamma": gamma, "seed": seed, "knot_steps": knot_steps,
        "replan_every": replan_every, "terminal_weight": terminal_weight, "fine_noise_std": fine_noise_std,
        "success_rate": float(success.mean()),
        "reached_rate": float((first_success > 0).mean()),
        "median_first_success_step": float(np.median(reached)) if reached.size else math.nan,
        "mean_return": float(returns.mean()), "return_std": float(returns.std()),
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
    reached = first_success[first_success > 0]
    returns = episode_return.detach().double().cpu().numpy()
    return {
        "env_id": env_id, "planner": "gradient", "episodes": episodes, "iterations": iterations, "lr": lr,
        "seed": seed, "env_kwargs": env_kwargs or {},
        "success_rate": float(success[-1].mean()), "reached_rate": float((first_success > 0).mean()),
        "median_first_success_step": float(np.median(reached)) if reached.size else math.nan,
        "mean_return": float(returns.mean()), "return_std": float(returns.std()),
        "mean_best_return": float(best.mean()),
        "returns": returns.round(3).tolist(), "first_success_steps": first_success.tolist(),
        "wall_time": time.perf_counter() - start,
        "env_steps_simulated": int((iterations + 1) * max_steps * episodes),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", required=True, help="task id, e.g. DiffGym/TPush-v0")
    parser.add_argument("--episodes", type=int, default=256, help="seeded episodes (one batch)")
    parser.add_argument("--samples", type=int, default=64, help="candidate action sequences per step")
    parser.add_argument("--horizon", type=int, default=16, help="planning horizon [control steps]")
    parser.add_argument("--noise-std", type=float, default=0.6, help="std of the action perturbations")
    parser.add_argument("--temperature", type=float, default=0.05, help="softmax temperature (relative)")
    parser.add_argument("--knot-steps", type=int, default=1, help="control steps each planned action is held")
    parser.add_argument("--replan-every", type=int, default=1, help="control steps executed between replans")
    parser.add_argument("--fine-noise-std", type=float, default=None,
                        help="std of the second half of the candidates (default: --noise-std)")
    parser.add_argument("--terminal-weight", type=float, default=0.0,
                        help="extra weight of the horizon's last reward (a crude cost-to-go)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--planner", choices=("mppi", "gradient"), default="mppi",
                        help="mppi: the sampling planner (default); gradient: open-loop trajectory optimisation "
                             "with exact gradients, what first-order optimisation reaches")
    parser.add_argument("--iterations", type=int, default=200, help="gradient planner: Adam steps per episode")
    parser.add_argument("--lr", type=float, default=0.05, help="gradient planner: Adam learning rate on the logits")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a task constructor argument, e.g. start_spread=0.3 (repeatable)")
    parser.add_argument("--out", default=None, help="JSON output (default runs/feasibility/<task>.json)")


def main(args: argparse.Namespace) -> int:
    from diffgym.experiments.options import key_values

    torch.set_num_threads(1)
    if args.episodes < 1 or args.samples < 2 or args.horizon < 1 or args.iterations < 1 or not args.lr > 0:
        raise SystemExit("diffgym feasibility: need --episodes >= 1, --samples >= 2, --horizon >= 1, "
                         "--iterations >= 1 and --lr > 0")
    env_kwargs = key_values(args.sets)
    try:
        if args.planner == "gradient":
            result = gradient_episodes(args.env, args.episodes, args.iterations, args.lr, seed=args.seed,
                                       progress=True, env_kwargs=env_kwargs)
        else:
            result = mppi_episodes(args.env, args.episodes, args.samples, args.horizon, args.noise_std,
                                   args.temperature, seed=args.seed, knot_steps=args.knot_steps,
                                   replan_every=args.replan_every, terminal_weight=args.terminal_weight,
                                   fine_noise_std=args.fine_noise_std, progress=True, env_kwargs=env_kwargs)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"diffgym feasibility: {error}") from None
    out = Path(args.out or Path("runs") / "feasibility" / f"{task_name(args.env)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.planner == "gradient":
        print(f"{task_name(args.env)}: open-loop gradient optimisation ({args.iterations} Adam steps, lr {args.lr}) "
              f"over {args.episodes} episodes: success on the last step {result['success_rate']:.3f}, reached at "
              f"least once {result['reached_rate']:.3f}, return {result['mean_return']:.2f} +- "
              f"{result['return_std']:.2f} (best per episode {result['mean_best_return']:.2f}); "
              f"{result['wall_time']:.0f} s")
        print(f"wrote {out}")
        return 0
    print(f"{task_name(args.env)}: MPPI ({args.samples} samples x {args.horizon} steps, knots of {args.knot_steps}, "
          f"replanning every {args.replan_every}) over {args.episodes} "
          f"episodes: success on the last step {result['success_rate']:.3f}, reached at least once "
          f"{result['reached_rate']:.3f} (median first step {result['median_first_success_step']:.0f}), "
          f"return {result['mean_return']:.2f} +- {result['return_std']:.2f}; {result['wall_time']:.0f} s")
    print(f"wrote {out}")
    return 0
