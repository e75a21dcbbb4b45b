"""Aggregate finished runs into curves and tables (rliable IQM with stratified-bootstrap 95 % CIs).

Every run directory holds ``config.yaml`` and ``metrics.jsonl`` (see ``diffgym.training.run``); the
evaluation rows (those with ``eval_success_rate``) are the protocol's measurements.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

# SUCCESS_THRESHOLD is the protocol's; run.py keeps it too (checkpoints at the first solving evaluation)
from diffgym.core.registration import task_spec
from diffgym.training.run import SUCCESS_THRESHOLD, read_metrics
from diffgym.training.spec import TrainConfig

AXES = ("env_steps", "grad_steps", "wall_time", "train_wall_time")
AXIS_LABELS = {"env_steps": "environment steps", "grad_steps": "gradient steps", "wall_time": "wall-clock (s)",
               "train_wall_time": "training wall-clock (s)"}
"""``train_wall_time`` is ``wall_time`` less the evaluations and their checkpoints (``eval_wall_time``,
:meth:`~diffgym.training.run.Run.evaluating`): how often a run is evaluated is the protocol's choice, and a
dense schedule weighs most on the run that learns in the fewest env steps. NaN where a row does not record
it (runs before 2026-12-07, runs resumed from their rows, trainers that evaluate outside ``evaluating``);
``null`` in ``summary.json``."""


@dataclass
class RunRecord:
    """One finished run: its config and its evaluation rows as arrays (one entry per evaluation)."""

    path: Path
    config: TrainConfig
    evals: dict[str, np.ndarray]

    @property
    def label(self) -> str:
        return self.config.algo

    def steps_to(self, threshold: float = SUCCESS_THRESHOLD, metric: str = "eval_success_rate") -> dict[str, float]:
        """Env steps, gradient steps and wall-clock at the first evaluation reaching ``threshold`` (inf if never)."""
        hits = np.flatnonzero(self.evals[metric] >= threshold)
        if hits.size == 0:
            return {axis: math.inf for axis in AXES}
        return {axis: float(self.evals[axis][hits[0]]) for axis in AXES}

    def value_at(self, axis: str, points: np.ndarray, metric: str) -> np.ndarray:
        """``metric`` of the last evaluation at or before each point of ``axis`` (NaN before the first)."""
        x, y = self.evals[axis], self.evals[metric]
        index = np.searchsorted(x, points, side="right") - 1
        return np.where(index >= 0, y[np.clip(index, 0, None)], np.nan)

    def final(self, metric: str) -> float:
        return float(self.evals[metric][-1])


def load_run(path: str | Path) -> RunRecord:
    path = Path(path)
    config = TrainConfig.load(path / "config.yaml")
    rows = [r for r in read_metrics(path) if "eval_success_rate" in r]
    if not rows:
        raise ValueError(f"{path}: no evaluation rows in metrics.jsonl")
    keys = ("env_steps", "grad_steps", "wall_time", "eval_return", "eval_success_rate")
    evals = {k: np.array([float(r[k]) for r in rows]) for k in keys}
    evals["train_wall_time"] = evals["wall_time"] - np.array([float(r.get("eval_wall_time", math.nan)) for r in rows])
    return RunRecord(path, config, evals)


def group(runs: Iterable[RunRecord], key: Callable[[RunRecord], str] = lambda r: r.label) -> dict[str, list[RunRecord]]:
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return groups


def iqm_with_ci(scores: dict[str, np.ndarray], reps: int = 2000, seed: int = 0):
    """rliable's IQM across runs, per column: ``scores[label]`` is ``(runs, columns)``.

    Returns ``{label: (iqm (columns,), lower (columns,), upper (columns,))}``.
    """
    import warnings

    from rliable import library as rly
    from scipy.stats import trim_mean

    def per_column(matrix: np.ndarray) -> np.ndarray:
        # rliable's IQM (25 % trimmed mean over runs) of each column, vectorized over columns
        return trim_mean(matrix, proportiontocut=0.25, axis=0)

    # rliable's stratified bootstrap draws its resamples from numpy's global generator (its random_state
    # reaches only arch's unused one), so the global generator is seeded here, afresh for each label so that
    # a label's interval does not depend on the others in the report, and restored afterwards.
    saved = np.random.get_state()
    results = {}
    try:
        for label, matrix in scores.items():
            np.random.seed(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # arch's RandomState deprecation, inside rliable
                point, interval = rly.get_interval_estimates({label: matrix}, per_column, reps=reps)
            results[label] = (point[label], interval[label][0], interval[label][1])
    finally:
        np.random.set_state(saved)
    return results


def curves(groups: dict[str, list[RunRecord]], axis: str, metric: str, num_points: int = 40, log: bool = False):
    """IQM curve with 95 % CI per group, each on its own grid of ``axis`` up to the end of that group's
    shortest run (groups may have different budgets: each is drawn as far as all its runs go). ``log``:
    the grid is log-spaced from the first evaluation after 0 (a log axis cannot show 0), so the early
    part, where a fast learner rises, gets as many points as the rest.
    Returns ``{label: (grid, (iqm, lower, upper))}``."""
    out = {}
    for label, runs in groups.items():
        end = min(r.evals[axis][-1] for r in runs)
        if log:
            positive = [r.evals[axis][r.evals[axis] > 0] for r in runs]
            start = max(float(x[0]) if x.size else end for x in positive)
            grid = np.geomspace(start, end, num_points) if end > start > 0 else np.array([end])
        else:
            start = max(r.evals[axis][0] for r in runs)
            grid = np.linspace(start, end, num_points) if end > start else np.array([end])
        scores = {label: np.stack([r.value_at(axis, grid, metric) for r in runs])}
        out[label] = (grid, iqm_with_ci(scores)[label])
    return out


def reward_threshold(env_id: str) -> float | None:
    """The task's registered ``reward_threshold`` (the return its feasibility reference justifies,
    ``docs/tasks.md``), or ``None`` when it has none."""
    import gymnasium as gym

    import diffgym  # noqa: F401  (registers the tasks)

    try:
        return task_spec(env_id).reward_threshold
    except (gym.error.Error, ImportError):  # a task not registered (or not importable) on this machine
        return None


def curves_figure(groups: dict[str, list[RunRecord]], axis: str, metric: str, title: str,
                  threshold: tuple[float, str] | None = None, log_x: bool = False):
    """The figure of :func:`plot_curves`: IQM curves with 95 % CIs, the ``threshold`` ``(value, label)``
    as a dashed line, ``axis`` log-scaled with ``log_x`` (step axes only: wall-clock stays linear)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = log_x and not axis.endswith("wall_time")
    stats = curves(groups, axis, metric, log=log)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, (grid, (iqm, lower, upper)) in stats.items():
        ax.plot(grid, iqm, label=f"{label} (n={len(groups[label])})")
        ax.fill_between(grid, lower, upper, alpha=0.25)
    if threshold is not None:
        ax.axhline(threshold[0], color="0.35", linestyle="--", linewidth=1, label=threshold[1])
    ax.set_xlabel(AXIS_LABELS[axis] + (" (log scale)" if log else ""))
    ax.set_ylabel(metric.replace("_", " ") + " (IQM, 95% CI)")
    ax.set_title(title)
    low = min(grid[0] for grid, _ in stats.values())
    high = max(grid[-1] for grid, _ in stats.values())
    if log or (not axis.endswith("wall_time") and low > 0 and high / low > 100):
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_curves(groups: dict[str, list[RunRecord]], axis: str, metric: str, path: Path, title: str,
                threshold: tuple[float, str] | None = None, log_x: bool = False) -> None:
    """Write :func:`curves_figure` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = curves_figure(groups, axis, metric, title, threshold, log_x)
    fig.savefig(path)
    plt.close(fig)


def threshold_lines(groups: dict[str, list[RunRecord]], threshold: float) -> dict[str, tuple[float, str]]:
    """Per metric, the line the protocol judges its curves by: the success rate that counts as solved,
    and the task's ``reward_threshold`` for the return (when all runs share a task that has one)."""
    lines = {"eval_success_rate": (threshold, f"success threshold ({threshold:.0%})")}
    tasks = {run.config.env_id for runs in groups.values() for run in runs}
    if len(tasks) == 1:
        target = reward_threshold(tasks.pop())
        if target is not None:
            lines["eval_return"] = (float(target), f"reward_threshold ({target:g})")
    return lines


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "n/a"  # not recorded (train_wall_time of older runs)
    if math.isinf(value):
        return "not reached"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


