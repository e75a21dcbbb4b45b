"""The policy commands judge a policy on the task it trained on: ``diffgym eval`` applies the run's
``wrappers`` and draws its ``eval_randomize`` as the run's own evaluations did (reproducing the logged
evaluation on the run's seeds), ``--nominal`` drops the draws but keeps the wrappers, and ``diffgym
robustness`` keeps the wrappers while setting the varied parameter in every env, the others nominal."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import diffgym
from diffgym.cli import main
from diffgym.plugins import load_trainer, resolve_config
from diffgym.training.evaluation import evaluate_config, evaluate_policy
from diffgym.training.run import read_metrics

POINT_MASS = "DiffGym/PointMass1D-v0"
PROTOCOL = {"randomize.mass": [0.5, 2.0], "eval_randomize.mass": [0.3, 3.0],
            "wrappers.observation_noise": 0.3, "wrappers.action_delay": 2}
"""A run whose evaluation differs from the nominal, unwrapped task's in every respect the commands must
carry over (the eval mass range reaches past PointNav2D's bounds, for the --env refusal)."""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = resolve_config("apg", POINT_MASS, {
        "num_envs": 4, "total_env_steps": 64, "eval_every_env_steps": 32, "eval_episodes": 6,
        "algo_params.segment_length": 8, **PROTOCOL, "run_dir": str(tmp_path_factory.mktemp("apg") / "run")})
    return load_trainer("apg").train(config, progress=False)


def deterministic(policy):
    return lambda obs: policy.predict(obs, deterministic=True)[0]


def eval_json(run, tmp_path, *flags) -> dict:
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--json", str(out), *flags]) == 0
    return json.loads(out.read_text())


def test_eval_reproduces_the_logged_evaluation_under_the_runs_protocol(run, tmp_path):
    results = eval_json(run, tmp_path)
    last = [row for row in read_metrics(run) if "eval_return" in row][-1]
    assert results["run_seeds"]["eval_return"] == pytest.approx(last["eval_return"], rel=1e-6)
    assert results["run_seeds"]["eval_success_rate"] == last["eval_success_rate"]
    for key in ("eval_physics/mass_mean", "eval_physics/mass_min", "eval_physics/mass_max"):
        assert results["run_seeds"][key] == pytest.approx(last[key])
    assert results["wrappers"] == {"action_delay": 2, "observation_noise": 0.3}
    assert results["eval_randomize"] == {"mass": [0.3, 3.0]}
    # the fresh seeds draw their own masses from their own evaluation seed, exactly as a run of that seed would
    policy = diffgym.load_policy(run)
    fresh_config = dataclasses.replace(policy.config, seed=results["fresh_seeds"]["seed"])
    fresh = evaluate_config(deterministic(policy), fresh_config)
    assert results["fresh_seeds"]["eval_return"] == pytest.approx(fresh["eval_return"], rel=1e-6)
    assert results["fresh_seeds"]["eval_physics/mass_mean"] == pytest.approx(fresh["eval_physics/mass_mean"])
    assert fresh["eval_physics/mass_mean"] != pytest.approx(last["eval_physics/mass_mean"])


def test_nominal_drops_the_draws_and_keeps_the_wrappers(run, tmp_path):
    results = eval_json(run, tmp_path, "--nominal")
    policy = diffgym.load_policy(run)
    nominal = evaluate_config(deterministic(policy), dataclasses.replace(policy.config, eval_randomize={}))
    assert results["run_seeds"]["eval_return"] == pytest.approx(nominal["eval_return"], rel=1e-6)
    assert not any(key.startswith("eval_physics/") for key in results["run_seeds"])
    assert results["eval_randomize"] == {} and results["wrappers"] == {"action_delay": 2, "observation_noise": 0.3}
    unwrapped = evaluate_policy(deterministic(policy), POINT_MASS, policy.config.eval_episodes, policy.config.seed)
    assert results["run_seeds"]["eval_return"] != pytest.approx(unwrapped["eval_return"], rel=1e-6)


def test_robustness_sets_the_varied_mass_everywhere_inside_the_runs_wrappers(run):
    from diffgym.experiments.robustness import RunUnderTest, Variation, sweep

    policy = diffgym.load_policy(run)
    tested = RunUnderTest(run, policy, episodes=6, seed=7, nominal={"mass": 1.0})
    results = sweep([tested], [Variation("mass", 0.5, 2.0, points=2)])
    assert results["runs"][0]["wrappers"] == {"action_delay": 2, "observation_noise": 0.3}
    points = results["parameters"]["mass"]["runs"][0]
    assert [point["value"] for point in points] == [0.5, 1.0, 2.0]
    for point in points:  # not the run's eval_randomize: that one value in every env
        expected = evaluate_policy(deterministic(policy), POINT_MASS, 6, 7, physics={"mass": point["value"]},
                                   wrappers=policy.config.wrappers)
        assert point["return"] == pytest.approx(expected["eval_return"], rel=1e-6)
        assert point["success_rate"] == expected["eval_success_rate"]
    returns = [point["return"] for point in points]
    assert len(set(np.round(returns, 6))) == 3


def test_eval_randomize_another_task_cannot_draw_is_refused_in_one_line(run):
    from diffgym.policy_commands import check_protocol_fits

    policy = diffgym.load_policy(run)
    with pytest.raises(ValueError) as error:
        check_protocol_fits(policy, "DiffGym/PointNav2D-v0")
    message = str(error.value)
    assert "\n" not in message and "eval_randomize.mass" in message and "--nominal" in message
    check_protocol_fits(policy, "DiffGym/PointNav2D-v0", nominal=True)
    check_protocol_fits(policy)


def test_the_video_shows_the_episodes_eval_scores(run, tmp_path, monkeypatch):
    from diffgym.policy_commands import evaluate, record_video

    policy = diffgym.load_policy(run)
    seen: list[np.ndarray] = []
    predict = policy.predict

    def recording_predict(obs, *args, **kwargs):
        seen.append(np.array(obs, copy=True))
        return predict(obs, *args, **kwargs)

    monkeypatch.setattr(policy, "predict", recording_predict)
    evaluate(policy, episodes=2, seed=5)
    scored, seen[:] = list(seen), []
    path = record_video(policy, tmp_path / "episodes.gif", episodes=2, seed=5)
    assert path.stat().st_size > 1000
    # the same noisy observations of the same delayed, randomized episodes, step by step
    assert len(seen) == len(scored)
    for recorded, evaluated in zip(seen, scored):
        np.testing.assert_array_equal(recorded, evaluated)
