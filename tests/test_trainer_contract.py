"""``diffgym.testing.check_trainer``: the protocol every trainer plugin must keep (evaluations at the schedule's
points, every simulated training step a logged env step, a loadable policy, resume), checked on the bundled
trainers and on trainers that break it one rule at a time."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import diffgym  # noqa: F401  (registers the tasks)
from diffgym.plugins import load_trainer, register_trainer
from diffgym.testing import TrainerContractError, check_trainer, counting_simulated_steps

ENV = "DiffGym/PointMass1D-v0"
SMALL = {"apg": {}, "sapo": {},
         "apg-ppo": {"algo_params.proximal.n_steps": 8, "algo_params.proximal.batch_size": 16},
         "ppo": {"algo_params.n_steps": 16, "algo_params.batch_size": 32}}
"""Per bundled trainer, what makes a 200-step run small enough (PPO's rollout and minibatch sizes)."""


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("algo", list(SMALL))
def test_the_bundled_trainers_keep_the_contract(algo, tmp_path, one_thread):
    check_trainer(algo, tmp_path / "run", ENV, SMALL[algo])


class _Wrapping:
    """A trainer of one's own built on apg (its defaults and training), breaking one rule in ``before``."""

    name = "wrapping"

    def default_config(self, env_id):
        return load_trainer("apg").default_config(env_id)

    def before(self, config):
        pass

    def train(self, config, progress=True):
        self.before(config)
        return load_trainer("apg").train(config, progress=progress)


class _ExtraRollout(_Wrapping):
    """Simulates a planning rollout of 2 steps in the training envs' size, and does not log it."""

    def before(self, config):
        venv = gym.make_vec(config.env_id, num_envs=config.num_envs, vectorization_mode="vector_entry_point")
        venv.reset(seed=0)
        for _ in range(2):
            venv.step(np.zeros(venv.action_space.shape, dtype=np.float32))
        venv.close()


class _OwnRunDir(_Wrapping):
    """Trains, then returns another directory."""

    def train(self, config, progress=True):
        super().train(config, progress)
        return "elsewhere"


def test_a_trainer_that_does_not_log_a_simulated_step_is_caught(tmp_path, one_thread):
    register_trainer("wrapping", _ExtraRollout())
    with pytest.raises(TrainerContractError, match=r"^trainer 'wrapping': first run: simulated 32 training env steps "
                                                   r"from env step 0, logged 24 \(every simulated step is an env step"):
        check_trainer("wrapping", tmp_path / "run", ENV)


def test_a_trainer_that_returns_another_directory_is_caught(tmp_path, one_thread):
    register_trainer("wrapping", _OwnRunDir())
    with pytest.raises(TrainerContractError, match=r"train returned 'elsewhere', not the config's run_dir"):
        check_trainer("wrapping", tmp_path / "run", ENV)


def test_a_resumed_run_is_checked_as_such(tmp_path, one_thread):
    """apg resumes: told it does not, the kit expects the whole schedule again and says what it saw."""
    with pytest.raises(TrainerContractError, match=r"second run \(no resume\): evaluations at env steps "
                                                   r"\[0, 8, 16, 24, 32, 64, 128, 192, 200\]"):
        check_trainer("apg", tmp_path / "run", ENV, resumes=False)


def test_the_counter_counts_steps_rollouts_and_not_the_cores_launch_probe():
    from diffgym.core.env import DiffGymVectorEnv

    with counting_simulated_steps() as count:
        venv = gym.make_vec("DiffGym/PointNav2D-v0", num_envs=5, vectorization_mode="vector_entry_point")
        venv.reset(seed=0)  # the first reset of a task class runs its one-env launch check: no env step
        venv.step(np.zeros(venv.action_space.shape, dtype=np.float32))
        env = venv if isinstance(venv, DiffGymVectorEnv) else venv.unwrapped
        state = env.sim.reset(torch.zeros(5, dtype=torch.int32), torch.zeros(5, dtype=torch.int32))
        env.sim.rollout(state, torch.zeros(7, 5, env.sim.act_dim))
        venv.close()
    assert count.per_sim() == [(5, 5 + 35)]
