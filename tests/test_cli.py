"""The command line as a newcomer meets it (issue 26 items 2, 3, 5, 9; issue 24's subcommands in one
place): runs say where they are and how to resume them, bad input is one line before any work, help
shows defaults, and each flag name means one thing in every subcommand."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest
import torch

import diffgym
from diffgym import cli
from diffgym.commands import COMMANDS, load
from diffgym.plugins import load_trainer, register_trainer, resolve_config
from diffgym.training.run import Run, read_metrics

ENV = "DiffGym/PointMass1D-v0"


class CountingTrainer:
    """Counts env steps in increments of ``algo_params.stride``, evaluating and checkpointing after each;
    resumes from its latest checkpoint. ``interrupt_at``: raise KeyboardInterrupt there (a Ctrl-C)."""

    name = "counting"
    interrupt_at: int | None = None

    def default_config(self, env_id):
        return {"num_envs": 2, "total_env_steps": 40, "eval_every_env_steps": 10, "eval_episodes": 1,
                "algo_params": {"stride": 10}}

    def train(self, config, progress=True):
        with Run(config, progress=progress) as run:
            saved = run.load_latest_checkpoint()
            steps = 0
            if saved is not None:
                steps = int(saved["env_steps"])
                run.resume_from(steps)
            while steps < config.total_env_steps:
                steps += config.algo_params["stride"]
                if steps == self.interrupt_at:
                    raise KeyboardInterrupt
                run.log(steps, steps, eval_return=float(steps), eval_success_rate=0.5)
                run.save_checkpoint({"env_steps": steps, "config": run.config.to_dict()}, steps)
        return run.dir


class RefusingTrainer(CountingTrainer):
    """Validates its settings inside ``train``, before it opens a run directory (as APG and PPO do)."""

    name = "refusing"

    def train(self, config, progress=True):
        if config.algo_params["stride"] < 1:
            raise ValueError(f"stride must be >= 1, got {config.algo_params['stride']}")
        return super().train(config, progress)


class CheckingTrainer(CountingTrainer):
    """Validates its settings in ``check_config``, which resolve_config calls for every command."""

    name = "checking"

    def check_config(self, config):
        if config.algo_params["stride"] < 1:
            raise ValueError(f"stride must be >= 1, got {config.algo_params['stride']}")


@pytest.fixture
def counting(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    trainer = CountingTrainer()
    register_trainer("counting", trainer)
    register_trainer("refusing", RefusingTrainer())
    register_trainer("checking", CheckingTrainer())
    return trainer


def one_line_error(capsys, argv: list[str]) -> str:
    """Run ``argv``; it must fail with exit status 2 and one line on stderr, which is returned."""
    try:
        code = cli.main(argv)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, (code, err)
    assert err.startswith(f"diffgym {argv[0]}: "), err
    return err


# ------------------------------------------------------------------------ item 2: runs say where they are
def test_a_run_names_its_directory_at_the_start_and_an_interrupt_says_how_to_resume(counting, capsys):
    counting.interrupt_at = 30
    code = cli.main(["train", "--algo", "counting", "--env", ENV, "--set", "algo_params.stride=5",
                     "--threads", "1", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 130
    run_dir = Path(captured.out.splitlines()[0].removeprefix("run directory: "))
    assert run_dir.parent == Path("runs") and (run_dir / "config.yaml").exists()
    message = captured.err.strip()
    assert message.startswith("diffgym train: interrupted at 25 env steps; resume with: diffgym train ")
    command = shlex.split(message.split("resume with: ")[1])
    assert command[command.index("--run-dir") + 1] == str(run_dir) and "--threads" in command

    counting.interrupt_at = None  # the printed command continues the same run, with the same config
    assert cli.main(command[1:]) == 0
    out = capsys.readouterr().out
    assert f"run directory: {run_dir}" in out and "resuming from 25 env steps" in out
    assert [row["env_steps"] for row in read_metrics(run_dir)] == list(range(5, 45, 5))
    assert resolve_config("counting", ENV, {"algo_params.stride": 5, "run_dir": str(run_dir)}).to_dict() == \
        {**diffgym.training.TrainConfig.load(run_dir / "config.yaml").to_dict()}
    assert cli.main(command[1:]) == 0
    assert "already finished: 40 of 40 env steps" in capsys.readouterr().out
    assert not list(Path("runs").glob("*-2"))  # no second run directory was made


def test_the_resume_command_of_an_interrupted_apg_run_continues_it(tmp_path, monkeypatch, capsys):
    """A real trainer: the printed command reproduces its config (trainer defaults, flags) exactly."""
    monkeypatch.chdir(tmp_path)
    saves = []
    original = Run.save_checkpoint

    def save_then_interrupt(self, obj, env_steps):
        path = original(self, obj, env_steps)
        saves.append(env_steps)
        if len(saves) == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(Run, "save_checkpoint", save_then_interrupt)
    argv = ["train", "--algo", "apg", "--env", ENV, "--num-envs", "4", "--env-steps", "96", "--eval-every", "32",
            "--eval-episodes", "2", "--param", "segment_length=8", "--no-progress"]
    assert cli.main(argv) == 130
    message = capsys.readouterr().err.strip()
    command = shlex.split(message.split("resume with: ")[1])
    monkeypatch.setattr(Run, "save_checkpoint", original)
    assert cli.main(command[1:]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {saves[1]} env steps" in out
    assert [row["env_steps"] for row in read_metrics(command[command.index("--run-dir") + 1])
            if "eval_return" in row] == [0, 32, 64, 96]


def test_an_interrupted_sweep_says_that_the_same_command_resumes_it(counting, monkeypatch, capsys):
    from diffgym.experiments import compare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "compare", interrupted)
    argv = ["compare", "--env", ENV, "--algos", "counting", "--env-steps", "40", "--out", "my out"]
    assert cli.main(argv) == 130
    resume = shlex.join(["diffgym", *argv])
    assert capsys.readouterr().err.strip() == f"diffgym compare: interrupted; resume with: {resume}"


def test_no_progress_still_prints_one_line_per_evaluation(counting, capsys):
    assert cli.main(["train", "--algo", "counting", "--env", ENV, "--run-dir", "run", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "run directory: run"
    assert lines[1:] == [f"evaluation at {steps} env steps: return {steps}, success 0.5" for steps in (10, 20, 30, 40)]


# ------------------------------------------------------------------- item 3: Dict observations
@pytest.mark.parametrize("algo", ["ppo", "apg"])
def test_a_dict_observation_task_is_refused_in_one_line_before_anything_is_made(algo, tmp_path, monkeypatch,
                                                                                capsys):
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, ["train", "--algo", algo, "--env", "DiffGym/FrankaReachGoal-v0"])
    assert "observation is a Dict (achieved_goal, desired_goal, observation)" in err
    assert not any(tmp_path.iterdir())


def test_a_trainer_that_declares_dict_observations_gets_them(counting, capsys):
    counting.dict_observations = True
    assert cli.main(["train", "--algo", "counting", "--env", "DiffGym/FrankaReachGoal-v0", "--print-config"]) == 0


# ------------------------------------------------------------------ item 5: one line, before any work
@pytest.mark.parametrize("argv, message", [
    (["train", "--algo", "counting", "--env", ENV, "--set", "env_kwargs.mas=2"],
     "unknown env_kwargs ['mas'] for DiffGym/PointMass1D-v0; it takes: max_episode_steps, action_cost"),
    (["train", "--algo", "counting", "--env", ENV, "--set", "env_kwargs.mass=-1"],
     "mass must lie in [0.001, 1000] kg, got -1 (making DiffGym/PointMass1D-v0 with env_kwargs {'mass': -1})"),
    (["train", "--algo", "counting", "--env", ENV, "--set", "env_kwargs.mass=abc"],
     "env_kwargs.mass must be a number (its default is 1.0), got 'abc'"),
    (["train", "--algo", "ppo", "--env", ENV, "--param", "n_steps=-3"],
     "algo_params.n_steps must be a whole number >= 1, got -3"),
    (["train", "--algo", "ppo", "--env", ENV, "--param", "gamma=abc"], "algo_params.gamma must be a number in (0, 1]"),
    (["train", "--algo", "ppo", "--env", ENV, "--param", "batch_size=1", "--param", "n_steps=4"],
     "algo_params.batch_size must be >= 2 with normalize_advantage"),
    (["train", "--algo", "ppo", "--env", ENV, "--param", "clip_range=-1"], "algo_params.clip_range must be a number > 0"),
    (["train", "--algo", "ppo", "--env", ENV, "--param", "target_kl=0"],
     "algo_params.target_kl must be a number > 0 or null (off), got 0"),
    (["train", "--algo", "ppo", "--env", ENV, "--param", "normalize_reward=maybe"],
     "algo_params.normalize_reward must be true or false, got 'maybe'"),
    (["train", "--algo", "apg", "--env", ENV, "--bootstrap", "foo"], "'foo'"),
    (["train", "--algo", "refusing", "--env", ENV, "--param", "stride=0"], "stride must be >= 1, got 0"),
    (["train", "--algo", "checking", "--env", ENV, "--param", "stride=0"], "stride must be >= 1, got 0"),
    (["compare", "--env", ENV, "--algos", "checking", "--env-steps", "40", "--param", "stride=0"],
     "stride must be >= 1, got 0"),
    (["compare", "--env", ENV, "--algos", "counting", "--env-steps", "40", "--set", "env_kwargs.mas=2"],
     "unknown env_kwargs ['mas']"),
    (["ablate", "--env", ENV, "--algo", "counting", "--grid", "stride", "--env-steps", "40"], "KEY=V1,V2"),
    (["train", "--env", ENV], "--algo required (or --config FILE"),
    (["feasibility", "--env", ENV, "--env-kwarg", "mas=2"], "unknown env_kwargs ['mas'] for DiffGym/PointMass1D-v0"),
    (["grad-stats", "--env", "DiffGym/Nope-v0"], "unknown task 'DiffGym/Nope-v0'"),
    # a plain Gymnasium env, which diffgym's commands cannot run: said, naming the tasks they can
    (["train", "--algo", "counting", "--env", "CartPole-v1"],
     "CartPole-v1 is not a DiffGym task: its environment (gymnasium.envs.classic_control.cartpole:CartPoleEnv) "
     "has no differentiable_step; diffgym runs DiffGym tasks: DiffGym/PointMass1D-v0, "),
    (["grad-stats", "--env", "Pendulum-v1"], "Pendulum-v1 is not a DiffGym task"),
    (["train", "--algo", "counting", "--env", ENV, "--set", "lr=[1"],
     "lr=[1: '[1' is not valid YAML: expected ',' or ']'"),
])
def test_bad_input_is_one_line_exit_2_before_any_work(argv, message, counting, capsys, tmp_path):
    assert message in one_line_error(capsys, argv)
    assert not any(tmp_path.iterdir())  # no run directory, no sweep output


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = resolve_config("apg", ENV, {"num_envs": 4, "total_env_steps": 32, "eval_every_env_steps": 32,
                                         "eval_episodes": 2, "algo_params.segment_length": 8,
                                         "run_dir": str(tmp_path_factory.mktemp("apg") / "run")})
    return load_trainer("apg").train(config, progress=False)


def test_policy_commands_refuse_bad_input_in_one_line(trained, tmp_path, monkeypatch, capsys):
    import shutil

    from diffgym import policy_commands

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated although the command should have been refused")

    monkeypatch.setattr(policy_commands, "evaluate", no_evaluation)
    monkeypatch.setattr(policy_commands, "record_video", no_evaluation)
    assert "x.webm: expected a .mp4 or .gif file" in one_line_error(
        capsys, ["eval", str(trained), "--video", str(tmp_path / "x.webm")])
    assert ("trained on DiffGym/PointMass1D-v0 (observations of size 3, actions of size 1); DiffGym/PointNav2D-v0 "
            "has observations of size 21 and actions of size 2") in one_line_error(
        capsys, ["eval", str(trained), "--env", "DiffGym/PointNav2D-v0"])
    assert "unknown task 'DiffGym/Nope-v0'" in one_line_error(capsys,
                                                              ["eval", str(trained), "--env", "DiffGym/Nope-v0"])
    assert "Pendulum-v1 is not a DiffGym task" in one_line_error(capsys, ["eval", str(trained), "--env", "Pendulum-v1"])
    # an output path that cannot be written: refused before the policy is evaluated or exported
    (tmp_path / "afile").touch()
    monkeypatch.setattr(policy_commands, "export_policy", no_evaluation)
    for argv in (["eval", str(trained), "--video", str(tmp_path / "afile" / "v.mp4")],
                 ["eval", str(trained), "--json", str(tmp_path / "afile" / "deeper" / "r.json")],
                 ["export", str(trained), "--out", str(tmp_path / "afile" / "p.onnx")]):
        err = one_line_error(capsys, argv)
        assert f"{tmp_path / 'afile'} is " in err and "not a directory" in err, err
    assert "it is a directory; expected a file name" in one_line_error(
        capsys, ["eval", str(trained), "--json", str(tmp_path)])
    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    (broken / "config.yaml").write_text("seed: [1, 2\n")
    assert f"{broken / 'config.yaml'}: not a readable config" in one_line_error(capsys, ["eval", str(broken)])
    not_zip = tmp_path / "step_000000000032.pt"
    not_zip.write_bytes(b"\x00" * 64)
    assert str(not_zip) in one_line_error(capsys, ["eval", str(not_zip)])
    assert "trained on DiffGym/PointMass1D-v0" in one_line_error(
        capsys, ["grad-stats", "--env", "DiffGym/PointNav2D-v0", "--policy", str(trained), "--envs", "2",
                 "--out", str(tmp_path / "grad")])
    assert not (tmp_path / "grad").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where torch sees no GPU")
@pytest.mark.parametrize("make", ["make", "make_vec"])
def test_a_cuda_env_without_a_gpu_is_a_clear_value_error(make):
    import gymnasium as gym

    kwargs = {"num_envs": 2} if make == "make_vec" else {}
    with pytest.raises(ValueError, match=r"device 'cuda' requested, but torch .* sees no CUDA GPU"):
        getattr(gym, make)(ENV, device="cuda", **kwargs)


@pytest.mark.parametrize("make", ["make", "make_vec"])
def test_a_device_torch_does_not_know_is_one_line(make):
    import gymnasium as gym

    kwargs = {"num_envs": 2} if make == "make_vec" else {}
    with pytest.raises(ValueError, match=r"^device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', "
                                         r"got 'gpu'$"):
        getattr(gym, make)(ENV, device="gpu", **kwargs)
    with pytest.raises(ValueError, match=r"^device must be a torch device .*, got None$"):
        getattr(gym, make)(ENV, device=None, **kwargs)


# ------------------------------------------------------------------------------- item 9: help, flags
def _parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_shows_its_default_in_the_help():
    undocumented = []
    for name, parser in _parsers().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or action.required or action.help == argparse.SUPPRESS:
                continue
            shown = formatter._expand_help(action) if action.help else ""
            if not any(word in shown for word in ("default", "required")) and not isinstance(
                    action, argparse._AppendAction):
                undocumented.append(f"{name} {action.option_strings[0]}")
    assert not undocumented, undocumented


def test_each_flag_name_means_one_thing_in_every_subcommand():
    meanings: dict[str, set[tuple[str, str]]] = {}
    for name, parser in _parsers().items():
        for action in parser._actions:
            for flag in action.option_strings:
                meanings.setdefault(flag, set()).add((action.dest, str(action.metavar)))
    assert meanings["--set"] == {("sets", "KEY=VALUE")}  # a config key, wherever it is taken
    assert meanings["--env-kwarg"] == {("env_kwargs", "KEY=VALUE")}
    several = {flag: uses for flag, uses in meanings.items() if len(uses) > 1}
    assert several == {"--out": {("out", "DIR"), ("out", "FILE")}}, several
    # --out is the directory a command writes into; export writes one file, which its extension names
    out = {name: next(a.metavar for a in parser._actions if "--out" in a.option_strings)
           for name, parser in _parsers().items() if any("--out" in a.option_strings for a in parser._actions)}
    assert {name: metavar for name, metavar in out.items() if metavar != "DIR"} == {"export": "FILE"}, out


def test_help_version_and_every_subcommand_defined_in_its_module(capsys):
    assert set(_parsers()) == set(COMMANDS)
    for name in COMMANDS:
        module = load(name)
        assert module.HELP and callable(module.add_arguments) and callable(module.run)
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"diffgym {diffgym.__version__}"
    with pytest.raises(SystemExit):
        cli.main(["validate-urdf", "--help"])
    assert "--tcp-link" in capsys.readouterr().out


def test_train_takes_algorithm_and_task_from_a_config_file(counting, capsys, tmp_path):
    assert cli.main(["train", "--algo", "counting", "--env", ENV, "--run-dir", "first", "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--config", "first/config.yaml", "--print-config"]) == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["algo"], printed["env_id"], printed["run_dir"]) == ("counting", ENV, None)


@pytest.mark.parametrize("text, message", [
    ("seed: 1\n", "missing key(s) ['algo', 'env_id']: a config file holds a whole run's config"),
    ("policy: [1, 2\n", "not valid YAML: expected ',' or ']', but got '<stream end>' (line 2, column 1)"),
    ("- 1\n- 2\n", "expected a mapping of TrainConfig fields, got list"),
])
def test_a_bad_config_file_is_one_line_naming_the_file_once(text, message, capsys, tmp_path):
    (tmp_path / "bad.yaml").write_text(text)
    err = one_line_error(capsys, ["train", "--config", str(tmp_path / "bad.yaml"), "--print-config"])
    assert err.startswith(f"diffgym train: --config {tmp_path / 'bad.yaml'}: {message}")
    assert err.count(str(tmp_path / "bad.yaml")) == 1


@pytest.mark.parametrize("argv", [["eval", "run"], ["robustness", "run", "--vary", "mass=0.5:2:3"],
                                  ["train", "--algo", "counting", "--env", ENV]])
def test_a_negative_seed_is_refused_at_argument_parsing(argv, counting, capsys):
    assert one_line_error(capsys, [*argv, "--seed", "-1"]) == (
        f"diffgym {argv[0]}: argument --seed: expected a whole number >= 0, got '-1' (see diffgym {argv[0]} "
        "--help)\n")


@pytest.mark.parametrize("argv, message", [
    (["train", "--algo", "counting", "--env", ENV, "--env-steps", "abc"],
     "argument --env-steps/--total-env-steps: expected a number such as 50000 or 5e4, got 'abc'"),
    (["eval", "run", "--step", "abc"], "argument --step: invalid int value: 'abc'"),
    (["eval", "run", "--bogus"], "unrecognized arguments: --bogus"),
    (["export"], "the following arguments are required: run_dir"),
    (["train", "--algo", "apg", "--env", ENV, "--segment-length", "[1"],  # a trainer's own flag
     "argument --segment-length: '[1' is not valid YAML"),
])
def test_argument_errors_are_one_line_naming_the_command_and_its_help(argv, message, counting, capsys):
    """argparse's usage block is not printed: the reason is the one line, with where to read more."""
    err = one_line_error(capsys, argv)
    assert message in err and err.endswith(f"(see diffgym {argv[0]} --help)\n"), err
