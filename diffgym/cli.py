"""The ``diffgym`` console script.

``diffgym trainers`` lists installed trainer plugins; ``diffgym train --algo NAME --env ID`` trains one.
Each subcommand is one ``(add_arguments, run)`` pair in ``COMMANDS``; later commands (``compare``,
``ablate``, ``validate-urdf``) register the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from diffgym.experiments.options import add_budget_arguments, add_override_arguments, overrides
from diffgym.experiments.options import parse_value as _parse_value
from diffgym.threads import add_threads_argument, configure_torch_threads


# ------------------------------------------------------------------------------------ trainers
def _add_trainers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="also show each trainer's entry point and its own flags")


def _run_trainers(args: argparse.Namespace) -> int:
    from diffgym.plugins import available_trainers, load_trainer, trainer_names

    installed = available_trainers()
    names = trainer_names()
    if not names:
        print("no trainer plugins installed (entry-point group 'diffgym.trainers'); try `make install`")
        return 1
    for name in names:
        try:
            description = getattr(load_trainer(name), "description", "")
        except Exception as error:  # a broken plugin must not hide the others
            description = f"[failed to load: {type(error).__name__}: {error}]"
        line = f"{name:<12} {description}"
        if args.verbose and name in installed:
            ep = installed[name]
            dist = f" ({ep.dist.name} {ep.dist.version})" if ep.dist else ""
            line += f"\n{'':<12} entry point {ep.value}{dist}"
        if args.verbose:
            from diffgym.plugins import trainer_flags

            try:
                flags = trainer_flags(load_trainer(name))
            except Exception:  # reported on the description line already
                flags = {}
            for flag, help_text in flags.items():
                line += f"\n{'':<12} --{flag}: {help_text}"
        print(line)
    return 0


# --------------------------------------------------------------------------------------- train
_TOP_LEVEL = {  # CLI flag -> TrainConfig field
    "seed": "seed", "num_envs": "num_envs", "env_steps": "total_env_steps",
    "eval_every": "eval_every_env_steps", "eval_episodes": "eval_episodes",
    "device": "device", "run_dir": "run_dir",
}


def _add_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--algo", required=True, help="trainer plugin name (see `diffgym trainers`)")
    parser.add_argument("--env", required=True, help="task id, e.g. DiffGym/PointMass1D-v0")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--num-envs", type=int)
    add_budget_arguments(parser, required=False, eval_default="the trainer's per-task default")
    parser.add_argument("--eval-episodes", type=int)
    parser.add_argument("--device", help="cpu or cuda[:N]")
    parser.add_argument("--run-dir", help="output directory (default runs/<algo>__<task>__s<seed>__<time>); an "
                                          "existing one is continued from its latest checkpoint")
    parser.add_argument("--config", type=Path, help="a config.yaml (e.g. from an earlier run) to start from; "
                                                    "the run goes to a new run directory unless --run-dir is given")
    add_override_arguments(parser, "the run")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_threads_argument(parser, "training")
    parser.epilog = ("A trainer adds its own flags (e.g. `--segment-length K` for apg), each the same as "
                     "--param; `diffgym trainers -v` lists them.")
    parser.set_defaults(plugin_flags="single")


def parse_trainer_flags(command: str, algo: str, extra: list[str], values: str = "single") -> dict[str, Any]:
    """Parse the command-line words argparse did not know as the trainer's own flags (``cli_flags``):
    ``{algo_params key: value}``; ``values="list"`` keeps each value as text (a grid axis, ``V1,V2``).
    Anything that is not one of the trainer's flags is a one-line error."""
    from diffgym.plugins import flag_parameter, load_trainer, trainer_flags

    try:
        flags = trainer_flags(load_trainer(algo))
    except (KeyError, TypeError) as error:
        raise SystemExit(f"diffgym {command}: {error.args[0] if error.args else error}")
    parser = argparse.ArgumentParser(prog=f"diffgym {command} --algo {algo}", add_help=False)
    for flag, help_text in flags.items():
        parser.add_argument(f"--{flag}", dest=flag_parameter(flag), help=help_text,
                            type=str if values == "list" else _parse_value)
    known, unknown = parser.parse_known_args(extra)
    if unknown:
        own = ", ".join(f"--{flag}" for flag in flags) or "none"
        raise SystemExit(f"diffgym {command}: unrecognized arguments: {' '.join(unknown)} "
                         f"(trainer {algo!r} adds the flags: {own})")
    return {key: value for key, value in vars(known).items() if value is not None}


