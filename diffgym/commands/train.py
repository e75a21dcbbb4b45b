"""``diffgym train``: one run of a trainer plugin on one task."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from diffgym.commands.options import (add_budget_arguments, add_override_arguments, check_schedule_flags, one_line,
                                      overrides, seed_number, yaml_problem)
from diffgym.threads import add_threads_argument

if TYPE_CHECKING:
    from diffgym.training.run import Run

HELP = "train a policy with a trainer plugin"

_TOP_LEVEL = {  # CLI flag -> TrainConfig field
    "seed": "seed", "num_envs": "num_envs", "env_steps": "total_env_steps",
    "eval_every": "eval_every_env_steps", "eval_episodes": "eval_episodes",
    "device": "device", "run_dir": "run_dir",
}
_PER_TASK = "the trainer's value for the task; --print-config shows it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--algo", help="trainer plugin name (see `diffgym trainers`); required unless --config "
                                       "names it")
    parser.add_argument("--env", help="task id, e.g. DiffGym/PointMass1D-v0; required unless --config names it")
    parser.add_argument("--seed", type=seed_number, help=f"training seed (default: {_PER_TASK})")
    parser.add_argument("--num-envs", type=int, metavar="N", help=f"parallel envs (default: {_PER_TASK})")
    add_budget_arguments(parser, required=False, eval_default=_PER_TASK, budget_default=_PER_TASK)
    parser.add_argument("--eval-episodes", type=int, metavar="N",
                        help=f"episodes per evaluation (default: {_PER_TASK})")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--run-dir", help="output directory (default: runs/<algo>__<task>__s<seed>__<time>); an "
                                          "existing one is continued from its latest checkpoint")
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="a config.yaml (e.g. from an earlier run) to start from, algorithm and task included; "
                             "the flags change it; the run goes to a new run directory unless --run-dir is given "
                             "(default: the trainer's defaults for the task)")
    add_override_arguments(parser, "the run")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar: one line per evaluation instead")
    add_threads_argument(parser, "training")
    parser.epilog = ("A trainer adds its own flags (e.g. `--segment-length K` for apg), each the same as "
                     "--param; `diffgym trainers -v` lists them, and --help with --algo lists the chosen "
                     "trainer's. Ctrl-C stops a run where it can be resumed: the command to resume it is printed.")
    parser.set_defaults(plugin_flags="single")


def run(args: argparse.Namespace) -> int:
    import yaml

    import diffgym  # noqa: F401  (registers the tasks)
    from diffgym.plugins import load_trainer, resolve_config
    from diffgym.threads import configure_torch_threads
    from diffgym.training import TrainConfig

    changes = {field: getattr(args, flag) for flag, field in _TOP_LEVEL.items() if getattr(args, flag) is not None}
    changes.update(overrides(args))
    changes.update({f"algo_params.{key}": value for key, value in args.plugin_params.items()})
    try:
        base = TrainConfig.load(args.config) if args.config else None
    except (OSError, ValueError, yaml.YAMLError) as error:  # missing, unreadable, not YAML, not a config
        if isinstance(error, yaml.YAMLError):
            reason = yaml_problem(error)
        else:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
        return _refuse(f"--config {args.config}: {reason.removeprefix(f'{args.config}: ')}")  # the path once
    if base is not None and args.run_dir is None:
        # an earlier run's config.yaml names its run_dir: repeating that run must not write into it
        changes["run_dir"] = None
    algo = args.algo or (base.algo if base else None)
    env_id = args.env or (base.env_id if base else None)
    missing = [flag for flag, value in (("--algo", algo), ("--env", env_id)) if not value]
    if missing:
        return _refuse(f"{' and '.join(missing)} required (or --config FILE, a config.yaml that names them)")
    try:
        config = resolve_config(algo, env_id, changes, base=base)
        check_schedule_flags(args, config)
        configure_torch_threads(args.threads, config.device)
    except (KeyError, TypeError, ValueError) as error:
        return _refuse(one_line(error))
    from diffgym.training.run import RunDirError, UnusableRunDir, check_run_dir, watch_runs

    if config.run_dir:
        try:
            check_run_dir(config.run_dir)
        except UnusableRunDir as error:  # a file, under a file, read-only: before anything is trained
            return _refuse(f"{'--run-dir' if args.run_dir else 'run_dir'} {error}")
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    train: Callable[..., Path] = load_trainer(algo).train
    with watch_runs() as opened:
        try:
            with _evaluation_lines(args.no_progress):
                train(config, progress=False) if args.no_progress and _accepts_progress(train) else train(config)
        except KeyboardInterrupt:  # Ctrl-C: the run keeps its last checkpoint; say how to continue it
            where = _interrupted(opened[-1], args) if opened else "interrupted before the run started"
            print(f"diffgym train: {where}", file=sys.stderr)
            return 130
        except RunDirError as error:  # in use, another config, no readable checkpoint: one line, no traceback
            return _refuse(one_line(error))
        except (TypeError, ValueError) as error:
            if opened:  # failed while training: a bug or a diverged run, whose traceback is worth reading
                raise
            # the trainer refused its config before it opened the run directory (e.g. a value its own
            # validation rejects): nothing was made, so it is a usage error like resolve_config's
            return _refuse(one_line(error))
    return 0


def _refuse(message: str) -> int:
    print(f"diffgym train: {message}", file=sys.stderr)
    return 2


def _interrupted(run: Run, args: argparse.Namespace) -> str:
    """``interrupted at N env steps; resume with: <command>``: the command continues the same run from
    its latest checkpoint (the run's own config.yaml, its run directory, this command's thread count)."""
    words = ["diffgym", "train", "--config", str(run.dir / "config.yaml"), "--run-dir", str(run.dir)]
    if args.threads is not None:
        words += ["--threads", str(args.threads)]
    if args.no_progress:
        words.append("--no-progress")
    return f"interrupted at {run.env_steps} env steps; resume with: {shlex.join(words)}"


@contextlib.contextmanager
def _evaluation_lines(enabled: bool) -> Iterator[None]:
    """Without the progress bar, one line per evaluation, whatever the trainer (every run logs through
    :class:`~diffgym.training.run.Run`, whose log hook sees each row)."""
    if not enabled:
        yield
        return
    from diffgym.training.run import log_hook

    def show(env_steps: int, scalars: dict[str, float]) -> None:
        if "eval_return" in scalars:
            success = scalars.get("eval_success_rate")
            print(f"evaluation at {env_steps} env steps: return {scalars['eval_return']:.4g}"
                  + ("" if success is None else f", success {success:.3g}"), flush=True)

    with log_hook(show):
        yield


def _accepts_progress(train: Callable[..., Any]) -> bool:
    import inspect

    try:
        return "progress" in inspect.signature(train).parameters
    except (TypeError, ValueError):
        return False
