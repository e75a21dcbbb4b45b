"""The verdict rule docs/results.md ("Comparison: TPush-v1") set before `diffgym results confirm_face_TPush-v1`
ran: PPO and apg-ppo, both with TPush-v1's face shaping, env steps to 90 % success per seed.

    python docs/results/compare/tpush_face_verdict.py [RUNS_DIR]   (default: runs/results)

reads the run directories of face_TPush-v1 (seeds 0-4), heldout_face_TPush-v1 (5-9) and
confirm_face_TPush-v1 (10-19) and prints each seed's env steps to 90 %, the three conditions and the ratio
of medians over seeds 0-19 with a 95 % bootstrap interval (seeds resampled, 10,000 draws)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from diffgym.experiments.report import load_run

GROUPS = {"ppo": "ppo_face_shaping", "apg-ppo": "apg-ppo_face_shaping_analytic_steps_clipped_path"}
EXPERIMENTS = {"face_TPush-v1": range(0, 5), "heldout_face_TPush-v1": range(5, 10),
               "confirm_face_TPush-v1": range(10, 20)}


def steps_to_90(runs_dir: Path) -> dict[str, dict[int, float]]:
    found: dict[str, dict[int, float]] = {algo: {} for algo in GROUPS}
    for experiment, seeds in EXPERIMENTS.items():
        for algo, label in GROUPS.items():
            for seed in seeds:
                found[algo][seed] = load_run(runs_dir / experiment / f"{label}__s{seed}").steps_to(0.9)["env_steps"]
    return found


def median(values) -> float:
    return float(np.median(np.asarray(list(values), dtype=float)))  # inf (never reached) sorts last


def main(runs_dir: Path) -> None:
    steps = steps_to_90(runs_dir)
    fmt = lambda v: "never" if math.isinf(v) else f"{v / 1e6:.1f}M"  # noqa: E731
    print("seed  " + "  ".join(f"{s:>5}" for s in range(20)))
    for algo in GROUPS:
        print(f"{algo:8s}" + "  ".join(f"{fmt(steps[algo][s]):>5}" for s in range(20)))
    new, every = range(10, 20), range(20)
    reached = sum(not math.isinf(steps["apg-ppo"][s]) for s in new)
    m_apg_new, m_ppo_new = median(steps["apg-ppo"][s] for s in new), median(steps["ppo"][s] for s in new)
    m_apg_all, m_ppo_all = median(steps["apg-ppo"][s] for s in every), median(steps["ppo"][s] for s in every)
    earlier = sum(steps["apg-ppo"][s] < steps["ppo"][s] for s in every)
    later = sum(steps["apg-ppo"][s] > steps["ppo"][s] for s in every)
    primary = reached >= 6 and m_apg_new < m_ppo_new
    secondary = m_apg_all < m_ppo_all and earlier > later
    print(f"\nseeds 10-19: apg-ppo reaches 90 % on {reached}/10 (PPO {sum(not math.isinf(steps['ppo'][s]) for s in new)}"
          f"/10); median apg-ppo {fmt(m_apg_new)}, PPO {fmt(m_ppo_new)} -> primary {'holds' if primary else 'fails'}")
    print(f"seeds 0-19: median apg-ppo {fmt(m_apg_all)}, PPO {fmt(m_ppo_all)}; apg-ppo earlier on {earlier}, later on "
          f"{later} (ties and neither left out) -> secondary {'holds' if secondary else 'fails'}")
    rng = np.random.default_rng(0)
    apg, ppo = (np.array([steps[a][s] for s in every]) for a in ("apg-ppo", "ppo"))
    draws = rng.integers(0, 20, size=(10_000, 20))
    with np.errstate(invalid="ignore"):  # never/never: a draw with neither median; never/finite is kept, as inf
        ratios = np.median(ppo[draws], axis=1) / np.median(apg[draws], axis=1)
    ratios = ratios[~np.isnan(ratios)]
    low, high = np.percentile(ratios, [2.5, 97.5])
    point = m_ppo_all / m_apg_all if math.isfinite(m_apg_all) or math.isfinite(m_ppo_all) else math.nan
    print(f"PPO/apg-ppo ratio of medians over seeds 0-19: {point:.2f}x, 95 % bootstrap interval [{low:.2f}, {high:.2f}] "
          f"({ratios.size:,} of 10,000 draws had a median for either)")
    print(f"verdict: {'met' if primary and secondary else 'not met'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/results"))
