"""``diffgym feasibility``'s defaults are the documented references: the README's commands run exactly the
settings, episodes and seeds behind ``docs/feasibility/*.json`` (the planner itself is not run here: the
TPush-v1 reference takes 106 CPU-minutes), and several seeds merge as the documented result was merged."""

import inspect
import json
import re
import shlex
from pathlib import Path

import pytest

from diffgym.experiments import feasibility
from diffgym.experiments.feasibility import merge_seeds, mppi_episodes, planner_settings, run_planner

REPO = Path(__file__).resolve().parents[1]
MPPI_KEYS = ("samples", "horizon", "noise_std", "temperature", "knot_steps", "replan_every", "terminal_weight",
             "fine_noise_std")


def readme_feasibility_commands() -> list[list[str]]:
    """The ``diffgym feasibility`` commands of the README's command list, as argument lists."""
    found = re.findall(r"^\.venv/bin/diffgym (feasibility [^#\n]*)", (REPO / "README.md").read_text(), re.M)
    assert found, "the README lists no diffgym feasibility command"
    return [shlex.split(line) for line in found]


def settings_the_cli_runs(argv: list[str], monkeypatch, tmp_path) -> dict:
    """What ``diffgym <argv>`` hands the planner (the planner replaced by a stub returning a result)."""
    from diffgym.cli import main

    seen = {}

    def planner_stub(env_id, settings, env_kwargs=None, progress=False):
        seen.update(settings)
        return {"env_id": env_id, "planner": settings["planner"], "episodes": 1, "seed": 0, "samples": 1,
                "horizon": 1, "knot_steps": 1, "replan_every": 1, "iterations": 1, "lr": 1.0, "success_rate": 0.0,
                "reached_rate": 0.0, "median_first_success_step": float("nan"), "mean_return": 0.0,
                "return_std": 0.0, "mean_best_return": 0.0, "wall_time": 0.0}

    monkeypatch.setattr(feasibility, "run_planner", planner_stub)
    assert main([*argv, "--out", str(tmp_path)]) == 0
    return seen


def documented(name: str) -> dict:
    return json.loads((REPO / "docs" / "feasibility" / name).read_text())


def assert_runs_reference(settings: dict, reference: dict) -> None:
    """``settings`` produce ``reference``'s episodes with its planner settings."""
    first, seeds = settings["seed"], settings["seeds"]
    ran_seeds = list(range(first, first + seeds))
    assert ran_seeds == reference.get("seeds", [reference.get("seed")])
    assert settings["episodes"] * seeds == reference["episodes"]
    if "episodes_per_seed" in reference:
        assert [settings["episodes"]] * seeds == reference["episodes_per_seed"]
    planner_keys = MPPI_KEYS if settings["planner"] == "mppi" else ("iterations", "lr")
    assert {k: settings[k] for k in planner_keys} == {k: reference[k] for k in planner_keys}


def test_readme_commands_run_the_documented_references(monkeypatch, tmp_path):
    commands = {("--planner" in argv and argv[argv.index("--planner") + 1]) or "mppi": argv
                for argv in readme_feasibility_commands()}
    assert set(commands) == {"mppi", "gradient"}
    mppi = settings_the_cli_runs(commands["mppi"], monkeypatch, tmp_path)
    reference = documented("TPush-v1.json")
    assert_runs_reference(mppi, reference)
    assert inspect.signature(mppi_episodes).parameters["gamma"].default == reference["gamma"]
    assert_runs_reference(settings_the_cli_runs(commands["gradient"], monkeypatch, tmp_path),
                          documented("TPush-v1_gradient.json"))


def test_every_reference_is_its_tasks_default():
    for (env_id, planner), reference in feasibility.REFERENCES.items():
        assert_runs_reference(planner_settings(env_id, planner), json.loads((REPO / reference.result).read_text()))
    generic = planner_settings("DiffGym/PointMass1D-v0")
    assert (generic["episodes"], generic["seeds"], generic["horizon"]) == (256, 1, 16)


def test_documented_single_seed_commands_keep_their_meaning():
    """docs/results.md ran TPush-v1's halves as ``--episodes 128 --seed S``: one seed each, as before."""
    half = planner_settings("DiffGym/TPush-v1", episodes=128, seed=1)
    assert (half["episodes"], half["seeds"], half["seed"], half["horizon"]) == (128, 1, 1, 32)
    assert planner_settings("DiffGym/TPush-v1", seeds=3)["episodes"] == 256


def test_bad_settings_are_one_line(capsys):
    from diffgym.cli import main

    with pytest.raises(ValueError, match="episodes <= 1000 with several seeds"):
        planner_settings("DiffGym/TPush-v1", episodes=1001, seeds=2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["feasibility", "--env", "DiffGym/PointMass1D-v0", "--samples", "1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("diffgym feasibility: need samples >= 2")


def test_merging_the_halves_gives_the_documented_figures():
    """docs/feasibility/TPush-v1.json is seeds 0 and 1 merged; split into its halves and merged again,
    every statistic comes back."""
    reference = documented("TPush-v1.json")
    assert reference["success_rate"] == reference["reached_rate"]  # so each half's success is its reached rate
    halves = []
    for k, seed in enumerate(reference["seeds"]):
        part = slice(128 * k, 128 * (k + 1))
        first_success = reference["first_success_steps"][part]
        halves.append({**{key: reference[key] for key in (*MPPI_KEYS, "env_id", "gamma")}, "seed": seed,
                       "episodes": 128, "success_rate": sum(s > 0 for s in first_success) / 128,
                       "returns": reference["returns"][part], "first_success_steps": first_success,
                       "wall_time": reference["wall_time"] / 2,
                       "env_steps_simulated": reference["env_steps_simulated"] // 2})
    assert [h["success_rate"] for h in halves] == [0.9140625, 0.8671875]  # "91.4 % and 86.7 % per half"
    merged = merge_seeds(halves)
    assert set(merged) == set(reference)
    for key, value in reference.items():
        assert merged[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-12)), key


def test_several_seeds_are_the_single_seed_runs_together():
    short = {"max_episode_steps": 10}  # ten-step episodes: the planner in a fraction of a second
    settings = planner_settings("DiffGym/PointMass1D-v0", episodes=2, seeds=2, seed=3, samples=4, horizon=4)
    together = run_planner("DiffGym/PointMass1D-v0", settings, env_kwargs=short)
    alone = [mppi_episodes("DiffGym/PointMass1D-v0", 2, samples=4, horizon=4, seed=s, env_kwargs=short)
             for s in (3, 4)]
    assert together["returns"] == alone[0]["returns"] + alone[1]["returns"]
    assert together["seeds"] == [3, 4] and together["episodes"] == 4
    assert together["env_steps_simulated"] == sum(r["env_steps_simulated"] for r in alone)
