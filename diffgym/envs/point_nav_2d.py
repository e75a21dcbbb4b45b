"""DiffGym/PointNav2D-v0: steer a point mass (1 kg by default) around disc obstacles to a goal in a walled arena.

Contact with the obstacles and walls is a smooth penalty (a spring-damper on the penetration depth), so
the dynamics stay differentiable everywhere and the step kernel's Warp adjoint is exact. The point's mass
and its velocity drag are per-env, differentiable physical parameters (``physical_params``, docs/api.md).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import warp as wp

from diffgym.core.env import DiffGymEnv
from diffgym.core.render import Canvas
from diffgym.core.sim import DiffSim
from diffgym.core.state import SimState
from diffgym.envs.pre_contact import (PEAK_FRACTION, check_contact_gradient_distance, install, pre_contact_profile,
                                      straight_through)

# ----------------------------------------------------------------------------------------- fixed layout
ARENA_HALF_WIDTH = 2.0
"""The arena is the square [-2, 2]^2 m, bounded by four walls."""
BODY_RADIUS = 0.05
"""Contact radius of the point mass [m]: contact starts when its centre is this close to a surface."""
OBSTACLES = np.array([
    # x [m], y [m], radius [m]
    [0.00, 0.00, 0.50],    # centre: blocks the straight diagonal from start to goal
    [-1.00, 0.40, 0.35],   # upper left of the centre
    [0.40, -1.00, 0.35],   # lower right of the centre
    [-0.90, -0.90, 0.25],  # cuts into the start region
    [0.95, 0.95, 0.25],    # cuts into the goal region
], dtype=np.float32)
"""The fixed obstacle layout, one disc per row."""
NUM_OBSTACLES = len(OBSTACLES)
START_REGION = (-1.8, -0.8)
"""Start positions are drawn from [-1.8, -0.8]^2 (lower left) ..."""
GOAL_REGION = (0.8, 1.8)
"""... and goals from [0.8, 1.8]^2 (upper right), both rejecting points near an obstacle."""
RESET_CLEARANCE = 0.05
"""Start and goal keep at least this gap [m] between the body and every obstacle surface."""
MAX_RESET_TRIES = 64
"""Rejection-sampling budget; a draw rejected that often falls back to the region's free far corner."""

STIFFNESS = 4000.0
"""Contact spring [N/m]: a mass at the top speed of 5.66 m/s stops within v / sqrt(k/m) = 0.09 m (< every radius)."""
DAMPING = 40.0
"""Contact damper [N s/m] (damping ratio ~0.32 at 1 kg): impacts lose energy."""
NORMAL_CORE = 0.5
"""Within ``NORMAL_CORE * (radius + BODY_RADIUS)`` of an obstacle's centre the contact normal shrinks
linearly to zero instead of staying a unit vector, so its gradient is bounded there (a unit radial
normal's grows like 1 / distance and is undefined at the centre). Unreachable from any physical state:
the body gets there only after penetrating an obstacle by at least 0.15 m, and the spring stops it within
0.09 m."""
POSITION_BOUND = 10.0
"""Valid domain: |pos|, |goal| <= 10 m per axis (the arena is [-2, 2]^2; contact keeps the body within 2.04 m)."""
VELOCITY_BOUND = 100.0
"""Valid domain: |vel| <= 100 m/s per axis (drag caps the speed at 5.7 m/s and contacts do not add energy)."""
SUBSTEPS = 8
"""Semi-implicit Euler substeps per 0.05 s control step (h = 6.25 ms; omega h = 0.4 for the contact spring)."""
MASS_RANGE = (0.5, 2.0)
"""Valid per-env mass [kg]. At 0.5 kg the contact spring's omega h = sqrt(k/m) h is 0.56 and the explicit
integrator's stability measure for a fully damped contact, (k h^2 + 2 (c + drag) h) / m, is 1.4 against a
limit of 4, so contacts stay stable and accurate; at 2 kg the spring still stops the body from the top
speed of 5.66 m/s within v / omega = 0.13 m (measured: 0.07 m), under the smallest obstacle radius plus body
radius (0.30 m) and the 0.15 m penetration that reaches ``NORMAL_CORE``."""
DRAG_RANGE = (0.0, 2.0)
"""Valid per-env velocity drag [N s/m]: none (``drag=0.0`` has always been allowed) to 8x the default,
whose top speed sqrt(2) / drag = 0.71 m/s still crosses the arena within an episode; drag h / m <= 0.025."""

_NUM_OBSTACLES = wp.constant(NUM_OBSTACLES)  # compile-time trip counts so the adjoint replays every loop
_SUBSTEPS = wp.constant(SUBSTEPS)
_MAX_RESET_TRIES = wp.constant(MAX_RESET_TRIES)
# ``contact_force_and_touching``'s bitmask of the surfaces in range: bit k for obstacle k, then one bit per
# wall after the obstacles' (derived from their count, so another obstacle cannot take a wall's bit)
_TOUCHING_WALL_POS_X = wp.constant(1 << NUM_OBSTACLES)
_TOUCHING_WALL_NEG_X = wp.constant(1 << (NUM_OBSTACLES + 1))
_TOUCHING_WALL_POS_Y = wp.constant(1 << (NUM_OBSTACLES + 2))
_TOUCHING_WALL_NEG_Y = wp.constant(1 << (NUM_OBSTACLES + 3))
assert NUM_OBSTACLES + 4 <= 31, "the touching bitmask is a signed 32-bit int: at most 27 obstacles"
_ObstacleMatrix = wp.types.matrix(shape=(NUM_OBSTACLES, 3), dtype=wp.float32)
# A compile-time constant rather than a field of the params struct: every read of a struct's matrix field
# copies the whole matrix, and its adjoint adds a whole matrix to the struct's (never used) adjoint, which
# made the backward pass several times the forward's cost even out of contact.
_OBSTACLES = wp.constant(_ObstacleMatrix(*OBSTACLES.flatten().tolist()))

