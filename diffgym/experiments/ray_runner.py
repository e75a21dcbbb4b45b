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

Faults. A run whose worker dies (killed, out of memory, node lost) is retried by Ray (``max_retries``);
the retry starts from the driver's copy of the run directory, so the trainer resumes from the last
checkpoint that reached it. A run that raises is not retried: it is reported by name with its error,
the other runs go on, and :class:`~diffgym.experiments.sweep.SweepFailed` lists the failures at the end.
Ctrl-C cancels the outstanding runs (running ones get a KeyboardInterrupt, copy their outputs back and
stop; runs that do not stop within a few seconds are killed); re-running the command resumes them.

Trainers registered in the driver process only (``diffgym.plugins.register_trainer``: notebooks,
tests) do not exist in Ray's worker processes: the runner sends them along with the runs.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from diffgym.experiments.sweep import SweepFailed, _summary, is_finished, train_one
from diffgym.training.run import _lock, _replace_atomically, list_checkpoints
from diffgym.training.spec import TrainConfig

# (path relative to the run directory, offset, bytes): offset None replaces the file, else the bytes
# are written at offset (the file grew: metrics rows and TensorBoard events are appended)
Change = tuple[str, int | None, bytes]

_CANCEL_GRACE_S = 10.0  # how long cancelled runs get to copy their outputs back before they are killed


