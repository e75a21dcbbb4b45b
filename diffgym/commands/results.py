"""``diffgym results``: train what a results manifest needs and rewrite its reports and tables."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffgym.commands.options import add_extend_argument, add_runner_arguments, make_runner, one_line

HELP = "regenerate the learning-curve tables and plots of a results manifest (docs/results/experiments.yml)"
RESUMED_BY_RERUN = True
"""Running the same command again continues an interrupted one: finished runs are reused, the others
continue from their checkpoints."""

DEFAULT_MANIFEST = Path("docs") / "results" / "experiments.yml"
DEFAULT_DOCUMENT = Path("docs") / "results.md"
SCHEDULE_KEYS = ("eval_schedule", "eval_first_env_steps", "eval_growth")
"""Overrides ``--list`` shows as the evaluation schedule rather than as settings."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffgym.threads import add_threads_argument

    parser.add_argument("names", nargs="*", metavar="EXPERIMENT",
                        help="experiments of the manifest to regenerate (default: every one)")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST,
                        help=f"the results manifest (default: {DEFAULT_MANIFEST})")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs") / "results",
                        help="where the run directories go, one folder per experiment (default: runs/results)")
    parser.add_argument("--document", type=Path, default=None,
                        help="Markdown file whose blocks between '<!-- results: NAME -->' and "
                             "'<!-- /results: NAME -->' (each on its own line) get the new tables (default: "
                             f"{DEFAULT_DOCUMENT} with the default manifest; none for another manifest)")
    parser.add_argument("--list", action="store_true", help="list the experiments and their runs, train nothing")
    parser.add_argument("--workers", type=int, default=None, help="parallel runs (default: CPU count)")
    add_threads_argument(parser, "each run")
    add_extend_argument(parser, out_flag="--runs-dir", budget="budget (env_steps), eval_every")
    add_runner_arguments(parser, out_flag="--runs-dir")


def describe(experiment) -> str:
    def schedule(group) -> str:
        every = f"every {group.eval_every:,}"
        if group.overrides.get("eval_schedule") != "geometric":
            return f"evaluated {every}"
        first, growth = group.overrides.get("eval_first_env_steps", 1000), group.overrides.get("eval_growth", 1.25)
        return f"evaluated from {first:,} env steps, each gap {growth}x the last, up to {every}"

    def settings(group) -> str:
        """The group's config overrides as ``--set`` takes them (the schedule's are shown above)."""
        shown = {key: value for key, value in group.overrides.items() if key not in SCHEDULE_KEYS}
        return "".join(f"; {key}={value if isinstance(value, str) else json.dumps(value, separators=(',', ':'))}"
                       for key, value in sorted(shown.items()))

    groups = "".join(f"\n  {g.label!r}: {g.algo}, {g.env_steps:,} env steps, seeds {','.join(map(str, g.seeds))}, "
                     f"{schedule(g)}{settings(g)}" for g in experiment.groups)
    return f"{experiment.name} ({experiment.env}) -> {experiment.report_dir}{groups}"


def run(args: argparse.Namespace) -> int:
    from diffgym.experiments.results import check_markers, check_runs, load_manifest, run_experiments, select
    from diffgym.experiments.sweep import SweepFailed
    from diffgym.threads import resolve_threads

    document = args.document
    if document is None and args.manifest.resolve() == DEFAULT_MANIFEST.resolve() and DEFAULT_DOCUMENT.exists():
        document = DEFAULT_DOCUMENT
    if args.manifest == DEFAULT_MANIFEST and not DEFAULT_MANIFEST.exists():  # the repository's, by a relative path
        raise SystemExit(f"diffgym results: no {DEFAULT_MANIFEST} here: the project's manifest is in the DiffGym "
                         "repository, so run this from its root, or pass --manifest FILE")
    try:  # a bad manifest or document, unknown task or trainer, a run dir made otherwise: one line, before any run
        resolve_threads(args.threads)
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {args.workers}")
        experiments = select(load_manifest(args.manifest), args.names)
        if document is not None and not args.list:
            check_markers(document, [e.name for e in experiments])
        for experiment in experiments:
            configs = experiment.configs(args.runs_dir)
            if not args.list:
                check_runs(experiment, configs, args.extend)
    except (KeyError, TypeError, ValueError) as error:
        raise SystemExit(f"diffgym results: {one_line(error)}")
    if args.list:
        print("\n".join(describe(e) for e in experiments))
        return 0
    try:
        reports = run_experiments(experiments, args.runs_dir, make_runner(args, "results"), document, args.extend)
    except (SweepFailed, ValueError) as error:  # a failed run; the document's markers gone during the run
        raise SystemExit(f"diffgym results: {one_line(error)}")
    for name, report in reports.items():
        print(f"{name}: {report}")
    return 0
