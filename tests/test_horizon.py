"""Horizon overrides (issue 13, part 6): `max_episode_steps` passed to `gym.make` / `gym.make_vec`, above
or below the registered default, is the episode length the env actually runs, and what it reports."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import diffgym

TASK = "DiffGym/PointMass1D-v0"  # registered horizon: 100


def episode_length(env) -> int:
    env.reset(seed=0)
    zeros = np.zeros(env.action_space.shape, np.float32)
    for step in range(1, 1000):
        _, _, terminated, truncated, _ = env.step(zeros)
        if terminated or truncated:
            return step
    raise AssertionError("no truncation within 1000 steps")


@pytest.mark.parametrize("horizon", [7, 100, 300])
def test_single_env_runs_the_requested_horizon(horizon):
    env = gym.make(TASK, max_episode_steps=horizon)
    assert env.spec.max_episode_steps == horizon
    assert episode_length(env) == horizon  # was 100 for 300: the env truncated at the registered value


def test_single_env_default_horizon_is_the_registered_one():
    env = gym.make(TASK)
    assert env.spec.max_episode_steps == gym.spec(TASK).max_episode_steps == 100
    assert episode_length(env) == 100 and env.unwrapped.sim.max_episode_steps == 100
    assert episode_length(gym.make(TASK, max_episode_steps=None)) == 100


@pytest.mark.parametrize("mode", ["vector_entry_point", "sync"])
@pytest.mark.parametrize("horizon", [7, 300])
def test_vector_env_runs_the_requested_horizon(mode, horizon):
    venv = gym.make_vec(TASK, num_envs=2, vectorization_mode=mode, max_episode_steps=horizon)
    venv.reset(seed=0)
    zeros = np.zeros(venv.action_space.shape, np.float32)
    for step in range(1, horizon + 1):
        _, _, terminated, truncated, _ = venv.step(zeros)
        assert not terminated.any()
        assert truncated.all() == (step == horizon) and truncated.any() == (step == horizon), step


def test_vector_tensor_api_truncates_at_the_requested_horizon():
    venv = gym.make_vec(TASK, num_envs=2, max_episode_steps=5)
    venv.reset(seed=0)
    state = venv.get_state()
    for step in range(1, 6):
        out = venv.differentiable_step(state, torch.zeros(2, 1))
        state = out.state
        assert bool(out.truncated.all()) == (step == 5) and bool(out.truncated.any()) == (step == 5)


@pytest.mark.parametrize("bad", [0, -5, 2.5, "10"])
def test_invalid_horizons_are_rejected_with_one_line(bad):
    with pytest.raises((ValueError, TypeError), match="max_episode_steps") as error:
        env = gym.make_vec(TASK, num_envs=2, max_episode_steps=bad)
        env.reset(seed=0)
    assert "\n" not in str(error.value)


def test_no_time_limit_means_no_truncation():
    """`gym.make(id, max_episode_steps=-1)` asks Gymnasium for no TimeLimit: the env runs on."""
    env = gym.make(TASK, max_episode_steps=-1)
    env.reset(seed=0)
    zeros = np.zeros(env.action_space.shape, np.float32)
    assert not any(env.step(zeros)[3] for _ in range(250))


def test_every_task_honours_an_override():
    for env_id in diffgym.ALL_TASK_IDS:
        default = gym.spec(env_id).max_episode_steps
        env = gym.make(env_id, max_episode_steps=default + 3)
        assert episode_length(env) == default + 3, env_id
