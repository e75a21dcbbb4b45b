"""The task contract, checked once when a :class:`~diffgym.core.sim.DiffSim` subclass is defined.

The bridge passes kernel arguments by position, so a task whose kernel lists two same-dtype state
fields in another order than its state dataclass, or forgets to write an output, would run and return
wrong numbers. This module reads each kernel's argument names and Warp types and rejects such a task
with one line naming the sim, the kernel, the argument and what was expected. The rule, which every
task in ``diffgym/envs`` follows (``F = f_1, ..., f_n, step`` are the state's fields in order):

* ``reset_kernel(seed, episode, <params>, # outputs: f_1, ..., f_n, step)``
* ``observe_kernel(f_1, ..., f_n, step, <params>, # outputs: obs)``
* ``step_kernel(f_1, ..., f_n, step, action, q_1, ..., q_m, <params>,
  # outputs: f_1_next, ..., f_n_next, step_next, obs, reward, terminated, success)``

``<params>`` is one ``wp.struct`` (any name, the same struct type in all three kernels).
``q_1, ..., q_m`` are the task's ``physical_params`` (none by default): per-env, differentiable physical
parameters, each a ``wp.array(dtype=float)`` named after a float field of ``<params>`` that holds its
default value. The step kernel reads ``q[i]``, never ``<params>.q`` (which would ignore the per-env
value and give it a zero gradient). A state field
is a 1-D ``wp.array`` whose dtype carries the per-env shape: ``float`` is ``()``, ``wp.vec2`` is
``(2,)``, a ``(3, 3)`` matrix is ``(3, 3)``; ``step`` is ``wp.array(dtype=wp.int32)`` and every other
field is float32-based. The per-env shapes are derived from these types (the state dataclass does not
repeat them). ``obs`` is a float ``wp.array2d``, ``reward`` a float array, ``terminated`` and
``success`` int32 arrays, ``seed`` and ``episode`` int32 arrays, ``action`` a float ``wp.array2d`` or a
1-D array of a length-``act_dim`` float vector. Every output must be written in the kernel body (as
``out[i] = ...`` or by passing it to a ``@wp.func``); outputs written only on some paths are caught at
run time by the debug mode of :mod:`diffgym.core.bridge`.
"""

from __future__ import annotations

import ast
import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any

import torch
import warp as wp

from diffgym.core.state import SimState


class TaskContractError(TypeError):
    """A task's state, kernels or constants break the calling convention the bridge relies on."""


@dataclass(frozen=True)
class FieldSpec:
    """Per-env shape and torch dtype of one state field, read off the kernels' Warp annotations."""

    shape: tuple[int, ...]
    dtype: torch.dtype


# What a fixed (non-field) argument must be: (array ndim, Warp scalar type, description for errors)
_INT32_ARRAY = (1, wp.int32, "wp.array(dtype=wp.int32)")
_FLOAT_ARRAY = (1, wp.float32, "wp.array(dtype=float)")
_FLOAT_ARRAY2D = (2, wp.float32, "wp.array2d(dtype=float)")
_PARAMS = "<params>"  # placeholder for the wp.struct argument, whose name is free


@dataclass(frozen=True)
class _Slot:
    """One expected kernel argument."""

    name: str
    field: str | None = None  # the state field this argument carries, if any
    kind: tuple[int, Any, str] | None = None  # for fixed arguments


KERNEL_TASK_PARTS = ("state_type", "reset_kernel", "observe_kernel", "step_kernel")
"""What a kernel task class defines; a class without all of them is an intermediate one (not checked, not
buildable)."""
NEWTON_TASK_PARTS = ("state_type", "reset_kernel", "observe_kernel", "control_kernel", "outcome_kernel")
"""What a Newton task class defines (:func:`check_newton_sim_class`)."""


def check_sim_class(sim: type) -> dict[str, FieldSpec] | None:
    """Check a kernel task ``sim`` (a :class:`~diffgym.core.sim.DiffSim` subclass) against the task
    contract; return the derived per-field specs.

    Returns ``None`` for an intermediate class that does not yet name its state type and all three
    kernels (it is checked when a subclass completes it). Raises :class:`TaskContractError`.
    """
    if any(getattr(sim, name, None) is None for name in KERNEL_TASK_PARTS):
        return None
    fields = _check_state_type(sim, sim.state_type)
    _check_dimensions(sim)
    physical = _check_physical_params(sim, fields)
    state_slots = [_Slot(f, field=f) for f in fields]
    layouts = {
        **_reset_and_observe_layouts(state_slots),
        "step_kernel": [*state_slots, _Slot("action"), *(_Slot(q, kind=_FLOAT_ARRAY) for q in physical),
                        _Slot(_PARAMS), *_next_state_and_outcome_slots(fields)],
    }
    first_output = {"reset_kernel": 3, "observe_kernel": len(fields) + 1,
                    "step_kernel": len(fields) + 2 + len(physical)}
    return _check_kernels(sim, fields, layouts, first_output, physical)


