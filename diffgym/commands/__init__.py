"""Every ``diffgym`` subcommand, each defined in one module of this package.

A command module holds ``HELP`` (its line in ``diffgym --help``), ``add_arguments(parser)`` and
``run(args) -> int``; the work itself is library code elsewhere (``diffgym.experiments``,
``diffgym.diagnostics``, ``diffgym.policy_commands``, ...). The flags several commands share, and what
each name means everywhere, are in :mod:`diffgym.commands.options`.

A command module imports nothing heavy at import time: ``diffgym --help`` imports all of them for their
``HELP`` and must not wait for torch or Warp. ``add_arguments`` runs only for the chosen command.
"""

from __future__ import annotations

import importlib
from types import ModuleType

COMMANDS = {
    "trainers": "trainers",
    "train": "train",
    "eval": "evaluate",
    "export": "export",
    "robustness": "robustness",
    "compare": "compare",
    "ablate": "ablate",
    "results": "results",
    "tune": "tune",
    "grad-stats": "grad_stats",
    "feasibility": "feasibility",
    "validate-urdf": "validate_urdf",
}
"""Subcommand -> its module in this package, in the order ``diffgym --help`` lists them. A new
subcommand is one module and one line here."""


def load(name: str) -> ModuleType:
    """The module that defines subcommand ``name``."""
    return importlib.import_module(f"{__name__}.{COMMANDS[name]}")
