"""Run outputs, identical for every trainer: ``runs/<run-name>/`` holds

* ``config.yaml``: the :class:`~diffgym.training.spec.TrainConfig` (with the resolved ``run_dir``);
* TensorBoard event files (every logged scalar, x-axis = env steps);
* ``metrics.jsonl``: one JSON object per :meth:`Run.log` call with ``env_steps``, ``grad_steps``,
  ``wall_time`` (seconds since the run started) and the logged scalars (evaluation rows carry
  ``eval_return`` and ``eval_success_rate``);
* ``checkpoints/step_<env_steps>.pt``: whatever dict the trainer saves.

While training, a tqdm progress bar counts env steps and shows env steps per second.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from diffgym.training.spec import TrainConfig

_CHECKPOINT = re.compile(r"step_(\d+)\.pt$")

def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(env_steps, path)`` of a run directory's ``checkpoints/step_<env_steps>.pt``, oldest first."""
    found = [(int(m.group(1)), p) for p in (Path(run_dir) / "checkpoints").glob("step_*.pt")
             if (m := _CHECKPOINT.search(p.name))]
    return sorted(found)


_LOG_HOOKS: list[Callable[[int, dict[str, float]], None]] = []


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


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (``path`` is the file or the run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def default_run_dir(config: TrainConfig, root: str | Path = "runs") -> Path:
    """``runs/<algo>__<task>__s<seed>__<YYYYmmdd-HHMMSS>``."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{config.algo}__{config.task_name}__s{config.seed}__{stamp}"


class Run:
    """The output directory of one training run; use as a context manager or call :meth:`close`.

    An existing ``run_dir`` is reused: a trainer that resumes from :meth:`load_latest_checkpoint` calls
    :meth:`resume_from`; otherwise the run's metrics start afresh.
    """

    def __init__(self, config: TrainConfig, progress: bool = True):
        run_dir = Path(config.run_dir) if config.run_dir else default_run_dir(config)
        self.config = config.replace(run_dir=str(run_dir))
        self.dir = run_dir
        self.checkpoint_dir = run_dir / "checkpoints"
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.config.save(run_dir / "config.yaml")
        self.metrics_path = run_dir / "metrics.jsonl"
        # An earlier attempt's rows are set aside: a trainer that resumes from a checkpoint keeps those up
        # to it (resume_from); any other run starts its metrics afresh, so env_steps only ever increase.
        self._earlier_rows = self._read_rows() if self.metrics_path.exists() else []
        self._metrics = self.metrics_path.open("w")
        from torch.utils.tensorboard import SummaryWriter  # imported late: it pulls in TensorBoard

        self.writer = SummaryWriter(log_dir=str(run_dir))
        self._start = time.perf_counter()
        self._bar = tqdm(total=config.total_env_steps, unit="step", unit_scale=True, dynamic_ncols=True,
                         desc=f"{config.algo} {config.task_name}", disable=not progress)
        self._closed = False

    @property
    def wall_time(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self._start

    def progress(self, env_steps: int) -> None:
        """Advance the progress bar to ``env_steps`` without logging anything."""
        if self._bar.total is not None and env_steps > self._bar.total:  # trainers may overshoot by a rollout
            self._bar.total = int(env_steps)
        self._bar.update(max(0, int(env_steps) - self._bar.n))

    def log(self, env_steps: int, grad_steps: int, **scalars: float) -> None:
        """Record scalars at ``env_steps``: a ``metrics.jsonl`` row, TensorBoard scalars, the progress bar."""
        row: dict[str, Any] = {"env_steps": int(env_steps), "grad_steps": int(grad_steps),
                               "wall_time": round(self.wall_time, 3)}
        for name, value in scalars.items():
            value = float(value)
            row[name] = value if math.isfinite(value) else str(value)  # JSON has no NaN/inf
            self.writer.add_scalar(name, value, global_step=int(env_steps), walltime=time.time())
        self.writer.add_scalar("grad_steps", int(grad_steps), global_step=int(env_steps))
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        self.progress(env_steps)
        shown = {k: f"{v:.3g}" for k, v in scalars.items() if k in ("eval_return", "eval_success_rate")}
        if shown:
            self._bar.set_postfix(shown, refresh=False)
        for hook in list(_LOG_HOOKS):
            hook(int(env_steps), {k: float(v) for k, v in scalars.items()})

    def save_checkpoint(self, obj: dict[str, Any], env_steps: int) -> Path:
        """Save ``obj`` with ``torch.save`` as ``checkpoints/step_<env_steps>.pt`` (atomic replace)."""
        path = self.checkpoint_dir / f"step_{int(env_steps):012d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, path)
        return path

    def load_latest_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint with the most env steps, or ``None`` when there is none. Checkpoints are
        full pickles (optimizer state, configs), so only load run directories you trust."""
        found = list_checkpoints(self.dir)
        if not found:
            return None
        return torch.load(found[-1][1], map_location="cpu", weights_only=False)

    def resume_from(self, env_steps: int) -> None:
        """Continue an earlier attempt from its checkpoint at ``env_steps``: keep its metrics rows up to
        there and continue its wall-clock, so a resumed run records the same axes as an uninterrupted one."""
        kept = [row for row in self._earlier_rows if row["env_steps"] <= env_steps]
        self._metrics.writelines(json.dumps(row) + "\n" for row in kept)
        self._metrics.flush()
        if kept:
            self._start -= float(kept[-1]["wall_time"])
        self.progress(env_steps)

    def _read_rows(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path)

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every row of ``metrics.jsonl`` so far."""
        self._metrics.flush()
        return self._read_rows()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._bar.close()
        self.writer.close()
        self._metrics.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
