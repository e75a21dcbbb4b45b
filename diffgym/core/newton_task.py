"""The second kind of task: a step whose dynamics are a Newton articulation advanced by Featherstone.

A kernel task (:class:`~diffgym.core.sim.DiffSim`) computes its whole step in one Warp kernel. A Newton
task (:class:`NewtonSim`) splits it in three, so that rigid-body dynamics come from Newton's solver
instead of hand-written equations:

1. ``control_kernel`` turns the state and the action into joint torques (through the kernel bridge);
2. the Newton model of all ``B`` envs (one articulation each, ``newton.ModelBuilder.replicate``) is
   advanced by ``substeps`` Featherstone substeps of ``dt / substeps`` under those torques
   (:class:`_NewtonDynamics`);
3. ``outcome_kernel`` turns the state and the new joint positions and velocities into the next state,
   observation, reward and flags (through the kernel bridge).

Reset and observation are kernels as in a kernel task, and validation, ``info`` and rendering are
:class:`DiffSim`'s. The contract a Newton task declares is checked when its class is defined
(:func:`diffgym.core.contract.check_newton_sim_class`).

Gradients. With autograd recording, step 2 is one ``torch.autograd.Function`` (:class:`_NewtonDynamics`)
replaying the batch size's :class:`_TapedStep`: the substeps recorded once on a ``wp.Tape`` over fixed
buffers and, on the CPU, captured as Warp graphs (forward, gradient zeroing, backward; on CUDA the same
launches are issued again from Python, :class:`Replay`), so a CPU step costs no Python per kernel launch,
and no step any model, solver or state construction or a host sync (it was ~450 ``wp.launch`` calls,
21 states and 10 solvers built per step: docs/benchmarks.md has the before and after). The rules hold:

* a solver per substep: every substep reads a fresh copy of the previous state and writes a fresh state
  with a ``SolverFeatherstone`` of its own (the solver keeps its mass matrix and Cholesky factor on the
  instance, which a second substep would overwrite under the first one's adjoint: ``docs/newton.md``
  measured 5 % gradient errors with one solver for 10 substeps); the outputs handed to torch are clones;
* one step's intermediates at a time: the buffers hold the forward of the last recorded step; the backward
  of an earlier one (a chained rollout) reloads that step's saved inputs and replays its forward first, so
  each backward differentiates its own step's values;
* gradient ownership: every gradient the backward accumulates into (the tape's arrays, the shared model's,
  the inputs') is zeroed before the output gradients are seeded (without this the second of two backwards
  through one model came out 16x too large on the wrist), and the input gradients handed to autograd are
  clones.

Without autograd (``torch.no_grad()``, ``env.step``, PPO) the substeps run on a cached solver and two
cached states used in turn, also replayed (a graph on the CPU): nothing is recorded, so reusing them
breaks no rule.
The caches are per sim and batch size and not locked: step one sim from one thread at a time.

Newton is an optional extra: this module imports without it, and constructing a Newton task without it
raises one line saying how to install it (:func:`diffgym.core.newton_sim.require_newton`).
"""

from __future__ import annotations

import abc
import contextlib
import functools
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch
import warp as wp

from diffgym.core.bridge import Out, Replay, warp_call, warp_device
from diffgym.core.contract import NEWTON_TASK_PARTS, FieldSpec, check_newton_sim_class
from diffgym.core.newton_sim import require_newton
from diffgym.core.sim import DiffSim, StepOutput, clip_to_action_box
from diffgym.core.state import SimState

if TYPE_CHECKING:  # pragma: no cover
    import newton


