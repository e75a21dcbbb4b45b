"""The shared optimizer: Adam with the spec's settings, and one global gradient-norm clip."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from diffgym.training.spec import OptimizerSpec


def make_optimizer(params: Iterable[torch.nn.Parameter], spec: OptimizerSpec) -> torch.optim.Adam:
    """Adam over ``params`` with ``spec``'s learning rate, betas and epsilon.

    torch's default per-tensor loop on the CPU; :func:`adam_step` steps it at about half the cost of its
    ``step()``, with the same bits."""
    return torch.optim.Adam(params, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps)


_PLAIN_ADAM = {"amsgrad": False, "maximize": False, "weight_decay": 0, "capturable": False, "differentiable": False,
               "fused": None, "foreach": None, "decoupled_weight_decay": False}
"""The settings of a :func:`make_optimizer` Adam group: what :func:`adam_step` implements."""


def _has_step_hooks(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` would run step hooks (the optimizer's or torch's global ones)."""
    from torch.optim import optimizer as optimizer_module

    return bool(getattr(optimizer, "_optimizer_step_pre_hooks", None)
                or getattr(optimizer, "_optimizer_step_post_hooks", None)
                or getattr(optimizer_module, "_global_optimizer_pre_hooks", None)
                or getattr(optimizer_module, "_global_optimizer_post_hooks", None))


@torch.no_grad()
def adam_step(optimizer: torch.optim.Adam) -> None:
    """``optimizer.step()`` of an Adam that :func:`make_optimizer` made, with the same arithmetic and state, bit
    for bit, at about half its cost on the CPU (a 64-64 MLP's step: ~75 instead of ~130 us, one thread).

    torch's per-tensor Adam (its CPU default) runs about eight tensor ops per parameter from Python behind
    its step wrapper; here each of them is one multi-tensor ``torch._foreach_*`` call over all parameters,
    which on the CPU loops over the very same per-tensor kernels in C++, so the bits do not change. (These
    are the calls of torch's own multi-tensor Adam, ``foreach=True``, without its regrouping of the tensors
    by device and dtype and its step wrapper, which cost about what the calls save: it was no faster.)
    Parameters without a gradient are left alone, as ``step`` does. An optimizer with step hooks (its own or
    torch's global ones, which only ``step()`` runs), other settings, several groups, or a parameter it has
    never stepped (whose state ``step`` creates) steps with ``optimizer.step()``."""
    plain = type(optimizer) is torch.optim.Adam and len(optimizer.param_groups) == 1
    (group,) = optimizer.param_groups if plain else (None,)
    params = [] if group is None else [p for p in group["params"] if p.grad is not None]
    states = [optimizer.state.get(p) for p in params]
    if (group is None or any(group.get(key, value) != value for key, value in _PLAIN_ADAM.items())
            or not all(states) or any(p.grad.is_sparse or p.is_complex() for p in params)
            or any(isinstance(value, torch.Tensor) for value in (group["lr"], group["eps"], *group["betas"]))
            or _has_step_hooks(optimizer)):
        optimizer.step()
        return
    if not params:
        return
    (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
    grads = [p.grad for p in params]
    exp_avgs = [state["exp_avg"] for state in states]
    exp_avg_sqs = [state["exp_avg_sq"] for state in states]
    steps = [state["step"] for state in states]
    torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    counts = [step.item() for step in steps]
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, [(1 - beta2 ** count) ** 0.5 for count in counts])
    torch._foreach_add_(denominators, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denominators, [-(lr / (1 - beta1 ** count)) for count in counts])


def clip_gradients(params: Iterable[torch.nn.Parameter], spec: OptimizerSpec) -> float:
    """Rescale gradients so their global L2 norm is at most ``spec.max_grad_norm``; return the norm
    *before* clipping (``inf``/NaN when a gradient is not finite). With ``max_grad_norm`` <= 0 or ``inf``
    the gradients are left unchanged and only the norm is returned."""
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return 0.0
    max_norm = spec.max_grad_norm if spec.max_grad_norm > 0 else math.inf
    if any(g.device != grads[0].device or g.dtype != grads[0].dtype or g.is_sparse for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    # torch's clip_grad_norm_ for gradients of one device and dtype, the same ops without its regrouping
    # of the tensors (called at every minibatch step of a trainer, where that is a fifth of the clip's cost)
    with torch.no_grad():
        total_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        torch._foreach_mul_(grads, torch.clamp(max_norm / (total_norm + 1e-6), max=1.0))
    return float(total_norm)


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: list[torch.nn.Parameter],
            spec: OptimizerSpec) -> bool:
    """One minibatch step: ``loss``'s gradient into ``params`` (their ``.grad`` replaced), the global clip,
    and the optimizer's step (:func:`adam_step`), skipped when the gradient is not finite (nothing then
    reaches the optimizer's moments). Returns whether it stepped."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward(inputs=params)
    if math.isfinite(clip_gradients(params, spec)):
        adam_step(optimizer)
        return True
    return False
