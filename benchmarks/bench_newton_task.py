"""Engine benchmark of a Newton task: forward and forward+backward time per control step at N envs.

    python benchmarks/bench_newton_task.py [--env DiffGym/FrankaTorqueReach-v0] [--sizes 1,64,4096]

Per batch size N (one Newton model of N articulations): the time of one `differentiable_step` of all N envs
without autograd (a cached solver, replayed as a Warp graph), with autograd recording (the step's taped
substeps, recorded once per N and replayed as a graph: diffgym/core/newton_task.py), and recording plus
`backward` of the step's summed reward and observation. Median of --repeats after one warm-up step (which
also builds the model of that size and records and captures the step, reported as "first step"). Prints a
Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import gymnasium as gym
import torch

import diffgym  # noqa: F401  (registers the tasks)


def measure(env_id: str, batch: int, repeats: int) -> dict[str, float]:
    venv = gym.make_vec(env_id, num_envs=batch)
    venv.reset(seed=0)
    state = venv.get_state()
    action = torch.full((batch, venv.single_action_space.shape[0]), 0.1)
    start = time.perf_counter()
    with torch.no_grad():
        venv.differentiable_step(state, action)  # builds the model for this N
    build = time.perf_counter() - start

    def forward():
        with torch.no_grad():
            venv.differentiable_step(state, action)

    def recording():
        venv.differentiable_step(state, action.clone().requires_grad_(True))

    def forward_backward():
        out = venv.differentiable_step(state, action.clone().requires_grad_(True))
        (out.reward.sum() + out.obs.sum()).backward()

    result = {"first step (ms)": 1e3 * build}
    for name, fn in (("forward, no grad (ms)", forward), ("forward, recording (ms)", recording),
                     ("forward+backward (ms)", forward_backward)):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        result[name] = 1e3 * statistics.median(times)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="DiffGym/FrankaTorqueReach-v0")
    parser.add_argument("--sizes", default="1,64,4096")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per size (1 at N >= 1024)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{args.env}, cpu, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print("\n| N | first step (ms) | forward, no grad (ms) | forward, recording (ms) | forward+backward (ms) "
          "| env-steps/s forward | env-steps/s fwd+bwd |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch in (int(n) for n in args.sizes.split(",")):
        r = measure(args.env, batch, 1 if batch >= 1024 else args.repeats)
        print(f"| {batch} | {r['first step (ms)']:,.0f} | {r['forward, no grad (ms)']:,.1f} | "
              f"{r['forward, recording (ms)']:,.1f} | {r['forward+backward (ms)']:,.1f} | "
              f"{1e3 * batch / r['forward, no grad (ms)']:,.0f} | {1e3 * batch / r['forward+backward (ms)']:,.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