INFO_PREFIX = "info_"
"""An info kernel's outputs are named ``info_<key>``; ``<key>`` is the ``info`` entry each one fills."""


def check_info_kernel(sim: type, specs: dict[str, FieldSpec]) -> dict[str, tuple[int, ...]]:
    """Check ``sim.info_kernel`` (optional) and return the per-env shape of each ``info`` extra it writes.

    ``info_kernel(f_1, ..., f_n, step, obs, reward, <params>, # outputs: info_<key_1>, ..., info_<key_m>)``
    computes the task's ``info`` extras from a step's next state, observation and reward; each output is a
    1-D ``wp.array`` whose float dtype carries the per-env shape, as a state field's (``float``: a number,
    ``wp.vec3``: three). ``specs`` are the state's field specs from the task's other kernels, which the
    info kernel's state arguments must match.
    """
    kernel = sim.info_kernel
    fields = tuple(specs)
    inputs = [*(_Slot(f, field=f) for f in fields), _Slot("obs", kind=_FLOAT_ARRAY2D),
              _Slot("reward", kind=_FLOAT_ARRAY), _Slot(_PARAMS)]
    outputs = [a.label for a in (getattr(getattr(kernel, "adj", None), "args", None) or [])[len(inputs):]]
    if not outputs or any(not o.startswith(INFO_PREFIX) or o == INFO_PREFIX for o in outputs):
        raise TaskContractError(f"{sim.__name__}.info_kernel ({getattr(kernel, 'key', kernel)!r}) must write one "
                                f"or more outputs named '{INFO_PREFIX}<key>' after its wp.struct argument (inputs: "
                                f"{', '.join(s.name for s in inputs)}), got outputs {outputs}")
    # outputs are checked like state fields (a 1-D float array whose dtype carries the per-env shape)
    found = _check_kernels(sim, fields, {"info_kernel": [*inputs, *(_Slot(o, field=o) for o in outputs)]},
                           {"info_kernel": len(inputs)}, ())
    for f in fields:
        if found[f] != specs[f]:
            raise TaskContractError(f"{sim.__name__}.info_kernel gives state field {f} the per-env shape "
                                    f"{found[f].shape}, but the step kernel gives {specs[f].shape}")
    return {o[len(INFO_PREFIX):]: found[o].shape for o in outputs}


NEWTON_JOINT_ARGS = ("joint_q", "joint_qd")
"""The outcome kernel's arguments that carry the articulation's joint state after the dynamics."""


