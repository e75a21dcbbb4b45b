"""DiffGym/FrankaTorqueReach-v0: drive a Franka Research 3 arm's tool centre point to a goal by joint torques.

The first Newton task (:class:`diffgym.core.newton_task.NewtonSim`): the arm's rigid-body dynamics
(inertia, Coriolis, gravity, joint limits) are the Newton model of ``diffgym/assets/fr3/fr3.urdf``
(published FR3 inertials, efforts and damping) advanced by ``SolverFeatherstone``; reward, start
distribution, success and rendering are FrankaReach's. Needs the optional ``newton`` extra.
"""

# No ``from __future__ import annotations``: the kernels' vector type is a run-time value.
import dataclasses
from typing import ClassVar

import numpy as np
import torch
import warp as wp

from diffgym.core.env import DiffGymEnv
from diffgym.core.newton_sim import FR3_DOF, fr3_model
from diffgym.core.newton_task import NewtonSim
from diffgym.core.state import SimState
from diffgym.envs.franka_reach import (FR3, GOAL_HIGH, GOAL_LOW, READY_POSE, FrankaReach, draw_reach_start,
                                       fk_tcp, to_vec7, vec7)

EFFORT_LIMITS = (87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0)
"""FR3 joint torque limits [N m] (``franka_description`` ``joint_limits.yaml``; also the URDF's ``effort``)."""
ROTOR_INERTIAS = (0.195, 0.195, 0.195, 0.195, 0.074, 0.074, 0.074)
"""Reflected rotor inertia ("armature") per joint [kg m^2], which the URDF format cannot carry: the values of
MuJoCo Menagerie's FR3 model (``franka_fr3/fr3.xml``, commit 0059d43). Without it the wrist is only the
links' inertia (link 7 with the hand: 0.0018 kg m^2 about its axis), 12 N m spins it to ~300 rad/s within
one 0.05 s step, and its joint-limit spring (1e4 N m/rad) is unstable at 5 ms substeps."""
URDF_DAMPING = 0.003
"""Joint damping in the URDF's ``<dynamics>`` [N m s/rad] (``franka_description`` ``dynamics.yaml``)."""
GRAVITY = 9.81
"""[m/s^2], along -z of the robot base frame (Newton's default up axis)."""


@dataclasses.dataclass(eq=False, frozen=True)
class FrankaTorqueReachState(SimState):
    q: torch.Tensor
    """(B, 7) joint positions [rad]."""
    qd: torch.Tensor
    """(B, 7) joint velocities [rad/s]."""
    goal: torch.Tensor
    """(B, 3) goal position [m] in the robot base frame."""
    step: torch.Tensor
    """(B,) int32 control steps taken this episode."""


@wp.struct
class FrankaTorqueReachParams:
    lower: vec7
    upper: vec7
    effort: vec7
    """Joint torque at |a| = 1 [N m]: the FR3 effort limits."""
    ready: vec7
    reset_noise: float
    goal_low: wp.vec3
    goal_high: wp.vec3
    distance_threshold: float


@wp.func
def _joints(values: wp.array(dtype=float), i: int) -> vec7:
    # env i's 7 entries of a flat Newton joint array
    k = i * 7
    return vec7(values[k], values[k + 1], values[k + 2], values[k + 3], values[k + 4], values[k + 5], values[k + 6])


@wp.func
def _write_observation(i: int, q: vec7, qd: vec7, tcp: wp.vec3, goal: wp.vec3, obs: wp.array2d(dtype=float)):
    for k in range(7):
        obs[i, k] = q[k]
        obs[i, 7 + k] = qd[k]
    for k in range(3):
        obs[i, 14 + k] = tcp[k]
        obs[i, 17 + k] = goal[k] - tcp[k]


@wp.func_replay(_write_observation)
def _write_observation_replay(i: int, q: vec7, qd: vec7, tcp: wp.vec3, goal: wp.vec3, obs: wp.array2d(dtype=float)):
    pass  # the backward's replay must not store: it would rewrite obs (docs/adding_a_task.md)


