"""The Warp-to-PyTorch autograd bridge.

``warp_call`` launches one Warp kernel on torch tensors (zero-copy) and, when autograd asks, runs the
kernel's Warp-generated adjoint. Warp's gradient-ownership rules are honoured by construction:

* every call allocates fresh output tensors, so nothing recorded in a graph is ever overwritten;
* incoming output gradients are cloned into buffers the adjoint launch owns (Warp adjoints may
  accumulate into them), so autograd's tensors are never modified;
* input gradients are accumulated into freshly zeroed buffers and handed to autograd, which sums
  them with other uses of the same tensor. No ``wp.Tape`` is kept alive between calls.

Kernel calling convention: ``kernel(*inputs, *params, *outputs)`` where inputs and outputs are
arrays (torch tensors here; the Warp dtype comes from the kernel's annotation, so a ``(B, 2)`` tensor
feeds a ``wp.array(dtype=wp.vec2)``) and params are scalars or Warp structs that carry no gradient.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import torch
import warp as wp


@dataclass(frozen=True)
class Out:
    """Shape and dtype of one kernel output, allocated fresh on every call."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32


@lru_cache(maxsize=None)
def warp_device(device: torch.device):
    wp.init()  # idempotent; device lookups need the runtime
    return wp.device_from_torch(device)


def _stream_scope(device: torch.device):
    # Launch on torch's current stream so Warp kernels are ordered with the surrounding torch ops.
    if device.type == "cuda":
        return wp.ScopedStream(wp.stream_from_torch(device))
    return contextlib.nullcontext()


def _as_warp(tensor: torch.Tensor | None, arg_type: Any):
    if tensor is None:
        return None
    return wp.from_torch(tensor, dtype=arg_type.dtype, requires_grad=False, return_ctype=True)


def _zero_param(param: Any) -> Any:
    # Adjoint launches take an adjoint slot for every argument; params carry no gradient.
    return type(param)()


class _KernelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel, dim: int, params: tuple, out_specs: tuple[Out, ...], *inputs: torch.Tensor):
        device = inputs[0].device
        inputs = tuple(t.contiguous() for t in inputs)
        outputs = tuple(torch.empty(s.shape, dtype=s.dtype, device=device) for s in out_specs)
        arg_types = [arg.type for arg in kernel.adj.args]
        n_in, n_params = len(inputs), len(params)
        wp_inputs = [_as_warp(t, arg_types[i]) for i, t in enumerate(inputs)]
        wp_outputs = [_as_warp(t, arg_types[n_in + n_params + j]) for j, t in enumerate(outputs)]
        with _stream_scope(device):
            wp.launch(kernel, dim=dim, inputs=wp_inputs + list(params), outputs=wp_outputs,
                      device=warp_device(device))

        ctx.kernel, ctx.dim, ctx.params, ctx.n_in = kernel, dim, params, n_in
        ctx.save_for_backward(*inputs, *outputs)  # also guards against in-place edits before backward
        ctx.mark_non_differentiable(*(o for o in outputs if not o.is_floating_point()))
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor):
        saved = ctx.saved_tensors
        inputs, outputs = saved[: ctx.n_in], saved[ctx.n_in:]
        device = inputs[0].device
        wants = ctx.needs_input_grad[4:]
        adj_inputs = [torch.zeros_like(t) if want and t.is_floating_point() else None
                      for t, want in zip(inputs, wants)]
        adj_outputs = [g.contiguous().clone() if o.is_floating_point() and g is not None
                       else (torch.zeros_like(o) if o.is_floating_point() else None)
                       for o, g in zip(outputs, grad_outputs)]

        arg_types = [arg.type for arg in ctx.kernel.adj.args]
        n_in, n_params = ctx.n_in, len(ctx.params)
        out_types = arg_types[n_in + n_params:]
        with _stream_scope(device):
            wp.launch(
                ctx.kernel, dim=ctx.dim, device=warp_device(device), adjoint=True,
                inputs=[_as_warp(t, arg_types[i]) for i, t in enumerate(inputs)] + list(ctx.params),
                outputs=[_as_warp(t, out_types[j]) for j, t in enumerate(outputs)],
                adj_inputs=[_as_warp(g, arg_types[i]) for i, g in enumerate(adj_inputs)]
                + [_zero_param(p) for p in ctx.params],
                adj_outputs=[_as_warp(g, out_types[j]) for j, g in enumerate(adj_outputs)],
            )
        return (None, None, None, None, *adj_inputs)


def warp_call(kernel, dim: int, inputs: Sequence[torch.Tensor], params: Sequence[Any],
              outputs: Sequence[Out]) -> tuple[torch.Tensor, ...]:
    """Launch ``kernel(*inputs, *params, *outputs)`` over ``dim`` threads; differentiable in ``inputs``.

    Returns the freshly allocated outputs. Float outputs are differentiable; integer ones are not.
    """
    return _KernelFunction.apply(kernel, dim, tuple(params), tuple(outputs), *inputs)
