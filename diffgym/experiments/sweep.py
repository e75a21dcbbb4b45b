"""Sweeps are plain lists of independent runs (``TrainConfig``s), executed behind one small interface.

A sweep file is JSON Lines, one config per line, so the same sweep can be sent to a cluster: anything
that calls ``diffgym.experiments.sweep.train_one`` (or ``diffgym train --config``) on each line runs it.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from diffgym.experiments.training_runs import SweepFailed, is_finished, run_summary, train_one
from diffgym.training.spec import TrainConfig

# the sweep API; its run-level parts live in training_runs, which ray_runner imports too
__all__ = ["LocalRunner", "Runner", "SweepFailed", "is_finished", "load_sweep", "save_sweep", "train_one"]


def save_sweep(configs: Sequence[TrainConfig], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(c.to_dict()) + "\n" for c in configs))
    return path


def load_sweep(path: str | Path) -> list[TrainConfig]:
    return [TrainConfig.from_dict(json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]


class Runner(Protocol):
    """Executes independent units of work: training runs (``run``) or any picklable function applied
    to a list of arguments (``map``, e.g. ``diffgym tune``'s trials)."""

    def run(self, configs: Sequence[TrainConfig]) -> list[Path]:
        """Train every config (skipping finished ones); their run directories in the order given."""
        ...

    def map(self, work: Callable[..., Any], items: Sequence[tuple],
            report: Callable[[int, Any], str] | None = None) -> list[Any]:
        """``[work(*item) for item in items]``, possibly in parallel; results in the order given.
        ``report(i, result)`` formats a progress line for each finished item."""
        ...


class LocalRunner:
    """Runs configs in ``workers`` parallel processes on this machine; finished runs are skipped."""

    def __init__(self, workers: int | None = None, skip_finished: bool = True, threads: int | None = None):
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.skip_finished = skip_finished
        self.threads = threads  # torch threads per run (None: diffgym.threads' default, 1 on CPU)

    def run(self, configs: Sequence[TrainConfig]) -> list[Path]:
        for config in configs:
            if not config.run_dir:
                raise ValueError("every config of a sweep needs an explicit run_dir")
        todo = [c for c in configs if not (self.skip_finished and is_finished(c))]
        print(f"sweep: {len(configs)} runs, {len(configs) - len(todo)} already finished, "
              f"{len(todo)} to run in {min(self.workers, max(1, len(todo)))} process(es)", flush=True)
        if self.workers == 1 or len(todo) <= 1:
            for config in todo:
                train_one(config.to_dict(), threads=self.threads)
        else:
            # parallel progress bars would garble the terminal: one line per finished run instead
            self.map(train_one, [(c.to_dict(), False, self.threads) for c in todo], lambda i, _: run_summary(todo[i]))
        return [Path(c.run_dir) for c in configs]

    def map(self, work: Callable[..., Any], items: Sequence[tuple],
            report: Callable[[int, Any], str] | None = None) -> list[Any]:
        """``work(*item)`` for every item; with several workers in fresh processes with ``threads`` torch
        threads each (default one; in this process when there is one worker or one item).
        ``report(i, result)`` formats a line printed, after a ``[done/total]`` count, as each item finishes."""
        results: list[Any] = [None] * len(items)

        def finished(done: int, i: int) -> None:
            if report:
                print(f"[{done}/{len(items)}] {report(i, results[i])}", flush=True)

        if self.workers == 1 or len(items) <= 1:
            for i, item in enumerate(items):
                results[i] = work(*item)
                finished(i + 1, i)
            return results
        context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked Warp/torch state
        with ProcessPoolExecutor(min(self.workers, len(items)), mp_context=context,
                                 initializer=_exit_with_parent) as pool:
            futures = {pool.submit(_with_threads, self.threads, work, *item): i for i, item in enumerate(items)}
            for done, future in enumerate(as_completed(futures), 1):
                i = futures[future]
                results[i] = future.result()  # re-raise a failed item's exception here
                finished(done, i)
        return results


def _with_threads(threads: int | None, work: Callable[..., Any], *args: Any) -> Any:
    """In a worker process: parallel work shares the cores; one thread each (the default) avoids
    oversubscription."""
    import torch

    torch.set_num_threads(threads or 1)  # train_one then sets each run's own count (by its device)
    return work(*args)


def _exit_with_parent() -> None:
    """Pool-worker initializer: end this worker as soon as the process that started it dies.

    Workers block on the pool's call queue, whose pipe they also hold open for writing, so they never
    see the parent go: killed alone, the parent of ``diffgym compare`` left its workers running the
    queued runs (behind a re-run's back, into the same run directories), then idling forever. The
    parent's sentinel (a pipe only the parent writes to) becomes readable when it dies, whatever killed
    it; a daemon thread waits on it and exits the worker. Its runs stop like killed ones: their
    directories stay resumable (atomic checkpoints and metrics, the lock released by the OS).
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)  # no cleanup can be trusted with the parent gone; everything on disk is consistent

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
