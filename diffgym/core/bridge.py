"""The Warp-to-PyTorch autograd bridge.

``warp_call`` launches one Warp kernel on torch tensors (zero-copy) and, when autograd asks, runs the
kernel's Warp-generated adjoint. Warp's gradient-ownership rules are honoured by construction:

* every call allocates fresh output tensors, so nothing recorded in a graph is ever overwritten;
* incoming output gradients are cloned into buffers the adjoint launch owns wherever the adjoint could
  write into them (a kernel that reads an output back, or passes it on, accumulates into its adjoint), so
  autograd's tensors are never modified; an output the kernel only stores to (``out[i] = value``, checked in
  its source: :func:`outputs_only_stored`) has an adjoint that is read and never written, and gets the
  gradient itself. An output no gradient reaches gets a null adjoint array, which Warp's adjoints read as
  zero;
* input gradients are accumulated into freshly zeroed buffers and handed to autograd, which sums
  them with other uses of the same tensor. No ``wp.Tape`` is kept alive between calls.

Per-call overhead is kept near Warp's launch floor: the first call of a kernel with a given launch dim,
device, input shapes/dtypes and output specs builds a :class:`LaunchPlan` (argument types looked up,
Warp array descriptors built and launch parameters packed, i.e. a recorded ``wp.Launch``); later calls
only write the tensors' data pointers into the recorded descriptors and replay the launch (on the CPU the
adjoint launch's arguments stay packed in the structs Warp's compiled adjoint reads, so a backward call does
not repack them: :class:`_PackedCpuAdjoint`). Calls that need no gradient (``torch.no_grad()`` or no input
requiring grad) skip the autograd function entirely. Only fresh tensors pass through a plan, so the
ownership rules above are unchanged.

Kernel calling convention: ``kernel(*inputs, *params, *outputs)`` where inputs and outputs are
arrays (torch tensors here; the Warp dtype comes from the kernel's annotation, so a ``(B, 2)`` tensor
feeds a ``wp.array(dtype=wp.vec2)``) and params are scalars or Warp structs that carry no gradient.

Debug mode (``DIFFGYM_DEBUG_OUTPUTS=1`` in the environment, or :func:`debug_outputs`): outputs are
filled with a sentinel (a NaN with a DiffGym payload for float32, the int32 minimum for int32) instead
of ``torch.empty``, with two rows of sentinels after each, and every launch checks that the kernel
overwrote every element and none past the end, raising :class:`UnwrittenOutputError` naming the kernel and
the argument otherwise. Without it an output a kernel forgets to write comes back as whatever the allocator
had in that memory, and a write past an output's end corrupts other memory. The mode is per thread. Every
kernel task class runs its first reset, observation, step and info extras in this mode
(:meth:`diffgym.core.sim.DiffSim.check_launches`; a Newton task's reset and observation).
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import inspect
import os
import textwrap
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterator, Sequence
from weakref import WeakKeyDictionary

import torch
import warp as wp

from diffgym.core.native import native_output_silenced

if not os.environ.get("DIFFGYM_WARP_VERBOSE"):
    wp.config.log_level = wp.LOG_WARNING  # Warp's per-module load messages would drown training logs


@dataclass(frozen=True)
class Out:
    """Shape and dtype of one kernel output, allocated fresh on every call."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32


# A quiet NaN whose payload no arithmetic produces (Warp and torch produce the canonical 0x7FC00000),
# so "still holds the sentinel" means "never written", not "computed NaN".
_FLOAT32_SENTINEL_BITS = 0x7FC0D1FF

class _DebugMode(threading.local):
    """Per thread, so one thread's :func:`debug_outputs` block (such as a task's first-use check) neither
    switches another's launches into debug mode nor, when blocks interleave, leaves the mode on."""

    enabled = os.environ.get("DIFFGYM_DEBUG_OUTPUTS", "") not in ("", "0")


_debug_mode = _DebugMode()


class UnwrittenOutputError(RuntimeError):
    """Debug mode found an output element that a kernel launch did not write, or a write past an output's
    end."""


def debug_outputs_enabled() -> bool:
    """Whether outputs are sentinel-filled and checked (see the module docstring)."""
    return _debug_mode.enabled


