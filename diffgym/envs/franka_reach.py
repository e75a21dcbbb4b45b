"""DiffGym/FrankaReach-v0: drive a Franka Research 3 arm's tool centre point to a goal by joint velocities.

The arm's kinematics come from ``diffgym/assets/fr3/fr3.urdf`` (Franka's published FR3 description), parsed at
import by :mod:`diffgym.urdf` and compiled into the step kernel; ``tests/test_urdf_pybullet.py`` checks
them against PyBullet.
"""

# No ``from __future__ import annotations``: the kernels' vector type is a run-time value.
import dataclasses
import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import warp as wp

from diffgym.core.env import DiffGymEnv
from diffgym.core.render import Canvas
from diffgym.core.sim import DiffSim
from diffgym.core.state import SimState
from diffgym.urdf import KinematicChain, load_urdf

FR3_TCP_LINK = "fr3_hand_tcp"


def fr3_urdf_path() -> Path:
    """``diffgym/assets/fr3/fr3.urdf``: package data, installed with DiffGym (wheel or editable)."""
    path = Path(__file__).resolve().parents[1] / "assets" / "fr3" / "fr3.urdf"
    if not path.is_file():
        raise FileNotFoundError(
            f"DiffGym/FrankaReach-v0 needs the FR3 description at {path}, which is missing: this DiffGym "
            f"install lacks its package data (reinstall it, or build the wheel with setuptools >= 70.1)")
    return path


FR3: KinematicChain = load_urdf(fr3_urdf_path(), tip_link=FR3_TCP_LINK)
"""The FR3 chain fr3_link0 (robot base) -> fr3_hand_tcp: 7 revolute joints, then flange, hand and TCP."""
if FR3.dof != 7:
    raise ValueError(f"{FR3.source}: expected the 7 FR3 arm joints up to {FR3_TCP_LINK}, found {FR3.dof}")

vec7 = FR3.vector_type
fk_tcp = FR3.tip_function  # (q: vec7) -> TCP position in the base frame, joints unrolled

READY_POSE = (0.0, -math.pi / 4, 0.0, -3 * math.pi / 4, 0.0, math.pi / 2, math.pi / 4)
"""Franka's 'ready' configuration [rad], the centre of the reset distribution."""
GOAL_LOW = (0.3, -0.3, 0.1)
GOAL_HIGH = (0.7, 0.3, 0.6)
"""The box [m, base frame] goals are drawn from uniformly."""


@dataclasses.dataclass(eq=False, frozen=True)
class FrankaReachState(SimState):
    q: torch.Tensor
    """(B, 7) joint positions [rad], within the FR3 position limits."""
    goal: torch.Tensor
    """(B, 3) goal position [m] in the robot base frame."""
    step: torch.Tensor
    """(B,) int32 control steps taken this episode."""


@wp.struct
class FrankaReachParams:
    dt: float
    lower: vec7
    upper: vec7
    max_speed: vec7
    """Joint speed at |a| = 1 [rad/s]: velocity_scale times the FR3 velocity limits."""
    velocity_gain: float
    """The default of the per-env ``velocity_gain`` array the step kernel reads."""
    ready: vec7
    reset_noise: float
    goal_low: wp.vec3
    goal_high: wp.vec3
    distance_threshold: float
    sparse_reward: int
    """1: r = 0 at the goal (distance < distance_threshold), -1 elsewhere (FrankaReachGoal); 0: r = -distance."""


@wp.func
def _clamp_joints(q: vec7, lower: vec7, upper: vec7) -> vec7:
    # wp.clamp's adjoint passes the gradient to q inside [lower, upper] (ends included), none outside
    return vec7(wp.clamp(q[0], lower[0], upper[0]), wp.clamp(q[1], lower[1], upper[1]),
                wp.clamp(q[2], lower[2], upper[2]), wp.clamp(q[3], lower[3], upper[3]),
                wp.clamp(q[4], lower[4], upper[4]), wp.clamp(q[5], lower[5], upper[5]),
                wp.clamp(q[6], lower[6], upper[6]))


