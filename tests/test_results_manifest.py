"""``diffgym results``: a manifest of experiments -> runs, reports and the tables of a document."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from diffgym.experiments import report as report_module
from diffgym.experiments.report import iqm_with_ci
from diffgym.experiments.results import config_changes, load_manifest, replace_block, run_experiments, select
from diffgym.experiments.sweep import LocalRunner
from tests.test_experiments import ENV, trainers  # noqa: F401 - the scripted trainers' fixture

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def quick_reports(monkeypatch):
    """Reports without drawing (the plots are compare's, tested there) and with a short bootstrap."""
    monkeypatch.setattr(report_module, "plot_curves", lambda groups, axis, metric, path, *args: path.touch())
    monkeypatch.setattr(report_module, "iqm_with_ci", functools.partial(iqm_with_ci, reps=50))


def manifest(tmp_path: Path, experiments: dict) -> Path:
    path = tmp_path / "results" / "experiments.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"experiments": experiments}, sort_keys=False))
    return path


SCRIPTED = {"title": "scripted", "env": ENV, "seeds": 2, "eval_every": 5000, "baseline": "slow",
            "contender": "fast, K 16", "report_dir": "scripted/report",
            "groups": [{"label": "slow", "algo": "slow_algo", "env_steps": 100000},
                       {"label": "fast, K 16", "algo": "fast_algo", "env_steps": 20000,
                        "set": {"algo_params.segment_length": 16}, "eval_every": 2500}]}


def test_manifest_groups_become_runs_with_their_own_settings(tmp_path, trainers):
    experiment = load_manifest(manifest(tmp_path, {"scripted": SCRIPTED}))["scripted"]
    configs = experiment.configs(tmp_path / "runs")
    assert [Path(c.run_dir).name for c in configs] == ["slow__s0", "slow__s1", "fast_K_16__s0", "fast_K_16__s1"]
    assert [c.total_env_steps for c in configs] == [100000, 100000, 20000, 20000]
    assert [c.eval_every_env_steps for c in configs] == [5000, 5000, 2500, 2500]  # a group's own interval
    assert [c.algo_params["segment_length"] for c in configs] == [8, 8, 16, 16]
    assert experiment.report_dir == tmp_path / "results" / "scripted" / "report"  # beside the manifest
    assert {p.name: label for p, label in experiment.labels(tmp_path / "runs").items()} == {
        "slow__s0": "slow", "slow__s1": "slow", "fast_K_16__s0": "fast, K 16", "fast_K_16__s1": "fast, K 16"}
    assert set(experiment.labels(tmp_path / "runs")) == {Path(c.run_dir) for c in configs}


def test_reports_tables_and_document_blocks_and_a_rerun_trains_nothing(tmp_path, trainers, quick_reports, capsys):
    path = manifest(tmp_path, {"scripted": SCRIPTED})
    document = tmp_path / "results.md"
    document.write_text("intro\n<!-- results: scripted -->\nold table\n<!-- /results: scripted -->\noutro\n")
    experiments = select(load_manifest(path), [])
    reports = run_experiments(experiments, tmp_path / "runs", LocalRunner(workers=1), document)
    summary = json.loads((reports["scripted"].parent / "summary.json").read_text())
    # the scripted trainers solve at (1 + seed) x 50k (slow) and (1 + seed) x 5k x 8/16 (fast, K 16)
    assert summary["slow"]["env_steps_to_threshold"] == [50000, 100000]
    assert summary["fast, K 16"]["env_steps_to_threshold"] == [2500, 5000]
    assert summary["ratios"]["env_steps"] == pytest.approx(75000 / 3750)
    text = document.read_text()
    assert text.startswith("intro\n<!-- results: scripted -->\n| algorithm |") and text.endswith(
        "\n<!-- /results: scripted -->\noutro\n")
    assert "old table" not in text and "Ratio slow/fast, K 16" in text and "| fast, K 16 | 2,500 (" in text
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("metrics.jsonl")}
    run_experiments(experiments, tmp_path / "runs", LocalRunner(workers=1), document)
    out = capsys.readouterr().out
    assert "4 already finished, 0 to run" in out and f"results scripted: table written in {document}" in out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("metrics.jsonl")} == before
    assert document.read_text() == text  # the same runs give the same table, intervals included