@contextlib.contextmanager
def debug_outputs(enabled: bool = True) -> Iterator[None]:
    """Within the block (in this thread), fill kernel outputs with sentinels and raise if a launch leaves
    any unwritten."""
    previous, _debug_mode.enabled = _debug_mode.enabled, enabled
    try:
        yield
    finally:
        _debug_mode.enabled = previous


_GUARD_ROWS = 2
"""Debug mode: sentinel rows allocated after each output, so a write past its end lands there, is found,
and corrupts nothing (a kernel writing ``obs[i, obs_dim]`` would otherwise write outside the tensor)."""


def allocate_output(spec: Out, device: torch.device, debug: bool) -> torch.Tensor:
    """A fresh output tensor for ``spec``: uninitialised, or sentinel-filled when ``debug`` (the value of
    :func:`debug_outputs_enabled` when the launch began, so one launch never mixes the two), followed in
    its storage by ``_GUARD_ROWS`` rows of sentinels (:func:`check_written` reads them)."""
    if not debug:
        return torch.empty(spec.shape, dtype=spec.dtype, device=device)
    if not spec.shape:
        return _sentinels((1,), spec.dtype, device)[0]
    return _sentinels((spec.shape[0] + _GUARD_ROWS, *spec.shape[1:]), spec.dtype, device)[:spec.shape[0]]


def _sentinels(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if dtype == torch.float32:
        return torch.full(shape, _FLOAT32_SENTINEL_BITS, dtype=torch.int32, device=device).view(torch.float32)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).min, dtype=dtype, device=device)