OBS_DIM = 6 + 3 * NUM_OBSTACLES
# Unrolled, the step kernel's loop over the observation's entries stores and differentiates one entry at a
# time; as a dynamic loop (Warp's default max_unroll is 16) each of its 21 iterations copied the whole
# observation and, in the adjoint, added a whole zero-initialised one to its gradient (a fifth of the
# adjoint launch out of contact). Unrolling changes no value: the loop only moves entries.
wp.set_module_options({"max_unroll": OBS_DIM})


@dataclasses.dataclass(eq=False, frozen=True)
class PointNav2DState(SimState):
    pos: torch.Tensor
    """(B, 2) position [m]."""
    vel: torch.Tensor
    """(B, 2) velocity [m/s]."""
    goal: torch.Tensor
    """(B, 2) goal position [m]."""
    step: torch.Tensor
    """(B,) int32 control steps taken this episode."""


@wp.struct
class PointNav2DParams:
    dt: float
    mass: float
    max_force: float
    drag: float
    stiffness: float
    damping: float
    contact_smoothing: float
    contact_gradient_distance: float
    contact_gradient_peak: float
    body_radius: float
    arena_half_width: float
    normal_core: float
    penetration_weight: float
    success_distance: float
    start_low: float
    start_high: float
    goal_low: float
    goal_high: float
    reset_clearance: float


# ----------------------------------------------------------------------------------------- contact model
@wp.func
def soft_depth(depth: float, smoothing: float):
    """Penetration with a C1 onset: 0 below 0, depth^2/(2 s) on [0, s], depth - s/2 beyond.

    Its derivative is the ramp clamp(depth / s, 0, 1), so contact forces and their gradients are
    continuous as the body touches a surface.
    """
    inner = wp.clamp(depth, 0.0, smoothing)
    return inner * inner / (2.0 * smoothing) + wp.max(depth - smoothing, 0.0)


@wp.func
def obstacle_center(p: PointNav2DParams, k: int):
    return wp.vec2(_OBSTACLES[k, 0], _OBSTACLES[k, 1])


@wp.func
def obstacle_radius(k: int):
    return _OBSTACLES[k, 2]


def _make_contact_force(pre_contact: bool):
    """``contact_force`` with the exact penalty, or with the pre-contact surrogate's (``pre_contact``,
    diffgym.envs.pre_contact), chosen when the code is generated (``wp.static``): the exact variant is
    the exact law, op for op; and from the same code ``contact_force_and_touching``, which also returns the
    surfaces in range as bits (the same force, bit for bit)."""

    def penalty_force(depth: float, normal: wp.vec2, vel: wp.vec2, p: PointNav2DParams):
        """Spring-damper force along the outward unit ``normal`` for a body penetrating ``depth`` [m].

        The damper fades in with a smoothstep over the same band as the spring's onset, so the force is
        C1 in the state (finite differences converge) and exactly zero out of contact (no force, no gradient).
        """
        t = wp.clamp(depth / p.contact_smoothing, 0.0, 1.0)
        damper_gate = t * t * (3.0 - 2.0 * t)
        spring = p.stiffness * soft_depth(depth, p.contact_smoothing)
        if wp.static(pre_contact):  # the surrogate's tail: the spring reaches out to the distance
            spring = spring + p.contact_gradient_peak * pre_contact_profile(
                -depth, p.contact_gradient_distance, p.contact_smoothing)
        magnitude = spring - p.damping * damper_gate * wp.dot(vel, normal)
        return magnitude * normal

    variant = "pre_contact" if pre_contact else "exact"
    module = "unique" if pre_contact else None  # only the pre-contact kernels compile the surrogate
    penalty_force = wp.func(penalty_force, name=f"penalty_force_{variant}", module=module)

    def make_contact_force(with_touching: bool):
        def contact_force(pos: wp.vec2, vel: wp.vec2, p: PointNav2DParams):
            """Total penalty force of the obstacles and the four walls on a body at ``pos`` moving at ``vel``."""
            # Broad phase: a surface the body does not penetrate (depth <= 0; for the surrogate, one farther
            # than its distance) exerts exactly zero force with exactly zero derivatives, so it is skipped,
            # sparing the forward and above all the adjoint its terms.
            force = wp.vec2(0.0, 0.0)
            # with_touching: also which surfaces are in range, bit k for obstacle k, then the walls at +x, -x,
            # +y and -y (_TOUCHING_WALL_*; the whole step's adjoint then skips the others without measuring them)
            touching = int(0)
            for k in range(_NUM_OBSTACLES):
                offset = pos - obstacle_center(p, k)
                distance = wp.length(offset)
                reach = obstacle_radius(k) + p.body_radius
                in_range = reach
                if wp.static(pre_contact):
                    in_range = reach + p.contact_gradient_distance
                if distance < in_range:
                    # the unit normal outside the (unreachable) core, shrinking to 0 at the centre: bounded gradient
                    normal = offset / wp.max(distance, p.normal_core * reach)
                    force = force + penalty_force(reach - distance, normal, vel, p)
                    touching = touching | (1 << k)
            limit = p.arena_half_width - p.body_radius
            wall_range = limit
            if wp.static(pre_contact):
                wall_range = limit - p.contact_gradient_distance
            if pos[0] > wall_range:
                force = force + penalty_force(pos[0] - limit, wp.vec2(-1.0, 0.0), vel, p)
                touching = touching | _TOUCHING_WALL_POS_X
            if pos[0] < -wall_range:
                force = force + penalty_force(-limit - pos[0], wp.vec2(1.0, 0.0), vel, p)
                touching = touching | _TOUCHING_WALL_NEG_X
            if pos[1] > wall_range:
                force = force + penalty_force(pos[1] - limit, wp.vec2(0.0, -1.0), vel, p)
                touching = touching | _TOUCHING_WALL_POS_Y
            if pos[1] < -wall_range:
                force = force + penalty_force(-limit - pos[1], wp.vec2(0.0, 1.0), vel, p)
                touching = touching | _TOUCHING_WALL_NEG_Y
            if wp.static(with_touching):
                return force, touching
            else:
                return force

        name = f"contact_force_and_touching_{variant}" if with_touching else f"contact_force_{variant}"
        return wp.func(contact_force, name=name, module=module)

    return make_contact_force(False), make_contact_force(True)


