"""Gradient checks for DiffGym tasks (and third-party tasks honouring the same contract), and the list of
tasks the repository's contract suites check (:func:`tasks_under_test`).

The sims run in float32, so finite differences use a step ``eps`` large enough to beat round-off and
compare with ``|fd - ad| <= atol + rtol * |ad|``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from diffgym.core.sim import DiffSim
from diffgym.core.state import SimState


def tasks_under_test() -> tuple[str, ...]:
    """The tasks the repository's contract suites (``tests/test_contract.py``, ``tests/test_states.py``) check:
    every registered DiffGym task, or, with ``DIFFGYM_TASKS="my_task:Mine/Task-v0,..."`` in the environment,
    those tasks of one's own (``docs/adding_a_task.md``)."""
    import diffgym

    chosen = [task.strip() for task in os.environ.get("DIFFGYM_TASKS", "").split(",") if task.strip()]
    return tuple(chosen) or diffgym.ALL_TASK_IDS


def float_fields(state: SimState) -> list[str]:
    return [n for n, t in zip(state.field_names(), state.tensors()) if t.is_floating_point()]


def rollout_objective(sim: DiffSim, state: SimState, actions: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A scalar touching every differentiable output of ``len(actions)`` chained steps: the summed
    rewards plus fixed random weightings of every observation and of the final state's float fields."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros((), device=sim.device)
    for action in actions:
        out = sim.step(state, action)
        w_obs = torch.randn(out.obs.shape, generator=gen).to(sim.device)
        total = total + out.reward.sum() + 0.1 * (w_obs * out.obs).sum()
        state = out.state
    for name in float_fields(state):
        field = getattr(state, name)
        total = total + 0.1 * (torch.randn(field.shape, generator=gen).to(sim.device) * field).sum()
    return total


@dataclass
class GradCheck:
    analytic: torch.Tensor
    numeric: torch.Tensor

    def max_violation(self, rtol: float, atol: float) -> float:
        """Largest ``|fd - ad| - (atol + rtol |ad|)``; <= 0 means the check passes."""
        slack = atol + rtol * self.analytic.abs()
        return float(((self.numeric - self.analytic).abs() - slack).max())

    def assert_close(self, rtol: float, atol: float, what: str = "gradient") -> None:
        excess = self.max_violation(rtol, atol)
        if excess > 0:
            err = (self.numeric - self.analytic).abs()
            i = int(err.argmax())
            raise AssertionError(
                f"{what}: finite differences disagree (worst entry {i}: analytic "
                f"{self.analytic.flatten()[i]:.6g}, numeric {self.numeric.flatten()[i]:.6g}; "
                f"rtol={rtol}, atol={atol})")


def _inputs(state: SimState, actions: torch.Tensor) -> list[torch.Tensor]:
    return [actions] + [getattr(state, n) for n in float_fields(state)]


def _with_inputs(state: SimState, values: Sequence[torch.Tensor]) -> tuple[SimState, torch.Tensor]:
    actions, *fields = values
    return state.replace(**dict(zip(float_fields(state), fields))), actions


def _flat(values: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in values])


def _unflat(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for t in like:
        out.append(flat[i:i + t.numel()].reshape(t.shape))
        i += t.numel()
    return out


def _analytic(objective: Callable, state: SimState, actions: torch.Tensor) -> tuple[torch.Tensor, list]:
    leaves = [t.detach().clone().requires_grad_(True) for t in _inputs(state, actions)]
    s, a = _with_inputs(state, leaves)
    value = objective(s, a)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return _flat(grads), [x.detach() for x in leaves]


def _evaluate(objective: Callable, state: SimState, flat: torch.Tensor, like: list) -> float:
    s, a = _with_inputs(state, _unflat(flat, like))
    with torch.no_grad():
        return float(objective(s, a))


def check_entrywise(sim: DiffSim, state: SimState, actions: torch.Tensor, eps: float = 1e-3) -> GradCheck:
    """Central differences on every entry of the actions ``(H, B, act_dim)`` and the float state fields."""
    objective = lambda s, a: rollout_objective(sim, s, a)  # noqa: E731
    analytic, like = _analytic(objective, state, actions)
    base = _flat(like)
    numeric = torch.empty_like(base)
    for i in range(base.numel()):
        plus, minus = base.clone(), base.clone()
        plus[i] += eps
        minus[i] -= eps
        numeric[i] = (_evaluate(objective, state, plus, like) - _evaluate(objective, state, minus, like)) / (2 * eps)
    return GradCheck(analytic.cpu(), numeric.cpu())


def check_directional(sim: DiffSim, state: SimState, actions: torch.Tensor, eps: float = 1e-3,
                      directions: int = 8, seed: int = 0) -> GradCheck:
    """Directional derivatives ``grad . u`` against central differences along random unit ``u``; scales
    to long chains (50+ steps) where entry-wise checks would take thousands of rollouts."""
    objective = lambda s, a: rollout_objective(sim, s, a)  # noqa: E731
    analytic, like = _analytic(objective, state, actions)
    base = _flat(like)
    gen = torch.Generator().manual_seed(seed)
    ad, fd = [], []
    for _ in range(directions):
        u = torch.randn(base.shape, generator=gen).to(base.device)
        u /= u.norm()
        ad.append(float(analytic @ u))
        fd.append((_evaluate(objective, state, base + eps * u, like)
                   - _evaluate(objective, state, base - eps * u, like)) / (2 * eps))
    return GradCheck(torch.tensor(ad), torch.tensor(fd))
