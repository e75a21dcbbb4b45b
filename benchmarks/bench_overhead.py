"""Per-call overhead of the bridge and the single-env step, against Warp's launch floor, in one run.

    python benchmarks/bench_overhead.py                       # this tree only
    python benchmarks/bench_overhead.py --baseline /tmp/base  # and a second source tree, interleaved
    python benchmarks/bench_overhead.py --quick               # a smoke run (one task, few calls)

At N = 1 the kernels do almost no work, so every figure is per-call overhead. Per task it times:

* ``floor``: a recorded ``wp.Launch`` of the step kernel plus a recorded launch of its adjoint (what one
  differentiable step must launch at the very least; Warp's own replay path, no torch);
* ``fwd``: ``differentiable_step`` under ``torch.no_grad()``;
* ``fwd+bwd``: ``differentiable_step`` on an action that requires grad, then ``reward.sum().backward()``;
* ``env.step`` (fast path) and ``env.step`` (reference path, ``use_fast_path = False``): the single env,
  resetting at the end of each episode.

Variants are interleaved (each repeat times a block of calls of every variant in turn) and the median
per-call time over the repeats is reported, with ratios to the floor. With ``--baseline DIR`` the same
measurement runs in child processes, alternating between DIR's ``diffgym`` and this tree's, and the
before/after table reports the median over those rounds; it also times ``import diffgym`` and
``diffgym --help`` in fresh processes, alternating likewise. Run it with one thread
(``OMP_NUM_THREADS=1``); speed is never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent.parent
TASKS = ("DiffGym/PointMass1D-v0", "DiffGym/PointNav2D-v0", "DiffGym/TPush-v0", "DiffGym/FrankaReach-v0")
VARIANTS = ("floor", "fwd", "fwd+bwd", "env.step fast", "env.step reference")


def _variants(env_id: str) -> dict[str, Callable[[], None]]:
    """One closure per variant; each call does one step's worth of work."""
    import gymnasium as gym
    import numpy as np
    import torch
    import warp as wp

    import diffgym  # noqa: F401  (registers the tasks)

    venv = gym.make_vec(env_id, num_envs=1)
    venv.reset(seed=0)
    sim = venv.unwrapped.sim if hasattr(venv, "unwrapped") else venv.sim
    state = venv.get_state()
    action = torch.full((1, sim.act_dim), 0.3)
    leaf = action.clone().requires_grad_(True)

    # The floor: the step kernel and its adjoint as recorded launches on preallocated arrays. The kernel
    # reads the task's physical parameters as per-env arrays after the action (docs/adding_a_task.md),
    # then the params struct; outputs are the next state, observation, reward, terminated and success.
    kernel = sim.step_kernel
    arg_types = [a.type for a in kernel.adj.args]
    outs = [torch.zeros_like(t) for t in state.tensors()]
    outs += [torch.zeros(1, sim.obs_dim), torch.zeros(1), torch.zeros(1, dtype=torch.int32),
             torch.zeros(1, dtype=torch.int32)]
    ins = [*state.tensors(), action, *sim.default_physics(1).values()]
    n_in = len(ins)

    def warp(ts, first):
        return [wp.from_torch(t, dtype=arg_types[first + i].dtype) for i, t in enumerate(ts)]

    def grads(ts, first):
        return [wp.from_torch(torch.zeros_like(t), dtype=arg_types[first + i].dtype) if t.is_floating_point()
                else None for i, t in enumerate(ts)]

    fwd_launch = wp.launch(kernel, dim=1, inputs=warp(ins, 0) + [sim.params], outputs=warp(outs, n_in + 1),
                           device="cpu", record_cmd=True)
    adj_launch = wp.launch(kernel, dim=1, inputs=warp(ins, 0) + [sim.params], outputs=warp(outs, n_in + 1),
                           adj_inputs=grads(ins, 0) + [type(sim.params)()], adj_outputs=grads(outs, n_in + 1),
                           device="cpu", adjoint=True, record_cmd=True)

    def floor():
        fwd_launch.launch()
        adj_launch.launch()

    def fwd():
        with torch.no_grad():
            venv.differentiable_step(state, action)

    def fwd_bwd():
        venv.differentiable_step(state, leaf).reward.sum().backward()

    def env_stepper(fast: bool) -> Callable[[], None]:
        env = gym.make(env_id)
        base = env.unwrapped
        if hasattr(base, "use_fast_path"):
            base.use_fast_path = fast
        elif fast:
            return lambda: None  # a tree without the fast path: reported as missing
        env.reset(seed=0)
        actions = np.random.default_rng(0).uniform(-1, 1, (4096, sim.act_dim)).astype(np.float32)
        index = [0]

        def run():
            _, _, terminated, truncated, _ = env.step(actions[index[0] % 4096])
            index[0] += 1
            if terminated or truncated:
                env.reset()
        return run

    fast_ok = hasattr(gym.make(env_id).unwrapped, "use_fast_path")
    variants = {"floor": floor, "fwd": fwd, "fwd+bwd": fwd_bwd, "env.step reference": env_stepper(False)}
    if fast_ok:
        variants["env.step fast"] = env_stepper(True)
    return variants