@wp.func
def total_soft_penetration(pos: wp.vec2, p: PointNav2DParams):
    """Sum of ``soft_depth`` over every obstacle and wall [m]: the reward's penetration term."""
    total = float(0.0)
    for k in range(_NUM_OBSTACLES):
        distance = wp.length(pos - obstacle_center(p, k))
        total = total + soft_depth(obstacle_radius(k) + p.body_radius - distance, p.contact_smoothing)
    limit = p.arena_half_width - p.body_radius
    total = total + soft_depth(pos[0] - limit, p.contact_smoothing) + soft_depth(-limit - pos[0], p.contact_smoothing)
    total = total + soft_depth(pos[1] - limit, p.contact_smoothing) + soft_depth(-limit - pos[1], p.contact_smoothing)
    return total


@wp.func
def obstacle_clearance(pos: wp.vec2, p: PointNav2DParams):
    """Smallest gap [m] between the body's surface and an obstacle surface (negative when penetrating)."""
    clearance = float(1.0e9)
    for k in range(_NUM_OBSTACLES):
        gap = wp.length(pos - obstacle_center(p, k)) - obstacle_radius(k) - p.body_radius
        clearance = wp.min(clearance, gap)
    return clearance


_Observation = wp.types.vector(length=OBS_DIM, dtype=float)


@wp.func
def observation(pos: wp.vec2, vel: wp.vec2, goal: wp.vec2, p: PointNav2DParams) -> _Observation:
    o = _Observation()
    o[0] = pos[0]
    o[1] = pos[1]
    o[2] = vel[0]
    o[3] = vel[1]
    o[4] = goal[0] - pos[0]
    o[5] = goal[1] - pos[1]
    for k in range(_NUM_OBSTACLES):
        offset = obstacle_center(p, k) - pos
        o[6 + 3 * k] = offset[0]
        o[7 + 3 * k] = offset[1]
        o[8 + 3 * k] = wp.length(offset) - obstacle_radius(k) - p.body_radius
    return o


@wp.func
def _write_observation(i: int, o: _Observation, obs: wp.array2d(dtype=float)):
    for k in range(OBS_DIM):
        obs[i, k] = o[k]


@wp.func_replay(_write_observation)
def _write_observation_replay(i: int, o: _Observation, obs: wp.array2d(dtype=float)):
    pass  # the backward's replay must not store: it would rewrite obs (docs/adding_a_task.md)


@wp.func
def step_reward(pos: wp.vec2, goal: wp.vec2, p: PointNav2DParams):
    """The reward of a step that ends at ``pos``, and the distance to the goal."""
    distance = wp.length(pos - goal)
    return -distance - p.penetration_weight * total_soft_penetration(pos, p), distance


contact_force, contact_force_and_touching = _make_contact_force(pre_contact=False)
_surrogate_contact_force, _ = _make_contact_force(pre_contact=True)


# The exact contact force's adjoint, written by hand. Warp's generated adjoint of ``contact_force`` replays
# the function and then reverses it with every intermediate's adjoint zero-initialised, all five obstacles'
# and four walls' branches included whether or not they are in contact: about ten times the function's own
# cost, once per substep. This one recomputes only what the chain rule needs, inside the branches in
# contact. The same derivatives as the generated adjoint, term for term (so equal to float32 round-off:
# only the order of the sums differs), including its choices at the kinks: the normal's core
# ``max(distance, core * reach)`` passes the gradient to ``distance`` only when ``distance`` is larger, and
# ``wp.length`` none at zero length.
@wp.func
def _penalty_force_adjoint(depth: float, normal: wp.vec2, vel: wp.vec2, p: PointNav2DParams, adj_force: wp.vec2):
    """The gradients of ``penalty_force_exact(depth, normal, vel, p)`` with respect to ``depth``, ``normal``
    and ``vel``, given the gradient ``adj_force`` of the force it returns (``depth > 0``)."""
    t = wp.clamp(depth / p.contact_smoothing, 0.0, 1.0)
    damper_gate = t * t * (3.0 - 2.0 * t)
    approach = wp.dot(vel, normal)
    magnitude = p.stiffness * soft_depth(depth, p.contact_smoothing) - p.damping * damper_gate * approach
    adj_magnitude = wp.dot(adj_force, normal)
    adj_approach = -p.damping * damper_gate * adj_magnitude
    # soft_depth's derivative is the ramp t, the gate's 6 t (1 - t) / s (zero outside the band, where t is 0 or 1)
    gate_slope = 6.0 * t * (1.0 - t) / p.contact_smoothing
    adj_depth = adj_magnitude * (p.stiffness * t - p.damping * gate_slope * approach)
    return adj_depth, magnitude * adj_force + adj_approach * vel, adj_approach * normal


