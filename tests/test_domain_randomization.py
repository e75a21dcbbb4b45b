"""Domain randomization from the config (``randomize``, ``eval_randomize``): refusals before any run, the
shared draws (reproducible, per env, redrawn only for restarted envs), the physics reaching the steps of
both trainers, exact resume, and the evaluation's own ranges."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from diffgym.commands.options import key_values
from diffgym.plugins import load_trainer, resolve_config
from diffgym.training import TrainConfig
from diffgym.training.evaluation import evaluate_config, evaluate_policy
from diffgym.training.randomization import PhysicsRandomizer, check_config_ranges, task_sim_class
from diffgym.training.rollout import EnvBatch
from diffgym.wrappers import wrap_vector_env

POINT_MASS = "DiffGym/PointMass1D-v0"
N = 4


def make_venv(num_envs: int = N, **kwargs) -> gym.vector.VectorEnv:
    return gym.make_vec(POINT_MASS, num_envs=num_envs, vectorization_mode="vector_entry_point", **kwargs)


# ------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("sets, message", [
    (["randomize.masss=[0.5,2]"], r"randomize names \['masss'\], not physical parameters of "
                                  r"DiffGym/PointMass1D-v0; its parameters: mass"),
    (["randomize.mass=[2,0.5]"], r"randomize.mass: low 2 > high 0.5"),
    (["eval_randomize.mass=[0,2]"], r"eval_randomize.mass = \[0, 2\] leaves DiffGym/PointMass1D-v0's valid "
                                    r"range of mass, \[0.001, 1000\]"),
    (["randomize.mass=2"], r"randomize.mass must be \[low, high\]"),
    (["randomize=[0.5,2]"], r"^randomize must be a mapping, given entry by entry as "
                            r"randomize.PARAM=\[low,high\] \(e.g. --set randomize.mass=\[0.5,2\]\), got \[0.5, 2\]$"),
])
def test_bad_ranges_are_refused_in_one_line_when_the_config_is_built(sets, message):
    for algo in ("apg", "ppo"):
        with pytest.raises(ValueError, match=message) as error:
            resolve_config(algo, POINT_MASS, key_values(sets))
        assert "\n" not in str(error.value)


def test_a_task_without_physical_parameters_is_refused():
    without = [env_id for env_id in gym.registry if env_id.startswith("DiffGym/")
               and not getattr(task_sim_class(env_id), "physical_params", ())]
    if not without:
        pytest.skip("every registered task has physical parameters")
    config = TrainConfig(algo="apg", env_id=without[0], eval_randomize={"mass": [0.5, 2.0]})
    with pytest.raises(ValueError, match=rf"eval_randomize names \['mass'\], but {without[0]} has no physical "
                                         "parameters to randomize"):
        check_config_ranges(config)


@pytest.mark.parametrize("algo", ["apg", "ppo"])
def test_the_python_api_refuses_bad_ranges_before_the_run_directory_exists(tmp_path, algo):
    run_dir = tmp_path / "run"
    config = TrainConfig(algo=algo, env_id=POINT_MASS, run_dir=str(run_dir), eval_randomize={"mass": [0.0, 2.0]})
    with pytest.raises(ValueError, match=r"eval_randomize.mass = \[0(\.0)?, 2(\.0)?\] leaves") as error:
        load_trainer(algo).train(config, progress=False)
    assert "\n" not in str(error.value) and not run_dir.exists()


def test_set_overrides_build_the_ranges_and_round_trip():
    config = resolve_config("ppo", POINT_MASS, key_values(["randomize.mass=[0.5,2]", "eval_randomize.mass=[1,1.5]"]))
    assert config.randomize == {"mass": [0.5, 2.0]} and config.eval_randomize == {"mass": [1.0, 1.5]}
    assert TrainConfig.from_dict(config.to_dict()) == config


# ------------------------------------------------------------------------------------ the draws
def test_draws_are_reproducible_per_env_inside_the_range_and_redrawn_only_where_masked():
    sim = make_venv().sim

    def randomizer(seed):
        return PhysicsRandomizer({"mass": [0.5, 2.0]}, sim, 8, seed)

    a, b, other = randomizer(3), randomizer(3), randomizer(4)
    first = a.draw()["mass"]
    assert torch.equal(first, b.draw()["mass"]) and not torch.equal(first, other.draw()["mass"])
    assert len(set(first.tolist())) == 8 and bool(((first >= 0.5) & (first <= 2.0)).all())
    mask = torch.tensor([True, False, False, True, False, False, False, True])
    second = a.draw(mask)["mass"]
    assert torch.equal(second[~mask], first[~mask]) and bool((second[mask] != first[mask]).all())
    assert torch.equal(first, b.values["mass"])  # a draw makes new tensors: the old ones stay as they were
    # the state dict restores the generator and the values: the next draws are the same
    saved = a.state_dict()
    expected = a.draw(mask)["mass"]
    b.load_state_dict(saved)
    assert torch.equal(b.values["mass"], second) and torch.equal(b.draw(mask)["mass"], expected)


def test_a_bad_saved_randomization_is_refused_in_one_line_and_changes_nothing():
    randomizer = PhysicsRandomizer({"mass": [0.5, 2.0]}, make_venv().sim, 4, seed=3)
    randomizer.draw()
    saved, before = randomizer.state_dict(), randomizer.state_dict()
    nan = saved["values"]["mass"].clone()
    nan[2] = float("nan")
    for broken, message in [({**saved, "values": {"mass": nan}}, r"saved values of mass must be a tensor of shape "
                                                                  r"\(4,\) inside \[0.5, 2\]"),
                            ({**saved, "draws": -1}, "draws must be a whole number >= 0"),
                            ({**saved, "generator": {"state": 1}}, "generator state is not a PCG64 state"),
                            ({"values": {}}, "lacks generator, draws or values")]:
        with pytest.raises(ValueError, match=message) as error:
            randomizer.load_state_dict(broken)
        assert "\n" not in str(error.value)
    assert randomizer.generator.bit_generator.state == before["generator"]
    assert torch.equal(randomizer.values["mass"], before["values"]["mass"])
    with pytest.raises(ValueError, match=r"the saved envs hold no domain randomization, but this run randomizes"):
        randomizer.check_saved_envs({"state": ()})


def test_env_batch_steps_with_the_drawn_physics_and_redraws_only_restarted_envs():
    venv = make_venv()
    envs = EnvBatch(venv, seed=7, device=torch.device("cpu"), randomize={"mass": [0.5, 2.0]})
    masses = envs.physics["mass"]
    assert len(set(masses.tolist())) == N
    action = torch.full((N, 1), 0.5, requires_grad=True)
    out = envs.differentiable_step(envs.state, action)
    expected = venv.differentiable_step(envs.state, action.detach(), physics={"mass": masses})
    nominal = venv.differentiable_step(envs.state, action.detach())
    assert torch.equal(out.state.v, expected.state.v) and not torch.equal(out.state.v, nominal.state.v)
    # the gradient flows through the env into the action; the drawn values take none
    out.state.v.sum().backward()
    assert bool((action.grad[:, 0] != 0).all()) and not masses.requires_grad
    done = torch.tensor([True, False, False, True])
    envs.restart_finished(out.state.detach(), out.obs.detach(), done)
    redrawn = envs.physics["mass"]
    assert torch.equal(redrawn[~done], masses[~done]) and bool((redrawn[done] != masses[done]).all())
    # the same seed draws the same values; the reset seeds' generator is not disturbed by the draws
    twin = EnvBatch(make_venv(), seed=7, device=torch.device("cpu"), randomize={"mass": [0.5, 2.0]})
    plain = EnvBatch(make_venv(), seed=7, device=torch.device("cpu"))
    assert torch.equal(twin.physics["mass"], masses) and plain.physics is None
    assert twin.seeds.bit_generator.state == plain.seeds.bit_generator.state


def _corrupted(saved: dict, where: str) -> dict:
    """A copy of an envs' state dict with one part broken: the wrappers' state or the envs' own."""
    broken = dict(saved)
    if where == "wrappers":  # EnvBatch keeps the wrappers' state apart; the PPO adapter's wrapped env, with its own
        if "wrappers" in saved:
            broken["wrappers"] = {**saved["wrappers"]}
        broken.get("wrappers", broken).pop("observation_noise")
    elif where == "seeds":
        broken["seeds"] = {"bit_generator": "MT19937"}
    else:
        broken["state"] = [t[:1] for t in saved["state"]]  # one env's fields where every env's belong
    return broken


