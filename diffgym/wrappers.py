"""Partial observability wrappers of the native vector env that keep its tensor API.

Each wraps a :class:`~diffgym.core.env.DiffGymVectorEnv` (or another of these wrappers) and offers what the
trainers use: the Gymnasium vector API (``reset``, ``step``, NEXT_STEP or SAME_STEP autoreset as the
wrapped env), ``get_state`` / ``set_state``, ``differentiable_step``, ``restart``, ``to_gym_observation``,
``get_physics`` / ``set_physics``, ``state_dict`` / ``load_state_dict`` and ``sim``, so
:class:`~diffgym.training.rollout.EnvBatch` and the PPO adapter take a wrapped env as they take the native
one.

* :class:`ObservationNoise`: Gaussian noise on every observation; in ``differentiable_step``
  reparameterized (``obs + std * eps``, ``eps`` from the wrapper's seeded generator), so gradients flow
  through it unchanged.
* :class:`ActionDelay`: an action takes effect ``steps`` steps after it is given. The actions still
  pending are part of the state (a ``pending_actions`` field of the wrapper's state type), so
  ``differentiable_step`` stays pure and differentiable across the delay.

Both support Box observations only (a Dict-observation task is refused when wrapped).

A run's config applies them to every env it makes, training and evaluation alike: ``TrainConfig.wrappers``,
e.g. ``{"action_delay": 2, "observation_noise": 0.05}`` (``--set wrappers.action_delay=2``), through
:func:`wrap_vector_env`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode

from diffgym.core.sim import StepOutput
from diffgym.core.state import SimState


WRAPPER_OPTIONS = {
    "action_delay": "K, a whole number >= 1: actions take effect K steps later (ActionDelay)",
    "observation_noise": "STD, a number >= 0: Gaussian noise of that std on every observation (ObservationNoise)",
}
"""What ``TrainConfig.wrappers`` may set, in the order :func:`wrap_vector_env` applies them (innermost
first: the delay acts on the env, the noise on what the policy sees)."""


def _noise_std(std: Any) -> float:
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0.0 <= float(std) < float("inf"):
        raise ValueError(f"ObservationNoise std must be a finite number >= 0, got {std!r}")
    return float(std)


def _delay_steps(steps: Any) -> int:
    whole = isinstance(steps, (int, np.integer)) or (isinstance(steps, float) and steps.is_integer())
    if isinstance(steps, bool) or not whole or steps < 1:
        raise ValueError(f"ActionDelay steps must be a whole number >= 1, got {steps!r}")
    return int(steps)


_CHECKS = {"action_delay": _delay_steps, "observation_noise": _noise_std}


def check_wrapper_options(options: Any, key: str = "wrappers") -> dict[str, Any]:
    """``options`` (config field ``key``) with each value checked and converted, or a one-line
    ``ValueError`` naming what was expected."""
    if not isinstance(options, Mapping):
        raise ValueError(f"{key} must be a mapping of wrapper -> value, got {options!r}")
    unknown = sorted(set(options) - set(WRAPPER_OPTIONS))
    if unknown:
        raise ValueError(f"unknown {key} {unknown}; expected "
                         + "; ".join(f"{name}: {text}" for name, text in WRAPPER_OPTIONS.items()))
    checked = {}
    for name in WRAPPER_OPTIONS:
        if name in options:
            try:
                checked[name] = _CHECKS[name](options[name])
            except ValueError as error:
                raise ValueError(f"{key}.{name}: {error}") from None
    return checked


def wrap_vector_env(venv: gym.vector.VectorEnv, options: Mapping[str, Any] | None) -> gym.vector.VectorEnv:
    """``venv`` inside the wrappers ``options`` names (``TrainConfig.wrappers``; see
    :data:`WRAPPER_OPTIONS`); ``venv`` itself when there are none."""
    checked = check_wrapper_options(options or {})
    if "action_delay" in checked:
        venv = ActionDelay(venv, steps=checked["action_delay"])
    if "observation_noise" in checked:
        venv = ObservationNoise(venv, std=checked["observation_noise"])
    return venv


class TensorVectorWrapper(gym.vector.VectorWrapper):
    """A Gymnasium vector wrapper that passes DiffGym's tensor API through to the env it wraps; the
    wrappers below override what they change."""

    def __init__(self, env: gym.vector.VectorEnv):
        for method in ("get_state", "differentiable_step", "restart"):
            if not hasattr(env, method):
                raise TypeError(f"{type(self).__name__} wraps DiffGym's native vector env (gym.make_vec(..., "
                                f"vectorization_mode='vector_entry_point')) or another of its wrappers; "
                                f"{type(env).__name__} has no {method}()")
        if not isinstance(env.single_observation_space, spaces.Box):
            raise TypeError(f"{type(self).__name__} supports Box observations, got a "
                            f"{type(env.single_observation_space).__name__} observation space")
        super().__init__(env)

    @property
    def sim(self) -> Any:
        """The task's simulator (its ``physical_params``, ``outside_domain``, ...)."""
        return self.env.sim

    def get_state(self) -> SimState:
        return self.env.get_state()

    def set_state(self, state: SimState) -> None:
        self.env.set_state(state)

    def differentiable_step(self, state: SimState, action: torch.Tensor,
                            physics: Mapping[str, torch.Tensor] | None = None) -> StepOutput:
        return self.env.differentiable_step(state, action, physics)

    def restart(self, state: SimState, mask: torch.Tensor, seeds: torch.Tensor | None = None
                ) -> tuple[SimState, torch.Tensor]:
        return self.env.restart(state, mask, seeds)

    def to_gym_observation(self, obs: torch.Tensor, state: SimState) -> np.ndarray:
        return self.env.to_gym_observation(obs, state)

    def get_physics(self) -> dict[str, torch.Tensor]:
        return self.env.get_physics()

    def set_physics(self, physics: Mapping[str, Any], mask: torch.Tensor | None = None) -> None:
        self.env.set_physics(physics, mask)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped env's ``state_dict`` and every wrapper's own state (:meth:`wrapper_state`)."""
        return {**self.env.state_dict(), **self._own_state()}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        self._check_own_state(saved)
        self.env.load_state_dict(saved)
        self._load_own_state(saved)

    def wrapper_state(self) -> dict[str, Any]:
        """The wrappers' own state without the native env's, for a trainer that keeps the env state itself
        (``EnvBatch``): e.g. the noise generator."""
        inner = self.env.wrapper_state() if isinstance(self.env, TensorVectorWrapper) else {}
        return {**inner, **self._own_state()}

    def check_wrapper_state(self, saved: Mapping[str, Any]) -> None:
        """A one-line ``ValueError`` unless :meth:`load_wrapper_state` can load ``saved``; changes nothing,
        so a caller loading more than the wrappers checks everything before it loads anything."""
        self._check_own_state(saved)
        if isinstance(self.env, TensorVectorWrapper):
            self.env.check_wrapper_state(saved)

    def load_wrapper_state(self, saved: Mapping[str, Any]) -> None:
        self.check_wrapper_state(saved)
        if isinstance(self.env, TensorVectorWrapper):
            self.env.load_wrapper_state(saved)
        self._load_own_state(saved)

    def _own_state(self) -> dict[str, Any]:
        return {}

    def _check_own_state(self, saved: Mapping[str, Any]) -> None:
        pass

    def _load_own_state(self, saved: Mapping[str, Any]) -> None:
        pass


class ObservationNoise(TensorVectorWrapper):
    """Adds ``std * eps``, ``eps ~ N(0, 1)`` drawn independently per env and observation dimension, to
    every observation: those of ``reset`` and ``step`` (and ``info["final_obs"]`` under SAME_STEP), of
    ``restart`` and of ``differentiable_step``, whose noisy ``obs`` is differentiable exactly as the
    clean one (the noise is an additive constant). The draws come from one torch generator on the sim's
    device, seeded by ``seed`` and reseeded by ``reset(seed=...)`` (with an int seed, or the first env's
    of a list); :meth:`seed_noise` reseeds it, e.g. to replay the same ``eps``. The state is the wrapped
    env's: the noise is not part of it."""

    def __init__(self, env: gym.vector.VectorEnv, std: float, seed: int = 0):
        super().__init__(env)
        self.std = _noise_std(std)
        self.noise = torch.Generator(device=self.sim.device)
        self.seed_noise(seed)

    def seed_noise(self, seed: int) -> None:
        """Restart the noise generator from ``seed``."""
        self.noise.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)

    def _noisy(self, obs: torch.Tensor) -> torch.Tensor:
        eps = torch.randn(obs.shape, generator=self.noise, device=obs.device, dtype=obs.dtype)
        return obs + self.std * eps

    def _noisy_numpy(self, obs: np.ndarray) -> np.ndarray:
        return self._noisy(torch.as_tensor(obs, device=self.sim.device)).cpu().numpy()

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        first = seed[0] if isinstance(seed, list) and seed else seed
        if first is not None:
            self.seed_noise(first)
        obs, info = self.env.reset(seed=seed, options=options)
        return self._noisy_numpy(obs), info

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        if "final_obs" in info:  # SAME_STEP: the ended episodes' last observations, one row per env
            final = info["final_obs"].copy()
            for i in np.flatnonzero(info["_final_obs"]):
                final[i] = self._noisy_numpy(np.asarray(final[i])[None])[0]
            info = {**info, "final_obs": final}
        return self._noisy_numpy(obs), reward, terminated, truncated, info

    def differentiable_step(self, state: SimState, action: torch.Tensor,
                            physics: Mapping[str, torch.Tensor] | None = None) -> StepOutput:
        out = self.env.differentiable_step(state, action, physics)
        return dataclasses.replace(out, obs=self._noisy(out.obs))

    def restart(self, state: SimState, mask: torch.Tensor, seeds: torch.Tensor | None = None
                ) -> tuple[SimState, torch.Tensor]:
        state, obs = self.env.restart(state, mask, seeds)
        return state, self._noisy(obs)

    def _own_state(self) -> dict[str, Any]:
        """The noise generator's state: a resumed run draws the same noise."""
        return {"observation_noise": self.noise.get_state()}

    def _check_own_state(self, saved: Mapping[str, Any]) -> None:
        if not isinstance(saved.get("observation_noise"), torch.Tensor):
            raise ValueError("the saved env state lacks 'observation_noise'; expected what "
                             "ObservationNoise.state_dict() returns")

    def _load_own_state(self, saved: Mapping[str, Any]) -> None:
        self.noise.set_state(saved["observation_noise"])


