"""The shared optimizer: Adam with the spec's settings, and one global gradient-norm clip."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from diffgym.training.spec import OptimizerSpec


def make_optimizer(params: Iterable[torch.nn.Parameter], spec: OptimizerSpec) -> torch.optim.Adam:
    """Adam over ``params`` with ``spec``'s learning rate, betas and epsilon.

    torch's default per-tensor loop on the CPU: the multi-tensor path (``foreach=True``) gives the same
    bits there, but for these small networks it was no faster (a value-fit minibatch step, 64-64 MLP:
    ~250 us per Adam step either way, the multi-tensor path a few percent slower)."""
    return torch.optim.Adam(params, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps)


def clip_gradients(params: Iterable[torch.nn.Parameter], spec: OptimizerSpec) -> float:
    """Rescale gradients so their global L2 norm is at most ``spec.max_grad_norm``; return the norm
    *before* clipping (``inf``/NaN when a gradient is not finite). With ``max_grad_norm`` <= 0 or ``inf``
    the gradients are left unchanged and only the norm is returned."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    max_norm = spec.max_grad_norm if spec.max_grad_norm > 0 else math.inf
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: list[torch.nn.Parameter],
            spec: OptimizerSpec) -> bool:
    """One minibatch step: ``loss``'s gradient into ``params`` (their ``.grad`` replaced), the global clip,
    and the optimizer's step, skipped when the gradient is not finite (nothing then reaches the
    optimizer's moments). Returns whether it stepped."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward(inputs=params)
    if math.isfinite(clip_gradients(params, spec)):
        optimizer.step()
        return True
    return False
