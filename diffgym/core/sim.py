"""The functional core of a task: a pure, batched, differentiable simulator (like Gymnasium's
``FuncEnv`` and Brax's ``Env``). The Gymnasium envs in ``diffgym.core.env`` wrap it."""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch

from diffgym.core.bridge import Out, debug_outputs, warp_call
from diffgym.core.contract import (KERNEL_TASK_PARTS, FieldSpec, TaskContractError, check_info_kernel,
                                   check_sim_class)
from diffgym.core.multistep import RolloutOutput, fused_step_launches
from diffgym.core.state import SimState
from diffgym.core.tensor_checks import check_float32


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def clip_to_action_box(action: torch.Tensor) -> torch.Tensor:
    """``action.clamp(-1, 1)``: the same values and the same gradients (1 inside the box and on its edge,
    0 outside, 0 for NaN). Where the action needs a gradient, lies on the CPU and is in the box already,
    it is returned as it is: checking that costs less than clamp's autograd node and its backward (which
    were about 7 of a PointNav2D step's 136 us forward and backward at 64 envs, ``docs/benchmarks.md``). On a
    GPU the check would make the host wait for the device, so there the clamp always runs."""
    if action.requires_grad and action.device.type == "cpu" and torch.is_grad_enabled() \
            and bool(action.abs().le(1.0).all()):
        return action
    return action.clamp(-1.0, 1.0)


@dataclasses.dataclass(eq=False, frozen=True)
class StepOutput:
    """What ``differentiable_step`` returns; every field is a batch-first torch tensor.

    Frozen like the state: derive a modified output with ``dataclasses.replace(out, reward=...)``."""

    state: SimState
    """The next state; its float fields are differentiable functions of the inputs."""
    obs: torch.Tensor
    """(B, obs_dim) float32, differentiable: the observation of ``state``."""
    reward: torch.Tensor
    """(B,) float32, differentiable."""
    terminated: torch.Tensor
    """(B,) bool: the task reached a terminal state (no bootstrap past it)."""
    truncated: torch.Tensor
    """(B,) bool: the episode hit ``max_episode_steps`` (bootstrap past it)."""
    success: torch.Tensor
    """(B,) bool: the task's success criterion holds in ``state`` (``info["is_success"]``)."""

    @property
    def done(self) -> torch.Tensor:
        return self.terminated | self.truncated


_LAUNCHES_CHECKED: weakref.WeakKeyDictionary[type, set[Any]] = weakref.WeakKeyDictionary()
"""Per task class, the step kernels (an option such as pre-contact gradients picks one per instance) whose
first launches :meth:`DiffSim.check_launches` has checked in this process."""
_LAUNCHES_LOCK = threading.Lock()