def _snapshot(saved: dict) -> list:
    """The tensors and generator states of a state dict, flattened for comparison."""
    out = []
    for value in (saved[key] for key in sorted(saved)):
        if isinstance(value, dict):
            out.extend(_snapshot(value))
        elif isinstance(value, (list, tuple)):
            out.extend(value)
        else:
            out.append(value)
    return out


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("where", ["wrappers", "state", "seeds"])
def test_a_bad_checkpoint_leaves_the_env_batch_as_it_was(where):
    def batch(seed):
        venv = wrap_vector_env(make_venv(), {"observation_noise": 0.1})
        return EnvBatch(venv, seed=seed, device=torch.device("cpu"), randomize={"mass": [0.5, 2.0]})

    envs, other = batch(7), batch(8)
    saved = other.state_dict()
    before = _snapshot(envs.state_dict())
    with pytest.raises(ValueError) as error:
        envs.load_state_dict(_corrupted(saved, where))
    assert "\n" not in str(error.value)
    assert _same(_snapshot(envs.state_dict()), before)
    envs.load_state_dict(saved)  # the intact one loads
    assert _same(_snapshot(envs.state_dict()), _snapshot(saved))


@pytest.mark.parametrize("where", ["wrappers", "state"])
def test_a_bad_checkpoint_leaves_the_ppo_adapter_as_it_was(where):
    pytest.importorskip("diffgym_ppo")
    from diffgym_ppo import SB3VecEnvAdapter

    def adapter(seed):
        made = SB3VecEnvAdapter.make(POINT_MASS, 3, randomize={"mass": [0.5, 2.0]}, randomize_seed=seed,
                                     wrappers={"observation_noise": 0.1})
        made.reset()
        return made

    envs, other = adapter(11), adapter(12)
    saved = other.state_dict()
    before, physics = _snapshot(envs.state_dict()), envs.venv.unwrapped.get_physics()["mass"]
    with pytest.raises(ValueError) as error:
        envs.load_state_dict(_corrupted(saved, where))
    assert "\n" not in str(error.value)
    assert _same(_snapshot(envs.state_dict()), before)
    assert torch.equal(envs.venv.unwrapped.get_physics()["mass"], physics)