@wp.func
def contact_force_gradients(pos: wp.vec2, vel: wp.vec2, p: PointNav2DParams, touching: int, adj_ret: wp.vec2):
    """The gradients of ``contact_force(pos, vel, p)`` with respect to ``pos`` and ``vel``, given the
    surfaces in range there (``contact_force_and_touching``'s bits) and the gradient ``adj_ret`` of the
    force (its adjoint, and the whole step's)."""
    adj_pos = wp.vec2(0.0, 0.0)
    adj_vel = wp.vec2(0.0, 0.0)
    for k in range(_NUM_OBSTACLES):
        if (touching & (1 << k)) != 0:  # distance < reach
            offset = pos - obstacle_center(p, k)
            distance = wp.length(offset)
            reach = obstacle_radius(k) + p.body_radius
            core = p.normal_core * reach
            scale = wp.max(distance, core)
            normal = offset / scale
            adj_depth, adj_normal, adj_v = _penalty_force_adjoint(reach - distance, normal, vel, p, adj_ret)
            adj_vel = adj_vel + adj_v
            # normal = offset / scale, depth = reach - distance, distance = |offset|
            adj_distance = -adj_depth
            if distance > core:
                adj_distance = adj_distance - wp.dot(offset, adj_normal) / (scale * scale)
            adj_offset = adj_normal / scale
            if distance > 0.0:  # wp.length's adjoint: none at zero length
                adj_offset = adj_offset + offset / distance * adj_distance
            adj_pos = adj_pos + adj_offset
    # the walls: depth pos[0] - limit along (-1, 0), -limit - pos[0] along (1, 0), and so on; constant normals
    limit = p.arena_half_width - p.body_radius
    if (touching & _TOUCHING_WALL_POS_X) != 0:  # pos[0] > limit
        adj_depth, adj_normal, adj_v = _penalty_force_adjoint(pos[0] - limit, wp.vec2(-1.0, 0.0), vel, p, adj_ret)
        adj_pos = adj_pos + wp.vec2(adj_depth, 0.0)
        adj_vel = adj_vel + adj_v
    if (touching & _TOUCHING_WALL_NEG_X) != 0:  # pos[0] < -limit
        adj_depth, adj_normal, adj_v = _penalty_force_adjoint(-limit - pos[0], wp.vec2(1.0, 0.0), vel, p, adj_ret)
        adj_pos = adj_pos - wp.vec2(adj_depth, 0.0)
        adj_vel = adj_vel + adj_v
    if (touching & _TOUCHING_WALL_POS_Y) != 0:  # pos[1] > limit
        adj_depth, adj_normal, adj_v = _penalty_force_adjoint(pos[1] - limit, wp.vec2(0.0, -1.0), vel, p, adj_ret)
        adj_pos = adj_pos + wp.vec2(0.0, adj_depth)
        adj_vel = adj_vel + adj_v
    if (touching & _TOUCHING_WALL_NEG_Y) != 0:  # pos[1] < -limit
        adj_depth, adj_normal, adj_v = _penalty_force_adjoint(-limit - pos[1], wp.vec2(0.0, 1.0), vel, p, adj_ret)
        adj_pos = adj_pos - wp.vec2(0.0, adj_depth)
        adj_vel = adj_vel + adj_v
    return adj_pos, adj_vel


@wp.func_grad(contact_force)
def _contact_force_adjoint(pos: wp.vec2, vel: wp.vec2, p: PointNav2DParams, adj_ret: wp.vec2):
    force, touching = contact_force_and_touching(pos, vel, p)
    adj_pos, adj_vel = contact_force_gradients(pos, vel, p, touching, adj_ret)
    wp.adjoint[pos] += adj_pos
    wp.adjoint[vel] += adj_vel


def _make_advance(pre_contact: bool):
    """The substeps of one control step under the force ``applied``, with the exact contact law or the
    pre-contact surrogate's (``pre_contact``)."""
    contact = _surrogate_contact_force if pre_contact else contact_force

    def advance(p: PointNav2DParams, applied: wp.vec2, x: wp.vec2, v: wp.vec2, mass: float, drag: float):
        """``mass`` and ``drag``: the env's physical parameters (never ``p``'s defaults)."""
        h = p.dt / float(_SUBSTEPS)
        for _substep in range(_SUBSTEPS):
            force = applied - drag * v + contact(x, v, p)
            # semi-implicit Euler: velocity first, then position with the new velocity
            v = v + force * (h / mass)
            x = x + v * h
        return x, v

    variant = "pre_contact" if pre_contact else "exact"
    return wp.func(advance, name=f"advance_{variant}", module="unique" if pre_contact else None)


advance = _make_advance(pre_contact=False)


# ------------------------------------------------------------------------------- the step and its adjoint
# The exact step kernel computes everything it differentiates in one function, ``exact_step``, whose
# replay and adjoint are written by hand. Warp's adjoint of a kernel first replays the whole kernel, then
# reverses it with generated adjoints, and each generated adjoint of a function replays that function once
# more and zero-initialises every intermediate's adjoint: so the substeps, the observation and the reward
# were all computed twice more and reversed at several times their cost (the backward pass took 2.3-3x
# the forward launch's time). Here the kernel's replay computes nothing (the kernel only stores the step's
# results, and a store's adjoint needs no value), and the adjoint integrates the substeps once, keeping
# each one's start state and force, then sweeps back through them: the contact terms only where a body
# is in contact (``contact_force_gradients``), the observation's and reward's by the chain rule. The same
# derivatives as the generated adjoints, term for term (equal to float32 round-off: only the order of the
# sums differs), with their choices at the kinks (``wp.length`` passes none at zero length; the soft
# depth's slope is the ramp, as ``wp.clamp`` and ``wp.max`` pass it).
@wp.struct
class StepResult:
    """One env's step results as one value (a Warp function's custom replay and adjoint take one)."""
    pos: wp.vec2
    vel: wp.vec2
    obs: _Observation
    reward: float
    distance: float


_SubstepRows = wp.types.matrix(shape=(SUBSTEPS, 2), dtype=wp.float32)  # one vec2 per substep
_SubstepInts = wp.types.vector(length=SUBSTEPS, dtype=wp.int32)  # one int per substep


@wp.func
def exact_step(p: PointNav2DParams, applied: wp.vec2, pos: wp.vec2, vel: wp.vec2, goal: wp.vec2, mass: float,
               drag: float) -> StepResult:
    """The exact step of one env under the force ``applied``: ``advance``, then the observation, the reward
    and the distance to the goal."""
    x, v = advance(p, applied, pos, vel, mass, drag)
    result = StepResult()
    result.pos = x
    result.vel = v
    result.obs = observation(x, v, goal, p)
    r, distance = step_reward(x, goal, p)
    result.reward = r
    result.distance = distance
    return result


