"""The rollout-reuse comparison of docs/results.md from the sweeps' run directories:

    .venv/bin/python docs/results/reuse/write.py PointMass1D runs/reuse_pm5 runs/ppo_pm5
    .venv/bin/python docs/results/reuse/write.py FrankaReach runs/reuse_fr5 runs/ppo_fr5

(``runs/reuse_*``: ``diffgym ablate --algo apg --grid reuse.epochs=0,4``; ``runs/ppo_*``: ``diffgym compare
--algos ppo``; commands in docs/results.md). Writes docs/results/reuse/<task>/ (report.md, summary.json, plots).
"""

import sys
from pathlib import Path

from diffgym.experiments.report import write_report


def label(run) -> str:
    if run.config.algo != "apg":
        return run.config.algo
    epochs = run.config.algo_params["reuse"]["epochs"]
    return f"apg, reuse.epochs={epochs}" if epochs else "apg"


if __name__ == "__main__":
    task, apg_dir, ppo_dir = sys.argv[1:4]
    runs = sorted(p for root in (apg_dir, ppo_dir) for p in (Path(root) / "runs").iterdir() if p.is_dir())
    out = Path(__file__).parent / task
    print(write_report(runs, out, f"{task}: apg with and without rollout reuse, ppo (5 seeds)", key=label,
                       baseline="ppo", contender="apg, reuse.epochs=4", log_x=True).read_text())
