"""``diffgym export``: a trained policy as a self-contained module or a shareable policy file.

Its arguments and runner are ``diffgym.policy_commands``' (next to the export formats they choose from)."""

from __future__ import annotations

import argparse

HELP = "export a trained policy (normalizer + actor + squash) as TorchScript, ONNX or a shareable policy file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffgym.policy_commands import add_export_arguments

    add_export_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from diffgym.policy_commands import run_export

    return run_export(args)
