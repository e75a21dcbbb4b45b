"""Run directories in the APG trainer's first config format (flat ``algo_params``, commit cf3f4c8), kept
to check that such runs still resume, bit for bit (tests/test_apg_reference.py). Recorded with that
version's trainer; kept here as it wrote them, not re-recorded:

* ``<name>/``: the run stopped at ``HALF`` env steps (config.yaml, metrics.jsonl, its last checkpoint);
* ``<name>.full.jsonl``: the rows of the same run taken straight through to ``FULL`` env steps.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

import diffgym  # noqa: F401
from diffgym.plugins import load_trainer, resolve_config
from diffgym.training.run import read_metrics

HERE = Path(__file__).parent
HALF, FULL = 96, 192
LEGACY_PARAMS = {
    # the paper's APG with a TD(lambda) critic and adaptive segments
    "critic": {"segment_length": "adaptive", "min_segment_length": 4, "bootstrap": "critic", "estimator": "hybrid"},
    # analytic steps beside the proximal path, with every option of TPush-v1's default switched on
    "proximal": {"segment_length": 8, "bootstrap": "value", "estimator": "analytic", "segment_lr": 1e-3,
                 "env_gradient_clip": 1.0, "proximal_epochs": 2, "proximal_horizon": 16,
                 "proximal_minibatch_size": 16, "clip_range": 0.1, "gae_lambda": 0.9, "entropy_coef": 1e-3,
                 "proximal_value_fit": True, "value_scaling": True},
}


def config(name: str, steps: int, run_dir: Path):
    overrides = {"num_envs": 4, "total_env_steps": steps, "eval_every_env_steps": HALF // 2, "eval_episodes": 2,
                 "run_dir": str(run_dir), **{f"algo_params.{k}": v for k, v in LEGACY_PARAMS[name].items()}}
    return resolve_config("apg", "DiffGym/PointMass1D-v0", overrides)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in LEGACY_PARAMS:
        with tempfile.TemporaryDirectory() as tmp:
            full = Path(tmp) / "full"
            load_trainer("apg").train(config(name, FULL, full), progress=False)
            rows = [{k: v for k, v in r.items() if k not in ("wall_time", "eval_wall_time")} for r in read_metrics(full)]
            (HERE / f"{name}.full.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            half = HERE / name
            shutil.rmtree(half, ignore_errors=True)
            load_trainer("apg").train(config(name, HALF, half), progress=False)
            for path in sorted((half / "checkpoints").glob("*.pt"))[:-1]:
                path.unlink()  # the latest is what a resume reads
            for path in half.glob("events.out.tfevents.*"):
                path.unlink()
            print(name, len(rows), "rows;", sorted(p.name for p in (half / "checkpoints").iterdir()))
