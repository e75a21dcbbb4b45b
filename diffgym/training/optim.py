"""The shared optimizer: Adam with the spec's settings, and one global gradient-norm clip."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from diffgym.training.spec import OptimizerSpec


def make_optimizer(params: Iterable[torch.nn.Parameter], spec: OptimizerSpec) -> torch.optim.Adam:
    """Adam over ``params`` with ``spec``'s learning rate, betas and epsilon."""
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
