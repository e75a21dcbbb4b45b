"""``diffgym results``: train what a results manifest needs and rewrite its reports and tables."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffgym.commands.options import add_extend_argument, add_runner_arguments, make_runner, one_line

HELP = "regenerate the learning-curve tables and plots of a results manifest (docs/results/experiments.yml)"
RESUMED_BY_RERUN = True
"""Running the same command again continues an interrupted one: finished runs are reused, the others
continue from their checkpoints."""

DEFAULT_MANIFEST = Path("docs") / "results" / "experiments.yml"
DEFAULT_DOCUMENT = Path("docs") / "results.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffgym.threads import add_threads_argument

    parser.add_argument("names", nargs="*", metavar="EXPERIMENT",
                        help="experiments of the manifest to regenerate (default: every one)")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST,
                        help=f"the results manifest (default: {DEFAULT_MANIFEST})")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs") / "results",
                        help="where the run directories go, one folder per experiment (default: runs/results)")
    parser.add_argument("--document", type=Path, default=None,
                        help="Markdown file whose '<!-- results: NAME -->' blocks get the new tables (default: "
                             f"{DEFAULT_DOCUMENT} beside the default manifest; none for another manifest)")
    parser.add_argument("--list", action="store_true", help="list the experiments and their runs, train nothing")
    parser.add_argument("--workers", type=int, default=None, help="parallel runs (default: CPU count)")
    add_threads_argument(parser, "each run")
    add_extend_argument(parser)
    add_runner_arguments(parser)


def describe(experiment) -> str:
    groups = "".join(f"\n  {g.label!r}: {g.algo}, {g.env_steps:,} env steps, seeds {','.join(map(str, g.seeds))}, "
                     f"evaluated every {g.eval_every:,}" for g in experiment.groups)
    return f"{experiment.name} ({experiment.env}) -> {experiment.report_dir}{groups}"


def run(args: argparse.Namespace) -> int:
    from diffgym.experiments.results import check_runs, load_manifest, run_experiments, select
    from diffgym.experiments.sweep import SweepFailed
    from diffgym.threads import resolve_threads

    document = args.document
    if document is None and args.manifest == DEFAULT_MANIFEST and DEFAULT_DOCUMENT.exists():
        document = DEFAULT_DOCUMENT
    try:  # a bad manifest, unknown task or trainer, a run dir made otherwise: one line, before any run starts
        resolve_threads(args.threads)
        experiments = select(load_manifest(args.manifest), args.names)
        if document is not None and not Path(document).is_file():
            raise ValueError(f"--document {document}: no such file")
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
    except SweepFailed as error:
        raise SystemExit(f"diffgym results: {error}")
    for name, report in reports.items():
        print(f"{name}: {report}")
    if document is not None:
        print(f"tables rewritten in {document}")
    return 0
