"""Gymnasium faces of a :class:`DiffSim`: a single env and a native vector env (one launch per step
for all N envs). Both expose the tensor API ``get_state`` / ``set_state`` / ``differentiable_step``."""

from __future__ import annotations

import contextlib
import dataclasses
import operator
from typing import Any, ClassVar, Mapping

import gymnasium as gym
import numpy as np
import torch
import warp as wp
from gymnasium import spaces
from gymnasium.envs.registration import EnvSpec
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from diffgym.core.bridge import Replay, debug_outputs_enabled, record_launch
from diffgym.core.multistep import RolloutOutput
from diffgym.core.sim import DiffSim, StepOutput
from diffgym.core.state import SimState
from diffgym.core.tensor_checks import describe_value

_SEED_MASK = 0x7FFFFFFF  # Warp's RNG takes non-negative int32 seeds


def _as_signed64(value: int) -> int:
    """``value`` mod 2**64 as the int64 with the same bits (how a torch int64 tensor holds it)."""
    value &= 0xFFFFFFFFFFFFFFFF
    return value - (1 << 64) if value >> 63 else value


_SPLITMIX_GAMMA, _SPLITMIX_MUL1, _SPLITMIX_MUL2 = (
    _as_signed64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    """One splitmix64 output for state ``z`` (int64, read as its unsigned bits). torch's int64 add and
    multiply wrap mod 2**64 like uint64, but ``>>`` copies the sign bit, so each shift is masked to a
    logical one."""
    z = z + _SPLITMIX_GAMMA
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _SPLITMIX_MUL1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _SPLITMIX_MUL2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def warp_seeds(seeds: torch.Tensor | list[int]) -> torch.Tensor:
    """Map seeds onto Warp's RNG seed range [0, 2**31) as an int32 tensor: a seed in that range is itself
    (every recorded stream depends on it); any other is hashed by splitmix64 into it, so seeds that differ
    only above bit 31 (``2**31 + 5``, ``2**32 + 5``, ``5``) get different streams, colliding only by
    chance. A tensor's int64 values are read as unsigned 64-bit (``-1`` hashes like ``2**64 - 1``);
    Python ints must be non-negative, and one of more than 64 bits is folded 64 bits at a time."""
    if not isinstance(seeds, torch.Tensor):
        seeds = torch.tensor([_fold_to_int64(seed) for seed in seeds], dtype=torch.int64)
    seeds = seeds.to(torch.int64)
    in_range = (seeds >= 0) & (seeds <= _SEED_MASK)
    return torch.where(in_range, seeds, _splitmix64(seeds) & _SEED_MASK).to(torch.int32)


def _fold_to_int64(seed: int) -> int:
    """A non-negative Python int as the int64 :func:`warp_seeds` reads: its bits if below 2**64, else the
    splitmix64 chain over its 64-bit words (most significant first), so every bit of it counts."""
    seed = operator.index(seed)
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed}")
    words = []
    while True:
        words.append(_as_signed64(seed))
        seed >>= 64
        if not seed:
            break
    folded = torch.tensor(words.pop(), dtype=torch.int64)
    while words:
        folded = _splitmix64(folded) ^ words.pop()
    return int(folded)


