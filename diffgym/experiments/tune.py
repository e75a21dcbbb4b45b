"""``diffgym tune``: Optuna hyperparameter search over a trainer's own settings on one task.

What is searched is the trainer plugin's business: it exposes ``suggest_hyperparams(trial, env_id)``,
returning dotted :class:`TrainConfig` overrides drawn with Optuna's ``trial.suggest_*`` (its
``algo_params`` and ``num_envs``; the shared policy, normalizer and optimizer specs stay shared). The
search is rl-zoo's: a TPE sampler and a median pruner on the evaluation curve (compared evaluation by evaluation,
pruning after the evaluations of the first third of the budget once five trials have finished). Each trial
is an ordinary run (``<out>/runs/trial_<n>``) executed through the sweep
:class:`~diffgym.experiments.sweep.Runner`, so trials run in parallel like compare/ablate runs; inside the
worker a :func:`~diffgym.training.run.log_hook` reports every evaluation to the trial and stops the run
when the pruner says so.

The objective is the area under the evaluation curve: the mean of ``eval_success_rate`` over the
run's evaluations (``--metric success``; rewards solving early and staying solved), or of
``eval_return`` (``--metric return``, for tasks where nothing succeeds yet); with the geometric
evaluation schedule (``--eval-schedule geometric``), whose points are dense early, that mean weighs
early learning more, like an area under the curve on a log env-step axis. The study lives in
``<out>/study.log`` (Optuna's journal storage), so re-running the command continues it. Outputs:
``trials.md`` (every trial), ``best.yaml`` (the winner's overrides and value) and the table on stdout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from diffgym.experiments.sweep import LocalRunner, Runner, train_one
from diffgym.plugins import load_trainer, resolve_config
from diffgym.training.run import read_metrics
from diffgym.training.spec import TrainConfig, task_name

METRICS = {"success": "eval_success_rate", "return": "eval_return"}


class _Pruned(Exception):
    """Raised inside a trial's run by the log hook; ends the run early."""


def _storage(path: Path):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def _pruner(warmup_steps: int):
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=warmup_steps)


def run_trial(config_dict: dict, storage_path: str, study_name: str, trial_id: int, metric: str,
              threads: int | None = None) -> dict[str, Any]:
    """The unit of work of a tuning sweep (runs in a worker): train (with ``threads`` torch threads),
    reporting the running mean of the metric at every evaluation; stop when the pruner says so."""
    import optuna

    from diffgym.training.run import log_hook

    config = TrainConfig.from_dict(config_dict)
    # the pruner is not stored with the study: the worker's must be the driver's
    study = optuna.load_study(study_name=study_name, storage=_storage(Path(storage_path)),
                              pruner=_pruner(_pruning_warmup(config)))
    trial = optuna.trial.Trial(study, trial_id)
    key = METRICS[metric]
    seen: list[float] = []

    def report(env_steps: int, scalars: dict[str, float]) -> None:
        if key not in scalars:
            return
        seen.append(scalars[key])
        # the step is the evaluation's index: trials with other rollout sizes evaluate at slightly
        # different env steps, and the median pruner only compares values reported at equal steps
        trial.report(sum(seen) / len(seen), len(seen) - 1)
        if env_steps < config.total_env_steps and trial.should_prune():  # a finished run stays finished
            raise _Pruned(f"pruned at {env_steps} env steps")

    pruned, error = False, None
    with log_hook(report):
        try:
            train_one(config_dict, progress=False, threads=threads)
        except _Pruned:
            pruned = True
        except Exception as failure:  # one failing trial must not stop the study: it is recorded as failed
            error = f"{type(failure).__name__}: {failure}"
    value = sum(seen) / len(seen) if seen and error is None else math.nan
    return {"pruned": pruned, "value": value, "env_steps": _last_env_steps(config.run_dir), "error": error}


