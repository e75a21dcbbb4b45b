"""One SB3 ``VecEnv`` adapter over a native batched DiffGym (Gymnasium) vector env.

SB3 ships no adapter for Gymnasium vector envs. Its ``VecEnv`` contract is Gymnasium's ``SAME_STEP``
autoreset: when env ``i`` ends, ``step_wait`` already returns the first observation of its next
episode, ``dones[i]`` is true, and ``infos[i]`` carries the final observation as
``"terminal_observation"``, ``"TimeLimit.truncated"`` (truncated and not terminated, so PPO bootstraps
the value of the final observation) and ``"is_success"``. The native env does the batched reset in
the same kernel launch sequence; this class only reshapes its outputs into SB3's per-env infos.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvStepReturn

from diffgym.core.env import DiffGymVectorEnv
from diffgym.training.randomization import PhysicsRandomizer
from diffgym.wrappers import wrap_vector_env

_FINAL_KEYS = ("final_obs", "_final_obs", "final_info", "_final_info")


class SB3VecEnvAdapter(VecEnv):
    """SB3 view of a Gymnasium vector env built with ``autoreset_mode=SAME_STEP``.

    With ``randomize`` (the config's ranges, ``{name: [low, high]}``) every env draws its physical
    parameters at each episode start from the shared :class:`PhysicsRandomizer` (seeded from
    ``randomize_seed``): at :meth:`reset`, and after every step that ended an episode, whose next step is
    the new episode's first (SAME_STEP autoreset), it sets the native env's physics of those envs."""

    def __init__(self, venv: gym.vector.VectorEnv, randomize: Mapping[str, Sequence[float]] | None = None,
                 randomize_seed: int = 0):
        mode = venv.metadata.get("autoreset_mode")
        if mode != AutoresetMode.SAME_STEP:
            raise ValueError(f"the vector env must use autoreset_mode=SAME_STEP (SB3's convention), got {mode}")
        self.venv = venv
        self._actions: np.ndarray | None = None
        self.randomizer: PhysicsRandomizer | None = None
        if randomize:
            sim = getattr(venv.unwrapped, "sim", None)
            self.randomizer = PhysicsRandomizer(randomize, sim, venv.num_envs, randomize_seed,
                                                getattr(sim, "device", "cpu"), task=type(sim).__name__)
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)

    @classmethod
    def make(cls, env_id: str, num_envs: int, randomize: Mapping[str, Sequence[float]] | None = None,
             randomize_seed: int = 0, wrappers: Mapping[str, Any] | None = None, **env_kwargs: Any) -> SB3VecEnvAdapter:
        """``gym.make_vec(env_id, num_envs, vectorization_mode="vector_entry_point", autoreset_mode=SAME_STEP)``
        inside ``wrappers`` (``TrainConfig.wrappers``, :func:`diffgym.wrappers.wrap_vector_env`)."""
        venv = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point",
                            autoreset_mode=AutoresetMode.SAME_STEP, **env_kwargs)
        return cls(wrap_vector_env(venv, wrappers), randomize, randomize_seed)

    # --------------------------------------------------------------------------------- stepping
    def reset(self) -> np.ndarray:
        """Reset every env; seeds set by ``seed()`` apply to this reset only (SB3 semantics)."""
        seeds = None if all(s is None for s in self._seeds) else list(self._seeds)
        options = None if self.randomizer is None else {"physics": self.randomizer.draw()}
        obs, _ = self.venv.reset(seed=seeds, options=options)
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
        if self.randomizer is not None and dones.any():  # the restarted envs' new episodes
            self._native().set_physics(self.randomizer.draw(dones))
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

    def physics_summary(self) -> dict[str, float]:
        """Mean, min and max of each randomized parameter over the envs' current episodes
        (``physics/<name>_mean`` ...), as APG's ``EnvBatch`` logs them; empty without randomization."""
        return PhysicsRandomizer.summary_of(self.randomizer)

    # ------------------------------------------------------------------------- checkpoint / resume
    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the envs' future: the simulator state (step counters included) and,
        per env, the seed and episode index its next automatic reset draws its start state from
        (:meth:`DiffGymVectorEnv.state_dict`): without them a resumed run would start other episodes than
        an uninterrupted one; with randomization, its draws (``physics``: generator and current values)."""
        saved = self._stateful().state_dict()
        if self.randomizer is not None:
            saved["physics"] = self.randomizer.state_dict()
        return saved

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Put the envs back where :meth:`state_dict` found them; seeds passed to ``seed()`` are dropped
        (they would restart the episodes on the next reset). Everything is checked before anything
        changes: the randomization here, the envs' state by the env's own ``load_state_dict``, which checks
        before it loads and runs first, so a bad checkpoint leaves the envs as they were."""
        physics = self.randomizer.check_saved_envs(saved) if self.randomizer is not None else None
        self._stateful().load_state_dict(saved)
        if self.randomizer is not None:
            self.randomizer.load_state_dict(physics)  # checked above: loads
            self._native().set_physics(self.randomizer.values)
        self._reset_seeds()
        self._reset_options()

    def _stateful(self) -> Any:
        """The env whose ``state_dict`` holds everything: a ``diffgym.wrappers`` wrapper (its own state and
        the native env's) or the native env itself."""
        return self.venv if hasattr(self.venv, "state_dict") else self._native()

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
