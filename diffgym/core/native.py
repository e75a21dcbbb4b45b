"""Silencing what native libraries print straight to the process's file descriptors."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


@contextlib.contextmanager
def native_output_silenced() -> Iterator[None]:
    """Mute file descriptors 1 and 2 for the block: C and C++ code (PyBullet's banner and link warnings,
    Warp's "no CUDA driver" line) writes there directly, past ``sys.stdout``/``sys.stderr``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