@wp.func
def draw_reach_start(seed: int, episode: int, ready: vec7, lower: vec7, upper: vec7, noise_range: float,
                     goal_low: wp.vec3, goal_high: wp.vec3):
    """The FR3 reaching tasks' start, from Warp's RNG stream ``(seed, episode)``: joints at ``ready`` plus
    ``U(-noise_range, noise_range)`` each (clamped to the limits), then a goal ``U(goal_low, goal_high)``.
    Shared, so one seed starts the kinematic and the torque-controlled task alike."""
    rng = wp.rand_init(seed, episode)
    r = noise_range
    noise = vec7(wp.randf(rng, -r, r), wp.randf(rng, -r, r), wp.randf(rng, -r, r), wp.randf(rng, -r, r),
                 wp.randf(rng, -r, r), wp.randf(rng, -r, r), wp.randf(rng, -r, r))
    goal = wp.vec3(wp.randf(rng, goal_low[0], goal_high[0]), wp.randf(rng, goal_low[1], goal_high[1]),
                   wp.randf(rng, goal_low[2], goal_high[2]))
    return _clamp_joints(ready + noise, lower, upper), goal


@wp.func
def _write_observation(i: int, q: vec7, tcp: wp.vec3, goal: wp.vec3, obs: wp.array2d(dtype=float)):
    for k in range(7):
        obs[i, k] = q[k]
    for k in range(3):
        obs[i, 7 + k] = tcp[k]
        obs[i, 10 + k] = goal[k] - tcp[k]


@wp.func_replay(_write_observation)
def _write_observation_replay(i: int, q: vec7, tcp: wp.vec3, goal: wp.vec3, obs: wp.array2d(dtype=float)):
    pass  # the backward's replay must not store: it would rewrite obs (docs/adding_a_task.md)


@wp.kernel
def franka_reach_reset(
    seed: wp.array(dtype=wp.int32),
    episode: wp.array(dtype=wp.int32),
    p: FrankaReachParams,
    # outputs
    q: wp.array(dtype=vec7),
    goal: wp.array(dtype=wp.vec3),
    step: wp.array(dtype=wp.int32),
):
    i = wp.tid()
    q_start, goal_start = draw_reach_start(seed[i], episode[i], p.ready, p.lower, p.upper, p.reset_noise,
                                           p.goal_low, p.goal_high)
    q[i] = q_start
    goal[i] = goal_start
    step[i] = 0


@wp.kernel
def franka_reach_observe(
    q: wp.array(dtype=vec7),
    goal: wp.array(dtype=wp.vec3),
    step: wp.array(dtype=wp.int32),
    p: FrankaReachParams,
    # outputs
    obs: wp.array2d(dtype=float),
):
    i = wp.tid()
    _write_observation(i, q[i], fk_tcp(q[i]), goal[i], obs)


@wp.kernel
def franka_reach_step(
    q: wp.array(dtype=vec7),
    goal: wp.array(dtype=wp.vec3),
    step: wp.array(dtype=wp.int32),
    action: wp.array(dtype=vec7),
    velocity_gain: wp.array(dtype=float),
    p: FrankaReachParams,
    # outputs
    q_next: wp.array(dtype=vec7),
    goal_next: wp.array(dtype=wp.vec3),
    step_next: wp.array(dtype=wp.int32),
    obs: wp.array2d(dtype=float),
    reward: wp.array(dtype=float),
    terminated: wp.array(dtype=wp.int32),
    success: wp.array(dtype=wp.int32),
):
    i = wp.tid()
    # the gain multiplies the commanded velocity before anything else, so gain 1 leaves every bit (and
    # every adjoint) of the step as it was without it
    velocity = velocity_gain[i] * wp.cw_mul(action[i], p.max_speed)
    qn = _clamp_joints(q[i] + velocity * p.dt, p.lower, p.upper)
    tcp = fk_tcp(qn)
    g = goal[i]
    distance = wp.length(g - tcp)
    q_next[i] = qn
    goal_next[i] = g
    step_next[i] = step[i] + 1
    _write_observation(i, qn, tcp, g, obs)
    # sparse: -1 unless successful (distance < threshold), so r == 0 exactly when info["is_success"]
    reward[i] = wp.where(p.sparse_reward != 0, wp.where(distance < p.distance_threshold, 0.0, -1.0), -distance)
    terminated[i] = 0
    success[i] = wp.where(distance < p.distance_threshold, 1, 0)


