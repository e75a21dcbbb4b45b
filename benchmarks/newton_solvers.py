"""Newton's two differentiable solvers on the FR3: stability, speed and gradient quality (issue 16).

For SolverFeatherstone (generalised coordinates) and SolverSemiImplicit (maximal coordinates, joints held
by penalty springs), one env, control step 0.05 s held over `substeps` solver substeps, torques = gravity
compensation at the ready pose + U(-0.05, 0.05) N m per joint and step. For a 1-step and a 20-step rollout:
forward time (no tape), forward + backward time on a `wp.Tape`, and the directional derivative of
L = w . q_T + v . qd_T along random torque directions against central differences (eps 3e-2, float32).
Also the final q of each solver (the semi-implicit joints are compliant: they sag).

    python benchmarks/newton_solvers.py [--steps 1,20] [--solvers featherstone:10,semi_implicit:250]

Numbers from a shared 2-core CPU VM are in docs/newton.md.
"""

import argparse
import math
import time

import numpy as np
import warp as wp

from diffgym.core.newton_sim import (fr3_model, gravity_torques, require_newton, simulate, taped_substeps,
                                    weighted_state_sum)

READY = np.array([0.0, -math.pi / 4, 0.0, -3 * math.pi / 4, 0.0, math.pi / 2, math.pi / 4], dtype=np.float32)


def simulate_semi_implicit(model, joint_q, joint_qd, torques, dt, substeps, requires_grad=False):
    """The same rollout as newton_sim.simulate on SolverSemiImplicit: its state is the bodies' poses and
    twists, so fresh states copy those, and joint coordinates come back by inverse kinematics."""
    newton = require_newton()
    solver = newton.solvers.SolverSemiImplicit(model)  # keeps no per-step buffers the adjoint reads
    state = model.state(requires_grad=requires_grad)
    wp.copy(state.joint_q, joint_q)
    wp.copy(state.joint_qd, joint_qd)
    newton.eval_fk(model, state.joint_q, state.joint_qd, state)
    state = taped_substeps(model, state, torques, dt, substeps, solver.step, ("body_q", "body_qd"),
                           requires_grad=requires_grad)
    newton.eval_ik(model, state, state.joint_q, state.joint_qd)
    return state


def measure(solver: str, substeps: int, steps: int, seed: int = 0, directions: int = 2) -> dict:
    rollout = simulate if solver == "featherstone" else simulate_semi_implicit
    model = fr3_model(1, requires_grad=True)
    rng = np.random.default_rng(seed)
    gravity = gravity_torques(model, READY[None])[0]
    torques = np.stack([gravity + rng.uniform(-0.05, 0.05, 7).astype(np.float32) for _ in range(steps)])
    wq, wqd = wp.array(rng.normal(size=7).astype(np.float32)), wp.array(0.1 * rng.normal(size=7).astype(np.float32))
    q0, qd0 = wp.array(READY), wp.zeros(7)

    def loss(values: np.ndarray) -> tuple[float, np.ndarray]:
        final = rollout(model, q0, qd0, [wp.array(v) for v in values], 0.05, substeps)
        total = wp.zeros(1)
        wp.launch(weighted_state_sum, 7, [final.joint_q, final.joint_qd, wq, wqd], [total])
        return float(total.numpy()[0]), final.joint_q.numpy()

    loss(torques)  # compile and warm up
    start = time.perf_counter()
    _, q_final = loss(torques)
    forward = time.perf_counter() - start

    def taped() -> np.ndarray:
        inputs = [wp.array(v, requires_grad=True) for v in torques]
        tape = wp.Tape()
        with tape:
            final = rollout(model, q0, qd0, inputs, 0.05, substeps, requires_grad=True)
            total = wp.zeros(1, requires_grad=True)
            wp.launch(weighted_state_sum, 7, [final.joint_q, final.joint_qd, wq, wqd], [total])
        tape.zero()  # the model's arrays keep gradients from earlier tapes
        tape.backward(loss=total)
        return np.stack([a.grad.numpy() for a in inputs])

    taped()
    start = time.perf_counter()
    gradient = taped()
    backward = time.perf_counter() - start
    errors = []
    for _ in range(directions):
        direction = rng.normal(size=torques.shape).astype(np.float32)
        numeric = (loss(torques + 3e-2 * direction)[0] - loss(torques - 3e-2 * direction)[0]) / 6e-2
        errors.append(abs(float((gradient * direction).sum()) - numeric) / max(abs(numeric), 1e-9))
    return dict(solver=solver, substeps=substeps, steps=steps, finite=bool(np.isfinite(q_final).all()),
                forward_ms=1e3 * forward, forward_backward_ms=1e3 * backward, max_rel_error=max(errors),
                q_final=np.round(q_final, 4).tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="1,20")
    parser.add_argument("--solvers", default="featherstone:10,semi_implicit:250")
    args = parser.parse_args()
    wp.config.quiet = True
    print("| solver | substeps/step | control steps | finite | fwd [ms] | fwd+bwd [ms] | max rel. grad error | q_T |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.solvers.split(","):
        solver, substeps = spec.split(":")
        for steps in (int(s) for s in args.steps.split(",")):
            r = measure(solver, int(substeps), steps)
            print(f"| {r['solver']} | {r['substeps']} | {r['steps']} | {r['finite']} | {r['forward_ms']:.0f} | "
                  f"{r['forward_backward_ms']:.0f} | {r['max_rel_error']:.1e} | {r['q_final']} |", flush=True)


if __name__ == "__main__":
    main()
