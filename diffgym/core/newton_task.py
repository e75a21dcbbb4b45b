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

Gradients. With autograd recording, step 2 is one ``torch.autograd.Function`` whose forward records the
substeps on a fresh ``wp.Tape`` and whose backward seeds the output gradients, runs ``tape.backward`` and
hands clones of the input gradients to autograd. The kernel bridge's rules hold:

* fresh arrays: the inputs are copied into Warp arrays this call owns, every substep reads a fresh copy
  of the previous state and writes a fresh state with a fresh ``SolverFeatherstone`` (the solver keeps
  its mass matrix and Cholesky factor on the instance, which a second substep would overwrite under the
  first one's adjoint: ``docs/newton.md`` measured 5 % gradient errors with one solver for 10 substeps),
  and the outputs handed to torch are clones, so nothing recorded on a tape is ever overwritten;
* gradient ownership: the tape and the shared model's gradients are zeroed before the output gradients
  are seeded (the model's arrays are recorded on every step's tape and keep what an earlier backward
  accumulated: without this the second of two backwards came out 16x too large on the wrist) and again
  after the input gradients are cloned out, so no gradient leaks from one backward into another.

Without autograd (``torch.no_grad()``, ``env.step``, PPO) the substeps run on a cached solver and two
cached states used in turn: nothing is recorded, so reusing them breaks no rule, and a step costs 1.2-2.9x
less than a recorded one (docs/benchmarks.md: 2.9x at one env, 1.2x at 4096). The cache is per sim and
batch size and not locked: step one sim from one thread at a time.

Newton is an optional extra: this module imports without it, and constructing a Newton task without it
raises one line saying how to install it (:func:`diffgym.core.newton_sim.require_newton`).
"""

from __future__ import annotations

import abc
import contextlib
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch
import warp as wp

from diffgym.core.bridge import Out, warp_call, warp_device
from diffgym.core.contract import FieldSpec, check_newton_sim_class
from diffgym.core.newton_sim import require_newton, simulate
from diffgym.core.sim import DiffSim, StepOutput
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

    @classmethod
    def _check_contract(cls) -> dict[str, FieldSpec] | None:
        return check_newton_sim_class(cls)

    def __init__(self, device: str | torch.device = "cpu", max_episode_steps: int | None = None):
        require_newton()  # one line saying how to install it, before anything else can fail
        super().__init__(device, max_episode_steps)
        self._models: dict[int, newton.Model] = {}
        # forward-only stepping (no tape): per batch size, a solver and two states used in turn
        self._forward_only: dict[int, tuple[Any, Any, Any]] = {}

    @abc.abstractmethod
    def build_model(self, num_envs: int, device: str) -> "newton.Model":
        """The Newton model of ``num_envs`` copies of the task's articulation, env ``i``'s dofs at
        ``[i * dofs_per_env, (i + 1) * dofs_per_env)``, finalized with ``requires_grad=True``."""

    def model(self, batch: int) -> "newton.Model":
        """The (cached) Newton model for ``batch`` envs. Shared by every step of that batch size; never
        written by a step (the solver writes only states and its own buffers)."""
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
        (joint_f,) = warp_call(self.control_kernel, batch, [*tensors, action.clamp(-1.0, 1.0)], [self.params],
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
        return self._advance_forward_only(batch, joint_q, joint_qd, joint_f)

    def _advance_forward_only(self, batch: int, joint_q: torch.Tensor, joint_qd: torch.Tensor,
                              joint_f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        newton = require_newton()
        model = self.model(batch)
        cached = self._forward_only.get(batch)
        if cached is None:
            cached = self._forward_only[batch] = (newton.solvers.SolverFeatherstone(model),
                                                  model.state(requires_grad=False), model.state(requires_grad=False))
        solver, state, spare = cached
        with _on_torch_stream(self.device):
            wp.copy(state.joint_q, wp.from_torch(joint_q.detach().contiguous()))
            wp.copy(state.joint_qd, wp.from_torch(joint_qd.detach().contiguous()))
            control = model.control(clone_variables=False)
            control.joint_f = wp.from_torch(joint_f.detach().contiguous())
            for _ in range(self.substeps):
                solver.step(state, spare, control, None, self.dt / self.substeps)
                state, spare = spare, state
            # clones: the cached states are rewritten by the next step
            return wp.to_torch(state.joint_q).clone(), wp.to_torch(state.joint_qd).clone()


class _NewtonDynamics(torch.autograd.Function):
    """``(joint_q, joint_qd, joint_f) -> (joint_q', joint_qd')`` over one control step, recorded on a
    ``wp.Tape`` (see the module docstring for the rules it keeps)."""

    @staticmethod
    def forward(ctx, sim: NewtonSim, batch: int, joint_q: torch.Tensor, joint_qd: torch.Tensor,
                joint_f: torch.Tensor):
        model = sim.model(batch)
        device = model.device
        with _on_torch_stream(sim.device):
            # Warp arrays this call owns (fresh values and gradient buffers), never autograd's tensors
            inputs = []
            for tensor in (joint_q, joint_qd, joint_f):
                array = wp.empty(tensor.shape[0], dtype=wp.float32, device=device, requires_grad=True)
                wp.copy(array, wp.from_torch(tensor.detach().contiguous()))
                inputs.append(array)
            tape = wp.Tape()
            with tape:
                final = simulate(model, inputs[0], inputs[1], [inputs[2]], sim.dt, sim.substeps, requires_grad=True)
            ctx.tape, ctx.model, ctx.inputs, ctx.outputs = tape, model, inputs, (final.joint_q, final.joint_qd)
            ctx.device = sim.device
            return wp.to_torch(final.joint_q).clone(), wp.to_torch(final.joint_qd).clone()

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor | None, grad_qd: torch.Tensor | None):
        tape = ctx.tape
        with _on_torch_stream(ctx.device):
            # zero first: the model's arrays are on every step's tape and hold an earlier backward's sums
            tape.zero()
            zero_model_gradients(ctx.model)
            for output, grad in zip(ctx.outputs, (grad_q, grad_qd)):
                if grad is not None:
                    wp.to_torch(output.grad).copy_(grad)
            tape.backward()
            grads = [wp.to_torch(array.grad).clone() for array in ctx.inputs]
            # and after: nothing this backward accumulated may reach the next one
            tape.zero()
            zero_model_gradients(ctx.model)
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
