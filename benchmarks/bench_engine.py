"""Engine benchmark: step throughput and the cost of gradients, for every task, in one run.

    python benchmarks/bench_engine.py [--envs DiffGym/PointMass1D-v0,...] [--device cpu] [--sizes 1,64,4096] [--quick]

Prints Markdown tables (paste them into docs/benchmarks.md with the machine):
  1. per task, 64 envs x 32 steps: forward without autograd, forward with autograd recording,
     forward+backward, and the ratio (forward+backward) / (forward without autograd);
  2. per task and batch size N: env-steps/s for the Gymnasium vector `step` (NumPy in/out),
     `differentiable_step` forward, and forward+backward through a 32-step rollout;
  3. per task, the single-env `gym.make(...).step` rate.
Times are the median of --repeats runs after three warm-up runs (the first compiles the kernels).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import gymnasium as gym
import numpy as np
import torch
import warp as wp

import diffgym


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    for _ in range(3):  # warm-up: kernel compilation, allocator, caches and CPU clocks
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rollout_fns(env_id: str, num_envs: int, steps: int, device: str):
    venv = gym.make_vec(env_id, num_envs=num_envs, device=device)
    venv.reset(seed=0)
    start = venv.get_state()
    act_dim = venv.single_action_space.shape[0]
    actions = (torch.rand(steps, num_envs, act_dim, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    np_actions = actions.cpu().numpy()

    def forward_no_grad():
        with torch.no_grad():
            state = start
            for a in actions:
                state = venv.differentiable_step(state, a).state

    def forward_recording():
        leaf = actions.clone().requires_grad_(True)
        state, total = start, 0
        for a in leaf:
            out = venv.differentiable_step(state, a)
            state, total = out.state, total + out.reward.sum()
        return leaf, total

    def forward_backward():
        leaf, total = forward_recording()
        total.backward()

    def gym_step():
        for a in np_actions:
            venv.step(a)

    return forward_no_grad, forward_recording, forward_backward, gym_step


def single_env_rate(env_id: str, device: str, steps: int, repeats: int) -> float:
    env = gym.make(env_id, device=device)
    env.reset(seed=0)
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, *env.action_space.shape)).astype(np.float32)

    def run():
        for a in actions:
            _, _, terminated, truncated, _ = env.step(a)
            if terminated or truncated:
                env.reset()

    return steps / timed(run, device, repeats)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Newton tasks cost ~500x a kernel task per step: benchmarks/bench_newton_task.py measures them
    parser.add_argument("--envs", default=None,
                        help="comma-separated tasks (default: every kernel task; --quick: PointMass1D)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default=None, help="batch sizes N (default 1,64,4096; --quick: 64)")
    parser.add_argument("--steps", type=int, default=None, help="steps per rollout (default 32; --quick: 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 5; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every table (`make bench` in the tests)")
    args = parser.parse_args(argv)
    quick = args.quick
    all_kernel_tasks = ",".join(e for e in diffgym.TASK_IDS if e not in diffgym.NEWTON_TASK_IDS)
    args.envs = args.envs or ("DiffGym/PointMass1D-v0" if quick else all_kernel_tasks)
    args.steps = args.steps or (8 if quick else 32)
    args.repeats = args.repeats or (1 if quick else 5)
    torch.manual_seed(0)
    env_ids = [e for e in args.envs.split(",") if e]
    sizes = [int(n) for n in (args.sizes or ("64" if quick else "1,64,4096")).split(",")]

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; torch threads {torch.get_num_threads()}; "
          f"device {args.device}; warp {wp.config.version}, torch {torch.__version__}\n")

    print(f"### Cost of gradients: 64 envs x {args.steps} steps ({args.device})\n")
    print("| task | forward, no grad (ms) | forward, recording (ms) | forward+backward (ms) | ratio fwd+bwd / fwd |")
    print("|---|---:|---:|---:|---:|")
    for env_id in env_ids:
        no_grad, recording, fwd_bwd, _ = rollout_fns(env_id, 64, args.steps, args.device)
        t0, t1, t2 = (timed(f, args.device, args.repeats) for f in (no_grad, recording, fwd_bwd))
        print(f"| {env_id} | {t0 * 1e3:.2f} | {t1 * 1e3:.2f} | {t2 * 1e3:.2f} | {t2 / t0:.2f} |")

    print(f"\n### Batched throughput, env-steps/s ({args.device}, {args.steps}-step rollouts)\n")
    print("| task | N | vector env `step` (NumPy) | `differentiable_step` forward | forward+backward |")
    print("|---|---:|---:|---:|---:|")
    for env_id in env_ids:
        for n in sizes:
            no_grad, _, fwd_bwd, gym_step = rollout_fns(env_id, n, args.steps, args.device)
            work = n * args.steps
            rates = [work / timed(f, args.device, args.repeats) for f in (gym_step, no_grad, fwd_bwd)]
            print(f"| {env_id} | {n} | " + " | ".join(f"{r:,.0f}" for r in rates) + " |")

    print(f"\n### Single env `gym.make(...).step` ({args.device})\n")
    print("| task | steps/s |")
    print("|---|---:|")
    for env_id in env_ids:
        print(f"| {env_id} | {single_env_rate(env_id, args.device, 1000, args.repeats):,.0f} |")


if __name__ == "__main__":
    main()