def _pruning_warmup(config) -> int:
    """The evaluations the pruner waits for: those in about the first third of the budget."""
    if config.eval_schedule == "linear":  # a third of the evaluations at every multiple of the interval
        return (config.total_env_steps // config.eval_every_env_steps + 1) // 3
    # the geometric schedule packs most of its evaluations early: count them up to a third of the budget
    return sum(3 * point <= config.total_env_steps for point in config.evaluation_points())


def _last_env_steps(run_dir: str | None) -> int:
    try:
        rows = read_metrics(Path(run_dir))
    except (OSError, ValueError, TypeError):
        return 0
    return int(rows[-1]["env_steps"]) if rows else 0


def tune(env_id: str, algo: str, trials: int, env_steps: int, out_dir: str | Path, runner: Runner | None = None,
         metric: str = "success", seed: int = 0, eval_every: int | None = None, workers: int = 2,
         overrides: Mapping[str, Any] | None = None) -> Path:
    """Run (or continue) the study until it holds ``trials`` finished (complete, pruned or failed)
    trials; write the reports."""
    import optuna

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    trainer = load_trainer(algo)
    if not hasattr(trainer, "suggest_hyperparams"):
        raise TypeError(f"trainer {algo!r} has no suggest_hyperparams(trial, env_id): it does not define a "
                        "search space for diffgym tune")
    out = Path(out_dir).resolve()  # trials may run in workers with another working directory
    out.mkdir(parents=True, exist_ok=True)
    runner = runner or LocalRunner(workers)
    if not getattr(runner, "files_shared_with_workers", True):
        raise ValueError("tune on a multi-node Ray cluster needs --shared-out: every trial reads and writes the "
                         f"study journal {out / 'study.log'} and its run directory under {out / 'runs'}")
    device = getattr(runner, "run_device", None)  # e.g. the GPU a Ray runner reserves for each trial
    batch = max(1, getattr(runner, "workers", workers))
    evaluations = 10
    eval_every = eval_every or max(1, env_steps // evaluations)
    study_name = f"{algo}__{task_name(env_id)}"
    schedule = resolve_config(algo, env_id, {**(overrides or {}), "total_env_steps": env_steps,
                                             "eval_every_env_steps": eval_every})  # every trial's evaluations
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name, storage=_storage(out / "study.log"), load_if_exists=True, direction="maximize",
        pruner=_pruner(_pruning_warmup(schedule)))
    # seeded by what the study already holds, so a continued study does not redraw its first settings
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials),
                                               n_startup_trials=min(8, max(1, trials // 3)))
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)  # an interrupted earlier invocation
    # failed trials count too (as in Optuna's own optimize(n_trials)): a region of the search space that
    # always fails must not keep the study asking forever
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    while (done := len(study.get_trials(deepcopy=False, states=finished))) < trials:
        asked = [study.ask() for _ in range(min(batch, trials - done))]
        items, to_run = [], []
        for trial in asked:
            suggested = trainer.suggest_hyperparams(trial, env_id)
            try:
                config = resolve_config(algo, env_id, {
                    **(overrides or {}), **suggested, "seed": seed, "total_env_steps": env_steps,
                    "eval_every_env_steps": eval_every, "run_dir": str(out / "runs" / f"trial_{trial.number:03d}"),
                    **({"device": device} if device else {})})
            except (KeyError, TypeError, ValueError) as error:  # the trainer's search space, not the user's flags
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                message = error.args[0] if isinstance(error, KeyError) and error.args else error
                raise ValueError(f"the search space of trainer {algo!r} (suggest_hyperparams) drew a setting it "
                                 f"cannot run: {message}") from None
            trial.set_user_attr("overrides", suggested)
            trial.set_user_attr("setting", _setting(config))
            earlier = _same_setting(study, trial.user_attrs["setting"], asked)
            if earlier is not None:  # the same config, seed and schedule would only repeat the earlier run
                trial.set_user_attr("repeat_of", earlier.number)
                for step, value in earlier.intermediate_values.items():  # its curve, for the pruner and TPE
                    trial.report(value, step)
                study.tell(trial, earlier.value if earlier.state == optuna.trial.TrialState.COMPLETE else None,
                           state=earlier.state)
                continue
            to_run.append(trial)
            items.append((config.to_dict(), str(out / "study.log"), study_name, trial._trial_id, metric,
                          getattr(runner, "threads", None)))
        results = runner.map(run_trial, items, lambda i, r: (
            f"trial {to_run[i].number}: failed: {r['error']}" if r["error"] else
            f"trial {to_run[i].number}: {'pruned' if r['pruned'] else 'done'} at {r['env_steps']:,} env steps, "
            f"{metric} AUC {r['value']:.3f}"), names=[f"trial {t.number}" for t in to_run]) if items else []
        for trial, result in zip(to_run, results):
            if result["pruned"]:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            elif math.isfinite(result["value"]):
                study.tell(trial, result["value"])
            else:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return write_reports(study, out, env_id, algo, env_steps, metric, seed)


def _setting(config: TrainConfig) -> str:
    """What a trial's run depends on: its whole config but the run directory, as canonical JSON."""
    return json.dumps({**config.to_dict(), "run_dir": None}, sort_keys=True)


def _same_setting(study, setting: str, asked: Sequence[Any]):
    """The earliest finished (complete or pruned) trial of ``study`` whose run had the config ``setting``
    (:func:`_setting`), or ``None``. TPE draws the same setting again in small categorical spaces; on one
    device, with the same seed, threads and evaluation schedule, its run would repeat the earlier one's, so
    the study takes that result instead of spending the env steps again. A continued study with another
    budget, seed or ``--set`` has other configs and reuses nothing. (Trials asked in the same batch are not
    compared: none of them has a result yet.)"""
    import optuna

    pending = {trial.number for trial in asked}
    for earlier in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                             optuna.trial.TrialState.PRUNED)):
        if earlier.number not in pending and earlier.user_attrs.get("setting") == setting:
            return earlier
    return None


def write_reports(study, out: Path, env_id: str, algo: str, env_steps: int, metric: str, seed: int) -> Path:
    import optuna

    rows = ["| trial | state | value | env steps | overrides |", "|---:|---|---:|---:|---|"]
    for t in sorted(study.get_trials(deepcopy=True), key=lambda t: t.number):
        value = f"{t.value:.3f}" if t.value is not None else "-"
        steps = _last_env_steps(str(out / "runs" / f"trial_{t.number:03d}"))
        state = t.state.name.lower()
        if "repeat_of" in t.user_attrs:
            state += f" (repeat of trial {t.user_attrs['repeat_of']}: its result, not run again)"
        rows.append(f"| {t.number} | {state} | {value} | {steps:,} | "
                    f"{json.dumps(t.user_attrs.get('overrides', {}), sort_keys=True)} |")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    header = (f"# {task_name(env_id)}: tuning {algo} ({len(study.trials)} trials, {env_steps:,} env steps each, "
              f"seed {seed}, objective: mean {METRICS[metric]} over the evaluations)\n\n")
    report = out / "trials.md"
    report.write_text(header + "\n".join(rows) + "\n")
    if complete:
        best = study.best_trial
        (out / "best.yaml").write_text(yaml.safe_dump({
            "env_id": env_id, "algo": algo, "objective": f"mean {METRICS[metric]} over evaluations",
            "value": float(best.value), "trial": best.number, "trials": len(study.trials),
            "env_steps": env_steps, "seed": seed, "overrides": best.user_attrs.get("overrides", {})}, sort_keys=False))
    return report
