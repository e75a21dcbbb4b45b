"""``diffgym eval``: score a trained policy on its run's evaluation seeds and on fresh ones.

Its arguments and runner are ``diffgym.policy_commands``' (next to the policy loading they share with
``export``); what can be checked before the policy is loaded is checked here, so a bad flag never
costs an evaluation."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

HELP = "evaluate a trained policy on its run's and on fresh seeds; --video records episodes"

VIDEO_WRITERS = {".mp4": ("imageio", "imageio_ffmpeg"), ".gif": ("imageio",)}
"""The video formats ``--video`` writes (by the file's extension) and the modules each needs."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffgym.policy_commands import add_eval_arguments

    add_eval_arguments(parser)


def run(args: argparse.Namespace) -> int:
    for flag, value in (("--episodes", args.episodes), ("--video-episodes", args.video_episodes)):
        if value is not None and value < 1:
            raise SystemExit(f"diffgym eval: {flag} must be >= 1, got {value}")
    if args.video:
        suffix = Path(args.video).suffix.lower()
        if suffix not in VIDEO_WRITERS:
            raise SystemExit(f"diffgym eval: --video {args.video}: expected a {' or '.join(VIDEO_WRITERS)} file")
        missing = [name for name in VIDEO_WRITERS[suffix] if importlib.util.find_spec(name) is None]
        if missing:
            raise SystemExit(f"diffgym eval: --video {suffix} needs {', '.join(missing)} "
                             "(pip install 'diffgym[video]')")
    from diffgym.policy_commands import run_eval

    return run_eval(args)
