"""Sweeps, compare and ablate on a scripted trainer: the report's numbers follow from the metrics."""

import json
import math

import pytest

from diffgym.experiments import ablate as ablate_mod
from diffgym.experiments.compare import compare
from diffgym.experiments.report import load_run, threshold_table, group
from diffgym.experiments.sweep import LocalRunner, is_finished, load_sweep, save_sweep
from diffgym.plugins import register_trainer
from diffgym.training.run import Run

ENV = "DiffGym/PointMass1D-v0"


class ScriptedTrainer:
    """Writes an evaluation curve that reaches 100 % success after ``solve_at`` env steps (no learning)."""

    def __init__(self, name: str, solve_at: int, grad_steps_per_eval: int):
        self.name, self.solve_at, self.grad_steps_per_eval = name, solve_at, grad_steps_per_eval

    def default_config(self, env_id):
        return {"num_envs": 4, "algo_params": {"segment_length": 8, "bootstrap": "none"}}

    def train(self, config):
        solve_at = self.solve_at * (1 + config.seed) / config.algo_params["segment_length"] * 8
        with Run(config, progress=False) as run:
            steps = 0
            for i in range(1, config.total_env_steps // config.eval_every_env_steps + 1):
                steps = i * config.eval_every_env_steps
                run.log(steps, i * self.grad_steps_per_eval, eval_return=-1.0 / i,
                        eval_success_rate=float(steps >= solve_at))
        return run.dir


@pytest.fixture
def trainers():
    register_trainer("slow_algo", ScriptedTrainer("slow_algo", solve_at=50_000, grad_steps_per_eval=10))
    register_trainer("fast_algo", ScriptedTrainer("fast_algo", solve_at=5_000, grad_steps_per_eval=100))


def test_compare_report_and_ratios(tmp_path, trainers):
    report = compare(ENV, ["slow_algo", "fast_algo"], seeds=2, env_steps=100_000, out_dir=tmp_path,
                     runner=LocalRunner(workers=1), eval_every=5_000)
    assert report.exists()
    for name in ("eval_success_rate_vs_env_steps.png", "eval_success_rate_vs_grad_steps.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert len(load_sweep(tmp_path / "sweep.jsonl")) == 4
    runs = [load_run(p) for p in sorted((tmp_path / "runs").iterdir())]
    _, summary = threshold_table(group(runs), baseline="slow_algo", contender="fast_algo")
    # seeds 0 and 1 solve at 1x and 2x solve_at: medians 75k (slow) and 7.5k (fast) env steps
    assert summary["slow_algo"]["median_env_steps_to_threshold"] == 75_000
    assert summary["fast_algo"]["median_env_steps_to_threshold"] == 7_500
    assert summary["ratios"]["env_steps"] == pytest.approx(10.0)
    assert summary["ratios"]["grad_steps"] == pytest.approx(150 / 150)  # 10 per 5k vs 100 per 5k steps
    assert json.loads((tmp_path / "summary.json").read_text())["fast_algo"]["reached"] == 2


def test_unreached_threshold_is_reported(tmp_path, trainers):
    report = compare(ENV, ["slow_algo"], seeds=1, env_steps=20_000, out_dir=tmp_path,
                     runner=LocalRunner(workers=1), eval_every=5_000)
    assert "0/1" in report.read_text() and "not reached" in report.read_text()
    run = load_run(tmp_path / "runs" / "slow_algo__s0")
    assert math.isinf(run.steps_to(0.9)["env_steps"])


def test_sweep_round_trip_and_skip_finished(tmp_path, trainers):
    from diffgym.experiments.compare import compare_configs

    configs = compare_configs(ENV, ["fast_algo"], 2, 10_000, tmp_path, eval_every=5_000)
    path = save_sweep(configs, tmp_path / "sweep.jsonl")
    assert [c.to_dict() for c in load_sweep(path)] == [c.to_dict() for c in configs]
    assert not any(is_finished(c) for c in configs)
    LocalRunner(workers=1).run(configs)
    assert all(is_finished(c) for c in configs)


def test_ablate_grid(tmp_path, trainers):
    segments = ablate_mod.parse_segments("8,full", ENV)
    assert segments == [8, 100]
    configs = ablate_mod.ablation_configs(ENV, segments, ["none", "mc"], 1, 20_000, tmp_path, algo="fast_algo")
    assert {(c.algo_params["segment_length"], c.algo_params["bootstrap"]) for c in configs} == {
        (8, "none"), (8, "mc"), (100, "none"), (100, "mc")}
    LocalRunner(workers=1).run(configs)
    runs = [load_run(c.run_dir) for c in configs]
    _, summary = threshold_table(group(runs, ablate_mod.cell), baseline=None, contender=None)
    assert summary["K=8 none"]["median_env_steps_to_threshold"] == 5_000
    assert summary["K=100 mc"]["median_env_steps_to_threshold"] == 1_000  # solved by the first eval (budget/20)


def test_ablate_writes_heatmaps(tmp_path, trainers, monkeypatch):
    original = ablate_mod.ablation_configs
    monkeypatch.setattr(ablate_mod, "ablation_configs", lambda *a, **kw: original(*a, **kw, algo="slow_algo"))
    report = ablate_mod.ablate(ENV, [8, 16], ["none", "critic"], 1, 20_000, tmp_path, LocalRunner(workers=1))
    text = report.read_text()
    assert "K=8 none" in text and "K=16 critic" in text
    assert (tmp_path / "heatmap_final_success.png").exists() and (tmp_path / "heatmap_steps_to_threshold.png").exists()
