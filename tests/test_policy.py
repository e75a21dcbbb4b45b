"""Using a trained policy: diffgym.load_policy for every bundled trainer, diffgym eval (reproduces the
run's own last evaluation, scores fresh seeds, records a video), diffgym export (TorchScript, ONNX and
the shareable .safetensors policy, each equal to Policy.predict, the format named by the extension),
and clear errors for what is not a run. Refusing pickled checkpoints: tests/test_safe_loading.py."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

import diffgym
from diffgym.cli import main
from diffgym.plugins import load_trainer, resolve_config
from diffgym.training.run import read_metrics

POINT_MASS = "DiffGym/PointMass1D-v0"
SMALL = {"apg": {"num_envs": 4, "total_env_steps": 64, "eval_every_env_steps": 32, "eval_episodes": 4,
                 "algo_params.segment_length": 8},
         "ppo": {"num_envs": 4, "total_env_steps": 64, "eval_every_env_steps": 32, "eval_episodes": 4,
                 "algo_params.n_steps": 8, "algo_params.batch_size": 16, "algo_params.n_epochs": 1}}


@pytest.fixture(scope="module", params=["apg", "ppo"])
def run(request, tmp_path_factory):
    algo = request.param
    config = resolve_config(algo, POINT_MASS, {**SMALL[algo], "run_dir": str(tmp_path_factory.mktemp(algo) / "run")})
    return load_trainer(algo).train(config, progress=False)


def test_every_bundled_trainer_saves_what_load_policy_needs(run):
    for path in sorted((run / "checkpoints").glob("step_*.pt")):
        saved = torch.load(path, weights_only=True)
        assert {"actor_critic", "normalizer", "config", "env_steps", "grad_steps"} <= set(saved)


def test_load_policy_predicts_like_sb3_and_acts_differentiably(run):
    policy = diffgym.load_policy(run)
    assert policy.config.env_id == POINT_MASS and policy.env_steps == 64
    single, state = policy.predict(np.zeros(3, dtype=np.float32), deterministic=True)
    batch, _ = policy.predict(np.zeros((5, 3)), deterministic=True)
    assert state is None and single.shape == (1,) and batch.shape == (5, 1) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0], single, rtol=0, atol=1e-6)
    # SB3's default: sampled actions, not the mean
    torch.manual_seed(0)
    sampled, _ = policy.predict(np.zeros((5, 3)))
    assert not np.allclose(sampled, batch) and np.abs(sampled).max() <= 1.0
    obs = torch.randn(4, 3, requires_grad=True)
    policy.act(obs).sum().backward()
    assert obs.grad is not None and torch.isfinite(obs.grad).all()
    earlier = diffgym.load_policy(run, step=32)
    assert earlier.env_steps == 32 and earlier.checkpoint.name == "step_000000000032.pt"
    with pytest.raises(ValueError, match="observation must have shape"):
        policy.predict(np.zeros(4))


def test_eval_reproduces_the_last_evaluation_and_scores_fresh_seeds(run, tmp_path):
    out = tmp_path / "eval.json"
    video = tmp_path / "episodes.gif"
    assert main(["eval", str(run), "--video", str(video), "--video-episodes", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    last = [r for r in read_metrics(run) if "eval_return" in r][-1]
    assert results["run_seeds"]["eval_return"] == pytest.approx(last["eval_return"], rel=1e-6)
    assert results["run_seeds"]["eval_success_rate"] == last["eval_success_rate"]
    fresh = results["fresh_seeds"]
    assert fresh["seed"] == 1000 and fresh["eval_return"] != results["run_seeds"]["eval_return"]
    assert fresh["eval_return_ci_low"] <= fresh["eval_return"] <= fresh["eval_return_ci_high"]
    assert video.stat().st_size > 1000


def test_mp4_video(run, tmp_path):
    from diffgym.policy_commands import record_video

    path = record_video(diffgym.load_policy(run), tmp_path / "episode.mp4", episodes=1)
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_predict(run, tmp_path, fmt, capfd, caplog):
    out = tmp_path / ("policy.pt" if fmt == "torchscript" else "policy.onnx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["export", str(run), "--out", str(out)]) == 0  # the extension names the format
    # the exporter's notes about itself (torchvision absent, its own deprecations) are not the user's business
    assert capfd.readouterr().err == "" and not [str(w.message) for w in caught if "LeafSpec" in str(w.message)]
    assert not [record.getMessage() for record in caplog.records if "torchvision" in record.getMessage()]
    # what was exported is not a policy diffgym eval reads back: one line saying what it is
    assert main(["eval", str(out)]) == 2
    kind = ("a TorchScript export (load it with torch.jit.load)" if fmt == "torchscript"
            else "an ONNX export (run it with onnxruntime)")
    assert capfd.readouterr().err == (f"diffgym eval: {out} is {kind}; diffgym eval takes a run directory, a "
                                      "checkpoint .pt or a .safetensors policy\n")
    policy = diffgym.load_policy(run)
    with torch.no_grad():  # a non-trivial normalization, so the export must carry it
        policy.normalizer.mean.copy_(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
        policy.normalizer.var.copy_(torch.tensor([0.5, 2.0, 0.25], dtype=torch.float64))
    from diffgym.policy_commands import export_policy

    export_policy(policy, out, fmt)
    obs = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32) * 3
    expected, _ = policy.predict(obs, deterministic=True)
    if fmt == "torchscript":
        got = torch.jit.load(str(out))(torch.as_tensor(obs)).numpy()
    else:
        import onnxruntime

        got = onnxruntime.InferenceSession(str(out)).run(None, {"obs": obs})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_clear_errors_for_what_is_not_a_run(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        diffgym.load_policy(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        diffgym.load_policy(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no checkpoint at 5 env steps"):
        diffgym.load_policy(run, step=5)
    assert main(["eval", str(tmp_path)]) == 2
    # a checkpoint from another task in this run's directory
    other = resolve_config("apg", "DiffGym/FrankaReach-v0", {**SMALL["apg"], "run_dir": str(tmp_path / "franka")})
    franka = load_trainer("apg").train(other, progress=False)
    copied = tmp_path / "mixed"
    shutil.copytree(run, copied)
    shutil.copy(sorted((franka / "checkpoints").glob("*.pt"))[-1], copied / "checkpoints" / "step_000000009999.pt")
    with pytest.raises(ValueError, match="trained on task DiffGym/FrankaReach-v0"):
        diffgym.load_policy(copied)


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(run, tmp_path):
    copied = tmp_path / "run"
    shutil.copytree(run, copied)
    latest = sorted((copied / "checkpoints").glob("*.pt"))[-1]
    latest.write_bytes(latest.read_bytes()[:100])
    with pytest.warns(UserWarning, match="skipped unreadable checkpoint"):
        policy = diffgym.load_policy(copied)
    assert policy.env_steps == 32


def test_step_selects_within_a_run_directory_only(run):
    checkpoint = sorted((run / "checkpoints").glob("*.pt"))[-1]
    assert diffgym.load_policy(checkpoint).env_steps == 64
    with pytest.raises(ValueError, match="is one file"):
        diffgym.load_policy(checkpoint, step=32)


def test_export_refuses_a_format_its_file_name_contradicts(run, tmp_path, capsys):
    for fmt, name in (("onnx", "policy.pt"), ("torchscript", "policy.onnx"), ("safetensors", "policy.pt"),
                      (None, "policy.bin")):
        out = tmp_path / name
        assert main(["export", str(run), *(["--format", fmt] if fmt else []), "--out", str(out)]) == 2
        error = capsys.readouterr().err
        assert error.startswith("diffgym export: ") and error.count("\n") == 1, error
        assert not out.exists()


def test_export_writes_next_to_the_run_by_default(run, tmp_path):
    copied = tmp_path / "run"
    shutil.copytree(run, copied)
    assert main(["export", str(copied)]) == 0
    assert main(["export", str(copied), "--step", "32", "--format", "safetensors"]) == 0
    obs = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)
    scripted = torch.jit.load(str(copied / "policy.pt"))(torch.as_tensor(obs)).numpy()
    np.testing.assert_allclose(scripted, diffgym.load_policy(copied).predict(obs, deterministic=True)[0],
                               rtol=0, atol=1e-6)
    assert diffgym.load_policy(copied / "policy_step_32.safetensors").env_steps == 32
    checkpoint = sorted((copied / "checkpoints").glob("step_*.pt"))[-1]
    assert main(["export", str(checkpoint)]) == 0  # beside the file, never over it
    assert checkpoint.with_name(f"{checkpoint.stem}_policy.pt").exists()
    assert diffgym.load_policy(checkpoint).env_steps == 64


def test_the_shareable_policy_holds_tensors_and_config_and_loads_back(run, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "shared" / "pm.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as handle:
        names, metadata = list(handle.keys()), handle.metadata()
    assert names and all(n.startswith(("actor_critic.", "normalizer.")) for n in names)
    config = json.loads(metadata["config"])
    assert config["env_id"] == POINT_MASS and config["run_dir"] is None  # the maker's paths stay home
    shared, original = diffgym.load_policy(out), diffgym.load_policy(run)
    assert shared.env_steps == original.env_steps and shared.config.algo == original.config.algo
    obs = np.random.default_rng(2).normal(size=(9, 3)).astype(np.float32) * 3
    np.testing.assert_array_equal(shared.predict(obs, deterministic=True)[0],
                                  original.predict(obs, deterministic=True)[0])
    for name, tensor in original.state_dict().items():
        assert torch.equal(shared.state_dict()[name], tensor), name
    result = tmp_path / "eval.json"
    assert main(["eval", str(out), "--episodes", "2", "--json", str(result)]) == 0
    assert json.loads(result.read_text())["env_steps"] == 64


def test_a_run_s_files_that_hold_no_policy_are_named_in_one_line(tmp_path, capsys):
    """Stable-Baselines3's model zip and the run's config: what they are, and what to give instead."""
    import gymnasium as gym
    from stable_baselines3 import PPO

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("algo: ppo\n")  # the zip sits in a run directory, as PPO runs save it
    PPO("MlpPolicy", gym.make("Pendulum-v1"), n_steps=8, batch_size=8, device="cpu").save(run_dir / "sb3_model.zip")
    for command in ("eval", "export"):
        assert main([command, str(run_dir / "sb3_model.zip")]) == 2
        assert capsys.readouterr().err == (
            f"diffgym {command}: {run_dir / 'sb3_model.zip'} is Stable-Baselines3's model zip (load it with "
            f"stable_baselines3.PPO.load); diffgym {command} takes a run directory (this file's: {run_dir}), a "
            "checkpoint .pt or a .safetensors policy\n")
    assert main(["eval", str(run_dir / "config.yaml")]) == 2
    assert capsys.readouterr().err.startswith(f"diffgym eval: {run_dir / 'config.yaml'} is a run's config; ")
    # the Python API says the same, as a ValueError
    with pytest.raises(ValueError, match=r"sb3_model\.zip is Stable-Baselines3's model zip .*; load_policy takes a "
                                         r"run directory, a checkpoint \.pt or a \.safetensors policy$"):
        diffgym.load_policy(run_dir / "sb3_model.zip")


def test_a_safetensors_file_that_is_not_a_policy_is_refused(tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a DiffGym policy file"):
        diffgym.load_policy(foreign)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        diffgym.load_policy(damaged)
