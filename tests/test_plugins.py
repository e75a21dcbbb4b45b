"""Plugin discovery through the ``diffgym.trainers`` entry-point group, and the ``diffgym`` CLI."""

import configparser
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import diffgym
from diffgym import cli, plugins
from diffgym.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
ENV_ID = "DiffGym/PointMass1D-v0"


def doc_plugin_files() -> dict[str, str]:
    """The files of docs/plugins.md's minimal trainer, by name."""
    blocks = re.findall(r"```(?:ini|python|toml)\n# my_trainer/(\S+)\n(.*?)```", (ROOT / "docs/plugins.md").read_text(),
                        re.S)
    files = dict(blocks)
    assert set(files) == {"pyproject.toml", "setup.cfg", "my_diffgym_trainer.py"}
    return files


@pytest.fixture
def doc_plugin(tmp_path, monkeypatch):
    """The minimal trainer of docs/plugins.md, made importable with real entry-point metadata."""
    files = doc_plugin_files()
    site = tmp_path / "site"
    site.mkdir()
    (site / "my_diffgym_trainer.py").write_text(files["my_diffgym_trainer.py"])
    setup = configparser.ConfigParser()
    setup.read_string(files["setup.cfg"])
    dist_info = site / "my_diffgym_trainer-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-diffgym-trainer\nVersion: 0.1.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[diffgym.trainers]\n" + setup["options.entry_points"]["diffgym.trainers"].strip() + "\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return site


def test_bundled_ppo_plugin_is_discovered():
    found = plugins.available_trainers()
    assert "ppo" in found and found["ppo"].value == "diffgym_ppo:PPOTrainer"
    trainer = plugins.load_trainer("ppo")
    assert trainer.name == "ppo" and isinstance(trainer, plugins.Trainer)


def test_doc_plugin_is_discovered_and_trains_through_the_cli(doc_plugin, tmp_path, capsys):
    assert plugins.available_trainers()["short-horizon"].value == "my_diffgym_trainer:ShortHorizonTrainer"
    run_dir = tmp_path / "run"
    code = cli.main(["train", "--algo", "short-horizon", "--env", ENV_ID, "--total-env-steps", "640",
                     "--eval-every-env-steps", "320", "--eval-episodes", "4", "--num-envs", "8",
                     "--horizon", "20", "--run-dir", str(run_dir), "--no-progress"])
    assert code == 0 and f"run directory: {run_dir}" in capsys.readouterr().out
    config = TrainConfig.load(run_dir / "config.yaml")
    assert (config.algo, config.algo_params, config.num_envs) == ("short-horizon", {"horizon": 20}, 8)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_return" in r]
    assert [r["env_steps"] for r in evals] == [0, 320, 640]
    assert rows[-1]["grad_steps"] == 4 and any(f.name.startswith("events.out.tfevents") for f in run_dir.iterdir())
    assert len(list((run_dir / "checkpoints").glob("step_*.pt"))) == 3
    # its check_config refuses a horizon it cannot run, in one line, before any run directory is made
    assert cli.main(["train", "--algo", "short-horizon", "--env", ENV_ID, "--horizon", "0",
                     "--run-dir", str(tmp_path / "refused")]) == 2
    assert capsys.readouterr().err == "diffgym train: algo_params.horizon must be a positive integer, got 0\n"
    assert not (tmp_path / "refused").exists()


def test_doc_plugin_keeps_the_trainer_contract(doc_plugin, tmp_path):
    """What docs/plugins.md tells a plugin author to run on their own trainer (it does not resume)."""
    from diffgym.testing import TrainerContractError, check_trainer

    check_trainer("short-horizon", tmp_path / "run", ENV_ID, resumes=False)
    with pytest.raises(TrainerContractError, match=r"resumed run: started afresh instead of resuming .* or pass "
                                                   r"resumes=False"):
        check_trainer("short-horizon", tmp_path / "again", ENV_ID)


def test_doc_plugin_installs_with_pip_and_is_listed_in_a_fresh_process(tmp_path):
    """The page's files as they are, installed by pip (into a folder, not the venv): what a reader runs."""
    package = tmp_path / "my_trainer"
    package.mkdir()
    for name, text in doc_plugin_files().items():
        (package / name).write_text(text)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(package)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "diffgym.cli", "trainers", "-v"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120, check=True).stdout
    assert re.search(r"^ppo\s", out, re.M) and re.search(r"^short-horizon\s+minimal example", out, re.M)
    assert "my_diffgym_trainer:ShortHorizonTrainer (my-diffgym-trainer 0.1.0)" in out
    lines = out.splitlines()  # one column for every name, however long (short-horizon: 13 characters)
    row = next(i for i, line in enumerate(lines) if line.startswith("short-horizon"))
    assert lines[row].index("minimal example") == lines[row + 1].index("entry point")


