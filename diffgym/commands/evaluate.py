"""``diffgym eval``: score a trained policy on its run's evaluation seeds and on fresh ones.

Its arguments and runner are ``diffgym.policy_commands``' (next to the policy loading they share with
``export``); what can be checked before the policy is loaded is checked here."""

from __future__ import annotations

import argparse

HELP = "evaluate a trained policy on its run's and on fresh seeds; --video records episodes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffgym.policy_commands import add_eval_arguments

    add_eval_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from diffgym.policy_commands import run_eval

    return run_eval(args)
