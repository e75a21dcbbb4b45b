"""DiffGym: Gymnasium environments whose dynamics are differentiable NVIDIA Warp kernels.

``import diffgym`` registers the tasks; ``gym.make("DiffGym/<Task>-v0")`` gives a Gymnasium env and
``env.unwrapped.differentiable_step(state, action)`` a pure batched step with exact gradients.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import gymnasium as gym

from diffgym.core.registration import register_task

if TYPE_CHECKING:  # imported on first use (see __getattr__): torch and Warp take seconds to import
    from diffgym.core.bridge import Out, warp_call
    from diffgym.core.env import DiffGymEnv, DiffGymVectorEnv
    from diffgym.core.sim import DiffSim, StepOutput
    from diffgym.core.state import SimState
    from diffgym.policy import Policy, load_policy, save_policy

__version__ = "0.1.0"

_LAZY = {"Out": "diffgym.core.bridge", "warp_call": "diffgym.core.bridge", "DiffGymEnv": "diffgym.core.env",
         "DiffGymVectorEnv": "diffgym.core.env", "DiffSim": "diffgym.core.sim", "StepOutput": "diffgym.core.sim",
         "SimState": "diffgym.core.state", "Policy": "diffgym.policy", "load_policy": "diffgym.policy",
         "save_policy": "diffgym.policy"}

__all__ = ["DiffGymEnv", "DiffGymVectorEnv", "DiffSim", "Out", "Policy", "SimState", "StepOutput",
           "load_policy", "save_policy", "register_task", "warp_call", "TASK_IDS", "ALL_TASK_IDS", "GOAL_TASK_IDS",
           "NEWTON_TASK_IDS"]


def __getattr__(name: str) -> Any:
    # ``import diffgym`` only registers the tasks (Gymnasium entry points are strings); the torch/Warp
    # API is imported when first touched, so the CLI and ``import diffgym`` start fast.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffgym' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# One line per task, in rising dynamical complexity.
register_task("DiffGym/PointMass1D-v0", "diffgym.envs.point_mass_1d:PointMass1DEnv",
              max_episode_steps=100, reward_threshold=-12.0)
register_task("DiffGym/PointNav2D-v0", "diffgym.envs.point_nav_2d:PointNav2DEnv",
              max_episode_steps=200, reward_threshold=-210.0)
register_task("DiffGym/TPush-v0", "diffgym.envs.t_push:TPushEnv",
              max_episode_steps=200, reward_threshold=-20.0)
# v1: twice the time and a 3 cm tolerance, so the feasibility reference reaches the criterion (docs/tasks.md)
register_task("DiffGym/TPush-v1", "diffgym.envs.t_push:TPushEnv",
              max_episode_steps=400, reward_threshold=-30.0, success_distance=0.03)
register_task("DiffGym/FrankaReach-v0", "diffgym.envs.franka_reach:FrankaReachEnv",
              max_episode_steps=100, reward_threshold=-5.0)
register_task("DiffGym/FrankaReachGoal-v0", "diffgym.envs.franka_reach_goal:FrankaReachGoalEnv",
              max_episode_steps=100, reward_threshold=-15.0)  # sparse; a scripted reacher scores -8.3
# a Newton task (articulated dynamics; needs the optional newton extra to make, not to register)
register_task("DiffGym/FrankaTorqueReach-v0", "diffgym.envs.franka_torque_reach:FrankaTorqueReachEnv",
              max_episode_steps=100, reward_threshold=-5.0)

ALL_TASK_IDS = tuple(env_id for env_id in gym.registry if env_id.startswith("DiffGym/"))
"""Every registered DiffGym task, in registration order."""
GOAL_TASK_IDS = ("DiffGym/FrankaReachGoal-v0",)
"""The goal-conditioned tasks: Dict observations and ``compute_reward`` (for HER), not trainer benchmarks."""
TASK_IDS = tuple(env_id for env_id in ALL_TASK_IDS if env_id not in GOAL_TASK_IDS)
"""The benchmark tasks (flat ``Box`` observations), which the bundled trainers and experiments run on."""
NEWTON_TASK_IDS = ("DiffGym/FrankaTorqueReach-v0",)
"""The tasks whose dynamics are a Newton model (``diffgym.core.newton_task``): making one needs the optional
``newton`` extra, and a step costs milliseconds rather than microseconds."""