class _EchoTrainer:
    name = "echo"

    def default_config(self, env_id):
        return {"num_envs": 4, "algo_params": {"alpha": 1, "beta": "x"}}

    def train(self, config):
        return Path(config.run_dir or ".")


def test_register_trainer_and_config_precedence(monkeypatch, tmp_path):
    monkeypatch.setattr(plugins, "_registered", {})
    plugins.register_trainer("echo", _EchoTrainer)  # a class: instantiated on load
    assert "echo" in plugins.trainer_names()
    config = plugins.resolve_config("echo", ENV_ID, {"algo_params.alpha": 2, "seed": 5})
    assert (config.num_envs, config.seed, config.algo_params) == (4, 5, {"alpha": 2, "beta": "x"})
    base = TrainConfig(algo="other", env_id="x", num_envs=9, algo_params={"alpha": 3})
    config = plugins.resolve_config("echo", ENV_ID, {"optimizer.lr": 0.01}, base=base)
    assert (config.algo, config.env_id, config.num_envs, config.algo_params["alpha"], config.optimizer.lr) == \
        ("echo", ENV_ID, 9, 3, 0.01)


def test_load_trainer_errors(monkeypatch):
    monkeypatch.setattr(plugins, "_registered", {})
    with pytest.raises(KeyError, match="no trainer plugin named 'nope'.*installed: .*ppo"):
        plugins.load_trainer("nope")
    plugins.register_trainer("bad-defaults", type("BadDefaults", (_EchoTrainer,), {
        "default_config": lambda self, env_id: {"horizon": 5}})())
    with pytest.raises(ValueError, match="^trainer 'bad-defaults'.s default_config\\('DiffGym/PointMass1D-v0'\\): "
                                         "unknown config key 'horizon'"):
        plugins.resolve_config("bad-defaults", ENV_ID)
    plugins.register_trainer("broken", object())
    with pytest.raises(TypeError, match="missing \\['name', 'default_config', 'train'\\]"):
        plugins.load_trainer("broken")


