"""Run outputs, identical for every trainer: ``runs/<run-name>/`` holds

* ``config.yaml``: the :class:`~diffgym.training.spec.TrainConfig` (with the resolved ``run_dir``);
* TensorBoard event files (every logged scalar, x-axis = env steps);
* ``metrics.jsonl``: one JSON object per :meth:`Run.log` call with ``env_steps``, ``grad_steps``,
  ``wall_time`` (seconds since the run started), ``eval_wall_time`` (of those, the seconds spent inside
  :meth:`Run.evaluating`: evaluations and the checkpoints saved with them) and the logged scalars
  (evaluation rows carry ``eval_return`` and ``eval_success_rate``);
* ``checkpoints/step_<env_steps>.pt``: whatever dict the trainer saves; the newest
  ``config.keep_checkpoints`` of them and those at the evaluations a report reads are kept
  (:meth:`Run.save_checkpoint`);
* ``.lock``: the pid of the process that has the directory open.

A run directory is safe to re-run into:

* **One writer.** :class:`Run` holds an exclusive advisory lock (``flock``) on ``.lock`` while open; a
  second ``Run`` on the directory fails with :class:`RunDirLocked` naming the holder's pid. The OS drops
  the lock when its process dies, however it dies, so a dead run's lock is simply taken over.
* **Same run.** A directory that holds results is only continued with the config it was started with;
  the budget (``total_env_steps``), the evaluation cadence and episodes may change
  (:data:`RESUMABLE_CHANGES`). Anything else raises :class:`ConfigMismatch` listing the differences
  (only the algorithm's, when another trainer made the run).
* **A directory.** A ``run_dir`` that is a file, lies under one, or cannot be created raises
  :class:`UnusableRunDir`, one line (:func:`check_run_dir`).
* **Nothing lost.** ``config.yaml``, ``metrics.jsonl`` and checkpoints are replaced atomically (a
  uniquely named temp file, then a rename), with the mode ``open(path, "w")`` would give them.
  ``metrics.jsonl`` is left alone until the trainer either resumes (:meth:`Run.resume_from` keeps the
  rows up to its checkpoint) or logs its first row of a fresh start, so a resume that fails or is killed
  leaves the earlier rows in place. A fresh start (no :meth:`Run.resume_from` before its first row or
  checkpoint) into a directory holding an earlier attempt's checkpoints moves them, with that attempt's
  ``metrics.jsonl``, into ``checkpoints/discarded-<YYYYmmdd-HHMMSS>/`` and says so in one
  :class:`CheckpointWarning`: the new run's checkpoints and metrics never mix with a dead attempt's.
* **Corrupt checkpoints.** :meth:`Run.load_latest_checkpoint` skips an unreadable checkpoint with a
  :class:`CheckpointWarning` naming it, sets it aside as ``*.pt.corrupt`` and loads the previous one.
* **No code from files.** Checkpoints are read with ``torch.load(weights_only=True)`` (:func:`load_checkpoint`):
  tensors and plain data only, so a run directory from someone else cannot run code when it is resumed
  or its policy loaded. A checkpoint that would need unpickling anything else is refused with
  :class:`UnsafeCheckpointError` (one line naming the file), never set aside or skipped. So that none is
  written, :meth:`Run.save_checkpoint` refuses such an object before writing it (``TypeError``, one line
  naming the entry).

While training, a tqdm progress bar counts env steps and shows env steps per second. Every run prints
``run directory: <dir>`` when it opens, and a continued one where it resumes from (``resuming from N env
steps``, or ``already finished`` when its checkpoint is at the budget).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import pickle
import re
import secrets
import stat
import sys
import time
import warnings
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from diffgym.training.spec import TrainConfig

try:
    import fcntl
except ImportError:  # Windows: the standard library has no advisory whole-file lock
    fcntl = None  # type: ignore[assignment]

RESUMABLE_CHANGES = frozenset({"total_env_steps", "eval_every_env_steps", "eval_schedule", "eval_first_env_steps",
                               "eval_growth", "eval_episodes", "run_dir", "keep_checkpoints"})
"""Top-level config fields a run may change when it continues in its run directory."""
SUCCESS_THRESHOLD = 0.9
"""A run has solved its task at its first evaluation whose success rate reaches this (``docs/protocol.md``)."""
_LOCK = ".lock"
_TMP_SUFFIX = ".tmp"


class RunDirError(RuntimeError):
    """A run directory cannot be used as asked; the message is one line that says why."""


class RunDirLocked(RunDirError):
    """Another live process has the run directory open."""


class ConfigMismatch(RunDirError):
    """The run directory holds a run with another config."""


class UnusableRunDir(RunDirError, ValueError):
    """A ``run_dir`` that is not, and cannot become, a directory a run can write in. A ``ValueError`` as
    well, since it is a bad value in the config."""


class CheckpointWarning(UserWarning):
    """An unreadable checkpoint was skipped, or a fresh start set an earlier attempt's checkpoints aside."""