def test_a_run_made_with_another_setting_is_refused_naming_it(tmp_path, trainers, quick_reports):
    path = manifest(tmp_path, {"scripted": SCRIPTED})
    experiment = load_manifest(path)["scripted"]
    run_experiments([experiment], tmp_path / "runs", LocalRunner(workers=1))
    changed = {**SCRIPTED, "groups": [{**SCRIPTED["groups"][0], "set": {"algo_params.segment_length": 32}},
                                      SCRIPTED["groups"][1]]}
    experiment = load_manifest(manifest(tmp_path / "changed", {"scripted": changed}))["scripted"]
    assert config_changes(experiment.configs(tmp_path / "runs"))[0][1] == ["algo_params.segment_length"]
    with pytest.raises(ValueError, match=r"slow__s0 was trained with another setting \(algo_params.segment_length\) "
                                         r"\(and 1 more runs\)"):
        run_experiments([experiment], tmp_path / "runs", LocalRunner(workers=1))
    # a field the saved config lacks was added after that run, with the default that kept its behaviour: a
    # difference only where the manifest asks for another value than the trainer's default
    saved = tmp_path / "runs" / "scripted" / "fast_K_16__s0" / "config.yaml"
    data = yaml.safe_load(saved.read_text())
    del data["algo_params"]["bootstrap"], data["algo_params"]["segment_length"]
    saved.write_text(yaml.safe_dump(data))
    original = load_manifest(path)["scripted"]
    assert config_changes(original.configs(tmp_path / "runs")) == [(str(saved.parent), ["algo_params.segment_length"])]
    data["algo_params"]["segment_length"] = 16
    saved.write_text(yaml.safe_dump(data))
    assert config_changes(original.configs(tmp_path / "runs")) == []  # bootstrap absent, "none" is the default


@pytest.mark.parametrize("entry, message", [
    ({"env": ENV, "seeds": 2, "eval_every": 5000}, "experiment 'e': missing key 'groups'"),
    ({**SCRIPTED, "budget": 3}, "experiment 'e': unknown key 'budget'"),
    ({**SCRIPTED, "seeds": [1, 1]}, "seeds must be a positive count or a list of distinct seeds"),
    ({**SCRIPTED, "eval_every": 0}, "eval_every must be a positive whole number, got 0"),
    ({**SCRIPTED, "baseline": "ppo"}, "baseline 'ppo' is not one of the group labels"),
    ({**SCRIPTED, "threshold": 1.5}, r"threshold must be a success rate in \(0, 1\]"),
    ({**SCRIPTED, "report_dir": "../elsewhere"}, "report_dir must be a folder inside"),
    ({**SCRIPTED, "report_dir": "."}, "report_dir must be a folder inside"),
    ({**SCRIPTED, "log_x": "false"}, "log_x must be true or false, got 'false'"),
    ({**SCRIPTED, "groups": [SCRIPTED["groups"][0], SCRIPTED["groups"][0]]}, "group labels must differ"),
    ({**SCRIPTED, "groups": [{"label": "a", "algo": "slow_algo"}]}, "group 1: missing key 'env_steps'"),
    ({**SCRIPTED, "groups": [{**SCRIPTED["groups"][0], "set": ["x=1"]}]}, "set must map dotted config keys"),
    ({**SCRIPTED, "set": {"seed": 3}}, "set names 'seed', which the manifest sets with 'seeds'"),
    ({**SCRIPTED, "groups": [{**SCRIPTED["groups"][0], "label": "a | b"}]}, "label must be text with a letter"),
    ({**SCRIPTED, "groups": [{**SCRIPTED["groups"][0], "label": "%%%"}]}, "label must be text with a letter"),
])
def test_manifest_errors_name_the_experiment_and_the_key(tmp_path, entry, message):
    with pytest.raises(ValueError, match=message):
        load_manifest(manifest(tmp_path, {"e": entry}))


def test_a_shorter_budget_and_a_document_without_the_markers_are_refused_before_training(tmp_path, trainers,
                                                                                          quick_reports):
    path = manifest(tmp_path, {"scripted": SCRIPTED})
    run_experiments(list(load_manifest(path).values()), tmp_path / "runs", LocalRunner(workers=1))
    shorter = {**SCRIPTED, "groups": [{**SCRIPTED["groups"][0], "env_steps": 50000}, SCRIPTED["groups"][1]]}
    experiment = load_manifest(manifest(tmp_path / "shorter", {"scripted": shorter}))["scripted"]
    with pytest.raises(ValueError, match=r"slow__s0 was trained for 100,000 env steps, more than the 50,000"):
        run_experiments([experiment], tmp_path / "runs", LocalRunner(workers=1), extend=True)
    document = tmp_path / "doc.md"
    document.write_text("<!-- results: scripted -->\n<!-- /results -->\n")
    fresh = load_manifest(manifest(tmp_path / "fresh", {"scripted": SCRIPTED}))["scripted"]
    with pytest.raises(ValueError, match=r"has no <!-- /results: scripted --> after <!-- results: scripted -->"):
        run_experiments([fresh], tmp_path / "fresh_runs", LocalRunner(workers=1), document)
    assert not (tmp_path / "fresh_runs").exists()  # refused before any run


def test_repeated_names_and_shared_report_folders_are_refused(tmp_path):
    path = tmp_path / "twice.yml"
    path.write_text("experiments:\n  a: {}\n  a: {}\n")
    with pytest.raises(ValueError, match="key 'a' appears twice"):
        load_manifest(path)
    with pytest.raises(ValueError, match="experiments 'a' and 'b' share report_dir"):
        load_manifest(manifest(tmp_path, {"a": SCRIPTED, "b": SCRIPTED}))
    assert [e.name for e in select(load_manifest(manifest(tmp_path, {"a": SCRIPTED})), ["a", "a"])] == ["a"]


