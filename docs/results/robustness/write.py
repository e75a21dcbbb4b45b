"""Model-mismatch tables and plots for docs/results.md ("Model mismatch"), from `diffgym robustness` outputs.

    python docs/results/robustness/write.py TASK PARAM DIR [DIR ...]

Each DIR is the `--out` of one `diffgym robustness` command over the 5 seeds of one training variant
(e.g. docs/results/robustness/FrankaReach/apg_nominal); its name labels the variant. Writes
`<parent of the DIRs>/<PARAM>.md` (success IQM [95 % CI] per value and variant) and `<PARAM>.png`
(success and return IQM with intervals against the parameter, one curve per variant).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curve(results: dict, param: str, key: str) -> list[float]:
    """One variant's ``key`` at every value: the IQM across its runs, or a single run's own points (whose
    intervals are over its episodes; the IQM of one run has none)."""
    parameter = results["parameters"][param]
    if len(results["runs"]) > 1:
        return parameter["iqm"][key]
    point_key = key.replace("success_rate_ci", "success_ci")  # a run's points call it success_ci_*
    return [point[point_key] for point in parameter["runs"][0]]


def main(task: str, param: str, dirs: list[str]) -> None:
    variants = {Path(d).name: json.loads((Path(d) / "robustness.json").read_text()) for d in dirs}
    out = Path(dirs[0]).parent
    first = next(iter(variants.values()))
    values = first["parameters"][param]["values"]
    nominal = first["parameters"][param]["nominal"]
    spread = (f"IQM over {len(first['runs'])} seeds [95 % stratified-bootstrap CI]" if len(first["runs"]) > 1
              else "one seed [95 % Wilson interval over its episodes]")
    lines = [f"{task}: success rate against `{param}` (nominal {', '.join(f'{v:g}' for v in nominal)}, marked *), "
             f"{spread}, "
             f"{first['runs'][0]['episodes']} episodes per seed and value", "",
             "| " + param + " | " + " | ".join(variants) + " |", "|---:|" + "---|" * len(variants)]
    for i, value in enumerate(values):
        cells = []
        for results in variants.values():
            cells.append("{:.2f} [{:.2f}, {:.2f}]".format(*(curve(results, param, key)[i] for key in (
                "success_rate", "success_rate_ci_low", "success_rate_ci_high"))))
        mark = " *" if any(abs(value - n) < 1e-9 for n in nominal) else ""
        lines.append(f"| {value:g}{mark} | " + " | ".join(cells) + " |")
    (out / f"{param}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in ((axes[0], "success_rate", "success rate"), (axes[1], "return", "return")):
        for name, results in variants.items():
            line, = ax.plot(values, curve(results, param, metric), marker="o", markersize=3, label=name,
                            linestyle="-" if "nominal" in name else "--")
            ax.fill_between(values, curve(results, param, f"{metric}_ci_low"),
                            curve(results, param, f"{metric}_ci_high"), alpha=0.15, color=line.get_color())
        for n in nominal:
            ax.axvline(n, color="0.5", linestyle=":", linewidth=1)
        ax.set_xlabel(param)
        ax.set_ylabel(f"{label} (IQM of seeds)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{task}: trained at the nominal {param} or randomized, evaluated across its range")
    fig.tight_layout()
    fig.savefig(out / f"{param}.png", dpi=110)


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