class _TensorAPI:
    """``get_state`` / ``set_state`` / ``differentiable_step``, shared by the single and vector env."""

    sim: DiffSim
    _state: SimState | None
    _batch: int
    _face: type[DiffGymEnv]
    _physics: tuple[torch.Tensor, ...]
    """The per-env physical parameters ``env.step`` uses, one ``(batch,)`` tensor per name in
    ``sim.physical_params``; set by ``reset(options={"physics": ...})`` and updated in place (the fast
    path's recorded launches read these very tensors). Never handed out: ``get_physics`` copies."""

    def get_state(self) -> SimState:
        """A copy of the env's current state (batch 1 for the single env, N for the vector env)."""
        if self._state is None:
            raise RuntimeError("call reset() before get_state()")
        return self._state.clone()

    def set_state(self, state: SimState) -> None:
        """Make ``state`` (detached and copied) the env's current state; the next ``step`` starts from it."""
        self.sim.check_state(state)
        if state.batch_size != self._batch:
            raise ValueError(f"state must have batch size {self._batch}, got {state.batch_size}")
        self._state = state.detach().clone()
        self._after_set_state()

    def differentiable_step(self, state: SimState, action: torch.Tensor,
                            physics: Mapping[str, torch.Tensor] | None = None) -> StepOutput:
        """Pure batched step with exact gradients; the env's own state is untouched.

        ``state`` is any batch of the task's :class:`SimState` (e.g. from ``get_state``), ``action`` a
        float32 tensor ``(B, act_dim)`` on the env's device, clipped to [-1, 1] (zero gradient outside).
        ``physics`` maps names in ``sim.physical_params`` to ``(B,)`` float32 tensors (gradients flow into
        them); a name left out, or ``None``, means the task's constructor value, not the values set by
        ``reset`` options (pass ``physics=env.get_physics()`` for those).
        """
        return self.sim.step(state, action, physics)

    def differentiable_rollout(self, state: SimState, actions: torch.Tensor,
                               physics: Mapping[str, torch.Tensor] | None = None) -> RolloutOutput:
        """``differentiable_step`` over an action sequence ``(T, B, act_dim)`` in one fused call (same
        numbers and gradients, no resets, outputs ``(T, B, ...)``; :meth:`DiffSim.rollout`). For open-loop
        optimisation and replaying recorded actions; the env's own state is untouched."""
        return self.sim.rollout(state, actions, physics)

    def get_physics(self) -> dict[str, torch.Tensor]:
        """A copy of the per-env physical parameters ``step`` uses: name -> ``(batch,)`` tensor."""
        return {name: t.clone() for name, t in zip(self.sim.physical_params, self._physics)}

    def set_physics(self, physics: Mapping[str, Any], mask: torch.Tensor | np.ndarray | list | None = None) -> None:
        """Set the per-env physical parameters later ``step`` calls use, without a reset (e.g. a new
        episode's values right after an autoreset): ``reset``'s ``options["physics"]`` (name -> a number or
        ``(batch,)`` values), changed only where ``mask`` (``(batch,)`` bool: a NumPy array, list or
        tensor, like ``reset``'s ``options["reset_mask"]``) is true."""
        if mask is not None:
            mask = _bool_mask(mask, self._batch, self.sim.device, "set_physics's mask")
        self._apply_physics_option({"physics": physics}, mask, given_as="set_physics's physics")

    def _init_physics(self) -> None:
        self._physics = tuple(self.sim.default_physics(self._batch).values())

    def _apply_physics_option(self, options: dict | None, mask: torch.Tensor | None = None,
                              given_as: str = "options['physics']") -> None:
        """Set the per-env physics from ``options["physics"]`` (name -> a number, or ``(batch,)`` values),
        only where ``mask`` (a checked bool tensor) is true. Everything is validated before anything
        changes; errors name the physics as the caller passed it (``given_as``)."""
        given = (options or {}).get("physics")
        if given is None:
            return
        if not isinstance(given, Mapping):
            raise TypeError(f"{given_as} must be a mapping of names in {self.sim.physical_params} to "
                            f"values, got {type(given).__name__}")
        shape = (self._batch,)
        values: dict[str, torch.Tensor] = {}
        for name, value in given.items():
            if name not in self.sim.physical_params:
                raise ValueError(f"{given_as} names '{name}', which is not a physical parameter of "
                                 f"{type(self.sim).__name__}; expected names in {self.sim.physical_params}")
            array = value.detach() if isinstance(value, torch.Tensor) else np.asarray(value)
            # strings, None and other objects become non-numeric arrays, which torch refuses without a name
            if isinstance(array, np.ndarray) and array.dtype.kind not in "biuf":
                raise TypeError(f"{given_as}['{name}'] must be a number or {shape} numbers, got {value!r}")
            tensor = torch.as_tensor(array, dtype=torch.float32, device=self.sim.device)
            if tensor.shape not in ((), shape):
                raise ValueError(f"{given_as}['{name}'] must be a number or have shape {shape}, "
                                 f"got shape {tuple(tensor.shape)}")
            values[name] = tensor.expand(shape)
        current = dict(zip(self.sim.physical_params, self._physics))
        merged = {name: values.get(name, current[name]) for name in self.sim.physical_params}
        if mask is not None:
            merged = {name: torch.where(mask, merged[name], current[name]) for name in merged}
        self.sim.check_physics(merged, self._batch)
        for buffer, name in zip(self._physics, self.sim.physical_params):
            buffer.copy_(merged[name])

    def to_gym_observation(self, obs: torch.Tensor, state: SimState) -> np.ndarray | dict[str, np.ndarray]:
        """The batched Gymnasium observation (``(B, ...)`` arrays, a dict of them for a Dict space) of a
        flat observation tensor, e.g. ``differentiable_step``'s ``out.obs`` with ``out.state``."""
        return self._face.observations(self.sim, obs, state)

    def _after_set_state(self) -> None:
        pass

    def _numpy_action(self, action: Any, shape: tuple[int, ...]) -> torch.Tensor:
        """Validate a NumPy/array-like action for ``step`` and move it to the sim's device."""
        array = _checked_array(action, shape)
        return torch.as_tensor(array, dtype=torch.float32, device=self.sim.device).reshape(-1, self.sim.act_dim)


