"""DiffGym/FrankaTorqueReach-v0 (the Newton task): its dynamics against physics (energy, static equilibrium,
gravity compensation), its gradients against finite differences, and the engine's rules (a fresh solver per
substep; Newton is optional). The contract and API tests every task gets are in test_contract.py,
test_states.py and test_fast_path.py; gravity torques against PyBullet are in test_newton_fr3.py."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import requires_newton

pytestmark = requires_newton

ENV_ID = "DiffGym/FrankaTorqueReach-v0"


def _sim(**kwargs):
    from diffgym.envs.franka_torque_reach import FrankaTorqueReach

    return FrankaTorqueReach(**kwargs)


def _start(sim, q=None, seed=3):
    """A seeded start state (batch 1), optionally moved to joint positions ``q`` at rest."""
    state = sim.reset(torch.tensor([seed], dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
    return state if q is None else state.replace(q=torch.as_tensor(q, dtype=torch.float32).reshape(1, 7))


# ----------------------------------------------------------------------------------------------- physics
def _mechanical_energy(model, q: np.ndarray, qd: np.ndarray, gravity: float) -> float:
    """Kinetic (links and rotor inertias) plus gravitational potential energy [J] of arm 0 of ``model``, from
    Newton's forward kinematics: ``body_qd`` is (COM velocity, angular velocity) in the world frame,
    ``body_inertia`` is about the COM in the body frame."""
    import newton

    state = model.state()
    state.joint_q.assign(q.astype(np.float32))
    state.joint_qd.assign(qd.astype(np.float32))
    newton.eval_fk(model, state.joint_q, state.joint_qd, state)
    poses, twists = state.body_q.numpy().astype(np.float64), state.body_qd.numpy().astype(np.float64)
    mass, inertia, com = model.body_mass.numpy(), model.body_inertia.numpy(), model.body_com.numpy()
    energy = 0.5 * float(np.sum(model.joint_armature.numpy() * qd.astype(np.float64) ** 2))
    for body in range(model.body_count):
        x, y, z, w = poses[body, 3:]
        rotation = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                             [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                             [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
        v, omega = twists[body, :3], twists[body, 3:]
        energy += 0.5 * mass[body] * v @ v + 0.5 * omega @ rotation @ inertia[body] @ rotation.T @ omega
        energy += mass[body] * gravity * (poses[body, 2] + (rotation @ com[body])[2])
    return energy


def _energy_drift(substeps: int, q0, steps: int) -> tuple[np.ndarray, float]:
    """``E(t) - E(0)`` after each of ``steps`` zero-torque control steps and the peak kinetic energy, for the
    arm with gravity, no damping, no gravity compensation and its joint limits removed."""
    from diffgym.envs.franka_torque_reach import GRAVITY, FrankaTorqueReach

    class Substepped(FrankaTorqueReach):
        pass

    Substepped.substeps = substeps
    sim = Substepped(gravity_compensation=False, joint_damping=0.0)
    model = sim.model(1)
    # the limit spring-dampers dissipate by design (kd = 10 N m s/rad: ~40 J lost in 2 s from random poses)
    model.joint_limit_lower.fill_(-1e6)
    model.joint_limit_upper.fill_(1e6)
    state = _start(sim, q0)
    e0 = _mechanical_energy(model, np.asarray(q0, np.float32), np.zeros(7), GRAVITY)
    drift, peak_kinetic = [], 0.0
    with torch.no_grad():
        for _ in range(steps):
            # unchecked step: without limits the links swing beyond the task's valid domain |q| <= 10
            state = sim._step(state, torch.zeros(1, 7)).state
            q, qd = state.q[0].numpy(), state.qd[0].numpy()
            energy = _mechanical_energy(model, q, qd, GRAVITY)
            drift.append(energy - e0)
            peak_kinetic = max(peak_kinetic, energy - _mechanical_energy(model, q, np.zeros(7), GRAVITY))
    return np.asarray(drift), peak_kinetic


@pytest.mark.parametrize("q0", [(0.0, -np.pi / 4, 0.0, -3 * np.pi / 4, 0.0, np.pi / 2, np.pi / 4),
                                (0.3, -0.3, 0.5, -2.0, 0.4, 2.0, 0.5)])
def test_energy_is_conserved_over_2_s_up_to_first_order_integration_error(q0):
    """Zero torque, no damping, no friction, no gravity compensation, 2 s (40 steps of 10 substeps): the arm
    falls and swings through ~70-95 J of kinetic energy. Tolerance: |E(t) - E(0)| <= 15 % of the peak kinetic
    energy (measured 4-12 %: the semi-implicit Euler substeps of 5 ms are first order and not symplectic for
    a configuration-dependent mass matrix). That the drift is integration error, not a modelling error (a
    wrong mass, inertia or rotor inertia would break the energy balance at any substep), shows in its
    convergence: over the first 0.5 s, halving the substep halves the drift (measured ratio 2.0)."""
    drift, peak_kinetic = _energy_drift(10, q0, steps=40)
    assert peak_kinetic > 30.0  # the arm really moved
    assert np.max(np.abs(drift)) <= 0.15 * peak_kinetic, (np.max(np.abs(drift)), peak_kinetic)
    early = np.max(np.abs(drift[:10]))
    finer = np.max(np.abs(_energy_drift(20, q0, steps=10)[0]))
    assert early > 1e-3 and 1.6 < early / finer < 2.5, (early, finer)


def test_gravity_compensation_torques_hold_the_arm_still():
    """``g(q)`` (Newton's inverse dynamics) commanded as the action on the arm *without* the task's gravity
    compensation holds it within 1e-3 rad for 0.5 s; zero torque lets it sag by more than 0.05 rad."""
    from diffgym.core.newton_sim import gravity_torques

    sim = _sim(gravity_compensation=False)
    start = _start(sim)
    hold = torch.as_tensor(gravity_torques(sim.model(1), start.q.numpy()) / sim.effort_limits)
    assert float(hold.abs().max()) < 1  # within the effort limits, so the clip leaves it unchanged
    drift = {}
    for name, action in (("hold", hold), ("zero", torch.zeros(1, 7))):
        state = start
        with torch.no_grad():
            for _ in range(10):
                state = sim.step(state, action).state
        drift[name] = float((state.q - start.q).abs().max())
    assert drift["hold"] < 1e-3 and drift["zero"] > 0.05, drift


def test_gravity_compensation_equals_explicit_gravity_torques_at_every_substep():
    """The task's ``gravity_compensation=True`` (simulated as the arm without gravity) against the arm with
    gravity driven by ``tau + g(q)``, ``g`` recomputed by Newton's inverse dynamics before every substep:
    the same trajectory over 5 steps of random torques, to 1e-4 rad (float32 round-off of two different
    sums); with ``g`` held over a whole step instead the gap is larger (the test's resolution)."""
    from diffgym.core.newton_sim import gravity_torques, simulate
    import warp as wp

    compensated = _sim(gravity_compensation=True)
    explicit = _sim(gravity_compensation=False)
    model = explicit.model(1)
    state = _start(compensated)
    q, qd = state.q.numpy().reshape(-1), state.qd.numpy().reshape(-1)
    actions = torch.as_tensor(np.random.default_rng(0).uniform(-0.3, 0.3, (5, 1, 7)), dtype=torch.float32)
    held_q = q.copy()
    held_qd = qd.copy()
    with torch.no_grad():
        for action in actions:
            state = compensated.step(state, action).state
            tau = (action[0].numpy() * explicit.effort_limits).astype(np.float32)
            for _ in range(explicit.substeps):
                torque = wp.array(tau + gravity_torques(model, q[None])[0], dtype=wp.float32)
                final = simulate(model, wp.array(q), wp.array(qd), [torque], explicit.dt / explicit.substeps, 1)
                q, qd = final.joint_q.numpy(), final.joint_qd.numpy()
            torque = wp.array(tau + gravity_torques(model, held_q[None])[0], dtype=wp.float32)
            final = simulate(model, wp.array(held_q), wp.array(held_qd), [torque], explicit.dt, explicit.substeps)
            held_q, held_qd = final.joint_q.numpy(), final.joint_qd.numpy()
    gap = float(np.abs(state.q.numpy().reshape(-1) - q).max())
    held_gap = float(np.abs(state.q.numpy().reshape(-1) - held_q).max())
    assert gap < 1e-4 and held_gap > 10 * gap, (gap, held_gap)


def test_full_effort_rollouts_stay_finite_within_the_velocity_limits_and_near_the_joint_limits():
    """Random and bang-bang full-effort torques on 16 arms for 4 s: finite, within the valid domain, joints
    at most 0.06 rad beyond their limits (the limit springs) and joint speeds bounded by the drives' speed
    saturation (docstring; without it this rollout went non-finite within 2 s)."""
    sim = _sim()
    batch = 16
    state = sim.reset(torch.arange(batch, dtype=torch.int32), torch.zeros(batch, dtype=torch.int32))
    generator = torch.Generator().manual_seed(0)
    lower, upper = torch.as_tensor(sim.joint_lower), torch.as_tensor(sim.joint_upper)
    worst_excess, fastest = 0.0, 0.0
    with torch.no_grad():
        for t in range(80):
            action = torch.rand(batch, 7, generator=generator) * 2 - 1
            state = sim.step(state, action if t % 40 < 20 else action.sign()).state  # step checks the domain
            worst_excess = max(worst_excess, float(torch.maximum(lower - state.q, state.q - upper).max()))
            fastest = max(fastest, float(state.qd.abs().max()))
    assert worst_excess < 0.06 and fastest < 20.0, (worst_excess, fastest)


def test_a_damped_least_squares_controller_beats_the_reward_threshold():
    """The reference controller behind ``reward_threshold`` (docs/newton.md: -1.31 +- 0.66 over 256 seeded
    episodes, all successful; zero torques -31.8): damped-least-squares joint velocities on the differentiable
    FK, tracked by torques = the drives' damping x desired speed + a velocity feedback. 16 episodes here."""
    import gymnasium as gym

    sim = _sim()
    batch = 16
    damping, effort = torch.as_tensor(sim.default_joint_damping), torch.as_tensor(sim.effort_limits)
    state = sim.reset(torch.arange(batch, dtype=torch.int32), torch.zeros(batch, dtype=torch.int32))
    episode_return = torch.zeros(batch)
    for _ in range(sim.default_max_episode_steps):
        q = state.q.clone().requires_grad_(True)
        tcp = sim.forward_kinematics(q)
        jac = torch.stack([torch.autograd.grad(tcp[:, k].sum(), q, retain_graph=True)[0] for k in range(3)], 1)
        error = (state.goal - tcp.detach()).unsqueeze(-1)
        damped = jac @ jac.transpose(1, 2) + 0.05**2 * torch.eye(3)
        qd_wanted = (jac.transpose(1, 2) @ torch.linalg.solve(damped, 5.0 * error)).squeeze(-1)
        torque = damping * qd_wanted + damping * (qd_wanted - state.qd)
        with torch.no_grad():
            out = sim.step(state, (torque / effort).clamp(-1, 1))
        episode_return += out.reward
        state = out.state
    assert out.success.all()
    assert float(episode_return.mean()) > gym.spec(ENV_ID).reward_threshold + 2.0, episode_return


# ----------------------------------------------------------------------------------------------- gradients
def _directional_check(sim, steps: int, seed: int = 0) -> tuple[float, dict[float, float]]:
    """Autograd's derivative of ``J = w . q_T + 0.1 wd . qd_T`` after ``steps`` chained steps along a random
    direction in (q0, qd0, actions), and central differences of the same rollout at several eps."""
    generator = torch.Generator().manual_seed(seed)
    start = _start(sim)
    actions = (torch.rand(steps, 1, 7, generator=generator) * 2 - 1) * 0.5
    dq, dqd, da = (torch.randn(1, 7, generator=generator), torch.randn(1, 7, generator=generator),
                   torch.randn(steps, 1, 7, generator=generator))
    w, wd = torch.randn(1, 7, generator=generator), torch.randn(1, 7, generator=generator)

    def objective(q0, qd0, a):
        state = start.replace(q=q0, qd=qd0)
        for t in range(steps):
            state = sim.step(state, a[t]).state
        return (w * state.q).sum() + 0.1 * (wd * state.qd).sum()

    q0, qd0, a = (start.q.clone().requires_grad_(True), start.qd.clone().requires_grad_(True),
                  actions.clone().requires_grad_(True))
    objective(q0, qd0, a).backward()
    analytic = float((q0.grad * dq).sum() + (qd0.grad * dqd).sum() + (a.grad * da).sum())
    errors = {}
    with torch.no_grad():
        for eps in (1e-2, 3e-3):
            plus = objective(start.q + eps * dq, start.qd + eps * dqd, actions + eps * da)
            minus = objective(start.q - eps * dq, start.qd - eps * dqd, actions - eps * da)
            errors[eps] = abs(float(plus - minus) / (2 * eps) - analytic) / abs(analytic)
    return analytic, errors


# Bound on the better of eps = 1e-2 and 3e-3. The float32 central differences' error is truncation (eps^2,
# dominant above 1e-2) plus round-off (~1e-7 / eps, dominant below 3e-3): sweeping eps from 0.1 to 3e-4 on
# such rollouts, the relative gap fell as eps^2 to 1e-5 to 4e-5 at eps 3e-3 to 1e-2 and rose again below.
# Here it measures 2.5e-5 to 2e-4 (20 steps, 1 s), so 1e-3 leaves 5x; a shared solver (below) misses it by
# 4-25x at every eps. docs/newton.md's earlier 8e-3 and 7e-2 over 20 steps were finite-difference error: on
# the undamped arm (URDF damping only, no rotor inertia) the same sweep fell from 0.27 at eps 0.1 to 3e-5 at
# 1e-3 with gravity compensation, and without it the falling arm reached its joint limits, whose spring
# force has a kink at the limit that central differences across it cannot resolve.
GRADIENT_BOUND = 1e-3


@pytest.mark.parametrize("steps", [1, 20])
@pytest.mark.parametrize("gravity_compensation", [True, False])
def test_gradients_match_central_differences(steps, gravity_compensation):
    sim = _sim(gravity_compensation=gravity_compensation)
    analytic, errors = _directional_check(sim, steps)
    assert abs(analytic) > 1e-2 and min(errors.values()) < GRADIENT_BOUND, (analytic, errors)


def test_sharing_one_solver_across_substeps_breaks_the_gradient(monkeypatch):
    """The engine's rule (a fresh SolverFeatherstone per taped substep) is what makes the gradient right: with
    one solver per model the same check misses the bound (measured 4e-3 to 2.5e-2 at every eps), so the
    gradient check above can fail."""
    import newton

    original, shared = newton.solvers.SolverFeatherstone, {}
    monkeypatch.setattr(newton.solvers, "SolverFeatherstone",
                        lambda model, **kwargs: shared.setdefault(id(model), original(model, **kwargs)))
    _, errors = _directional_check(_sim(gravity_compensation=False), steps=1)
    assert min(errors.values()) > 2 * GRADIENT_BOUND, errors


def test_a_differentiated_step_replays_its_recording_and_matches_an_eager_tape(monkeypatch):
    """The recorded step (docs/benchmarks.md: ~30x cheaper at one env) builds its solvers once per batch size,
    not per step, and gives what an eager ``wp.Tape`` over ``simulate`` (fresh states and solvers per
    substep, the engine's reference) gives: the same next state and input gradients, batch of 3."""
    import newton
    import warp as wp
    from diffgym.core.newton_sim import simulate

    original, built = newton.solvers.SolverFeatherstone, []
    monkeypatch.setattr(newton.solvers, "SolverFeatherstone",
                        lambda model, **kwargs: built.append(1) or original(model, **kwargs))
    sim = _sim(gravity_compensation=False)
    batch = 3
    start = sim.reset(torch.arange(batch, dtype=torch.int32), torch.zeros(batch, dtype=torch.int32))
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(batch * 7, generator=generator)
    for _ in range(3):
        q, qd = start.q.reshape(-1).clone().requires_grad_(True), start.qd.reshape(-1).clone().requires_grad_(True)
        tau = (torch.rand(batch * 7, generator=generator) * 20 - 10).requires_grad_(True)
        q_next, qd_next = sim.advance(q, qd, tau)
        ((weights * q_next).sum() + 0.1 * (weights * qd_next).sum()).backward()
    assert len(built) == sim.substeps, len(built)  # the taped step's solvers, built on the first step only

    inputs = [wp.array(t.detach().numpy(), requires_grad=True) for t in (q, qd, tau)]
    tape = wp.Tape()
    with tape:
        final = simulate(sim.model(batch), inputs[0], inputs[1], [inputs[2]], sim.dt, sim.substeps, requires_grad=True)
    tape.zero()
    final.joint_q.grad.assign(weights.numpy())
    final.joint_qd.grad.assign(0.1 * weights.numpy())
    tape.backward()
    np.testing.assert_allclose(q_next.detach().numpy(), final.joint_q.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(qd_next.detach().numpy(), final.joint_qd.numpy(), rtol=0, atol=1e-5)
    for ours, eager in zip((q.grad, qd.grad, tau.grad), inputs):
        np.testing.assert_allclose(ours.numpy(), eager.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_without_graphs_as_on_cuda_steps_and_gradients_are_the_captured_ones(monkeypatch):
    """On CUDA the engine captures no graph (torch's default stream, where its launches run, refuses a
    capture) and issues the recorded launches again at every step: that path, run on the CPU, gives what
    the graphs give, bit for bit (two chained differentiated steps, so the first step's backward recomputes
    its forward, and an untaped step), and captures nothing."""
    import types

    import warp as wp
    from diffgym.core import newton_task

    assert newton_task._captures_graphs(wp.get_device("cpu"))
    assert not newton_task._captures_graphs(types.SimpleNamespace(is_cuda=True))

    def steps(sim):
        start = sim.reset(torch.arange(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32))
        action = torch.linspace(-0.8, 0.8, 14).reshape(2, 7).requires_grad_(True)
        last = sim.step(sim.step(start, action).state, 0.5 * action)
        last.reward.sum().backward()
        with torch.no_grad():
            untaped = sim.step(start, action)
        assert bool((action.grad != 0).any()) and not torch.equal(untaped.state.q, start.q)  # something to compare
        return [*last.state.tensors(), last.reward, action.grad, *untaped.state.tensors()]

    captured = steps(_sim())
    monkeypatch.setattr(newton_task, "_captures_graphs", lambda device: False)
    monkeypatch.setattr(wp, "ScopedCapture", lambda *args, **kwargs: pytest.fail("captured a graph"))
    direct = steps(_sim())
    for ours, graphs in zip(direct, captured, strict=True):
        assert torch.equal(ours, graphs)


def test_backward_twice_on_one_model_gives_the_same_gradient():
    """Gradient ownership across tapes: the model's arrays are on every step's tape; two backwards through
    the same shared model (and a retained graph run twice) give identical gradients."""
    sim = _sim(gravity_compensation=False)
    start = _start(sim)
    grads = []
    for _ in range(2):
        action = torch.full((1, 7), 0.2, requires_grad=True)
        sim.step(sim.step(start, action).state, action).reward.sum().backward()
        grads.append(action.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    action = torch.full((1, 7), 0.2, requires_grad=True)
    reward = sim.step(start, action).reward.sum()
    first, = torch.autograd.grad(reward, action, retain_graph=True)
    second, = torch.autograd.grad(reward, action)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- engine
def test_step_outputs_are_fresh_and_inputs_untouched():
    sim = _sim()
    start = _start(sim)
    before = start.clone()
    action = torch.full((1, 7), 0.5)
    a, b = sim.step(start, action), sim.step(start, action)
    for x, y in zip(start.tensors(), before.tensors()):
        assert torch.equal(x, y)
    for x, y in zip(a.state.tensors(), b.state.tensors()):
        assert torch.equal(x, y) and x.data_ptr() != y.data_ptr()


def test_batched_envs_are_independent_articulations():
    """Env i of a batch of 3 steps exactly as a batch of 1 from the same state (one articulation per env)."""
    sim = _sim()
    batch = sim.reset(torch.arange(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))
    actions = torch.as_tensor(np.random.default_rng(1).uniform(-1, 1, (3, 7)), dtype=torch.float32)
    with torch.no_grad():
        together = sim.step(batch, actions).state
        for i in range(3):
            alone = sim.step(batch[i], actions[i:i + 1]).state
            for x, y in zip(alone.tensors(), together[i].tensors()):
                torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_bad_arguments_are_rejected_in_one_line():
    with pytest.raises(ValueError, match="joint_damping must be None"):
        _sim(joint_damping=-1.0)
    with pytest.raises(ValueError, match="gravity_compensation must be True or False"):
        _sim(gravity_compensation="yes")


def test_a_newton_task_must_declare_its_contract():
    from diffgym.core.contract import TaskContractError
    from diffgym.envs import franka_torque_reach as ftr

    with pytest.raises(TaskContractError, match="joint_fields must name"):
        class NoJoints(ftr.FrankaTorqueReach):
            joint_fields = ("q", "goal_x")
    with pytest.raises(TaskContractError, match="control_kernel.*named 'q_in', expected 'q'"):
        import warp as wp

        @wp.kernel
        def control(q_in: wp.array(dtype=ftr.vec7), qd: wp.array(dtype=ftr.vec7), goal: wp.array(dtype=wp.vec3),
                    step: wp.array(dtype=wp.int32), action: wp.array(dtype=ftr.vec7),
                    p: ftr.FrankaTorqueReachParams, joint_f: wp.array(dtype=float)):
            i = wp.tid()
            joint_f[i] = action[i][0]

        class Renamed(ftr.FrankaTorqueReach):
            control_kernel = control
    with pytest.raises(TaskContractError, match="substeps must be a positive int"):
        class NoSubsteps(ftr.FrankaTorqueReach):
            substeps = 0


def test_making_the_env_without_newton_raises_one_line():
    """``import diffgym`` works without Newton; making the task says how to install it (a subprocess whose
    ``import newton`` fails)."""
    code = ("import sys; sys.modules['newton'] = None\n"
            "import gymnasium as gym, diffgym\n"
            "assert 'DiffGym/FrankaTorqueReach-v0' in diffgym.ALL_TASK_IDS\n"
            "try:\n    gym.make('DiffGym/FrankaTorqueReach-v0')\n"
            "except ImportError as error:\n    print('ERROR:', error)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("ERROR:")]
    assert len(line) == 1 and "pip install 'diffgym[newton]'" in line[0]


def test_every_state_of_the_domain_steps_to_finite_values_and_gradients():
    """The domain's corners (every joint 0.1 rad beyond a limit, |qd| = 50 rad/s, full-effort torques), with
    and without gravity compensation: one step gives finite outputs and gradients."""
    for gravity_compensation in (True, False):
        sim = _sim(gravity_compensation=gravity_compensation)
        batch = 32
        generator = torch.Generator().manual_seed(0)
        slack = 0.999 * sim.limit_slack  # inside the domain after float32 rounding of limit + slack
        lower = torch.as_tensor(sim.joint_lower) - slack
        upper = torch.as_tensor(sim.joint_upper) + slack
        q = torch.where(torch.rand(batch, 7, generator=generator) < 0.5, lower, upper).requires_grad_(True)
        qd = (torch.randint(0, 2, (batch, 7), generator=generator) * 2.0 - 1.0).mul(50.0).requires_grad_(True)
        action = torch.randint(0, 2, (batch, 7), generator=generator).mul(2.0).sub(1.0).requires_grad_(True)
        start = sim.reset(torch.arange(batch, dtype=torch.int32), torch.zeros(batch, dtype=torch.int32))
        out = sim.step(start.replace(q=q, qd=qd), action)
        (out.reward.sum() + out.obs.sum()).backward()
        for tensor in (out.obs, out.reward, *out.state.tensors(), q.grad, qd.grad, action.grad):
            assert torch.isfinite(tensor).all()


def test_states_beyond_the_joint_limits_slack_are_rejected_by_name():
    sim = _sim()
    state = _start(sim)
    beyond = state.q.clone()
    beyond[0, 3] = float(sim.joint_upper[3]) + 0.11
    with pytest.raises(ValueError, match=r"^state\.q must lie within 0.1 rad of the FR3 joint limits .* of joint 4"):
        sim.step(state.replace(q=beyond), torch.zeros(1, 7))
    inside = state.q.clone()
    inside[0, 3] = float(sim.joint_upper[3]) + 0.09
    sim.step(state.replace(q=inside), torch.zeros(1, 7))
