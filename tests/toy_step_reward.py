"""A deliberately non-smooth toy task for the gradient-estimator tests (not registered by diffgym).

A point on a line, moved by its action (``x' = x + a dt``), earns reward 1 on every step it ends right
of the origin and 0 otherwise. The reward is a step function of the state: its analytic gradient is
zero almost everywhere, so backpropagation through the dynamics sees nothing, while the likelihood
ratio sees that pushing right pays.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import warp as wp

from diffgym import register_task
from diffgym.core.env import DiffGymEnv
from diffgym.core.render import Canvas
from diffgym.core.sim import DiffSim
from diffgym.core.state import SimState

ENV_ID = "DiffGymTest/StepReward-v0"


@dataclasses.dataclass(eq=False, frozen=True)
class StepRewardState(SimState):
    x: torch.Tensor
    step: torch.Tensor


@wp.struct
class StepRewardParams:
    dt: float
    start_low: float


@wp.kernel
def step_reward_reset(seed: wp.array(dtype=wp.int32), episode: wp.array(dtype=wp.int32), p: StepRewardParams,
                      # outputs
                      x: wp.array(dtype=float), step: wp.array(dtype=wp.int32)):
    i = wp.tid()
    rng = wp.rand_init(seed[i], episode[i])
    x[i] = wp.randf(rng, p.start_low, 0.0)
    step[i] = 0


@wp.kernel
def step_reward_observe(x: wp.array(dtype=float), step: wp.array(dtype=wp.int32), p: StepRewardParams,
                        # outputs
                        obs: wp.array2d(dtype=float)):
    i = wp.tid()
    obs[i, 0] = x[i]


@wp.kernel
def step_reward_step(x: wp.array(dtype=float), step: wp.array(dtype=wp.int32), action: wp.array2d(dtype=float),
                     p: StepRewardParams,
                     # outputs
                     x_next: wp.array(dtype=float), step_next: wp.array(dtype=wp.int32),
                     obs: wp.array2d(dtype=float), reward: wp.array(dtype=float),
                     terminated: wp.array(dtype=wp.int32), success: wp.array(dtype=wp.int32)):
    i = wp.tid()
    pos = x[i] + action[i, 0] * p.dt
    x_next[i] = pos
    step_next[i] = step[i] + 1
    obs[i, 0] = pos
    reward[i] = wp.where(pos > 0.0, 1.0, 0.0)
    terminated[i] = 0
    success[i] = wp.where(pos > 0.0, 1, 0)


class StepReward(DiffSim):
    state_type = StepRewardState
    obs_dim = 1
    act_dim = 1
    dt = 0.1
    default_max_episode_steps = 20
    reset_kernel = step_reward_reset
    observe_kernel = step_reward_observe
    step_kernel = step_reward_step

    def __init__(self, device: str = "cpu", max_episode_steps: int | None = None):
        super().__init__(device, max_episode_steps)
        self.params = StepRewardParams()
        self.params.dt = self.dt
        self.params.start_low = -0.3

    def render_state(self, state: StepRewardState, index: int = 0) -> np.ndarray:
        canvas = Canvas(64, 16, xlim=(-1.0, 1.0), ylim=(-0.25, 0.25))
        canvas.circle((float(state.x[index]), 0.0), 0.05, (40, 90, 220))
        return canvas.image


class StepRewardEnv(DiffGymEnv):
    """Toy: a point earns 1 per step right of the origin (a step-function reward)."""

    sim_class = StepReward


register_task(ENV_ID, "tests.toy_step_reward:StepRewardEnv", max_episode_steps=20, reward_threshold=10.0)