def _checked_array(action: Any, shape: tuple[int, ...]) -> np.ndarray:
    """``action`` as a NumPy array, after checking its dtype, shape and finiteness (``ValueError``)."""
    array = np.asarray(action)
    if array.dtype.kind not in "fiu":
        raise ValueError(f"action must be a real-valued array of shape {shape}, got dtype {array.dtype}")
    if array.shape != shape:
        raise ValueError(f"action must have shape {shape}, got {array.shape}")
    finite = np.isfinite(array)
    if not finite.all():
        bad = [tuple(int(j) for j in i) for i in np.argwhere(~finite)[:8]]
        raise ValueError(f"action contains NaN or Inf at index {bad}; actions must be finite")
    return array


def check_device(device: str | torch.device) -> None:
    """A one-line ``ValueError`` for a CUDA device that this torch cannot use (no GPU, or a CPU-only
    build, where torch itself fails later with a bare ``AssertionError``)."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):  # torch's message lists every device type it knows, over several lines
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested, but torch {torch.__version__} sees no CUDA GPU; "
                         "use device 'cpu'")


def _bool_mask(mask: Any, size: int, device: torch.device | str, what: str) -> torch.Tensor:
    """A ``(size,)`` bool mask given as a NumPy array, a list or a tensor, as a bool tensor on ``device``;
    anything else (another shape, a non-bool dtype, which would silently index or broadcast) is a
    one-line ``ValueError`` naming ``what``."""
    array = None
    if isinstance(mask, torch.Tensor):
        array = mask.detach()
    elif isinstance(mask, (np.ndarray, list, tuple)):
        with contextlib.suppress(ValueError):  # a ragged list: refused below as not a (size,) array
            array = np.asarray(mask)
    is_bool = array is not None and (array.dtype == torch.bool if isinstance(array, torch.Tensor)
                                     else array.dtype == np.bool_)
    if not is_bool or tuple(array.shape) != (size,):
        got = describe_value(mask) if isinstance(mask, torch.Tensor) else (
            f"{type(mask).__name__} of dtype {array.dtype} and shape {tuple(array.shape)}" if array is not None
            else type(mask).__name__)
        raise ValueError(f"{what} must be a bool array, list or tensor of shape ({size},), got {got}")
    return torch.as_tensor(array, device=device)


def _spaces(sim: DiffSim) -> tuple[spaces.Box, spaces.Box]:
    obs = spaces.Box(np.broadcast_to(np.float32(sim.obs_low), (sim.obs_dim,)).astype(np.float32),
                     np.broadcast_to(np.float32(sim.obs_high), (sim.obs_dim,)).astype(np.float32),
                     dtype=np.float32)
    act = spaces.Box(-1.0, 1.0, (sim.act_dim,), dtype=np.float32)
    return obs, act


def _info_numpy(sim: DiffSim, out: StepOutput) -> dict[str, np.ndarray]:
    # copies: on CPU .numpy() shares memory, and editing info (e.g. goal relabelling) must not edit the state
    info = {"is_success": out.success.cpu().numpy().copy()}
    info.update({k: v.detach().cpu().numpy().copy() for k, v in sim.info(out).items()})
    return info


def _row(observations: np.ndarray | dict[str, np.ndarray], index: int) -> np.ndarray | dict[str, np.ndarray]:
    """One env's observation out of a batched one."""
    if isinstance(observations, dict):
        return {key: value[index] for key, value in observations.items()}
    return observations[index]


def _replay(launches: list[wp.Launch]) -> Replay:
    """``launches`` replayed in order as one CPU graph (the fast path runs on the CPU only)."""
    return Replay("cpu", lambda: [launch.launch() for launch in launches])