@wp.kernel
def franka_torque_reach_reset(
    seed: wp.array(dtype=wp.int32),
    episode: wp.array(dtype=wp.int32),
    p: FrankaTorqueReachParams,
    # outputs
    q: wp.array(dtype=vec7),
    qd: wp.array(dtype=vec7),
    goal: wp.array(dtype=wp.vec3),
    step: wp.array(dtype=wp.int32),
):
    i = wp.tid()
    # FrankaReach's draws: a seed starts both tasks alike
    q_start, goal_start = draw_reach_start(seed[i], episode[i], p.ready, p.lower, p.upper, p.reset_noise,
                                           p.goal_low, p.goal_high)
    q[i] = q_start
    goal[i] = goal_start
    qd[i] = vec7()
    step[i] = 0


@wp.kernel
def franka_torque_reach_observe(
    q: wp.array(dtype=vec7),
    qd: wp.array(dtype=vec7),
    goal: wp.array(dtype=wp.vec3),
    step: wp.array(dtype=wp.int32),
    p: FrankaTorqueReachParams,
    # outputs
    obs: wp.array2d(dtype=float),
):
    i = wp.tid()
    _write_observation(i, q[i], qd[i], fk_tcp(q[i]), goal[i], obs)


@wp.kernel
def franka_torque_reach_control(
    q: wp.array(dtype=vec7),
    qd: wp.array(dtype=vec7),
    goal: wp.array(dtype=wp.vec3),
    step: wp.array(dtype=wp.int32),
    action: wp.array(dtype=vec7),
    p: FrankaTorqueReachParams,
    # outputs
    joint_f: wp.array(dtype=float),
):
    i = wp.tid()
    tau = wp.cw_mul(action[i], p.effort)
    for k in range(7):
        joint_f[i * 7 + k] = tau[k]


@wp.kernel
def franka_torque_reach_outcome(
    q: wp.array(dtype=vec7),
    qd: wp.array(dtype=vec7),
    goal: wp.array(dtype=wp.vec3),
    step: wp.array(dtype=wp.int32),
    joint_q: wp.array(dtype=float),
    joint_qd: wp.array(dtype=float),
    p: FrankaTorqueReachParams,
    # outputs
    q_next: wp.array(dtype=vec7),
    qd_next: wp.array(dtype=vec7),
    goal_next: wp.array(dtype=wp.vec3),
    step_next: wp.array(dtype=wp.int32),
    obs: wp.array2d(dtype=float),
    reward: wp.array(dtype=float),
    terminated: wp.array(dtype=wp.int32),
    success: wp.array(dtype=wp.int32),
):
    i = wp.tid()
    qn = _joints(joint_q, i)
    qdn = _joints(joint_qd, i)
    tcp = fk_tcp(qn)
    g = goal[i]
    distance = wp.length(g - tcp)
    q_next[i] = qn
    qd_next[i] = qdn
    goal_next[i] = g
    step_next[i] = step[i] + 1
    _write_observation(i, qn, qdn, tcp, g, obs)
    reward[i] = -distance
    terminated[i] = 0
    success[i] = wp.where(distance < p.distance_threshold, 1, 0)


