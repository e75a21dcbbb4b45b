"""One command-line vocabulary for ``train``, ``compare``, ``ablate`` and ``tune``.

The budget and the evaluation interval have one name each, with the other spelling accepted as an
alias (``--env-steps`` = ``--total-env-steps``, ``--eval-every`` = ``--eval-every-env-steps``), every
number accepts ``1e6`` notation, and ``--set KEY=VALUE`` / ``--param KEY=VALUE`` override any config
field / algorithm hyperparameter, for one run (``train``) or for every run of a sweep.
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml


def count(text: str) -> int:
    """A non-negative integer that may be written ``1e6``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 50000 or 5e4, got {text!r}") from None
    if value < 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(value)


def parse_value(text: str) -> Any:
    """A YAML scalar/list (``32``, ``[64, 64]``, ``true``, ``null``); numbers such as ``1e-3`` that
    YAML 1.1 leaves as strings become floats."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def key_values(pairs: list[str], prefix: str = "") -> dict[str, Any]:
    """``["a.b=1", ...]`` -> ``{prefix + "a.b": 1, ...}``; a malformed pair is a one-line error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"expected KEY=VALUE, got {pair!r}")
        out[prefix + key.strip()] = parse_value(value)
    return out


def add_budget_arguments(parser: argparse.ArgumentParser, required: bool, eval_default: str) -> None:
    """``--env-steps`` (alias ``--total-env-steps``) and ``--eval-every`` (alias ``--eval-every-env-steps``)."""
    parser.add_argument("--env-steps", "--total-env-steps", dest="env_steps", type=count, required=required,
                        default=None, help="env-step budget of every run, e.g. 1e6")
    parser.add_argument("--eval-every", "--eval-every-env-steps", dest="eval_every", type=count, default=None,
                        help=f"env steps between evaluations, e.g. 5e3 (default: {eval_default})")


def add_override_arguments(parser: argparse.ArgumentParser, scope: str) -> None:
    """``--set KEY=VALUE`` and ``--param KEY=VALUE`` (repeatable)."""
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override any config field of {scope} by dotted key, e.g. optimizer.lr=1e-3 "
                             "env_kwargs.contact_stiffness=2000 (repeatable)")
    parser.add_argument("--param", dest="params", action="append", default=[], metavar="KEY=VALUE",
                        help="override an algorithm hyperparameter, same as --set algo_params.KEY=VALUE")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The dotted-key overrides of ``--set`` and ``--param``."""
    return {**key_values(getattr(args, "sets", [])), **key_values(getattr(args, "params", []), prefix="algo_params.")}
