"""diffgym robustness: a trained policy's success and return across a physical parameter's range, on a
tiny APG run of PointMass1D (trained at mass 1): the nominal point is `diffgym eval`'s fresh-seed result,
a mass the policy cannot move changes the result, several runs aggregate by their IQM, and every
refusal is one line, exit 2, before anything is evaluated."""

from __future__ import annotations

import json
import shutil

import gymnasium as gym
import numpy as np
import pytest
import yaml

from diffgym import policy_commands
from diffgym.cli import main
from diffgym.experiments.robustness import Variation, point_result, wilson_interval
from diffgym.plugins import load_trainer, resolve_config
from diffgym.training.run import evaluation_milestones, read_metrics

POINT_MASS = "DiffGym/PointMass1D-v0"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # rollout reuse solves PointMass1D within 2,000 env steps (docs/results.md): about two seconds here
    config = resolve_config("apg", POINT_MASS, {"total_env_steps": 2000, "eval_every_env_steps": 1000,
                                                "eval_episodes": 16, "algo_params.reuse.epochs": 4,
                                                "run_dir": str(tmp_path_factory.mktemp("apg") / "run")})
    return load_trainer("apg").train(config, progress=False)


def one_line_error(capsys, argv: list[str]) -> str:
    """Run ``argv``; it must fail with exit status 2 and one line on stderr, which is returned."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, (code, err)
    assert err.startswith("diffgym robustness: "), err
    return err


def test_wilson_interval_matches_its_closed_form_at_the_edges():
    # the textbook values for 0 and 10 successes of 10: the interval is not empty where a normal one is
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert low == pytest.approx(0.7225, abs=1e-4) and high == 1.0
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)


def test_the_grid_includes_the_nominal_value_once():
    assert Variation("mass", 0.5, 2.0, 3).values([1.0]) == [0.5, 1.0, 1.25, 2.0]
    assert Variation("mass", 0.5, 2.0, 4).values([1.0, 1.0]) == [0.5, 1.0, 1.5, 2.0]
    assert Variation("mass", 2.0, 3.0, 2).values([1.0]) == [2.0, 3.0]  # outside the range: not added
    # the values asked for, not linspace's float noise (0.7999999999999999, 0.9999999999999999)
    assert Variation("gain", 0.1, 2.0, 20).values([1.0]) == [round(0.1 * k, 1) for k in range(1, 21)]



def test_the_nominal_point_is_the_one_equal_at_float32():
    # 5000.04 is another float32 than 5000 (its neighbours there are 0.0005 apart), but within rtol 1e-5
    assert Variation("contact_stiffness", 4000.0, 6000.0, 3).values([5000.04]) == [4000.0, 5000.0, 5000.04, 6000.0]
    # a value the float32 env cannot tell from the grid's adds no point
    assert Variation("mass", 0.5, 2.0, 3).values([1.25 + 1e-9]) == [0.5, 1.25, 2.0]
    evaluation = {"eval_success_rate": 0.5, "eval_return": 1.0, "eval_return_ci_low": 0.0, "eval_return_ci_high": 2.0,
                  "eval_return_std": 1.0, "eval_episode_length": 10.0}
    assert not point_result(5000.0, evaluation, 10, nominal=5000.04)["nominal"]
    assert point_result(5000.04, evaluation, 10, nominal=5000.04)["nominal"]
    assert point_result(0.3, evaluation, 10, nominal=float(np.float32(0.3)))["nominal"]


def test_the_physics_set_at_reset_survives_autoresets():
    venv = gym.make_vec(POINT_MASS, num_envs=2, vectorization_mode="vector_entry_point", max_episode_steps=2)
    venv.reset(seed=0, options={"physics": {"mass": np.array([2.0, 0.5], dtype=np.float32)}})
    push = np.ones((2, 1), dtype=np.float32)
    for _ in range(3):  # two steps end the episodes, the third is the autoreset (NEXT_STEP)
        venv.step(push)
    obs, *_ = venv.step(push)  # the first step of the second episodes, from rest
    np.testing.assert_allclose(obs[:, 1], [1.0 / 2.0 * 0.05, 1.0 / 0.5 * 0.05], rtol=1e-6)
    np.testing.assert_allclose(venv.get_physics()["mass"].numpy(), [2.0, 0.5])
    venv.close()


def test_robustness_scores_each_mass_and_its_nominal_point_is_evals(run, tmp_path, capsys):
    out = tmp_path / "robustness"
    argv = ["robustness", str(run), "--vary", "mass=0.5:100:2", "--episodes", "16", "--checkpoint", "best",
            "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    results = json.loads((out / "robustness.json").read_text())
    assert (out / "robustness.md").read_text() == table and (out / "robustness_mass.png").stat().st_size > 1000
    assert "| 1 * |" in table and "| 100 |" in table
    mass = results["parameters"]["mass"]
    assert mass["values"] == [0.5, 1.0, 100.0] and mass["nominal"] == [1.0]
    (points,) = mass["runs"]
    assert [p["nominal"] for p in points] == [False, True, False]
    for p in points:
        assert 0.0 <= p["success_ci_low"] <= p["success_rate"] <= p["success_ci_high"] <= 1.0
        assert p["return_ci_low"] <= p["return"] <= p["return_ci_high"]
    by_mass = {p["value"]: p for p in points}
    best = evaluation_milestones(read_metrics(run))["best"]
    assert results["runs"][0]["env_steps"] == best and results["checkpoint"] == "best"
    # trained at 1 kg it succeeds there; a 100 kg mass moves at most 12.5 cm in an episode at full force
    assert by_mass[1.0]["success_rate"] >= 0.9
    assert by_mass[100.0]["success_rate"] <= 0.2 and by_mass[100.0]["success_ci_high"] < by_mass[1.0]["success_ci_low"]
    assert by_mass[100.0]["return"] < by_mass[1.0]["return"]
    # the nominal point is `diffgym eval`'s fresh-seed result (same default seed, same episodes)
    assert main(["eval", str(run), "--step", str(best), "--episodes", "16", "--json", str(tmp_path / "eval.json")]) == 0
    fresh = json.loads((tmp_path / "eval.json").read_text())["fresh_seeds"]
    assert by_mass[1.0]["success_ci_low"] <= fresh["eval_success_rate"] <= by_mass[1.0]["success_ci_high"]
    assert by_mass[1.0]["return"] == pytest.approx(fresh["eval_return"], rel=1e-6)


def test_several_runs_aggregate_by_their_iqm(run, tmp_path, capsys):
    runs = tmp_path / "runs"
    final, earlier = runs / "final", runs / "earlier"
    shutil.copytree(run, final)
    shutil.copytree(run, earlier)
    for path in sorted((earlier / "checkpoints").glob("step_*.pt"))[1:]:
        path.unlink()  # this copy's latest policy is its first checkpoint's: another policy than the original's
    assert main(["robustness", str(final), str(earlier), "--vary", "mass=0.5:2:2", "--episodes", "8"]) == 0
    assert "| success per run |" in capsys.readouterr().out
    results = json.loads((runs / "robustness" / "robustness.json").read_text())  # the runs' common parent
    assert [r["run_dir"] for r in results["runs"]] == [str(final), str(earlier)]
    assert results["runs"][0]["env_steps"] > results["runs"][1]["env_steps"]
    mass = results["parameters"]["mass"]
    assert len(mass["runs"]) == 2 and all(len(points) == 3 for points in mass["runs"])
    for metric in ("success_rate", "return"):
        per_run = np.array([[p[metric] for p in points] for points in mass["runs"]])
        # with two runs the interquartile mean trims nothing: it is their mean
        np.testing.assert_allclose(mass["iqm"][metric], per_run.mean(axis=0), rtol=1e-6)
        assert np.all(np.array(mass["iqm"][f"{metric}_ci_low"]) <= np.array(mass["iqm"][metric]) + 1e-9)


@pytest.mark.parametrize("vary, message", [
    ("stiffness=1:2", "--vary names ['stiffness'], not physical parameters of DiffGym/PointMass1D-v0; its "
                      "parameters: mass"),
    ("mass=2:1", "--vary mass=2:1: LO (2) must be below HI (1)"),
    ("mass=0:2", "--vary mass = [0, 2] leaves DiffGym/PointMass1D-v0's valid range of mass, [0.001, 1000]"),
    ("mass=0.5:2:1", "--vary mass=0.5:2:1: N must be >= 2"),
    ("mass=0.5", "--vary: expected PARAM=LO:HI[:N] such as mass=0.5:2:7, got 'mass=0.5'"),
])
def test_bad_ranges_are_refused_in_one_line_before_any_evaluation(run, vary, message, tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setattr(policy_commands, "evaluate", pytest.fail)
    assert message in one_line_error(capsys, ["robustness", str(run), "--vary", vary, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_what_is_not_a_run_of_a_task_with_parameters_is_refused(run, tmp_path, capsys, monkeypatch):
    from tests import toy_step_reward  # registers a task without physical parameters

    monkeypatch.setattr(policy_commands, "evaluate", pytest.fail)
    assert f"{tmp_path} is not a run directory: it has no config.yaml" in one_line_error(
        capsys, ["robustness", str(tmp_path), "--vary", "mass=0.5:2"])
    toy = tmp_path / "toy"
    toy.mkdir()
    config = yaml.safe_load((run / "config.yaml").read_text())
    (toy / "config.yaml").write_text(yaml.safe_dump({**config, "env_id": toy_step_reward.ENV_ID}))
    assert f"{toy_step_reward.ENV_ID} has no physical parameters" in one_line_error(
        capsys, ["robustness", str(toy), "--vary", "mass=0.5:2"])
    assert "runs are of different tasks" in one_line_error(
        capsys, ["robustness", str(run), str(toy), "--vary", "mass=0.5:2"])
    assert "a run directory is given twice" in one_line_error(
        capsys, ["robustness", str(run), str(run), "--vary", "mass=0.5:2"])
    assert "--episodes must be >= 1, got 0" in one_line_error(
        capsys, ["robustness", str(run), "--vary", "mass=0.5:2", "--episodes", "0"])
    assert "mass is given twice" in one_line_error(
        capsys, ["robustness", str(run), "--vary", "mass=0.5:2", "--vary", "mass=1:3"])
    assert not any(path.name == "robustness" for path in tmp_path.rglob("*"))


def test_a_checkpoint_file_or_safetensors_policy_is_scored_like_its_run(run, tmp_path, capsys, monkeypatch):
    checkpoint = sorted((run / "checkpoints").glob("step_*.pt"))[-1]
    exported = tmp_path / "policy.safetensors"
    assert main(["export", str(run), "--out", str(exported)]) == 0
    scored = {}
    for source in (run, checkpoint, exported):
        out = tmp_path / f"out_{source.name}"
        assert main(["robustness", str(source), "--vary", "mass=0.5:2:2", "--episodes", "4", "--out", str(out)]) == 0
        scored[source] = json.loads((out / "robustness.json").read_text())["parameters"]["mass"]["runs"]
    assert scored[checkpoint] == scored[run] == scored[exported]
    capsys.readouterr()
    monkeypatch.setattr(policy_commands, "evaluate", pytest.fail)
    assert f"{tmp_path / 'nope.pt'} does not exist" in one_line_error(
        capsys, ["robustness", str(tmp_path / "nope.pt"), "--vary", "mass=0.5:2"])
    assert "--checkpoint best picks among a run directory's checkpoints" in one_line_error(
        capsys, ["robustness", str(exported), "--vary", "mass=0.5:2", "--checkpoint", "best"])
