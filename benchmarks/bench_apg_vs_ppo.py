"""Training wall-clock per env step: APG against PPO (SB3), each at its tuned per-task setting, in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_apg_vs_ppo.py                        # this tree only
    OMP_NUM_THREADS=1 python benchmarks/bench_apg_vs_ppo.py --baseline /tmp/base   # and a second tree
    OMP_NUM_THREADS=1 python benchmarks/bench_apg_vs_ppo.py --apg-param reuse.epochs=4  # APG with --param
    OMP_NUM_THREADS=1 python benchmarks/bench_apg_vs_ppo.py --apg-set num_envs=8        # APG with --set
    python benchmarks/bench_apg_vs_ppo.py --quick                                  # a smoke run

Every run is ``diffgym train --algo A --env T`` with the trainer's own defaults for the task
(``hyperparams/apg.yml``, ``hyperparams/ppo.yml``), and APG with any ``--apg-param`` and ``--apg-set``
settings (what ``diffgym train --param`` and ``--set`` set), except the budget (``--env-steps``, the same for
both trainers) and the evaluation schedule: one evaluation at env step 0 and one at the budget, each of one
episode. A run is a child process (one torch thread); it times from the moment the evaluation at env step 0
has been logged (so imports, env and model construction and that evaluation are left out) to the end of
``train`` (the last evaluation, of one episode, stays in: well under 1 % of a run). Runs alternate: every
repeat runs each task's APG and PPO (and, with ``--baseline``, each tree) in turn, so load from other
processes falls on all of them alike; a figure is the median over the repeats, and the APG/PPO ratio is
taken within each repeat before the median. Speed is never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
TASKS = ("DiffGym/PointMass1D-v0", "DiffGym/PointNav2D-v0", "DiffGym/FrankaReach-v0")
ALGOS = ("apg", "ppo")


def _child(algo: str, env_id: str, env_steps: int, overrides: dict[str, Any] | None = None) -> dict[str, float]:
    """Train once in this process; seconds from the logged evaluation at env step 0 to the end of train.
    ``overrides``: config settings by dotted key, as ``diffgym train --set`` takes them."""
    import torch

    import diffgym  # noqa: F401  (registers the tasks)
    from diffgym.plugins import load_trainer, resolve_config
    from diffgym.training.run import log_hook

    torch.set_num_threads(1)
    started: list[tuple[float, float]] = []  # (wall, CPU) when the evaluation at env step 0 was logged

    def mark(steps: int, scalars: dict[str, float]) -> None:
        if not started and "eval_return" in scalars:
            started.append((time.perf_counter(), time.process_time()))

    with tempfile.TemporaryDirectory() as run_dir:
        config = resolve_config(algo, env_id, {"total_env_steps": env_steps, "eval_every_env_steps": env_steps,
                                               "eval_episodes": 1, "run_dir": str(Path(run_dir) / "run"),
                                               **(overrides or {})})
        train = load_trainer(algo).train
        with log_hook(mark):
            train(config, progress=False)
        wall, cpu = time.perf_counter() - started[0][0], time.process_time() - started[0][1]
    return {"wall": wall, "cpu": cpu, "env_steps": env_steps, "num_envs": config.num_envs}


def _run_child(tree: Path, algo: str, env_id: str, env_steps: int, overrides: dict[str, Any]) -> dict[str, float]:
    paths = [tree, tree / "trainers" / "apg", tree / "trainers" / "ppo"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths), "OMP_NUM_THREADS": "1"}
    # cwd=tree: ``python -c`` puts the working directory ahead of PYTHONPATH on sys.path
    code = (f"import json, sys; sys.path.insert(0, {str(HERE / 'benchmarks')!r}); import bench_apg_vs_ppo as b; "
            f"print(json.dumps(b._child({algo!r}, {env_id!r}, {env_steps}, {overrides!r})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_apg_vs_ppo: {algo} on {env_id} in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


FIXED_BY_THE_BENCHMARK = ("total_env_steps", "eval_every_env_steps", "eval_schedule", "eval_first_env_steps",
                          "eval_growth", "eval_episodes", "run_dir")
"""What every run of the benchmark shares (the budget and the evaluation at its two ends): not settable."""


def apg_overrides(params: list[str], settings: list[str]) -> dict[str, Any]:
    """The dotted config overrides of ``--apg-param KEY=VALUE`` (under ``algo_params``) and ``--apg-set
    KEY=VALUE`` (any field but :data:`FIXED_BY_THE_BENCHMARK`), values read as ``diffgym train`` reads them."""
    from diffgym.commands.options import parse_value

    result: dict[str, Any] = {}
    for flag, prefix, given in (("--apg-param", "algo_params.", params), ("--apg-set", "", settings)):
        for setting in given:
            key, sep, value = setting.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"{flag} takes KEY=VALUE, got {setting!r}")
            if prefix + key in FIXED_BY_THE_BENCHMARK:
                raise ValueError(f"{flag} {key}: the benchmark sets it for every run (--env-steps sets the budget)")
            result[prefix + key] = parse_value(value)
    return result


def _check_apg_settings(parser: argparse.ArgumentParser, tasks: list[str], overrides: dict[str, Any]) -> None:
    """Resolve every task's APG config here, so that a bad setting is one line before any run starts."""
    import diffgym  # noqa: F401  (registers the tasks)
    from diffgym.plugins import load_trainer, resolve_config

    for env_id in tasks:
        try:
            load_trainer("apg").check_config(resolve_config("apg", env_id, overrides))
        except (ValueError, KeyError, TypeError) as error:
            message = str(error.args[0]) if error.args else repr(error)
            parser.error(f"APG's settings on {env_id}: {message.splitlines()[0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-steps", type=int, default=16384, help="budget of every run (default 16384)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task ids")
    parser.add_argument("--baseline", type=Path, help="a second source tree (before), run alternately with this one")
    parser.add_argument("--quick", action="store_true", help="smoke run: PointMass1D, 1024 env steps, one round")
    parser.add_argument("--apg-param", action="append", default=[], metavar="KEY=VALUE",
                        help="an algo_params setting of every APG run, as `diffgym train --param` takes it "
                             "(e.g. reuse.epochs=4); repeatable")
    parser.add_argument("--apg-set", action="append", default=[], metavar="KEY=VALUE",
                        help="any config setting of every APG run, as `diffgym train --set` takes it "
                             "(e.g. num_envs=8); repeatable")
    args = parser.parse_args(argv)
    try:
        overrides = apg_overrides(args.apg_param, args.apg_set)
    except ValueError as error:
        parser.error(str(error))
    tasks = args.tasks.split(",")
    if args.quick:
        tasks, args.env_steps, args.repeats = [TASKS[0]], 1024, 1
    if args.env_steps < 1 or args.repeats < 1:
        parser.error(f"--env-steps and --repeats must be >= 1, got {args.env_steps} and {args.repeats}")
    _check_apg_settings(parser, tasks, overrides)
    trees = {"after": HERE} if args.baseline is None else {"before": args.baseline.resolve(), "after": HERE}
    clocks = ("wall", "cpu")
    per_1k: dict[tuple[str, str, str, str], list[float]] = {}  # (task, tree, algo, clock) -> s per 1,000 env steps
    ratios: dict[tuple[str, str, str], list[float]] = {}  # (task, tree, clock) -> APG / PPO within a round
    num_envs: dict[tuple[str, str, str], int] = {}  # (task, tree, algo): the trees' settings may differ
    for repeat in range(args.repeats):
        for env_id in tasks:
            for label, tree in trees.items():
                taken: dict[tuple[str, str], float] = {}
                for algo in ALGOS:
                    result = _run_child(tree, algo, env_id, args.env_steps, overrides if algo == "apg" else {})
                    num_envs[(env_id, label, algo)] = int(result["num_envs"])
                    for clock in clocks:
                        taken[(algo, clock)] = result[clock] * 1000 / result["env_steps"]
                        per_1k.setdefault((env_id, label, algo, clock), []).append(taken[(algo, clock)])
                for clock in clocks:
                    ratios.setdefault((env_id, label, clock), []).append(taken[("apg", clock)] / taken[("ppo", clock)])
                print(f"round {repeat + 1}: {env_id} {label}: apg {taken[('apg', 'wall')]:.3f} s, "
                      f"ppo {taken[('ppo', 'wall')]:.3f} s per 1,000 env steps (wall)", file=sys.stderr, flush=True)

    def median(*key: str) -> float:
        return statistics.median(per_1k[key])

    print(f"\n{args.env_steps} env steps per run, medians of {args.repeats} interleaved rounds; "
          f"seconds per 1,000 env steps, wall-clock (CPU time of the process in brackets)"
          f"{'; APG with ' + ' '.join(args.apg_param + args.apg_set) if overrides else ''}\n")
    print("| task | tree | APG envs | APG s / 1k steps | PPO envs | PPO s / 1k steps | APG / PPO |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for env_id in tasks:
        for label in trees:
            cells = [f"{median(env_id, label, algo, 'wall'):.3f} ({median(env_id, label, algo, 'cpu'):.3f})"
                     for algo in ALGOS]
            ratio = " ".join(f"{statistics.median(ratios[(env_id, label, clock)]):.2f}x" for clock in clocks)
            print(f"| {env_id} | {label} | {num_envs[(env_id, label, 'apg')]} | {cells[0]} | "
                  f"{num_envs[(env_id, label, 'ppo')]} | "
                  f"{cells[1]} | {ratio.replace(' ', ' (')}) |")
    if args.baseline is not None:
        print("\n| task | APG before / after, s / 1k steps, wall (CPU) | speed-up, wall (CPU) |")
        print("|---|---:|---:|")
        for env_id in tasks:
            before = [median(env_id, "before", "apg", clock) for clock in clocks]
            after = [median(env_id, "after", "apg", clock) for clock in clocks]
            print(f"| {env_id} | {before[0]:.3f} / {after[0]:.3f} ({before[1]:.3f} / {after[1]:.3f}) | "
                  f"{before[0] / after[0]:.2f}x ({before[1] / after[1]:.2f}x) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
