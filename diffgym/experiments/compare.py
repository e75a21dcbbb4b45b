"""``diffgym compare``: algorithms head to head on one task under the evaluation protocol.

Each algorithm trains for the same env-step budget on seeds 0..S-1 with its per-task defaults; every
run is evaluated by ``diffgym.training.evaluation`` at the same env-step interval on the same held-out
seeds. The report has curves against env steps and gradient steps and the cost to reach the success
threshold in env steps, gradient steps and wall-clock, with baseline/contender ratios.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from diffgym.experiments.report import SUCCESS_THRESHOLD, write_report
from diffgym.experiments.sweep import LocalRunner, Runner, save_sweep
from diffgym.experiments.training_runs import reuse_plan
from diffgym.plugins import resolve_config
from diffgym.training.spec import TrainConfig, task_name


def compare_configs(env_id: str, algos: Sequence[str], seeds: int, env_steps: int, out_dir: str | Path,
                    eval_every: int | None = None, overrides: Mapping[str, Any] | None = None) -> list[TrainConfig]:
    """The comparison as a plain list of runs: every algorithm x seed, identical budget and eval schedule."""
    eval_every = eval_every or max(1, env_steps // 20)
    configs = []
    for algo in algos:
        for seed in range(seeds):
            run_dir = Path(out_dir) / "runs" / f"{algo}__s{seed}"
            configs.append(resolve_config(algo, env_id, {
                **(overrides or {}), "seed": seed, "total_env_steps": env_steps,
                "eval_every_env_steps": eval_every, "run_dir": str(run_dir)}))
    return configs


def ratio_roles(algos: Sequence[str], baseline: str | None, contender: str | None) -> tuple[str, str]:
    """``(baseline, contender)`` of the cost ratios: by default the last and the first algorithm."""
    if not algos:
        raise ValueError("compare needs at least one algorithm")
    baseline, contender = baseline or algos[-1], contender or algos[0]
    for role, name in (("baseline", baseline), ("contender", contender)):
        if name not in algos:
            raise ValueError(f"the {role} {name!r} is not one of the compared algorithms {list(algos)}")
    return baseline, contender


def compare(env_id: str, algos: Sequence[str], seeds: int, env_steps: int, out_dir: str | Path,
            runner: Runner | None = None, eval_every: int | None = None,
            threshold: float = SUCCESS_THRESHOLD, baseline: str | None = None, contender: str | None = None,
            overrides: Mapping[str, Any] | None = None, extend: bool = False, log_x: bool = False) -> Path:
    """Every algorithm x seed through ``runner``, then the report; ratios ``baseline/contender`` (by
    default the last and the first of ``algos``). Runs already in ``out_dir`` are reused or resumed (said
    in one line); ones made with another budget or evaluation schedule only with ``extend``
    (:func:`~diffgym.experiments.training_runs.reuse_plan`). ``log_x``: log-scaled step axes."""
    baseline, contender = ratio_roles(algos, baseline, contender)
    configs = compare_configs(env_id, algos, seeds, env_steps, out_dir, eval_every, overrides)
    reused = reuse_plan(configs, extend)
    if reused:
        print(f"compare: {reused}", flush=True)
    save_sweep(configs, Path(out_dir) / "sweep.jsonl")
    run_dirs = (runner or LocalRunner()).run(configs)
    title = f"{task_name(env_id)}: {' vs '.join(algos)} ({seeds} seeds, {env_steps:,} env steps)"
    return write_report(run_dirs, out_dir, title, threshold=threshold, baseline=baseline, contender=contender,
                        log_x=log_x)