def test_cli_lists_and_refuses_in_one_line(tmp_path, trainers):
    path = manifest(tmp_path, {"scripted": SCRIPTED})
    bad = tmp_path / "bad.yml"
    bad.write_text("experiments: [1, 2]\n")
    stray = tmp_path / "stray.yml"
    stray.write_text(yaml.safe_dump({"experiments": {"scripted": SCRIPTED}, "defaults": {}}))
    for argv, expected in ((["--manifest", str(bad)], "expected a top-level 'experiments:' mapping"),
                           (["--manifest", str(stray)], "unknown top-level key 'defaults'"),
                           (["nope", "--manifest", str(path)],
                            "no experiment 'nope' in the manifest (it has scripted)")):
        run = subprocess.run([sys.executable, "-m", "diffgym.cli", "results", *argv], capture_output=True, text=True,
                             cwd=tmp_path)
        assert run.returncode != 0 and run.stderr.strip().count("\n") == 0, run.stderr
        assert run.stderr.startswith("diffgym results: ") and expected in run.stderr
    with pytest.raises(ValueError, match="no experiment 'x'"):
        select(load_manifest(path), ["x"])


def test_list_shows_each_group_s_settings(tmp_path, trainers):
    from diffgym.commands.results import describe
    (experiment,) = load_manifest(manifest(tmp_path, {"scripted": SCRIPTED})).values()
    lines = describe(experiment).splitlines()
    assert lines[1] == "  'slow': slow_algo, 100,000 env steps, seeds 0,1, evaluated every 5,000"
    assert lines[2] == ("  'fast, K 16': fast_algo, 20,000 env steps, seeds 0,1, evaluated every 2,500; "
                        "algo_params.segment_length=16")


def test_replace_block_touches_only_its_own_markers():
    text = ("<!-- results: a -->\nA\n<!-- /results: a -->\n<!-- results: ab -->\nAB\n<!-- /results: ab -->\n")
    new, found = replace_block(text, "a", "| new |\n")
    assert found and new == text.replace("\nA\n", "\n| new |\n")
    assert replace_block(text, "c", "x") == (text, False)
    empty = "<!-- results: e -->\n<!-- /results: e -->\n"
    assert replace_block(empty, "e", "| t |") == ("<!-- results: e -->\n| t |\n<!-- /results: e -->\n", True)
    crlf = "a\r\n<!-- results: e -->\r\nold\r\n<!-- /results: e -->\r\nb\r\n"
    assert replace_block(crlf, "e", "| t |\n| u |") == (
        "a\r\n<!-- results: e -->\r\n| t |\r\n| u |\r\n<!-- /results: e -->\r\nb\r\n", True)


def test_the_project_manifest_resolves_every_run():
    experiments = load_manifest(REPO / "docs" / "results" / "experiments.yml")
    document = (REPO / "docs" / "results.md").read_text()
    for experiment in experiments.values():
        configs = experiment.configs("runs/results")  # every trainer, task and override resolves
        assert len({c.run_dir for c in configs}) == len(configs)
        assert experiment.report_dir.is_relative_to(REPO / "docs" / "results")
    unmarked = [name for name in experiments
                if f"<!-- results: {name} -->" not in document or f"<!-- /results: {name} -->" not in document]
    assert not unmarked, f"docs/results.md has no table block for {unmarked}"
    assert "(filled by `diffgym results" not in document, "a table block was never filled"


def test_interval_estimates_do_not_depend_on_the_global_generator_or_other_labels():
    scores = {"a": np.array([[0.9], [1.0], [0.8], [0.95], [0.97]]), "b": np.array([[0.5], [0.9], [0.1], [0.7], [0.2]])}
    estimate = functools.partial(iqm_with_ci, reps=200)
    first = estimate(scores)
    for draws in range(1, 4):  # rliable resamples from numpy's global generator: its state must not matter
        np.random.rand(draws)
        again = estimate(scores)
        assert all(np.array_equal(first[k][i], again[k][i]) for k in scores for i in range(3))
    alone = estimate({"a": scores["a"]})["a"]
    assert all(np.array_equal(alone[i], first["a"][i]) for i in range(3))
    state = np.random.get_state()
    estimate(scores)
    assert np.array_equal(np.random.get_state()[1], state[1])  # the caller's generator is left as it was


def test_the_default_manifest_outside_the_repository_root_says_where_it_is(tmp_path, monkeypatch, capsys):
    from diffgym.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["results", "--list"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "diffgym results: no docs/results/experiments.yml here: the project's manifest is in the DiffGym "
        "repository, so run this from its root, or pass --manifest FILE")
