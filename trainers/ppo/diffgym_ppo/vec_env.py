"""One SB3 ``VecEnv`` adapter over a native batched DiffGym (Gymnasium) vector env.

SB3 ships no adapter for Gymnasium vector envs. Its ``VecEnv`` contract is Gymnasium's ``SAME_STEP``
autoreset: when env ``i`` ends, ``step_wait`` already returns the first observation of its next
episode, ``dones[i]`` is true, and ``infos[i]`` carries the final observation as
``"terminal_observation"``, ``"TimeLimit.truncated"`` (truncated and not terminated, so PPO bootstraps
the value of the final observation) and ``"is_success"``. The native env does the batched reset in
the same kernel launch sequence; this class only reshapes its outputs into SB3's per-env infos.
"""

from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvStepReturn

from diffgym.core.env import DiffGymVectorEnv

_FINAL_KEYS = ("final_obs", "_final_obs", "final_info", "_final_info")


class SB3VecEnvAdapter(VecEnv):
    """SB3 view of a Gymnasium vector env built with ``autoreset_mode=SAME_STEP``."""

    def __init__(self, venv: gym.vector.VectorEnv):
        mode = venv.metadata.get("autoreset_mode")
        if mode != AutoresetMode.SAME_STEP:
            raise ValueError(f"the vector env must use autoreset_mode=SAME_STEP (SB3's convention), got {mode}")
        self.venv = venv
        self._actions: np.ndarray | None = None
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)

    @classmethod
    def make(cls, env_id: str, num_envs: int, **env_kwargs: Any) -> SB3VecEnvAdapter:
        """``gym.make_vec(env_id, num_envs, vectorization_mode="vector_entry_point", autoreset_mode=SAME_STEP)``."""
        venv = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point",
                            autoreset_mode=AutoresetMode.SAME_STEP, **env_kwargs)
        return cls(venv)

    # --------------------------------------------------------------------------------- stepping
    def reset(self) -> np.ndarray:
        """Reset every env; seeds set by ``seed()`` apply to this reset only (SB3 semantics)."""
        seeds = None if all(s is None for s in self._seeds) else list(self._seeds)
        obs, _ = self.venv.reset(seed=seeds)
        self.reset_infos = [{} for _ in range(self.num_envs)]
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape((self.num_envs, *self.action_space.shape))

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("step_async() must be called before step_wait()")
        obs, rewards, terminated, truncated, info = self.venv.step(self._actions)
        self._actions = None
        dones = terminated | truncated
        infos = _per_env_infos(info, self.num_envs)
        if dones.any():
            final_info = _per_env_infos(info["final_info"], self.num_envs)
            for i in np.flatnonzero(dones):
                infos[i] = {**final_info[i],
                            "terminal_observation": info["final_obs"][i],
                            "TimeLimit.truncated": bool(truncated[i] and not terminated[i])}
        for entry in infos:
            entry["is_success"] = bool(entry.get("is_success", False))
        return obs, rewards.astype(np.float32, copy=False), dones, infos

    def close(self) -> None:
        self.venv.close()

    # ------------------------------------------------------------------------- checkpoint / resume
    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the envs' future: the simulator state (step counters included) and,
        per env, the seed and episode index its next automatic reset draws its start state from
        (:meth:`DiffGymVectorEnv.state_dict`): without them a resumed run would start other episodes than
        an uninterrupted one."""
        return self._native().state_dict()

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Put the envs back where :meth:`state_dict` found them; seeds passed to ``seed()`` are dropped
        (they would restart the episodes on the next reset)."""
        self._native().load_state_dict(saved)
        self._reset_seeds()
        self._reset_options()

    def _native(self) -> DiffGymVectorEnv:
        venv = self.venv.unwrapped
        if not isinstance(venv, DiffGymVectorEnv):
            raise TypeError("saving and restoring the envs needs DiffGym's native vector env, got "
                            f"{type(venv).__name__}")
        return venv

    # ------------------------------------------------------------- attributes (shared by all envs)
    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """The batched env has one Python object for all envs: every index sees the same attribute."""
        value = getattr(self.venv, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        self._require_all(indices, "set_attr")
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        """Calls the method once on the batched env (all envs at once) and returns its result per env."""
        self._require_all(indices, "env_method")
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        return [result for _ in range(self.num_envs)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        frames = self.venv.render()
        return list(frames) if frames is not None else [None] * self.num_envs

    def _require_all(self, indices: VecEnvIndices, what: str) -> None:
        if sorted(self._get_indices(indices)) != list(range(self.num_envs)):
            raise ValueError(f"{what} acts on the whole batched env; a subset of envs ({indices}) is not supported")


def _per_env_infos(info: dict[str, Any], num_envs: int) -> list[dict[str, Any]]:
    """Gymnasium's dict of batched arrays (with ``_key`` masks) -> SB3's list of per-env dicts."""
    infos: list[dict[str, Any]] = [{} for _ in range(num_envs)]
    for key, values in info.items():
        if key.startswith("_") or key in _FINAL_KEYS:
            continue
        mask = info.get(f"_{key}", np.ones(num_envs, dtype=bool))
        for i in np.flatnonzero(mask):
            value = values[i]
            infos[i][key] = value.item() if isinstance(value, np.generic) else value
    return infos
