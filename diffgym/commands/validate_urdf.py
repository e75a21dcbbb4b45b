"""``diffgym validate-urdf``: a URDF's Warp kinematics against PyBullet."""

from __future__ import annotations

import argparse
import sys

HELP = "check a URDF's Warp kinematics against PyBullet (link frames, TCP, joint limits)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Check a URDF's Warp forward kinematics (every link frame and the TCP) against PyBullet "
                          "at random configurations within its joint limits. Exit status 0: passed, 1: failed, "
                          "2: the URDF cannot be loaded.")
    parser.add_argument("path", help="the URDF file")
    parser.add_argument("--tcp-link", default=None,
                        help="the chain's tip link (default: the only leaf link of an unbranched tree)")
    parser.add_argument("--samples", type=int, default=1000, help="random configurations")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random configurations")


def run(args: argparse.Namespace) -> int:
    from diffgym.urdf import validate_urdf

    try:
        report = validate_urdf(args.path, samples=args.samples, seed=args.seed, tip_link=args.tcp_link)
    except (FileNotFoundError, ValueError) as error:
        print(f"diffgym validate-urdf: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0 if report.passed else 1