class UnsafeCheckpointError(RunDirError, ValueError):
    """A checkpoint holding more than tensors and plain data: loading it would unpickle objects, which
    can run code from the file. A :class:`RunDirError` so a refused resume is reported in one line like
    the other run-directory errors, and a ``ValueError`` so callers of ``load_policy`` that handle a bad
    checkpoint handle this one too."""


_RESUME_REFUSED = ("; resuming reads tensors and plain data only, so this run cannot be continued: train "
                   "into another run_dir (diffgym eval/export --legacy-checkpoint read the policy of an older run)")

_CHECKPOINT = re.compile(r"step_(\d+)\.pt$")

def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(env_steps, path)`` of a run directory's ``checkpoints/step_<env_steps>.pt``, oldest first."""
    found = [(int(m.group(1)), p) for p in (Path(run_dir) / "checkpoints").glob("step_*.pt")
             if (m := _CHECKPOINT.search(p.name))]
    return sorted(found)


class LegacyObject:
    """What :func:`load_checkpoint` with ``legacy=True`` builds in place of any class or function a file
    names (beyond NumPy's data): it only keeps the arguments and state it was given, so nothing from the
    file runs."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _legacy_globals(path: str | Path) -> list[Any]:
    """The weights-only reader's extra allowlist for an older checkpoint: NumPy's arrays, scalars and
    dtypes as themselves (torch's documented data-only set), every other global the file names as a
    :class:`LegacyObject` stand-in."""
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    numpy_data = {f"{module}.{name}": getattr(multiarray.multiarray, name)
                  for module in ("numpy._core.multiarray", "numpy.core.multiarray") for name in ("_reconstruct", "scalar")}
    numpy_data.update({"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype})
    dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [(numpy_data.get(name, LegacyObject), name) for name in _pickled_globals(path, pickle.UnpicklingError())] \
        + dtypes


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", legacy: bool = False,
                    advice: str = "") -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings, ``None`` and lists, tuples and
    dicts of them; nothing in the file can run code. A file that needs anything else unpickled raises
    :class:`UnsafeCheckpointError`, one line naming the file and what it would unpickle, then ``advice``.
    Other read errors (a truncated or foreign file) propagate as ``torch.load`` raises them.

    ``legacy=True`` also reads checkpoints written before they became weights-only (older PPO runs, with
    SB3's NumPy values): still weights-only, with NumPy's arrays, scalars and dtypes allowed and every other
    class or function the file names replaced by an inert :class:`LegacyObject`, so nothing from the file
    runs either; the policy's tensors and config come through unchanged."""
    if legacy:
        with torch.serialization.safe_globals(_legacy_globals(path)):
            return torch.load(path, map_location=map_location, weights_only=True)
    try:
        with warnings.catch_warnings():
            # a plain pickle.dump file: the weights-only unpickler notes its protocol, then refuses it below
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        names = _pickled_globals(path, error)
        if not names:  # opcodes the weights-only reader does not know: a damaged file, not a refused one
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            detail = next((line for line in reversed(lines) if not line.startswith("Check the documentation")), "")
            raise pickle.UnpicklingError(f"damaged pickle data ({detail})") from None
        what = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        # torch's message is many lines about torch versions; ours is one
        raise UnsafeCheckpointError(f"{path}: not a weights-only checkpoint: loading it would unpickle {what}, "
                                    f"which can run code from the file{advice}") from None


def _pickled_globals(path: str | Path, error: pickle.UnpicklingError) -> list[str]:
    """The classes and functions the file would import when unpickled, i.e. why the weights-only reader
    refused it: read from a ``torch.save`` zip file's pickle opcodes (nothing executed), else from the
    refusal of an older-format file; empty when the refusal was not about one (a damaged file)."""
    find = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    try:
        names = list(find(path)) if find is not None else []
    except Exception:  # not a zip file: torch's legacy format
        names = []
    return names or re.findall(r"unsupported GLOBAL (\S+)", str(error))


_LOG_HOOKS: list[Callable[[int, dict[str, float]], None]] = []


EVALUATION_TAGS = {"eval_return": "eval/return", "eval_return_std": "eval/return_std",
                   "eval_success_rate": "eval/success_rate", "eval_episode_length": "eval/episode_length"}
"""TensorBoard tags of the evaluation protocol's scalars (``evaluate_policy``'s keys). A trainer maps its
own names onto the shared tags of ``docs/protocol.md`` (``policy/std``, ``losses/*``, ``rollout/*``)
through :attr:`Run.tensorboard_tags`; ``metrics.jsonl`` keeps every name as logged."""


@contextlib.contextmanager
def log_hook(hook: Callable[[int, dict[str, float]], None]) -> Iterator[None]:
    """Call ``hook(env_steps, scalars)`` after every :meth:`Run.log` row written in this process while
    the context is open, whatever the trainer. An exception raised by the hook propagates out of the
    trainer's ``train`` (after the row is on disk): ``diffgym tune`` stops pruned trials this way."""
    _LOG_HOOKS.append(hook)
    try:
        yield
    finally:
        _LOG_HOOKS.remove(hook)


_RUN_WATCHERS: list[list[Run]] = []


@contextlib.contextmanager
def watch_runs() -> Iterator[list[Run]]:
    """A list that collects every :class:`Run` opened in this process while the context is open, in
    order, whatever the trainer: ``diffgym train`` names an interrupted run's directory and progress
    from it."""
    opened: list[Run] = []
    _RUN_WATCHERS.append(opened)
    try:
        yield opened
    finally:
        _RUN_WATCHERS.remove(opened)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (``path`` is the file or the run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluation_milestones(rows: Sequence[Mapping[str, Any]], threshold: float = SUCCESS_THRESHOLD) -> dict[str, int]:
    """The env steps of the evaluations a report singles out among a run's metrics ``rows``: ``solved``,
    the first whose success rate reaches ``threshold`` (the report's cost to solve), and ``best``, the
    highest success rate, ties to the higher return and then the earlier one (the policy to pick).
    Their checkpoints are never deleted (:meth:`Run.save_checkpoint`)."""
    evals = [row for row in rows if "eval_success_rate" in row]
    if not evals:
        return {}
    milestones = {"best": int(max(evals, key=lambda row: (float(row["eval_success_rate"]),
                                                           float(row.get("eval_return", -math.inf)),
                                                           -int(row["env_steps"])))["env_steps"])}
    solved = [row for row in evals if float(row["eval_success_rate"]) >= threshold]
    if solved:
        milestones["solved"] = int(solved[0]["env_steps"])
    return milestones


def default_run_dir(config: TrainConfig, root: str | Path = "runs") -> Path:
    """``runs/<algo>__<task>__s<seed>__<YYYYmmdd-HHMMSS>``."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{config.algo}__{config.task_name}__s{config.seed}__{stamp}"


FIELDS_ADDED_EMPTY = ("randomize", "eval_randomize", "wrappers")
"""``TrainConfig`` fields added after runs were first saved, whose default (empty: none) is what every run
saved before them did: a saved config without them is read as holding ``{}``."""


def config_differences(saved: Mapping[str, Any], requested: Mapping[str, Any],
                       ignore: frozenset[str] = RESUMABLE_CHANGES) -> list[str]:
    """``"key (old -> new)"`` for every dotted config key whose value differs (top-level ``ignore`` keys
    excepted), in the config's field order; both sides are ``TrainConfig.to_dict()`` mappings. A mapping
    that is empty on one side reads as one change of the whole mapping (``randomize ({'mass': [0.5, 2.0]}
    -> {})``); only where both sides have entries are they compared key by key (``randomize.mass ...``)."""
    return [change for key in dict.fromkeys([*requested, *saved]) if key not in ignore
            for change in _value_differences(key, saved.get(key, _UNSET), requested.get(key, _UNSET))]


_UNSET = "<unset>"
"""How a key one side of a config comparison lacks is shown."""


def _value_differences(key: str, old: Any, new: Any) -> list[str]:
    """:func:`config_differences` of one dotted key's values."""
    if isinstance(old, Mapping) and isinstance(new, Mapping) and old and new:
        return [change for name in dict.fromkeys([*new, *old])
                for change in _value_differences(f"{key}.{name}", old.get(name, _UNSET), new.get(name, _UNSET))]
    return [] if old == new else [f"{key} ({old!r} -> {new!r})"]


class Run:
    """The output directory of one training run; use as a context manager or call :meth:`close`.

    Opening it locks the directory and checks an earlier run's config there (see the module doc). A
    trainer that continues from :meth:`load_latest_checkpoint` calls :meth:`resume_from` before logging;
    otherwise its first :meth:`log` starts the metrics afresh.
    """

    def __init__(self, config: TrainConfig, progress: bool = True,
                 upgrade_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
        """``upgrade_config``: how the trainer reads a config mapping an earlier version of it saved (in
        ``config.yaml`` or a checkpoint) in today's format, before it is compared with ``config``."""
        self._upgrade_config = upgrade_config
        self.tensorboard_tags: dict[str, str] = dict(EVALUATION_TAGS)
        """Logged name -> TensorBoard tag; trainers add their own names' shared tags (``docs/protocol.md``)."""
        if config.run_dir:
            run_dir = Path(config.run_dir)
            check_run_dir(run_dir)
            _make_run_dir(run_dir, exist_ok=True)
        else:
            run_dir = _new_run_dir(config)
        self.config = config.replace(run_dir=str(run_dir))
        self.dir = run_dir
        self.checkpoint_dir = run_dir / "checkpoints"
        self.metrics_path = run_dir / "metrics.jsonl"
        self._lock = lock_run_dir(run_dir)
        try:
            self._check_saved_config()
            self.checkpoint_dir.mkdir(exist_ok=True)
            # temp files of a process killed mid-write; nobody else writes here while we hold the lock
            for stale in [*run_dir.glob(f".*{_TMP_SUFFIX}"), *self.checkpoint_dir.glob(f".*{_TMP_SUFFIX}")]:
                stale.unlink(missing_ok=True)
            replace_atomically(run_dir / "config.yaml", self.config.save)
        except BaseException:
            self._lock.close()
            raise
        self.env_steps = 0
        """The env steps reached so far (what :meth:`progress`, :meth:`log` and :meth:`resume_from` saw)."""
        _announce(f"run directory: {run_dir}")  # at the start, so an interrupted run can be found
        for opened in _RUN_WATCHERS:
            opened.append(self)
        # metrics.jsonl and the TensorBoard writer are opened by resume_from() or the first log(): until
        # then an earlier attempt's rows stay on disk untouched
        self._metrics: IO[str] | None = None
        self.writer: Any = None
        self._start = time.perf_counter()
        self._eval_time: float | None = 0.0  # seconds inside evaluating(); None: unknown (see resume_from)
        self._eval_started: float | None = None
        self._bar = tqdm(total=config.total_env_steps, unit="step", unit_scale=True, dynamic_ncols=True,
                         desc=f"{config.algo} {config.task_name}", disable=not progress)
        self._closed = False

    @property
    def wall_time(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self._start

    @property
    def eval_wall_time(self) -> float | None:
        """Of :attr:`wall_time`, the seconds spent inside :meth:`evaluating` so far (an evaluation under
        way counted up to now); ``None`` where that is unknown: a run resumed from rows that did not record
        it, or one that logged an evaluation row outside :meth:`evaluating`."""
        return self._clock()[1]

    def _clock(self) -> tuple[float, float | None]:
        """``(wall_time, eval_wall_time)`` from one reading of the clock."""
        now = time.perf_counter()
        if self._eval_time is None:
            return now - self._start, None
        running = 0.0 if self._eval_started is None else now - self._eval_started
        return now - self._start, self._eval_time + running

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Count the time inside as evaluation time (``eval_wall_time``): the protocol's measurements and
        the checkpoints saved with them, which a report can leave out of the training wall-clock
        (``wall_time - eval_wall_time``) since how often a run is evaluated is the protocol's choice, not
        the algorithm's. Nested blocks count once."""
        if self._eval_started is not None:
            yield
            return
        self._eval_started = time.perf_counter()
        try:
            yield
        finally:
            elapsed, self._eval_started = time.perf_counter() - self._eval_started, None
            if self._eval_time is not None:
                self._eval_time += elapsed

    def progress(self, env_steps: int) -> None:
        """Advance the progress bar to ``env_steps`` without logging anything."""
        self.env_steps = max(self.env_steps, int(env_steps))
        if self._bar.total is not None and env_steps > self._bar.total:  # the last vector step may overshoot
            self._bar.total = int(env_steps)
        self._bar.update(max(0, int(env_steps) - self._bar.n))

    def log(self, env_steps: int, grad_steps: int, **scalars: float) -> None:
        """Record scalars at ``env_steps``: a ``metrics.jsonl`` row, TensorBoard scalars, the progress bar."""
        if self._metrics is None:  # no resume_from(): a fresh start replaces any earlier attempt's records
            self._start_afresh()
        assert self._metrics is not None and self.writer is not None
        if "eval_success_rate" in scalars and self._eval_started is None and self._eval_time is not None:
            # an evaluation timed as training (a trainer that does not use evaluating()): from here on the
            # split is unknown, and the rows say so by leaving it out
            self._eval_time = None
            warnings.warn(f"{self.dir}: an evaluation row was logged outside Run.evaluating(), so this run's "
                          "training wall-clock (without evaluations) is unknown from here on; evaluate inside "
                          "`with run.evaluating():` (docs/plugins.md)", stacklevel=2)
        wall_time, eval_wall_time = self._clock()
        row: dict[str, Any] = {"env_steps": int(env_steps), "grad_steps": int(grad_steps),
                               "wall_time": round(wall_time, 3)}
        if eval_wall_time is not None:
            row["eval_wall_time"] = round(eval_wall_time, 3)
        from tensorboard.compat.proto.summary_pb2 import Summary  # late, as SummaryWriter (_open_records)

        values = []
        for name, value in scalars.items():
            value = float(value)
            row[name] = value if math.isfinite(value) else str(value)  # JSON has no NaN/inf
            values.append(Summary.Value(tag=self.tensorboard_tags.get(name, name), simple_value=value))
        values.append(Summary.Value(tag="progress/grad_steps", simple_value=float(grad_steps)))
        # one event per row, not one per scalar (each event has a fixed cost in the writer, and APG logs a
        # row per update: docs/benchmarks.md, fifth round); built as `add_scalar` builds each (same tags,
        # float32 values and step) for the file writer `add_scalar` uses (torch's private `_get_file_writer`)
        self.writer._get_file_writer().add_summary(Summary(value=values), int(env_steps), time.time())
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        self.progress(env_steps)
        shown = {k: f"{v:.3g}" for k, v in scalars.items() if k in ("eval_return", "eval_success_rate")}
        if shown:
            self._bar.set_postfix(shown, refresh=False)
        for hook in list(_LOG_HOOKS):
            hook(int(env_steps), {k: float(v) for k, v in scalars.items()})

    def save_checkpoint(self, obj: dict[str, Any], env_steps: int) -> Path:
        """Save ``obj`` with ``torch.save`` as ``checkpoints/step_<env_steps>.pt`` (atomic replace), then
        delete the checkpoints the run no longer needs: all but the newest ``config.keep_checkpoints``
        (0: none is deleted) and those at the evaluation milestones of :func:`evaluation_milestones`.
        The newest few are what a resume needs (the latest it can continue from, and earlier ones if that
        one is unreadable: PPO's alternate with policy-only snapshots, so the default 4 holds at least two
        it can resume from); reports read ``metrics.jsonl`` only.

        ``obj`` must load weights-only (:func:`load_checkpoint`): tensors and plain Python values, in dicts,
        lists and tuples; anything else raises ``TypeError`` naming its entry, before anything is written.
        A first checkpoint without :meth:`resume_from` is a fresh start, as a first :meth:`log` is."""
        check_weights_only(obj)
        if self._metrics is None:
            self._start_afresh()
        path = self.checkpoint_dir / f"step_{int(env_steps):012d}.pt"
        replace_atomically(path, lambda tmp: torch.save(obj, tmp))
        keep = int(self.config.keep_checkpoints)
        older = list_checkpoints(self.dir)[:-keep] if keep > 0 else []
        if older:
            milestones = set(evaluation_milestones(self.read_metrics()).values())
            for steps, old in older:
                if steps not in milestones:
                    old.unlink(missing_ok=True)
        return path

    def load_latest_checkpoint(self, require: Sequence[str] = ()) -> dict[str, Any] | None:
        """The readable checkpoint with the most env steps that has every key in ``require``, or ``None``
        when there is none. (``require`` passes over snapshots a trainer cannot resume from, e.g. PPO's
        policy-only ones taken mid-rollout.)

        Unreadable ones after it are reported (:class:`CheckpointWarning`) and set aside as
        ``*.pt.corrupt``; when none is readable, :class:`RunDirError` is raised and nothing is moved. A
        checkpoint saved under another config (its ``config`` entry) raises :class:`ConfigMismatch`.
        Checkpoints are loaded weights-only (:func:`load_checkpoint`): one that would need unpickling
        raises :class:`UnsafeCheckpointError` and nothing is resumed or moved.
        """
        found = list_checkpoints(self.dir)
        unreadable: list[Path] = []
        for _, path in reversed(found):
            try:
                saved = load_checkpoint(path, advice=_RESUME_REFUSED)
                if not isinstance(saved, dict):
                    raise TypeError(f"expected a dict, got {type(saved).__name__}")
            except UnsafeCheckpointError:
                raise  # not damage: falling back past it would hide that the run holds such a file
            except Exception as error:  # truncated zip, bad pickle, ...: whatever torch.load raises
                warnings.warn(f"{path}: unreadable checkpoint ({type(error).__name__}: {one_line(error)}); "
                              "trying the previous one", CheckpointWarning, stacklevel=2)
                unreadable.append(path)
                continue
            if not all(key in saved for key in require):
                continue
            for bad in unreadable:
                os.replace(bad, bad.with_name(bad.name + ".corrupt"))
            if "config" in saved:
                self._refuse_other_config(saved["config"], path)
            return saved
        if unreadable:
            raise RunDirError(f"{self.checkpoint_dir}: no readable checkpoint to resume from ({len(unreadable)} "
                              "unreadable); delete them (or the run directory) to start this run afresh")
        return None

    def resume_from(self, env_steps: int) -> None:
        """Continue an earlier attempt from its checkpoint at ``env_steps``: keep its metrics rows up to
        there (rewritten atomically), hide its later TensorBoard points, and continue its wall-clock, so a
        resumed run records the same axes as an uninterrupted one. Call it before the first :meth:`log`."""
        if self._metrics is not None:
            raise RuntimeError("resume_from() must be called before the first log()")
        kept = [row for row in self._earlier_rows() if row["env_steps"] <= env_steps]
        self._open_records(kept, purge_step=int(env_steps) + 1)
        if kept:
            self._start -= float(kept[-1]["wall_time"])
            # rows written before evaluation time was recorded: the training wall-clock stays unknown
            earlier = kept[-1].get("eval_wall_time")
            self._eval_time = None if earlier is None else float(earlier)
        self.progress(env_steps)
        budget = self.config.total_env_steps
        _announce(f"already finished: {env_steps} of {budget} env steps (raise total_env_steps to continue it)"
                  if env_steps >= budget else f"resuming from {env_steps} env steps (of {budget})")

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every row of ``metrics.jsonl`` so far."""
        if self._metrics is not None:
            self._metrics.flush()
        return read_metrics(self.metrics_path) if self.metrics_path.exists() else []

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._bar.close()
        if self.writer is not None:
            self.writer.close()
        if self._metrics is not None:
            self._metrics.close()
        self._lock.close()  # releases the flock

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------------- internals
    def _holds_results(self) -> bool:
        return bool(list_checkpoints(self.dir)) or (self.metrics_path.exists() and self.metrics_path.stat().st_size > 0)

    def _check_saved_config(self) -> None:
        saved_path = self.dir / "config.yaml"
        if not saved_path.exists() or not self._holds_results():
            return  # nothing to continue (the checkpoints' own configs are checked when one is loaded)
        try:
            saved = TrainConfig.load(saved_path).to_dict()
        except Exception as error:
            raise RunDirError(f"{saved_path}: cannot read the run's saved config ({one_line(error)}); "
                              "choose another run_dir") from None
        self._refuse_other_config(saved, saved_path)

    def _refuse_other_config(self, saved: Mapping[str, Any], source: Path) -> None:
        saved = self._in_todays_format(saved)
        if saved.get("algo") != self.config.algo:  # another trainer's settings differ in everything: say why
            raise ConfigMismatch(f"{self.dir} holds a run with another config ({source.name} differs in algo "
                                 f"({saved.get('algo', _UNSET)!r} -> {self.config.algo!r})); continue it with "
                                 "its own config or choose another run_dir")
        # fields added since runs were first saved held their (empty) defaults before they existed; any other
        # missing field stays a difference, so a later change of a default cannot pass unseen
        saved = {**{name: {} for name in FIELDS_ADDED_EMPTY if name not in saved}, **saved}
        differences = config_differences(saved, self.config.to_dict())
        if differences:
            raise ConfigMismatch(f"{self.dir} holds a run with another config ({source.name} differs in "
                                 f"{', '.join(differences)}); continue it with its own config or choose "
                                 "another run_dir")

    def _in_todays_format(self, saved: Mapping[str, Any]) -> Mapping[str, Any]:
        """``saved`` read by the trainer's ``upgrade_config`` when it is the trainer's own run: one of its
        algo, or one the upgrade renames to it (an older name, e.g. apg's first-format proximal runs, now
        apg-ppo's). Another trainer's config is returned as it is, since the upgrade cannot read its
        settings (it would refuse them, hiding that the algo differs)."""
        if self._upgrade_config is None:
            return saved
        if saved.get("algo") == self.config.algo:
            return self._upgrade_config(dict(saved))
        try:
            upgraded = self._upgrade_config(dict(saved))
        except (KeyError, TypeError, ValueError):
            return saved
        return upgraded if upgraded.get("algo") == self.config.algo else saved

    def _earlier_rows(self) -> list[dict[str, Any]]:
        """An earlier attempt's rows; a line it was killed while writing is dropped with a warning."""
        if not self.metrics_path.exists():
            return []
        rows = []
        for number, line in enumerate(self.metrics_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                int(row["env_steps"])
            except (ValueError, TypeError, KeyError):
                warnings.warn(f"{self.metrics_path}:{number}: unreadable metrics row dropped", CheckpointWarning,
                              stacklevel=3)
                continue
            rows.append(row)
        return rows

    def _start_afresh(self) -> None:
        """Begin a fresh start's records: an earlier attempt's checkpoints (the trainer did not resume from
        them) are moved aside with its metrics, so pruning by step, ``diffgym eval`` and a later resume see
        only this run's; then ``metrics.jsonl`` starts empty."""
        earlier = [path for pattern in ("step_*.pt", "step_*.pt.corrupt")
                   for path in self.checkpoint_dir.glob(pattern)]
        if earlier:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            names = itertools.chain([f"discarded-{stamp}"], (f"discarded-{stamp}-{n}" for n in itertools.count(2)))
            aside = next(folder for folder in map(self.checkpoint_dir.joinpath, names) if not folder.exists())
            aside.mkdir()  # we hold the run's lock: nobody else creates it meanwhile
            for path in earlier:
                os.replace(path, aside / path.name)
            if self.metrics_path.exists():
                os.replace(self.metrics_path, aside / self.metrics_path.name)
            warnings.warn(f"{self.dir}: the trainer started afresh instead of resuming, so the earlier attempt's "
                          f"{len(earlier)} checkpoint(s) and metrics were moved to {aside}", CheckpointWarning,
                          stacklevel=3)
        self._open_records([], purge_step=0)

    def _open_records(self, rows: list[dict[str, Any]], purge_step: int) -> None:
        """Atomically replace ``metrics.jsonl`` by ``rows`` and open it for appending; open TensorBoard.

        ``purge_step``: an earlier attempt's TensorBoard points at or after it are hidden (TensorBoard
        drops them when it reads the restart marker), so no point is shown twice."""
        replace_atomically(self.metrics_path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))
        self._metrics = self.metrics_path.open("a")
        from torch.utils.tensorboard import SummaryWriter  # imported late: it pulls in TensorBoard

        earlier = any(self.dir.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=purge_step if earlier else None)


_PLAIN_VALUES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
"""Leaf types ``torch.load(weights_only=True)`` reads (exact types: a subclass is pickled by its class)."""


def check_weights_only(obj: Any, where: str = "") -> None:
    """Raise ``TypeError`` naming the first entry of ``obj`` that a weights-only load would refuse
    (:func:`load_checkpoint`), so a checkpoint that could not be read back is refused when it is saved.
    A walk over the types, since checkpoints are saved at every evaluation; a value of any type it does not
    know (a tensor subclass such as ``nn.Parameter``, an ``OrderedDict``) is tried exactly: saved to memory
    and loaded back weights-only."""
    kind = type(obj)
    if kind is torch.Tensor or kind in _PLAIN_VALUES:
        return
    if kind in (dict, OrderedDict):
        for key, value in obj.items():
            check_weights_only(key, f"{where} key {key!r}".strip())
            check_weights_only(value, f"{where}.{key}" if where else str(key))
        return
    if kind in (list, tuple):
        for index, value in enumerate(obj):
            check_weights_only(value, f"{where}[{index}]")
        return
    buffer = io.BytesIO()
    try:
        torch.save(obj, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception:
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        advice = ("convert it with torch.as_tensor" if kind.__module__.split(".")[0] == "numpy"
                  else "save its state (tensors and plain values, e.g. a state_dict()) instead")
        entry = f"checkpoint entry {where!r}" if where else "the checkpoint"
        raise TypeError(f"{entry} is a {name}: checkpoints hold tensors and plain Python values only "
                        f"(weights-only loading); {advice}") from None


def _announce(line: str) -> None:
    """A line on stdout that leaves any progress bar intact."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def one_line(error: BaseException) -> str:
    """``str(error)`` on one line (its whitespace runs collapsed), or its type's name when it says nothing:
    for the one-line errors that name a file which could not be read."""
    return " ".join(str(error).split()) or type(error).__name__


def _new_run_dir(config: TrainConfig) -> Path:
    """Create ``default_run_dir(config)``, or ``<it>-2``, ``-3``, ... when runs start within one second
    (``mkdir`` is atomic: two processes never get the same directory)."""
    base = default_run_dir(config)
    check_run_dir(base)
    for attempt in itertools.count(1):
        candidate = base if attempt == 1 else base.with_name(f"{base.name}-{attempt}")
        try:
            _make_run_dir(candidate, exist_ok=False)
            return candidate
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def check_run_dir(run_dir: str | Path) -> None:
    """Raise :class:`UnusableRunDir`, one line that starts with the path, when ``run_dir`` cannot be a run
    directory: it is a file, a file stands where a directory above it would be made, or the nearest
    existing directory is not writable. Nothing is created, so a command can check its arguments with it
    before any work; what only creating it shows (a filesystem that refuses) :class:`Run` reports alike."""
    path = Path(run_dir)
    try:
        if path.exists() and not path.is_dir():
            raise UnusableRunDir(f"{path} is a file, not a directory" if path.is_file()
                                 else f"{path} is not a directory")
        nearest = next(p for p in (path, *path.parents) if p.exists())  # exists() is False under a file
        if not nearest.is_dir():
            raise UnusableRunDir(f"{path} cannot be created: {nearest} is not a directory")
    except OSError as error:  # e.g. a directory above it that may not be searched
        raise UnusableRunDir(f"{path} cannot be used ({error.strerror or one_line(error)})") from None
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise UnusableRunDir(f"{path} is not writable" if nearest == path
                             else f"{path} cannot be created: {nearest} is not writable")


def _make_run_dir(path: Path, exist_ok: bool) -> None:
    """``path.mkdir(parents=True)``, the OS's refusal as one line (:class:`UnusableRunDir`); without
    ``exist_ok``, an existing ``path`` raises ``FileExistsError`` (another name is tried)."""
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        if not exist_ok:
            raise
        raise UnusableRunDir(f"{path} is not a directory") from None  # e.g. a dangling link, made since the check
    except OSError as error:
        raise UnusableRunDir(f"{path} cannot be created ({error.strerror or one_line(error)})") from None


class _NoLock:
    """Stands in for the lock where ``fcntl`` is missing (Windows): runs are not protected there."""

    def close(self) -> None:
        pass


def lock_run_dir(run_dir: Path) -> IO[str] | _NoLock:
    """Take the run directory's exclusive lock and write our pid into it, or raise RunDirLocked."""
    if fcntl is None:
        warnings.warn("run directories are not locked on this platform (no fcntl): do not run two trainers "
                      f"on {run_dir}", RuntimeWarning, stacklevel=3)
        return _NoLock()
    handle = os.fdopen(os.open(run_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o644), "r+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirLocked(f"{run_dir} is in use by another run (pid {holder}); wait for it to end or choose "
                           "another run_dir") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def replace_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` a uniquely named temp file next to ``path``, then rename it over ``path``: readers
    and a crash see the old file or the new one, never a partial one, and no two writers share a temp
    file. The temp file is removed if writing fails. ``path`` ends up with the mode ``open(path, "w")``
    would give it: an existing file's own, else 0o666 less the umask (not a temp file's owner-only 0o600,
    so a run's files are as readable as its TensorBoard events)."""
    tmp = _new_temp_file(path)
    try:
        write(tmp)
        with contextlib.suppress(FileNotFoundError):  # a new file keeps the umask's mode; after the write, so
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))  # a read-only file can still be replaced
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_temp_file(path: Path) -> Path:
    """Create an empty ``.<name>.<random>.tmp`` beside ``path`` that no other writer has (``O_EXCL``), with
    mode 0o666 less the umask: the kernel applies the current umask, which a process cannot read safely
    while other threads may create files."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}{_TMP_SUFFIX}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue  # another writer's name: draw again
