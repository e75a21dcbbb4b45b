"""``diffgym ablate``: a grid over a trainer's ``algo_params`` on one task."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffgym.commands.options import add_sweep_arguments, check_schedule_flags, make_runner, one_line, overrides

HELP = "a grid over a trainer's algo_params on one task (default: the trainer's ablation_grid)"
RESUMED_BY_RERUN = True
"""Running the same command again continues an interrupted one: finished runs are reused, the others
continue from their checkpoints."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", required=True, help="task id, e.g. DiffGym/PointMass1D-v0")
    parser.add_argument("--algo", required=True, help="trainer plugin whose algo_params the grid sets")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="an algo_params key and its values (repeatable; 'full' = episode length), "
                             "e.g. --grid policy_gradient.estimator=analytic,hybrid --grid segment.length=32,adaptive "
                             "(default: the trainer's ablation_grid)")
    add_sweep_arguments(parser, seeds_of="cell", scope="every run (under the grid)", out_default="runs/ablate/<task>")
    parser.epilog = "The trainer's own flags (`diffgym trainers -v`) are grid axes too: --FLAG V1,V2."
    parser.set_defaults(plugin_flags="list")


def run(args: argparse.Namespace) -> int:
    from diffgym.experiments.ablate import ablate, grid_configs, parse_grid
    from diffgym.experiments.sweep import SweepFailed
    from diffgym.experiments.training_runs import reuse_plan
    from diffgym.plugins import check_task, load_trainer
    from diffgym.threads import resolve_threads
    from diffgym.training.spec import task_name

    pairs = list(args.grid) + [f"{key}={values}" for key, values in getattr(args, "plugin_params", {}).items()]
    if not pairs:
        try:
            default = dict(getattr(load_trainer(args.algo), "ablation_grid", {}) or {})
        except (KeyError, TypeError) as error:
            raise SystemExit(f"diffgym ablate: {one_line(error)}")
        if not default:
            raise SystemExit(f"diffgym ablate: trainer {args.algo!r} has no ablation_grid; give --grid KEY=V1,V2")
        pairs = [f"{key}={values}" for key, values in default.items()]
    out = Path(args.out or Path("runs") / "ablate" / task_name(args.env))
    try:  # unknown task, trainer or setting: one line, before any run starts
        resolve_threads(args.threads)
        check_task(args.env)
        grid = parse_grid(pairs, args.env)
        configs = grid_configs(args.env, grid, args.seeds, args.env_steps, out, args.algo, args.eval_every,
                               overrides(args))
        for config in configs:
            check_schedule_flags(args, config)
        reuse_plan(configs, args.extend)
    except (KeyError, TypeError, ValueError) as error:
        raise SystemExit(f"diffgym ablate: {one_line(error)}")
    try:
        report = ablate(args.env, grid, args.seeds, args.env_steps, out, args.algo, make_runner(args, "ablate"),
                        args.threshold, args.eval_every, overrides(args), extend=args.extend)
    except SweepFailed as error:
        raise SystemExit(f"diffgym ablate: {error}")
    print(report.read_text().split("\n![")[0])
    print(f"\nreport: {report}")
    return 0
