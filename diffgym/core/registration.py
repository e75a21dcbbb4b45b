"""One-line task registration: the single env and its native vector env under one Gymnasium id."""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

import gymnasium as gym
from gymnasium.envs.registration import load_env_creator

if TYPE_CHECKING:
    from diffgym.core.env import DiffGymVectorEnv


def make_vector_env(env_entry_point: str, num_envs: int = 1, **kwargs: Any) -> DiffGymVectorEnv:
    """Vector entry point: the batched twin of the ``DiffGymEnv`` subclass at ``env_entry_point``."""
    # imported here, not at module level: registering the tasks must not import torch and Warp
    from diffgym.core.env import DiffGymVectorEnv

    env_class = load_env_creator(env_entry_point)
    vector_class = getattr(env_class, "vector_class", DiffGymVectorEnv)
    return vector_class(env_class.sim_class, num_envs, metadata=env_class.metadata, face=env_class, **kwargs)


def register_task(env_id: str, entry_point: str, *, max_episode_steps: int, reward_threshold: float,
                  **kwargs: Any) -> None:
    """Register ``gym.make(env_id)`` and ``gym.make_vec(env_id, num_envs=N)`` (native, batched).

    ``max_episode_steps`` is both the spec's horizon (Gymnasium's ``TimeLimit``) and the simulator's
    (its ``truncated`` flag, which ``differentiable_step`` and the vector env report), so a task version
    that only changes the horizon is one line. ``kwargs`` are the task's constructor arguments."""
    gym.register(
        id=env_id,
        entry_point=entry_point,
        vector_entry_point=functools.partial(make_vector_env, entry_point),
        max_episode_steps=max_episode_steps,
        reward_threshold=reward_threshold,
        kwargs={"max_episode_steps": max_episode_steps, **kwargs},
    )


def task_spec(env_id: str) -> gym.envs.registration.EnvSpec:
    """``gym.spec`` that also takes Gymnasium's ``module:Namespace/Task-vN`` form, as ``gym.make`` and
    ``gym.make_vec`` do: the module (a third-party task's file or package, whose import registers it) is
    imported first. So a task outside DiffGym runs in every command as ``--env my_task:My/Task-v0``, and a
    run's ``config.yaml`` names the module that registers its task."""
    module, _, name = env_id.rpartition(":")
    if module:
        importlib.import_module(module)
    return gym.spec(name)


def is_diffgym_task(spec: gym.envs.registration.EnvSpec) -> bool:
    """Whether the env ``spec`` makes has a ``differentiable_step`` (a ``DiffGymEnv``, the contract every
    command relies on), read off its entry point without making it: ``False`` for a plain Gymnasium env
    such as ``CartPole-v1``. An entry point that does not import is not judged here: making the task
    reports why, in its own words."""
    try:
        creator = load_env_creator(spec.entry_point) if isinstance(spec.entry_point, str) else spec.entry_point
    except (ImportError, AttributeError):
        return True
    if not isinstance(creator, type):  # a factory function: only making the env would tell
        return True
    return callable(getattr(creator, "differentiable_step", None))