def _run_train(args: argparse.Namespace) -> int:
    import diffgym  # noqa: F401  (registers the tasks)
    from diffgym.plugins import load_trainer, resolve_config
    from diffgym.training import TrainConfig

    changes = {field: getattr(args, flag) for flag, field in _TOP_LEVEL.items() if getattr(args, flag) is not None}
    changes.update(overrides(args))
    changes.update({f"algo_params.{key}": value for key, value in args.plugin_params.items()})
    try:
        base = TrainConfig.load(args.config) if args.config else None
    except (OSError, ValueError, yaml.YAMLError) as error:  # missing, unreadable, not YAML, not a config
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
        print(f"diffgym train: --config {args.config}: {reason}", file=sys.stderr)
        return 2
    if base is not None and args.run_dir is None:
        # an earlier run's config.yaml names its run_dir: repeating that run must not write into it
        changes["run_dir"] = None
    try:
        config = resolve_config(args.algo, args.env, changes, base=base)
    except (KeyError, ValueError) as error:
        print(f"diffgym train: {error.args[0] if error.args else error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    from diffgym.training.run import RunDirError

    try:
        configure_torch_threads(args.threads, config.device)
    except ValueError as error:
        print(f"diffgym train: {error}", file=sys.stderr)
        return 2
    trainer = load_trainer(args.algo)
    train: Callable[..., Path] = trainer.train
    try:
        run_dir = train(config, progress=False) if args.no_progress and _accepts_progress(train) else train(config)
    except RunDirError as error:  # in use, another config, no readable checkpoint: one line, no traceback
        print(f"diffgym train: {error}", file=sys.stderr)
        return 2
    print(f"run directory: {run_dir}")
    return 0


def _accepts_progress(train: Callable[..., Any]) -> bool:
    import inspect

    try:
        return "progress" in inspect.signature(train).parameters
    except (TypeError, ValueError):
        return False


def _experiment(name: str):
    import importlib

    return importlib.import_module(f"diffgym.experiments.{name}")


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "trainers": ("list installed trainer plugins", _add_trainers, _run_trainers),
    "train": ("train a policy with a trainer plugin", _add_train, _run_train),
    "compare": ("train algorithms on one task over seeds and report them under the evaluation protocol",
                lambda p: _experiment("compare").add_arguments(p), lambda a: _experiment("compare").main(a)),
    "validate-urdf": ("check a URDF's Warp kinematics against PyBullet (link frames, TCP, joint limits)",
                      lambda p: p.add_argument("argv", nargs=argparse.REMAINDER, help="PATH [--tcp-link L] [--samples N] [--seed S]"),
                      lambda a: __import__("diffgym.urdf", fromlist=["validate_cli"]).validate_cli(a.argv, prog="diffgym validate-urdf")),
    "eval": ("evaluate a trained policy on its run's and on fresh seeds; --video records episodes",
             lambda p: __import__("diffgym.policy_commands", fromlist=["x"]).add_eval_arguments(p),
             lambda a: __import__("diffgym.policy_commands", fromlist=["x"]).run_eval(a)),
    "export": ("export a trained policy (normalizer + actor + squash) as TorchScript or ONNX",
               lambda p: __import__("diffgym.policy_commands", fromlist=["x"]).add_export_arguments(p),
               lambda a: __import__("diffgym.policy_commands", fromlist=["x"]).run_export(a)),
    "grad-stats": ("analytic vs likelihood-ratio policy gradients per horizon: norm, variance, cosine, bias",
                   lambda p: __import__("diffgym.diagnostics", fromlist=["add_arguments"]).add_arguments(p),
                   lambda a: __import__("diffgym.diagnostics", fromlist=["main"]).main(a)),
    "tune": ("Optuna search over a trainer's own hyperparameters on one task (TPE, median pruner)",
             lambda p: _experiment("tune").add_arguments(p), lambda a: _experiment("tune").main(a)),
    "feasibility": ("a sampling planner (MPPI) on the exact simulator: is the success criterion reachable?",
                    lambda p: _experiment("feasibility").add_arguments(p), lambda a: _experiment("feasibility").main(a)),
    "ablate": ("a grid over a trainer's algo_params on one task (default: the trainer's ablation_grid)",
               lambda p: _experiment("ablate").add_arguments(p), lambda a: _experiment("ablate").main(a)),
}
"""Subcommand name -> (help, add_arguments, run). Register new subcommands here."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` the arguments of that one subcommand (the others are listed but
    take no arguments): some subcommands' argument definitions import torch, which ``diffgym --help``
    and every other subcommand should not wait for."""
    parser = argparse.ArgumentParser(prog="diffgym", description="DiffGym: differentiable Warp environments")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            add_arguments(command)
        command.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    chosen = next((w for w in words if not w.startswith("-")), "")  # the subcommand: the first word
    # no subcommand (``diffgym --help``): none's arguments; an unknown one: all, for argparse's error
    parser = build_parser(only=chosen if chosen in COMMANDS or not chosen else None)
    args, extra = parser.parse_known_args(argv)
    mode = getattr(args, "plugin_flags", None)  # commands that take the chosen trainer's own flags
    if extra and mode is None:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.plugin_params = parse_trainer_flags(args.command, args.algo, extra, mode) if extra else {}
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: runs keep their last checkpoint and resume when started again
        print(f"diffgym {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
