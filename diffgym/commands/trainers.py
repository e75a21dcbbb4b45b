"""``diffgym trainers``: the installed trainer plugins."""

from __future__ import annotations

import argparse

HELP = "list installed trainer plugins"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="also show each trainer's entry point and its own flags")


def run(args: argparse.Namespace) -> int:
    from diffgym.plugins import available_trainers, load_trainer, trainer_flags, trainer_names

    installed = available_trainers()
    names = trainer_names()
    if not names:
        print("no trainer plugins installed (entry-point group 'diffgym.trainers'); try `make install`")
        return 1
    width = max(12, *(len(name) for name in names))  # one column, however long a plugin's name
    for name in names:
        try:
            trainer = load_trainer(name)
            description = getattr(trainer, "description", "")
        except Exception as error:  # a broken plugin must not hide the others
            trainer, description = None, f"[failed to load: {type(error).__name__}: {error}]"
        line = f"{name:<{width}} {description}"
        if args.verbose and name in installed:
            ep = installed[name]
            dist = f" ({ep.dist.name} {ep.dist.version})" if ep.dist else ""
            line += f"\n{'':<{width}} entry point {ep.value}{dist}"
        if args.verbose and trainer is not None:
            for flag, help_text in trainer_flags(trainer).items():
                line += f"\n{'':<{width}} --{flag}: {help_text}"
        print(line)
    return 0