def test_cli_print_config_applies_flags_sets_and_params(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(plugins, "_registered", {})
    plugins.register_trainer("echo", _EchoTrainer())
    assert cli.main(["train", "--algo", "echo", "--env", ENV_ID, "--seed", "3", "--total-env-steps", "2e5",
                     "--set", "optimizer.lr=1e-3", "--set", "policy.hidden_sizes=[32, 32]",
                     "--param", "alpha=0.5", "--param", "beta=null", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed"] == 3 and printed["total_env_steps"] == 200_000
    assert printed["optimizer"]["lr"] == 1e-3 and printed["policy"]["hidden_sizes"] == [32, 32]
    assert printed["algo_params"] == {"alpha": 0.5, "beta": None}
    saved = tmp_path / "c.yaml"
    TrainConfig.from_dict(printed).save(saved)
    assert cli.main(["train", "--algo", "echo", "--env", ENV_ID, "--config", str(saved), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == printed
    assert cli.main(["train", "--algo", "echo", "--env", ENV_ID, "--set", "optimizer.lrr=1", "--print-config"]) == 2
    assert "unknown config key 'optimizer.lrr'" in capsys.readouterr().err
    # a hyperparameter the trainer's defaults do not list is a typo, not a new setting
    assert cli.main(["train", "--algo", "echo", "--env", ENV_ID, "--param", "gamma=0.9", "--print-config"]) == 2
    assert "unknown algo_params ['gamma'] for trainer 'echo'; it has: alpha, beta" in capsys.readouterr().err
    # a value whose default is a number must be one, for any trainer, before its run starts
    assert cli.main(["train", "--algo", "echo", "--env", ENV_ID, "--param", "alpha=abc", "--print-config"]) == 2
    assert capsys.readouterr().err.strip() == ("diffgym train: algo_params.alpha must be a number (its default is 1), "
                                              "got 'abc'")
    assert cli.main(["train", "--algo", "echo", "--env", ENV_ID, "--param", "alpha=null", "--print-config"]) == 2
    assert "algo_params.alpha must be a number (its default is 1), got None" in capsys.readouterr().err
    # text numbers reach the trainer's own check as numbers
    checked = []
    plugins.register_trainer("echo", type("CheckingEcho", (_EchoTrainer,), {
        "check_config": lambda self, config: checked.append(config.algo_params["alpha"] > 0)})())
    text_number = {**printed, "algo_params": {"alpha": "7", "beta": None}}  # as YAML keeps '7' or 1e-5: text
    TrainConfig.from_dict(text_number).save(saved)
    assert cli.main(["train", "--algo", "echo", "--env", ENV_ID, "--config", str(saved), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["algo_params"]["alpha"] == 7 and checked == [True]


def test_shared_specs_come_from_diffgym_for_every_trainer(monkeypatch):
    from diffgym.training.shared_specs import shared_specs

    shared = shared_specs("DiffGym/PointMass1D-v0")["optimizer"]
    for algo in ("ppo", "apg"):
        config = plugins.resolve_config(algo, "DiffGym/PointMass1D-v0")
        assert (config.optimizer.lr, config.optimizer.max_grad_norm) == (shared["lr"], shared["max_grad_norm"])

    class Greedy:
        name = "greedy"

        def default_config(self, env_id):
            return {"optimizer": {"lr": 1.0}}

        def train(self, config):
            raise AssertionError("not reached")

    plugins.register_trainer("greedy", Greedy())
    with pytest.raises(ValueError, match="shared by every trainer"):
        plugins.resolve_config("greedy", "DiffGym/PointMass1D-v0")


def test_a_task_of_ones_own_runs_as_module_colon_id(monkeypatch, capsys, tmp_path):
    """Gymnasium's ``module:Namespace/Task-vN`` form, as ``gym.make`` takes it: the CLI imports the module
    (here from the directory it runs in) so that its ``register_task`` runs; errors stay one line."""
    (tmp_path / "my_probe_task.py").write_text(
        "from diffgym import register_task\n"
        "register_task('ProbeOwn/PointMass-v0', 'diffgym.envs.point_mass_1d:PointMass1DEnv',\n"
        "              max_episode_steps=30, reward_threshold=-1.0)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() appends the working directory
    monkeypatch.delitem(sys.modules, "my_probe_task", raising=False)
    assert cli.main(["train", "--algo", "ppo", "--env", "my_probe_task:ProbeOwn/PointMass-v0",
                     "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["env_id"] == "my_probe_task:ProbeOwn/PointMass-v0"
    from diffgym.core.registration import task_spec
    assert task_spec("my_probe_task:ProbeOwn/PointMass-v0").max_episode_steps == 30
    assert cli.main(["train", "--algo", "ppo", "--env", "no_such_module:ProbeOwn/PointMass-v0",
                     "--print-config"]) == 2
    assert "its module does not import (No module named 'no_such_module')" in capsys.readouterr().err
    assert cli.main(["train", "--algo", "ppo", "--env", "Unregistered/Task-v0", "--print-config"]) == 2
    assert "a task of your own: --env your_module:Your/Task-v0" in capsys.readouterr().err
    # a run on it evaluates where its module imports, and is refused in one line where it does not
    run = tmp_path / "run"
    assert cli.main(["train", "--algo", "apg", "--env", "my_probe_task:ProbeOwn/PointMass-v0", "--num-envs", "4",
                     "--total-env-steps", "32", "--eval-every", "32", "--set", "eval_episodes=2",
                     "--param", "segment.length=8", "--run-dir", str(run), "--no-progress"]) == 0
    assert cli.main(["eval", str(run), "--episodes", "2"]) == 0
    (tmp_path / "my_probe_task.py").rename(tmp_path / "moved_away.py")
    del sys.modules["my_probe_task"]
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--episodes", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "diffgym eval: unknown task 'my_probe_task:ProbeOwn/PointMass-v0': its module does not import (No module "
        "named 'my_probe_task'); the module before ':' is imported from the current directory or the Python path"]


def test_contract_suites_check_the_tasks_diffgym_tasks_names(monkeypatch):
    from diffgym.testing import tasks_under_test

    monkeypatch.delenv("DIFFGYM_TASKS", raising=False)
    assert tasks_under_test() == diffgym.ALL_TASK_IDS
    monkeypatch.setenv("DIFFGYM_TASKS", "my_task:Mine/A-v0, my_task:Mine/B-v0")
    assert tasks_under_test() == ("my_task:Mine/A-v0", "my_task:Mine/B-v0")


def test_a_text_number_whose_default_is_an_int_becomes_an_int(monkeypatch, capsys):
    monkeypatch.setattr(plugins, "_registered", {})
    plugins.register_trainer("echo", _EchoTrainer())
    assert cli.main(["train", "--algo", "echo", "--env", ENV_ID, "--param", "alpha=1e1", "--print-config"]) == 0
    alpha = yaml.safe_load(capsys.readouterr().out)["algo_params"]["alpha"]
    assert alpha == 10 and isinstance(alpha, int)


def test_a_trainer_package_that_fails_to_import_is_one_line(monkeypatch, capsys):
    class BrokenEntryPoint:
        name, value = "broken-ep", "broken_pkg.trainer:Trainer"

        def load(self):
            raise ModuleNotFoundError("No module named 'broken_dependency'")

    monkeypatch.setattr(plugins, "_registered", {})
    monkeypatch.setattr(plugins, "available_trainers", lambda: {"broken-ep": BrokenEntryPoint()})
    with pytest.raises(ValueError, match=r"^trainer 'broken-ep' failed to load \(broken_pkg\.trainer:Trainer\): "
                                         r"ModuleNotFoundError: No module named 'broken_dependency'$"):
        plugins.load_trainer("broken-ep")
    with pytest.raises(SystemExit) as exit_:  # while building the parser, which takes the trainer's own flags
        cli.main(["train", "--algo", "broken-ep", "--env", ENV_ID, "--print-config"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("diffgym train: trainer 'broken-ep' failed to load")


def test_tune_names_a_search_space_that_draws_an_unknown_key(monkeypatch, tmp_path, capsys):
    class Searching(_EchoTrainer):
        def suggest_hyperparams(self, trial, env_id):
            return {"algo_params.alhpa": trial.suggest_float("alhpa", 0.0, 1.0)}

    monkeypatch.setattr(plugins, "_registered", {})
    plugins.register_trainer("echo", Searching())
    with pytest.raises(SystemExit) as exit_:  # how tune reports a failed study: one line
        cli.main(["tune", "--algo", "echo", "--env", ENV_ID, "--trials", "1", "--env-steps", "100",
                  "--out", str(tmp_path / "study")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("diffgym tune: the search space of trainer 'echo' (suggest_hyperparams) drew a setting "
                          "it cannot run: unknown algo_params ['alhpa']")


def test_a_task_registered_through_a_factory_function_is_not_refused_as_a_plain_gymnasium_env():
    """A class without ``differentiable_step`` (CartPole) is no DiffGym task; a factory function cannot be
    judged without making the env, so it is let through to the commands' own checks."""
    import gymnasium as gym

    gym.register("Tests/FactoryTask-v0", entry_point=lambda **kwargs: gym.make(ENV_ID).unwrapped)
    try:
        plugins.check_task("Tests/FactoryTask-v0")
        with pytest.raises(ValueError, match="^CartPole-v1 is not a DiffGym task"):
            plugins.check_task("CartPole-v1")
    finally:
        gym.registry.pop("Tests/FactoryTask-v0")


class _SectionedTrainer(_EchoTrainer):
    """Nested algo_params sections, and no check_config of its own."""

    name = "sectioned"

    def default_config(self, env_id):
        return {"num_envs": 4, "algo_params": {"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "free": {}}}


def test_a_misspelt_key_inside_an_algo_params_section_is_refused_for_a_trainer_without_check_config(monkeypatch):
    monkeypatch.setattr(plugins, "_registered", {})
    plugins.register_trainer("sectioned", _SectionedTrainer())
    assert plugins.resolve_config("sectioned", ENV_ID, {"algo_params.optim.lr": 0.2}).algo_params["optim"]["lr"] == 0.2
    with pytest.raises(ValueError, match=r"^unknown algo_params key 'optim.lrr' for trainer 'sectioned'; "
                                         r"algo_params.optim has: betas, lr$"):
        plugins.resolve_config("sectioned", ENV_ID, {"algo_params.optim.lrr": 0.2})
    # the same keys from a --config file (``base``): refused as well, at the first level too
    base = plugins.resolve_config("sectioned", ENV_ID)
    with pytest.raises(ValueError, match=r"^unknown algo_params key 'optim.lrr'"):
        plugins.resolve_config("sectioned", ENV_ID, base=base.replace(
            algo_params={**base.algo_params, "optim": {"lr": 0.1, "lrr": 0.2}}))
    with pytest.raises(ValueError, match=r"^unknown algo_params \['typo_top'\] for trainer 'sectioned'"):
        plugins.resolve_config("sectioned", ENV_ID, base=base.replace(algo_params={**base.algo_params, "typo_top": 1}))
    # an empty section is free-form: nothing to check against
    assert plugins.resolve_config("sectioned", ENV_ID, {"algo_params.free.anything": 1}).algo_params["free"] == {
        "anything": 1}
    # APG checks its own sections (check_config): the core leaves them to it, and its message names the key
    with pytest.raises(ValueError, match="lrr"):
        plugins.resolve_config("apg", ENV_ID, {"algo_params.policy_gradient.lrr": 0.2})