@wp.func_replay(exact_step)
def _exact_step_replay(p: PointNav2DParams, applied: wp.vec2, pos: wp.vec2, vel: wp.vec2, goal: wp.vec2,
                       mass: float, drag: float):
    # The kernel's replay skips the array stores, the only uses of the results, so it needs none of them.
    return StepResult()


@wp.func
def soft_depth_slope(depth: float, smoothing: float):
    """The derivative of ``soft_depth(depth, smoothing)``: the ramp clamp(depth / s, 0, 1)."""
    return wp.clamp(depth / smoothing, 0.0, 1.0)


@wp.func_grad(exact_step)
def _exact_step_adjoint(p: PointNav2DParams, applied: wp.vec2, pos: wp.vec2, vel: wp.vec2, goal: wp.vec2,
                        mass: float, drag: float, adj_ret: StepResult):
    h = p.dt / float(_SUBSTEPS)
    # ``advance``'s substeps again, keeping each one's start state, force and surfaces in contact for the
    # reverse sweep
    start_pos = _SubstepRows()
    start_vel = _SubstepRows()
    forces = _SubstepRows()
    touching = _SubstepInts()
    x = pos
    v = vel
    for k in range(_SUBSTEPS):
        contact, touching_k = contact_force_and_touching(x, v, p)
        force = applied - drag * v + contact
        start_pos[k] = x
        start_vel[k] = v
        forces[k] = force
        touching[k] = touching_k
        v = v + force * (h / mass)
        x = x + v * h

    # the observation: [x, v, goal - x, then per obstacle c_k - x and |c_k - x| - r_k - body radius]
    adj_obs = adj_ret.obs
    adj_x = adj_ret.pos + wp.vec2(adj_obs[0] - adj_obs[4], adj_obs[1] - adj_obs[5])
    adj_v = adj_ret.vel + wp.vec2(adj_obs[2], adj_obs[3])
    adj_goal = wp.vec2(adj_obs[4], adj_obs[5])
    # the reward: -|x - goal| - penetration_weight * (the soft depths into every obstacle and wall)
    adj_reward = adj_ret.reward
    to_goal = x - goal
    distance = wp.length(to_goal)
    if distance > 0.0:
        adj_to_goal = -adj_reward / distance * to_goal
        adj_x = adj_x + adj_to_goal
        adj_goal = adj_goal - adj_to_goal
    adj_penetration = -p.penetration_weight * adj_reward
    for k in range(_NUM_OBSTACLES):
        offset = obstacle_center(p, k) - x
        length = wp.length(offset)
        depth = obstacle_radius(k) + p.body_radius - length
        adj_length = adj_obs[8 + 3 * k] - adj_penetration * soft_depth_slope(depth, p.contact_smoothing)
        adj_offset = wp.vec2(adj_obs[6 + 3 * k], adj_obs[7 + 3 * k])
        if length > 0.0:
            adj_offset = adj_offset + adj_length / length * offset
        adj_x = adj_x - adj_offset
    limit = p.arena_half_width - p.body_radius
    s = p.contact_smoothing
    adj_x = adj_x + adj_penetration * wp.vec2(
        soft_depth_slope(x[0] - limit, s) - soft_depth_slope(-limit - x[0], s),
        soft_depth_slope(x[1] - limit, s) - soft_depth_slope(-limit - x[1], s))

    # the substeps in reverse: force = applied - drag v + contact(x, v), v' = v + force h / m, x' = x + v' h
    adj_applied = wp.vec2(0.0, 0.0)
    adj_mass = float(0.0)
    adj_drag = float(0.0)
    # A while loop, which Warp never unrolls: eight inlined copies of the contact terms' gradients made the
    # adjoint's code several times larger and slower even where no branch of them runs.
    k = _SUBSTEPS
    while k > 0:
        k = k - 1
        x_k = start_pos[k]
        v_k = start_vel[k]
        force = forces[k]
        adj_v_next = adj_v + h * adj_x
        adj_force = (h / mass) * adj_v_next
        adj_mass = adj_mass - wp.dot(force, adj_v_next) * h / (mass * mass)
        adj_applied = adj_applied + adj_force
        adj_drag = adj_drag - wp.dot(v_k, adj_force)
        adj_v = adj_v_next - drag * adj_force
        if touching[k] != 0:
            adj_contact_pos, adj_contact_vel = contact_force_gradients(x_k, v_k, p, touching[k], adj_force)
            adj_x = adj_x + adj_contact_pos
            adj_v = adj_v + adj_contact_vel
    wp.adjoint[applied] += adj_applied
    wp.adjoint[pos] += adj_x
    wp.adjoint[vel] += adj_v
    wp.adjoint[goal] += adj_goal
    wp.adjoint[mass] += adj_mass
    wp.adjoint[drag] += adj_drag


# ----------------------------------------------------------------------------------------- kernels
@wp.func
def sample_clear_point(rng: wp.uint32, low: float, high: float, fallback: wp.vec2, p: PointNav2DParams):
    """Rejection sampling of a point in ``[low, high]^2`` clear of every obstacle by ``reset_clearance``
    (``fallback`` after ``MAX_RESET_TRIES`` draws); returns the point and the advanced RNG state (Warp
    passes the state by value). Never differentiated, so a dynamic loop is fine."""
    point = wp.vec2(wp.randf(rng, low, high), wp.randf(rng, low, high))
    tries = int(1)
    while obstacle_clearance(point, p) < p.reset_clearance and tries < _MAX_RESET_TRIES:
        point = wp.vec2(wp.randf(rng, low, high), wp.randf(rng, low, high))
        tries = tries + 1
    if obstacle_clearance(point, p) < p.reset_clearance:
        point = fallback
    return point, rng


