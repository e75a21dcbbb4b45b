"""One training run as the unit of work of every sweep runner (the process pool of
:mod:`diffgym.experiments.sweep` and :mod:`diffgym.experiments.ray_runner` alike): train a config in
this process, tell whether its run directory already holds the finished run, summarize it in one line,
and the error a sweep whose runs failed ends with. Both runners import this module and neither the other.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Sequence

from diffgym.training.run import read_metrics
from diffgym.training.spec import TrainConfig


def is_finished(config: TrainConfig) -> bool:
    """A run is finished when its last evaluation row reached the env-step budget."""
    metrics = Path(config.run_dir or "") / "metrics.jsonl"
    if not config.run_dir or not metrics.exists():
        return False
    evals = [r for r in read_metrics(metrics) if "eval_success_rate" in r]
    return bool(evals) and evals[-1]["env_steps"] >= config.total_env_steps


def train_one(config_dict: dict, progress: bool = True, threads: int | None = None) -> str:
    """Run one config in this process; the unit of work of every runner. ``threads``: torch threads
    (default 1 on CPU, see :mod:`diffgym.threads`): parallel runs share the cores."""
    from diffgym.plugins import load_trainer
    from diffgym.threads import configure_torch_threads

    configure_torch_threads(threads, config_dict.get("device"))
    config = TrainConfig.from_dict(config_dict)
    train = load_trainer(config.algo).train
    if not progress and "progress" in inspect.signature(train).parameters:
        return str(train(config, progress=False))
    return str(train(config))


def run_summary(config: TrainConfig) -> str:
    """The run's last evaluation in one line: what a runner prints as each run of a sweep finishes."""
    evals = [r for r in read_metrics(Path(config.run_dir)) if "eval_success_rate" in r]
    last = evals[-1] if evals else {}
    return (f"{config.algo} seed {config.seed}: success {last.get('eval_success_rate', float('nan')):.2f}, "
            f"return {last.get('eval_return', float('nan')):.2f} after {last.get('env_steps', 0):,} env steps "
            f"({last.get('wall_time', 0):.0f} s)")


class SweepFailed(RuntimeError):
    """Some runs of a sweep failed; the others finished. ``failures``: ``(run name, one-line error)``."""

    def __init__(self, failures: Sequence[tuple[str, str]], total: int):
        self.failures = list(failures)
        listed = "; ".join(f"{name} ({error})" for name, error in self.failures)
        super().__init__(f"{len(self.failures)} of {total} runs failed: {listed}; the others finished "
                         "(running the same command again retries the failed ones)")