class RayRunner:
    """Runs a sweep's configs and tune's trials as Ray tasks (see the module doc)."""

    def __init__(self, address: str | None = None, cpus_per_run: float = 1.0, gpus_per_run: float = 0.0,
                 shared_out: bool = False, local_runs: int | None = None, max_retries: int = 3,
                 sync_every: float = 10.0, skip_finished: bool = True):
        """``address``: the cluster to join (``None``: ``$RAY_ADDRESS``, else a local instance sized for
        ``local_runs`` concurrent runs, all CPUs by default). A Ray already initialized in this process
        is used as it is. ``max_retries``: how often a run whose worker died is started again."""
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ImportError("--runner ray needs Ray: pip install 'diffgym[ray]'") from None
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
        self._sink: Any = None
        self._started_local = False

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
        trainers = {algo: _put_trainer(algo) for algo in sorted({c.algo for c in todo})}
        task = ray.remote(_train_task)
        refs = {}
        for i, config in enumerate(todo):
            run_dir = str(Path(config.run_dir).resolve())  # workers and the sink do not share our cwd
            config_dict = {**config.to_dict(), **({"device": self.run_device} if self.run_device else {})}
            refs[task.options(**self._task_options(), name=f"train {_name(config)}").remote(
                config_dict, run_dir, trainers[config.algo], sink, self.threads, self.sync_every)] = i

        def settle(done: int, i: int, error: str | None) -> None:
            attempts = ray.get(sink.end.remote(str(Path(todo[i].run_dir).resolve()))) if sink is not None else 1
            retried = f" ({attempts} attempts: its worker died)" if attempts > 1 else ""
            line = f"{_name(todo[i])} failed: {error}" if error else _summary(todo[i])
            print(f"[{done}/{len(todo)}] {line}{retried}", flush=True)

        failures = self._gather(refs, [_name(c) for c in todo], settle)
        if failures:
            raise SweepFailed(failures, len(configs))
        return [Path(c.run_dir) for c in configs]

    def map(self, work: Callable[..., Any], items: Sequence[tuple],
            report: Callable[[int, Any], str] | None = None) -> list[Any]:
        """``work(*item)`` for every item, each a Ray task with the run's resources. ``work`` and the
        items' paths must be usable on the workers (``files_shared_with_workers``)."""
        import ray

        from diffgym.plugins import _registered

        self._connect()
        registered = {name: _put_trainer(name) for name in _registered}
        task = ray.remote(_call_task).options(**self._task_options())
        refs = {task.remote(work, item, registered, self.threads): i for i, item in enumerate(items)}
        results: list[Any] = [None] * len(items)

        def settle(done: int, i: int, error: str | None) -> None:
            if report and error is None:
                print(f"[{done}/{len(items)}] {report(i, results[i])}", flush=True)
            elif error:
                print(f"[{done}/{len(items)}] item {i} failed: {error}", flush=True)

        failures = self._gather(refs, [f"item {i}" for i in range(len(items))], settle, results)
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
        """Whether workers see this machine's files: ``--shared-out``, or a one-node (local) cluster."""
        import ray

        self._connect()
        return self.shared_out or sum(1 for node in ray.nodes() if node.get("Alive")) <= 1

    # -- internals --------------------------------------------------------------------------------------

    def _connect(self) -> None:
        import ray

        if ray.is_initialized():
            return
        local = self.address is None and not os.environ.get("RAY_ADDRESS")
        if local:
            cpus = self.local_runs * self.cpus_per_run if self.local_runs else None
            # a worker process per run: without a dashboard and its agents a local instance stays small
            ray.init(num_cpus=cpus and max(1, int(round(cpus))), include_dashboard=False, log_to_driver=True)
            self._started_local = True
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
        # worker deaths are retried (resuming from the run's checkpoint); exceptions are the run's own
        # failure and would fail again
        return {"num_cpus": self.cpus_per_run, "num_gpus": self.gpus_per_run, "max_retries": self.max_retries,
                "retry_exceptions": False}

    def _driver_sink(self) -> Any:
        """The actor that writes run directories on the driver's node (one per runner)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if self._sink is None:
            here = ray.get_runtime_context().get_node_id()
            self._sink = ray.remote(RunDirSink).options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()
        return self._sink

    def _gather(self, refs: dict[Any, int], names: Sequence[str], settle: Callable[[int, int, str | None], None],
                results: list[Any] | None = None) -> list[tuple[str, str]]:
        """Wait for every task; a failed one is recorded, not raised. Ctrl-C cancels the outstanding ones."""
        import ray

        pending, failures, done = list(refs), [], 0
        try:
            while pending:
                # a timeout keeps the wait short enough for Ctrl-C to be handled promptly
                ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for ref in ready:
                    i, done, error = refs[ref], done + 1, None
                    try:
                        value = ray.get(ref)
                        if results is not None:
                            results[i] = value
                    except ray.exceptions.RayError as failure:
                        error = _one_line(failure)
                        failures.append((names[i], error))
                    settle(done, i, error)
        except KeyboardInterrupt:
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

    if isinstance(failure, ray.exceptions.RayTaskError):
        cause = failure.cause if failure.cause is not None else failure
        text = f"{type(cause).__name__}: {cause}"
    else:  # the worker died more often than max_retries, the task was cancelled, ...
        text = f"{type(failure).__name__}: {failure}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(failure).__name__


def _put_trainer(algo: str) -> Any:
    """An in-process registration of ``algo`` put in Ray's object store (``None`` for installed plugins)."""
    import ray

    from diffgym.plugins import _registered

    if algo not in _registered:
        return None
    try:
        return ray.put(_registered[algo])
    except (pickle.PicklingError, TypeError, AttributeError) as error:
        raise ValueError(f"trainer {algo!r} is registered in this process only and cannot be sent to Ray "
                         f"workers ({error}); install it as a plugin package") from None


# -- in the worker ---------------------------------------------------------------------------------------


def _call_task(work: Callable[..., Any], item: tuple, registered: dict[str, Any], threads: int) -> Any:
    """A Ray task running ``work(*item)`` with the driver's in-process trainer registrations."""
    import torch

    from diffgym.plugins import register_trainer

    for name, trainer in registered.items():
        if trainer is not None:
            register_trainer(name, trainer)
    torch.set_num_threads(threads)
    return work(*item)