class NewtonSim(DiffSim):
    """Pure batched simulator of a task whose dynamics are a Newton model (see the module docstring).

    A subclass declares, besides ``state_type``, ``obs_dim``, ``act_dim``, ``dt``,
    ``default_max_episode_steps``, ``reset_kernel`` and ``observe_kernel`` (as a kernel task):

    * ``control_kernel(*state, action, params, joint_f)`` and
      ``outcome_kernel(*state, joint_q, joint_qd, params, *next_state, obs, reward, terminated, success)``;
    * ``joint_fields``: the names of its state fields holding the joint positions and velocities;
    * ``dofs_per_env`` and ``substeps`` (Featherstone substeps per control step ``dt``);
    * :meth:`build_model`: the Newton model of ``num_envs`` copies of its articulation.
    """

    has_fast_path = False  # the step is three stages, not one recorded kernel launch
    control_kernel: ClassVar[Any]
    outcome_kernel: ClassVar[Any]
    joint_fields: ClassVar[tuple[str, str]]
    dofs_per_env: ClassVar[int]
    substeps: ClassVar[int]
    solver_options: ClassVar[dict[str, Any]] = {}
    """Keyword arguments of the task's ``SolverFeatherstone`` (e.g. ``use_tile_gemm``)."""

    contract_parts = NEWTON_TASK_PARTS

    @classmethod
    def _check_contract(cls) -> dict[str, FieldSpec] | None:
        return check_newton_sim_class(cls)

    def __init__(self, device: str | torch.device = "cpu", max_episode_steps: int | None = None):
        require_newton()  # one line saying how to install it, before anything else can fail
        super().__init__(device, max_episode_steps)
        self._models: dict[int, newton.Model] = {}
        # per batch size, the control step replayed on fixed buffers (taped, and forward only; :class:`Replay`)
        self._taped: dict[int, _TapedStep] = {}
        self._forward_only: dict[int, _ForwardOnlyStep] = {}

    @abc.abstractmethod
    def build_model(self, num_envs: int, device: str) -> "newton.Model":
        """The Newton model of ``num_envs`` copies of the task's articulation, env ``i``'s dofs at
        ``[i * dofs_per_env, (i + 1) * dofs_per_env)``, finalized with ``requires_grad=True``."""

    def model(self, batch: int) -> "newton.Model":
        """The (cached) Newton model for ``batch`` envs. Shared by every step of that batch size; never
        written by a step (the solver writes only states and its own buffers). Edit its arrays in place and
        before the first step of that batch size only: the recorded steps hold its arrays' addresses, and
        their solvers buffers derived from its inertias when first built."""
        model = self._models.get(batch)
        if model is None:
            model = self.build_model(batch, str(warp_device(self.device)))
            if model.joint_dof_count != batch * self.dofs_per_env or not model.requires_grad:
                raise ValueError(f"{type(self).__name__}.build_model({batch}) must return a model with "
                                 f"requires_grad=True and {batch * self.dofs_per_env} dofs, got "
                                 f"requires_grad={model.requires_grad} and {model.joint_dof_count} dofs")
            self._models[batch] = model
        return model

    # ----------------------------------------------------------------------------- the step
    def _step(self, state: SimState, action: torch.Tensor,
              physics: Sequence[torch.Tensor] | None = None) -> StepOutput:
        batch = state.batch_size
        tensors = state.tensors()
        (joint_f,) = warp_call(self.control_kernel, batch, [*tensors, clip_to_action_box(action)], [self.params],
                               [Out((batch * self.dofs_per_env,))])
        q_name, qd_name = self.joint_fields
        joint_q, joint_qd = self.advance(getattr(state, q_name).reshape(-1), getattr(state, qd_name).reshape(-1),
                                         joint_f)
        outputs = warp_call(self.outcome_kernel, batch, [*tensors, joint_q, joint_qd], [self.params],
                            self._step_specs(batch))
        return self._step_output(outputs)

    def advance(self, joint_q: torch.Tensor, joint_qd: torch.Tensor, joint_f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The joint positions and velocities after one control step ``dt`` under torques ``joint_f``
        (all flat ``(B * dofs_per_env,)`` float32 tensors, Newton's layout); differentiable in all three
        when autograd records."""
        batch = joint_q.shape[0] // self.dofs_per_env
        if torch.is_grad_enabled() and any(t.requires_grad for t in (joint_q, joint_qd, joint_f)):
            return _NewtonDynamics.apply(self, batch, joint_q, joint_qd, joint_f)
        step = self._forward_only.get(batch)
        if step is None:
            step = self._forward_only[batch] = _ForwardOnlyStep(self, self.model(batch))
        return step.run(joint_q, joint_qd, joint_f)

    def _taped_step(self, batch: int) -> "_TapedStep":
        step = self._taped.get(batch)
        if step is None:
            step = self._taped[batch] = _TapedStep(self, self.model(batch))
        return step


def _captures_graphs(device: Any) -> bool:
    """Whether the launches on Warp device ``device`` are replayed from a captured graph: on the CPU only.
    On CUDA they run on torch's current stream (:func:`_on_torch_stream`), by default its legacy stream,
    on which CUDA refuses to capture; capturing on a stream of its own would need events ordering it with
    torch's work before and after every replay, which no GPU here could test."""
    return not device.is_cuda


def _replay(device: Any, record: Callable[[], Any]) -> Replay:
    """``record``'s launches replayed on ``device``: from a graph where :func:`_captures_graphs`."""
    return Replay(device, record, capture=_captures_graphs(device))


MAX_PLAIN_MASS_MATRIX_SIZE = 16
"""Articulations of at most this many joints and dofs get :func:`_mass_matrix_kernel` on the CPU (its unrolled
code grows with the square of the dofs; Franka's arm has 7)."""


@functools.cache
def _mass_matrix_kernel(num_joints: int, num_dofs: int) -> Any:
    """The joint-space mass matrix ``H = sum_b J_b^T M_b J_b`` of every articulation of one size group, as
    ``SolverFeatherstone``'s tile kernel (``use_tile_gemm``, without ``fuse_cholesky``) computes it and with
    its signature (``J``, ``M`` -> ``H``), from the same 6 x 6 diagonal blocks of ``M`` in the same body
    order, but as plain per-thread matrix products: one thread per articulation (lane 0 of its block, where
    a launch has several lanes). On the CPU Warp runs a tile kernel's matrix products about 4.5x slower and
    their adjoint about 5x slower than this (docs/benchmarks.md); its ``H`` and gradients came out the same.
    Its loops must be unrolled for Warp's generated adjoint to be exact (a loop Warp keeps accumulates
    ``h`` wrongly in the backward), so the module's ``max_unroll`` covers every loop bound, whatever
    ``wp.config.max_unroll`` says."""
    body_jacobian = wp.types.matrix(shape=(6, num_dofs), dtype=wp.float32)
    joint_matrix = wp.types.matrix(shape=(num_dofs, num_dofs), dtype=wp.float32)

    @wp.func
    def body_term(J: wp.array3d(dtype=float), M: wp.array3d(dtype=float), art: int, body: int):
        jacobian = body_jacobian()
        inertia = wp.spatial_matrix()
        for r in range(6):
            for c in range(wp.static(num_dofs)):
                jacobian[r, c] = J[art, 6 * body + r, c]
            for c in range(6):
                inertia[r, c] = M[art, 6 * body + r, 6 * body + c]
        return wp.transpose(jacobian) @ (inertia @ jacobian)

    @wp.kernel(module="unique", module_options={"max_unroll": max(6, num_joints, num_dofs)})
    def mass_matrix(J: wp.array3d(dtype=float), M: wp.array3d(dtype=float),
                    # outputs
                    H: wp.array3d(dtype=float)):
        art, lane = wp.tid()
        if lane == 0:
            h = joint_matrix()
            for body in range(wp.static(num_joints)):
                h = h + body_term(J, M, art, body)
            for r in range(wp.static(num_dofs)):
                for c in range(wp.static(num_dofs)):
                    H[art, r, c] = h[r, c]

    return mass_matrix


def _plain_mass_matrix_on_cpu(solver: Any) -> Any:
    """``solver`` with :func:`_mass_matrix_kernel` in place of its tile mass-matrix kernels, on the CPU, where it
    runs the same products faster; unchanged elsewhere (on CUDA the tile kernel's threads cooperate) and
    where the solver fuses the Cholesky factorisation into that kernel (another signature)."""
    kernels = getattr(solver, "_tile_kernels_by_size", None)
    fused = solver.fuse_cholesky and not getattr(solver, "_has_joint_mimics", False)
    if solver.model.device.is_cuda or not getattr(solver, "use_tile_gemm", False) or not kernels or fused:
        return solver
    for size in list(kernels):
        if max(size) <= MAX_PLAIN_MASS_MATRIX_SIZE:
            kernels[size] = _mass_matrix_kernel(*size)
    return solver


class _ForwardOnlyStep:
    """The untaped control step of one batch size (``torch.no_grad()``, ``env.step``, PPO): one cached
    solver and two states used in turn, replayed (:class:`Replay`: a graph on the CPU). Nothing is
    recorded, so reusing them breaks no gradient rule."""

    def __init__(self, sim: NewtonSim, model: "newton.Model"):
        newton = require_newton()
        self.device = sim.device
        with _on_torch_stream(self.device):
            self.joint_q, self.joint_qd, self.joint_f = (
                wp.zeros(model.joint_dof_count, dtype=wp.float32, device=model.device) for _ in range(3))
            solver = _plain_mass_matrix_on_cpu(newton.solvers.SolverFeatherstone(model, **sim.solver_options))
            states = [model.state(requires_grad=False), model.state(requires_grad=False)]
            control = model.control(clone_variables=False)
            control.joint_f = self.joint_f

            def substeps() -> None:
                wp.copy(states[0].joint_q, self.joint_q)
                wp.copy(states[0].joint_qd, self.joint_qd)
                for k in range(sim.substeps):
                    solver.step(states[k % 2], states[1 - k % 2], control, None, sim.dt / sim.substeps)

            substeps()  # outside the capture: loads the kernels and allocates the solver's buffers
            self.replay = _replay(model.device, substeps)
            self.final = states[sim.substeps % 2]
            self._alive = (solver, states, control)  # what the graph writes through must outlive it

    def run(self, joint_q: torch.Tensor, joint_qd: torch.Tensor,
            joint_f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _on_torch_stream(self.device):
            _load((self.joint_q, self.joint_qd, self.joint_f), (joint_q, joint_qd, joint_f))
            self.replay()
            # clones: the next step rewrites the cached states
            return wp.to_torch(self.final.joint_q).clone(), wp.to_torch(self.final.joint_qd).clone()


@wp.kernel
def _copy_joint_state(q: wp.array(dtype=wp.float32), qd: wp.array(dtype=wp.float32),
                      # outputs
                      q_out: wp.array(dtype=wp.float32), qd_out: wp.array(dtype=wp.float32)):
    """A state's joint positions and velocities copied into a fresh state: a kernel, so that the tape holds
    only kernel launches (``wp.copy`` records a Python callback, which a recorded backward cannot replay)."""
    i = wp.tid()
    q_out[i] = q[i]
    qd_out[i] = qd[i]


class _TapedStep:
    """The recorded control step of one batch size: ``substeps`` Featherstone substeps on fixed buffers
    (a fresh input and output state and a solver of its own per substep, as :func:`simulate` lays them out)
    recorded once on a ``wp.Tape``, then replayed as three :class:`Replay` (Warp graphs on the CPU): the
    forward, the zeroing of every gradient the backward accumulates into (the tape's arrays, the model's,
    the inputs'), and the backward, made of the tape's adjoint launches recorded one by one
    (``wp.launch(..., adjoint=True, record_cmd=True)``): a graph captured from ``tape.backward`` itself
    replayed wrong gradients and corrupted the heap on the CPU (Warp 1.19).

    The buffers hold one step's intermediates at a time. ``owner`` names the autograd call whose forward
    they hold; a backward whose forward has since been overwritten (the earlier steps of a chained rollout)
    first reloads its saved inputs and replays the forward, so every backward runs on its own step's values
    (recomputation instead of a copy of the intermediates per step)."""

    def __init__(self, sim: NewtonSim, model: "newton.Model"):
        newton = require_newton()
        self.device = sim.device
        self.owner: object | None = None
        dofs = model.joint_dof_count
        with _on_torch_stream(self.device):
            self.inputs = tuple(wp.zeros(dofs, dtype=wp.float32, device=model.device, requires_grad=True)
                                for _ in range(3))
            solvers = [_plain_mass_matrix_on_cpu(newton.solvers.SolverFeatherstone(model, **sim.solver_options))
                       for _ in range(sim.substeps)]
            control = model.control(clone_variables=False)
            control.joint_f = self.inputs[2]
            # Allocated here, outside the capture: a replay writes through the pointers the capture saw, so
            # every array it touches must outlive the graph (a state allocated inside the capture and freed
            # after it had its memset replayed into freed memory: heap corruption).
            states = [model.state(requires_grad=True) for _ in range(2 * sim.substeps + 1)]
            for state_in in states[1::2]:
                # The step copies the input state's external body forces (zero here: nothing applies any) with
                # wp.copy, whose adjoint the tape records as a Python callback, not a launch; without a
                # gradient on the source the copy records none, and no gradient is lost: nothing upstream
                # writes these forces, so theirs would reach no input.
                state_in.body_f.requires_grad = False
            self._alive = (solvers, control, states)

            def forward(tape: wp.Tape) -> None:
                with tape:
                    wp.launch(_copy_joint_state, dofs, [self.inputs[0], self.inputs[1]],
                              [states[0].joint_q, states[0].joint_qd], device=model.device)
                    for k, solver in enumerate(solvers):
                        state, state_in, state_out = states[2 * k], states[2 * k + 1], states[2 * k + 2]
                        # a copy, not the previous output itself: the solver may rewrite its input in place
                        wp.launch(_copy_joint_state, dofs, [state.joint_q, state.joint_qd],
                                  [state_in.joint_q, state_in.joint_qd], device=model.device)
                        solver.step(state_in, state_out, control, None, sim.dt / sim.substeps)

            # outside the capture: loads the kernels, lets each solver add its buffers to its output state
            # (Newton does so on a state's first step) and records the tape
            self.tape = wp.Tape()
            forward(self.tape)
            # the same launches on the same arrays, replayed (the tape of each run is dropped)
            self.forward_replay = _replay(model.device, lambda: forward(wp.Tape()))
            self.outputs = (states[-1].joint_q, states[-1].joint_qd)
            adjoints = [_recorded_adjoint(self.tape, entry) for entry in reversed(self.tape.launches)]
            self.backward_replay = _replay(model.device, lambda: [launch.launch() for launch in adjoints])

            def zero_gradients() -> None:
                self.tape.zero()  # every gradient the adjoint launches above read or write
                zero_model_gradients(model)
                for array in self.inputs:
                    array.grad.zero_()

            self.zero_replay = _replay(model.device, zero_gradients)

    def forward(self, owner: object, joint_q: torch.Tensor, joint_qd: torch.Tensor, joint_f: torch.Tensor) -> None:
        """Run the step on these inputs, its intermediates kept for ``owner``'s backward."""
        with _on_torch_stream(self.device):
            _load(self.inputs, (joint_q, joint_qd, joint_f))
            self.forward_replay()
        self.owner = owner

    def backward(self, owner: object, inputs: Sequence[torch.Tensor],
                 output_grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        """The input gradients of ``owner``'s step (inputs ``inputs``) for these output gradients."""
        if self.owner is not owner:  # a later step ran on the buffers since: recompute this one's forward
            self.forward(owner, *inputs)
        with _on_torch_stream(self.device):
            # zero first: the tape's arrays and the model's hold an earlier backward's sums
            self.zero_replay()
            for output, grad in zip(self.outputs, output_grads):
                if grad is not None:
                    wp.to_torch(output.grad, requires_grad=False).copy_(grad)
            self.backward_replay()
            # clones: the next backward zeroes and rewrites these buffers
            return [wp.to_torch(array.grad, requires_grad=False).clone() for array in self.inputs]


def _recorded_adjoint(tape: wp.Tape, entry: Any) -> Any:
    """The adjoint of one tape entry ``[kernel, dim, max_blocks, inputs, outputs, device, block_dim]`` as a
    ``wp.Launch``, bound to the gradient arrays ``tape.backward`` would pass (and registering them in
    ``tape.gradients``, which ``tape.zero`` zeroes)."""
    if callable(entry):
        raise RuntimeError("a Newton step recorded a Python callback on the tape; the recorded backward "
                           "replays only kernel launches")
    kernel, dim, max_blocks, inputs, outputs, device, block_dim = entry[:7]
    return wp.launch(kernel, dim, inputs, outputs, adj_inputs=[tape.get_adjoint(a) for a in inputs],
                     adj_outputs=[tape.get_adjoint(a) for a in outputs], device=device, adjoint=True,
                     record_tape=False, record_cmd=True, max_blocks=max_blocks, block_dim=block_dim)


def _load(arrays: Sequence[wp.array], tensors: Sequence[torch.Tensor]) -> None:
    """Copy each tensor's values into the Warp array a captured graph reads."""
    for array, tensor in zip(arrays, tensors):
        wp.to_torch(array, requires_grad=False).copy_(tensor.detach().reshape(-1))


class _NewtonDynamics(torch.autograd.Function):
    """``(joint_q, joint_qd, joint_f) -> (joint_q', joint_qd')`` over one control step, replayed from the
    batch size's :class:`_TapedStep` (see the module docstring for the rules it keeps)."""

    @staticmethod
    def forward(ctx, sim: NewtonSim, batch: int, joint_q: torch.Tensor, joint_qd: torch.Tensor,
                joint_f: torch.Tensor):
        step = sim._taped_step(batch)
        ctx.step, ctx.owner = step, object()
        # copies, for a recomputed forward: the caller may rewrite its tensors in place before the backward
        ctx.inputs = tuple(t.detach().clone() for t in (joint_q, joint_qd, joint_f))
        step.forward(ctx.owner, joint_q, joint_qd, joint_f)
        # clones: the next step rewrites the buffers
        return tuple(wp.to_torch(output, requires_grad=False).clone() for output in step.outputs)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor | None, grad_qd: torch.Tensor | None):
        grads = ctx.step.backward(ctx.owner, ctx.inputs, (grad_q, grad_qd))
        return (None, None, *grads)


def zero_model_gradients(model: "newton.Model") -> None:
    """Zero the gradient of every array of ``model`` (a ``requires_grad`` model accumulates gradients in
    its own arrays, which every taped step of that model shares)."""
    for value in vars(model).values():
        grad = getattr(value, "grad", None)
        if isinstance(value, wp.array) and grad is not None:
            grad.zero_()


@contextlib.contextmanager
def _on_torch_stream(device: torch.device):
    """Run Newton's launches on torch's current CUDA stream, ordered with the torch ops around them (on
    the CPU there are no streams)."""
    if device.type != "cuda":
        yield
        return
    with wp.ScopedDevice(warp_device(device)), wp.ScopedStream(wp.stream_from_torch(device)):
        yield
