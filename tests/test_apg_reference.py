"""APG's recorded behaviour, bit for bit: the documented per-task defaults reproduce their recorded metric
rows over short prefixes, and run directories written in the first (flat) config format still resume
exactly (tests/data/apg_reference, tests/data/apg_legacy: how each was recorded is in its record.py)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

import diffgym  # noqa: F401
from diffgym.plugins import load_trainer, resolve_config
from diffgym.training import TrainConfig
from diffgym.training.run import read_metrics

from diffgym_apg import APGConfig, upgrade_config

DATA = Path(__file__).parent / "data"


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.parent.name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _module(DATA / "apg_reference" / "record.py")
legacy = _module(DATA / "apg_legacy" / "record.py")


def recorded(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("task", list(reference.PREFIXES))
def test_documented_defaults_reproduce_their_recorded_rows(task):
    rows = reference.run_rows(task)
    expected = recorded(DATA / "apg_reference" / f"{task}.jsonl")
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected):
        assert row == want, f"{task} at {want['env_steps']} env steps"


@pytest.mark.parametrize("name", list(legacy.LEGACY_PARAMS))
def test_a_run_of_the_flat_format_resumes_bit_for_bit(tmp_path, name):
    run_dir = tmp_path / name
    shutil.copytree(DATA / "apg_legacy" / name, run_dir)
    saved = TrainConfig.load(run_dir / "config.yaml")
    assert "segment_length" in saved.algo_params  # the flat format, as the run wrote it
    algo = "apg-ppo" if name == "proximal" else "apg"
    # resumed as a user would: the trainer of today, the run's own settings in either format, a larger budget
    overrides = {"total_env_steps": legacy.FULL, "run_dir": str(run_dir)}
    config = resolve_config(algo, saved.env_id, overrides, base=saved.replace(algo=algo))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_trainer(algo).train(config, progress=False)
    finally:
        torch.set_num_threads(threads)
    rows = [{k: v for k, v in row.items() if k not in ("wall_time", "eval_wall_time")} for row in read_metrics(run_dir)]
    assert rows == recorded(DATA / "apg_legacy" / f"{name}.full.jsonl")


def test_flat_keys_move_into_their_sections():
    flat = {**legacy.LEGACY_PARAMS["proximal"], "gamma": 0.97}
    data = upgrade_config({"algo": "apg", "algo_params": flat})
    assert data["algo"] == "apg-ppo"  # the first format named every run apg
    params = APGConfig.from_params(data["algo_params"])
    assert (params.gamma, params.segment.length) == (0.97, 8)
    assert (params.policy_gradient.estimator, params.policy_gradient.lr, params.policy_gradient.env_gradient_clip) == (
        "analytic", 1e-3, 1.0)
    assert (params.value.bootstrap, params.value.normalize_reward) == ("gae", True)
    proximal = params.proximal
    assert (proximal.n_epochs, proximal.n_steps, proximal.batch_size, proximal.clip_range, proximal.gae_lambda,
            proximal.ent_coef) == (2, 16, 16, 0.1, 0.9, 1e-3)
    # the old names for the path's switch-off and the zeroth-order ablation
    off = upgrade_config({"algo": "apg", "algo_params": {"segment_length": 8, "proximal_epochs": 0, "clip_range": 0.3}})
    assert off["algo"] == "apg" and "proximal" not in off["algo_params"]
    ablation = upgrade_config({"algo": "apg", "algo_params": {**flat, "estimator": "proximal"}})
    assert ablation["algo_params"]["policy_gradient"]["estimator"] == "none"


def test_a_flat_key_on_the_command_line_overrides_its_section():
    config = resolve_config("apg", "DiffGym/PointMass1D-v0", {"algo_params.segment_length": 12,
                                                              "algo_params.bootstrap": "critic"})
    assert config.algo_params["segment"]["length"] == 12 and config.algo_params["value"]["bootstrap"] == "critic"
    assert "segment_length" not in config.algo_params
    with pytest.raises(ValueError, match="--algo apg-ppo"):
        resolve_config("apg", "DiffGym/PointMass1D-v0", {"algo_params.proximal_epochs": 3})
    with pytest.raises(ValueError, match="unknown algo_params"):
        resolve_config("apg", "DiffGym/PointMass1D-v0", {"algo_params.segment_lenght": 12})


def test_the_value_network_fitted_twice_is_refused_by_name():
    with pytest.raises(ValueError, match="fitted the value network twice"):
        upgrade_config({"algo": "apg", "algo_params": {"bootstrap": "critic", "proximal_epochs": 2,
                                                       "proximal_value_fit": True}})


def test_a_flat_config_given_in_python_runs_and_resumes_in_sections(tmp_path):
    """A TrainConfig built by hand with first-format algo_params trains, writes its config.yaml in sections,
    and the same call continues it (both sides of the comparison in today's format)."""
    from diffgym_apg import train

    flat = TrainConfig(algo="apg", env_id="DiffGym/PointMass1D-v0", num_envs=4, total_env_steps=32,
                       eval_every_env_steps=16, eval_episodes=2, run_dir=str(tmp_path / "run"),
                       algo_params={"segment_length": 4, "bootstrap": "none"})
    train(flat, progress=False)
    saved = TrainConfig.load(tmp_path / "run" / "config.yaml")
    assert saved.algo_params["segment"]["length"] == 4 and "segment_length" not in saved.algo_params
    train(flat.replace(total_env_steps=48), progress=False)  # resumes: no ConfigMismatch
    assert max(r["env_steps"] for r in read_metrics(tmp_path / "run")) == 48


def test_a_stray_key_of_the_proximal_path_is_refused_not_dropped():
    with pytest.raises(ValueError, match="set the proximal path"):
        resolve_config("apg", "DiffGym/PointMass1D-v0", {"algo_params.gae_lambda": 0.9})
    with pytest.raises(ValueError, match="reuse.clip_range"):
        resolve_config("apg", "DiffGym/PointMass1D-v0", {"algo_params.clip_range": 0.3})
    # on apg-ppo the same flat keys are its section's fields
    config = resolve_config("apg-ppo", "DiffGym/PointMass1D-v0", {"algo_params.gae_lambda": 0.9})
    assert config.algo_params["proximal"]["gae_lambda"] == 0.9