def check_newton_sim_class(sim: type) -> dict[str, FieldSpec] | None:
    """Check a Newton task (:class:`~diffgym.core.newton_task.NewtonSim`) against its contract; return the
    derived per-field specs (``None`` for an intermediate class without its state type and kernels).

    A Newton task's step is ``control_kernel`` (state and action to joint torques), the Newton model
    advanced by the solver, then ``outcome_kernel`` (state and the new joint state to the next state and
    the step's outputs). With ``F = f_1, ..., f_n, step`` its state's fields in order:

    * ``reset_kernel`` and ``observe_kernel``: as for kernel tasks;
    * ``control_kernel(f_1, ..., f_n, step, action, <params>, # outputs: joint_f)``;
    * ``outcome_kernel(f_1, ..., f_n, step, joint_q, joint_qd, <params>,
      # outputs: f_1_next, ..., f_n_next, step_next, obs, reward, terminated, success)``;

    ``joint_f``, ``joint_q`` and ``joint_qd`` are flat ``wp.array(dtype=float)`` of ``dofs_per_env`` entries
    per env (env ``i``'s at ``[i * dofs_per_env, (i + 1) * dofs_per_env)``), Newton's own layout. The class
    also declares ``dofs_per_env`` and ``substeps`` (positive ints), ``joint_fields`` (the names of the
    state fields holding joint positions and velocities, each of per-env shape ``(dofs_per_env,)``) and
    overrides ``build_model``. Per-env physical parameters are not supported (the model's are shared).
    """
    if any(getattr(sim, name, None) is None for name in NEWTON_TASK_PARTS):
        return None
    fields = _check_state_type(sim, sim.state_type)
    _check_dimensions(sim, extra=("dofs_per_env", "substeps"))
    if getattr(sim, "physical_params", ()) != ():
        raise TaskContractError(f"{sim.__name__}.physical_params must be empty: a Newton task's physical "
                                f"parameters live in its shared Newton model, got {sim.physical_params!r}")
    joint_fields = getattr(sim, "joint_fields", None)
    if (not isinstance(joint_fields, tuple) or len(joint_fields) != 2
            or not all(isinstance(f, str) and f in fields and f != "step" for f in joint_fields)):
        raise TaskContractError(f"{sim.__name__}.joint_fields must name the two float state fields holding joint "
                                f"positions and velocities (fields: {fields}), got {joint_fields!r}")
    build_model = getattr(sim, "build_model", None)
    if build_model is None or getattr(build_model, "__isabstractmethod__", False):
        raise TaskContractError(f"{sim.__name__} must override build_model(num_envs, device) -> newton.Model")
    state_slots = [_Slot(f, field=f) for f in fields]
    layouts = {
        **_reset_and_observe_layouts(state_slots),
        "control_kernel": [*state_slots, _Slot("action"), _Slot(_PARAMS), _Slot("joint_f", kind=_FLOAT_ARRAY)],
        "outcome_kernel": [*state_slots, *(_Slot(a, kind=_FLOAT_ARRAY) for a in NEWTON_JOINT_ARGS),
                           _Slot(_PARAMS), *_next_state_and_outcome_slots(fields)],
    }
    first_output = {"reset_kernel": 3, "observe_kernel": len(fields) + 1, "control_kernel": len(fields) + 2,
                    "outcome_kernel": len(fields) + 3}
    specs = _check_kernels(sim, fields, layouts, first_output, ())
    for name in joint_fields:
        if specs[name].shape != (sim.dofs_per_env,):
            raise TaskContractError(f"{sim.__name__}: joint field '{name}' has per-env shape {specs[name].shape}, "
                                    f"expected ({sim.dofs_per_env},) (dofs_per_env)")
    return specs


def _check_dimensions(sim: type, extra: tuple[str, ...] = ()) -> None:
    for name in ("obs_dim", "act_dim", "default_max_episode_steps", *extra):
        value = getattr(sim, name, None)
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
            raise TaskContractError(f"{sim.__name__}.{name} must be a positive int, got {value!r}")


def _reset_and_observe_layouts(state_slots: list[_Slot]) -> dict[str, list[_Slot]]:
    return {
        "reset_kernel": [_Slot("seed", kind=_INT32_ARRAY), _Slot("episode", kind=_INT32_ARRAY), _Slot(_PARAMS),
                         *state_slots],
        "observe_kernel": [*state_slots, _Slot(_PARAMS), _Slot("obs", kind=_FLOAT_ARRAY2D)],
    }


def _next_state_and_outcome_slots(fields: tuple[str, ...]) -> list[_Slot]:
    return [*(_Slot(f"{f}_next", field=f) for f in fields), _Slot("obs", kind=_FLOAT_ARRAY2D),
            _Slot("reward", kind=_FLOAT_ARRAY), _Slot("terminated", kind=_INT32_ARRAY),
            _Slot("success", kind=_INT32_ARRAY)]