@functools.lru_cache(maxsize=None)
def delayed_state_type(state_type: type[SimState]) -> type[SimState]:
    """``state_type`` with one more field, ``pending_actions``: ``(B, steps, act_dim)`` float32, the
    actions given but not yet applied, oldest first. A subclass, so the task's simulator reads its own
    fields off it (``outside_domain``, Dict observations)."""
    delayed = dataclasses.make_dataclass(f"Delayed{state_type.__name__}", [("pending_actions", torch.Tensor)],
                                         bases=(state_type,), frozen=True, eq=False)
    delayed.__doc__ = f"{state_type.__name__} and the actions an ActionDelay wrapper holds back."
    delayed.__module__ = __name__
    return delayed


def inner_state(state: SimState) -> SimState:
    """The wrapped env's state inside a delayed one (its fields without ``pending_actions``)."""
    base = type(state).__mro__[1]
    return base(*state.tensors()[:-1])


class ActionDelay(TensorVectorWrapper):
    """Actions take effect ``steps`` steps after they are given: step ``t`` applies the action of step
    ``t - steps``; the first ``steps`` steps of every episode apply zero actions (the queue starts empty).

    The queue is the state's last field, ``pending_actions`` (``(B, steps, act_dim)``, oldest first; the
    state type is :func:`delayed_state_type` of the task's), so ``differentiable_step(state, action)`` is
    pure: it applies ``state.pending_actions[:, 0]`` and returns a state whose queue ends with ``action``.
    Gradients flow from an action through the queue into the state ``steps`` steps later, and no earlier.
    ``restart`` and every reset or autoreset empty the queue of the envs they restart; under NEXT_STEP
    autoreset, the action given at the step that resets an env is dropped, as the wrapped env drops it.
    """

    def __init__(self, env: gym.vector.VectorEnv, steps: int):
        super().__init__(env)
        self.steps = _delay_steps(steps)
        self.act_dim = int(np.prod(env.single_action_space.shape))
        self._pending: torch.Tensor | None = None
        self._autoreset = torch.zeros(self.num_envs, dtype=torch.bool, device=self.sim.device)

    # ------------------------------------------------------------------------------ tensor API
    def _empty_queue(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.steps, self.act_dim, dtype=torch.float32, device=self.sim.device)

    def _delayed(self, state: SimState, pending: torch.Tensor) -> SimState:
        return delayed_state_type(type(state))(*state.tensors(), pending)

    def _split(self, state: SimState) -> tuple[SimState, torch.Tensor]:
        expected = (state.batch_size if isinstance(state, SimState) else None, self.steps, self.act_dim)
        pending = getattr(state, "pending_actions", None)
        if not isinstance(pending, torch.Tensor) or pending.shape != expected:
            raise ValueError(f"state must be an ActionDelay state (get_state(), differentiable_step's out.state) "
                             f"whose pending_actions has shape {expected}, got {type(state).__name__}")
        return inner_state(state), pending

    def get_state(self) -> SimState:
        if self._pending is None:
            raise RuntimeError("call reset() before get_state()")
        return self._delayed(self.env.get_state(), self._pending.clone())

    def set_state(self, state: SimState) -> None:
        inner, pending = self._split(state)
        self.env.set_state(inner)
        self._pending = pending.detach().clone()
        self._autoreset.zero_()

    def differentiable_step(self, state: SimState, action: torch.Tensor,
                            physics: Mapping[str, torch.Tensor] | None = None) -> StepOutput:
        inner, pending = self._split(state)
        # checked now, as step() does, not when the env applies it steps later: an error points at this step
        self.sim.check_action(action, inner.batch_size)
        out = self.env.differentiable_step(inner, pending[:, 0], physics)
        queue = torch.cat([pending[:, 1:], action[:, None]], dim=1)
        return dataclasses.replace(out, state=self._delayed(out.state, queue))

    def restart(self, state: SimState, mask: torch.Tensor, seeds: torch.Tensor | None = None
                ) -> tuple[SimState, torch.Tensor]:
        inner, pending = self._split(state)
        inner, obs = self.env.restart(inner, mask, seeds)
        emptied = torch.where(mask[:, None, None], torch.zeros_like(pending), pending)
        return self._delayed(inner, emptied), obs

    def to_gym_observation(self, obs: torch.Tensor, state: SimState) -> np.ndarray:
        return self.env.to_gym_observation(obs, inner_state(state) if hasattr(state, "pending_actions") else state)

    # ------------------------------------------------------------------------------ Gymnasium API
    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        mask = (options or {}).get("reset_mask")
        if self._pending is None or mask is None:
            self._pending = self._empty_queue(self.num_envs)
            self._autoreset.zero_()
        else:
            restarted = torch.as_tensor(mask, device=self.sim.device)
            self._pending[restarted] = 0.0
            self._autoreset &= ~restarted
        return obs, info

    def step(self, actions):
        if self._pending is None:
            raise RuntimeError("call reset() before step()")
        array = np.asarray(actions)
        # checked now, not when the env applies it steps later, so an error points at the step that gave it
        if array.shape != self.action_space.shape or array.dtype.kind not in "fiu" or not np.isfinite(array).all():
            raise ValueError(f"actions must be finite real numbers of shape {self.action_space.shape}, got "
                             f"{array.dtype} of shape {array.shape}")
        given = torch.as_tensor(array, dtype=torch.float32, device=self.sim.device).reshape(self.num_envs, self.act_dim)
        applied = self._pending[:, 0].cpu().numpy().reshape(self.action_space.shape)
        obs, reward, terminated, truncated, info = self.env.step(applied)
        self._pending = torch.cat([self._pending[:, 1:], given[:, None]], dim=1)
        ended = torch.as_tensor(terminated | truncated, device=self.sim.device)
        if self.metadata.get("autoreset_mode") == AutoresetMode.SAME_STEP:
            self._pending[ended] = 0.0  # those envs already started a new episode
        else:  # NEXT_STEP: this step reset the envs that ended the step before, and dropped their action
            self._pending[self._autoreset] = 0.0
            self._autoreset = ended
        return obs, reward, terminated, truncated, info

    def _own_state(self) -> dict[str, Any]:
        """The Gymnasium API's queue and which envs restart at its next step (NEXT_STEP)."""
        if self._pending is None:
            raise RuntimeError("call reset() before saving the env state")
        return {"pending_actions": self._pending.clone(), "delay_autoreset": self._autoreset.clone()}

    def _check_own_state(self, saved: Mapping[str, Any]) -> None:
        expected = (self.num_envs, self.steps, self.act_dim)
        pending, autoreset = saved.get("pending_actions"), saved.get("delay_autoreset")
        pending_ok = isinstance(pending, torch.Tensor) and pending.shape == expected
        if not (pending_ok and isinstance(autoreset, torch.Tensor)):
            raise ValueError(f"the saved env state lacks ActionDelay's pending_actions of shape {expected} or "
                             "delay_autoreset; expected what ActionDelay.state_dict() returns")

    def _load_own_state(self, saved: Mapping[str, Any]) -> None:
        self._pending = saved["pending_actions"].to(self.sim.device).clone()
        self._autoreset = saved["delay_autoreset"].to(self.sim.device).clone()
