"""Checkpoint retention (issue 26 item 11): a run keeps its newest ``keep_checkpoints`` checkpoints and
those at the evaluations a report singles out (first to solve, best), so a resume, ``load_policy`` of
the milestones and the report keep working while the disk use stays bounded."""

import pytest
import torch

from diffgym.training.run import CheckpointWarning, Run, evaluation_milestones, list_checkpoints, read_metrics
from diffgym.training.spec import TrainConfig

ENV = "DiffGym/PointMass1D-v0"
# (success rate, return) of one evaluation every 1000 env steps: solved at 2000, best at 4000
CURVE = [(0.0, -50.0), (0.5, -30.0), (0.95, -9.0), (1.0, -5.0), (1.0, -3.0), (0.8, -6.0), (0.7, -7.0), (0.6, -8.0)]


def config(tmp_path, **fields) -> TrainConfig:
    return TrainConfig(algo="scripted", env_id=ENV, total_env_steps=7000, eval_every_env_steps=1000,
                       run_dir=str(tmp_path / "run"), **fields)


def evaluate_and_save(run: Run, curve=CURVE) -> None:
    """What the trainers do at each evaluation: log the row, then checkpoint the evaluated policy."""
    for i, (success, ret) in enumerate(curve):
        run.log(1000 * i, i, eval_success_rate=success, eval_return=ret)
        run.save_checkpoint({"weights": torch.full((2,), float(i)), "env_steps": 1000 * i}, 1000 * i)


def kept(tmp_path) -> list[int]:
    return [steps for steps, _ in list_checkpoints(tmp_path / "run")]


def test_keeps_the_newest_and_the_report_milestones(tmp_path):
    with Run(config(tmp_path, keep_checkpoints=2), progress=False) as run:
        evaluate_and_save(run)
    assert kept(tmp_path) == [2000, 4000, 6000, 7000]
    assert evaluation_milestones(read_metrics(tmp_path / "run")) == {"solved": 2000, "best": 4000}
    assert torch.load(tmp_path / "run" / "checkpoints" / "step_000000004000.pt", weights_only=True)["env_steps"] == 4000


def test_default_bounds_a_long_run_and_zero_keeps_all(tmp_path):
    long_curve = CURVE + [(0.5, -9.0)] * 12
    with Run(config(tmp_path), progress=False) as run:
        evaluate_and_save(run, long_curve)
    assert kept(tmp_path) == [2000, 4000, 16000, 17000, 18000, 19000]  # milestones + the default newest 4
    with Run(config(tmp_path / "all", keep_checkpoints=0), progress=False) as run:
        evaluate_and_save(run, long_curve)
    assert len(kept(tmp_path / "all")) == len(long_curve)


def test_default_keeps_a_resumable_checkpoint_behind_an_unreadable_one(tmp_path):
    """PPO's pattern: a policy-only snapshot at each evaluation (mid-rollout), a full checkpoint at the
    next update boundary. With the default retention, when the newest full checkpoint is unreadable a
    resume still finds the previous one."""
    with Run(config(tmp_path), progress=False) as run:
        for i in range(8):
            run.log(1000 * i + 8, i, eval_success_rate=0.0, eval_return=-50.0)
            run.save_checkpoint({"policy": torch.zeros(1)}, 1000 * i + 8)  # evaluated, not resumable
            run.save_checkpoint({"policy": torch.zeros(1), "optimizer": torch.full((1,), float(i))}, 1000 * i + 64)
    newest = list_checkpoints(tmp_path / "run")[-1][1]
    newest.write_bytes(b"truncated")
    with Run(config(tmp_path), progress=False) as run, pytest.warns(CheckpointWarning):
        resumed = run.load_latest_checkpoint(require=["optimizer"])
    assert float(resumed["optimizer"]) == 6.0


def test_a_run_made_before_retention_resumes_and_keep_checkpoints_is_checked(tmp_path):
    earlier = config(tmp_path).to_dict()
    del earlier["keep_checkpoints"]  # a config.yaml from before the field existed
    with Run(TrainConfig.from_dict(earlier), progress=False) as run:
        evaluate_and_save(run, CURVE[:2])
    with Run(config(tmp_path, keep_checkpoints=1), progress=False) as run:  # may change on continuing
        assert run.load_latest_checkpoint()["env_steps"] == 1000
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 0"):
        config(tmp_path, keep_checkpoints=-1)
