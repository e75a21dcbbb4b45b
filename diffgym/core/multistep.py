"""Fused multi-step rollouts: T control steps of a kernel task as one autograd node.

``differentiable_step`` in a Python loop pays the autograd engine and the bridge once per step (a few
hundred microseconds on a CPU at small batches, against a few microseconds of kernel). When the actions
are known in advance (open-loop trajectory optimisation, the sampling planner, system identification
from a recorded action sequence) the whole rollout can be one :class:`torch.autograd.Function`: the
forward replays the step kernel's recorded launch T times, each step writing its own slice of stacked
output tensors, and the backward replays the adjoint launch T times in reverse, each step's input
gradient accumulating straight into the gradient buffer of the previous step's output. No torch op or
autograd node runs per step.

Warp's gradient rules hold by construction: every step's outputs are a fresh slice (nothing a later
launch reads is overwritten), incoming gradients are copied into buffers the adjoint owns, and input
gradients accumulate into fresh zeros. The start state is validated before the launches and every state
a later step starts from after them, in one vectorised check: a rollout raises where the stepped loop
would (``ValueError`` naming the step, the field and the env).

A task whose step is not one kernel launch (it overrides ``_step``, e.g. a Newton task running a solver)
gets the same API and results by looping its own ``_step``, without the fusion's speed.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Mapping

import torch
from torch.autograd.function import once_differentiable

from diffgym.core import bridge
from diffgym.core.state import SimState

if TYPE_CHECKING:  # pragma: no cover
    from diffgym.core.sim import DiffSim


@dataclasses.dataclass(eq=False, frozen=True)
class RolloutOutput:
    """What :meth:`DiffSim.rollout` returns: every per-step field is time-major, ``(T, B, ...)``."""

    states: SimState
    """The state after each step, as one state whose fields are ``(T, B, ...)`` (``state_at(t)`` gives
    step ``t``'s batch-first state); float fields are differentiable. Its own ``batch_size`` reads the
    leading dimension, T: use :attr:`batch_size` here."""
    obs: torch.Tensor
    """(T, B, obs_dim) float32, differentiable."""
    reward: torch.Tensor
    """(T, B) float32, differentiable."""
    terminated: torch.Tensor
    """(T, B) bool."""
    truncated: torch.Tensor
    """(T, B) bool: the step reached ``max_episode_steps`` (a rollout never resets; steps past the horizon
    keep counting)."""
    success: torch.Tensor
    """(T, B) bool."""

    @property
    def horizon(self) -> int:
        return int(self.reward.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.reward.shape[1])

    def state_at(self, t: int) -> SimState:
        """The batch-first state after step ``t`` (negative ``t`` counts from the end)."""
        return type(self.states)(*(tensor[t] for tensor in self.states.tensors()))

    @property
    def final_state(self) -> SimState:
        return self.state_at(-1)


def _step_outputs(sim: DiffSim, horizon: int, batch: int, debug: bool) -> list[torch.Tensor]:
    """Fresh stacked outputs ``(T, *spec.shape)``, one per step-kernel output (sentinel-filled in the
    bridge's debug-outputs mode)."""
    return [bridge._allocate(bridge.Out((horizon, *spec.shape), spec.dtype), sim.device, debug)
            for spec in sim._step_specs(batch)]


class _FusedRollout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sim: DiffSim, n_state: int, *tensors: torch.Tensor):
        # tensors: the initial state's fields, the clipped actions (T, B, A), the physics tensors (B,)
        state, actions, physics = tensors[:n_state], tensors[n_state], tensors[n_state + 1:]
        horizon, batch = int(actions.shape[0]), int(actions.shape[1])
        debug = bridge.debug_outputs_enabled()
        stacked = _step_outputs(sim, horizon, batch, debug)
        plan = bridge._plan(sim.step_kernel, batch, (sim.params,), tuple(sim._step_specs(batch)),
                            (*state, actions[0], *physics))
        current = state
        for t in range(horizon):
            outputs = [out[t] for out in stacked]
            plan.launch_forward((*current, actions[t], *physics), (sim.params,), outputs)
            if debug:
                bridge._check_written(sim.step_kernel, outputs, n_state + 1 + len(physics) + 1)
            current = outputs[:n_state]
        ctx.sim, ctx.n_state, ctx.plan = sim, n_state, plan
        ctx.save_for_backward(*state, actions, *physics, *stacked)
        ctx.mark_non_differentiable(*(out for out in stacked if not out.is_floating_point()))
        return tuple(stacked)

    @staticmethod
    @once_differentiable  # the adjoint launches are not themselves differentiable: raise, not zeros
    def backward(ctx, *grad_stacked: torch.Tensor | None):
        n_state, plan, params = ctx.n_state, ctx.plan, (ctx.sim.params,)
        saved = ctx.saved_tensors
        state, actions = saved[:n_state], saved[n_state]
        n_physics = len(saved) - n_state - 1 - len(grad_stacked)
        physics = saved[n_state + 1:n_state + 1 + n_physics]
        stacked = saved[n_state + 1 + n_physics:]
        wants = ctx.needs_input_grad[2:]
        # Owned gradient buffers of the stacked outputs: the incoming gradient of each step's output, to
        # which the next step's adjoint adds its input gradient before this step's adjoint reads it.
        adj_stacked = [None if not out.is_floating_point()
                       else (g.contiguous().clone() if g is not None else torch.zeros_like(out))
                       for out, g in zip(stacked, grad_stacked)]
        adj_state = [torch.zeros_like(t) if t.is_floating_point() else None for t in state]
        adj_actions = torch.zeros_like(actions)
        adj_physics = [torch.zeros_like(p) for p in physics]
        horizon = int(actions.shape[0])
        for t in reversed(range(horizon)):
            if t == 0:
                inputs, adj_inputs = state, adj_state
            else:
                inputs = [out[t - 1] for out in stacked[:n_state]]
                adj_inputs = [None if adj is None else adj[t - 1] for adj in adj_stacked[:n_state]]
            outputs = [out[t] for out in stacked]
            adj_outputs = [None if adj is None else adj[t] for adj in adj_stacked]
            plan.launch_adjoint((*inputs, actions[t], *physics), params, outputs,
                                (*adj_inputs, adj_actions[t], *adj_physics), adj_outputs)
        grads = [*adj_state, adj_actions, *adj_physics]
        return (None, None, *(g if want else None for g, want in zip(grads, wants)))


def fused_rollout(sim: DiffSim, state: SimState, actions: torch.Tensor,
                  physics: Mapping[str, torch.Tensor] | None = None) -> RolloutOutput:
    """``T = actions.shape[0]`` steps of ``sim`` from ``state`` under ``actions`` ``(T, B, act_dim)``,
    equal (bit for bit) to ``sim.step`` in a loop without resets; see :meth:`DiffSim.rollout`."""
    sim.check_state(state)
    batch = state.batch_size
    expected = f"a torch.float32 tensor of shape (T, {batch}, {sim.act_dim}) on {sim.device} with T >= 1"
    if not isinstance(actions, torch.Tensor):
        raise TypeError(f"actions must be {expected}, got {type(actions).__name__}")
    if actions.dim() != 3 or actions.shape[1:] != (batch, sim.act_dim) or actions.shape[0] < 1:
        raise ValueError(f"actions must be {expected}, got shape {tuple(actions.shape)}")
    if actions.dtype != torch.float32 or actions.device != sim.device:
        raise ValueError(f"actions must be {expected}, got dtype {actions.dtype} on {actions.device}")
    finite = torch.isfinite(actions)
    if not bool(finite.all()):
        bad = [tuple(i) for i in (~finite).nonzero().tolist()[:8]]
        raise ValueError(f"actions contain NaN or Inf at (step, env, dim) {bad}; actions must be finite")
    physics_tensors = sim.check_physics(physics, batch)
    if not sim.steps_as_one_kernel:
        rollout = _looped_rollout(sim, state, actions.clamp(-1.0, 1.0), physics_tensors)
        _check_passed_states(sim, rollout.states)
        return rollout
    n_state = len(state.tensors())
    inputs = (*(t.contiguous() for t in state.tensors()), actions.clamp(-1.0, 1.0).contiguous(),
              *(p.contiguous() for p in physics_tensors))
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        stacked = _FusedRollout.apply(sim, n_state, *inputs)
    else:
        stacked = _FusedRollout.forward(_NoGradContext(), sim, n_state, *inputs)
    states = type(state)(*stacked[:n_state])
    obs, reward, terminated, success = stacked[n_state:]
    _check_passed_states(sim, states)
    truncated = states.step >= sim.max_episode_steps
    return RolloutOutput(states, obs, reward, terminated.bool(), truncated, success.bool())


def _check_passed_states(sim: DiffSim, states: SimState) -> None:
    """What the stepped loop's ``check_state`` would reject, checked at once: every state a later step
    starts from (all but the last) must be finite and inside the task's domain."""
    horizon = int(states.step.shape[0])
    if horizon < 2:
        return
    passed = type(states)(*(t[:-1].detach().reshape(-1, *t.shape[2:]) for t in states.tensors()))
    outside = sim.outside_domain(passed)
    if not bool(outside.any()):
        return
    batch = int(states.step.shape[1])
    flat = int(outside.nonzero()[0])
    t, env = divmod(flat, batch)
    try:
        sim.check_state(type(states)(*(x[t] for x in states.tensors())))
    except ValueError as error:
        raise ValueError(f"rollout step {t + 2} of {horizon} would start from an invalid state: {error}") from None


def _looped_rollout(sim: DiffSim, state: SimState, actions: torch.Tensor,
                    physics: tuple[torch.Tensor, ...]) -> RolloutOutput:
    """The same result for tasks whose step is not one kernel: ``_step`` in a loop, outputs stacked."""
    outs = []
    for action in actions:
        out = sim._step(state, action, physics)
        outs.append(out)
        state = out.state
    fields = zip(*(out.state.tensors() for out in outs))
    stack = lambda name: torch.stack([getattr(out, name) for out in outs])  # noqa: E731
    return RolloutOutput(type(state)(*(torch.stack(f) for f in fields)), stack("obs"), stack("reward"),
                         stack("terminated"), stack("truncated"), stack("success"))


class _NoGradContext:
    """Stands in for autograd's ``ctx`` when nothing needs a gradient (the forward alone runs)."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass

    def mark_non_differentiable(self, *tensors: torch.Tensor) -> None:
        pass
