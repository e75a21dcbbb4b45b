"""``diffgym ablate``: APG's segment length x bootstrap mode grid on one task.

Every cell trains APG with ``algo_params.segment_length = K`` (``full`` = the episode length, i.e. full
backpropagation through the episode) and ``algo_params.bootstrap = mode`` on seeds 0..S-1, all else at
the task's APG defaults. The report is the grid as a table and heatmaps of final success (IQM) and
median env steps to the success threshold.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Sequence

import gymnasium as gym
import numpy as np

from diffgym.experiments.report import SUCCESS_THRESHOLD, group, load_run, threshold_table
from diffgym.experiments.sweep import LocalRunner, Runner, save_sweep
from diffgym.plugins import resolve_config
from diffgym.training.spec import TrainConfig, task_name


def parse_segments(text: str, env_id: str) -> list[int]:
    horizon = gym.spec(env_id).max_episode_steps
    return [horizon if s.strip() == "full" else int(s) for s in text.split(",") if s.strip()]


def ablation_configs(env_id: str, segments: Sequence[int], bootstraps: Sequence[str], seeds: int,
                     env_steps: int, out_dir: str | Path, algo: str = "apg") -> list[TrainConfig]:
    eval_every = max(1, env_steps // 20)
    return [resolve_config(algo, env_id, {
                "seed": seed, "total_env_steps": env_steps, "eval_every_env_steps": eval_every,
                "algo_params.segment_length": k, "algo_params.bootstrap": mode,
                "run_dir": str(Path(out_dir) / "runs" / f"K{k}__{mode}__s{seed}")})
            for k in segments for mode in bootstraps for seed in range(seeds)]


def cell(run) -> str:
    params = run.config.algo_params
    return f"K={params['segment_length']} {params['bootstrap']}"


def heatmap(values: np.ndarray, segments: Sequence[int], bootstraps: Sequence[str], title: str, path: Path,
            fmt) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(bootstraps), 1.2 + 0.5 * len(segments)), dpi=120)
    shown = np.where(np.isfinite(values), values, np.nan)
    ax.imshow(shown, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(bootstraps)), bootstraps)
    ax.set_yticks(range(len(segments)), [str(k) for k in segments])
    ax.set_xlabel("bootstrap")
    ax.set_ylabel("segment length K")
    finite = values[np.isfinite(values)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    for i in range(len(segments)):
        for j in range(len(bootstraps)):
            v = values[i, j]
            bright = not np.isfinite(v) or (high > low and (v - low) / (high - low) > 0.6)  # viridis is light at the top
            ax.text(j, i, fmt(v), ha="center", va="center", color="black" if bright else "white", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def ablate(env_id: str, segments: Sequence[int], bootstraps: Sequence[str], seeds: int, env_steps: int,
           out_dir: str | Path, runner: Runner | None = None, threshold: float = SUCCESS_THRESHOLD) -> Path:
    out = Path(out_dir)
    configs = ablation_configs(env_id, segments, bootstraps, seeds, env_steps, out)
    save_sweep(configs, out / "sweep.jsonl")
    run_dirs = (runner or LocalRunner()).run(configs)
    groups = group((load_run(p) for p in run_dirs), cell)
    table, summary = threshold_table(groups, threshold, baseline=None, contender=None)
    success = np.array([[summary[f"K={k} {b}"]["final_success_iqm"] for b in bootstraps] for k in segments])
    steps = np.array([[summary[f"K={k} {b}"]["median_env_steps_to_threshold"] for b in bootstraps]
                      for k in segments])
    name = task_name(env_id)
    heatmap(success, segments, bootstraps, f"{name}: final success (IQM, {seeds} seeds)",
            out / "heatmap_final_success.png", lambda v: f"{v:.2f}")
    heatmap(np.log10(steps), segments, bootstraps, f"{name}: env steps to {threshold:.0%} success (log10)",
            out / "heatmap_steps_to_threshold.png", lambda v: "n/r" if not math.isfinite(v) else f"{10 ** v:,.0f}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = out / "report.md"
    report.write_text(f"# {name}: APG segment length x bootstrap ({seeds} seeds, {env_steps:,} env steps)\n\n"
                      f"{table}\n\n![final success](heatmap_final_success.png)\n"
                      f"![steps to threshold](heatmap_steps_to_threshold.png)\n")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", required=True, help="task id, e.g. DiffGym/PointMass1D-v0")
    parser.add_argument("--segments", default="4,8,16,32,64,full", help="segment lengths K; 'full' = episode length")
    parser.add_argument("--bootstrap", default="none,mc,critic", help="bootstrap modes")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell (0..S-1)")
    parser.add_argument("--env-steps", type=int, required=True, help="env-step budget of every run")
    parser.add_argument("--workers", type=int, default=None, help="parallel runs (default: CPU count)")
    parser.add_argument("--threshold", type=float, default=SUCCESS_THRESHOLD, help="success rate that counts as solved")
    parser.add_argument("--out", default=None, help="output directory (default runs/ablate/<task>)")


def main(args: argparse.Namespace) -> int:
    out = Path(args.out or Path("runs") / "ablate" / task_name(args.env))
    report = ablate(args.env, parse_segments(args.segments, args.env),
                    [b for b in args.bootstrap.split(",") if b], args.seeds, args.env_steps, out,
                    LocalRunner(args.workers), args.threshold)
    print(report.read_text().split("\n![")[0])
    print(f"\nreport: {report}")
    return 0