class _FastPath:
    """Persistent CPU buffers and recorded launches for a single env's ``reset`` and ``step`` (batch 1).

    The env's state lives in two preallocated buffer sets used in turn (a step reads one and writes the
    other); actions are written into a buffer through its NumPy view; the reset and observe kernels, and
    the step and info kernels, replay as one CPU graph each of ``wp.Launch`` objects recorded on these
    buffers once. So a step allocates nothing, records no autograd graph and runs no torch op. The buffers
    never leave the env (``get_state`` copies them), so overwriting them breaks no gradient rule. It
    computes exactly what the reference path does: the same kernels on the same inputs (the clip to
    [-1, 1] is exact in both NumPy and torch).
    """

    def __init__(self, sim: DiffSim, physics: tuple[torch.Tensor, ...], info_kernel: bool):
        """``physics``: the env's ``(1,)`` physical-parameter tensors, read by every recorded step;
        ``info_kernel``: replay the sim's ``info_kernel`` after every step into the ``info`` buffers."""
        sim.check_launches()  # the buffers below are exactly the outputs' size: a write past one corrupts memory
        specs = sim._state_specs(1)
        self.states = [sim.state_type(*(torch.zeros(s.shape, dtype=s.dtype) for s in specs)) for _ in range(2)]
        self.steps = [state.step.numpy() for state in self.states]  # NumPy views of the step counters
        self.action = torch.zeros(1, sim.act_dim)
        self.obs = torch.zeros(1, sim.obs_dim)
        self.reward = torch.zeros(1)
        self.terminated = torch.zeros(1, dtype=torch.int32)
        self.success = torch.zeros(1, dtype=torch.int32)
        self.seed = torch.zeros(1, dtype=torch.int32)
        self.episode = torch.zeros(1, dtype=torch.int32)
        # NumPy views of the same memory (CPU tensors share it), for reading and writing without torch ops
        self.action_np, self.obs_np, self.reward_np = self.action.numpy(), self.obs.numpy(), self.reward.numpy()
        self.terminated_np, self.success_np = self.terminated.numpy(), self.success.numpy()
        params = [sim.params]
        self.reset_launches = [record_launch(sim.reset_kernel, 1, [self.seed, self.episode], params,
                                             state.tensors()) for state in self.states]
        self.observe_launches = [record_launch(sim.observe_kernel, 1, state.tensors(), params, [self.obs])
                                 for state in self.states]
        self.step_launches = [record_launch(sim.step_kernel, 1, [*self.states[k].tensors(), self.action, *physics],
                                            params,
                                            [*self.states[1 - k].tensors(), self.obs, self.reward,
                                             self.terminated, self.success]) for k in (0, 1)]
        # the task's info extras, computed from the buffers a step wrote (so read after step k: set 1 - k)
        self.info = {name: torch.zeros(1, *shape) for name, shape in sim.info_shapes.items()} if info_kernel else {}
        self.info_np = {name: t.numpy() for name, t in self.info.items()}
        self.info_launches = [record_launch(sim.info_kernel, 1, [*state.tensors(), self.obs, self.reward], params,
                                            list(self.info.values())) for state in self.states] if self.info else []
        self.reset_replays = [_replay([self.reset_launches[k], self.observe_launches[k]]) for k in (0, 1)]
        self.step_replays = [_replay([self.step_launches[k], *self.info_launches[1 - k:2 - k]]) for k in (0, 1)]
        self.current = 0  # index of the buffer set holding the env's state

    @property
    def state(self) -> SimState:
        return self.states[self.current]

    def load(self, state: SimState) -> None:
        """Copy ``state`` (batch 1, e.g. from ``set_state`` or the reference path) into the current buffers."""
        for buffer, tensor in zip(self.state.tensors(), state.tensors()):
            buffer.copy_(tensor)

    def reset(self, seed: torch.Tensor, episode: torch.Tensor) -> None:
        """Reset the current buffers from RNG stream ``(seed, episode)`` and observe them into ``obs``."""
        self.seed.copy_(seed)
        self.episode.copy_(episode)
        self.reset_replays[self.current]()

    def step(self, action: np.ndarray) -> None:
        """Clip ``action`` (validated by the caller) into the action buffer and step into the other buffers."""
        np.copyto(self.action_np, action.reshape(self.action_np.shape), casting="unsafe")
        np.clip(self.action_np, -1.0, 1.0, out=self.action_np)
        self.step_replays[self.current]()  # the step, then the info kernel on its outputs
        self.current = 1 - self.current

    def info_values(self) -> dict[str, Any]:
        """The last step's info extras, as the reference path gives them: a number for a per-env scalar,
        otherwise a copy of the array (the buffers are overwritten by the next step)."""
        return {name: float(a[0]) if a.ndim == 1 else a[0].copy() for name, a in self.info_np.items()}