def _check_kernels(sim: type, fields: tuple[str, ...], layouts: dict[str, list[_Slot]],
                   first_output: dict[str, int], physical: tuple[str, ...]) -> dict[str, FieldSpec]:
    """Check every kernel named in ``layouts`` argument by argument; derive and cross-check field specs."""
    state_type = sim.state_type
    specs: dict[str, FieldSpec] = {}
    origin: dict[str, str] = {}  # the kernel that first gave each field its spec, for errors
    params_type: tuple[str, Any] | None = None
    for attr, slots in layouts.items():
        kernel = getattr(sim, attr)
        where = f"{sim.__name__}.{attr} ({getattr(kernel, 'key', kernel)!r})"
        args = getattr(getattr(kernel, "adj", None), "args", None)
        if args is None:
            raise TaskContractError(f"{where} must be a @wp.kernel, got {type(kernel).__name__}")
        expected = ", ".join(s.name for s in slots)
        for k, slot in enumerate(slots):
            if k >= len(args):
                raise TaskContractError(f"{where} has {len(args)} arguments; argument {k} '{slot.name}' is missing "
                                        f"(expected: {expected})")
            arg = args[k]
            if slot.name == _PARAMS:
                if not wp.types.type_is_struct(arg.type):
                    raise TaskContractError(f"{where} argument {k} '{arg.label}' must be the task's wp.struct of "
                                            f"constants, got {wp.types.type_repr(arg.type)} (expected: {expected})")
                if params_type is not None and arg.type is not params_type[1]:
                    raise TaskContractError(f"{where} argument {k} '{arg.label}' is a {arg.type.key}, but "
                                            f"{params_type[0]} takes a {params_type[1].key}; all "
                                            f"{len(layouts)} kernels take the same wp.struct")
                params_type = params_type or (attr, arg.type)
                continue
            if arg.label != slot.name:
                order = (f"{sim.__name__}.physical_params {physical} follow 'action'" if slot.name in physical
                         else f"arguments follow {state_type.__name__}'s field order")
                raise TaskContractError(f"{where} argument {k} is named '{arg.label}', expected '{slot.name}' "
                                        f"({order}: {expected})")
            if slot.field is not None:
                spec = _field_spec(where, k, arg, slot.field)
                first = origin.setdefault(slot.field, attr)
                if specs.setdefault(slot.field, spec) != spec:
                    raise TaskContractError(f"{where} argument {k} '{arg.label}' has per-env shape {spec.shape} "
                                            f"({wp.types.type_repr(arg.type)}), but {first} gives {slot.field} "
                                            f"the shape {specs[slot.field].shape}; the kernels must agree")
            elif slot.name == "action":
                _check_action(where, k, arg, sim.act_dim)
            else:
                _check_fixed(where, k, arg, slot.kind)
        if len(args) > len(slots):
            raise TaskContractError(f"{where} has an unexpected argument {len(slots)} '{args[len(slots)].label}' "
                                    f"(expected: {expected})")
        _check_outputs_written(where, kernel, [a.label for a in args[first_output[attr]:]])
        if attr == "step_kernel" and physical:
            struct_arg = args[len(fields) + 1 + len(physical)]
            _check_physical_defaults(where, struct_arg, physical)
            _check_no_shared_reads(where, kernel, struct_arg.label, physical)

    declared = state_type.__dict__.get("shapes")
    derived = {f: specs[f].shape for f in fields}
    if declared is not None and {f: tuple(shape) for f, shape in declared.items()} != derived:
        raise TaskContractError(f"{state_type.__name__}.shapes is {declared}, but {sim.__name__}'s kernels give "
                                f"{derived}; drop 'shapes' (it is derived from the kernels) or make it agree")
    return specs


_RESERVED = frozenset({"seed", "episode", "action", "obs", "reward", "terminated", "success"})


def _check_physical_params(sim: type, fields: tuple[str, ...]) -> tuple[str, ...]:
    """``sim.physical_params``: distinct identifiers that name no state field or fixed kernel argument."""
    physical = getattr(sim, "physical_params", ())
    if not isinstance(physical, tuple) or not all(isinstance(q, str) and q.isidentifier() for q in physical):
        raise TaskContractError(f"{sim.__name__}.physical_params must be a tuple of names, got {physical!r}")
    for q in physical:
        if physical.count(q) > 1:
            raise TaskContractError(f"{sim.__name__}.physical_params names '{q}' twice")
        if q in fields or q.endswith("_next") or q in _RESERVED:
            raise TaskContractError(f"{sim.__name__}.physical_params '{q}' clashes with a state field or a fixed "
                                    f"kernel argument; name it after the physical quantity (e.g. 'mass')")
    return physical


def _check_physical_defaults(where: str, struct_arg: Any, physical: tuple[str, ...]) -> None:
    """Each physical parameter's default is the float field of the same name in the params struct."""
    struct_vars = getattr(struct_arg.type, "vars", {})
    for q in physical:
        var = struct_vars.get(q)
        if var is None or var.type is not wp.float32:
            got = "no such field" if var is None else f"a {wp.types.type_repr(var.type)}"
            raise TaskContractError(f"{where}: physical parameter '{q}' needs a float field '{q}' in "
                                    f"{struct_arg.type.key} (its default value), got {got}")


