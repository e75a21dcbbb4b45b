"""The single evaluation routine every trainer calls, so all algorithms are scored identically."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import gymnasium as gym
import numpy as np
import torch

from diffgym.training.randomization import PhysicsRandomizer, task_sim_class

if TYPE_CHECKING:
    from diffgym.training.spec import TrainConfig

SEED_STRIDE = 100_000
"""Runs with seeds ``s`` and ``s + 1`` draw env seeds this far apart, so they never share an episode
(Gymnasium's ``seed + i`` convention alone would make env ``i + 1`` of one run env ``i`` of the next)."""
EVAL_SEED_OFFSET = 10_000
"""Evaluation env ``i`` of a run with seed ``s`` is seeded ``EVAL_SEED_OFFSET + SEED_STRIDE * s + i``:
disjoint from the training envs (``train_env_seed(s) + i`` with ``i < num_envs <= EVAL_SEED_OFFSET``)."""


def train_env_seed(seed: int) -> int:
    """The base seed a trainer gives its training vector env (env ``i`` gets ``train_env_seed(seed) + i``)."""
    return SEED_STRIDE * int(seed)


def eval_env_seed(seed: int) -> int:
    """The base seed of a run's evaluation envs (env ``i`` gets ``eval_env_seed(seed) + i``)."""
    return EVAL_SEED_OFFSET + SEED_STRIDE * int(seed)


def evaluate_policy(act: Callable[[np.ndarray], np.ndarray], env_id: str, episodes: int, seed: int,
                    env_kwargs: dict[str, Any] | None = None,
                    physics: dict[str, Any] | None = None, wrappers: dict[str, Any] | None = None
                    ) -> dict[str, float]:
    """Run ``episodes`` held-out episodes of ``act`` on the native vector env and summarize them.

    ``act`` maps a ``(episodes, obs_dim)`` float32 observation batch to ``(episodes, act_dim)`` actions in
    [-1, 1]; pass the *deterministic* policy (the squashed mean). One vector env with ``episodes`` envs
    runs every env to the end of its first episode (terminated or truncated). ``physics`` (name -> one
    value for every env, or ``(episodes,)`` values) sets the task's physical parameters through ``reset``'s
    options (``diffgym robustness``); a name left out keeps the task's constructor value. ``wrappers``
    (``TrainConfig.wrappers``) puts the envs inside those ``diffgym.wrappers``.

    Returns ``eval_return`` (mean undiscounted return), ``eval_return_std``, ``eval_success_rate``
    (fraction of episodes whose *last* step has ``info["is_success"]``) and ``eval_episode_length``.
    """
    if episodes > SEED_STRIDE - EVAL_SEED_OFFSET:
        raise ValueError(f"at most {SEED_STRIDE - EVAL_SEED_OFFSET} evaluation episodes, got {episodes}")
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    venv = gym.make_vec(env_id, num_envs=episodes, vectorization_mode="vector_entry_point",
                        **(env_kwargs or {}))
    if wrappers:  # imported only then, as TrainConfig does
        from diffgym.wrappers import wrap_vector_env

        venv = wrap_vector_env(venv, wrappers)
    try:
        obs, _ = venv.reset(seed=eval_env_seed(seed),
                            options={"physics": physics} if physics else None)
        returns = np.zeros(episodes, dtype=np.float64)
        lengths = np.zeros(episodes, dtype=np.int64)
        success = np.zeros(episodes, dtype=bool)
        running = np.ones(episodes, dtype=bool)
        while running.any():
            with torch.no_grad():
                actions = np.asarray(act(obs), dtype=np.float32).reshape(venv.action_space.shape)
            obs, reward, terminated, truncated, info = venv.step(actions)
            returns[running] += reward[running]
            lengths[running] += 1
            ended = running & (terminated | truncated)
            success[ended] = np.asarray(info.get("is_success", np.zeros(episodes, dtype=bool)))[ended]
            running &= ~ended
    finally:
        venv.close()
    return {
        "eval_return": float(returns.mean()),
        "eval_return_std": float(returns.std()),
        "eval_success_rate": float(success.mean()),
        "eval_episode_length": float(lengths.mean()),
    }


def evaluation_physics(ranges: dict[str, Any] | None, env_id: str, episodes: int, seed: int,
                       device: str = "cpu") -> tuple[dict[str, torch.Tensor] | None, dict[str, float]]:
    """The physical parameters of the ``episodes`` evaluation envs of seed ``seed`` under ``ranges`` (a
    config's ``eval_randomize``): drawn from a :class:`PhysicsRandomizer` seeded from
    :func:`eval_env_seed`, so every evaluation with this seed draws the same values (env ``i``'s draw does
    not depend on how many envs follow it). Returns them with their ``eval_physics/<name>_mean``, ``_min``
    and ``_max``; ``(None, {})`` without ranges (every env at the task's nominal values)."""
    if not ranges:
        return None, {}
    randomizer = PhysicsRandomizer(ranges, task_sim_class(env_id), episodes, eval_env_seed(seed), device,
                                   task=env_id, key="eval_randomize")
    physics = randomizer.draw()
    return physics, randomizer.summary("eval_physics")


def evaluate_config(act: Callable[[np.ndarray], np.ndarray], config: TrainConfig) -> dict[str, float]:
    """:func:`evaluate_policy` as every trainer evaluates its run: the config's task, task arguments,
    evaluation episodes and seed; with ``config.eval_randomize``, each evaluation env's physical
    parameters drawn from those ranges (seeded from the evaluation seed: the same draws at every
    evaluation of the run, and for every trainer), and their mean, min and max in the result as
    ``eval_physics/<name>_mean`` etc. Without it, every env runs at the task's nominal values. The envs
    are inside the config's ``wrappers``, as the training envs are."""
    physics, summary = evaluation_physics(config.eval_randomize, config.env_id, config.eval_episodes,
                                          config.seed, config.device)
    result = evaluate_policy(act, config.env_id, config.eval_episodes, config.seed, config.env_options(),
                             physics=physics, wrappers=config.wrappers)
    return {**result, **summary}