class DiffGymEnv(_TensorAPI, gym.Env[np.ndarray, np.ndarray]):
    """Single-env Gymnasium face of a task (batch 1). Subclasses set ``sim_class`` and a docstring.

    Like every Gymnasium env, it leaves truncation to the ``TimeLimit`` wrapper that ``gym.make`` adds
    (the registered horizon, or ``gym.make(id, max_episode_steps=H)``; ``-1`` for none). The sim's
    ``max_episode_steps`` (the registered horizon unless passed to the constructor) only sets
    ``differentiable_step``'s ``truncated``.
    """

    sim_class: ClassVar[type[DiffSim]]
    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 20}
    vector_class: ClassVar[type[DiffGymVectorEnv]]
    """The native vector env ``gym.make_vec`` builds for this task (``DiffGymVectorEnv`` by default)."""

    # ------------------------------------------------------------------ observation hooks (per task face)
    @classmethod
    def observation_space_of(cls, sim: DiffSim) -> spaces.Space:
        """The single-env observation space: a Box over the sim's flat observation by default."""
        return _spaces(sim)[0]

    @classmethod
    def observations(cls, sim: DiffSim, obs: torch.Tensor, state: SimState) -> np.ndarray | dict[str, np.ndarray]:
        """Batched Gymnasium observations of the sim's flat ``obs`` (B, obs_dim) in ``state``."""
        return obs.detach().cpu().numpy()

    def __init__(self, render_mode: str | None = None, device: str = "cpu", **sim_kwargs: Any):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}")
        check_device(device)
        self.sim = self.sim_class(device=device, **sim_kwargs)
        self.render_mode = render_mode
        self._face = type(self)
        self.observation_space, self.action_space = self.observation_space_of(self.sim), _spaces(self.sim)[1]
        self._batch = 1
        self._state = None
        self._seed: torch.Tensor | None = None
        self._episode = torch.zeros(1, dtype=torch.int32, device=self.sim.device)
        self._init_physics()
        self.use_fast_path: bool = self.sim.device.type == "cpu" and self.sim.has_fast_path
        """Step through persistent buffers and recorded launches (CPU only, and not in the bridge's debug
        mode; bit-identical to the reference path, which ``False`` selects)."""
        self._fast: _FastPath | None = None
        self._info_overridden = type(self.sim).info is not DiffSim.info
        self._init_kwargs = {"render_mode": render_mode, "device": device, **sim_kwargs}

    # Pickling (SB3's SubprocVecEnv, multiprocessing, Ray) rebuilds the env from its constructor arguments:
    # the sim holds Warp kernels and launch plans, which do not pickle, but a state is just tensors.
    def __getstate__(self) -> dict[str, Any]:
        return {"init": self._init_kwargs, "spec": self.spec, "use_fast_path": self.use_fast_path,
                "state": None if self._state is None else self._state.clone(), "seed": self._seed,
                "episode": self._episode.clone(), "np_random": self._np_random, "physics": self.get_physics()}

    def __setstate__(self, saved: dict[str, Any]) -> None:
        type(self).__init__(self, **saved["init"])
        self.spec, self.use_fast_path, self._np_random = saved["spec"], saved["use_fast_path"], saved["np_random"]
        self._state, self._seed, self._episode = saved["state"], saved["seed"], saved["episode"]
        for buffer, value in zip(self._physics, saved["physics"].values()):
            buffer.copy_(value)

    @property
    def spec(self) -> EnvSpec | None:  # type: ignore[override]
        return self.__dict__.get("_spec")

    @spec.setter
    def spec(self, spec: EnvSpec | None) -> None:
        # gym.make attaches the spec after construction. Gymnasium's TimeLimit truncates at the registered
        # max_episode_steps and the sim at its own (differentiable_step's `truncated`): reject a
        # registration whose two horizons differ rather than let the two faces of the task disagree.
        registered = gym.registry.get(spec.id) if spec is not None else None
        horizon = registered.max_episode_steps if registered is not None else None
        if horizon is not None and horizon != self.sim.max_episode_steps:
            raise ValueError(
                f"{spec.id}: registered max_episode_steps={horizon} (Gymnasium's TimeLimit) but "
                f"{type(self.sim).__name__} truncates at {self.sim.max_episode_steps}; register with "
                f"diffgym.register_task, which passes the horizon to the simulator, or add "
                f"kwargs={{'max_episode_steps': {horizon}}} to gym.register")
        self.__dict__["_spec"] = spec

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """``options={"physics": {"mass": 1.7}}`` sets the physical parameters of this and later episodes
        (until another reset sets them); names left out keep their values."""
        self._apply_physics_option(options)
        super().reset(seed=seed)
        if seed is not None or self._seed is None:
            value = seed if seed is not None else int(self.np_random.integers(_SEED_MASK))
            self._seed = warp_seeds([value]).to(self.sim.device)
            self._episode.zero_()
        else:
            self._episode += 1
        if self._fast_enabled():
            fast = self._fast_path()
            fast.reset(self._seed, self._episode)
            self._state = fast.state
            return self._fast_observation(fast), {}
        self._state = self.sim.reset(self._seed, self._episode)
        with torch.no_grad():
            obs = self.sim._observe(self._state)
        return _row(self.to_gym_observation(obs, self._state), 0), {}

    def step(self, action):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        if not self._fast_enabled():
            return self._reference_step(action)
        array = _checked_array(action, self.action_space.shape)
        fast = self._fast_path()
        if self._state is not fast.state:  # set by set_state or the reference path: adopt it
            fast.load(self._state)
        fast.step(array)
        self._state = fast.state
        if self._info_overridden:  # the task's extras are torch expressions of the step's outputs (no kernel)
            truncated = torch.tensor([int(fast.steps[fast.current][0]) >= self.sim.max_episode_steps])
            out = StepOutput(fast.state, fast.obs, fast.reward, fast.terminated.bool(), truncated,
                             fast.success.bool())
            info = {k: (v[0].item() if v.ndim == 1 else v[0]) for k, v in _info_numpy(self.sim, out).items()}
        else:  # the info kernel, if any, ran in fast.step
            info = {"is_success": bool(fast.success_np[0]), **fast.info_values()}
        # never truncated here, as on the reference path: Gymnasium's TimeLimit owns the single env's horizon
        return self._fast_observation(fast), float(fast.reward_np[0]), bool(fast.terminated_np[0]), False, info

    def _fast_observation(self, fast: _FastPath) -> np.ndarray | dict[str, np.ndarray]:
        if type(self).observations.__func__ is DiffGymEnv.observations.__func__:  # a flat Box: no torch op
            return fast.obs_np[0].copy()
        return _row(self.to_gym_observation(fast.obs.clone(), fast.state.clone()), 0)

    def _reference_step(self, action):
        """The step through the functional sim on fresh tensors (CUDA, and the fast path's reference)."""
        action = self._numpy_action(action, self.action_space.shape)
        with torch.no_grad():
            out = self.sim._step(self._state, action, self._physics)
        self._state = out.state
        info = {k: (v[0].item() if v.ndim == 1 else v[0]) for k, v in _info_numpy(self.sim, out).items()}
        # Never truncated here: gym.make wraps the env in Gymnasium's TimeLimit and keeps a
        # max_episode_steps override there without passing it on, so truncating at the sim's horizon too
        # would cut every episode at the registered length whatever the override (issue 13).
        obs = _row(self.to_gym_observation(out.obs, out.state), 0)
        return obs, float(out.reward[0]), bool(out.terminated[0]), False, info

    def _fast_enabled(self) -> bool:
        # The bridge's debug mode checks every output of every launch, which the recorded launches skip
        # (a task that overrides _step must not be replayed as one kernel launch)
        return (self.use_fast_path and self.sim.steps_as_one_kernel and self.sim.device.type == "cpu"
                and not debug_outputs_enabled())

    def _fast_path(self) -> _FastPath:
        if self._fast is None:
            self._fast = _FastPath(self.sim, self._physics, info_kernel=not self._info_overridden)
        return self._fast

    def render(self):
        if self.render_mode != "rgb_array" or self._state is None:
            return None
        return self.sim.render_state(self._state, 0)