def _past_the_end(tensor: torch.Tensor) -> torch.Tensor | None:
    """The up to ``_GUARD_ROWS`` rows' worth of elements that follow a contiguous ``tensor`` in its storage:
    its guard rows, or, for one step of a stacked rollout output, the next step's rows (still sentinels
    when this step is checked). ``None`` where nothing follows."""
    if tensor.dim() == 0 or tensor.numel() == 0 or not tensor.is_contiguous():
        return None
    start = tensor.storage_offset() + tensor.numel()
    count = min(_GUARD_ROWS * tensor[0].numel(), tensor.untyped_storage().nbytes() // tensor.element_size() - start)
    if count <= 0:
        return None
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(tensor.untyped_storage(), start, (count,))


def _unwritten(tensor: torch.Tensor) -> torch.Tensor:
    """Per-element mask of sentinels left in a debug-mode output."""
    if tensor.dtype == torch.float32:
        return tensor.view(torch.int32) == _FLOAT32_SENTINEL_BITS
    if tensor.is_floating_point():
        return torch.isnan(tensor)
    return tensor == torch.iinfo(tensor.dtype).min


def check_written(kernel, outputs: Sequence[torch.Tensor], first_output: int) -> None:
    """Raise :class:`UnwrittenOutputError` if a debug-mode launch of ``kernel`` left a sentinel in
    ``outputs`` (its arguments from index ``first_output`` on), or wrote past the end of one."""
    args = kernel.adj.args
    for j, tensor in enumerate(outputs):
        beyond = _past_the_end(tensor)
        if beyond is not None and not bool(_unwritten(beyond).all()):
            raise UnwrittenOutputError(
                f"kernel {kernel.key}: output argument {first_output + j} '{args[first_output + j].label}' was written "
                f"past its end (shape {tuple(tensor.shape)}): a kernel writes only inside its outputs (for obs: "
                f"obs_dim columns) (DIFFGYM_DEBUG_OUTPUTS)")
        mask = _unwritten(tensor)
        if bool(mask.any()):
            rows = mask.reshape(mask.shape[0], -1).any(dim=1) if mask.dim() else mask.reshape(1)
            bad = rows.nonzero().flatten().tolist()
            raise UnwrittenOutputError(
                f"kernel {kernel.key}: output argument {first_output + j} '{args[first_output + j].label}' was left "
                f"unwritten in {len(bad)} of {rows.numel()} rows (batch entries {bad[:8]}); a kernel must write every "
                f"output element on every path (DIFFGYM_DEBUG_OUTPUTS)")


@lru_cache(maxsize=None)
def init_warp() -> None:
    """``wp.init()``, without Warp's native "Could not find or load the NVIDIA CUDA driver" warning on
    machines that have no CUDA driver at all (it prints on every process start and says nothing the user
    can act on). Where a driver is installed, or ``DIFFGYM_WARP_VERBOSE=1``, Warp prints what it prints.
    Idempotent; called when the bridge is imported, before any kernel module loads."""
    import ctypes.util

    if ctypes.util.find_library("cuda") is not None or os.environ.get("DIFFGYM_WARP_VERBOSE") == "1":
        wp.init()
        return
    with native_output_silenced():  # a failure still raises, with Warp's own error message
        wp.init()


init_warp()


def warp_device(device: torch.device):
    wp.init()  # idempotent; device lookups need the runtime
    return wp.device_from_torch(device)


def _warp_stream(device: torch.device):
    # Launch on torch's current stream so Warp kernels are ordered with the surrounding torch ops;
    # ``None`` on CPU (and the device's stream for a CUDA launch given none).
    if device.type == "cuda":
        return wp.stream_from_torch(device)
    return None


def _zero_param(param: Any) -> Any:
    # Adjoint launches take an adjoint slot for every argument; params carry no gradient.
    return type(param)()


class _ArgSlot:
    """One array argument of a recorded launch: the ``array_t`` the launch reads, whose data pointer is
    rewritten per call (shape and strides were fixed when the plan was built for this shape)."""

    __slots__ = ("index", "own", "real", "is_null")

    def __init__(self, index: int, own: Any):
        self.index = index  # position in the kernel's argument list
        self.own = own  # the array_t with this plan's shape and strides
        self.real = own  # where the launch reads it: ``own`` itself, or a view of a packed copy of it
        self.is_null = False  # adjoint slots switch to a null array when autograd wants no gradient


_PACKED_WARP_RELEASE = "1.19."
"""The Warp release :class:`_PackedCpuAdjoint` was written and tested against (constraints.txt pins it)."""


class _PackedCpuAdjoint:
    """A recorded CPU adjoint launch whose arguments stay packed between calls.

    ``Launch.launch`` on the CPU copies every argument into a fresh ctypes struct per call (two structs for
    an adjoint: the arguments and their adjoints, ~40 field copies for a contact task's step), most of a
    small adjoint launch's cost. Here the two structs are built once and the plan's slots are views into
    them, so a call writes only data pointers and calls the compiled adjoint, as ``Launch.launch`` would
    (same entry point, same argument values: the same gradients bit for bit). Only for launches Warp would
    run that way itself: CPU, one thread per block. A launch under a CPU graph capture raises, as
    ``Launch.launch`` does for a bridge launch (which keeps no Warp arrays to record), instead of running
    unrecorded."""

    def __init__(self, launch):
        self.launch = launch
        labels = [arg.label for arg in launch.kernel.adj.args]
        count = len(labels)
        # params[0] is the launch bounds, then the arguments, then their adjoints (Warp's layout)
        self.args = self._struct(labels, launch.params[1:1 + count])
        self.adj_args = self._struct(labels, launch.params[1 + count:1 + 2 * count])
        self.labels = labels
        self.bounds = ctypes.byref(launch.params[0])  # keeps the bounds struct alive with the reference
        self.entry = launch.hooks.backward

    @staticmethod
    def _struct(labels: Sequence[str], values: Sequence[Any]):
        struct_type = type("PackedArgs", (ctypes.Structure,), {"_fields_": [(label, type(value))
                                                                        for label, value in zip(labels, values)]})
        struct = struct_type()
        for label, value in zip(labels, values):
            setattr(struct, label, value)
        return struct

    @staticmethod
    def usable(launch, wp_device) -> bool:
        """Whether ``Launch.launch`` would run ``launch`` as one call of its compiled adjoint (CPU, one
        thread per block: no tiles), on the Warp release whose ``Launch`` layout this reads (``params[0]``
        the bounds, then the arguments, then their adjoints; ``hooks.backward``): under another release
        the launch goes through ``Launch.launch`` as before, rather than through a layout nobody checked."""
        return wp_device.is_cpu and launch.block_dim <= 1 and wp.config.version.startswith(_PACKED_WARP_RELEASE)

    def view(self, index: int, adjoint: bool):
        """The ``array_t`` of argument ``index`` inside the packed struct (writing its fields writes the struct)."""
        return getattr(self.adj_args if adjoint else self.args, self.labels[index])

    def set(self, index: int, value: Any, adjoint: bool) -> None:
        """Copy a packed value (a ctypes struct or scalar, as ``Launch.params`` holds) into argument ``index``."""
        setattr(self.adj_args if adjoint else self.args, self.labels[index], value)

    def copy_params(self, indices: Sequence[int]) -> None:
        """Copy the arguments at ``indices`` from the recorded launch (where the plan set them, converted)."""
        for index in indices:
            setattr(self.args, self.labels[index], self.launch.params[1 + index])

    def __call__(self, wp_device) -> None:
        if wp_device.is_capturing:
            raise RuntimeError(f"kernel {self.launch.kernel.key}: a bridge adjoint launch cannot be recorded in a "
                               "CPU graph capture (it keeps no Warp arrays to record)")
        self.entry(self.bounds, ctypes.byref(self.args), ctypes.byref(self.adj_args))


def outputs_only_stored(kernel, n_outputs: int) -> tuple[bool, ...]:
    """For each of the kernel's last ``n_outputs`` arguments (its outputs): whether its body only ever
    stores to it, as ``out[index] = value``. Warp's adjoint of such a store reads the output's adjoint and
    never writes it (``adj_array_store``, with the bridge's arrays carrying no ``grad`` of their own), so
    the incoming gradient can be handed to the adjoint launch as it is. Any other use (a read, ``+=``, an
    atomic, a component store ``out[i][0] = v``, passing the array to a function or another name, its
    ``shape``) may accumulate into that adjoint, and so does a kernel whose source cannot be read: False."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(kernel.func)))
    except (OSError, TypeError, SyntaxError):
        return (False,) * n_outputs
    function = next((node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)), None)
    if function is None:
        return (False,) * n_outputs
    names = [arg.arg for arg in function.args.args][-n_outputs:] if n_outputs else []
    parents = {child: parent for parent in ast.walk(function) for child in ast.iter_child_nodes(parent)}

    def only_stored(name: str) -> bool:
        for node in ast.walk(function):
            if isinstance(node, ast.Name) and node.id == name:
                subscript = parents.get(node)
                if not (isinstance(subscript, ast.Subscript) and subscript.value is node
                        and isinstance(subscript.ctx, ast.Store)
                        and isinstance(parents.get(subscript), ast.Assign) and subscript in parents[subscript].targets):
                    return False
        return True

    return tuple(only_stored(name) for name in names) if len(names) == n_outputs else (False,) * n_outputs


class LaunchPlan:
    """Recorded launches of one kernel for one combination of launch dim, device, input shapes/dtypes and
    output specs (the cache key). Built on the first call with that key: argument types are looked up,
    Warp arrays are described and the launch parameters packed once; later calls only write data pointers
    into the recorded ``array_t`` structs and replay ``wp.Launch``. The adjoint launch is recorded on the
    first backward. A lock keeps pointer-writing and launching atomic, since the plan is shared."""

    def __init__(self, kernel, dim: int, device: torch.device, inputs: Sequence[torch.Tensor],
                 params: Sequence[Any], outputs: Sequence[torch.Tensor]):
        self.kernel = kernel
        self.dim = dim
        self.device = device
        self.wp_device = warp_device(device)
        self.lock = threading.Lock()
        self.n_in, self.n_params = len(inputs), len(params)
        self.arg_types = [arg.type for arg in kernel.adj.args]
        self.out_first = self.n_in + self.n_params
        self.params = tuple(params)
        # Struct params are passed by their ctype, shared with the struct instance (so later edits of a
        # field are seen); scalars are re-packed on every call.
        self.param_is_struct = tuple(hasattr(p, "__ctype__") for p in params)
        self.forward = self._record(False, inputs, outputs)
        self.in_slots = self._own_slots(self.forward, range(self.n_in), inputs, adjoint=False)
        self.out_slots = self._own_slots(self.forward, range(self.out_first, self.out_first + len(outputs)),
                                         outputs, adjoint=False)
        # which inputs and outputs are floats (can carry gradients), looked up once, not on every call
        self.float_inputs = tuple(t.is_floating_point() for t in inputs)
        self.float_outputs = tuple(t.is_floating_point() for t in outputs)
        self.non_float_outputs = tuple(j for j, is_float in enumerate(self.float_outputs) if not is_float)
        # outputs whose incoming gradient the adjoint launch only reads: passed as they are, not cloned
        self.output_grads_read_only = outputs_only_stored(kernel, len(outputs))
        self.adjoint: Any = None  # recorded lazily by ``launch_adjoint``, with the slots below
        self.adjoint_packed: _PackedCpuAdjoint | None = None
        self.adj_fwd_slots: list[_ArgSlot] = []
        self.adj_grad_slots: list[_ArgSlot] = []  # the adjoints of the inputs, then of the outputs

    # ----------------------------------------------------------------------------- building
    def _warp(self, tensor: torch.Tensor, index: int):
        return wp.from_torch(tensor, dtype=self.arg_types[index].dtype, requires_grad=False)

    def _record(self, adjoint: bool, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]):
        """Record the (adjoint) launch on template tensors; adjoint arrays start as null (no gradient)."""
        out_first = self.out_first
        launch = wp.launch(
            self.kernel, dim=self.dim, device=self.wp_device, adjoint=adjoint, record_cmd=True,
            inputs=[self._warp(t, i) for i, t in enumerate(inputs)] + list(self.params),
            outputs=[self._warp(t, out_first + j) for j, t in enumerate(outputs)],
            adj_inputs=[None] * len(inputs) + [_zero_param(p) for p in self.params] if adjoint else [],
            adj_outputs=[None] * len(outputs) if adjoint else [],
        )
        # The recorded launch retains the first call's Warp arrays (for CPU graph capture); drop them so a
        # plan does not keep that call's tensors alive. Capturing a bridge launch then fails loudly.
        launch.fwd_args = None
        launch.adj_args = None
        return launch

    @staticmethod
    def _own_slots(launch, indices: Sequence[int], templates: Sequence[torch.Tensor], adjoint: bool) -> list[_ArgSlot]:
        """Give each array argument at ``indices`` an ``array_t`` of its template's shape that the plan owns.

        Forward slots are installed at once; adjoint slots stay null until a call passes a gradient."""
        slots = []
        for index, tensor in zip(indices, templates):
            arg_type = launch.kernel.adj.args[index].type
            real = wp.from_torch(tensor, dtype=arg_type.dtype, requires_grad=False, return_ctype=True)
            slot = _ArgSlot(index, real)
            if adjoint:
                slot.is_null = True
            else:
                launch.set_param_at_index_from_ctype(index, real)
            slots.append(slot)
        return slots

    # ----------------------------------------------------------------------------- replay
    def _set_params(self, launch, params: Sequence[Any]) -> None:
        for j, (p, is_struct) in enumerate(zip(params, self.param_is_struct)):
            if is_struct:
                launch.set_param_at_index_from_ctype(self.n_in + j, p.__ctype__())
            else:
                launch.set_param_at_index(self.n_in + j, p)

    def launch_forward(self, inputs: Sequence[torch.Tensor], params: Sequence[Any],
                       outputs: Sequence[torch.Tensor]) -> None:
        with self.lock:
            for slot, tensor in zip(self.in_slots, inputs):
                slot.real.data = tensor.data_ptr()
            for slot, tensor in zip(self.out_slots, outputs):
                slot.real.data = tensor.data_ptr()
            self._set_params(self.forward, params)
            self.forward.launch(_warp_stream(self.device))

    def launch_adjoint(self, inputs: Sequence[torch.Tensor], params: Sequence[Any],
                       outputs: Sequence[torch.Tensor], adj_inputs: Sequence[torch.Tensor | None],
                       adj_outputs: Sequence[torch.Tensor | None]) -> None:
        with self.lock:
            if self.adjoint is None:
                self._record_adjoint(inputs, outputs)
            packed = self.adjoint_packed
            for slot, tensor in zip(self.adj_fwd_slots, (*inputs, *outputs)):
                slot.real.data = tensor.data_ptr()
            for slot, grad in zip(self.adj_grad_slots, (*adj_inputs, *adj_outputs)):
                if grad is None:
                    if not slot.is_null:  # no gradient wanted: a null array, as Warp gets for ``None``
                        self._set_adjoint_array(slot, type(slot.own)())
                        slot.is_null = True
                else:
                    if slot.is_null:
                        self._set_adjoint_array(slot, slot.own)
                        slot.is_null = False
                    slot.real.data = grad.data_ptr()
            self._set_params(self.adjoint, params)
            if packed is None:
                self.adjoint.launch(_warp_stream(self.device))
            else:
                packed.copy_params(range(self.n_in, self.out_first))
                packed(self.wp_device)

    def _record_adjoint(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
        """Record the adjoint launch and give the plan its slots; on the CPU the slots of the forward
        arguments become views into the packed arguments (:class:`_PackedCpuAdjoint`)."""
        launch = self._record(True, inputs, outputs)
        out_indices = range(self.out_first, len(self.arg_types))
        self.adj_fwd_slots = (self._own_slots(launch, range(self.n_in), inputs, adjoint=False)
                              + self._own_slots(launch, out_indices, outputs, adjoint=False))
        # a gradient has its tensor's shape, so the forward tensors describe the adjoint arrays
        self.adj_grad_slots = (self._own_slots(launch, range(self.n_in), inputs, adjoint=True)
                               + self._own_slots(launch, out_indices, outputs, adjoint=True))
        if _PackedCpuAdjoint.usable(launch, self.wp_device):
            self.adjoint_packed = packed = _PackedCpuAdjoint(launch)
            # written per call through views into the packed arguments, which hold copies of the slots' arrays
            for slot in self.adj_fwd_slots:
                slot.real = packed.view(slot.index, adjoint=False)
            for slot in self.adj_grad_slots:
                slot.real = packed.view(slot.index, adjoint=True)
        self.adjoint = launch

    def _set_adjoint_array(self, slot: _ArgSlot, array: Any) -> None:
        """Install ``array`` (the slot's own ``array_t``, or a null one for no gradient) as the adjoint of
        argument ``slot.index``; a packed argument gets a copy, which ``slot.real`` views."""
        if self.adjoint_packed is None:
            self.adjoint.set_param_at_index_from_ctype(slot.index, array, adjoint=True)
        else:
            self.adjoint_packed.set(slot.index, array, adjoint=True)


_PLANS_PER_KERNEL = 64  # distinct shapes per kernel kept; beyond that the kernel's plans are rebuilt
_plans: WeakKeyDictionary[Any, dict[tuple, LaunchPlan]] = WeakKeyDictionary()


def launch_plan(kernel, dim: int, params: Sequence[Any], out_specs: tuple[Out, ...],
                inputs: Sequence[torch.Tensor]) -> LaunchPlan:
    """The cached plan for this call's key, built on first use (see :class:`LaunchPlan`)."""
    device = inputs[0].device
    # Out is public and its shape may be given as a list: key on tuples
    key = (dim, device, tuple((tuple(o.shape), o.dtype) for o in out_specs), *[(t.shape, t.dtype) for t in inputs])
    plans = _plans.get(kernel)
    if plans is None:
        plans = _plans[kernel] = {}
    plan = plans.get(key)
    if plan is None:
        if len(plans) >= _PLANS_PER_KERNEL:
            plans.clear()
        # the first call's own tensors only describe shapes here; nothing is launched on them
        outputs = [torch.empty(s.shape, dtype=s.dtype, device=device) for s in out_specs]
        plan = plans[key] = LaunchPlan(kernel, dim, device, inputs, params, outputs)
    return plan


def _launch(kernel, dim: int, params: tuple, out_specs: tuple[Out, ...],
            inputs: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], LaunchPlan]:
    """Allocate fresh outputs and run the forward kernel (no autograd bookkeeping); the outputs and the
    plan that launched them."""
    device = inputs[0].device
    debug = _debug_mode.enabled
    outputs = tuple(allocate_output(s, device, debug) for s in out_specs)
    plan = launch_plan(kernel, dim, params, out_specs, inputs)
    plan.launch_forward(inputs, params, outputs)
    if debug:
        check_written(kernel, outputs, len(inputs) + len(params))
    return outputs, plan


def _owned_copy(grad: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``grad`` that nothing else holds: ``contiguous()`` itself when it had to copy (an
    expanded gradient, such as a sum's), else a clone."""
    contiguous = grad.contiguous()
    return contiguous.clone() if contiguous is grad else contiguous


class _KernelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel, dim: int, params: tuple, out_specs: tuple[Out, ...], *inputs: torch.Tensor):
        outputs, plan = _launch(kernel, dim, params, out_specs, inputs)
        # the backward replays this plan's adjoint: kept here, its key (every input's shape) is not rebuilt
        ctx.params, ctx.plan, ctx.n_in = params, plan, len(inputs)
        ctx.save_for_backward(*inputs, *outputs)  # also guards against in-place edits before backward
        ctx.mark_non_differentiable(*[outputs[j] for j in plan.non_float_outputs])
        # an output no gradient reaches (often the observation) comes to backward as None, not as zeros
        ctx.set_materialize_grads(False)
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable  # an adjoint launch is not differentiable: raise, not zeros
    def backward(ctx, *grad_outputs: torch.Tensor):
        saved = ctx.saved_tensors
        inputs, outputs = saved[: ctx.n_in], saved[ctx.n_in:]
        wants = ctx.needs_input_grad[4:]
        # fresh buffers for the inputs: Warp adjoints accumulate into them. An output's gradient is cloned
        # where the adjoint may write into it (autograd's grads must stay untouched), passed as it is where
        # the kernel only stores to that output; one without a gradient gets a null adjoint array, which
        # Warp's adjoints read as zeros (no buffer to allocate, zero and pass)
        plan = ctx.plan
        adj_inputs = [torch.zeros_like(t) if want and is_float else None
                      for t, want, is_float in zip(inputs, wants, plan.float_inputs)]
        adj_outputs = [None if g is None or not is_float else g.contiguous() if read_only else _owned_copy(g)
                       for g, is_float, read_only in zip(grad_outputs, plan.float_outputs,
                                                         plan.output_grads_read_only)]
        plan.launch_adjoint(inputs, ctx.params, outputs, adj_inputs, adj_outputs)
        return (None, None, None, None, *adj_inputs)


def warp_call(kernel, dim: int, inputs: Sequence[torch.Tensor], params: Sequence[Any],
              outputs: Sequence[Out]) -> tuple[torch.Tensor, ...]:
    """Launch ``kernel(*inputs, *params, *outputs)`` over ``dim`` threads; differentiable in ``inputs``.

    Returns the freshly allocated outputs. Float outputs are differentiable; integer ones are not.
    """
    inputs = tuple(t.contiguous() for t in inputs)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _KernelFunction.apply(kernel, dim, tuple(params), tuple(outputs), *inputs)
    # nothing to differentiate: the same launch without the autograd function's cost
    return _launch(kernel, dim, tuple(params), tuple(outputs), inputs)[0]


def record_launch(kernel, dim: int, inputs: Sequence[torch.Tensor], params: Sequence[Any],
                  outputs: Sequence[torch.Tensor]):
    """A ``wp.Launch`` of ``kernel(*inputs, *params, *outputs)`` bound to these very tensors, for callers
    that own persistent buffers (the envs' fast step path): replaying it rewrites ``outputs`` in place,
    so it must never be used on tensors that autograd saved or a caller holds."""
    device = inputs[0].device
    arg_types = [arg.type for arg in kernel.adj.args]
    first_out = len(inputs) + len(params)
    return wp.launch(
        kernel, dim=dim, device=warp_device(device), record_cmd=True,
        inputs=[wp.from_torch(t, dtype=arg_types[i].dtype, requires_grad=False) for i, t in enumerate(inputs)]
        + list(params),
        outputs=[wp.from_torch(t, dtype=arg_types[first_out + j].dtype, requires_grad=False)
                 for j, t in enumerate(outputs)],
    )


class Replay:
    """The launches ``record()`` makes, run again on the same arrays at each call.

    On the CPU they are captured once as a Warp graph that ``wp.capture_launch`` replays in one call into
    Warp's C++, instead of a launch each through Python, whose argument packing is most of a small kernel's
    cost (a FrankaReach step and its info kernel: ~3 us replayed against ~20 us launched; a Newton control
    step's ~450 launches: ~25 us each; docs/benchmarks.md). The capture records without running, so
    ``record`` must not read back what it computes, and a replay reads the arrays' current contents, like
    the launches. Warp's CPU capture is process-global: a Warp CPU launch from another thread during the
    capture would be recorded instead of run. With ``capture`` false (where the caller's launches cannot be
    captured) ``record()`` itself runs at every call: the same launches in the same order, from Python."""

    def __init__(self, device: Any, record: Callable[[], Any], capture: bool = True):
        self._record = record
        self._graph = None
        if capture:
            with wp.ScopedCapture(device=device) as capture:
                record()
            self._graph = capture.graph

    def __call__(self) -> None:
        if self._graph is None:
            self._record()
        else:
            wp.capture_launch(self._graph)
