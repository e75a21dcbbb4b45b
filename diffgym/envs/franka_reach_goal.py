"""DiffGym/FrankaReachGoal-v0: FrankaReach as a goal-conditioned task (panda-gym / Fetch style).

Same arm, kinematics and Warp kernels as :mod:`diffgym.envs.franka_reach`; the Gymnasium faces return a
Dict observation (``observation`` / ``achieved_goal`` / ``desired_goal``) and expose a vectorized
``compute_reward``, so hindsight relabelling (SB3's ``HerReplayBuffer``) works on it. The reward is
sparse by default (``reward_type="dense"`` for ``-distance``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from gymnasium import spaces

from diffgym.core.env import DiffGymEnv, DiffGymVectorEnv
from diffgym.core.sim import DiffSim, StepOutput
from diffgym.core.state import SimState
from diffgym.envs.franka_reach import FrankaReach, FrankaReachState

RewardType = Literal["sparse", "dense"]

# Layout of FrankaReach's flat observation [q (7), tcp (3), goal - tcp (3)]
_Q, _TCP = slice(0, 7), slice(7, 10)
_OBSERVATION = slice(0, 10)  # q and the TCP; not the goal, so relabelling a goal leaves it valid


class FrankaReachGoal(FrankaReach):
    """FrankaReach with a sparse (default) or dense reward and goal-conditioned observations."""

    # FrankaReach's info kernel reads the distance off a dense reward; this task's `info` (below) computes it
    info_kernel = None

    def __init__(self, device: str | torch.device = "cpu", max_episode_steps: int | None = None,
                 reward_type: RewardType = "sparse", distance_threshold: float = 0.05, velocity_scale: float = 0.5,
                 reset_noise: float = 0.1):
        super().__init__(device, max_episode_steps, distance_threshold=distance_threshold,
                         velocity_scale=velocity_scale, reset_noise=reset_noise)
        if reward_type not in ("sparse", "dense"):
            raise ValueError(f"reward_type must be 'sparse' or 'dense', got {reward_type!r}")
        self.reward_type: RewardType = reward_type
        self.params.sparse_reward = 1 if reward_type == "sparse" else 0

    def goal_observation(self, obs: torch.Tensor, state: FrankaReachState) -> dict[str, torch.Tensor]:
        """The Dict observation (batched, differentiable) of a flat observation ``obs`` of ``state``."""
        return {"observation": obs[:, _OBSERVATION], "achieved_goal": obs[:, _TCP], "desired_goal": state.goal}

    def compute_reward(self, achieved_goal: Any, desired_goal: Any, info: Any = None) -> np.ndarray:
        """The reward of reaching ``achieved_goal`` (..., 3) when ``desired_goal`` (..., 3) was asked for,
        vectorized over leading dimensions; ``info`` is unused. Equals ``step``'s reward: float32 with
        the kernel's operation order (difference, squares summed x, y, z, square root)."""
        diff = np.asarray(desired_goal, np.float32) - np.asarray(achieved_goal, np.float32)
        squared = diff * diff
        distance = np.sqrt(squared[..., 0] + squared[..., 1] + squared[..., 2])
        if self.reward_type == "sparse":
            return -(distance >= np.float32(self.distance_threshold)).astype(np.float32)
        return -distance

    def info(self, out: StepOutput) -> dict[str, torch.Tensor]:
        # the reward is not -distance when sparse: take the distance from the observation's goal - tcp
        return {"tcp": out.obs[:, _TCP], "goal": out.state.goal,
                "distance": torch.linalg.vector_norm(out.obs[:, 10:13], dim=1)}


class FrankaReachGoalVectorEnv(DiffGymVectorEnv):
    """Native vector env of FrankaReachGoal-v0: Dict observations of ``(num_envs, ...)`` arrays."""

    sim: FrankaReachGoal

    def compute_reward(self, achieved_goal: Any, desired_goal: Any, info: Any = None) -> np.ndarray:
        """Vectorized reward, as :meth:`FrankaReachGoalEnv.compute_reward`."""
        return self.sim.compute_reward(achieved_goal, desired_goal, info)


