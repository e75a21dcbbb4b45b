"""Open-loop trajectory optimisation through ``differentiable_step``.

    python -m diffgym.demos.open_loop [--env DiffGym/PointMass1D-v0] [--num-envs 16] [--iterations 200]

Each of N envs gets its own sequence of H actions (one per step of an episode). Gradient ascent on the
episode return, backpropagated through all H Warp steps (one fused rollout per iteration), improves every
sequence; the script prints the
mean return and success rate before and after, and the wall time.
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import torch

import diffgym  # noqa: F401  (registers the tasks)


def episode_return(venv, start, logits: torch.Tensor):
    """Return of each env under actions ``tanh(logits)`` (tanh keeps them inside [-1, 1]), and its success
    at the last step: the whole episode is one fused rollout (``differentiable_rollout``)."""
    rollout = venv.differentiable_rollout(start, torch.tanh(logits))
    return rollout.reward.sum(dim=0), rollout.success[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="DiffGym/PointMass1D-v0")
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    venv = gym.make_vec(args.env, num_envs=args.num_envs)
    venv.reset(seed=args.seed)
    start = venv.get_state()
    horizon = venv.sim.max_episode_steps
    logits = torch.zeros(horizon, args.num_envs, venv.single_action_space.shape[0], requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=args.lr)

    with torch.no_grad():
        before, success_before = episode_return(venv, start, logits)
    print(f"{args.env}: optimising {args.num_envs} open-loop action sequences of {horizon} steps "
          f"by gradient ascent through differentiable_rollout")
    print(f"  before: mean return {before.mean():9.3f}   success {success_before.float().mean():.0%}")
    t0 = time.perf_counter()
    for it in range(1, args.iterations + 1):
        optimizer.zero_grad()
        returns, success = episode_return(venv, start, logits)
        (-returns.sum()).backward()
        optimizer.step()
        if it % max(1, args.iterations // 5) == 0:
            print(f"  iter {it:4d}: mean return {returns.mean():9.3f}   success {success.float().mean():.0%}")
    with torch.no_grad():
        after, success_after = episode_return(venv, start, logits)
    elapsed = time.perf_counter() - t0
    print(f"  after:  mean return {after.mean():9.3f}   success {success_after.float().mean():.0%}   "
          f"({args.iterations} gradient steps, {elapsed:.1f} s, "
          f"{args.iterations * horizon * args.num_envs / elapsed:,.0f} env-steps/s with backward)")


if __name__ == "__main__":
    main()