def measure(env_ids: list[str], repeats: int, block: int) -> dict[str, dict[str, float]]:
    """Median per-call seconds of every variant, per task, interleaved."""
    import torch

    torch.manual_seed(0)
    results = {}
    for env_id in env_ids:
        variants = _variants(env_id)
        for fn in variants.values():  # warm-up: kernel compilation, plans, allocator
            for _ in range(block):
                fn()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                for _ in range(block):
                    fn()
                times[name].append((time.perf_counter() - start) / block)
        results[env_id] = {name: statistics.median(ts) for name, ts in times.items()}
    return results


def _child(tree: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--child", "--envs", ",".join(args.envs), "--repeats", str(args.repeats),
               "--block", str(args.block)]
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _startup(tree: Path, code: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    # cwd=tree: ``python -c`` puts the working directory ahead of PYTHONPATH on sys.path
    subprocess.run([sys.executable, "-c", code], env=env, cwd=tree, check=True, capture_output=True)
    return time.perf_counter() - start


def _us(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e6:,.1f}"


def print_table(results: dict[str, dict[str, float]]) -> None:
    print("| task | floor: recorded fwd+adj launch (us) | `differentiable_step` fwd (us) | fwd+bwd (us) | "
          "fwd+bwd / floor | `env.step` fast (us) | `env.step` reference (us) | reference / fast |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for env_id, r in results.items():
        fast, ref = r.get("env.step fast"), r.get("env.step reference")
        speedup = f"{ref / fast:.1f}x" if fast and ref else "n/a"
        print(f"| {env_id} | {_us(r['floor'])} | {_us(r['fwd'])} | {_us(r['fwd+bwd'])} | "
              f"{r['fwd+bwd'] / r['floor']:.1f} | {_us(fast)} | {_us(ref)} | {speedup} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", default=None, help="comma-separated tasks (default: four; --quick: PointMass1D)")
    parser.add_argument("--repeats", type=int, default=None, help="timed blocks per variant (default 15; --quick: 2)")
    parser.add_argument("--block", type=int, default=None, help="calls per timed block (default 200; --quick: 5)")
    parser.add_argument("--baseline", type=Path, help="a second source tree to compare against (before/after)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating child runs per tree (with --baseline; default 3, --quick: 1)")
    parser.add_argument("--startup-runs", type=int, default=None,
                        help="fresh processes per tree and start-up command (default 7; --quick: 1)")
    parser.add_argument("--startup-only", action="store_true", help="with --baseline: only the start-up table")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of every table (`make bench-overhead` in the tests)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.envs = [e for e in (args.envs or (TASKS[0] if quick else ",".join(TASKS))).split(",") if e]
    args.repeats = args.repeats or (2 if quick else 15)
    args.block = args.block or (5 if quick else 200)
    args.rounds = args.rounds or (1 if quick else 3)
    args.startup_runs = args.startup_runs or (1 if quick else 7)

    if args.child:
        print(json.dumps(measure(args.envs, args.repeats, args.block)))
        return

    import torch

    print(f"torch threads {torch.get_num_threads()}; {os.cpu_count()} logical CPUs visible; "
          f"repeats {args.repeats} x {args.block} calls\n")
    if args.baseline is None:
        print_table(measure(args.envs, args.repeats, args.block))
        return

    trees = {"before": args.baseline.resolve(), "after": HERE}
    if not args.startup_only:
        compare_steps(trees, args)
    compare_startup(trees, args.startup_runs)


def compare_steps(trees: dict[str, Path], args: argparse.Namespace) -> None:
    rounds: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.rounds):  # alternate the trees so load on a shared machine hits both alike
        for name, tree in trees.items():
            rounds[name].append(_child(tree, args))
    merged = {name: {env_id: {v: statistics.median(r[env_id][v] for r in runs if v in r[env_id])
                              for v in runs[0][env_id]} for env_id in args.envs}
              for name, runs in rounds.items()}
    for name in trees:
        print(f"### {name} ({trees[name]})\n")
        print_table(merged[name])
        print()
    print("### after vs before (per-call time ratio before / after)\n")
    print("| task | `differentiable_step` fwd | fwd+bwd | single-env `env.step` (before: its only path; after: fast) |")
    print("|---|---:|---:|---:|")
    for env_id in args.envs:
        b, a = merged["before"][env_id], merged["after"][env_id]
        step_after = a.get("env.step fast", a["env.step reference"])
        print(f"| {env_id} | {b['fwd'] / a['fwd']:.1f}x | {b['fwd+bwd'] / a['fwd+bwd']:.1f}x | "
              f"{b['env.step reference'] / step_after:.1f}x |")



def compare_startup(trees: dict[str, Path], runs: int) -> None:
    commands = {"import diffgym": "import diffgym",
                "diffgym --help": "import sys; sys.argv = ['diffgym', '--help']\n"
                                  "from diffgym.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass"}
    startup: dict[str, dict[str, list[float]]] = {c: {name: [] for name in trees} for c in commands}
    for _ in range(runs):
        for label, code in commands.items():
            for name, tree in trees.items():
                startup[label][name].append(_startup(tree, code))
    print("\n### Start-up, fresh process (median wall-clock s)\n")
    print("| command | before | after | before / after |")
    print("|---|---:|---:|---:|")
    for label in commands:
        b, a = (statistics.median(startup[label][name]) for name in trees)
        print(f"| `{label}` | {b:.2f} | {a:.2f} | {b / a:.1f}x |")


if __name__ == "__main__":
    main()
