"""``diffgym export``: a trained policy as a self-contained module or a shareable policy file.

``diffgym export RUN_DIR --out FILE`` writes, by FILE's extension, a module (normalizer + actor + squash,
deterministic) that maps observations ``(B, obs_dim)`` to actions, as TorchScript (``.pt``) or ONNX
(``.onnx``), or the shareable policy file (``.safetensors``: tensors and config only, read back by
``diffgym.load_policy`` and ``diffgym eval``). Checkpoints are read weights-only; ``--legacy-checkpoint``
reads older ones too, still running nothing from them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffgym.commands.options import add_policy_source_arguments, check_output_file, load_policy_source

HELP = "export a trained policy (normalizer + actor + squash) as TorchScript, ONNX or a shareable policy file"

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffgym.policy_commands import EXPORT_SUFFIXES

    add_policy_source_arguments(parser)
    parser.add_argument("--format", choices=tuple(EXPORT_SUFFIXES), default=None,
                        help="torchscript (.pt) or onnx (.onnx): a module that computes the actions; "
                             "safetensors (.safetensors): the policy's tensors and config, safe to share, "
                             "read by load_policy and diffgym eval (default: --out's extension, else torchscript)")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="output file, whose extension names the format (default: policy.pt, .onnx or "
                             ".safetensors in the run directory, or beside a file given as the policy)")


def run(args: argparse.Namespace) -> int:
    from diffgym.policy_commands import default_export_path, export_format, export_policy

    try:  # the output is checked before anything is loaded
        fmt = export_format(args.out, args.format) if args.out else (args.format or "torchscript")
        out = Path(args.out) if args.out else default_export_path(args.run_dir, fmt, args.step)
        if out.exists() and Path(args.run_dir).exists() and out.samefile(args.run_dir):
            raise ValueError(f"--out {out} is the policy being exported; choose another file")
        check_output_file(out)
    except ValueError as error:
        print(f"diffgym export: {error}", file=sys.stderr)
        return 2
    policy = load_policy_source("export", args)
    if policy is None:
        return 2
    try:
        path = export_policy(policy, out, fmt)
    except ImportError as error:  # ONNX's or safetensors' optional packages
        print(f"diffgym export: {error}", file=sys.stderr)
        return 2
    what = ("the policy's tensors and config, for diffgym.load_policy and diffgym eval" if fmt == "safetensors"
            else f"observations (B, {policy.model.obs_dim}) float32 -> actions (B, {policy.model.act_dim}) in [-1, 1]")
    print(f"wrote {path} ({fmt}): {what}")
    return 0
