"""How a trained policy's success and return change with the task's physical parameters (``diffgym
robustness``).

For each varied parameter, one at a time, the run's deterministic policy is scored at each of a grid of
values by the shared ``evaluate_policy``, with that value set in every env of the native vector env through
``reset(options={"physics": ...})`` (the vector env keeps it across autoresets; each evaluation env runs one
episode anyway) and every other parameter at its nominal value: the run's ``eval_randomize`` is not drawn,
so a point measures that one value, not a spread around it. The envs are inside the run's ``wrappers``
(action delay, observation noise), as in its training and evaluations: they are the task the policy acts
in. Every point is scored on the same episodes (the same evaluation seed), so the curve's differences come
from the parameter, not from other start states.

Intervals: a run's success rate gets a 95 % Wilson score interval over its episodes, its mean return the
95 % normal interval ``diffgym eval`` reports; several runs are summarised per point by their IQM with a
95 % stratified-bootstrap interval across runs (rliable, :func:`diffgym.experiments.report.iqm_with_ci`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from diffgym.experiments.report import iqm_with_ci
from diffgym.training.randomization import check_ranges

DEFAULT_POINTS = 7
"""Grid points per varied parameter when ``--vary`` gives no ``N``."""
Z_95 = 1.959963984540054
"""The standard normal quantile of a two-sided 95 % interval."""
SUCCESS_INTERVAL = "95 % Wilson score interval over the run's episodes"
RETURN_INTERVAL = "95 % normal interval of the mean over the run's episodes (mean +- 1.96 std / sqrt(episodes))"
ACROSS_RUNS = "IQM across runs, 95 % stratified-bootstrap interval (rliable, 2000 resamples)"
METRICS = ("success_rate", "return")
"""The two curves, by their name in the results."""


@dataclasses.dataclass(frozen=True)
class Variation:
    """One parameter swept over ``points`` evenly spaced values from ``low`` to ``high``."""

    name: str
    low: float
    high: float
    points: int = DEFAULT_POINTS

    def values(self, nominals: Sequence[float] = ()) -> list[float]:
        """The grid, plus each of ``nominals`` inside ``[low, high]`` that it misses, in increasing order:
        the curve then passes through the nominal point itself."""
        # 12 significant digits: linspace's 0.7999999999999999 is the 0.8 the user asked for
        grid = [float(f"{v:.12g}") for v in np.linspace(self.low, self.high, self.points)]
        values = list(grid)
        for nominal in nominals:
            if self.low <= nominal <= self.high and not any(same_float32(nominal, v) for v in values):
                values.append(float(nominal))
        return sorted(values)


def same_float32(a: float, b: float) -> bool:
    """Whether two parameter values are the same to the env, which holds them as float32: a grid point
    is the nominal one only then (a relative tolerance would take 5000 for a contact stiffness of 5000.04)."""
    return bool(np.float32(a) == np.float32(b))


def parse_variation(text: str) -> Variation:
    """``PARAM=LO:HI[:N]`` -> a :class:`Variation`; anything else is a one-line ``ValueError``."""
    name, sep, spec = text.partition("=")
    parts = spec.split(":")
    expected = f"expected PARAM=LO:HI[:N] such as mass=0.5:2:7, got {text!r}"
    if not sep or not name.strip() or len(parts) not in (2, 3):
        raise ValueError(f"--vary: {expected}")
    try:
        low, high = float(parts[0]), float(parts[1])
        points = int(parts[2]) if len(parts) == 3 else DEFAULT_POINTS
    except ValueError:
        raise ValueError(f"--vary: {expected}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"--vary {text}: LO and HI must be finite numbers")
    if low >= high:
        raise ValueError(f"--vary {text}: LO ({low:g}) must be below HI ({high:g})")
    if points < 2:
        raise ValueError(f"--vary {text}: N must be >= 2 (a curve needs two points), got {points}")
    return Variation(name.strip(), low, high, points)


@dataclasses.dataclass(frozen=True)
class TaskPhysics:
    """A task's physical parameters as a run makes it (with its ``env_kwargs``)."""

    env_id: str
    names: tuple[str, ...]
    bounds: dict[str, tuple[float, float]]
    nominal: dict[str, float]
    """Each parameter's constructor value: what every env uses unless told otherwise."""

    # read by randomization.check_ranges, as it reads them off a simulator
    @property
    def physical_params(self) -> tuple[str, ...]:
        return self.names

    @property
    def physics_bounds(self) -> dict[str, tuple[float, float]]:
        return self.bounds


