"""``diffgym.testing.check_trainer``: the protocol every trainer plugin must keep (evaluations at the schedule's
points, every simulated training step a logged env step, a loadable policy, resume), checked on the bundled
trainers and on trainers that break it one rule at a time."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import diffgym  # noqa: F401  (registers the tasks)
from diffgym.core.sim import DiffSim
from diffgym.envs.point_mass_1d import PointMass1D
from diffgym.plugins import load_trainer, register_trainer
from diffgym.testing import TrainerContractError, check_trainer, counting_simulated_steps
from tests.conftest import TINY_RUNS

ENV = "DiffGym/PointMass1D-v0"


@pytest.mark.parametrize("algo", list(TINY_RUNS))
def test_the_bundled_trainers_keep_the_contract(algo, tmp_path, one_thread):
    check_trainer(algo, tmp_path / "run", ENV, TINY_RUNS[algo])


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


_KERNEL_STEP = DiffSim._step  # as a solver step of a task's own would, it reaches no DiffSim method


class _Halved(PointMass1D):
    """A task whose step calls its parent's."""

    def _step(self, state, action, physics=None):
        return super()._step(state, 0.5 * action, physics)


def test_the_counter_counts_a_task_class_defined_inside_it_and_once_per_step():
    """A task module imported while counting (Newton's tasks are imported lazily) is counted, and a _step
    that calls its parent's counts one step, not two."""
    with counting_simulated_steps() as count:
        class OwnSolver(PointMass1D):  # defined inside the block, with a step of its own
            def _step(self, state, action, physics=None):
                return _KERNEL_STEP(self, state, action, physics)

        for sim_class, batch in ((OwnSolver, 5), (_Halved, 2)):
            sim = sim_class(device="cpu")
            state = sim.reset(torch.zeros(batch, dtype=torch.int32), torch.zeros(batch, dtype=torch.int32))
            sim.step(state, torch.zeros(batch, sim.act_dim))
            sim.rollout(state, torch.zeros(3, batch, sim.act_dim))  # a class with its own _step loops it
    assert count.per_sim() == [(5, 5 + 15), (2, 2 + 6)]
    assert _Halved._step.__qualname__ == "_Halved._step" and OwnSolver._step.__qualname__.endswith("OwnSolver._step")


class _FlagWithoutDefault(_Wrapping):
    cli_flags = {"lr-decay": "a flag whose key the defaults do not list"}


class _CheckpointNotEvaluated(_Wrapping):
    """Its last checkpoint holds other parameters than the ones its last evaluation scored."""

    def train(self, config, progress=True):
        run_dir = super().train(config, progress)
        from diffgym.training.run import list_checkpoints

        path = list_checkpoints(run_dir)[-1][1]
        saved = torch.load(path, weights_only=True)
        saved["actor_critic"] = {k: v + 0.5 for k, v in saved["actor_critic"].items()}
        torch.save(saved, path)
        return run_dir


@pytest.mark.parametrize("trainer, message", [
    (_ExtraRollout(), r"^trainer 'wrapping': first run: simulated 32 training env steps from env step 0, logged 24 "
                      r"\(every simulated step is an env step"),
    (_OwnRunDir(), r"train returned 'elsewhere', not the config's run_dir"),
    (_FlagWithoutDefault(), r"cli_flags \['--lr-decay'\] set algo_params keys its default_config does not list"),
    (_CheckpointNotEvaluated(), r"the evaluation at env step 24 logged return .* evaluate_config on the checkpoint "
                                r"saved with it gives"),
], ids=["unlogged rollout", "another run dir", "flag without default", "checkpoint not evaluated"])
def test_a_trainer_breaking_one_rule_is_caught_in_one_line(trainer, message, tmp_path, one_thread):
    register_trainer("wrapping", trainer)
    with pytest.raises(TrainerContractError, match=message):
        check_trainer("wrapping", tmp_path / "run", ENV)
