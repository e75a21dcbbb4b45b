"""A run directory from someone else runs no code: every bundled trainer's checkpoints load weights-only
(test_policy.py checks them with torch.load(weights_only=True)), and a checkpoint carrying a pickle payload is refused, in one line naming the file, by every command
and public function that loads checkpoints (load_policy, diffgym eval / export, a resume through
diffgym train --run-dir and Run.load_latest_checkpoint), and legacy=True, the opt-in for older
checkpoints, reads their NumPy data without running anything either. Honest runs loading and resuming exactly: test_policy.py,
test_ppo.py (with VecNormalize's statistics too), test_apg.py, test_run_dir.py."""

from __future__ import annotations

import builtins
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import diffgym
from diffgym.cli import main
from diffgym.training import Run, TrainConfig
from diffgym.training.run import UnsafeCheckpointError, list_checkpoints
from tests.test_policy import POINT_MASS, run  # noqa: F401  (run: a tiny APG and a tiny PPO run, the fixture)


class Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.fixture
def planted(run, tmp_path):
    """A copy of the run whose latest (resumable) checkpoint also carries a payload, and its marker."""
    copied, marker = tmp_path / "run", tmp_path / "payload-ran"
    shutil.copytree(run, copied)
    latest = list_checkpoints(copied)[-1][1]
    torch.save({**torch.load(latest, weights_only=True), "note": Payload(marker)}, latest)
    return copied, latest, marker


def _one_line_naming(text: str, path: Path) -> None:
    assert text.count("\n") <= 1 and str(path) in text and "not a weights-only checkpoint" in text, text


def _resume(run_dir: Path) -> object:
    with Run(TrainConfig.load(run_dir / "config.yaml").replace(run_dir=str(run_dir)), progress=False) as run:
        return run.load_latest_checkpoint()


def test_no_public_function_runs_a_planted_payload(planted):
    copied, latest, marker = planted
    for load in (lambda: diffgym.load_policy(copied), lambda: diffgym.load_policy(latest),
                 lambda: _resume(copied)):
        with pytest.raises(UnsafeCheckpointError) as error:
            load()
        _one_line_naming(str(error.value), latest)
        assert isinstance(error.value, ValueError)  # what load_policy's callers already handle
        assert not marker.exists()
    assert "--legacy-checkpoint" in str(error.value)
    # the opt-in reads the file and builds an inert stand-in for the payload: the policy loads, nothing runs
    policy = diffgym.load_policy(latest, legacy=True)
    assert policy.env_steps > 0 and not marker.exists()
    # while the payload is live: a full unpickling, as any other reader would do, runs it
    torch.load(latest, weights_only=False)
    assert marker.exists()


def test_no_command_runs_a_planted_payload(planted, tmp_path, capsys):
    copied, latest, marker = planted
    algo = TrainConfig.load(copied / "config.yaml").algo
    commands = (["eval", str(copied)], ["export", str(copied), "--out", str(tmp_path / "p.safetensors")],
                ["export", str(latest)],
                ["train", "--algo", algo, "--env", POINT_MASS, "--config", str(copied / "config.yaml"),
                 "--run-dir", str(copied), "--env-steps", "96", "--no-progress"])
    for command in commands:
        assert main(command) == 2, command
        error = capsys.readouterr().err
        assert error.startswith(f"diffgym {command[0]}: "), error
        _one_line_naming(error, latest)
        assert not marker.exists(), command
    assert not (tmp_path / "p.safetensors").exists()
    assert list_checkpoints(copied)[-1][1] == latest  # the refused resume trained nothing


def test_an_older_checkpoint_is_read_only_with_the_legacy_opt_in(run, tmp_path, capsys):
    # the form of PPO checkpoints before they became weights-only: SB3's values as NumPy objects
    copied = tmp_path / "run"
    shutil.copytree(run, copied)
    latest = list_checkpoints(copied)[-1][1]
    saved = torch.load(latest, weights_only=True)
    torch.save({**saved, "sb3": {"last_obs": np.zeros((4, 3), np.float32), "n_updates": np.int64(3)}}, latest)
    assert main(["export", str(copied), "--out", str(tmp_path / "p.safetensors")]) == 2
    error = capsys.readouterr().err
    _one_line_naming(error, latest)
    assert "numpy" in error and "--legacy-checkpoint" in error
    assert main(["export", str(copied), "--out", str(tmp_path / "p.safetensors"), "--legacy-checkpoint"]) == 0
    obs = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    np.testing.assert_array_equal(diffgym.load_policy(tmp_path / "p.safetensors").predict(obs, deterministic=True)[0],
                                  diffgym.load_policy(run).predict(obs, deterministic=True)[0])