def test_ppo_adapter_sets_each_new_episodes_physics_at_the_autoreset():
    pytest.importorskip("diffgym_ppo")
    from diffgym_ppo import SB3VecEnvAdapter

    adapter = SB3VecEnvAdapter.make(POINT_MASS, 3, randomize={"mass": [0.5, 2.0]}, randomize_seed=11)
    native = adapter.venv.unwrapped
    adapter.reset()
    first = native.get_physics()["mass"]
    assert torch.equal(first, adapter.randomizer.values["mass"]) and len(set(first.tolist())) == 3
    # env 1 ends its episode: its next episode runs with a new mass, the others keep theirs
    state = native.get_state()
    native.set_state(state.replace(step=torch.tensor([5, native.sim.max_episode_steps - 1, 5], dtype=torch.int32)))
    _, _, dones, _ = adapter.step(np.zeros((3, 1), dtype=np.float32))
    assert dones.tolist() == [False, True, False]
    now = native.get_physics()["mass"]
    assert torch.equal(now[[0, 2]], first[[0, 2]]) and float(now[1]) != float(first[1])
    assert torch.equal(now, adapter.randomizer.values["mass"])


# ------------------------------------------------------------------------------------ evaluation
def _pd(obs: np.ndarray) -> np.ndarray:
    return np.clip(-2.0 * obs[:, :1] - obs[:, 1:2], -1, 1).astype(np.float32)


