"""Record the metric rows of APG's documented per-task defaults over a short prefix (the reference that
tests/test_apg_reference.py compares every later version of the trainer with, bit for bit).

    .venv/bin/python tests/data/apg_reference/record.py            # all three tasks
    .venv/bin/python tests/data/apg_reference/record.py PointMass1D

Only what a reference run needs is changed from the documented default: the budget, the evaluation
interval and the number of evaluation episodes (evaluation draws from no training generator, so the
training rows are those of the documented run's first env steps).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

import diffgym  # noqa: F401  (registers the tasks)
from diffgym.plugins import load_trainer, resolve_config
from diffgym.training.run import read_metrics

HERE = Path(__file__).parent
PREFIXES = {  # task -> (trainer, env steps, evaluation interval): each covers every step of its update
    "PointMass1D": ("apg", "DiffGym/PointMass1D-v0", 1024, 512),
    "PointNav2D": ("apg", "DiffGym/PointNav2D-v0", 1024, 512),
    # 32 envs x 400 steps: the first proximal update lands at 12,800 env steps. Recorded as `apg` in the
    # first, flat config format; the documented setting is the default of `apg-ppo` since.
    "TPush-v1": ("apg-ppo", "DiffGym/TPush-v1", 13312, 6656),
}
IGNORED = ("wall_time", "eval_wall_time")
"""Columns that differ between two identical runs."""


def reference_config(task: str, run_dir: Path):
    algo, env_id, steps, every = PREFIXES[task]
    return resolve_config(algo, env_id, {"total_env_steps": steps, "eval_every_env_steps": every,
                                         "eval_episodes": 2, "run_dir": str(run_dir)})


def run_rows(task: str) -> list[dict]:
    """The metric rows of ``task``'s reference prefix as this version of the trainer writes them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = reference_config(task, Path(tmp) / "run")
            load_trainer(config.algo).train(config, progress=False)
            rows = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
    finally:
        torch.set_num_threads(threads)
    return [{k: v for k, v in row.items() if k not in IGNORED} for row in rows]


if __name__ == "__main__":
    for task in sys.argv[1:] or PREFIXES:
        rows = run_rows(task)
        (HERE / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(task, len(rows), "rows")