PER_SEED_AXES = ("env_steps", "grad_steps")
"""The costs to the threshold the report lists for every seed, not only as a median."""


def threshold_table(groups: dict[str, list[RunRecord]], threshold: float = SUCCESS_THRESHOLD,
                    baseline: str | None = None, contender: str | None = None) -> tuple[str, dict]:
    """Markdown table: per group, runs reaching the threshold, median env/grad steps and wall-clock to it,
    final success and return (IQM [95 % CI]); plus baseline/contender ratios of the medians, and a table of
    each seed's env steps (gradient steps) to the threshold. The summary lists those per seed too
    (``seeds``, ``env_steps_to_threshold``, ``grad_steps_to_threshold``, in seed order; ``null`` for a run
    that never reached it)."""
    summary: dict[str, dict] = {}
    finals = iqm_with_ci({k: np.array([[r.final("eval_success_rate")] for r in v]) for k, v in groups.items()})
    returns = iqm_with_ci({k: np.array([[r.final("eval_return")] for r in v]) for k, v in groups.items()})
    for label, runs in groups.items():
        hits = [r.steps_to(threshold) for r in runs]
        by_seed = sorted(zip((r.config.seed for r in runs), hits), key=lambda pair: pair[0])
        summary[label] = {
            "runs": len(runs),
            "reached": sum(not math.isinf(h["env_steps"]) for h in hits),
            **{f"median_{axis}_to_threshold": float(np.median([h[axis] for h in hits])) for axis in AXES},
            "seeds": [seed for seed, _ in by_seed],
            **{f"{axis}_to_threshold": [None if math.isinf(h[axis]) else int(h[axis]) for _, h in by_seed]
               for axis in PER_SEED_AXES},
            "final_success_iqm": float(finals[label][0][0]),
            "final_success_ci": [float(finals[label][1][0]), float(finals[label][2][0])],
            "final_return_iqm": float(returns[label][0][0]),
            "final_return_ci": [float(returns[label][1][0]), float(returns[label][2][0])],
        }
    lines = [f"| algorithm | runs reaching {threshold:.0%} success | env steps to it | gradient steps to it | "
             "wall-clock to it (s) | training wall-clock to it (s) | final success, IQM [95% CI] | "
             "final return, IQM [95% CI] |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, s in summary.items():
        lines.append(
            f"| {label} | {s['reached']}/{s['runs']} | {_fmt(s['median_env_steps_to_threshold'])} | "
            f"{_fmt(s['median_grad_steps_to_threshold'])} | {_fmt(s['median_wall_time_to_threshold'])} | "
            f"{_fmt(s['median_train_wall_time_to_threshold'])} | "
            f"{s['final_success_iqm']:.2f} [{s['final_success_ci'][0]:.2f}, {s['final_success_ci'][1]:.2f}] | "
            f"{s['final_return_iqm']:.2f} [{s['final_return_ci'][0]:.2f}, {s['final_return_ci'][1]:.2f}] |")
    lines += ["", "Training wall-clock: the wall-clock less the evaluations and the checkpoints saved with them "
              "(`docs/protocol.md`); n/a where a run did not record that split."]
    ratios = {}
    if baseline in summary and contender in summary:
        for axis in AXES:
            b = summary[baseline][f"median_{axis}_to_threshold"]
            c = summary[contender][f"median_{axis}_to_threshold"]
            ratios[axis] = b / c if math.isfinite(b) and math.isfinite(c) and c > 0 else None  # NaN: not recorded
        shown = ", ".join(f"{AXIS_LABELS[a]} {'n/a' if r is None else f'{r:.1f}x'}" for a, r in ratios.items())
        lines.append("")
        lines.append(f"Ratio {baseline}/{contender} of the median cost to reach {threshold:.0%} success: {shown}.")
    lines += ["", *per_seed_table(summary, threshold)]
    summary["ratios"] = ratios
    return "\n".join(lines), summary


def nan_as_null(value):
    """``value`` with every NaN float (a cost that was not recorded) replaced by ``None``, JSON's null."""
    if isinstance(value, dict):
        return {k: nan_as_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_as_null(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def per_seed_table(summary: dict[str, dict], threshold: float) -> list[str]:
    """The Markdown lines of each group's env steps (gradient steps) to ``threshold``, one column per seed
    (``-`` where a group has no run with that seed)."""
    seeds = sorted({seed for s in summary.values() for seed in s["seeds"]})
    lines = [f"Env steps (gradient steps) to {threshold:.0%} success, per seed:", "",
             "| algorithm | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
             "|---|" + "---:|" * len(seeds)]
    for label, s in summary.items():
        cells = {seed: "not reached" if env is None else f"{env:,} ({grad:,})"
                 for seed, env, grad in zip(s["seeds"], s["env_steps_to_threshold"], s["grad_steps_to_threshold"])}
        lines.append(f"| {label} | " + " | ".join(cells.get(seed, "-") for seed in seeds) + " |")
    return lines


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, title: str,
                 key: Callable[[RunRecord], str] = lambda r: r.label, threshold: float = SUCCESS_THRESHOLD,
                 baseline: str | None = None, contender: str | None = None, log_x: bool = False) -> Path:
    """Curves against env steps and gradient steps (PNG), with the success threshold and the task's
    ``reward_threshold`` drawn, the threshold table (Markdown) and a JSON summary; with ``baseline`` and
    ``contender`` (group labels) also their cost ratios. ``log_x``: log-scaled step axes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = group((load_run(p) for p in run_dirs), key)
    lines = threshold_lines(groups, threshold)
    for axis in ("env_steps", "grad_steps"):
        for metric in ("eval_success_rate", "eval_return"):
            plot_curves(groups, axis, metric, out / f"{metric}_vs_{axis}.png", title, lines.get(metric), log_x)
    table, summary = threshold_table(groups, threshold, baseline, contender)
    (out / "summary.json").write_text(json.dumps(nan_as_null(summary), indent=2) + "\n")
    report = out / "report.md"
    images = "\n".join(f"![{m} vs {a}]({m}_vs_{a}.png)" for a in ("env_steps", "grad_steps")
                       for m in ("eval_success_rate", "eval_return"))
    report.write_text(f"# {title}\n\n{table}\n\n{images}\n")
    return report
