"""Torch's intra-op thread count for training.

Training here runs many small ops (a policy of a few hundred units, batches of tens of envs): torch's
default of one thread per core makes them slower, not faster, and on a shared or loaded machine the
threads spin against each other (an APG FrankaReach run of 10k env steps on a busy 2-core VM took 49 s
of CPU with the default against 5.3 s with one thread). So CPU training defaults to one thread;
``--threads N`` asks for more (e.g. for large batches on an otherwise idle many-core machine).
"""

from __future__ import annotations

import argparse

DEFAULT_CPU_THREADS = 1


def add_threads_argument(parser: argparse.ArgumentParser, what: str = "the run") -> None:
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help=f"torch threads for {what} (default {DEFAULT_CPU_THREADS} on CPU; "
                             "on CUDA, torch's default)")


def resolve_threads(threads: int | None, device: str | None = "cpu") -> int | None:
    """The thread count to set: ``threads`` if given (>= 1), else 1 for a CPU device and ``None`` (leave
    torch's default) for CUDA, where the CPU mostly waits for the GPU."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        return threads
    return DEFAULT_CPU_THREADS if not str(device or "cpu").startswith("cuda") else None


def configure_torch_threads(threads: int | None, device: str | None = "cpu") -> int | None:
    """Apply :func:`resolve_threads` to torch in this process; returns the count set (or ``None``)."""
    count = resolve_threads(threads, device)
    if count is not None:
        import torch

        torch.set_num_threads(count)
    return count