def _train_task(config_dict: dict, run_dir: str, trainer: Any, sink: Any, threads: int, sync_every: float) -> None:
    """A Ray task training one config: in ``run_dir`` itself (``sink`` None: shared storage), or in a
    scratch copy of the driver's run directory whose outputs the mirror copies back."""
    import ray

    from diffgym.plugins import register_trainer

    if trainer is not None:
        register_trainer(config_dict["algo"], trainer)
    if sink is None:
        train_one({**config_dict, "run_dir": run_dir}, progress=False, threads=threads)
        return
    scratch = Path(tempfile.mkdtemp(prefix=f"diffgym-{Path(run_dir).name}-"))
    try:
        seeded = ray.get(sink.begin.remote(run_dir, config_dict["run_dir"]))
        for relative, data in seeded.items():
            (scratch / relative).parent.mkdir(parents=True, exist_ok=True)
            (scratch / relative).write_bytes(data)
        if list_checkpoints(scratch):
            print(f"{Path(run_dir).name}: resuming from {list_checkpoints(scratch)[-1][1].name}", flush=True)
        mirror = _Mirror(scratch, lambda changes, deleted: ray.get(sink.write.remote(run_dir, changes, deleted)),
                         sync_every)
        with mirror:
            train_one({**config_dict, "run_dir": str(scratch)}, progress=False, threads=threads)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _is_output(relative: Path) -> bool:
    """Dotfiles are the run's lock and half-written temp files: never copied."""
    return not any(part.startswith(".") for part in relative.parts)


class _Mirror:
    """Copies a scratch run directory's changes to the driver every ``every`` seconds and when the run
    ends (also when it raises, so a failed run's metrics can be read). Checkpoints: only the newest."""

    def __init__(self, root: Path, send: Callable[[list[Change], list[str]], Any], every: float):
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
        self.sync()

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

    def sync(self) -> None:
        with self._lock:
            stats = self._stats()
            checkpoints = [p.relative_to(self.root).as_posix() for _, p in list_checkpoints(self.root)]
            # the newest checkpoint first: every metrics row up to it is on disk before it (the trainers
            # log an evaluation, then checkpoint), so the driver never holds a checkpoint without its rows
            order = checkpoints[-1:] + sorted(r for r in stats if r not in checkpoints)
            changes, keys = [], {}
            for relative in order:
                if stats[relative] == self._sent.get(relative):
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
            if changes or deleted:
                self.send(changes, deleted)
            self._sent.update(keys)
            for relative in deleted:
                del self._sent[relative]


class RunDirSink:
    """A Ray actor on the driver's node that owns the driver's copies of the run directories being
    trained elsewhere: it holds each one's lock (as a local run would), hands its contents to the
    run's (re)started task and writes what the task's mirror sends."""

    def __init__(self) -> None:
        self._locks: dict[str, Any] = {}
        self._configured: dict[str, str] = {}
        self._attempts: dict[str, int] = {}

    def begin(self, run_dir: str, configured: str) -> dict[str, bytes]:
        """Lock ``run_dir`` (once per run, across retries) and return its files: an earlier attempt's
        outputs to resume from. ``configured``: the run_dir its config.yaml should name."""
        path = Path(run_dir)
        if run_dir not in self._locks:
            path.mkdir(parents=True, exist_ok=True)
            self._locks[run_dir] = _lock(path)  # RunDirLocked: a local run or another sweep has it
        self._configured[run_dir] = configured
        self._attempts[run_dir] = self._attempts.get(run_dir, 0) + 1
        return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*")
                if _is_output(p.relative_to(path)) and p.is_file()}

    def write(self, run_dir: str, changes: list[Change], deleted: list[str]) -> None:
        root = Path(run_dir)
        for relative, offset, data in changes:
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            if offset is None:
                if relative == "config.yaml":  # it names the worker's scratch directory
                    config = TrainConfig.from_dict(_yaml_load(data)).replace(run_dir=self._configured[run_dir])
                    _replace_atomically(path, config.save)
                else:
                    _replace_atomically(path, lambda tmp: tmp.write_bytes(data))
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

    def end(self, run_dir: str) -> int:
        """The run ended (finished or failed): release its lock; how many attempts it took."""
        lock = self._locks.pop(run_dir, None)
        if lock is not None:
            lock.close()
        return self._attempts.pop(run_dir, 1)


def _yaml_load(data: bytes) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(data.decode())