class FrankaReachGoalEnv(DiffGymEnv):
    """
    ## Description
    The goal-conditioned twin of `DiffGym/FrankaReach-v0` (same FR3 arm, joint-velocity actions,
    kinematics, reset, goal box and horizon), in the panda-gym / Gymnasium-Robotics Fetch convention:
    a Dict observation, a sparse reward by default and a vectorized `compute_reward`, so hindsight
    experience replay (SB3's `HerReplayBuffer`) can relabel goals.

    ## Action Space
    `Box(-1, 1, (7,), float32)`: joint velocity commands, as FrankaReach-v0.

    ## Observation Space
    `Dict(observation=Box(low, high, (10,)), achieved_goal=Box(-inf, inf, (3,)), desired_goal=Box(-inf, inf, (3,)))`:
    `observation = [q (7), tcp (3)]` (joint positions [rad] within the joint limits and the TCP position
    [m]; no goal, so a relabelled goal leaves it valid), `achieved_goal` = the TCP position and
    `desired_goal` = the goal [m], both in the robot base frame. The vector env returns the same keys
    with `(num_envs, ...)` arrays.

    ## Rewards
    `reward_type="sparse"` (default): `r = 0` if `||tcp' - goal|| < 0.05` m, else `-1`, so `r == 0`
    exactly when `info["is_success"]` (panda-gym and Fetch return 0 also at a distance equal to the
    threshold; DiffGym keeps reward and success consistent). `reward_type="dense"`: `r = -||tcp' - goal||`.
    `env.unwrapped.compute_reward(achieved_goal, desired_goal, info)` gives the same value (bit for bit,
    float32) for any batch `(..., 3)` of goals; `info` is ignored.

    ## Tensor API
    `get_state` / `set_state` / `differentiable_step` are FrankaReach-v0's: `differentiable_step`'s
    `out.obs` stays the flat `(B, 13)` tensor `[q, tcp, goal - tcp]` and `out.reward` is the reward above
    (the sparse one has zero gradient). `env.unwrapped.sim.goal_observation(out.obs, out.state)` gives
    the Dict as differentiable tensors, `env.unwrapped.to_gym_observation(out.obs, out.state)` as NumPy.

    ## Episode End, Success, Starting State
    As FrankaReach-v0: no termination, truncation after 100 steps, success `||tcp' - goal|| < 0.05` m
    (`distance_threshold`, as panda-gym's Reach and Fetch), `info` holds `is_success`, `tcp`, `goal` and
    `distance`.

    ## Arguments
    `gym.make("DiffGym/FrankaReachGoal-v0", reward_type="sparse", device="cpu", render_mode=None,
    distance_threshold=0.05, velocity_scale=0.5, reset_noise=0.1)`; `gym.make_vec(..., num_envs=N)` gives
    the native batched vector env (Dict observations, `compute_reward` too).

    ## Version History
    * v0: initial version.
    """

    sim_class = FrankaReachGoal
    vector_class: ClassVar[type[DiffGymVectorEnv]] = FrankaReachGoalVectorEnv
    sim: FrankaReachGoal

    @classmethod
    def observation_space_of(cls, sim: DiffSim) -> spaces.Space:
        low = np.concatenate([FrankaReach.joint_lower, np.full(3, -np.inf, np.float32)])
        high = np.concatenate([FrankaReach.joint_upper, np.full(3, np.inf, np.float32)])
        goal = spaces.Box(-np.inf, np.inf, (3,), dtype=np.float32)
        return spaces.Dict({"observation": spaces.Box(low, high, dtype=np.float32),
                            "achieved_goal": goal, "desired_goal": goal})

    @classmethod
    def observations(cls, sim: DiffSim, obs: torch.Tensor, state: SimState) -> dict[str, np.ndarray]:
        # copies: on CPU .numpy() shares memory with the state, and relabelling must not edit it
        return {key: value.detach().cpu().numpy().copy()
                for key, value in sim.goal_observation(obs, state).items()}

    def compute_reward(self, achieved_goal: Any, desired_goal: Any, info: Any = None) -> np.ndarray:
        """Vectorized reward of ``achieved_goal`` (..., 3) against ``desired_goal`` (..., 3); equals ``step``'s."""
        return self.sim.compute_reward(achieved_goal, desired_goal, info)