@wp.kernel
def point_nav_2d_reset(
    seed: wp.array(dtype=wp.int32),
    episode: wp.array(dtype=wp.int32),
    p: PointNav2DParams,
    # outputs
    pos: wp.array(dtype=wp.vec2),
    vel: wp.array(dtype=wp.vec2),
    goal: wp.array(dtype=wp.vec2),
    step: wp.array(dtype=wp.int32),
):
    i = wp.tid()
    rng = wp.rand_init(seed[i], episode[i])
    start, rng = sample_clear_point(rng, p.start_low, p.start_high, wp.vec2(p.start_low, p.start_low), p)
    target, rng = sample_clear_point(rng, p.goal_low, p.goal_high, wp.vec2(p.goal_high, p.goal_high), p)
    pos[i] = start
    vel[i] = wp.vec2(0.0, 0.0)
    goal[i] = target
    step[i] = 0


@wp.kernel
def point_nav_2d_observe(
    pos: wp.array(dtype=wp.vec2),
    vel: wp.array(dtype=wp.vec2),
    goal: wp.array(dtype=wp.vec2),
    step: wp.array(dtype=wp.int32),
    p: PointNav2DParams,
    # outputs
    obs: wp.array2d(dtype=float),
):
    i = wp.tid()
    _write_observation(i, observation(pos[i], vel[i], goal[i], p), obs)


@wp.kernel
def point_nav_2d_step(
    pos: wp.array(dtype=wp.vec2),
    vel: wp.array(dtype=wp.vec2),
    goal: wp.array(dtype=wp.vec2),
    step: wp.array(dtype=wp.int32),
    action: wp.array2d(dtype=float),
    mass: wp.array(dtype=float),
    drag: wp.array(dtype=float),
    p: PointNav2DParams,
    # outputs
    pos_next: wp.array(dtype=wp.vec2),
    vel_next: wp.array(dtype=wp.vec2),
    goal_next: wp.array(dtype=wp.vec2),
    step_next: wp.array(dtype=wp.int32),
    obs: wp.array2d(dtype=float),
    reward: wp.array(dtype=float),
    terminated: wp.array(dtype=wp.int32),
    success: wp.array(dtype=wp.int32),
):
    i = wp.tid()
    applied = p.max_force * wp.vec2(action[i, 0], action[i, 1])
    g = goal[i]
    result = exact_step(p, applied, pos[i], vel[i], g, mass[i], drag[i])
    pos_next[i] = result.pos
    vel_next[i] = result.vel
    goal_next[i] = g
    step_next[i] = step[i] + 1
    # the kernel's own stores (the adjoint's replay skips them; _write_observation's replay skips its stores too)
    for k in range(OBS_DIM):
        obs[i, k] = result.obs[k]
    reward[i] = result.reward
    terminated[i] = 0
    success[i] = 0
    if result.distance < p.success_distance:
        success[i] = 1


# ------------------------------------------------------------ pre-contact gradients (diffgym.envs.pre_contact)
_surrogate_advance = _make_advance(pre_contact=True)


@wp.struct
class _Motion:
    """Position and velocity as one value (a Warp function's custom replay needs a single return value)."""
    pos: wp.vec2
    vel: wp.vec2


@wp.func
def _motion(x: wp.vec2, v: wp.vec2) -> _Motion:
    m = _Motion()
    m.pos = x
    m.vel = v
    return m


@wp.func
def _exact_advance(p: PointNav2DParams, applied: wp.vec2, x: wp.vec2, v: wp.vec2, mass: float,
                   drag: float) -> _Motion:
    """``advance`` inside the straight-through kernel, which takes its values and none of its gradient."""
    x_next, v_next = advance(p, applied, x, v, mass, drag)
    return _motion(x_next, v_next)


@wp.func_grad(_exact_advance)
def _exact_advance_adjoint(p: PointNav2DParams, applied: wp.vec2, x: wp.vec2, v: wp.vec2, mass: float, drag: float,
                           adj_ret: _Motion):
    # nothing: every gradient of the straight-through kernel comes from the surrogate's substeps
    pass


@wp.func_replay(_exact_advance)
def _exact_advance_replay(p: PointNav2DParams, applied: wp.vec2, x: wp.vec2, v: wp.vec2, mass: float, drag: float):
    # The backward pass never uses the exact values (they only reach straight_through's ignored argument
    # and the output stores, which the replay skips, _write_observation's by its own replay), so it skips
    # their substeps; the inputs stand in.
    return _motion(x, v)


def _pre_contact_step_kernel(straight_through_outputs: bool):
    """The step kernel of ``contact_gradient_distance > 0`` (``straight_through_outputs``): the exact
    step's outputs, the surrogate step's gradients; or, for tests, the surrogate step outright. The exact
    kernel keeps its own body: sharing this one would reorder the sums in its adjoint and change the
    default gradients in their last bits."""
    through_vec2, through_float, through_obs = (straight_through(t) for t in (wp.vec2, float, _Observation))

    def step_kernel(
        pos: wp.array(dtype=wp.vec2),
        vel: wp.array(dtype=wp.vec2),
        goal: wp.array(dtype=wp.vec2),
        step: wp.array(dtype=wp.int32),
        action: wp.array2d(dtype=float),
        mass: wp.array(dtype=float),
        drag: wp.array(dtype=float),
        p: PointNav2DParams,
        # outputs
        pos_next: wp.array(dtype=wp.vec2),
        vel_next: wp.array(dtype=wp.vec2),
        goal_next: wp.array(dtype=wp.vec2),
        step_next: wp.array(dtype=wp.int32),
        obs: wp.array2d(dtype=float),
        reward: wp.array(dtype=float),
        terminated: wp.array(dtype=wp.int32),
        success: wp.array(dtype=wp.int32),
    ):
        i = wp.tid()
        applied = p.max_force * wp.vec2(action[i, 0], action[i, 1])
        g = goal[i]
        # the surrogate step: the exact step with every contact's spring extended to the distance
        x, v = _surrogate_advance(p, applied, pos[i], vel[i], mass[i], drag[i])
        r, distance = step_reward(x, g, p)
        o = observation(x, v, g, p)
        if wp.static(straight_through_outputs):
            # the exact step from the same inputs; each output takes its value and the surrogate's gradient
            e = _exact_advance(p, applied, pos[i], vel[i], mass[i], drag[i])
            er, distance = step_reward(e.pos, g, p)
            o = through_obs(observation(e.pos, e.vel, g, p), o)
            r = through_float(er, r)
            x = through_vec2(e.pos, x)
            v = through_vec2(e.vel, v)
        pos_next[i] = x
        vel_next[i] = v
        goal_next[i] = g
        step_next[i] = step[i] + 1
        _write_observation(i, o, obs)
        reward[i] = r
        terminated[i] = 0
        success[i] = 0
        if distance < p.success_distance:
            success[i] = 1

    name = "point_nav_2d_step_straight_through" if straight_through_outputs else "point_nav_2d_step_surrogate"
    return wp.kernel(step_kernel, name=name, module="unique")  # compiled only by a sim built with the option