def _check_no_shared_reads(where: str, kernel: Any, struct_label: str, physical: tuple[str, ...]) -> None:
    """Reject ``p.mass`` in a step kernel that receives ``mass`` per env: it would run, ignoring the
    per-env value and giving it a zero gradient."""
    tree = getattr(kernel.adj, "tree", None)
    if tree is None:
        return
    body = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)][:1]
    for node in (sub for stmt in (body[0].body if body else []) for sub in ast.walk(stmt)):
        if (isinstance(node, ast.Attribute) and node.attr in physical and isinstance(node.value, ast.Name)
                and node.value.id == struct_label):
            raise TaskContractError(f"{where} reads '{struct_label}.{node.attr}', the shared default of the "
                                    f"physical parameter '{node.attr}'; read the per-env '{node.attr}[i]'")


def _check_state_type(sim: type, state_type: Any) -> tuple[str, ...]:
    if not (isinstance(state_type, type) and issubclass(state_type, SimState)
            and dataclasses.is_dataclass(state_type)):
        raise TaskContractError(f"{sim.__name__}.state_type must be a @dataclass subclass of SimState, "
                                f"got {state_type!r}")
    # frozen needs no check: dataclasses refuses a non-frozen subclass of the frozen SimState
    fields = state_type.field_names()
    if not fields or fields[-1] != "step":
        raise TaskContractError(f"{state_type.__name__}'s last field must be the int32 'step' counter, "
                                f"got fields {fields}")
    return fields


def _scalar_type(dtype: Any) -> Any:
    return getattr(dtype, "_wp_scalar_type_", dtype)


def _field_spec(where: str, k: int, arg: Any, field: str) -> FieldSpec:
    t = arg.type
    want_int = field == "step"
    want = "wp.array(dtype=wp.int32)" if want_int else "a 1-D wp.array of float, a float vector or a float matrix"
    ok = wp.types.is_array(t) and t.ndim == 1 and (
        t.dtype is wp.int32 if want_int else _scalar_type(t.dtype) is wp.float32)
    if not ok:
        raise TaskContractError(f"{where} argument {k} '{arg.label}' (state field {field}) is "
                                f"{wp.types.type_repr(t)}, expected {want}")
    return FieldSpec(tuple(getattr(t.dtype, "_shape_", ())), torch.int32 if want_int else torch.float32)


def _check_fixed(where: str, k: int, arg: Any, kind: tuple[int, Any, str]) -> None:
    ndim, scalar, description = kind
    t = arg.type
    if not (wp.types.is_array(t) and t.ndim == ndim and t.dtype is scalar):
        raise TaskContractError(f"{where} argument {k} '{arg.label}' is {wp.types.type_repr(t)}, "
                                f"expected {description}")


def _check_action(where: str, k: int, arg: Any, act_dim: int) -> None:
    t = arg.type
    matrix = wp.types.is_array(t) and t.ndim == 2 and t.dtype is wp.float32
    vector = (wp.types.is_array(t) and t.ndim == 1 and wp.types.type_is_vector(t.dtype)
              and _scalar_type(t.dtype) is wp.float32 and tuple(t.dtype._shape_) == (act_dim,))
    if not (matrix or vector):
        raise TaskContractError(f"{where} argument {k} 'action' is {wp.types.type_repr(t)}, expected "
                                f"wp.array2d(dtype=float) or a 1-D wp.array of a length-{act_dim} float vector")


def _check_outputs_written(where: str, kernel: Any, outputs: list[str]) -> None:
    """Every output name must be a subscript-assignment target or a call argument in the kernel body.

    A static check that catches the common slip (an output never mentioned); an output written on only
    some paths is left to the bridge's debug mode, which sees every element at run time.
    """
    tree = getattr(kernel.adj, "tree", None)
    if tree is None:  # no source (e.g. a kernel built at run time): only the run-time check applies
        return
    body = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)][:1]  # the kernel's def, not its annotations
    written: set[str] = set()
    for node in (sub for stmt in (body[0].body if body else []) for sub in ast.walk(stmt)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Call):
            written.update(a.id for a in node.args if isinstance(a, ast.Name))
        for target in targets:
            for sub in ast.walk(target):
                if isinstance(sub, ast.Subscript) and isinstance(sub.value, ast.Name):
                    written.add(sub.value.id)
    for name in outputs:
        if name not in written:
            raise TaskContractError(f"{where} never writes its output '{name}' (expected an assignment "
                                    f"'{name}[i] = ...' or a call that is passed '{name}')")
