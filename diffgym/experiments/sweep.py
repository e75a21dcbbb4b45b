"""Sweeps are plain lists of independent runs (``TrainConfig``s), executed behind one small interface.

A sweep file is JSON Lines, one config per line, so the same sweep can be sent to a cluster: anything
that calls ``diffgym.experiments.sweep.train_one`` (or ``diffgym train --config``) on each line runs it.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from diffgym.experiments.training_runs import SweepFailed, is_finished, one_line_error, run_summary, train_one
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
            report: Callable[[int, Any], str] | None = None, names: Sequence[str] | None = None) -> list[Any]:
        """``[work(*item) for item in items]``, possibly in parallel; results in the order given.
        ``report(i, result)`` formats a progress line for each finished item; ``names`` name the items in
        failure lines (default ``item I``)."""
        ...


class LocalRunner:
    """Runs configs in ``workers`` parallel processes on this machine; finished runs are skipped."""

    def __init__(self, workers: int | None = None, skip_finished: bool = True, threads: int | None = None,
                 max_retries: int = 3):
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.max_retries = max_retries  # fresh pools after a worker process died, as RayRunner's retries
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
            _, failures = self._in_processes(train_one, [(c.to_dict(), False, self.threads) for c in todo],
                                             [Path(c.run_dir).name for c in todo], lambda i, _: run_summary(todo[i]))
            if failures:
                raise SweepFailed(failures, len(configs))
        return [Path(c.run_dir) for c in configs]

    def map(self, work: Callable[..., Any], items: Sequence[tuple],
            report: Callable[[int, Any], str] | None = None, names: Sequence[str] | None = None) -> list[Any]:
        """``work(*item)`` for every item; with several workers in fresh processes with ``threads`` torch
        threads each (default one; in this process when there is one worker or one item).
        ``report(i, result)`` formats a line printed, after a ``[done/total]`` count, as each item finishes;
        ``names`` name the items in failure lines (default ``item I``)."""
        if self.workers == 1 or len(items) <= 1:
            results: list[Any] = []
            for i, item in enumerate(items):
                results.append(work(*item))
                if report:
                    print(f"[{i + 1}/{len(items)}] {report(i, results[i])}", flush=True)
            return results
        results, failures = self._in_processes(work, items, names or [f"item {i}" for i in range(len(items))], report)
        if failures:
            raise SweepFailed(failures, len(items))
        return results

    def _in_processes(self, work: Callable[..., Any], items: Sequence[tuple], names: Sequence[str],
                      report: Callable[[int, Any], str] | None) -> tuple[list[Any], list[tuple[str, str]]]:
        """``work(*item)`` for every item in a pool of fresh processes; the results, and ``(name, one-line
        error)`` for each item that raised. As on Ray, a failing item is reported when it fails and the others
        go on, and a worker process that dies (killed, out of memory), which takes the pool down with it, is
        answered with a fresh pool for the unfinished items (``max_retries`` times; runs resume from their
        last checkpoint). Ctrl-C: see :meth:`_stop`."""
        results: list[Any] = [None] * len(items)
        failures: list[tuple[str, str]] = []
        settled: set[int] = set()
        context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked Warp/torch state
        for attempt in range(1, self.max_retries + 2):
            unfinished = [i for i in range(len(items)) if i not in settled]
            pool = ProcessPoolExecutor(min(self.workers, len(unfinished)), mp_context=context,
                                       initializer=_start_worker)
            died = None
            try:
                futures = {pool.submit(_with_threads, self.threads, work, *items[i]): i for i in unfinished}
                for future in as_completed(futures):
                    i = futures[future]
                    try:
                        results[i] = future.result()
                    except BrokenProcessPool as failure:  # every unfinished item of this pool gets it
                        died = failure
                        continue
                    except Exception as failure:  # the item's own exception
                        settled.add(i)
                        failures.append((names[i], one_line_error(failure)))
                        print(f"[{len(settled)}/{len(items)}] {names[i]} failed: {failures[-1][1]}", flush=True)
                        continue
                    settled.add(i)
                    if report:
                        print(f"[{len(settled)}/{len(items)}] {report(i, results[i])}", flush=True)
            except KeyboardInterrupt:
                self._stop(pool)
                raise
            finally:
                pool.shutdown(wait=True)
            unfinished = [i for i in range(len(items)) if i not in settled]
            if died is None or not unfinished:
                break
            if attempt <= self.max_retries:
                print(f"a worker process died ({one_line_error(died)}), which stops its pool; starting the "
                      f"{len(unfinished)} unfinished item(s) again in fresh processes (attempt {attempt + 1} of "
                      f"{self.max_retries + 1}; runs resume from their last checkpoint)", file=sys.stderr, flush=True)
            else:
                failures += [(names[i], f"its worker process died {attempt} times, last: {one_line_error(died)}")
                             for i in unfinished]
        return results, failures

    @staticmethod
    def _stop(pool: ProcessPoolExecutor) -> None:
        """Ctrl-C: stop the running items (a KeyboardInterrupt in each: runs keep their last checkpoint) and
        start none of the queued ones, so the command ends at once and running it again resumes. Workers that
        have not stopped within ``_STOP_GRACE_S`` (a long C call) or at a second Ctrl-C are terminated."""
        processes = list((getattr(pool, "_processes", None) or {}).values())
        for process in processes:  # Ctrl-C in a terminal reaches them too; ``kill -INT`` of this process alone not
            with contextlib.suppress(OSError):
                os.kill(process.pid, signal.SIGINT)  # a worker takes one SIGINT: none mid-unwinding
        print("\ninterrupted: stopping the running items, starting none of the queued ones", file=sys.stderr,
              flush=True)
        pool.shutdown(wait=False, cancel_futures=True)
        try:
            deadline = time.monotonic() + _STOP_GRACE_S
            for process in processes:
                process.join(max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
            pass
        for process in processes:
            if process.is_alive():
                process.terminate()


_STOP_GRACE_S = 10.0


def _with_threads(threads: int | None, work: Callable[..., Any], *args: Any) -> Any:
    """In a worker process: parallel work shares the cores; one thread each (the default) avoids
    oversubscription."""
    global _running
    if _interrupted:  # an item handed to this worker before Ctrl-C reached it: not started
        raise KeyboardInterrupt("not started: the sweep was interrupted")
    import torch

    torch.set_num_threads(threads or 1)  # train_one then sets each run's own count (by its device)
    _running = True
    try:
        return work(*args)
    finally:
        _running = False


_interrupted = False  # in a pool worker: a SIGINT has arrived
_running = False  # in a pool worker: an item is running


def _on_interrupt(signum: int, frame: Any) -> None:
    """Pool workers' SIGINT handler. The first SIGINT stops the running item; an idle worker only records it
    (raised while it waits for work, it would break the pool and take the stopping runs down with it), and
    later ones are ignored, so the terminal's Ctrl-C and the parent's forwarded one do not interrupt a run
    twice, the second time while it unwinds. ``_with_threads`` refuses the items taken after it."""
    global _interrupted
    if not _interrupted:
        _interrupted = True
        if _running:
            raise KeyboardInterrupt


def _start_worker() -> None:
    """Pool-worker initializer: take Ctrl-C once (``_on_interrupt``) and end with the parent.

    Workers block on the pool's call queue, whose pipe they also hold open for writing, so they never
    see the parent go: killed alone, the parent of ``diffgym compare`` left its workers running the
    queued runs (behind a re-run's back, into the same run directories), then idling forever. The
    parent's sentinel (a pipe only the parent writes to) becomes readable when it dies, whatever killed
    it; a daemon thread waits on it and exits the worker. Its runs stop like killed ones: their
    directories stay resumable (atomic checkpoints and metrics, the lock released by the OS).
    """
    signal.signal(signal.SIGINT, _on_interrupt)
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)  # no cleanup can be trusted with the parent gone; everything on disk is consistent

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
