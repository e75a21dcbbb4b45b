"""Fused rollouts vs ``differentiable_step`` in a Python loop (issue "Speed", item 4).

    OMP_NUM_THREADS=1 python benchmarks/bench_rollout.py [--device cpu] [--steps 32] [--repeats 7]

For each task and batch size: a T-step rollout of fixed actions, forward only (no grad) and forward +
backward of the summed reward, by the loop and by ``DiffSim.rollout``; the two are interleaved repeat by
repeat so both see the same machine load. Prints env-steps/s and the fused/loop ratio (medians).
"""

from __future__ import annotations

import argparse
import statistics
import time

import gymnasium as gym
import torch

import diffgym  # noqa: F401  (registers the tasks)

TASKS = ("DiffGym/PointMass1D-v0", "DiffGym/PointNav2D-v0", "DiffGym/TPush-v1", "DiffGym/FrankaReach-v0")


def loop(sim, state, actions, backward: bool) -> None:
    total = 0.0
    for action in actions:
        out = sim._step(state, action.clamp(-1.0, 1.0))
        state, total = out.state, total + out.reward.sum()
    if backward:
        total.backward()


def fused(sim, state, actions, backward: bool) -> None:
    rollout = sim.rollout(state, actions)
    if backward:
        rollout.reward.sum().backward()


def timed(fn, sim, state, actions, backward: bool) -> float:
    if backward:
        actions = actions.detach().requires_grad_(True)
        start = time.perf_counter()
        fn(sim, state, actions, True)
    else:
        start = time.perf_counter()
        with torch.no_grad():
            fn(sim, state, actions, False)
    if sim.device.type == "cuda":
        torch.cuda.synchronize(sim.device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", default="1,64,4096")
    parser.add_argument("--tasks", default=",".join(TASKS))
    args = parser.parse_args()
    print(f"| task | N | loop fwd (env-steps/s) | fused fwd | fused/loop | loop fwd+bwd | fused fwd+bwd | fused/loop |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for env_id in args.tasks.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            venv = gym.make_vec(env_id, num_envs=batch, device=args.device)
            venv.reset(seed=0)
            sim, state = venv.sim, venv.get_state()
            actions = torch.rand(args.steps, batch, sim.act_dim, generator=torch.Generator().manual_seed(0))
            actions = (2 * actions - 1).to(sim.device)
            times: dict[tuple[str, bool], list[float]] = {}
            for repeat in range(args.repeats + 2):  # two warm-up rounds (kernel loads, plans)
                for backward in (False, True):
                    for name, fn in (("loop", loop), ("fused", fused)):
                        seconds = timed(fn, sim, state, actions, backward)
                        if repeat >= 2:
                            times.setdefault((name, backward), []).append(seconds)
            rate = {key: args.steps * batch / statistics.median(v) for key, v in times.items()}
            print(f"| {env_id} | {batch} | {rate['loop', False]:,.0f} | {rate['fused', False]:,.0f} | "
                  f"{rate['fused', False] / rate['loop', False]:.1f}x | {rate['loop', True]:,.0f} | "
                  f"{rate['fused', True]:,.0f} | {rate['fused', True] / rate['loop', True]:.1f}x |", flush=True)
            venv.close()


if __name__ == "__main__":
    main()
