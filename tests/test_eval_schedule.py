"""The evaluation schedule (``TrainConfig.eval_schedule``): linear as before, geometric dense early, the
same points for every trainer, continued on resume; and every simulated training step is a logged env
step (``docs/protocol.md``, "The measurement")."""

from __future__ import annotations

import pytest

import diffgym  # noqa: F401  (registers the tasks)
from diffgym.plugins import load_trainer, resolve_config
from diffgym.testing import counting_simulated_steps
from diffgym.training import EvaluationCadence, TrainConfig
from diffgym.training.run import read_metrics
from tests.conftest import TINY_RUNS

ENV = "DiffGym/PointMass1D-v0"
NUM_ENVS, EVAL_EPISODES = 4, 3  # different, so evaluation envs are told apart from training envs by size
GEOMETRIC = {"eval_schedule": "geometric", "eval_first_env_steps": 8, "eval_growth": 2.0, "eval_every_env_steps": 64}
POINTS = [0, 8, 16, 32, 64, 128, 192, 200]
"""The geometric schedule above over 200 env steps: doubling from 8 until a gap would reach 64, then every
64, and the budget; all whole vector steps of 4 envs, so every trainer evaluates exactly there."""
def schedule(**fields) -> TrainConfig:
    return TrainConfig(algo="x", env_id=ENV, **fields)


def test_linear_schedule_is_every_multiple_of_the_interval():
    config = schedule(total_env_steps=1_000, eval_every_env_steps=300)
    assert config.eval_schedule == "linear"  # the default
    assert config.evaluation_points() == [0, 300, 600, 900, 1_000]
    assert [config.next_evaluation(e) for e in (0, 299, 300, 301, 900)] == [300, 300, 600, 600, 1_200]


def test_geometric_schedule_is_dense_early_and_never_sparser_than_the_interval():
    config = schedule(total_env_steps=200, **GEOMETRIC)
    assert config.evaluation_points() == POINTS
    big = schedule(total_env_steps=1_000_000, eval_every_env_steps=50_000, eval_schedule="geometric")
    points = big.evaluation_points()
    assert points[:4] == [0, 1_000, 1_250, 1_562]  # from eval_first_env_steps, x eval_growth (1.25), rounded
    gaps = [b - a for a, b in zip(points, points[1:])]
    assert max(gaps) == 50_000 and gaps[1:-1] == sorted(gaps[1:-1])  # growing up to the interval; then the budget
    assert sum(point < 50_000 for point in points) == 19  # where the linear schedule has one, at 0
    # the next point after any env step is the first point past it, wherever the run stands
    for env_steps in (0, 999, 1_000, 1_001, 250_000, 261_594, 961_000):
        assert big.next_evaluation(env_steps) == min(p for p in points[:-1] if p > env_steps)
    # a first point beyond the interval starts at the interval: never sparser than the linear schedule
    assert schedule(total_env_steps=100, eval_every_env_steps=10, eval_schedule="geometric",
                    eval_first_env_steps=500).evaluation_points()[:2] == [0, 10]


@pytest.mark.parametrize("fields, message", [
    ({"eval_schedule": "log"}, "eval_schedule must be one of ('linear', 'geometric'), got 'log'"),
    ({"eval_growth": 1.0}, "eval_growth must be a number > 1, got 1.0"),
    ({"eval_first_env_steps": 0}, "eval_first_env_steps must be >= 1, got 0"),
])
def test_bad_schedule_settings_are_one_line_errors(fields, message):
    with pytest.raises(ValueError) as error:
        schedule(**fields)
    assert str(error.value) == message


def test_a_resumed_cadence_continues_the_schedule():
    config = schedule(total_env_steps=200, **GEOMETRIC)
    assert EvaluationCadence(config).next_eval == 0  # a fresh run evaluates its untrained policy
    assert EvaluationCadence(config, 16).next_eval == 32  # resumed after its evaluation at 16
    assert EvaluationCadence(config, 0, resumed=True).next_eval == 8  # resumed after the one at 0
    cadence = EvaluationCadence(config, 64)
    assert (cadence.next_eval, cadence.steps_to_next(64, NUM_ENVS)) == (128, 16)