def task_physics(env_id: str, env_kwargs: Mapping[str, Any] | None = None) -> TaskPhysics:
    """Read the physical parameters off a one-env vector env of the task."""
    import gymnasium as gym

    import diffgym  # noqa: F401  (registers the tasks)

    venv = gym.make_vec(env_id, num_envs=1, vectorization_mode="vector_entry_point", **dict(env_kwargs or {}))
    try:
        sim = venv.sim
        # the float32 value as written (0.3, not 0.30000001192...): what the user set and the JSON shows
        nominal = {name: float(f"{float(value[0]):.7g}") for name, value in sim.default_physics(1).items()}
        bounds = {name: tuple(float(b) for b in sim.physics_bounds.get(name, (-math.inf, math.inf)))
                  for name in sim.physical_params}
        return TaskPhysics(env_id, tuple(sim.physical_params), bounds, nominal)
    finally:
        venv.close()


def check_variations(variations: Sequence[Variation], physics: TaskPhysics) -> None:
    """A one-line ``ValueError`` for a parameter varied twice, or what
    :func:`~diffgym.training.randomization.check_ranges` refuses (a task without physical parameters, a
    parameter the task does not have, a range outside its ``physics_bounds``)."""
    seen: set[str] = set()
    for variation in variations:
        if variation.name in seen:
            raise ValueError(f"--vary {variation.name} is given twice; vary each parameter once")
        seen.add(variation.name)
    check_ranges({v.name: (v.low, v.high) for v in variations}, physics, physics.env_id, "--vary")


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion: unlike the normal one it stays inside [0, 1]
    and is not empty at 0 or all successes, which is where a robustness curve spends much of its time."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    p = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    # at none or all successes the bound is exactly 0 or 1, which rounding would otherwise miss by an ulp
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def point_result(value: float, evaluation: Mapping[str, float], episodes: int, nominal: float) -> dict[str, Any]:
    """One grid point of one run: ``policy_commands.evaluate``'s numbers with the success rate's Wilson
    interval; ``nominal`` marks the run's own nominal value."""
    successes = round(evaluation["eval_success_rate"] * episodes)
    low, high = wilson_interval(successes, episodes)
    return {"value": value, "nominal": same_float32(value, nominal),
            "success_rate": evaluation["eval_success_rate"], "success_ci_low": low, "success_ci_high": high,
            "return": evaluation["eval_return"], "return_ci_low": evaluation["eval_return_ci_low"],
            "return_ci_high": evaluation["eval_return_ci_high"], "return_std": evaluation["eval_return_std"],
            "episode_length": evaluation["eval_episode_length"]}


@dataclasses.dataclass
class RunUnderTest:
    """A run's policy and how it is scored."""

    run_dir: Path
    """The run directory, checkpoint file or ``.safetensors`` policy it was given as."""
    policy: Any
    """The :class:`diffgym.policy.Policy` of the chosen checkpoint."""
    episodes: int
    seed: int
    """The evaluation seed of every point (``evaluate_policy``'s ``seed``)."""
    nominal: dict[str, float]


