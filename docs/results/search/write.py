"""The equal-budget PointNav2D search of docs/results.md ("Equal-budget search, PointNav2D"):

    .venv/bin/python docs/results/search/write.py runs/tuned_pn5 runs/reuse_pn3 runs/ppo_pn5 runs/tune_eq

(``runs/tuned_pn5``: the apg search's winner on seeds 0-4, ``diffgym ablate``; ``runs/reuse_pn3`` and
``runs/ppo_pn5``: the recorded apg (with and without reuse) and ppo runs of "Rollout reuse"; ``runs/tune_eq``:
the two searches' ``--out`` folders; commands in docs/results.md). Writes docs/results/search/PointNav2D/
(report.md, summary.json, plots) and copies each search's trials.md and best.yaml beside it.
"""

import shutil
import sys
from pathlib import Path

from diffgym.experiments.report import write_report


def label(run) -> str:
    if run.config.algo != "apg":
        return run.config.algo
    epochs = run.config.algo_params["reuse"]["epochs"]
    if run.config.num_envs == 8:
        return f"apg, searched (8 envs, K = 16, no tail, gamma 0.99, reuse.epochs={epochs})"
    return f"apg default, reuse.epochs={epochs}" if epochs else "apg default"


if __name__ == "__main__":
    tuned, recorded, ppo, searches = sys.argv[1:5]
    runs = sorted(p for root in (tuned, recorded, ppo) for p in (Path(root) / "runs").iterdir() if p.is_dir())
    out = Path(__file__).parent / "PointNav2D"
    for algo in ("apg", "ppo"):
        for name in ("trials.md", "best.yaml"):
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(searches) / f"{algo}__PointNav2D" / name, out / f"search_{algo}_{name}")
    print(write_report(runs, out, "PointNav2D: apg's equal-budget search winner, apg's defaults, ppo (5 seeds)",
                       key=label, baseline="ppo",
                       contender="apg, searched (8 envs, K = 16, no tail, gamma 0.99, reuse.epochs=2)",
                       log_x=True).read_text())