@pytest.mark.parametrize("algo", ["apg", "apg-ppo", "ppo"])
def test_every_simulated_training_step_is_a_logged_env_step(algo, tmp_path, one_thread):
    """Each bundled trainer evaluates at the geometric schedule's points, and the env steps it logs are
    exactly the steps its training envs simulated; evaluation episodes run in envs of their own, one per
    evaluation, and are not training env steps."""
    config = resolve_config(algo, ENV, {**GEOMETRIC, **TINY_RUNS[algo], "num_envs": NUM_ENVS, "total_env_steps": 200,
                                        "eval_episodes": EVAL_EPISODES, "run_dir": str(tmp_path / algo)})
    with counting_simulated_steps() as count:
        load_trainer(algo).train(config, progress=False)
    rows = read_metrics(tmp_path / algo)
    evaluations = [r["env_steps"] for r in rows if "eval_success_rate" in r]
    assert evaluations == POINTS
    assert [steps for n, steps in count.per_sim() if n == NUM_ENVS] == [200]  # one training env, every step logged
    assert max(r["env_steps"] for r in rows) == 200
    evaluation_steps = [steps for n, steps in count.per_sim() if n == EVAL_EPISODES]
    assert len(evaluation_steps) == len(POINTS) and all(steps % EVAL_EPISODES == 0 for steps in evaluation_steps)


@pytest.mark.parametrize("algo", ["apg", "ppo"])
def test_a_resumed_run_continues_the_geometric_schedule(algo, tmp_path, one_thread):
    changes = {**GEOMETRIC, **TINY_RUNS[algo], "num_envs": NUM_ENVS, "eval_episodes": EVAL_EPISODES,
               "run_dir": str(tmp_path / algo)}
    trainer = load_trainer(algo)
    trainer.train(resolve_config(algo, ENV, {**changes, "total_env_steps": 24}), progress=False)
    trainer.train(resolve_config(algo, ENV, {**changes, "total_env_steps": 200}), progress=False)
    evaluations = [r["env_steps"] for r in read_metrics(tmp_path / algo) if "eval_success_rate" in r]
    assert evaluations == [0, 8, 16, 24, 32, 64, 128, 192, 200]  # the first run's budget, then the schedule



def test_tuning_prunes_after_the_evaluations_of_the_first_third_of_the_budget():
    from diffgym.experiments.tune import _pruning_warmup

    assert _pruning_warmup(schedule(total_env_steps=100_000, eval_every_env_steps=10_000)) == 3  # as before
    geometric = schedule(total_env_steps=60_000, eval_every_env_steps=3_000, eval_schedule="geometric")
    # 0, 1,000, ..., 14,540, 17,540 are the 15 points up to 20,000: the pruner may stop a trial from 20,540 on
    assert _pruning_warmup(geometric) == 15


def test_the_command_line_help_shows_the_configs_schedules_and_defaults():
    """The flags' help spells them out (importing the config there would import torch): they must agree."""
    from diffgym.commands.options import SCHEDULE_DEFAULTS
    from diffgym.training.spec import EVAL_SCHEDULES

    default = TrainConfig(algo="x", env_id=ENV)
    assert SCHEDULE_DEFAULTS["eval_schedule"] == EVAL_SCHEDULES and EVAL_SCHEDULES[0] == default.eval_schedule
    assert SCHEDULE_DEFAULTS["eval_first_env_steps"] == f"{default.eval_first_env_steps:,}"
    assert SCHEDULE_DEFAULTS["eval_growth"] == str(default.eval_growth)


def test_a_run_may_continue_under_another_schedule():
    """Like the interval, the schedule may change when a run continues (``diffgym train`` on its run
    directory, a sweep with ``--extend``); a sweep refuses it unless asked (``reuse_plan``)."""
    from diffgym.experiments.training_runs import schedule_changes
    from diffgym.training.run import config_differences

    linear = schedule(total_env_steps=200)
    geometric = linear.replace(**GEOMETRIC)
    assert config_differences(linear.to_dict(), geometric.to_dict()) == []
    assert schedule_changes(linear, geometric) == [
        "eval_every_env_steps 50,000 -> 64", "eval_schedule linear -> geometric", "eval_first_env_steps 1,000 -> 8",
        "eval_growth 1.25 -> 2.0"]
    # the geometric schedule's own settings change nothing under the linear one
    assert schedule_changes(linear, linear.replace(eval_growth=3.0)) == []
