"""``diffgym ablate``: a grid over a trainer's ``algo_params`` on one task.

Every cell trains the algorithm (``--algo``) with one combination of the grid's values (``--grid
KEY=V1,V2,...``, repeatable; the value ``full`` stands for the task's episode length) on seeds 0..S-1,
all else at the task's defaults for that algorithm. A trainer's own flags (its ``cli_flags``) are grid
axes too (``--algo apg --segment-length 8,32 --bootstrap none,critic``); with no axis given, the grid is
the trainer's ``ablation_grid``. The report is the grid as a
table and, for a one- or two-key grid, heatmaps of final success (IQM) and median env steps to the
success threshold.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import gymnasium as gym
import numpy as np

from diffgym.core.registration import task_spec
from diffgym.experiments.report import SUCCESS_THRESHOLD, group, load_run, nan_as_null, threshold_table
from diffgym.experiments.sweep import LocalRunner, Runner, save_sweep
from diffgym.experiments.training_runs import reuse_plan
from diffgym.plugins import resolve_config
from diffgym.training.spec import TrainConfig, task_name

def parse_values(text: str, env_id: str) -> list[Any]:
    """``"8,full,adaptive"`` -> ``[8, <episode length>, "adaptive"]`` (YAML scalars)."""
    import yaml

    horizon = task_spec(env_id).max_episode_steps
    values = []
    for item in (s.strip() for s in str(text).split(",")):
        if item:
            values.append(horizon if item == "full" else yaml.safe_load(item))
    return values


def parse_grid(pairs: Sequence[str], env_id: str) -> dict[str, list[Any]]:
    grid = {}
    for pair in pairs:
        key, sep, values = pair.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise SystemExit(f"diffgym ablate: expected --grid KEY=V1,V2,..., got {pair!r}")
        grid[key.strip()] = parse_values(values, env_id)
    return grid


def cell_label(params: dict[str, Any], keys: Sequence[str]) -> str:
    return " ".join(f"{key}={params[key]}" for key in keys)


def _dir_name(params: dict[str, Any], keys: Sequence[str]) -> str:
    return "__".join(f"{key}{params[key]}" for key in keys)


def grid_cells(grid: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every cell of the grid as ``{key: value}``, in the grid's order."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def grid_configs(env_id: str, grid: dict[str, Sequence[Any]], seeds: int, env_steps: int, out_dir: str | Path,
                 algo: str, eval_every: int | None = None, overrides: Mapping[str, Any] | None = None
                 ) -> list[TrainConfig]:
    """One config per grid cell and seed, run directories ``<out>/runs/<cell>__s<seed>``; ``overrides``
    (dotted keys) apply to every run, under the grid's values."""
    eval_every = eval_every or max(1, env_steps // 20)
    keys = list(grid)
    configs = []
    for params in grid_cells(grid):
        for seed in range(seeds):
            configs.append(resolve_config(algo, env_id, {
                **(overrides or {}), "seed": seed, "total_env_steps": env_steps, "eval_every_env_steps": eval_every,
                **{f"algo_params.{k}": v for k, v in params.items()},
                "run_dir": str(Path(out_dir) / "runs" / f"{_dir_name(params, keys)}__s{seed}")}))
    return configs


def heatmap(values: np.ndarray, rows: Sequence[Any], columns: Sequence[str], title: str, path: Path,
            fmt, row_key: str, column_key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(columns), 1.2 + 0.5 * len(rows)), dpi=120)
    shown = np.where(np.isfinite(values), values, np.nan)
    ax.imshow(shown, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel(column_key)
    ax.set_ylabel(row_key)
    finite = values[np.isfinite(values)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    for i in range(len(rows)):
        for j in range(len(columns)):
            v = values[i, j]
            bright = not np.isfinite(v) or (high > low and (v - low) / (high - low) > 0.6)  # viridis is light at the top
            ax.text(j, i, fmt(v), ha="center", va="center", color="black" if bright else "white", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def ablate(env_id: str, grid: dict[str, Sequence[Any]], seeds: int, env_steps: int, out_dir: str | Path,
           algo: str, runner: Runner | None = None, threshold: float = SUCCESS_THRESHOLD,
           eval_every: int | None = None, overrides: Mapping[str, Any] | None = None,
           extend: bool = False) -> Path:
    """Every grid cell x seed through ``runner``, then the report. Runs already in ``out_dir`` are reused
    or resumed (said in one line); ones made with another budget or evaluation schedule only with
    ``extend`` (:func:`~diffgym.experiments.training_runs.reuse_plan`)."""
    out = Path(out_dir)
    keys = list(grid)
    configs = grid_configs(env_id, grid, seeds, env_steps, out, algo, eval_every, overrides)
    reused = reuse_plan(configs, extend)
    if reused:
        print(f"ablate: {reused}", flush=True)
    save_sweep(configs, out / "sweep.jsonl")
    run_dirs = (runner or LocalRunner()).run(configs)
    # each run's cell as the grid named it: a trainer may store a key under another name (APG's
    # segment_length is segment.length in its config), so the label does not come from the config
    cells = {_dir_name(params, keys): cell_label(params, keys) for params in grid_cells(grid)}
    groups = group((load_run(p) for p in run_dirs), lambda run: cells[run.path.name.rpartition("__s")[0]])
    table, summary = threshold_table(groups, threshold, baseline=None, contender=None)
    name = task_name(env_id)
    figures = ""
    if 1 <= len(keys) <= 2:
        rows = grid[keys[0]]
        columns = grid[keys[1]] if len(keys) == 2 else [None]

        def at(row, column, field):
            params = {keys[0]: row, **({keys[1]: column} if len(keys) == 2 else {})}
            return summary[cell_label(params, keys)][field]

        success = np.array([[at(r, c, "final_success_iqm") for c in columns] for r in rows])
        steps = np.array([[at(r, c, "median_env_steps_to_threshold") for c in columns] for r in rows])
        column_names = [str(c) for c in columns] if len(keys) == 2 else [""]
        column_key = keys[1] if len(keys) == 2 else ""
        heatmap(success, rows, column_names, f"{name}: final success (IQM, {seeds} seeds)",
                out / "heatmap_final_success.png", lambda v: f"{v:.2f}", keys[0], column_key)
        heatmap(np.log10(steps), rows, column_names, f"{name}: env steps to {threshold:.0%} success (log10)",
                out / "heatmap_steps_to_threshold.png", lambda v: "n/r" if not math.isfinite(v) else f"{10 ** v:,.0f}",
                keys[0], column_key)
        figures = ("\n![final success](heatmap_final_success.png)\n"
                   "![steps to threshold](heatmap_steps_to_threshold.png)\n")
    (out / "summary.json").write_text(json.dumps(nan_as_null(summary), indent=2) + "\n")
    report = out / "report.md"
    report.write_text(f"# {name}: {algo} grid over {' x '.join(keys)} ({seeds} seeds, {env_steps:,} env steps)\n\n"
                      f"{table}\n{figures}")
    return report
