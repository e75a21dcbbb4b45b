"""One training run as the unit of work of every sweep runner (the process pool of
:mod:`diffgym.experiments.sweep` and :mod:`diffgym.experiments.ray_runner` alike): train a config in
this process, tell whether its run directory already holds the finished run, summarize it in one line,
and the error a sweep whose runs failed ends with. Both runners import this module and neither the other.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

from diffgym.training.run import list_checkpoints, read_metrics
from diffgym.training.spec import TrainConfig

EVALUATION_SCHEDULE = ("total_env_steps", "eval_every_env_steps", "eval_schedule", "eval_first_env_steps",
                       "eval_growth", "eval_episodes")
"""The config fields a run may change when it continues (``diffgym.training.run.RESUMABLE_CHANGES``) that
shape its curve: continued under other values, one run's curve mixes two budgets or cadences."""
GEOMETRIC_ONLY = ("eval_first_env_steps", "eval_growth")
"""The fields of :data:`EVALUATION_SCHEDULE` that only the ``geometric`` schedule reads."""


def schedule_changes(saved: TrainConfig, config: TrainConfig) -> list[str]:
    """``["eval_schedule linear -> geometric", ...]``: how ``config`` would change the budget or evaluation
    schedule ``saved`` was made with; the geometric schedule's own fields only when either run uses it."""
    geometric = "geometric" in (saved.eval_schedule, config.eval_schedule)
    return [f"{key} {_shown(getattr(saved, key))} -> {_shown(getattr(config, key))}" for key in EVALUATION_SCHEDULE
            if getattr(saved, key) != getattr(config, key) and (geometric or key not in GEOMETRIC_ONLY)]


def _shown(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def is_finished(config: TrainConfig) -> bool:
    """A run is finished when its last evaluation row reached the env-step budget."""
    metrics = Path(config.run_dir or "") / "metrics.jsonl"
    if not config.run_dir or not metrics.exists():
        return False
    evals = [r for r in read_metrics(metrics) if "eval_success_rate" in r]
    return bool(evals) and evals[-1]["env_steps"] >= config.total_env_steps


def reuse_plan(configs: Sequence[TrainConfig], extend: bool = False, out_flag: str = "--out") -> str:
    """What a sweep started into existing run directories reuses, as one line (empty when none holds
    results): finished runs are reused as they are, interrupted ones resume from their last checkpoint.

    Runs made with another budget, evaluation schedule (interval, ``eval_schedule`` and, for a geometric
    one, its first point and growth) or number of evaluation episodes would be
    continued (or, finished beyond a smaller budget, reused) under the new schedule, so one curve would
    mix two: that raises ``ValueError`` naming them, unless ``extend``. ``out_flag``: the command's flag that
    chooses where the runs go, named in those errors."""
    finished, resumed, rescheduled = [], [], []
    for config in configs:
        run_dir = Path(config.run_dir or "")
        if not config.run_dir or not _holds_results(run_dir) or not (run_dir / "config.yaml").exists():
            continue
        try:
            saved = TrainConfig.load(run_dir / "config.yaml")
        except Exception as error:  # a damaged file: the run would fail on it too, with less context
            raise ValueError(f"{run_dir / 'config.yaml'}: cannot read the earlier run's config "
                             f"({' '.join(str(error).split())}); choose another {out_flag}") from None
        changes = schedule_changes(saved, config)
        if changes:
            rescheduled.append((run_dir.name, changes))
        (finished if is_finished(config) else resumed).append(run_dir.name)
    if rescheduled and not extend:
        name, changes = rescheduled[0]
        others = f" and {len(rescheduled) - 1} more" if len(rescheduled) > 1 else ""
        raise ValueError(f"{len(rescheduled)} of the runs in {Path(configs[0].run_dir).parent} were made with "
                         f"another budget or evaluation schedule ({name}: {', '.join(changes)}{others}); "
                         "continuing them would mix two schedules in one curve: pass --extend to continue "
                         f"them anyway, or choose another {out_flag}")
    parts = []
    if rescheduled:
        parts.append(f"extending {len(rescheduled)} run(s) made with another schedule ({', '.join(rescheduled[0][1])})")
    if finished:
        parts.append(f"reusing {len(finished)} finished run(s) ({_names(finished)})")
    if resumed:
        parts.append(f"resuming {len(resumed)} run(s) from their last checkpoint ({_names(resumed)})")
    where = f" in {Path(configs[0].run_dir).parent}" if parts else ""
    return "; ".join(parts) + where


def _holds_results(run_dir: Path) -> bool:
    """Whether an earlier run left something a new one would continue (the test ``Run`` applies)."""
    metrics = run_dir / "metrics.jsonl"
    return bool(list_checkpoints(run_dir)) or (metrics.exists() and metrics.stat().st_size > 0)


def _names(names: Sequence[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f", ... {len(names) - shown} more" if len(names) > shown else "")


def train_one(config_dict: dict, progress: bool = True, threads: int | None = None) -> str:
    """Run one config in this process; the unit of work of every runner. ``threads``: torch threads
    (default 1 on CPU, see :mod:`diffgym.threads`): parallel runs share the cores."""
    from diffgym.plugins import load_trainer
    from diffgym.threads import configure_torch_threads

    configure_torch_threads(threads, config_dict.get("device"))
    config = TrainConfig.from_dict(config_dict)
    return str(call_train(load_trainer(config.algo), config, progress))


def call_train(trainer: Any, config: TrainConfig, progress: bool) -> Any:
    """``trainer.train(config)``, without its progress bar where asked and the trainer takes ``progress``
    (the keyword is optional in the contract)."""
    if not progress and "progress" in inspect.signature(trainer.train).parameters:
        return trainer.train(config, progress=False)
    return trainer.train(config)


def run_summary(config: TrainConfig) -> str:
    """The run's last evaluation in one line: what a runner prints as each run of a sweep finishes."""
    evals = [r for r in read_metrics(Path(config.run_dir)) if "eval_success_rate" in r]
    last = evals[-1] if evals else {}
    return (f"{config.algo} seed {config.seed}: success {last.get('eval_success_rate', float('nan')):.2f}, "
            f"return {last.get('eval_return', float('nan')):.2f} after {last.get('env_steps', 0):,} env steps "
            f"({last.get('wall_time', 0):.0f} s)")


def one_line_error(failure: BaseException) -> str:
    """A failure as ``Type: message`` on one line (the message's first line): how a sweep names a failed run."""
    lines = [line.strip() for line in str(failure).splitlines() if line.strip()]
    return f"{type(failure).__name__}: {lines[0]}" if lines else type(failure).__name__


class SweepFailed(RuntimeError):
    """Some runs of a sweep failed; the others finished. ``failures``: ``(run name, one-line error)``."""

    def __init__(self, failures: Sequence[tuple[str, str]], total: int):
        self.failures = list(failures)
        listed = "; ".join(f"{name} ({error})" for name, error in self.failures)
        super().__init__(f"{len(self.failures)} of {total} runs failed: {listed}; the others finished "
                         "(running the same command again retries the failed ones)")