@wp.kernel
def franka_reach_info(
    q: wp.array(dtype=vec7),
    goal: wp.array(dtype=wp.vec3),
    step: wp.array(dtype=wp.int32),
    obs: wp.array2d(dtype=float),
    reward: wp.array(dtype=float),
    p: FrankaReachParams,
    # outputs
    info_tcp: wp.array(dtype=wp.vec3),
    info_goal: wp.array(dtype=wp.vec3),
    info_distance: wp.array(dtype=float),
):
    """``info``'s ``tcp``, ``goal`` and ``distance`` after a step, copied out of its outputs (the dense
    reward is ``-distance``; FrankaReachGoal, whose reward may be sparse, computes its own ``info``)."""
    i = wp.tid()
    info_tcp[i] = wp.vec3(obs[i, 7], obs[i, 8], obs[i, 9])
    info_goal[i] = goal[i]
    info_distance[i] = -reward[i]


def to_vec7(values) -> vec7:
    return vec7(*(float(v) for v in values))


class FrankaReach(DiffSim):
    """Functional twin of :class:`FrankaReachEnv` (pure ``reset``/``step`` on batched states)."""

    state_type = FrankaReachState
    obs_dim = 13
    act_dim = 7
    dt = 0.05
    default_max_episode_steps = 100
    reset_kernel = franka_reach_reset
    observe_kernel = franka_reach_observe
    step_kernel = franka_reach_step
    info_kernel = franka_reach_info
    # q beyond the joint limits is clamped back by the step (documented gradient); goals beyond 10 m are
    # far outside the arm's ~1 m reach and keep every distance finite
    state_bounds = {"q": 100.0, "goal": 10.0}
    physical_params = ("velocity_gain",)
    # How closely the joints track the commanded velocity (q' = q + gain * a * max_speed * dt). The step
    # clamps q to the joint limits, so any gain keeps every state finite; the range keeps the task
    # meaningful instead. At 2 a full command at the default velocity_scale (0.5) reaches the FR3's
    # velocity limits, the most the real arm can track; at 0.1 joints 1-4 cover at most 0.66 rad in a
    # 5 s episode at full command, and slower still the arm could barely leave its start. A gain > 0
    # keeps each action's sign and its gradient.
    physics_bounds = {"velocity_gain": (0.1, 2.0)}

    chain: ClassVar[KinematicChain] = FR3
    joint_lower: ClassVar[np.ndarray] = FR3.lower.astype(np.float32)
    """FR3 position limits [rad], as read from the URDF (and by PyBullet)."""
    joint_upper: ClassVar[np.ndarray] = FR3.upper.astype(np.float32)
    velocity_limits: ClassVar[np.ndarray] = FR3.velocity_limits.astype(np.float32)
    """FR3 velocity limits [rad/s]."""
    obs_low = np.concatenate([joint_lower, np.full(6, -np.inf, np.float32)])
    obs_high = np.concatenate([joint_upper, np.full(6, np.inf, np.float32)])

    def __init__(self, device: str | torch.device = "cpu", max_episode_steps: int | None = None,
                 distance_threshold: float = 0.05, velocity_scale: float = 0.5, reset_noise: float = 0.1,
                 velocity_gain: float = 1.0):
        super().__init__(device, max_episode_steps)
        for name, value in (("distance_threshold", distance_threshold), ("velocity_scale", velocity_scale)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not reset_noise >= 0:
            raise ValueError(f"reset_noise must be >= 0, got {reset_noise}")
        self.check_default_physics(velocity_gain=velocity_gain)
        self.distance_threshold = float(distance_threshold)
        self.velocity_scale = float(velocity_scale)
        self.params = FrankaReachParams()
        self.params.dt = self.dt
        self.params.lower = to_vec7(self.joint_lower)
        self.params.upper = to_vec7(self.joint_upper)
        self.params.max_speed = to_vec7(self.velocity_scale * self.velocity_limits)
        self.params.velocity_gain = float(velocity_gain)
        self.params.ready = to_vec7(READY_POSE)
        self.params.reset_noise = float(reset_noise)
        self.params.goal_low = wp.vec3(*GOAL_LOW)
        self.params.goal_high = wp.vec3(*GOAL_HIGH)
        self.params.distance_threshold = self.distance_threshold
        self.params.sparse_reward = 0

    # ----------------------------------------------------------------------------- kinematics
    def forward_kinematics(self, q: torch.Tensor) -> torch.Tensor:
        """TCP position ``(B, 3)`` [m] in the robot base frame for joint positions ``q`` ``(B, 7)`` [rad]
        (float32, on this sim's device); differentiable (Warp adjoint). ``q`` is not clipped to the limits."""
        self.chain.check_configuration(q, self.device)
        return self.chain.forward_kinematics(q)

    def skeleton(self, q: torch.Tensor) -> torch.Tensor:
        """Origins ``(B, 11, 3)`` of the base and of every link frame up to the TCP [m], for drawing."""
        frames = self.chain.link_frames(self.chain.check_configuration(q, self.device))
        return torch.cat([torch.zeros_like(frames[:, :1, :3]), frames[..., :3]], dim=1)

    # ----------------------------------------------------------------------------- contract hooks
    def render_state(self, state: FrankaReachState, index: int = 0) -> np.ndarray:
        with torch.no_grad():
            points = self.skeleton(state.q[index:index + 1])[0].cpu().numpy()
        goal = state.goal[index].cpu().numpy()
        views = []
        # top view (x right, y up) and side view (x right, z up), both looking at the base frame
        for axes, limits in (((0, 1), ((-0.9, 0.9), (-0.9, 0.9))), ((0, 2), ((-0.9, 0.9), (-0.35, 1.45)))):
            canvas = Canvas(240, 240, xlim=limits[0], ylim=limits[1])
            a, b = axes
            box = [(GOAL_LOW[a], GOAL_LOW[b]), (GOAL_HIGH[a], GOAL_LOW[b]),
                   (GOAL_HIGH[a], GOAL_HIGH[b]), (GOAL_LOW[a], GOAL_HIGH[b])]
            canvas.polygon(box, (236, 244, 236))  # where goals are drawn from
            canvas.line((limits[0][0], 0.0), (limits[0][1], 0.0), 0.005, (200, 200, 200))
            canvas.line((0.0, limits[1][0]), (0.0, limits[1][1]), 0.005, (200, 200, 200))
            base = (((-0.08, -0.03), (0.08, -0.03), (0.08, 0.0), (-0.08, 0.0)) if b == 2
                    else ((-0.08, -0.08), (0.08, -0.08), (0.08, 0.08), (-0.08, 0.08)))
            canvas.polygon(base, (150, 150, 150))
            canvas.circle((goal[a], goal[b]), 0.035, (40, 170, 60))
            for start, end in zip(points[:-1], points[1:]):
                canvas.line((start[a], start[b]), (end[a], end[b]), 0.03, (70, 70, 80))
            for point in points[1:-1]:
                canvas.circle((point[a], point[b]), 0.022, (40, 90, 220))
            canvas.circle((points[-1][a], points[-1][b]), 0.025, (220, 120, 30))  # the TCP
            views.append(canvas.image)
        separator = np.full((240, 4, 3), 255 - 40, dtype=np.uint8)
        return np.concatenate([views[0], separator, views[1]], axis=1)


class FrankaReachEnv(DiffGymEnv):
    """
    ## Description
    A 7-DOF Franka Research 3 arm (kinematics from Franka's published URDF, `diffgym/assets/fr3/fr3.urdf`) moves
    its joints by velocity commands and must bring its tool centre point (TCP, 0.1034 m beyond the Franka
    Hand's flange) to a goal in front of it. The kinematics are a Warp kernel, so
    `differentiable_step` gives exact gradients of the TCP, observations and rewards with respect to the
    joint positions, the goal and the actions; `env.unwrapped.forward_kinematics(q)` exposes the TCP
    position of any batch of configurations, with gradients.

    ## Action Space
    `Box(-1, 1, (7,), float32)`: joint velocity commands. Joint `k` moves at
    `a_k * velocity_scale * v_max_k` rad/s with the FR3 velocity limits
    `v_max = (2.62, 2.62, 2.62, 2.62, 5.26, 4.18, 5.26)` and `velocity_scale = 0.5`. Out-of-range
    actions are clipped to [-1, 1]; the clip's gradient is 1 inside the box and 0 outside.

    ## Observation Space
    `Box(low, high, (13,), float32)`: `[q (7), tcp (3), goal - tcp (3)]`, joint positions [rad] (bounded by
    the joint limits), the TCP position [m] and the vector from the TCP to the goal [m], both in the robot
    base frame (`fr3_link0`; the other six bounds are infinite).

    ## Dynamics
    Kinematic, dt = 0.05 s: `q' = clip(q + g * a * velocity_scale * v_max * dt, lower, upper)`, `g` the
    velocity gain (1 by default, below), with the FR3
    position limits `lower = (-2.7437, -1.7837, -2.9007, -3.0421, -2.8065, 0.5445, -3.0159)`,
    `upper = (2.7437, 1.7837, 2.9007, -0.1518, 2.8065, 4.5169, 3.0159)`. Gradient at the limits: the clip
    passes the gradient of `q + a v dt` unchanged when it lies within `[lower, upper]` (ends included) and
    passes none when it lies beyond, so a joint driven into its limit gets no gradient from that step
    (neither to its action nor to its earlier position, nor to the gain). The goal does not move.

    ## Physical parameters
    `velocity_gain` `g` (in [0.1, 2]) is per env and differentiable: how closely the joints track the
    commanded velocity, one scalar for all seven joints. `differentiable_step(state, action,
    physics={"velocity_gain": g})` with `g` a `(B,)` tensor (gradients flow into it), and
    `reset(options={"physics": {"velocity_gain": g}})` sets the value later steps use (domain
    randomisation). The constructor's `velocity_gain` is the default; at 1 every number and gradient is
    the same, bit for bit, as without the parameter. At 2 a full command reaches the FR3 velocity limits
    (at the default `velocity_scale`); at 0.1 joints 1-4 cover at most 0.66 rad in an episode.

    ## Valid states
    `set_state` and `differentiable_step` accept finite states with `|q| <= 100` rad and `|goal| <= 10` m
    per element and raise `ValueError` naming the field otherwise. A `q` outside the joint limits is
    clamped into them by the next step, with the clip's gradient above (none beyond the limits).

    ## Rewards
    `r = -||tcp' - goal||` [m], the TCP position after the step.

    ## Starting State
    `q = clip(q_ready + U(-0.1, 0.1)^7, lower, upper)` around Franka's ready pose
    `q_ready = (0, -pi/4, 0, -3pi/4, 0, pi/2, pi/4)`; the goal is uniform in the box x in [0.3, 0.7],
    y in [-0.3, 0.3], z in [0.1, 0.6] m (base frame). Both come from Warp's RNG stream `(seed, episode)`.

    ## Episode End
    No termination. Truncation after 100 steps (5 s).

    ## Success
    `info["is_success"]`: `||tcp' - goal|| < distance_threshold` (0.05 m, as in panda-gym and Fetch).
    `info` also holds `tcp` (3), `goal` (3) and `distance` (`-r`).

    ## Arguments
    `gym.make("DiffGym/FrankaReach-v0", device="cpu", render_mode=None, distance_threshold=0.05,
    velocity_scale=0.5, reset_noise=0.1, velocity_gain=1.0)`; `gym.make_vec(..., num_envs=N)` gives the
    native batched vector env. `rgb_array` frames show the arm's skeleton, the TCP (orange), the goal (green) and the goal box
    from the top (x-y) and the side (x-z).

    ## Version History
    * v0: initial version.
    """

    sim_class = FrankaReach

    def forward_kinematics(self, q: torch.Tensor) -> torch.Tensor:
        """TCP position ``(B, 3)`` [m] in the base frame for joint positions ``q`` ``(B, 7)`` [rad]; differentiable."""
        return self.sim.forward_kinematics(q)
