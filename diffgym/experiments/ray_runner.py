"""``RayRunner``: a sweep's runs as Ray tasks, on a cluster or on a local Ray instance.

The same :class:`~diffgym.experiments.sweep.Runner` interface as the process pool: ``run(configs)``
trains every config (skipping finished ones) and ``map(work, items)`` applies a function (``diffgym
tune``'s trials). Each run is one Ray task reserving ``cpus_per_run`` CPUs (its torch threads) and
``gpus_per_run`` GPUs (above 0 it trains on the GPU Ray assigns it).

Where outputs land. By default a run trains in a scratch directory on its worker, and a
:class:`_Mirror` thread copies what changed (config, metrics, TensorBoard events, the newest
checkpoint, final models) every ``sync_every`` seconds, and once more when the run ends, to a
:class:`RunDirSink` actor pinned to the driver's node, which writes them into the run directory the
config names: the driver's ``--out`` holds every run as if it had trained there, so finished-run
detection, resuming and reports work as with the local runner. With ``shared_out`` (``--out`` on
storage every node mounts at the same path), runs write there directly and nothing is copied.

Tasks do not wait on Ray while they train (a task blocked in ``ray.get`` lends its CPU to a queued
task, and the machine would run more runs than it has CPUs): the driver hands each task the run
directory's contents, the mirror's periodic copies are sent without waiting (an actor runs one caller's
calls in order), and only the final copy, after training, is waited for (a queued run may then start
a moment early).

Faults. A run whose worker dies (killed, out of memory, node lost) is started again by the driver, up
to ``max_retries`` times, from the driver's copy of its run directory, so the trainer resumes from the
last checkpoint that reached it (copies still in flight from the dead attempt are dropped). A run that
raises is not retried: it is reported by name with its error, the other runs go on, and
:class:`~diffgym.experiments.training_runs.SweepFailed` lists the failures at the end. Ctrl-C cancels the
outstanding runs (running ones get a KeyboardInterrupt, copy their outputs back and stop; runs that do
not stop within a few seconds are killed); re-running the command resumes them.

Trainers registered in the driver process only (``diffgym.plugins.register_trainer``: notebooks,
tests) do not exist in Ray's worker processes: the runner sends them along with the runs.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from diffgym.experiments.training_runs import SweepFailed, is_finished, one_line_error, run_summary, train_one
from diffgym.training.run import list_checkpoints, lock_run_dir, replace_atomically
from diffgym.training.spec import TrainConfig

# (path relative to the run directory, offset, bytes): offset None replaces the file, else the bytes
# are written at offset (the file grew: metrics rows and TensorBoard events are appended)
Change = tuple[str, int | None, bytes]

_CANCEL_GRACE_S = 10.0  # how long cancelled runs get to copy their outputs back before they are killed
_SINKS: dict[tuple[str, str], Any] = {}  # (Ray job, node) -> the RunDirSink actor of this driver process


class RayRunner:
    """Runs a sweep's configs and tune's trials as Ray tasks (see the module doc)."""

    def __init__(self, address: str | None = None, cpus_per_run: float = 1.0, gpus_per_run: float = 0.0,
                 shared_out: bool = False, local_runs: int | None = None, max_retries: int = 3,
                 sync_every: float = 10.0, skip_finished: bool = True):
        """``address``: the cluster to join (``None``: ``$RAY_ADDRESS``, else a local instance sized for
        ``local_runs`` concurrent runs, all CPUs by default). A Ray already initialized in this process
        is used as it is. ``max_retries``: how often a run whose worker died is started again."""
        if importlib.util.find_spec("ray") is None:
            raise ImportError("--runner ray needs Ray: pip install 'diffgym[ray]'")
        if cpus_per_run <= 0:
            raise ValueError(f"cpus_per_run must be > 0, got {cpus_per_run}")
        if gpus_per_run < 0:
            raise ValueError(f"gpus_per_run must be >= 0, got {gpus_per_run}")
        if local_runs is not None and local_runs < 1:
            raise ValueError(f"local_runs must be >= 1, got {local_runs}")
        self.address, self.cpus_per_run, self.gpus_per_run = address, float(cpus_per_run), float(gpus_per_run)
        self.shared_out, self.local_runs, self.max_retries = shared_out, local_runs, max_retries
        self.sync_every, self.skip_finished = sync_every, skip_finished
        # whole CPUs reserved are the run's torch threads; a fraction of a CPU still gets one
        self.threads = max(1, int(self.cpus_per_run))
        # Ray makes the assigned GPUs the only visible ones, so inside the task the run's GPU is "cuda"
        self.run_device: str | None = "cuda" if self.gpus_per_run > 0 else None
        self._local: bool | None = None  # whether we started a local instance (None: Ray was running already)

    # -- the Runner interface -------------------------------------------------------------------------

    def run(self, configs: Sequence[TrainConfig]) -> list[Path]:
        import ray

        for config in configs:
            if not config.run_dir:
                raise ValueError("every config of a sweep needs an explicit run_dir")
            if config.device.startswith("cuda") and not self.gpus_per_run:
                raise ValueError(f"{Path(config.run_dir).name} trains on {config.device} but --gpus-per-run is 0: "
                                 "Ray would give it no GPU")
        todo = [c for c in configs if not (self.skip_finished and is_finished(c))]
        if not todo:
            print(f"sweep: all {len(configs)} runs already finished", flush=True)
            return [Path(c.run_dir) for c in configs]
        where = "copied back to this machine" if not self.shared_out else "written in place (--shared-out)"
        print(f"sweep: {len(configs)} runs, {len(configs) - len(todo)} already finished, {len(todo)} to run on "
              f"Ray, {self.workers} at a time ({self._per_run()} each); outputs {where}", flush=True)
        sink = None if self.shared_out else self._driver_sink()
        trainers = ray.put(_pickled_registrations({c.algo for c in todo}))
        task = ray.remote(_train_task)
        run_dirs = [str(Path(c.run_dir).resolve()) for c in todo]  # workers and the sink do not share our cwd

        def submit(i: int, attempt: int) -> Any:
            config = todo[i]
            config_dict = {**config.to_dict(), **({"device": self.run_device} if self.run_device else {})}
            # the driver's copy, read by the sink after every copy it already received; from now on it
            # drops those of earlier attempts
            seeded = ray.get(sink.begin.remote(run_dirs[i], config.run_dir, attempt)) if sink is not None else {}
            return task.options(**self._task_options(), name=f"train {_name(config)}").remote(
                config_dict, run_dirs[i], attempt, seeded, trainers, sink, self.threads, self.sync_every)

        def settle(done: int, i: int, error: str | None) -> None:
            if sink is not None:
                ray.get(sink.end.remote(run_dirs[i]))
            line = f"{_name(todo[i])} failed: {error}" if error else run_summary(todo[i])
            print(f"[{done}/{len(todo)}] {line}", flush=True)

        failures = self._gather(submit, [_name(c) for c in todo], settle)
        if failures:
            raise SweepFailed(failures, len(configs))
        return [Path(c.run_dir) for c in configs]

    def map(self, work: Callable[..., Any], items: Sequence[tuple],
            report: Callable[[int, Any], str] | None = None, names: Sequence[str] | None = None) -> list[Any]:
        """``work(*item)`` for every item, each a Ray task with the run's resources. ``work`` and the
        items' paths must be usable on the workers (``files_shared_with_workers``)."""
        import ray

        from diffgym.plugins import registered_trainers

        self._connect()
        trainers = ray.put(_pickled_registrations(set(registered_trainers())))  # which ones ``work`` uses is unknown
        task = ray.remote(_call_task).options(**self._task_options())
        results: list[Any] = [None] * len(items)

        def submit(i: int, attempt: int) -> Any:
            return task.remote(work, items[i], trainers, self.threads)

        def settle(done: int, i: int, error: str | None) -> None:
            if report and error is None:
                print(f"[{done}/{len(items)}] {report(i, results[i])}", flush=True)
            elif error:
                print(f"[{done}/{len(items)}] {labels[i]} failed: {error}", flush=True)

        labels = list(names or [f"item {i}" for i in range(len(items))])
        failures = self._gather(submit, labels, settle, results)
        if failures:
            raise SweepFailed(failures, len(items))
        return results

    @property
    def workers(self) -> int:
        """Runs the cluster holds at once with the declared resources (``diffgym tune`` asks this many
        trials at a time)."""
        import ray

        self._connect()
        resources = ray.cluster_resources()
        fits = int(resources.get("CPU", 0) // self.cpus_per_run)
        if self.gpus_per_run:
            fits = min(fits, int(resources.get("GPU", 0) // self.gpus_per_run))
        return max(1, fits)

    @property
    def files_shared_with_workers(self) -> bool:
        """Whether workers see this machine's files: ``--shared-out``, or a local instance (a cluster's
        autoscaler may add nodes at any time)."""
        import ray

        self._connect()
        if self._local is None:  # a Ray this process had initialized already: judge by its nodes now
            return self.shared_out or sum(1 for node in ray.nodes() if node.get("Alive")) <= 1
        return self.shared_out or self._local

    # -- internals --------------------------------------------------------------------------------------

    def _connect(self) -> None:
        import ray

        if ray.is_initialized():
            return
        local = self._local = self.address is None and not os.environ.get("RAY_ADDRESS")
        if local:
            cpus = self.local_runs * self.cpus_per_run if self.local_runs else None
            # a worker process per run: without a dashboard and its agents a local instance stays small
            ray.init(num_cpus=cpus and max(1, int(round(cpus))), include_dashboard=False, log_to_driver=True)
        else:
            ray.init(address=self.address, log_to_driver=True)
        available = ray.cluster_resources()
        for resource, need in (("CPU", self.cpus_per_run), ("GPU", self.gpus_per_run)):
            if need and available.get(resource, 0) < need:
                message = (f"each run asks for {need:g} {resource}(s) but the Ray cluster has "
                           f"{available.get(resource, 0):g}")
                if local:  # nothing will ever add resources to a local instance: the runs would wait forever
                    raise ValueError(message)
                print(f"warning: {message}; runs wait until the cluster grows", file=sys.stderr, flush=True)

    def _per_run(self) -> str:
        return f"{self.cpus_per_run:g} CPU" + (f", {self.gpus_per_run:g} GPU" if self.gpus_per_run else "")

    def _task_options(self) -> dict[str, Any]:
        # the driver retries worker deaths itself (each attempt needs the run directory as it is then);
        # exceptions are the run's own failure and would fail again
        return {"num_cpus": self.cpus_per_run, "num_gpus": self.gpus_per_run, "max_retries": 0,
                "retry_exceptions": False}

    def _driver_sink(self) -> Any:
        """The actor that writes run directories on the driver's node: one per driver process and Ray
        session, shared by its runners (an actor is a Python process to start; it ends with the driver)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        context = ray.get_runtime_context()
        key = (context.get_job_id(), context.get_node_id())
        if key not in _SINKS:
            # the handle is kept here: Ray ends an actor once no handle to it is left
            _SINKS[key] = ray.remote(RunDirSink).options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(key[1], soft=False)).remote()
        return _SINKS[key]

    def _gather(self, submit: Callable[[int, int], Any], names: Sequence[str],
                settle: Callable[[int, int, str | None], None], results: list[Any] | None = None
                ) -> list[tuple[str, str]]:
        """Submit every item (``submit(i, attempt)`` -> ObjectRef) and wait for them all. A worker's death
        starts the item again (``max_retries`` times); an item that raises is recorded, not raised.
        Ctrl-C cancels the outstanding ones."""
        import ray

        refs: dict[Any, tuple[int, int]] = {}
        failures: list[tuple[str, str]] = []
        done = 0

        def start(i: int, attempt: int) -> None:
            nonlocal done
            try:
                refs[submit(i, attempt)] = (i, attempt)
            except ray.exceptions.RayTaskError as failure:  # e.g. its run directory is in use elsewhere
                failures.append((names[i], _one_line(failure)))
                done += 1
                settle(done, i, failures[-1][1])

        try:
            for i in range(len(names)):
                start(i, 1)
            while refs:
                # a timeout keeps the wait short enough for Ctrl-C to be handled promptly
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
                for ref in ready:
                    i, attempt = refs.pop(ref)
                    error = None
                    try:
                        value = ray.get(ref)
                        if results is not None:
                            results[i] = value
                    except (ray.exceptions.RayTaskError, ray.exceptions.TaskCancelledError) as failure:
                        error = _one_line(failure)  # the item's own exception, or cancelled from outside
                    except ray.exceptions.RayError as failure:  # its worker or node died
                        if attempt <= self.max_retries:
                            print(f"{names[i]}: its worker died ({_one_line(failure)}); starting it again from "
                                  f"its last checkpoint (attempt {attempt + 1} of {self.max_retries + 1})",
                                  file=sys.stderr, flush=True)
                            start(i, attempt + 1)
                            continue
                        error = f"its worker died {attempt} times, last: {_one_line(failure)}"
                    if error is not None:
                        failures.append((names[i], error))
                    done += 1
                    settle(done, i, error)
        except KeyboardInterrupt:
            pending = list(refs)
            print(f"\ninterrupted: cancelling {len(pending)} outstanding run(s); running the command again resumes "
                  "them", file=sys.stderr, flush=True)
            for ref in pending:
                ray.cancel(ref)  # a KeyboardInterrupt in the task: it copies its outputs back and stops
            _, stuck = ray.wait(pending, num_returns=len(pending), timeout=_CANCEL_GRACE_S) if pending else ([], [])
            for ref in stuck:
                ray.cancel(ref, force=True)
            raise
        return failures


def _name(config: TrainConfig) -> str:
    return Path(config.run_dir or "").name


def _one_line(failure: BaseException) -> str:
    """A task's failure as ``Type: message`` on one line: the run's own exception, or Ray's reason."""
    import ray

    if isinstance(failure, ray.exceptions.RayTaskError) and failure.cause is not None:
        return one_line_error(failure.cause)
    return one_line_error(failure)  # the worker died more often than max_retries, the task was cancelled, ...


def _pickled_registrations(names: set[str]) -> dict[str, bytes]:
    """The in-process registrations among ``names`` (installed plugins need none), pickled: each is
    unpickled on its own in the worker, so one that cannot be does not take the others with it."""
    from ray import cloudpickle

    from diffgym.plugins import registered_trainers

    registered = registered_trainers()
    pickled = {}
    for name in sorted(names & set(registered)):
        try:
            pickled[name] = cloudpickle.dumps(registered[name])
        except (pickle.PicklingError, TypeError, AttributeError) as error:
            raise ValueError(f"trainer {name!r} is registered in this process only and cannot be sent to Ray "
                             f"workers ({error}); install it as a plugin package") from None
    return pickled


def _register(pickled: dict[str, bytes], needed: str | None = None) -> None:
    """In a worker: register the driver's in-process trainers. One that cannot be unpickled here (its
    class lives in a module the worker cannot import) fails the run that needs it, and is skipped with a
    warning otherwise."""
    from ray import cloudpickle

    from diffgym.plugins import register_trainer

    for name, data in pickled.items():
        try:
            register_trainer(name, cloudpickle.loads(data))
        except Exception as error:
            message = (f"trainer {name!r}, registered in the driver process, cannot be loaded on this worker "
                       f"({type(error).__name__}: {error}); install it as a plugin package")
            if name == needed:
                raise RuntimeError(message) from None
            print(f"warning: {message}", file=sys.stderr, flush=True)


# -- in the worker ---------------------------------------------------------------------------------------


def _call_task(work: Callable[..., Any], item: tuple, trainers: dict[str, bytes], threads: int) -> Any:
    """A Ray task running ``work(*item)`` with the driver's in-process trainer registrations."""
    import torch

    _register(trainers)
    torch.set_num_threads(threads)
    return work(*item)


def _train_task(config_dict: dict, run_dir: str, attempt: int, seeded: dict[str, bytes], trainers: dict[str, bytes],
                sink: Any, threads: int, sync_every: float) -> None:
    """A Ray task training one config: in ``run_dir`` itself (``sink`` None: shared storage), or in a
    scratch directory seeded with the driver's copy (``seeded``), whose outputs the mirror copies back."""
    import ray

    _register(trainers, needed=config_dict["algo"])
    if sink is None:
        train_one({**config_dict, "run_dir": run_dir}, progress=False, threads=threads)
        return
    scratch = Path(tempfile.mkdtemp(prefix=f"diffgym-{Path(run_dir).name}-"))
    try:
        for relative, data in seeded.items():
            (scratch / relative).parent.mkdir(parents=True, exist_ok=True)
            (scratch / relative).write_bytes(data)
        if list_checkpoints(scratch):
            print(f"{Path(run_dir).name}: resuming from {list_checkpoints(scratch)[-1][1].name}", flush=True)

        def send(changes: list[Change], deleted: list[str], wait: bool) -> None:
            sent = sink.write.remote(run_dir, attempt, changes, deleted)
            if wait:  # the last copy: the sink has then applied every earlier one too (same caller, in order)
                ray.get(sent)

        with _Mirror(scratch, send, sync_every):
            train_one({**config_dict, "run_dir": str(scratch)}, progress=False, threads=threads)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _is_output(relative: Path) -> bool:
    """Dotfiles are the run's lock and half-written temp files: never copied."""
    return not any(part.startswith(".") for part in relative.parts)


class _Mirror:
    """Copies a scratch run directory's changes to the driver every ``every`` seconds and when the run
    ends (also when it raises, so a failed run's metrics can be read). Checkpoints: only the newest."""

    def __init__(self, root: Path, send: Callable[[list[Change], list[str], bool], Any], every: float):
        self.root, self.send, self.every = root, send, every
        self._sent = {relative: key for relative, key in self._stats().items()}  # seeded from the driver's copy
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="run-dir-mirror", daemon=True)

    def __enter__(self) -> _Mirror:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sync(last=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sync()

    def _stats(self) -> dict[str, tuple[int, int, int]]:
        stats = {}
        for path in self.root.rglob("*"):
            relative = path.relative_to(self.root)
            try:
                if _is_output(relative) and path.is_file():
                    st = path.stat()
                    stats[relative.as_posix()] = (st.st_ino, st.st_size, st.st_mtime_ns)
            except FileNotFoundError:  # replaced or removed while we looked
                continue
        return stats

    def sync(self, last: bool = False) -> None:
        with self._lock:
            stats = self._stats()
            checkpoints = [p.relative_to(self.root).as_posix() for _, p in list_checkpoints(self.root)]
            # the newest checkpoint first: every metrics row up to it is on disk before it (the trainers
            # log an evaluation, then checkpoint), so the driver never holds a checkpoint without its rows
            order = checkpoints[-1:] + sorted(r for r in stats if r not in checkpoints)
            changes, keys = [], {}
            for relative in order:
                if relative not in stats or stats[relative] == self._sent.get(relative):
                    continue
                previous = self._sent.get(relative)
                # same file grown: send the tail; a new or replaced (atomically renamed) file: all of it
                offset = previous[1] if previous and previous[0] == stats[relative][0] and \
                    stats[relative][1] >= previous[1] else None
                try:
                    with open(self.root / relative, "rb") as handle:
                        st = os.fstat(handle.fileno())
                        handle.seek(offset or 0)
                        data = handle.read(st.st_size - (offset or 0))
                except FileNotFoundError:
                    continue
                changes.append((relative, offset, data))
                keys[relative] = (st.st_ino, (offset or 0) + len(data), st.st_mtime_ns)
            deleted = [relative for relative in self._sent if relative not in stats]
            if changes or deleted or last:
                self.send(changes, deleted, last)
            self._sent.update(keys)
            for relative in deleted:
                del self._sent[relative]


class RunDirSink:
    """A Ray actor on the driver's node that owns the driver's copies of the run directories being
    trained elsewhere: it holds each one's lock (as a local run would), reads its contents for each
    attempt of the run and writes what that attempt's mirror sends."""

    def __init__(self) -> None:
        self._locks: dict[str, Any] = {}
        self._configured: dict[str, str] = {}
        self._attempt: dict[str, int] = {}

    def begin(self, run_dir: str, configured: str, attempt: int) -> dict[str, bytes]:
        """Lock ``run_dir`` (once per run, across attempts) and return its files: an earlier attempt's
        outputs to resume from. Copies from earlier attempts are dropped from now on. ``configured``:
        the run_dir its config.yaml should name."""
        path = Path(run_dir)
        if run_dir not in self._locks:
            path.mkdir(parents=True, exist_ok=True)
            self._locks[run_dir] = lock_run_dir(path)  # RunDirLocked: a local run or another sweep has it
        self._configured[run_dir] = configured
        self._attempt[run_dir] = attempt
        # the newest checkpoint to resume from, and the one before in case it is unreadable
        older = {checkpoint for _, checkpoint in list_checkpoints(path)[:-2]}
        return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*")
                if _is_output(p.relative_to(path)) and p.is_file() and p not in older}

    def write(self, run_dir: str, attempt: int, changes: list[Change], deleted: list[str]) -> None:
        if self._attempt.get(run_dir) != attempt:
            return  # a dead attempt's copy that arrived late, or one after the run ended
        root = Path(run_dir)
        for relative, offset, data in changes:
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            if offset is None:
                if relative == "config.yaml":  # it names the worker's scratch directory
                    config = TrainConfig.from_dict(_yaml_load(data)).replace(run_dir=self._configured[run_dir])
                    replace_atomically(path, config.save)
                else:
                    replace_atomically(path, lambda tmp: tmp.write_bytes(data))
                continue
            if not path.exists() or path.stat().st_size < offset:
                raise RuntimeError(f"{path}: the worker sent bytes from offset {offset}, but the driver's copy "
                                   f"has {path.stat().st_size if path.exists() else 'no'} bytes")
            with open(path, "r+b") as handle:
                handle.seek(offset)
                handle.write(data)
                handle.truncate()
        for relative in deleted:
            (root / relative).unlink(missing_ok=True)

    def end(self, run_dir: str) -> None:
        """The run ended (finished or failed): release its lock."""
        self._attempt.pop(run_dir, None)
        lock = self._locks.pop(run_dir, None)
        if lock is not None:
            lock.close()


def _yaml_load(data: bytes) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(data.decode())