class FrankaTorqueReach(NewtonSim):
    """Functional twin of :class:`FrankaTorqueReachEnv` (pure ``reset``/``step`` on batched states)."""

    state_type = FrankaTorqueReachState
    obs_dim = 20
    act_dim = 7
    dt = 0.05
    default_max_episode_steps = 100
    reset_kernel = franka_torque_reach_reset
    observe_kernel = franka_torque_reach_observe
    control_kernel = franka_torque_reach_control
    outcome_kernel = franka_torque_reach_outcome
    joint_fields = ("q", "qd")
    dofs_per_env = FR3_DOF
    substeps = 10
    """Featherstone substeps of 5 ms per 0.05 s control step (see the env's docstring)."""
    solver_options = {"use_tile_gemm": True, "fuse_cholesky": False}
    """The joint-space inertia ``H = J^T M J`` summed per body over 6x6 blocks (Newton's tile kernel) instead
    of one dense 42x42 ``M`` times ``J``: the same ``H`` to float32 round-off at 27 % of the multiply-adds; at
    64 envs the dense product was 85 % of the forward and 91 % of the backward (docs/benchmarks.md). The
    Cholesky factorisation stays Newton's dense kernel (``fuse_cholesky=False``)."""
    # The valid domain: every joint within LIMIT_SLACK of its position limits and |qd| <= 50 rad/s. States
    # reached from a reset stay well inside (at most 0.05 rad beyond a limit and 15 rad/s under full-effort
    # random torques, see build_model), and every state inside steps to finite outputs and gradients
    # (tests/test_franka_torque_reach.py, at the domain's corners); far beyond a limit the limit spring
    # (1e4 N m/rad) is unstable at 5 ms substeps (0.5 rad beyond at 50 rad/s: 24,000 rad/s after one step;
    # 1 rad beyond at 100 rad/s: NaN). |q| <= 10 rad and |goal| <= 10 m bound the rest coarsely.
    state_bounds = {"q": 10.0, "qd": 50.0, "goal": 10.0}
    limit_slack: ClassVar[float] = 0.1
    """[rad] how far beyond its position limits a joint of a valid state may be."""

    chain = FR3
    joint_lower: ClassVar[np.ndarray] = FR3.lower.astype(np.float32)
    joint_upper: ClassVar[np.ndarray] = FR3.upper.astype(np.float32)
    effort_limits: ClassVar[np.ndarray] = np.asarray(EFFORT_LIMITS, dtype=np.float32)
    velocity_limits: ClassVar[np.ndarray] = FR3.velocity_limits.astype(np.float32)
    default_joint_damping: ClassVar[np.ndarray] = (URDF_DAMPING + effort_limits / velocity_limits).astype(np.float32)
    """[N m s/rad] per joint: the URDF's 0.003 plus the drives' speed saturation ``tau_max / v_max``, under
    which a joint held at full effort settles at its velocity limit. Without the latter, random full-effort
    torques spun joints to over 100 rad/s (40x the FR3's limits) within 2 s and the rollout went NaN
    (64 envs, 10 substeps); with it the same rollouts stay finite and below 15 rad/s."""

    # FrankaReach's kinematics and renderer read only ``chain``, ``device`` and the state's q and goal
    forward_kinematics = FrankaReach.forward_kinematics
    skeleton = FrankaReach.skeleton
    render_state = FrankaReach.render_state

    def __init__(self, device: str | torch.device = "cpu", max_episode_steps: int | None = None,
                 distance_threshold: float = 0.05, reset_noise: float = 0.1, gravity_compensation: bool = True,
                 joint_damping: float | None = None):
        super().__init__(device, max_episode_steps)
        if not distance_threshold > 0:
            raise ValueError(f"distance_threshold must be positive, got {distance_threshold}")
        if not reset_noise >= 0:
            raise ValueError(f"reset_noise must be >= 0, got {reset_noise}")
        if not isinstance(gravity_compensation, bool):
            raise ValueError(f"gravity_compensation must be True or False, got {gravity_compensation!r}")
        if joint_damping is not None and not (np.isfinite(joint_damping) and joint_damping >= 0):
            raise ValueError(f"joint_damping must be None (default_joint_damping) or a finite value >= 0 [N m s/rad], "
                             f"got {joint_damping}")
        self.distance_threshold = float(distance_threshold)
        self.gravity_compensation = gravity_compensation
        self.joint_damping = joint_damping
        self.params = FrankaTorqueReachParams()
        self.params.lower = to_vec7(self.joint_lower)
        self.params.upper = to_vec7(self.joint_upper)
        self.params.effort = to_vec7(self.effort_limits)
        self.params.ready = to_vec7(READY_POSE)
        self.params.reset_noise = float(reset_noise)
        self.params.goal_low = wp.vec3(*GOAL_LOW)
        self.params.goal_high = wp.vec3(*GOAL_HIGH)
        self.params.distance_threshold = self.distance_threshold

    def build_model(self, num_envs: int, device: str):
        model = fr3_model(num_envs, requires_grad=True, device=device)
        # Gravity compensation adds g(q) at every substep; g(q) cancels the gravity term of the equations
        # of motion exactly (M qdd + C qd + g(q) = tau + g(q)), so the compensated arm *is* the arm without
        # gravity, and simulating that costs no inverse-dynamics pass (tests/test_franka_torque_reach.py
        # checks it against explicit g(q) torques).
        model.set_gravity((0.0, 0.0, 0.0 if self.gravity_compensation else -GRAVITY))
        model.joint_armature.assign(np.tile(np.asarray(ROTOR_INERTIAS, dtype=np.float32), num_envs))
        damping = self.default_joint_damping if self.joint_damping is None else np.full(7, self.joint_damping)
        model.joint_damping.assign(np.tile(damping.astype(np.float32), num_envs))
        return model

    def info(self, out) -> dict[str, torch.Tensor]:
        return {"tcp": out.obs[:, 14:17], "goal": out.state.goal, "distance": -out.reward}

    def _limit_excess(self, state) -> torch.Tensor:
        """(B, 7) how far each joint lies beyond its position limits [rad] (<= 0 inside)."""
        q = state.q.detach()
        lower = torch.as_tensor(self.joint_lower, device=q.device)
        upper = torch.as_tensor(self.joint_upper, device=q.device)
        return torch.maximum(lower - q, q - upper)

    def _outside_task_domain(self, state) -> torch.Tensor:
        return (self._limit_excess(state) > self.limit_slack).any(dim=1)

    def _task_domain_message(self, state, env: int) -> str:
        excess = self._limit_excess(state)[env]
        joint = int(excess.argmax())
        return (f"state.q must lie within {self.limit_slack:g} rad of the FR3 joint limits "
                f"[{self.joint_lower[joint]:.4f}, {self.joint_upper[joint]:.4f}] of joint {joint + 1}, got "
                f"{float(state.q[env, joint]):.4f} in env {env}")