class DiffSim:
    """Pure batched simulator of one task. One Warp thread per env; no Python loop over envs.

    A task subclass declares (see ``docs/adding_a_task.md``):

    * ``state_type``: its frozen :class:`SimState` dataclass; the last field is ``step`` (the int32 step
      count), every other field is float32;
    * ``obs_dim``, ``act_dim``, ``dt``, ``default_max_episode_steps``;
    * three Warp kernels whose array arguments are *named* after the state's fields, in its order:
      ``reset_kernel(seed, episode, params, *state_out)``,
      ``observe_kernel(*state, params, obs_out)`` and
      ``step_kernel(*state, action, *physical, params, *next_state_out, obs, reward, terminated, success)``,
      where ``params`` is ``self.params`` (a ``wp.struct`` of the task's constants), ``physical`` one
      ``wp.array(dtype=float)`` per name in ``physical_params`` and ``next_state_out`` the field names
      with ``_next`` appended;
    * ``render_state(state, index) -> np.ndarray`` (an RGB frame of one env).

    Defining a subclass checks this contract (:mod:`diffgym.core.contract`) and derives each field's
    per-env shape from the kernels' Warp types into ``state_type.shapes``.

    ``step`` clips actions to [-1, 1] (``torch.clamp``: gradient 1 inside the box, 0 outside;
    :func:`clip_to_action_box`).
    """

    state_type: ClassVar[type[SimState]]
    obs_dim: ClassVar[int]
    act_dim: ClassVar[int]
    dt: ClassVar[float]
    default_max_episode_steps: ClassVar[int]
    reset_kernel: ClassVar[Any]
    observe_kernel: ClassVar[Any]
    step_kernel: ClassVar[Any]
    obs_low: ClassVar[float | np.ndarray] = -np.inf
    obs_high: ClassVar[float | np.ndarray] = np.inf
    state_bounds: dict[str, float] = {}
    """The task's valid domain, validated by ``check_state``: ``|x| <= bound`` for every element of each
    named float field (every float field must also be finite). A task documents why these bounds hold
    for every state its dynamics reach, and may check more in its own ``check_state``."""

    physical_params: ClassVar[tuple[str, ...]] = ()
    """Names of the task's per-env, differentiable physical parameters (e.g. ``("mass",)``). The step kernel
    takes one ``(B,)`` float array per name right after ``action``; the ``params`` struct field of the
    same name holds the value every env uses unless ``step``'s ``physics`` says otherwise."""
    physics_bounds: ClassVar[dict[str, tuple[float, float]]] = {}
    """The valid range ``[low, high]`` of each physical parameter, checked by ``check_physics`` (values
    must also be finite); the task documents why the dynamics stay finite inside it."""
    physics_units: ClassVar[dict[str, str]] = {}
    """Each physical parameter's unit, for messages (a name without one is written bare)."""

    params: Any
    """The ``wp.struct`` of constants passed to every kernel; set by the subclass's ``__init__``."""

    _field_specs: ClassVar[dict[str, FieldSpec]]
    """Per-env shape and dtype of each state field, derived from the kernels when the class is defined."""

    has_fast_path: ClassVar[bool] = True
    """Whether the single env may step through recorded launches of ``step_kernel`` on persistent
    buffers (``diffgym.core.env``); a task whose step is not one kernel (a Newton task) says False."""

    steps_as_one_kernel: ClassVar[bool] = True
    """Derived when a subclass is defined: ``has_fast_path`` and ``_step`` not overridden, i.e. a step is
    the single step-kernel launch that the single env's fast path and the fused rollout replay."""

    contract_parts: ClassVar[tuple[str, ...]] = KERNEL_TASK_PARTS
    """The class attributes a task of this kind defines (named when an incomplete class is built)."""

    info_kernel: ClassVar[Any] = None
    """Optional Warp kernel computing the task's ``info`` extras from a step's outputs,
    ``info_kernel(*next_state, obs, reward, params, # outputs: info_<key>, ...)``
    (:func:`~diffgym.core.contract.check_info_kernel`). The default :meth:`info` runs it, and the single
    env's fast path replays it after each step on its persistent buffers, so the extras cost no torch op."""

    info_shapes: ClassVar[dict[str, tuple[int, ...]]] = {}
    """Derived from ``info_kernel`` when a subclass is defined: the per-env shape of each extra, in order."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.steps_as_one_kernel = cls.has_fast_path and cls._step is DiffSim._step
        specs = cls._check_contract()
        if specs is not None:  # None: an intermediate class without kernels yet
            cls._field_specs = specs
            # check_state reads the shapes from the state type; a declared ``shapes`` was checked equal
            cls.state_type.shapes = {name: spec.shape for name, spec in specs.items()}
            cls.info_shapes = {} if cls.info_kernel is None else check_info_kernel(cls, specs)

    @classmethod
    def _check_contract(cls) -> dict[str, FieldSpec] | None:
        """The task contract of this kind of task (kernel tasks: :func:`check_sim_class`)."""
        return check_sim_class(cls)

    def __init__(self, device: str | torch.device = "cpu", max_episode_steps: int | None = None):
        if getattr(type(self), "_field_specs", None) is None:  # the contract never ran: an intermediate class
            missing = [name for name in self.contract_parts if getattr(self, name, None) is None]
            raise TaskContractError(f"{type(self).__name__} is not a complete task: it does not define "
                                    f"{', '.join(missing)} (docs/adding_a_task.md)")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        horizon = self.default_max_episode_steps if max_episode_steps is None else max_episode_steps
        # bool is an int subclass, and float/str horizons would silently round or parse: accept ints only
        if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon <= 0:
            raise ValueError(f"max_episode_steps must be a positive int, got {max_episode_steps!r}")
        self.max_episode_steps = int(horizon)
        self._fields = self.state_type.field_names()  # the contract check ensured the last one is 'step'
        self._step_specs_cache: dict[int, list[Out]] = {}
        # the default physics per batch size, with the struct values it was filled from (rebuilt if edited)
        self._default_physics_cache: dict[int, tuple[tuple[float, ...], tuple[torch.Tensor, ...]]] = {}
        self._bounds_rows: dict[tuple, torch.Tensor] = {}  # see _beyond_bounds

    # ----------------------------------------------------------------------------- pure API
    def reset(self, seed: torch.Tensor, episode: torch.Tensor) -> SimState:
        """Initial states for a batch: env ``i`` draws from Warp's RNG stream ``(seed[i], episode[i])``."""
        self.check_launches()
        return self._reset(seed, episode)

    def check_launches(self) -> None:
        """Once per task class, step kernel and process, before their first use: reset, observe, step and
        take the info extras of one env in the bridge's debug mode (:func:`~diffgym.core.bridge.debug_outputs`).
        A kernel that leaves an output unwritten, or writes past one's end (say ``obs_dim`` smaller than the
        columns the observation writes, which would corrupt memory), raises ``UnwrittenOutputError`` here,
        naming the kernel and the argument, instead of returning garbage. A task with a step of its own (a Newton
        task: a solver between its kernels) has its reset and observation checked, not its step."""
        cls, kernel = type(self), getattr(self, "step_kernel", None)  # a Newton task has none
        if kernel in _LAUNCHES_CHECKED.get(cls, ()):
            return
        with _LAUNCHES_LOCK:
            if kernel in _LAUNCHES_CHECKED.get(cls, ()):  # another thread checked it meanwhile
                return
            first = torch.zeros(1, dtype=torch.int32, device=self.device)
            with debug_outputs(), torch.no_grad():
                state = self._reset(first, first)
                self._observe(state)
                if self.steps_as_one_kernel:
                    self.info(self._step(state, torch.zeros(1, self.act_dim, device=self.device)))
            _LAUNCHES_CHECKED.setdefault(cls, set()).add(kernel)

    def _reset(self, seed: torch.Tensor, episode: torch.Tensor) -> SimState:
        batch = int(seed.shape[0])
        state_specs = self._state_specs(batch)
        with torch.no_grad():
            tensors = warp_call(self.reset_kernel, batch, [seed.to(torch.int32), episode.to(torch.int32)],
                                [self.params], state_specs)
        return self.state_type(*tensors)

    def observe(self, state: SimState) -> torch.Tensor:
        """The (B, obs_dim) observation of ``state``; differentiable."""
        self.check_state(state)
        return self._observe(state)

    def step(self, state: SimState, action: torch.Tensor,
             physics: Mapping[str, torch.Tensor] | None = None) -> StepOutput:
        """One control step for the whole batch; differentiable in ``action``, the float state fields and
        the ``physics`` tensors.

        ``physics`` maps names in ``physical_params`` to ``(B,)`` float32 tensors of per-env values;
        a name left out (or ``None``, the default) means every env uses the task's constructor value.
        """
        self.check_state(state)
        batch = state.batch_size
        return self._step(state, self.check_action(action, batch), self.check_physics(physics, batch))

    def rollout(self, state: SimState, actions: torch.Tensor,
                physics: Mapping[str, torch.Tensor] | None = None) -> RolloutOutput:
        """``T`` steps from ``state`` under the action sequence ``actions`` ``(T, B, act_dim)`` in one call:
        the same numbers and gradients, bit for bit, and the same errors as ``step`` in a Python loop (no
        resets: a rollout past ``max_episode_steps`` keeps counting steps and flags them ``truncated``).
        For a kernel task the T steps are one autograd node without per-step autograd, torch and bridge
        overhead (:mod:`diffgym.core.multistep`); a task that overrides ``_step`` (e.g. a Newton task
        running a solver) loops its own ``_step``, without the fusion's speed.
        Differentiable in ``actions``, the float state fields and ``physics``; outputs are time-major.

        The start state is validated before the launches, and every state a later step starts from after
        them, in one vectorised check: a rollout raises where the stepped loop would (``ValueError``
        naming the step, the field and the env)."""
        self.check_state(state)
        batch = state.batch_size
        clipped = check_float32(actions, "actions", ("T", batch, self.act_dim), "(step, env, dim)",
                                self.device).clamp(-1.0, 1.0)
        physics_tensors = self.check_physics(physics, batch)
        if not self.steps_as_one_kernel:
            rollout = self._looped_rollout(state, clipped, physics_tensors)
        else:
            stacked = fused_step_launches(self.step_kernel, (self.params,), self._step_specs(batch),
                                          state.tensors(), clipped, physics_tensors)
            n = len(self._fields)
            states = type(state)(*stacked[:n])
            obs, reward, terminated, success = stacked[n:]
            truncated = states.step >= self.max_episode_steps
            rollout = RolloutOutput(states, obs, reward, terminated.bool(), truncated, success.bool())
        self._check_passed_states(rollout.states)
        return rollout

    def default_physics(self, batch: int) -> dict[str, torch.Tensor]:
        """The constructor's physical parameters as ``(batch,)`` tensors (new ones, safe to edit)."""
        return {name: t.clone() for name, t in zip(self.physical_params, self._default_physics(batch))}

    # Unchecked twins of the public methods, for callers that validated their arguments already (the
    # envs check NumPy actions and own their states): validation runs once per call at the public API.
    def _observe(self, state: SimState) -> torch.Tensor:
        batch = state.batch_size
        (obs,) = warp_call(self.observe_kernel, batch, state.tensors(), [self.params],
                           [Out((batch, self.obs_dim))])
        return obs

    def _step(self, state: SimState, action: torch.Tensor,
              physics: Sequence[torch.Tensor] | None = None) -> StepOutput:
        """``physics``: one checked ``(B,)`` tensor per name in ``physical_params``, in that order."""
        batch = state.batch_size
        if physics is None:
            physics = self._default_physics(batch)
        outputs = warp_call(self.step_kernel, batch, [*state.tensors(), clip_to_action_box(action), *physics],
                            [self.params], self._step_specs(batch))
        return self._step_output(outputs)

    def _step_output(self, outputs: Sequence[torch.Tensor]) -> StepOutput:
        """The :class:`StepOutput` of a step's outputs, in ``_step_specs`` order (next state, obs, reward,
        terminated, success)."""
        n = len(self._fields)
        next_state = self.state_type(*outputs[:n])
        obs, reward, terminated, success = outputs[n:]
        truncated = next_state.step >= self.max_episode_steps
        return StepOutput(next_state, obs, reward, terminated.bool(), truncated, success.bool())

    def info(self, out: StepOutput) -> dict[str, torch.Tensor]:
        """Task-specific per-env extras for ``info`` (batch-first tensors): what ``info_kernel`` computes
        from ``out``, none without one. A task may override this instead (torch expressions of ``out``),
        at the cost of torch ops in every single-env step."""
        if self.info_kernel is None:
            return {}
        batch = out.state.batch_size
        extras = warp_call(self.info_kernel, batch, [*out.state.tensors(), out.obs, out.reward], [self.params],
                           [Out((batch, *shape)) for shape in self.info_shapes.values()])
        return dict(zip(self.info_shapes, extras))

    def render_state(self, state: SimState, index: int = 0) -> np.ndarray:
        """An ``(H, W, 3)`` uint8 RGB frame of env ``index`` of ``state``, for ``render_mode="rgb_array"``."""
        raise NotImplementedError(f"{type(self).__name__} does not draw itself: define render_state(state, index) "
                                  "returning an (H, W, 3) uint8 frame to render it (docs/adding_a_task.md)")

    # ----------------------------------------------------------------------------- checks
    def check_action(self, action: Any, batch: int) -> torch.Tensor:
        """Validate a torch action batch; raise ``ValueError`` naming what was expected."""
        return check_float32(action, "action", (batch, self.act_dim), "(env, dim)", self.device)

    def check_physics(self, physics: Mapping[str, Any] | None, batch: int) -> tuple[torch.Tensor, ...]:
        """Validate a ``physics`` mapping for ``batch`` envs; return one tensor per ``physical_params``
        name, in order, the constructor value where a name is left out (``ValueError`` otherwise)."""
        defaults = self._default_physics(batch)
        if physics is None:
            return defaults
        if not isinstance(physics, Mapping):
            raise TypeError(f"physics must be a mapping of names in {self.physical_params} to tensors, "
                            f"got {type(physics).__name__}")
        unknown = [name for name in physics if name not in self.physical_params]
        if unknown:
            raise ValueError(f"physics names {unknown} are not physical parameters of {type(self).__name__}; "
                             f"expected names in {self.physical_params}")
        tensors = []
        for name, default in zip(self.physical_params, defaults):
            value = physics.get(name)
            if value is None:
                tensors.append(default)
                continue
            expected = f"a torch.float32 tensor of shape ({batch},) on {self.device}"
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"physics['{name}'] must be {expected}, got {type(value).__name__}")
            if value.shape != (batch,) or value.dtype != torch.float32 or value.device != self.device:
                raise ValueError(f"physics['{name}'] must be {expected}, got shape {tuple(value.shape)}, "
                                 f"dtype {value.dtype} on {value.device}")
            tensors.append(value)
        self._check_physics_domain(dict(zip(self.physical_params, tensors)))
        return tuple(tensors)

    def check_default_physics(self, **defaults: float) -> None:
        """A one-line ``ValueError`` unless every constructor default (name=value) lies inside its
        ``physics_bounds`` (NaN refused): the default is what a per-env value falls back to."""
        for name, value in defaults.items():
            low, high = self.physics_bounds[name]
            if not low <= value <= high:
                unit = self.physics_units.get(name)
                raise ValueError(f"{name} must lie in [{low:g}, {high:g}]{' ' + unit if unit else ''}, got {value!r}")

    def _check_physics_domain(self, physics: Mapping[str, torch.Tensor]) -> None:
        """Finite values inside ``physics_bounds``, with one line naming the parameter and the first bad env."""
        for name, value in physics.items():
            low, high = self.physics_bounds.get(name, (-float("inf"), float("inf")))
            detached = value.detach()
            bad = ~torch.isfinite(detached) | (detached < low) | (detached > high)
            if bool(bad.any()):
                env = int(bad.nonzero()[0])
                raise ValueError(f"physics['{name}'] must be finite and lie in [{low:g}, {high:g}], "
                                 f"got {float(detached[env])} in env {env}")

    def check_state(self, state: Any) -> None:
        if not isinstance(state, self.state_type):
            raise TypeError(f"state must be a {self.state_type.__name__}, got {type(state).__name__}")
        batch = state.batch_size
        for name, tensor in zip(self._fields, state.tensors()):
            want = torch.int32 if name == "step" else torch.float32
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != want:
                got = getattr(tensor, "dtype", type(tensor).__name__)
                raise ValueError(f"state.{name} must be a {want} tensor, got {got}")
            if tensor.shape != (batch, *self.state_type.shapes[name]):
                raise ValueError(f"state.{name} must have shape {(batch, *self.state_type.shapes[name])}, "
                                 f"got {tuple(tensor.shape)}")
            if tensor.device != self.device:
                raise ValueError(f"state.{name} must be on {self.device}, got {tensor.device}")
        self._check_domain(state)

    def outside_domain(self, state: SimState) -> torch.Tensor:
        """``(B,)`` bool: the envs whose state is not finite or lies outside the task's valid domain
        (``state_bounds`` and the task's own :meth:`_outside_task_domain`). ``check_state`` rejects such a
        state; trainers restart those envs instead of stepping them (``diffgym.training.rollout.unroll``)."""
        return self._beyond_bounds(self._float_state_row(state), 0) | self._outside_task_domain(state)

    def diverged(self, out: StepOutput) -> torch.Tensor:
        """``(B,)`` bool: the envs that a step's ``out`` took out of the valid domain: a non-finite observation
        or reward, or a next state :meth:`outside_domain` flags. The same flags as
        ``~(isfinite(out.obs).all(1) & isfinite(out.reward)) | outside_domain(out.state)`` (trainers ask at
        every step), in one comparison: the observation, the reward and the state's float fields side by
        side, one row per env, against one row of bounds (:meth:`_beyond_bounds`)."""
        if (out.obs.dtype != torch.float32 or out.reward.dtype != torch.float32
                or type(self).outside_domain is not DiffSim.outside_domain):  # not what the bounds row describes
            return ~(torch.isfinite(out.obs).all(dim=1) & torch.isfinite(out.reward)) | self.outside_domain(out.state)
        row = torch.cat([out.obs.detach(), out.reward.detach()[:, None], self._float_state_row(out.state)], dim=1)
        outside = self._beyond_bounds(row, out.obs.shape[1] + 1)
        if type(self)._outside_task_domain is DiffSim._outside_task_domain:  # (which flags nothing)
            return outside
        return outside | self._outside_task_domain(out.state)

    def _float_state_row(self, state: SimState) -> torch.Tensor:
        """``(B, F)``: the state's float fields (all but ``step``), detached, side by side in field order."""
        batch = state.batch_size
        fields = [t.detach().reshape(batch, -1) for name, t in zip(self._fields, state.tensors()) if name != "step"]
        return torch.cat(fields, dim=1) if fields else torch.zeros(batch, 0, device=self.device)

    def _beyond_bounds(self, row: torch.Tensor, finite_columns: int) -> torch.Tensor:
        """``(B,)`` bool: some ``|x|`` of ``row`` exceeds its bound. The first ``finite_columns`` columns need
        only be finite (bound: float32's largest finite value); the rest are :meth:`_float_state_row`'s, each
        bounded by its field's ``state_bounds`` entry (float32's largest value without one). ``|x| <= bound``
        is false for NaN and +-inf as well, so one comparison tests both; the row of bounds is float32, as a
        float32 tensor's comparison with a Python bound rounds it. Built once per width and set of bounds (a
        task may set ``state_bounds`` per instance)."""
        key = (finite_columns, tuple(self.state_bounds.items()))
        bounds = self._bounds_rows.get(key)
        if bounds is None:
            values = [_FLOAT32_MAX] * finite_columns
            for name in self._fields:
                if name != "step":
                    bound = min(self.state_bounds.get(name, _FLOAT32_MAX), _FLOAT32_MAX)
                    values += [bound] * int(np.prod(self.state_type.shapes[name]))
            bounds = self._bounds_rows[key] = torch.tensor(values, dtype=torch.float32, device=self.device)
        return ~(row.abs() <= bounds).all(dim=1)

    def _outside_task_domain(self, state: SimState) -> torch.Tensor:
        """Task-specific domain limits beyond ``state_bounds`` (``(B,)`` bool); none by default."""
        return torch.zeros(state.batch_size, dtype=torch.bool, device=self.device)

    def _task_domain_message(self, state: SimState, env: int) -> str:
        """The one-line error for env ``env`` outside :meth:`_outside_task_domain` (tasks that add limits
        say which)."""
        return f"the state of env {env} lies outside {type(self).__name__}'s valid domain"

    def _check_domain(self, state: SimState) -> None:
        """Reject a state :meth:`outside_domain` flags, with one line naming the field (non-finite, beyond
        ``state_bounds``, or the task's own limit) and the first offending env. One host sync for the whole
        state when everything is valid."""
        outside = self.outside_domain(state)
        if not bool(outside.any()):
            return
        floats = [(name, t) for name, t in zip(self._fields, state.tensors()) if name != "step"]
        for name, tensor in floats:
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                env = int((~finite).reshape(len(tensor), -1).any(dim=1).nonzero()[0])
                raise ValueError(f"state.{name} must be finite, got {tensor[env].tolist()} in env {env}")
        for name, tensor in floats:
            bound = self.state_bounds.get(name)
            if bound is not None and bool((tensor.abs() > bound).any()):
                env = int((tensor.abs() > bound).reshape(len(tensor), -1).any(dim=1).nonzero()[0])
                raise ValueError(f"state.{name} must lie in [-{bound:g}, {bound:g}] (the task's valid domain), "
                                 f"got {tensor[env].tolist()} in env {env}")
        raise ValueError(self._task_domain_message(state, int(outside.nonzero()[0])))

    # ----------------------------------------------------------------------------- helpers
    def _looped_rollout(self, state: SimState, actions: torch.Tensor,
                        physics: tuple[torch.Tensor, ...]) -> RolloutOutput:
        """``rollout`` for tasks whose step is not one kernel: ``_step`` in a loop, outputs stacked."""
        outs = []
        for action in actions:
            out = self._step(state, action, physics)
            outs.append(out)
            state = out.state
        fields = zip(*(out.state.tensors() for out in outs))
        stack = lambda name: torch.stack([getattr(out, name) for out in outs])  # noqa: E731
        return RolloutOutput(type(state)(*(torch.stack(f) for f in fields)), stack("obs"), stack("reward"),
                             stack("terminated"), stack("truncated"), stack("success"))

    def _check_passed_states(self, states: SimState) -> None:
        """What the stepped loop's ``check_state`` would reject, checked at once over a rollout's
        ``(T, B, ...)`` states: every state a later step starts from (all but the last) must be finite and
        inside the task's domain."""
        horizon = int(states.step.shape[0])
        if horizon < 2:
            return
        passed = type(states)(*(t[:-1].detach().reshape(-1, *t.shape[2:]) for t in states.tensors()))
        outside = self.outside_domain(passed)
        if not bool(outside.any()):
            return
        batch = int(states.step.shape[1])
        t, env = divmod(int(outside.nonzero()[0]), batch)
        try:
            self.check_state(type(states)(*(x[t] for x in states.tensors())))
        except ValueError as error:
            raise ValueError(f"rollout step {t + 2} of {horizon} would start from an invalid state: {error}") from None

    def _state_specs(self, batch: int) -> list[Out]:
        return [Out((batch, *self._field_specs[name].shape), self._field_specs[name].dtype) for name in self._fields]

    def _default_physics(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Cached ``(batch,)`` tensors of the struct's values: never written, so safe to share between
        calls (a kernel only reads its inputs) without a per-step allocation."""
        values = tuple(float(getattr(self.params, name)) for name in self.physical_params)
        cached = self._default_physics_cache.get(batch)
        if cached is None or cached[0] != values:
            tensors = tuple(torch.full((batch,), v, dtype=torch.float32, device=self.device) for v in values)
            cached = self._default_physics_cache[batch] = (values, tensors)
        return cached[1]

    def _step_specs(self, batch: int) -> list[Out]:
        """The step kernel's output specs for ``batch`` envs, built once per batch size."""
        specs = self._step_specs_cache.get(batch)
        if specs is None:
            specs = self._step_specs_cache[batch] = [
                *self._state_specs(batch), Out((batch, self.obs_dim)), Out((batch,)),
                Out((batch,), torch.int32), Out((batch,), torch.int32)]
        return specs
