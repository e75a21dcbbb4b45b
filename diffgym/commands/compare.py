"""``diffgym compare``: algorithms head to head on one task under the evaluation protocol."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffgym.commands.options import add_sweep_arguments, check_schedule_flags, make_runner, one_line, overrides

HELP = "train algorithms on one task over seeds and report them under the evaluation protocol"
RESUMED_BY_RERUN = True
"""Running the same command again continues an interrupted one: finished runs are reused, the others
continue from their checkpoints."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", required=True, help="task id, e.g. DiffGym/PointMass1D-v0")
    parser.add_argument("--algos", required=True, help="comma-separated trainer names, e.g. apg,ppo")
    parser.add_argument("--baseline", default=None, help="algorithm in the ratios' numerator (default: the last)")
    parser.add_argument("--contender", default=None, help="algorithm in the ratios' denominator (default: the first)")
    add_sweep_arguments(parser, seeds_of="algorithm", scope="every run", out_default="runs/compare/<task>")
    parser.add_argument("--log-x", action="store_true",
                        help="plot the env-step and gradient-step axes on a log scale")


def run(args: argparse.Namespace) -> int:
    from diffgym.experiments.compare import compare, compare_configs, ratio_roles
    from diffgym.experiments.sweep import SweepFailed
    from diffgym.experiments.training_runs import reuse_plan
    from diffgym.threads import resolve_threads
    from diffgym.training.spec import task_name

    out = Path(args.out or Path("runs") / "compare" / task_name(args.env))
    algos = [a for a in args.algos.split(",") if a]
    try:  # unknown task or trainer, bad setting: one line, before any run starts
        resolve_threads(args.threads)
        ratio_roles(algos, args.baseline, args.contender)
        configs = compare_configs(args.env, algos, args.seeds, args.env_steps, out, args.eval_every, overrides(args))
        for config in configs:
            check_schedule_flags(args, config)
        reuse_plan(configs, args.extend)
    except (KeyError, TypeError, ValueError) as error:
        raise SystemExit(f"diffgym compare: {one_line(error)}")
    try:
        report = compare(args.env, algos, args.seeds, args.env_steps, out, make_runner(args, "compare"),
                         args.eval_every, args.threshold, args.baseline, args.contender, overrides(args),
                         extend=args.extend, log_x=args.log_x)
    except SweepFailed as error:
        raise SystemExit(f"diffgym compare: {error}")
    print(report.read_text().split("\n![")[0])
    print(f"\nreport: {report}\nplots:  {sorted(str(p) for p in report.parent.glob('*.png'))}")
    return 0