# ----------------------------------------------------------------------------------------- sim and env
class PointNav2D(DiffSim):
    """Functional twin of :class:`PointNav2DEnv` (pure ``reset``/``step`` on batched states)."""

    state_type = PointNav2DState
    obs_dim = OBS_DIM
    act_dim = 2
    dt = 0.05
    default_max_episode_steps = 200
    reset_kernel = point_nav_2d_reset
    observe_kernel = point_nav_2d_observe
    step_kernel = point_nav_2d_step
    state_bounds = {"pos": POSITION_BOUND, "vel": VELOCITY_BOUND, "goal": POSITION_BOUND}
    physical_params = ("mass", "drag")
    physics_bounds = {"mass": MASS_RANGE, "drag": DRAG_RANGE}
    physics_units = {"mass": "kg", "drag": "N s/m"}
    straight_through_step_kernel = _pre_contact_step_kernel(straight_through_outputs=True)
    """The step kernel of a sim built with ``contact_gradient_distance > 0`` (``diffgym.envs.pre_contact``)."""
    surrogate_step_kernel = _pre_contact_step_kernel(straight_through_outputs=False)
    """The surrogate step in the forward pass too: for tests only (``pre_contact.surrogate_forward``)."""

    def __init__(self, device: str = "cpu", max_episode_steps: int | None = None, drag: float = 0.25,
                 contact_smoothing: float = 0.01, penetration_weight: float = 10.0,
                 success_distance: float = 0.1, contact_gradient_distance: float = 0.0, mass: float = 1.0):
        super().__init__(device, max_episode_steps)
        contact_gradient_distance = check_contact_gradient_distance(contact_gradient_distance)
        if contact_smoothing <= 0 or success_distance <= 0:
            raise ValueError(f"contact_smoothing and success_distance must be positive, got "
                             f"{contact_smoothing} and {success_distance}")
        if penetration_weight < 0:
            raise ValueError(f"penetration_weight must be non-negative, got {penetration_weight}")
        self.check_default_physics(mass=mass, drag=drag)
        self.params = PointNav2DParams()
        self.params.dt = self.dt
        self.params.mass = mass
        self.params.max_force = 1.0
        self.params.drag = drag
        self.params.stiffness = STIFFNESS
        self.params.damping = DAMPING
        self.params.contact_smoothing = contact_smoothing
        self.params.contact_gradient_distance = contact_gradient_distance
        self.params.contact_gradient_peak = PEAK_FRACTION * STIFFNESS * contact_smoothing
        self.params.body_radius = BODY_RADIUS
        self.params.arena_half_width = ARENA_HALF_WIDTH
        self.params.normal_core = NORMAL_CORE
        self.params.penetration_weight = penetration_weight
        self.params.success_distance = success_distance
        self.params.start_low, self.params.start_high = START_REGION
        self.params.goal_low, self.params.goal_high = GOAL_REGION
        self.params.reset_clearance = RESET_CLEARANCE
        install(self, contact_gradient_distance)

    def render_state(self, state: PointNav2DState, index: int = 0) -> np.ndarray:
        pos = state.pos[index].detach().cpu().numpy()
        vel = state.vel[index].detach().cpu().numpy()
        goal = state.goal[index].detach().cpu().numpy()
        wall = 0.1
        lim = ARENA_HALF_WIDTH + wall
        canvas = Canvas(400, 400, xlim=(-lim, lim), ylim=(-lim, lim), background=(70, 70, 80))  # walls
        a = ARENA_HALF_WIDTH
        canvas.polygon([(-a, -a), (a, -a), (a, a), (-a, a)], (245, 245, 240))  # floor
        for low, high, color in ((*START_REGION, (225, 232, 250)), (*GOAL_REGION, (225, 245, 228))):
            canvas.polygon([(low, low), (high, low), (high, high), (low, high)], color)
        for x, y, radius in OBSTACLES:
            canvas.circle((x, y), radius, (120, 120, 130))
        success_distance = float(self.params.success_distance)
        canvas.circle(goal, success_distance, (120, 210, 130))
        canvas.ring(goal, success_distance, 0.02, (30, 140, 50))
        canvas.line(pos, pos + 0.25 * vel, 0.02, (220, 70, 50))  # velocity, 0.25 s ahead
        canvas.circle(pos, BODY_RADIUS, (40, 90, 220))
        return canvas.image


