"""Run directories: one writer at a time, nothing lost when a resume fails, a corrupt checkpoint falls
back to the previous one, a resume keeps its config, and every trainer stops at the requested budget and
evaluates on the requested interval."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

import diffgym.training.run as run_mod
from diffgym.cli import main as diffgym_main
from diffgym.plugins import load_trainer, register_trainer, resolve_config
from diffgym.training import TrainConfig
from diffgym.training.run import Run, list_checkpoints, read_metrics

ENV = "DiffGym/PointMass1D-v0"


def config(tmp_path: Path, **changes) -> TrainConfig:
    return TrainConfig(**{"algo": "scripted", "env_id": ENV, "num_envs": 2, "total_env_steps": 30,
                          "eval_every_env_steps": 10, "eval_episodes": 2, "run_dir": str(tmp_path / "run"),
                          **changes})


def write_run(cfg: TrainConfig, steps=(0, 10, 20, 30), checkpoints=(0, 10, 20)) -> Path:
    """A finished-looking run: one evaluation row per step, checkpoints at some of them."""
    with Run(cfg, progress=False) as run:
        for step in steps:
            run.log(step, step // 10, eval_return=-float(step), eval_success_rate=0.0)
            if step in checkpoints:
                run.save_checkpoint({"env_steps": step, "config": run.config.to_dict()}, step)
    return run.dir


def env_steps(run_dir: Path) -> list[int]:
    return [row["env_steps"] for row in read_metrics(run_dir)]


# ------------------------------------------------------------------------------------ exclusivity
def test_a_run_dir_in_use_is_refused_naming_the_holder(tmp_path):
    with Run(config(tmp_path), progress=False):
        with pytest.raises(run_mod.RunDirLocked, match=rf"in use .*pid {os.getpid()}\b") as error:
            Run(config(tmp_path), progress=False)
        assert "\n" not in str(error.value)


_HOLD_LOCK = """
import sys, time
from diffgym.training import Run, TrainConfig
run = Run(TrainConfig(algo="scripted", env_id="DiffGym/PointMass1D-v0", run_dir=sys.argv[1]), progress=False)
print("locked", flush=True)
time.sleep(600)
"""


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().startswith(b"run directory: ")  # what every run prints first
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(run_mod.RunDirLocked, match=rf"pid {holder.pid}\b"):
            Run(config(tmp_path), progress=False)
    finally:
        holder.kill()
        holder.wait()
    with Run(config(tmp_path), progress=False):  # the dead holder's lock file is still there: taken over
        pass


def test_diffgym_train_on_a_run_dir_in_use_is_one_line_exit_2(tmp_path, capsys):
    with Run(config(tmp_path, algo="apg"), progress=False):
        code = diffgym_main(["train", "--algo", "apg", "--env", ENV, "--num-envs", "2", "--total-env-steps", "8",
                             "--run-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert re.fullmatch(rf"diffgym train: .*in use .*pid {os.getpid()}\b.*", err)


# ------------------------------------------------------------------------- metrics and checkpoints
def test_metrics_survive_a_resume_that_fails_or_is_killed(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    run_dir = write_run(cfg)
    before = (run_dir / "metrics.jsonl").read_text()
    # a trainer that dies after opening the run (e.g. killed while loading its checkpoint) changes nothing
    Run(cfg, progress=False).close()
    assert (run_dir / "metrics.jsonl").read_text() == before
    # killed while the kept rows are being written: the rename never happens, the old file stays whole
    with Run(cfg, progress=False) as run:
        def killed(*args):
            raise KeyboardInterrupt

        monkeypatch.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            run.resume_from(10)
        monkeypatch.undo()
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_resume_keeps_the_rows_up_to_its_checkpoint(tmp_path):
    cfg = config(tmp_path)
    run_dir = write_run(cfg)
    with Run(cfg, progress=False) as run:
        saved = run.load_latest_checkpoint()
        run.resume_from(saved["env_steps"])
        run.log(30, 3, eval_return=-30.0, eval_success_rate=1.0)
    assert env_steps(run_dir) == [0, 10, 20, 30] and read_metrics(run_dir)[-1]["eval_success_rate"] == 1.0


def test_a_corrupt_latest_checkpoint_is_reported_and_the_previous_one_used(tmp_path):
    cfg = config(tmp_path)
    run_dir = write_run(cfg)
    latest = list_checkpoints(run_dir)[-1][1]
    latest.write_bytes(latest.read_bytes()[:60])  # truncated, as by a full disk
    with Run(cfg, progress=False) as run:
        with pytest.warns(run_mod.CheckpointWarning, match=re.escape(str(latest))):
            saved = run.load_latest_checkpoint()
        assert saved["env_steps"] == 10
        run.resume_from(10)
    assert env_steps(run_dir) == [0, 10]
    # set aside, so that nothing (a later resume, diffgym eval) picks it up again
    assert [step for step, _ in list_checkpoints(run_dir)] == [0, 10]
    assert latest.with_name(latest.name + ".corrupt").exists()


def test_no_readable_checkpoint_is_an_error_that_keeps_everything(tmp_path):
    cfg = config(tmp_path)
    run_dir = write_run(cfg)
    before = (run_dir / "metrics.jsonl").read_text()
    for _, path in list_checkpoints(run_dir):
        path.write_bytes(b"not a checkpoint")
    with Run(cfg, progress=False) as run:
        with pytest.raises(run_mod.RunDirError, match="no readable checkpoint") as error, \
                pytest.warns(run_mod.CheckpointWarning):
            run.load_latest_checkpoint()
        assert "\n" not in str(error.value)
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert len(list_checkpoints(run_dir)) == 3


def test_a_fresh_start_sets_an_earlier_attempts_checkpoints_aside(tmp_path):
    """A trainer that does not resume starts afresh: the dead attempt's checkpoints (some at higher steps
    than the new run's) would outlive the new run's under pruning by step and be what eval reads."""
    run_dir = write_run(config(tmp_path), checkpoints=(20, 30))
    cfg = config(tmp_path, keep_checkpoints=1)  # pruning by step: the old 20 and 30 would outlive the new 10
    old_metrics = (run_dir / "metrics.jsonl").read_text()
    with Run(cfg, progress=False) as run:
        with pytest.warns(run_mod.CheckpointWarning, match="started afresh instead of resuming") as caught:
            run.log(0, 0, loss=1.0)
        run.save_checkpoint({"env_steps": 0}, 0)
        run.save_checkpoint({"env_steps": 10}, 10)
    assert [str(w.message).count("\n") for w in caught] == [0]  # one warning, one line
    assert [step for step, _ in list_checkpoints(run_dir)] == [10] and env_steps(run_dir) == [0]
    (aside,) = (run_dir / "checkpoints").glob("discarded-*")  # nothing lost
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "step_000000000020.pt", "step_000000000030.pt"]
    assert (aside / "metrics.jsonl").read_text() == old_metrics
    # a resume of the new run moves nothing
    with Run(cfg, progress=False) as run, warnings.catch_warnings():
        warnings.simplefilter("error", run_mod.CheckpointWarning)
        run.resume_from(run.load_latest_checkpoint()["env_steps"])
        run.save_checkpoint({"env_steps": 20}, 20)
    assert [step for step, _ in list_checkpoints(run_dir)] == [20]
    assert len(list((run_dir / "checkpoints").iterdir())) == 2


@pytest.mark.parametrize("entry, path, kind", [
    ({"x": np.zeros(3)}, "x", "numpy.ndarray"),
    ({"envs": {"rms": [1.0, np.float64(2.0)]}}, "envs.rms[1]", "numpy.float64"),
    ({"make": lambda: 0}, "make", "function")])
def test_a_checkpoint_that_is_not_weights_only_is_refused_when_saved(tmp_path, entry, path, kind):
    with Run(config(tmp_path), progress=False) as run:
        refused = rf"^checkpoint entry {re.escape(repr(path))} is a {kind}: .*weights-only"
        with pytest.raises(TypeError, match=refused) as error:
            run.save_checkpoint({"weights": torch.zeros(2), "steps": 3, **entry}, 10)
        assert "\n" not in str(error.value) and list_checkpoints(run.dir) == []
        # what weights-only loading reads is accepted, a tensor subclass and an OrderedDict included
        run.save_checkpoint({"p": torch.nn.Parameter(torch.zeros(2)), "d": OrderedDict(a=(1, "s", None))}, 10)


def test_checkpoint_writers_never_share_a_temp_file(tmp_path, monkeypatch):
    """A second save of the same step that completes while the first is writing must not steal its
    temp file (both used ``step_<n>.tmp``: the first rename then failed)."""
    real_save = torch.save
    with Run(config(tmp_path), progress=False) as run:
        def save(obj, path, *args, **kwargs):
            real_save(obj, path, *args, **kwargs)
            if obj == {"writer": 1}:
                run.save_checkpoint({"writer": 2}, 10)

        monkeypatch.setattr(torch, "save", save)
        path = run.save_checkpoint({"writer": 1}, 10)
    assert torch.load(path) == {"writer": 1}
    assert sorted(p.name for p in run.checkpoint_dir.iterdir()) == [path.name]


def test_tensorboard_shows_each_point_once_after_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(tmp_path)
    run_dir = write_run(cfg)  # rows to 30, checkpoints to 20
    with Run(cfg, progress=False) as run:
        run.resume_from(run.load_latest_checkpoint()["env_steps"])
        run.log(30, 3, eval_return=-30.0, eval_success_rate=1.0)
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/success_rate")] == [0, 10, 20, 30]
    assert events.Scalars("eval/success_rate")[-1].value == 1.0


# ---------------------------------------------------------------------------------- config drift
def test_resuming_with_another_config_is_refused_listing_the_differing_keys(tmp_path):
    run_dir = write_run(config(tmp_path))
    changed = config(tmp_path, seed=1, optimizer={"lr": 1e-3})
    with pytest.raises(run_mod.ConfigMismatch, match=r"seed \(0 -> 1\).*optimizer\.lr \(0\.0003 -> 0\.001\)") as error:
        Run(changed, progress=False)
    assert "\n" not in str(error.value) and "num_envs" not in str(error.value)
    assert TrainConfig.load(run_dir / "config.yaml").seed == 0  # the saved config is not rewritten
    # the budget and the evaluation cadence may change on a resume
    longer = config(tmp_path, total_env_steps=100, eval_every_env_steps=20, eval_episodes=4)
    with Run(longer, progress=False):
        pass
    assert TrainConfig.load(run_dir / "config.yaml").total_env_steps == 100


def test_a_run_of_another_trainer_is_refused_by_its_algo_before_any_upgrade(tmp_path):
    """The requested trainer's upgrade_config reads its own earlier formats only: a PPO run resumed by APG
    is refused for its algo (not for PPO settings the APG upgrade cannot read), in either direction."""
    from diffgym_apg import upgrade_config

    ppo_params = {"n_steps": 16, "clip_range": 0.1, "gae_lambda": 0.98}
    write_run(config(tmp_path, algo="ppo", algo_params=ppo_params))
    with pytest.raises(run_mod.ConfigMismatch) as error:
        Run(config(tmp_path, algo="apg"), progress=False, upgrade_config=upgrade_config)
    assert re.search(r"\(config.yaml differs in algo \('ppo' -> 'apg'\)\); ", str(error.value)), error.value
    # an upgrade that names an older run's algo as today's (apg's legacy runs are apg-ppo's) still resumes
    def renamed(saved):
        return {**saved, "algo": "ppo-v2"} if saved["algo"] == "ppo" else saved

    with Run(config(tmp_path, algo="ppo-v2", algo_params=ppo_params), progress=False, upgrade_config=renamed):
        pass
    # the other way round (PPO has no upgrade), the same one difference
    write_run(config(tmp_path, algo="apg", run_dir=str(tmp_path / "apg")))
    with pytest.raises(run_mod.ConfigMismatch, match=r"\(config.yaml differs in algo \('apg' -> 'ppo'\)\); "):
        Run(config(tmp_path, algo="ppo", algo_params=ppo_params, run_dir=str(tmp_path / "apg")), progress=False)


def test_a_checkpoint_of_another_config_is_refused(tmp_path):
    run_dir = write_run(config(tmp_path))
    (run_dir / "config.yaml").unlink()  # only the checkpoints know the run's config now
    with Run(config(tmp_path, num_envs=4), progress=False) as run:
        with pytest.raises(run_mod.ConfigMismatch, match=r"num_envs \(2 -> 4\)"):
            run.load_latest_checkpoint()


class _TinyTrainer:
    """Logs one evaluation row per ``eval_every_env_steps`` through the shared Run."""

    name = "tiny"

    def default_config(self, env_id):
        return {"num_envs": 2, "total_env_steps": 20, "eval_every_env_steps": 10}

    def train(self, config, progress=True):
        with Run(config, progress=False) as run:
            for step in range(0, config.total_env_steps + 1, config.eval_every_env_steps):
                run.log(step, step, eval_return=0.0, eval_success_rate=0.0)
        return run.dir


def test_train_with_an_old_config_starts_a_new_run_dir(tmp_path, monkeypatch, capsys):
    register_trainer("tiny", _TinyTrainer())
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "old"
    assert diffgym_main(["train", "--algo", "tiny", "--env", ENV, "--run-dir", str(old), "--no-progress"]) == 0
    before = (old / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert diffgym_main(["train", "--algo", "tiny", "--env", ENV, "--config", str(old / "config.yaml"),
                         "--no-progress"]) == 0
    new = Path(capsys.readouterr().out.split("run directory: ")[1].splitlines()[0])
    assert new.resolve() != old.resolve() and new.parent == Path("runs") and (new / "metrics.jsonl").exists()
    assert (old / "metrics.jsonl").read_text() == before
    # --run-dir still says where: here, the old run (continued, with its own config)
    assert diffgym_main(["train", "--algo", "tiny", "--env", ENV, "--config", str(old / "config.yaml"),
                         "--run-dir", str(old), "--no-progress"]) == 0
    assert "run directory: " + str(old) in capsys.readouterr().out


def test_default_run_dirs_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config(tmp_path, run_dir=None)
    with Run(cfg, progress=False) as first, Run(cfg, progress=False) as second:  # same second
        assert first.dir != second.dir


def test_run_outputs_get_the_mode_a_plain_open_would_give(tmp_path):
    """0o666 less the umask for a new file (not a temp file's owner-only 0o600), an existing file's own mode
    when it is replaced, as ``open(path, "w")`` leaves them."""
    previous = os.umask(0o027)
    try:
        run_dir = write_run(config(tmp_path))
        written = [run_dir / "config.yaml", run_dir / "metrics.jsonl", *(p for _, p in list_checkpoints(run_dir))]
        assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {p.name: "0o640" for p in written}
        (run_dir / "config.yaml").chmod(0o604)
        with Run(config(tmp_path), progress=False):  # rewrites config.yaml
            pass
        assert oct(stat.S_IMODE((run_dir / "config.yaml").stat().st_mode)) == "0o604"
    finally:
        os.umask(previous)


@pytest.mark.parametrize("print_config", [False, True])
def test_a_run_dir_that_cannot_be_a_directory_is_one_line_exit_2(tmp_path, capsys, print_config):
    register_trainer("tiny", _TinyTrainer())
    afile = tmp_path / "afile"
    afile.touch()
    for run_dir, reason in ((afile, f"--run-dir {afile} is a file, not a directory"),
                            (afile / "run",
                             f"--run-dir {afile / 'run'} cannot be created: {afile} is not a directory")):
        code = diffgym_main(["train", "--algo", "tiny", "--env", ENV, "--run-dir", str(run_dir), "--no-progress",
                             *(["--print-config"] if print_config else [])])
        captured = capsys.readouterr()
        assert (code, captured.err, captured.out) == (2, f"diffgym train: {reason}\n", "")


def test_run_refuses_a_run_dir_it_cannot_make_in_one_line(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.touch()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(afile))} is a file, not a directory$"):
        Run(config(tmp_path, run_dir=str(afile)), progress=False)
    with pytest.raises(ValueError, match=rf"cannot be created: {re.escape(str(afile))} is not a directory$"):
        Run(config(tmp_path, run_dir=str(afile / "run")), progress=False)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a user without write permission sees it
    with pytest.raises(ValueError, match=rf"run cannot be created: {re.escape(str(tmp_path))} is not writable$"):
        Run(config(tmp_path), progress=False)
    monkeypatch.undo()
    if Path("/proc/self").is_dir():  # a directory no one can make a run directory in, even root
        with pytest.raises(run_mod.RunDirError, match=r"^/proc/x cannot be created \(.+\)$"):
            Run(config(tmp_path, run_dir="/proc/x"), progress=False)


# ------------------------------------------------------------------- trainers: budget, evaluations
@pytest.mark.parametrize("algo, params", [("apg", {"algo_params.segment_length": 16}),
                                          ("ppo", {"algo_params.n_steps": 24, "algo_params.batch_size": 48,
                                                   "algo_params.n_epochs": 1})])
def test_trainers_stop_at_the_budget_and_evaluate_on_the_interval(tmp_path, algo, params):
    # 2 envs: updates of 32 (APG) or 48 (PPO) env steps; neither divides the interval or the budget
    cfg = resolve_config(algo, ENV, {"num_envs": 2, "total_env_steps": 250, "eval_every_env_steps": 100,
                                     "eval_episodes": 2, "run_dir": str(tmp_path / algo), **params})
    run_dir = load_trainer(algo).train(cfg, progress=False)
    rows = read_metrics(run_dir)
    assert [r["env_steps"] for r in rows if "eval_return" in r] == [0, 100, 200, 250]
    assert max(r["env_steps"] for r in rows) == 250
    assert list_checkpoints(run_dir)[-1][0] == 250


def test_a_trainer_resumes_from_the_previous_checkpoint_when_the_latest_is_corrupt(tmp_path):
    changes = {"num_envs": 4, "eval_every_env_steps": 40, "eval_episodes": 2, "algo_params.segment_length": 10,
               "run_dir": str(tmp_path / "apg")}
    train = load_trainer("apg").train
    run_dir = train(resolve_config("apg", ENV, {**changes, "total_env_steps": 80}), progress=False)
    rows = read_metrics(run_dir)
    latest = list_checkpoints(run_dir)[-1][1]
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    with pytest.warns(run_mod.CheckpointWarning, match=re.escape(str(latest))):
        train(resolve_config("apg", ENV, {**changes, "total_env_steps": 120}), progress=False)
    resumed = read_metrics(run_dir)
    strip = lambda row: {k: v for k, v in row.items() if k not in ("wall_time", "eval_wall_time")}  # noqa: E731
    # the rows up to the previous checkpoint (40) are kept; 40..80 is trained again, identically
    assert [strip(r) for r in resumed[:len(rows)]] == [strip(r) for r in rows]
    assert [r["env_steps"] for r in resumed if "eval_return" in r] == [0, 40, 80, 120]


def test_a_mapping_emptied_or_filled_reads_as_one_change_and_a_changed_entry_by_its_dotted_key():
    randomized, plain = {"seed": 0, "randomize": {"mass": [0.5, 2.0]}}, {"seed": 0, "randomize": {}}
    assert run_mod.config_differences(randomized, plain) == ["randomize ({'mass': [0.5, 2.0]} -> {})"]
    assert run_mod.config_differences(plain, randomized) == ["randomize ({} -> {'mass': [0.5, 2.0]})"]
    wider = {"seed": 0, "randomize": {"mass": [0.5, 3.0], "friction": [0.1, 1.0]}}
    assert run_mod.config_differences(randomized, wider) == [
        "randomize.mass ([0.5, 2.0] -> [0.5, 3.0])", "randomize.friction ('<unset>' -> [0.1, 1.0])"]
