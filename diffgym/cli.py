"""The ``diffgym`` console script.

Each subcommand is defined in one module of :mod:`diffgym.commands` (its help line, arguments and
runner); this module only builds the parser and reports a command's refusal in one line with exit
status 2 (``diffgym <command>: <why>``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from diffgym import __version__
from diffgym.commands import COMMANDS, load
from diffgym.commands.options import (ArgumentParser, HelpFormatter, add_trainer_flags, trainer_params,
                                      unknown_flags_error)


def build_parser(only: str | None = None, algo: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` the arguments of that one subcommand (the others are listed but
    take no arguments): some subcommands' argument definitions import torch, which ``diffgym --help``
    and every other subcommand should not wait for. ``only``, when it takes a trainer's own flags, gets those
    of the trainer ``algo`` (else its ``--algo`` default; ``add_trainer_flags``), so its ``--help`` lists
    them."""
    parser = ArgumentParser(prog="diffgym", description="DiffGym: differentiable Warp environments",
                            formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"diffgym {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = load(name)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP, formatter_class=HelpFormatter)
        if only is None or name == only:
            module.add_arguments(command)
        mode, trainer = command.get_default("plugin_flags"), algo or command.get_default("algo")
        if name == only and mode is not None and trainer:
            for flag in add_trainer_flags(command, name, trainer, mode):  # an installed plugin stays usable
                print(f"diffgym {name}: warning: trainer {trainer!r} declares {flag} in its cli_flags, which diffgym "
                      f"{name} already has: ignored (the trainer should rename it)", file=sys.stderr)
        command.set_defaults(run=module.run, usage_error=command.error)
    return parser


def _algo_named(words: list[str]) -> str | None:
    """The trainer ``words`` name, before the full parse, to give the parser that trainer's flags: the value
    of ``--algo`` (``--algo X``, ``--algo=X``, an abbreviation), else the ``algo`` of a ``--config`` file."""
    early = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    early.add_argument("--algo")
    early.add_argument("--config")
    try:
        known = early.parse_known_args(list(words))[0]
    except argparse.ArgumentError:  # ``--algo`` without a value: the full parse says so
        return None
    if known.algo or not known.config:
        return known.algo
    try:  # an unreadable file is the command's to report, with its reason
        import yaml

        with open(known.config) as stream:
            data = yaml.safe_load(stream)
    except (OSError, yaml.YAMLError):
        return None
    return data.get("algo") if isinstance(data, dict) and isinstance(data.get("algo"), str) else None


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    # a task of one's own, ``--env my_task:My/Task-v0``, imports my_task.py from where the command runs, as
    # ``python -m`` would; appended, so a local file never shadows an installed package
    try:
        here = os.getcwd()
    except OSError:  # a working directory deleted since: nothing to import from it
        here = None
    if here is not None and here not in sys.path:
        sys.path.append(here)
    chosen = next((w for w in words if not w.startswith("-")), "")  # the subcommand: the first word
    algo = _algo_named(words)
    try:
        # no subcommand (``diffgym --help``): none's arguments; an unknown one: all, for argparse's error
        parser = build_parser(only=chosen if chosen in COMMANDS or not chosen else None, algo=algo)
        args, extra = parser.parse_known_args(argv)
        if extra and getattr(args, "plugin_flags", None) is None:  # the subcommand's parser's error, naming it
            args.usage_error(f"unrecognized arguments: {' '.join(extra)}")
        if extra:
            raise SystemExit(unknown_flags_error(args.command, algo or args.algo, extra))
        args.plugin_params = trainer_params(args)
        return int(args.run(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: runs keep their last checkpoint and resume when started again
        rerun = getattr(load(chosen), "RESUMED_BY_RERUN", False)
        again = f"; resume with: {shlex.join(['diffgym', *words])}" if rerun else ""
        print(f"diffgym {chosen}: interrupted{again}", file=sys.stderr)
        return 130
    except SystemExit as stop:
        if isinstance(stop.code, str):  # a command's one-line refusal: a usage error, exit status 2
            message = stop.code if stop.code.startswith("diffgym ") else f"diffgym {chosen}: {stop.code}"
            print(message, file=sys.stderr)
            stop.code = 2
        raise


if __name__ == "__main__":
    sys.exit(main())