class PointNav2DEnv(DiffGymEnv):
    """
    ## Description
    A point mass (1 kg by default) moves in the walled arena [-2, 2]^2 m. The agent pushes it with a bounded 2D
    force and must bring it from the lower-left start region to a goal in the upper-right region,
    around a fixed field of five disc obstacles. Walls and obstacles push back with a smooth
    spring-damper penalty, so every step is differentiable and contacts carry exact gradients.

    ## Layout (fixed; `diffgym.envs.point_nav_2d.OBSTACLES`)
    | obstacle | centre [m] | radius [m] |
    |---|---|---|
    | 0 | (0.00, 0.00) | 0.50 |
    | 1 | (-1.00, 0.40) | 0.35 |
    | 2 | (0.40, -1.00) | 0.35 |
    | 3 | (-0.90, -0.90) | 0.25 |
    | 4 | (0.95, 0.95) | 0.25 |

    The body has contact radius 0.05 m, so its centre stays in [-1.95, 1.95]^2 and at least
    `radius + 0.05` from each obstacle centre when not in contact.

    ## Valid states
    `set_state` and `differentiable_step` accept finite states with `|pos|, |goal| <= 10` m and
    `|vel| <= 100` m/s per axis and raise `ValueError` naming the field otherwise. Every state the dynamics
    reach from a reset lies far inside (|pos| <= 2.04 m, speed <= 5.7 m/s), and from every valid state one
    step gives finite outputs and gradients (deep penetrations are pushed out by the linear spring).

    ## Action Space
    `Box(-1, 1, (2,), float32)`: the force `(F_x, F_y)` in N. Out-of-range actions are clipped to
    [-1, 1]; the clip's gradient is 1 inside the box and 0 outside.

    ## Observation Space
    `Box(-inf, inf, (21,), float32)`: `[p (2), v (2), g - p (2)]` then, for each obstacle k in layout
    order, `[c_k - p (2), ||c_k - p|| - r_k - 0.05 (1)]` (relative centre and surface clearance, negative
    when penetrating). Position, velocity and goal are the full state, so the observation is Markov.

    ## Dynamics
    Per 0.05 s control step, 8 semi-implicit Euler substeps of h = 6.25 ms:
    `F = a - drag v + F_contact(p, v)`, `v' = v + F/m h`, `p' = p + v' h` with m = `mass` = 1 kg and
    `drag` = 0.25 N s/m by default (top speed sqrt(2)/0.25 = 5.7 m/s). Each obstacle and wall with penetration
    depth `d` (along its outward normal `n`) adds `F = (k soft(d) - c gate(d) (v . n)) n` with
    k = 4000 N/m, c = 40 N s/m, `soft(d)` = 0 for d <= 0, d^2/(2s) for 0 < d < s, d - s/2 beyond,
    `gate(d) = 3t^2 - 2t^3` with `t = clamp(d/s, 0, 1)` (a smoothstep, so the force is C1 in the state);
    s = `contact_smoothing` = 0.01 m. An obstacle's normal is `(p - c) / max(||p - c||, (r + 0.05) / 2)`: the unit
    normal everywhere the body can reach, shrinking to zero near the centre (reached only after a
    0.15 m penetration or more), so the gradient stays bounded there: below 1e4 per step (the gradient of the velocity after one
    step), the real sensitivity of being pushed off an unstable equilibrium, where dividing by a 1e-6
    guard gave up to 8.9e9. Nothing tunnels: at
    top speed the spring stops the body within v/sqrt(k/m) = 0.09 m, under the smallest obstacle
    radius plus body radius (0.30 m), and the walls are half-planes.

    ## Physical parameters
    `mass` (kg, in [0.5, 2]) and `drag` (N s/m, in [0, 2]) are per env and differentiable:
    `differentiable_step(state, action, physics={"mass": m, "drag": c})` with `(B,)` tensors (gradients flow
    into them, through contacts too, and with `contact_gradient_distance > 0` through the surrogate), and
    `reset(options={"physics": {...}})` sets the values later steps use (domain randomisation). The
    constructor's `mass` and `drag` are the defaults, with which every step is bit for bit what it was before
    they were per env. In that range the contact integration stays stable (`omega h <= 0.56`) and the
    spring stops the body from 5.66 m/s within 0.13 m (`MASS_RANGE`, `DRAG_RANGE`).

    ## Pre-contact gradients
    `contact_gradient_distance=D > 0` (default 0: off) changes the backward pass only: the forward pass
    stays the exact one bit for bit, while the gradient of each step is that of a surrogate step in which
    every obstacle's and wall's spring also acts at a positive gap `g = -d < D`:
    `k soft(d) + (k s / 8) (1 - S(g / D)) (1 - S(d / s))`, S the C2 smoothstep `u^3 (10 - 15 u + 6 u^2)`
    on [0, 1] (peak 5 N at touch; exactly the exact law for gap >= D and penetrations deeper than
    s = 0.01 m; the damper keeps its gate). `diffgym.envs.pre_contact` and docs/api.md describe it.

    ## Rewards
    `r = -||p' - g|| - penetration_weight * sum_contacts soft(d(p'))` with `penetration_weight = 10`
    (per metre of penetration) over the five obstacles and four walls.

    ## Starting State
    `p ~ U([-1.8, -0.8]^2)`, `g ~ U([0.8, 1.8]^2)`, both rejection-sampled until the body clears every
    obstacle by 0.05 m (after 64 rejections, the region's far corner, which is free); `v = 0`. Drawn from
    Warp's RNG stream `(seed, episode)`.

    ## Episode End
    No termination. Truncation after 200 steps (10 s).

    ## Success
    `info["is_success"]`: `||p' - g|| < 0.1` m after the step.

    ## Arguments
    `gym.make("DiffGym/PointNav2D-v0", device="cpu", render_mode=None, drag=0.25,
    contact_smoothing=0.01, penetration_weight=10.0, success_distance=0.1, contact_gradient_distance=0.0,
    mass=1.0)`;
    `gym.make_vec(..., num_envs=N)` gives the native batched vector env.

    ## Version History
    * v0: initial version.
    """

    sim_class = PointNav2D