class FrankaTorqueReachEnv(DiffGymEnv):
    """
    ## Description
    A 7-DOF Franka Research 3 arm commanded by joint torques must bring its tool centre point (TCP, 0.1034 m
    beyond the Franka Hand's flange) to a goal in front of it. Unlike `DiffGym/FrankaReach-v0`, whose joints
    follow velocity commands, the arm here has its published dynamics: link masses and inertias, Coriolis
    and centrifugal forces, gravity, joint damping and joint limits, from Franka's URDF
    (`diffgym/assets/fr3/fr3.urdf`) simulated by Newton's Featherstone solver. `differentiable_step` gives
    exact gradients of the whole step (torques, articulated-body dynamics, TCP, reward) with respect to
    the actions and the joint positions and velocities. Needs Newton: `pip install 'diffgym[newton]'`.

    ## Action Space
    `Box(-1, 1, (7,), float32)`: joint torques `tau = a * tau_max` with the FR3 effort limits
    `tau_max = (87, 87, 87, 87, 12, 12, 12)` N m, held for the control step. With
    `gravity_compensation=True` (the default) the arm's controller also cancels gravity, as Franka's own
    controller does under torque control, so `tau` is the torque on top of gravity compensation.
    Out-of-range actions are clipped to [-1, 1]; the clip's gradient is 1 inside the box and 0 outside.

    ## Observation Space
    `Box(-inf, inf, (20,), float32)`: `[q (7), qd (7), tcp (3), goal - tcp (3)]`, joint positions [rad] and
    velocities [rad/s], the TCP position [m] and the vector from the TCP to the goal [m], both in the robot
    base frame (`fr3_link0`). The bounds are infinite: the joint limits are springs (below), so `q` can
    pass a limit by a small amount.

    ## Dynamics
    Articulated rigid-body dynamics of the URDF's 7 revolute joints (fixed joints merged: flange, hand and
    closed fingers ride on link 7), control step dt = 0.05 s = 10 Featherstone substeps of 5 ms (semi-
    implicit Euler in joint coordinates) with the torques held. Gravity 9.81 m/s^2 along -z. With
    `gravity_compensation=True` the gravity torques `g(q)` are added at every substep, which cancels
    gravity exactly, so it is simulated as the arm without gravity. Beyond the URDF (which cannot carry
    them), each joint has the drive's reflected rotor inertia ("armature", MuJoCo Menagerie's FR3 values:
    0.195 kg m^2 on joints 1-4, 0.074 on joints 5-7) and a damping `tau_max / v_max` (33.2, 33.2, 33.2,
    33.2, 2.28, 2.87, 2.28 N m s/rad, plus the URDF's 0.003) that saturates each joint's speed at its FR3
    velocity limit `v_max = (2.62, 2.62, 2.62, 2.62, 5.26, 4.18, 5.26)` rad/s under full effort, as a drive's
    torque-speed curve does (argument `joint_damping` sets one damping for every joint instead). Without
    them, full-effort torques spin the light wrist to hundreds of rad/s within a step and the simulation
    goes non-finite. Joint friction: the URDF's 0.2 N m Coulomb friction is **not** modelled
    (Featherstone ignores it; a smooth `tanh` stand-in would be a stiff term that 5 ms substeps integrate
    explicitly). Joint limits are enforced as Newton enforces them: a spring-damper (1e4 N m/rad,
    10 N m s/rad) acting beyond the FR3 position limits
    `lower = (-2.7437, -1.7837, -2.9007, -3.0421, -2.8065, 0.5445, -3.0159)`,
    `upper = (2.7437, 1.7837, 2.9007, -0.1518, 2.8065, 4.5169, 3.0159)`, so a joint pushed at full effort
    passes its limit by a few hundredths of a radian (at most 0.05 rad in 64 random 10 s rollouts), and
    its gradient is the spring's (no clip). No contacts or self-collisions. The goal does not move.

    ## Valid states
    `set_state` and `differentiable_step` accept finite states with every joint within 0.1 rad of its
    position limits, `|qd| <= 50` rad/s and `|goal| <= 10` m per element, and raise `ValueError` naming the
    field otherwise. Rollouts from a reset stay well inside (at most 0.05 rad beyond a limit and 15 rad/s
    under full-effort random torques); far beyond a limit the limit spring is unstable at 5 ms substeps.

    ## Rewards
    `r = -||tcp' - goal||` [m], the TCP position after the step (as FrankaReach's).

    ## Starting State
    As FrankaReach's: `q = clip(q_ready + U(-0.1, 0.1)^7, lower, upper)` around Franka's ready pose
    `q_ready = (0, -pi/4, 0, -3pi/4, 0, pi/2, pi/4)`, at rest (`qd = 0`); the goal is uniform in the box
    x in [0.3, 0.7], y in [-0.3, 0.3], z in [0.1, 0.6] m (base frame). Both come from Warp's RNG stream
    `(seed, episode)`, drawn as FrankaReach draws them, so a seed starts both tasks alike.

    ## Episode End
    No termination. Truncation after 100 steps (5 s).

    ## Success
    `info["is_success"]`: `||tcp' - goal|| < distance_threshold` (0.05 m). `info` also holds `tcp` (3),
    `goal` (3) and `distance` (`-r`).

    ## Arguments
    `gym.make("DiffGym/FrankaTorqueReach-v0", device="cpu", render_mode=None, distance_threshold=0.05,
    reset_noise=0.1, gravity_compensation=True, joint_damping=None)`; `gym.make_vec(..., num_envs=N)` gives
    the native batched vector env (one Newton model of N arms). `rgb_array` frames are FrankaReach's: the
    arm's skeleton, the TCP (orange), the goal (green) and the goal box from the top (x-y) and the side (x-z).

    ## Version History
    * v0: initial version.
    """

    sim_class = FrankaTorqueReach

    def forward_kinematics(self, q: torch.Tensor) -> torch.Tensor:
        """TCP position ``(B, 3)`` [m] in the base frame for joint positions ``q`` ``(B, 7)`` [rad]; differentiable."""
        return self.sim.forward_kinematics(q)