def sweep(runs: Sequence[RunUnderTest], variations: Sequence[Variation], checkpoint: str = "final",
          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score every run at every grid point of every variation; the results :func:`write_outputs` writes.
    ``checkpoint`` names which of each run's checkpoints ``runs`` hold (``final`` or ``best``).

    ``results["parameters"][name]`` holds the grid (``values``), each run's points (``runs``, one list per
    run, in ``runs`` order) and, per metric, the IQM across runs with its interval (``iqm``)."""
    from diffgym.policy_commands import evaluate

    parameters: dict[str, Any] = {}
    for variation in variations:
        nominals = [run.nominal[variation.name] for run in runs]
        values = variation.values(nominals)
        per_run = []
        for run in runs:
            if progress is not None:
                progress(f"{run.run_dir}: {variation.name} at {len(values)} values, {run.episodes} episodes each")
            per_run.append([point_result(value, evaluate(run.policy, run.episodes, run.seed,
                                                         physics={variation.name: value}),
                                         run.episodes, run.nominal[variation.name])
                            for value in values])
        iqm = {}
        for metric in METRICS:
            scores = np.array([[point[metric] for point in points] for points in per_run])
            centre, low, high = iqm_with_ci({metric: scores})[metric]
            iqm[metric] = [float(v) for v in centre]
            iqm[f"{metric}_ci_low"] = [float(v) for v in low]
            iqm[f"{metric}_ci_high"] = [float(v) for v in high]
        parameters[variation.name] = {"low": variation.low, "high": variation.high, "points": variation.points,
                                      "values": values, "nominal": sorted(set(nominals)), "runs": per_run,
                                      "iqm": iqm}
    first = runs[0].policy.config
    return {"env_id": first.env_id, "checkpoint": checkpoint, "algos": sorted({run.policy.config.algo for run in runs}),
            "success_interval": SUCCESS_INTERVAL, "return_interval": RETURN_INTERVAL, "across_runs": ACROSS_RUNS,
            "runs": [{"run_dir": str(run.run_dir), "algo": run.policy.config.algo, "seed": run.policy.config.seed,
                      "checkpoint": str(run.policy.checkpoint), "env_steps": run.policy.env_steps,
                      "episodes": run.episodes, "eval_seed": run.seed, "nominal": run.nominal,
                      "wrappers": dict(run.policy.config.wrappers)} for run in runs],
            "parameters": parameters}


def _interval(centre: float, low: float, high: float, digits: int) -> str:
    return f"{centre:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown_table(results: Mapping[str, Any]) -> str:
    """Per parameter, a table of success and return against its value (``*``: a run's nominal value).
    One run: its own intervals over episodes; several: the IQM across runs and each run's success."""
    runs = results["runs"]
    several = len(runs) > 1
    episodes = sorted({run["episodes"] for run in runs})
    lines = [f"# Robustness: {', '.join(results['algos'])} on {results['env_id']}, {results['checkpoint']} checkpoint, "
             f"{len(runs)} run(s), {'/'.join(map(str, episodes))} episodes per point", ""]
    if several:
        lines.append(f"Success and return: {ACROSS_RUNS}; per run: each run's success rate in run order.")
    else:
        lines.append(f"Success: {SUCCESS_INTERVAL}; return: {RETURN_INTERVAL}.")
    for name, parameter in results["parameters"].items():
        nominal = ", ".join(f"{v:g}" for v in parameter["nominal"])
        lines += ["", f"## {name} (nominal {nominal}, marked *)", ""]
        header = f"| {name} | success | return |" + (" success per run |" if several else "")
        lines += [header, "|---:|---|---|" + ("---|" if several else "")]
        for i, value in enumerate(parameter["values"]):
            mark = " *" if any(points[i]["nominal"] for points in parameter["runs"]) else ""
            if several:
                iqm = parameter["iqm"]
                success = _interval(iqm["success_rate"][i], iqm["success_rate_ci_low"][i],
                                    iqm["success_rate_ci_high"][i], 2)
                ret = _interval(iqm["return"][i], iqm["return_ci_low"][i], iqm["return_ci_high"][i], 2)
                each = " ".join(f"{points[i]['success_rate']:.2f}" for points in parameter["runs"])
                lines.append(f"| {value:g}{mark} | {success} | {ret} | {each} |")
            else:
                point = parameter["runs"][0][i]
                success = _interval(point["success_rate"], point["success_ci_low"], point["success_ci_high"], 2)
                ret = _interval(point["return"], point["return_ci_low"], point["return_ci_high"], 2)
                lines.append(f"| {value:g}{mark} | {success} | {ret} |")
    return "\n".join(lines) + "\n"


def plot_parameter(results: Mapping[str, Any], name: str, path: Path) -> None:
    """Success and return against ``name``'s value, side by side: one run with its intervals over
    episodes, or each run's curve (thin) under the IQM across runs with its interval; the nominal values
    as dashed vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parameter = results["parameters"][name]
    values = np.array(parameter["values"])
    runs = parameter["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for ax, (metric, label) in zip(axes, (("success_rate", "success rate"), ("return", "mean return"))):
        low_key, high_key = (("success_ci_low", "success_ci_high") if metric == "success_rate"
                             else ("return_ci_low", "return_ci_high"))
        if len(runs) == 1:
            points = runs[0]
            ax.plot(values, [p[metric] for p in points], marker="o", label=Path(results["runs"][0]["run_dir"]).name)
            ax.fill_between(values, [p[low_key] for p in points], [p[high_key] for p in points], alpha=0.25,
                            label="95 % CI over episodes")
        else:
            for points in runs:
                ax.plot(values, [p[metric] for p in points], color="0.6", linewidth=0.8, alpha=0.7)
            iqm = parameter["iqm"]
            ax.plot(values, iqm[metric], marker="o", label=f"IQM of {len(runs)} runs")
            ax.fill_between(values, iqm[f"{metric}_ci_low"], iqm[f"{metric}_ci_high"], alpha=0.25,
                            label="95 % bootstrap CI")
        for i, nominal in enumerate(parameter["nominal"]):
            ax.axvline(nominal, color="0.35", linestyle="--", linewidth=1, label="nominal" if i == 0 else None)
        ax.set_xlabel(name)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(-0.05, 1.05)
    fig.suptitle(f"{', '.join(results['algos'])} on {results['env_id']}: robustness to {name}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``robustness.json`` (every value of every run), ``robustness.md`` (:func:`markdown_table`) and one
    ``robustness_<param>.png`` per parameter in ``out_dir``; returns what was written, by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "robustness.json", "table": out / "robustness.md"}
    written["json"].write_text(json.dumps(results, indent=2) + "\n")
    written["table"].write_text(markdown_table(results))
    for name in results["parameters"]:
        written[f"plot {name}"] = out / f"robustness_{name}.png"
        plot_parameter(results, name, written[f"plot {name}"])
    return written