class DiffGymVectorEnv(_TensorAPI, VectorEnv):
    """Native batched Gymnasium vector env: one kernel launch steps all ``num_envs`` envs.

    Env ``i`` behaves exactly like a single env seeded with ``seed + i``. ``autoreset_mode`` is
    ``NEXT_STEP`` (Gymnasium's default) or ``SAME_STEP`` (reset obs returned at once; the final
    observation and info are in ``info["final_obs"]`` / ``info["final_info"]``).
    ``reset(options={"reset_mask": mask})`` resets only the masked envs;
    ``reset(options={"physics": {"mass": values}})`` sets the per-env physical parameters (a number or
    ``(N,)`` values; only the reset envs' change under a ``reset_mask``), kept across autoresets.
    """

    def __reduce__(self):
        raise TypeError(f"a {type(self).__name__} cannot be pickled: it holds N envs' Warp kernels and device "
                        "state. Make it in each process with gym.make_vec(env_id, num_envs=N), and move states "
                        "between processes with get_state() / set_state() (tensors pickle)")

    def __init__(self, sim_class: type[DiffSim], num_envs: int, render_mode: str | None = None,
                 device: str = "cpu", autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
                 metadata: dict | None = None, face: type[DiffGymEnv] | None = None, **sim_kwargs: Any):
        """``face`` is the task's single-env class, whose observation hooks (e.g. a Dict space) the
        vector env shares; ``DiffGymEnv``'s flat Box by default."""
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        autoreset_mode = AutoresetMode(autoreset_mode)
        if autoreset_mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP):
            raise ValueError(f"autoreset_mode must be NEXT_STEP or SAME_STEP, got {autoreset_mode}")
        self.metadata = {**(metadata or DiffGymEnv.metadata), "autoreset_mode": autoreset_mode}
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}")
        check_device(device)
        self.sim = sim_class(device=device, **sim_kwargs)
        self.num_envs = self._batch = int(num_envs)
        self.render_mode = render_mode
        self._face = face or DiffGymEnv
        self.single_observation_space = self._face.observation_space_of(self.sim)
        self.single_action_space = _spaces(self.sim)[1]
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.autoreset_mode = autoreset_mode
        self._state = None
        self._seed: torch.Tensor | None = None
        self._episode = torch.full((self.num_envs,), -1, dtype=torch.int32, device=self.sim.device)
        self._needs_reset = torch.zeros(self.num_envs, dtype=torch.bool, device=self.sim.device)
        self._init_physics()

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        super().reset(seed=seed if isinstance(seed, int) else None)  # seeds self.np_random
        device = self.sim.device
        if isinstance(seed, int):
            seed = [seed + i for i in range(self.num_envs)]
        if seed is not None and len(seed) != self.num_envs:
            raise ValueError(f"seed must be an int or a list of {self.num_envs} seeds, got {len(seed)}")
        mask = torch.ones(self.num_envs, dtype=torch.bool, device=device)
        if options and "reset_mask" in options:
            mask = _bool_mask(options["reset_mask"], self.num_envs, device, "options['reset_mask']")
        if self._state is None:
            mask = torch.ones_like(mask)  # the first reset starts every env
        self._apply_physics_option(options, mask)
        if self._seed is None:
            self._seed = torch.as_tensor(self.np_random.integers(_SEED_MASK, size=self.num_envs),
                                         dtype=torch.int32, device=device)
        seeds = seeded = None
        if seed is not None:  # a seeded env restarts its RNG stream at episode 0, like a single env
            seeded = torch.as_tensor([s is not None for s in seed], device=device)
            seeds = warp_seeds([0 if s is None else s for s in seed]).to(device)
        self._state, obs = self._restart(self._state, mask, seeds, seeded)
        self._needs_reset &= ~mask
        return self.to_gym_observation(obs, self._state), {}

    def restart(self, state: SimState, mask: torch.Tensor, seeds: torch.Tensor | None = None
                ) -> tuple[SimState, torch.Tensor]:
        """Start a new episode in every env of ``state`` where ``mask`` is true, on tensors only: the
        masked reset (``reset(seed=..., options={"reset_mask": ...})``) for a state the caller holds.

        ``state`` is any batch of ``num_envs`` states (e.g. ``differentiable_step``'s ``out.state``, whose
        envs may have diverged); the env's own state is untouched. ``mask`` is a ``(num_envs,)`` bool
        tensor; ``seeds``, if given, an integer ``(num_envs,)`` tensor read where ``mask`` is true. A
        masked env restarts from RNG stream ``(seeds[i], episode 0)``, which becomes its stream, or,
        without ``seeds``, from the next episode of its own stream (as an autoreset does); the env's
        per-env seed and episode counters advance exactly as under the masked reset, so both give the
        same states, bit for bit.

        Returns the new state (``state``'s own tensors outside the mask, so their gradients flow; the
        restarted envs carry none) and its ``(num_envs, obs_dim)`` float32 observation from the sim,
        detached (``to_gym_observation(obs, state)`` gives the Gymnasium one)."""
        if self._seed is None:
            raise RuntimeError("call reset() before restart()")
        if not isinstance(state, self.sim.state_type) or state.batch_size != self.num_envs:
            raise ValueError(f"state must be a {self.sim.state_type.__name__} of batch size {self.num_envs}, got "
                             f"{type(state).__name__} of batch size {getattr(state, 'batch_size', None)}")
        device = self.sim.device
        if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == (self.num_envs,)
                and mask.device == device):
            raise ValueError(f"mask must be a torch.bool tensor of shape ({self.num_envs},) on {device}, got "
                             f"{describe_value(mask)}")
        if seeds is not None:
            if not (isinstance(seeds, torch.Tensor) and not seeds.is_floating_point() and not seeds.is_complex()
                    and seeds.dtype != torch.bool and seeds.shape == (self.num_envs,)):
                raise ValueError(f"seeds must be an integer tensor of shape ({self.num_envs},), got "
                                 f"{describe_value(seeds)}")
            seeds = warp_seeds(seeds.to(device))
        return self._restart(state, mask, seeds)

    def _restart(self, state: SimState | None, mask: torch.Tensor, seeds: torch.Tensor | None = None,
                 seeded: torch.Tensor | None = None) -> tuple[SimState, torch.Tensor]:
        """:meth:`restart` on checked arguments (``seeds`` int32, mapped by :func:`warp_seeds`); ``seeded``
        narrows which masked envs take ``seeds`` (all of them by default); ``state`` None (the first reset)
        restarts every env."""
        episode = torch.where(mask, self._episode + 1, self._episode)
        if seeds is not None:
            given = mask if seeded is None else mask & seeded
            self._seed = torch.where(given, seeds, self._seed)
            episode = torch.where(given, torch.zeros_like(episode), episode)
        self._episode = episode
        fresh_state = self.sim.reset(self._seed, self._episode)
        new_state = fresh_state if state is None else state.where(mask, fresh_state)
        with torch.no_grad():
            obs = self.sim._observe(new_state)
        return new_state, obs

    def step(self, actions):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        action = self._numpy_action(actions, self.action_space.shape)
        with torch.no_grad():
            out = self.sim._step(self._state, action, self._physics)
            infos = _info_numpy(self.sim, out)
            obs, reward = out.obs, out.reward
            terminated, truncated = out.terminated, out.truncated
            if self.autoreset_mode == AutoresetMode.NEXT_STEP:
                resetting = self._needs_reset
                if bool(resetting.any()):
                    restarted, fresh_obs = self._restart(out.state, resetting)
                    out = dataclasses.replace(out, state=restarted)
                    obs = torch.where(resetting[:, None], fresh_obs, obs)
                    reward = reward.masked_fill(resetting, 0.0)
                    terminated, truncated = terminated & ~resetting, truncated & ~resetting
                self._needs_reset = terminated | truncated
            else:  # SAME_STEP
                done = terminated | truncated
                if bool(done.any()):
                    done_np = done.cpu().numpy()
                    final_obs = np.full(self.num_envs, None, dtype=object)
                    last_obs = self.to_gym_observation(obs, out.state)
                    for i in np.flatnonzero(done_np):
                        final_obs[i] = _row(last_obs, int(i))
                    infos["final_info"] = {**{k: v.copy() for k, v in infos.items()},
                                           **{f"_{k}": done_np.copy() for k in infos}}
                    infos["_final_info"] = done_np
                    infos["final_obs"], infos["_final_obs"] = final_obs, done_np
                    restarted, fresh_obs = self._restart(out.state, done)
                    out = dataclasses.replace(out, state=restarted)
                    obs = torch.where(done[:, None], fresh_obs, obs)
        self._state = out.state
        # As in Gymnasium: an env that was reset this step reports its (empty) reset info at the top level
        reset_now = (resetting if self.autoreset_mode == AutoresetMode.NEXT_STEP else done).cpu().numpy()
        for key in [k for k in infos if not k.startswith("_") and k not in ("final_obs", "final_info")]:
            infos[key][reset_now] = 0
            infos[f"_{key}"] = ~reset_now
        return (self.to_gym_observation(obs, self._state), reward.cpu().numpy(), terminated.cpu().numpy(),
                truncated.cpu().numpy(), infos)

    def render(self):
        if self.render_mode != "rgb_array" or self._state is None:
            return None
        return tuple(self.sim.render_state(self._state, i) for i in range(self.num_envs))

    def state_dict(self) -> dict[str, Any]:
        """What decides the envs' future besides the actions, for a checkpoint: the state (step counters
        included) and, per env, the RNG stream its next restart draws from (``seed``, ``episode``) and
        whether it restarts at the next ``step`` (``needs_reset``, NEXT_STEP autoreset). Copies; physics
        is not included (``get_physics``)."""
        if self._seed is None:
            raise RuntimeError("call reset() before state_dict()")
        return {"state": self.get_state().tensors(), "seed": self._seed.clone(), "episode": self._episode.clone(),
                "needs_reset": self._needs_reset.clone()}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Put the envs back where :meth:`state_dict` found them (everything checked before anything
        changes)."""
        device, n = self.sim.device, self.num_envs
        expected = {"seed": torch.int32, "episode": torch.int32, "needs_reset": torch.bool}
        missing = [key for key in ("state", *expected) if key not in saved]
        if missing:
            raise ValueError(f"the saved vector env state lacks {missing}; expected what state_dict() returns")
        for key, dtype in expected.items():
            value = saved[key]
            if not (isinstance(value, torch.Tensor) and value.dtype == dtype and value.shape == (n,)):
                raise ValueError(f"saved['{key}'] must be a {dtype} tensor of shape ({n},), got {describe_value(value)}")
        fields = self.sim.state_type.field_names()
        if len(saved["state"]) != len(fields):
            raise ValueError(f"saved['state'] must hold one tensor per field of {self.sim.state_type.__name__} "
                             f"{fields}, got {len(saved['state'])}")
        self.set_state(self.sim.state_type(*(t.to(device) for t in saved["state"])))
        # copies: the env updates these in place, and the caller's checkpoint must not change with it
        self._seed, self._episode = saved["seed"].to(device).clone(), saved["episode"].to(device).clone()
        self._needs_reset = saved["needs_reset"].to(device).clone()

    def _after_set_state(self) -> None:
        self._needs_reset.zero_()


DiffGymEnv.vector_class = DiffGymVectorEnv
