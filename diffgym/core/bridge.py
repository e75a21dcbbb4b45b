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

Debug mode (``DIFFGYM_DEBUG_OUTPUTS=1`` in the environment, or :func:`debug_outputs`): outputs are
filled with a sentinel (a NaN with a DiffGym payload for float32, the int32 minimum for int32) instead
of ``torch.empty``, and every launch checks that the kernel overwrote every element, raising
:class:`UnwrittenOutputError` naming the kernel and the argument otherwise. Without it an output a
kernel forgets to write comes back as whatever the allocator had in that memory.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, Sequence

import torch
import warp as wp


@dataclass(frozen=True)
class Out:
    """Shape and dtype of one kernel output, allocated fresh on every call."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32


# A quiet NaN whose payload no arithmetic produces (Warp and torch produce the canonical 0x7FC00000),
# so "still holds the sentinel" means "never written", not "computed NaN".
_FLOAT32_SENTINEL_BITS = 0x7FC0D1FF

_debug_outputs = os.environ.get("DIFFGYM_DEBUG_OUTPUTS", "") not in ("", "0")


class UnwrittenOutputError(RuntimeError):
    """Debug mode found an output element that a kernel launch did not write."""


def debug_outputs_enabled() -> bool:
    """Whether outputs are sentinel-filled and checked (see the module docstring)."""
    return _debug_outputs


@contextlib.contextmanager
def debug_outputs(enabled: bool = True) -> Iterator[None]:
    """Within the block, fill kernel outputs with sentinels and raise if a launch leaves any unwritten."""
    global _debug_outputs
    previous, _debug_outputs = _debug_outputs, enabled
    try:
        yield
    finally:
        _debug_outputs = previous


def _allocate(spec: Out, device: torch.device, debug: bool) -> torch.Tensor:
    if not debug:
        return torch.empty(spec.shape, dtype=spec.dtype, device=device)
    if spec.dtype == torch.float32:
        return torch.full(spec.shape, _FLOAT32_SENTINEL_BITS, dtype=torch.int32, device=device).view(torch.float32)
    if spec.dtype.is_floating_point:
        return torch.full(spec.shape, float("nan"), dtype=spec.dtype, device=device)
    return torch.full(spec.shape, torch.iinfo(spec.dtype).min, dtype=spec.dtype, device=device)


def _unwritten(tensor: torch.Tensor) -> torch.Tensor:
    """Per-element mask of sentinels left in a debug-mode output."""
    if tensor.dtype == torch.float32:
        return tensor.view(torch.int32) == _FLOAT32_SENTINEL_BITS
    if tensor.is_floating_point():
        return torch.isnan(tensor)
    return tensor == torch.iinfo(tensor.dtype).min


def _check_written(kernel, outputs: Sequence[torch.Tensor], first_output: int) -> None:
    args = kernel.adj.args
    for j, tensor in enumerate(outputs):
        mask = _unwritten(tensor)
        if bool(mask.any()):
            rows = mask.reshape(mask.shape[0], -1).any(dim=1) if mask.dim() else mask.reshape(1)
            bad = rows.nonzero().flatten().tolist()
            raise UnwrittenOutputError(
                f"kernel {kernel.key}: output argument {first_output + j} '{args[first_output + j].label}' was left "
                f"unwritten in {len(bad)} of {rows.numel()} rows (batch entries {bad[:8]}); a kernel must write every "
                f"output element on every path (DIFFGYM_DEBUG_OUTPUTS)")


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
        debug = _debug_outputs
        outputs = tuple(_allocate(s, device, debug) for s in out_specs)
        arg_types = [arg.type for arg in kernel.adj.args]
        n_in, n_params = len(inputs), len(params)
        wp_inputs = [_as_warp(t, arg_types[i]) for i, t in enumerate(inputs)]
        wp_outputs = [_as_warp(t, arg_types[n_in + n_params + j]) for j, t in enumerate(outputs)]
        with _stream_scope(device):
            wp.launch(kernel, dim=dim, inputs=wp_inputs + list(params), outputs=wp_outputs,
                      device=warp_device(device))
        if debug:
            _check_written(kernel, outputs, n_in + n_params)

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
