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
gradients accumulate into fresh zeros.

This module knows kernels and tensors, not tasks: :meth:`diffgym.core.sim.DiffSim.rollout` validates the
start state and the actions, calls :func:`fused_step_launches` (or loops a task whose step is not one
kernel launch), and checks every state a later step starts from.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch.autograd.function import once_differentiable

from diffgym.core import bridge
from diffgym.core.state import SimState


@dataclasses.dataclass(eq=False, frozen=True)
class RolloutOutput:
    """What :meth:`~diffgym.core.sim.DiffSim.rollout` returns: every per-step field is time-major, ``(T, B, ...)``."""

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


def fused_step_launches(step_kernel: Any, params: tuple, step_specs: Sequence[bridge.Out],
                        state: Sequence[torch.Tensor], actions: torch.Tensor,
                        physics: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``T = actions.shape[0]`` launches of ``step_kernel(*state, action, *physics, *params, *outputs)``,
    each step starting from the previous one's next state, as one autograd node.

    ``step_specs`` are one step's output specs (the next state's fields first, one per tensor of
    ``state``); the result holds each output stacked over the steps, ``(T, *spec.shape)``. Differentiable
    in the float ``state`` tensors, ``actions`` (already clipped) and ``physics``."""
    n_state = len(state)
    inputs = (*(t.contiguous() for t in state), actions.contiguous(), *(p.contiguous() for p in physics))
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _FusedRollout.apply(step_kernel, params, tuple(step_specs), n_state, *inputs)
    return _FusedRollout.forward(_NoGradContext(), step_kernel, params, tuple(step_specs), n_state, *inputs)


class _FusedRollout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: Any, params: tuple, step_specs: tuple[bridge.Out, ...], n_state: int,
                *tensors: torch.Tensor):
        # tensors: the initial state's fields, the clipped actions (T, B, A), the physics tensors (B,)
        state, actions, physics = tensors[:n_state], tensors[n_state], tensors[n_state + 1:]
        horizon, batch = int(actions.shape[0]), int(actions.shape[1])
        debug = bridge.debug_outputs_enabled()
        # fresh stacked outputs, one per step-kernel output (sentinel-filled in debug mode)
        stacked = [bridge.allocate_output(bridge.Out((horizon, *spec.shape), spec.dtype), actions.device, debug)
                   for spec in step_specs]
        plan = bridge.launch_plan(kernel, batch, params, step_specs, (*state, actions[0], *physics))
        current = state
        for t in range(horizon):
            outputs = [out[t] for out in stacked]
            plan.launch_forward((*current, actions[t], *physics), params, outputs)
            if debug:
                bridge.check_written(kernel, outputs, n_state + 1 + len(physics) + len(params))
            current = outputs[:n_state]
        ctx.params, ctx.n_state, ctx.plan = params, n_state, plan
        ctx.save_for_backward(*state, actions, *physics, *stacked)
        ctx.mark_non_differentiable(*(out for out in stacked if not out.is_floating_point()))
        return tuple(stacked)

    @staticmethod
    @once_differentiable  # the adjoint launches are not themselves differentiable: raise, not zeros
    def backward(ctx, *grad_stacked: torch.Tensor | None):
        n_state, plan, params = ctx.n_state, ctx.plan, ctx.params
        saved = ctx.saved_tensors
        state, actions = saved[:n_state], saved[n_state]
        n_physics = len(saved) - n_state - 1 - len(grad_stacked)
        physics = saved[n_state + 1:n_state + 1 + n_physics]
        stacked = saved[n_state + 1 + n_physics:]
        wants = ctx.needs_input_grad[4:]
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
        return (None, None, None, None, *(g if want else None for g, want in zip(grads, wants)))


class _NoGradContext:
    """Stands in for autograd's ``ctx`` when nothing needs a gradient (the forward alone runs)."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass

    def mark_non_differentiable(self, *tensors: torch.Tensor) -> None:
        pass
