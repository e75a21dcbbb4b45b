"""``diffgym tune``: Optuna search over a trainer's own hyperparameters on one task."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffgym.commands.options import (add_budget_arguments, add_out_argument, add_override_arguments,
                                      add_runner_arguments, check_schedule_flags, make_runner, one_line, overrides)
from diffgym.threads import add_threads_argument

HELP = "Optuna search over a trainer's own hyperparameters on one task (TPE, median pruner)"
RESUMED_BY_RERUN = True
"""Running the same command again continues an interrupted one: the study continues from its journal."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffgym.experiments.tune import METRICS

    parser.add_argument("--env", required=True, help="task id, e.g. DiffGym/PointNav2D-v0")
    parser.add_argument("--algo", required=True, help="trainer plugin with a search space (ppo, apg)")
    parser.add_argument("--trials", type=int, required=True,
                        help="trials the study should hold (complete, pruned or failed)")
    add_budget_arguments(parser, required=True, eval_default="budget/10")
    add_override_arguments(parser, "every trial (under the searched settings)")
    parser.add_argument("--metric", choices=sorted(METRICS), default="success",
                        help="objective: mean eval success or mean eval return over the run")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every trial and the sampler's seed")
    parser.add_argument("--workers", type=int, default=None, help="parallel trials (default: CPU count)")
    add_threads_argument(parser, "each run")
    add_out_argument(parser, "runs/tune/<algo>__<task>")
    add_runner_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from diffgym.experiments.sweep import SweepFailed
    from diffgym.experiments.tune import tune
    from diffgym.plugins import load_trainer, resolve_config
    from diffgym.threads import resolve_threads
    from diffgym.training.spec import task_name

    out = Path(args.out or Path("runs") / "tune" / f"{args.algo}__{task_name(args.env)}")
    try:  # unknown task or trainer, bad setting, no search space: one line, before any trial
        resolve_threads(args.threads)
        check_schedule_flags(args, resolve_config(args.algo, args.env, overrides(args)))
        if not hasattr(load_trainer(args.algo), "suggest_hyperparams"):
            raise ValueError(f"trainer {args.algo!r} has no suggest_hyperparams(trial, env_id): nothing to tune")
    except (KeyError, TypeError, ValueError) as error:
        raise SystemExit(f"diffgym tune: {one_line(error)}")
    try:
        report = tune(args.env, args.algo, args.trials, args.env_steps, out, make_runner(args, "tune"), args.metric,
                      args.seed, args.eval_every, overrides=overrides(args))
    except (SweepFailed, ValueError) as error:  # ValueError: the trainer's search space drew a bad setting
        raise SystemExit(f"diffgym tune: {one_line(error)}")
    print(report.read_text())
    best = out / "best.yaml"
    if best.exists():
        print(best.read_text())
    print(f"report: {report}")
    return 0