def test_evaluation_draws_its_own_ranges_and_is_nominal_without_them():
    base = TrainConfig(algo="apg", env_id=POINT_MASS, eval_episodes=4, seed=2)
    nominal = evaluate_policy(_pd, POINT_MASS, 4, 2, base.env_options())
    trained_only = evaluate_config(_pd, base.replace(randomize={"mass": [0.5, 2.0]}))
    assert trained_only == nominal  # training randomization leaves the evaluation at the nominal values
    randomized = base.replace(randomize={"mass": [0.5, 2.0]}, eval_randomize={"mass": [5.0, 10.0]})
    result = evaluate_config(_pd, randomized)
    assert result == evaluate_config(_pd, randomized)  # the evaluation seed fixes the draws
    assert result["eval_return"] != nominal["eval_return"]
    assert 5.0 <= result["eval_physics/mass_min"] < result["eval_physics/mass_max"] <= 10.0
    other_seed = evaluate_config(_pd, randomized.replace(seed=3))
    assert other_seed["eval_physics/mass_mean"] != result["eval_physics/mass_mean"]


# ------------------------------------------------------------------------------------ exact resume
def _rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("wall_time", "eval_wall_time", "time/fps")}
            for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


RANGES = {"randomize.mass": [0.5, 2.0], "eval_randomize.mass": [0.8, 1.2]}
CONFIGS = {
    # 2 envs over 100-step episodes: the checkpoint at 240 env steps follows the first restarts (new draws),
    # and the run goes on past the second ones
    "apg": {"num_envs": 2, "total_env_steps": 480, "eval_every_env_steps": 240, "eval_episodes": 2,
            "algo_params.segment.length": 30},
    "ppo": {"num_envs": 2, "total_env_steps": 500, "eval_every_env_steps": 250, "eval_episodes": 2,
            "algo_params.n_steps": 25, "algo_params.batch_size": 25, "algo_params.n_epochs": 2},
}


def tiny_run(tmp_path: Path, algo: str, name: str, **changes) -> list[dict]:
    """The metrics rows of a tiny run of ``algo`` (:data:`CONFIGS`) with ``changes`` in ``tmp_path/name``."""
    if algo == "ppo":
        pytest.importorskip("diffgym_ppo")
    config = resolve_config(algo, POINT_MASS, {**CONFIGS[algo], "run_dir": str(tmp_path / name), **changes})
    return _rows(load_trainer(algo).train(config, progress=False))


def resumed_exactly(tmp_path: Path, algo: str, **changes) -> list[dict]:
    """The rows of a tiny run, after checking that the same run stopped at its middle evaluation and
    resumed logs the very same rows."""
    straight = tiny_run(tmp_path, algo, "straight", **changes)
    tiny_run(tmp_path, algo, "resumed", **{**changes, "total_env_steps": CONFIGS[algo]["eval_every_env_steps"]})
    assert tiny_run(tmp_path, algo, "resumed", **changes) == straight
    return straight


@pytest.mark.parametrize("algo", ["apg", "ppo"])
def test_a_randomized_run_resumes_exactly_and_logs_its_draws(tmp_path, algo):
    straight = resumed_exactly(tmp_path, algo, **RANGES)
    evaluations = [row for row in straight if "eval_return" in row]
    means = [row["physics/mass_mean"] for row in evaluations]
    assert len(set(means)) == len(means)  # every evaluation after restarts sees new draws
    assert all(0.5 <= row["physics/mass_min"] <= row["physics/mass_max"] <= 2.0 for row in evaluations)
    assert len({row["eval_physics/mass_mean"] for row in evaluations}) == 1
