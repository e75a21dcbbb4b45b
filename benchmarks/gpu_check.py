"""`make gpu-check`: the CUDA tests, then the engine and peer benchmarks on the GPU, in one command
(the steps' time limits add up to 470 s), every table written to one Markdown report.

    python benchmarks/gpu_check.py [--device cuda] [--out runs/gpu-check/report.md] [--quick] [--allow-missing]

Steps, each in its own process with a time limit (a step past it is stopped and reported, the others
still run):
  1. pytest -m cuda tests/test_cuda.py: CUDA results and gradients agree with the CPU;
  2. benchmarks/bench_engine.py --device DEVICE: cost of gradients, batched throughput, single env;
  3. benchmarks/bench_peers.py --device DEVICE: single env vs panda-gym / gym-pusht, twins vs JAX / torch;
  4. benchmarks/bench_peers.py at 1,048,576 PointMass1D envs (the issue's aim: >= 1e9 env-steps/s forward).

Without a CUDA GPU (or with a CPU build of torch) it stops at once with one line. --device cpu runs the
same steps on the CPU (the CUDA tests then skip), which is how the path is tested on machines without a
GPU; --quick makes every step a smoke run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIG_N = 1_048_576


def preflight(device: str) -> str | None:
    """Why this machine cannot run the check on `device`, in one line, or None when it can."""
    if not device.startswith("cuda"):
        return None
    import torch

    if torch.version.cuda is None:
        return (f"torch {torch.__version__} in {sys.prefix} is a CPU build; install a CUDA build of torch "
                f"{torch.__version__.split('+')[0]} there")
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False)"
    import warp as wp

    from diffgym.core.native import native_output_silenced

    with native_output_silenced():
        wp.init()
    if wp.get_cuda_device_count() == 0:
        return f"Warp {wp.config.version} finds no CUDA device (driver missing or too old for it)"
    return None


def steps(args) -> list[tuple[str, list[str], int]]:
    """(title, command, time limit in s) of every step; the limits add up to about 8 minutes."""
    py, dev = sys.executable, args.device
    quick = args.quick
    peers_extra = ["--allow-missing"] if args.allow_missing else []
    engine = [py, "benchmarks/bench_engine.py", "--device", dev, *(["--quick"] if quick else [])]
    peers = [py, "benchmarks/bench_peers.py", "--device", dev, *(["--quick"] if quick else []), *peers_extra]
    big_n = 1024 if quick else BIG_N
    big = [py, "benchmarks/bench_peers.py", "--device", dev, "--skip-single", "--tasks", "DiffGym/PointMass1D-v0",
           "--sizes", str(big_n), "--steps", "8" if quick else "32", "--repeats", "2" if quick else "5", *peers_extra]
    return [
        ("CUDA tests", [py, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-rs", "-p", "no:cacheprovider"],
         100),
        ("Engine benchmark", engine, 140),
        ("Peer benchmark", peers, 140),
        (f"PointMass1D at {big_n:,} envs", big, 90),
    ]


def run_step(title: str, command: list[str], limit: int, report, device: str) -> bool:
    shown = " ".join(os.path.relpath(c, REPO) if c == sys.executable else c for c in command)
    print(f"gpu-check: {title}: {shown}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit)
        rc, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as stopped:
        rc = None
        out = stopped.stdout.decode() if isinstance(stopped.stdout, bytes) else (stopped.stdout or "")
        err = stopped.stderr.decode() if isinstance(stopped.stderr, bytes) else (stopped.stderr or "")
    wall = time.perf_counter() - start
    # pytest's exit 5 (nothing collected) is a failure here: the check would have checked nothing; so are
    # CUDA tests skipped on a GPU run, where the preflight found the GPU they say is missing
    ok = rc == 0
    status = "passed" if ok else (f"stopped after its {limit} s limit" if rc is None else f"failed (exit {rc})")
    if ok and title == "CUDA tests" and device.startswith("cuda") and " skipped" in out:
        ok, status = False, "failed (CUDA tests skipped on a GPU run)"
    report.write(f"## {title}\n\n`{shown}`: {status}, {wall:.0f} s\n\n{out.strip()}\n\n")
    if not ok and err.strip():
        tail = "\n".join(err.strip().splitlines()[-15:])
        report.write(f"stderr (last lines):\n\n```\n{tail}\n```\n\n")
    report.flush()
    print(f"gpu-check: {title}: {status} ({wall:.0f} s)", file=sys.stderr, flush=True)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu to test the path without a GPU")
    parser.add_argument("--out", default="runs/gpu-check/report.md", help="the report (Markdown)")
    parser.add_argument("--quick", action="store_true", help="smoke runs of every step")
    parser.add_argument("--allow-missing", action="store_true",
                        help="peer benchmark without the peers that are not installed (see bench_peers.py)")
    args = parser.parse_args(argv)
    why = preflight(args.device)
    if why:
        print(f"gpu-check: no usable GPU: {why}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if not out.is_absolute():
        out = REPO / out
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    with out.open("w") as report:
        report.write(f"# gpu-check ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, device {args.device})\n\n")
        for title, command, limit in steps(args):
            results.append((title, run_step(title, command, limit, report, args.device)))
    failed = [title for title, ok in results if not ok]
    if failed:
        print(f"gpu-check: {len(failed)} of {len(results)} steps failed ({', '.join(failed)}); report in {out}",
              file=sys.stderr)
        return 1
    print(f"gpu-check: all {len(results)} steps passed; report in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
