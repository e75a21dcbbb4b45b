"""``diffgym compare``: algorithms head to head on one task under the evaluation protocol."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffgym.commands.options import (add_budget_arguments, add_extend_argument, add_out_argument,
                                      add_override_arguments, add_runner_arguments, check_schedule_flags,
                                      make_runner, one_line, overrides)
from diffgym.threads import add_threads_argument

HELP = "train algorithms on one task over seeds and report them under the evaluation protocol"
RESUMED_BY_RERUN = True
"""Running the same command again continues an interrupted one: finished runs are reused, the others
continue from their checkpoints."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffgym.experiments.report import SUCCESS_THRESHOLD

    parser.add_argument("--env", required=True, help="task id, e.g. DiffGym/PointMass1D-v0")
    parser.add_argument("--algos", required=True, help="comma-separated trainer names, e.g. apg,ppo")
    parser.add_argument("--baseline", default=None, help="algorithm in the ratios' numerator (default: the last)")
    parser.add_argument("--contender", default=None, help="algorithm in the ratios' denominator (default: the first)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per algorithm (0..S-1)")
    add_budget_arguments(parser, required=True, eval_default="budget/20")
    add_override_arguments(parser, "every run")
    parser.add_argument("--workers", type=int, default=None, help="parallel runs (default: CPU count)")
    add_threads_argument(parser, "each run")
    parser.add_argument("--threshold", type=float, default=SUCCESS_THRESHOLD, help="success rate that counts as solved")
    add_out_argument(parser, "runs/compare/<task>")
    add_extend_argument(parser)
    parser.add_argument("--log-x", action="store_true",
                        help="plot the env-step and gradient-step axes on a log scale")
    add_runner_arguments(parser)


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
