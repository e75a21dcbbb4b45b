"""Articulated FR3 dynamics on Newton (the optional ``newton`` extra): model, gravity torques, rollouts.

The Newton tasks (:mod:`diffgym.core.newton_task`) build on it; what it holds is measured and tested in
``tests/test_newton_fr3.py``, ``benchmarks/newton_solvers.py`` and ``docs/newton.md``:

* :func:`fr3_model` imports ``diffgym/assets/fr3/fr3.urdf`` (inertials, damping, effort limits) with
  ``ModelBuilder.add_urdf``, one articulation per env, fixed joints collapsed so the flange, hand and
  fingers ride on ``fr3_link7`` as one rigid body (fewer bodies, and no massless body for a solver to
  divide by).
* :func:`gravity_torques`: ``g(q)``, the joint torques that hold the arm still, from Newton's inverse
  dynamics; the validation test compares it with PyBullet's.
* :func:`simulate`: a Featherstone rollout with fresh states per substep, optionally recorded on a
  ``wp.Tape``. Each substep gets its own :class:`~newton.solvers.SolverFeatherstone`: the solver keeps
  its mass matrix and Cholesky factor on the instance, so a second ``step`` on the same instance
  overwrites what the first step's adjoint reads, and the gradients of a taped multi-substep rollout
  come out wrong (measured: 0.7 % off with 2 substeps, 5 % with 10, against 1e-6 for one substep).

Newton is imported lazily, so DiffGym imports without the extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import warp as wp

if TYPE_CHECKING:  # pragma: no cover
    import newton

FR3_DOF = 7


def require_newton() -> Any:
    """Import ``newton`` or raise one line saying how to install it."""
    try:
        import newton
    except ImportError:
        raise ImportError("this needs Newton, DiffGym's optional physics engine: pip install 'diffgym[newton]' "
                          "(or make install)") from None
    return newton


def fr3_urdf_path() -> Path:
    """``diffgym/assets/fr3/fr3.urdf`` (package data)."""
    return Path(__file__).resolve().parents[1] / "assets" / "fr3" / "fr3.urdf"


def fr3_model(num_envs: int = 1, *, requires_grad: bool = False, device: str = "cpu",
              urdf: str | Path | None = None) -> "newton.Model":
    """A Newton model with ``num_envs`` FR3 arms, one fixed-base articulation each (``7 * num_envs`` dofs,
    env ``i``'s joints at ``[7 i, 7 i + 7)``), from the URDF's inertials, ``<dynamics>`` and limits.

    Fixed joints are collapsed (flange, hand and fingers merge into ``fr3_link7``); self-collisions are
    off and the URDF has no collision shapes, so the arm moves without contacts.
    """
    newton = require_newton()
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    robot = newton.ModelBuilder()
    robot.add_urdf(str(urdf or fr3_urdf_path()), floating=False, enable_self_collisions=False,
                   collapse_fixed_joints=True)
    if robot.joint_dof_count != FR3_DOF:
        raise ValueError(f"{urdf or fr3_urdf_path()}: expected {FR3_DOF} arm dofs, Newton found "
                         f"{robot.joint_dof_count}")
    builder = newton.ModelBuilder()
    builder.replicate(robot, num_envs)
    return builder.finalize(device=device, requires_grad=requires_grad)


def gravity_torques(model: "newton.Model", q: np.ndarray) -> np.ndarray:
    """``g(q)`` [N m], ``(B, 7)``: the joint torques that hold configurations ``q`` ``(B, 7)`` [rad] still
    under gravity (``tau = M qdd + C qd + g``), from Newton's inverse dynamics. ``B`` must equal the
    model's number of arms."""
    newton = require_newton()
    q = np.asarray(q, dtype=np.float32)
    if q.shape != (model.articulation_count, FR3_DOF):
        raise ValueError(f"q must have shape ({model.articulation_count}, {FR3_DOF}), got {q.shape}")
    state = model.state(requires_grad=False)
    state.joint_q.assign(q.reshape(-1))
    state.joint_qd.zero_()
    newton.eval_fk(model, state.joint_q, state.joint_qd, state)
    gravity = wp.zeros(model.joint_dof_count, dtype=wp.float32, device=model.device)
    newton.eval_inverse_dynamics_passive(model, state, gravity_force=gravity)
    return gravity.numpy().reshape(-1, FR3_DOF)


def simulate(model: "newton.Model", joint_q: wp.array, joint_qd: wp.array, torques: Sequence[wp.array],
             dt: float, substeps: int, *, requires_grad: bool = False) -> "newton.State":
    """Advance the arms from ``(joint_q, joint_qd)`` by one control step per entry of ``torques`` (each a
    ``(7 * num_envs,)`` float32 array of joint torques [N m], held for ``dt`` s over ``substeps``
    Featherstone substeps) and return the final state.

    Nothing is written in place: every substep reads a fresh input state (a taped copy of the previous
    output) and writes a fresh output state with a fresh solver, so the whole rollout can be recorded on
    one ``wp.Tape`` (``requires_grad=True``, inside ``with tape:``) and differentiated with respect to the
    inputs and the torques. Call ``tape.zero()`` before ``tape.backward``: the model's own arrays (built
    with ``requires_grad``) keep the gradients an earlier tape left in them, and a second backward on the
    same model without it comes out wrong (measured: 16x too large on the wrist).
    """
    newton = require_newton()
    if substeps < 1 or dt <= 0:
        raise ValueError(f"need dt > 0 and substeps >= 1, got dt={dt}, substeps={substeps}")
    state = model.state(requires_grad=requires_grad)
    wp.copy(state.joint_q, joint_q)
    wp.copy(state.joint_qd, joint_qd)

    def featherstone_step(*args: Any) -> None:
        newton.solvers.SolverFeatherstone(model).step(*args)  # a fresh solver per substep (module docstring)

    return taped_substeps(model, state, torques, dt, substeps, featherstone_step, ("joint_q", "joint_qd"),
                          requires_grad=requires_grad)


def taped_substeps(model: "newton.Model", state: "newton.State", torques: Sequence[wp.array], dt: float,
                   substeps: int, step: Any, carried: tuple[str, ...], *,
                   requires_grad: bool = False) -> "newton.State":
    """The loop of a rollout that a ``wp.Tape`` can record: for each control step's ``torques``,
    ``substeps`` calls ``step(state_in, state_out, control, None, dt / substeps)`` (a solver's ``step``),
    each on a fresh input state holding copies of the previous output's ``carried`` arrays (the solver's
    own coordinates: ``joint_q``/``joint_qd`` for Featherstone, ``body_q``/``body_qd`` for maximal-coordinate
    solvers) and a fresh output state. Returns the last output state."""
    for tau in torques:
        control = model.control(clone_variables=False)
        control.joint_f = tau
        for _ in range(substeps):
            state_in = model.state(requires_grad=requires_grad)
            # copies, not the previous output itself: a solver may rewrite its input state in place
            for name in carried:
                wp.copy(getattr(state_in, name), getattr(state, name))
            state_out = model.state(requires_grad=requires_grad)
            step(state_in, state_out, control, None, dt / substeps)
            state = state_out
    return state


@wp.kernel
def weighted_state_sum(q: wp.array(dtype=wp.float32), qd: wp.array(dtype=wp.float32),
                       wq: wp.array(dtype=wp.float32), wqd: wp.array(dtype=wp.float32),
                       # outputs
                       total: wp.array(dtype=wp.float32)):
    """``total[0] += wq . q + wqd . qd``: a scalar objective of a rollout's final joint state, for
    gradient checks (launch over the dofs; ``total`` zeroed and ``requires_grad`` when taped)."""
    i = wp.tid()
    wp.atomic_add(total, 0, wq[i] * q[i] + wqd[i] * qd[i])
