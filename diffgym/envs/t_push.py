"""DiffGym/TPush-v0: push a planar T-block to a goal pose with a velocity-controlled disc (Push-T).

Contact-rich rigid-body dynamics written so that gradients exist and agree with finite differences:
smooth (C2) penalty contacts on the signed distance to the T's two (corner-rounded) boxes, Hunt-Crossley damping, and
Coulomb friction smoothed by the pseudo-Huber norm and applied linearly-implicitly (unconditionally
stable, smooth in every input). All substeps of one control step run inside one kernel launch.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import warp as wp

from diffgym.core.env import DiffGymEnv
from diffgym.core.render import Canvas
from diffgym.core.sim import DiffSim
from diffgym.core.state import SimState
from diffgym.envs.pre_contact import (PEAK_FRACTION, check_contact_gradient_distance, install, pre_contact_profile,
                                      straight_through)

SUBSTEPS = 20
"""Semi-implicit Euler substeps per 0.05 s control step (h = 2.5 ms); a compile-time constant."""

# Unrolled loops are replayed exactly by Warp's adjoint; loops longer than this module's max_unroll
# would be emitted as dynamic loops whose adjoint does not replay the forward iterations.
wp.set_module_options({"max_unroll": max(SUBSTEPS, 16)})
_SUBSTEPS = wp.constant(SUBSTEPS)

# ----------------------------------------------------------------------------------------- geometry
# The T in its "drawing" frame: the bar's bottom edge lies on y = 0, the stem hangs below it.
BAR_SIZE = (0.20, 0.05)
STEM_SIZE = (0.05, 0.15)
_BAR_CENTER_DRAW = np.array([0.0, BAR_SIZE[1] / 2])
_STEM_CENTER_DRAW = np.array([0.0, -STEM_SIZE[1] / 2])
_BAR_AREA, _STEM_AREA = BAR_SIZE[0] * BAR_SIZE[1], STEM_SIZE[0] * STEM_SIZE[1]
_COM_DRAW = (_BAR_AREA * _BAR_CENTER_DRAW + _STEM_AREA * _STEM_CENTER_DRAW) / (_BAR_AREA + _STEM_AREA)
BAR_CENTER = _BAR_CENTER_DRAW - _COM_DRAW
"""Bar centre in the body frame (origin at the centre of mass) [m]."""
STEM_CENTER = _STEM_CENTER_DRAW - _COM_DRAW
"""Stem centre in the body frame [m]."""
BAR_HALF = (BAR_SIZE[0] / 2, BAR_SIZE[1] / 2)
"""Half the bar's width and height [m] (``TPushParams.bar_half``)."""
STEM_HALF = (STEM_SIZE[0] / 2, STEM_SIZE[1] / 2)
"""Half the stem's width and height [m] (``TPushParams.stem_half``)."""


def t_outline(bar_center, bar_half, stem_center, stem_half) -> np.ndarray:
    """The T's 8 outline vertices ``(8, 2)`` in the body frame, counter-clockwise from the bar's top left,
    built from its two boxes exactly as the kernels' ``outline_vertex`` builds them from the params."""
    (bcx, bcy), (bhx, bhy), (scx, scy), (shx, shy) = bar_center, bar_half, stem_center, stem_half
    return np.array([[bcx - bhx, bcy + bhy], [bcx - bhx, bcy - bhy], [scx - shx, scy + shy], [scx - shx, scy - shy],
                     [scx + shx, scy - shy], [scx + shx, scy + shy], [bcx + bhx, bcy - bhy], [bcx + bhx, bcy + bhy]])


T_OUTLINE = t_outline(BAR_CENTER, BAR_HALF, STEM_CENTER, STEM_HALF)
"""The outline in the body frame; also the reward keypoints. From the same boxes as the params' (``TPush``
checks that they agree), so ``_HULL_REACH`` below bounds the hull the kernels' gradients see."""


def t_inertia_per_mass() -> float:
    """Polar moment of inertia about the centre of mass per kg [m^2] (uniform density)."""
    total = 0.0
    for (w, h), centre, area in ((BAR_SIZE, BAR_CENTER, _BAR_AREA), (STEM_SIZE, STEM_CENTER, _STEM_AREA)):
        total += area * ((w * w + h * h) / 12.0 + float(centre @ centre))
    return total / (_BAR_AREA + _STEM_AREA)


def t_mean_radius(resolution: int = 400) -> float:
    """Mean distance of the T's area from its centre of mass [m] (midpoint rule): the lever arm of
    the maximal table-friction torque, ``mu m g * mean_radius``, under uniform pressure."""
    distances, weights = [], []
    for (w, h), centre in ((BAR_SIZE, BAR_CENTER), (STEM_SIZE, STEM_CENTER)):
        u = (np.arange(resolution) + 0.5) / resolution - 0.5
        x, y = np.meshgrid(centre[0] + u * w, centre[1] + u * h)
        distances.append(np.hypot(x, y).ravel())
        weights.append(np.full(x.size, w * h / x.size))
    d, wts = np.concatenate(distances), np.concatenate(weights)
    return float((d * wts).sum() / wts.sum())


GOAL_POSITION = (0.0, 0.0)
GOAL_ANGLE = math.pi / 4

ARENA_HALF = 0.5
"""The arena is the square [-0.5, 0.5]^2 m inside four walls."""
WALL_SLACK = 0.03
"""Valid domain: the T's hull vertices may lie up to 3 cm beyond a wall. The walls stop them within
~7 mm (measured over full-speed rollouts), while a T started deep in a wall is flung out by the
depth-proportional Hunt-Crossley damping, which turns explicit and unstable (NaN in one step)."""
SPEED_BOUND_FACTOR = 5.0
"""Valid domain: pusher and block speeds up to 5 max_speed per axis (rollouts reach ~1.5 max_speed) ..."""
ANGULAR_SPEED_BOUND_FACTOR = 100.0
"""... and block spins up to 100 max_speed rad/s (50 rad/s by default; rollouts reach ~8 rad/s)."""
MIN_START_SPREAD = 0.3
"""The narrowest ``start_spread``: the block's start is always at least D = 0.1 m from the goal pose, and
below this spread too few poses that far are drawn (at 0.3 about a quarter of the draws, at 0.25 4 %)."""
_HULL = T_OUTLINE[[0, 1, 3, 4, 6, 7]]  # the convex-hull corners (the concave 2 and 5 never touch a wall)
_HULL_REACH = wp.constant(1.001 * float(np.linalg.norm(_HULL, axis=1).max()))
"""The hull corners' largest distance from the centre of mass [m], with a margin for float32 rotations."""


def _check_outline_matches_hull(p) -> None:
    """Raise unless the params' boxes (``outline_vertex``'s source) give ``T_OUTLINE`` to float32 round-off:
    ``wall_corners_in_reach`` skips a wall the T's centre of mass is farther from than ``_HULL_REACH``,
    which is measured on ``T_OUTLINE``, so a larger T in the params would silently lose its walls' gradients."""
    boxes = [np.array(list(v), dtype=np.float64) for v in (p.bar_center, p.bar_half, p.stem_center, p.stem_half)]
    mismatch = float(np.abs(t_outline(*boxes) - T_OUTLINE).max())
    if mismatch > 1e-6:  # float32 round-off of the params' values is ~1e-8 m
        raise ValueError(f"TPushParams' bar and stem boxes must give the T outline T_OUTLINE (whose hull radius "
                         f"bounds the walls' gradients), got vertices up to {mismatch:.3g} m away from it")


PHYSICS_BOUNDS = {
    "block_mass": (0.5, 2.0),
    "contact_friction": (0.0, 1.0),
    "table_friction": (0.0, 1.0),
    "contact_stiffness": (2000.0, 10000.0),
}
"""The valid range of each per-env physical parameter (``TPush.physical_params``), in which the valid domain's
bounds hold; the constructor's values must lie in it too. Measured with 64 envs x 400 steps of full-speed
pushes at every corner of this box: T corners at most 21 mm into a wall (2 kg at 2000 N/m), speeds 1.5 m/s and
spins 15 rad/s at most. Beyond it they do not: a 4 kg frictionless T on 1000 N/m walls sinks past the 30 mm
slack, and a 0.25 kg T on 20000 N/m contacts goes unstable (NaN) under explicit integration. Friction is
integrated implicitly, so any coefficient in [0, 1] is stable. Measured at the default max_speed and servo."""
PHYSICS_UNITS = {"block_mass": "kg", "contact_friction": "(dimensionless)", "table_friction": "(dimensionless)",
                 "contact_stiffness": "N/m"}


@dataclasses.dataclass(eq=False, frozen=True)
class TPushState(SimState):
    pusher_pos: torch.Tensor
    """(B, 2) pusher centre [m]."""
    pusher_vel: torch.Tensor
    """(B, 2) pusher velocity [m/s]."""
    block_pos: torch.Tensor
    """(B, 2) block centre of mass [m]."""
    block_angle: torch.Tensor
    """(B,) block orientation [rad], unwrapped (0: bar up, stem pointing to -y)."""
    block_vel: torch.Tensor
    """(B, 2) block linear velocity [m/s]."""
    block_angvel: torch.Tensor
    """(B,) block angular velocity [rad/s]."""
    step: torch.Tensor
    """(B,) int32 control steps taken this episode."""


@wp.struct
class TPushParams:
    dt: float
    arena_half: float
    pusher_radius: float
    pusher_mass: float
    max_speed: float
    servo_gain: float
    block_mass: float  # the default of the per-env `block_mass` array the step kernels read
    block_inertia: float  # the default block's; the kernels use block_mass[i] * block_inertia_per_mass
    block_inertia_per_mass: float
    friction_radius: float
    bar_center: wp.vec2
    bar_half: wp.vec2
    stem_center: wp.vec2
    stem_half: wp.vec2
    contact_stiffness: float  # default of the per-env array
    contact_damping: float
    contact_smoothing: float
    corner_smoothing: float
    contact_friction: float  # default of the per-env array
    contact_gradient_distance: float
    contact_gradient_peak_per_stiffness: float
    table_friction: float  # default of the per-env array
    gravity: float
    friction_smoothing: float
    goal_pos: wp.vec2
    goal_angle: float
    shaping_weight: float
    face_shaping_weight: float
    success_distance: float
    reset_block_range: float
    reset_angle_range: float
    reset_pusher_range: float
    reset_min_goal_distance: float
    reset_min_clearance: float


# ----------------------------------------------------------------------------------------- helpers
@wp.func
def smooth_relu(x: float, s: float) -> float:
    """C2 ramp with compact support: 0 for x <= -s, x for x >= s, in between the integral of the
    smoothstep of (x + s) / 2s, i.e. 2s t^3 (1 - t/2). A C1 ramp's jump in curvature makes central
    differences straddling it err linearly in their step; this one's error is quadratic."""
    t = wp.clamp((x + s) / (2.0 * s), 0.0, 1.0)
    return wp.where(x >= s, x, 2.0 * s * t * t * t * (1.0 - 0.5 * t))


@wp.func
def rotate(theta: float, v: wp.vec2) -> wp.vec2:
    c = wp.cos(theta)
    s = wp.sin(theta)
    return wp.vec2(c * v[0] - s * v[1], s * v[0] + c * v[1])


@wp.func
def rotate_cs(c: float, s: float, v: wp.vec2) -> wp.vec2:
    """``rotate`` by the angle whose cosine and sine are given (computed once per substep)."""
    return wp.vec2(c * v[0] - s * v[1], s * v[0] + c * v[1])


@wp.func
def perp(v: wp.vec2) -> wp.vec2:
    """v rotated by +90 degrees: omega x r for a planar angular velocity is omega * perp(r)."""
    return wp.vec2(-v[1], v[0])


@wp.func
def cross2(a: wp.vec2, b: wp.vec2) -> float:
    return a[0] * b[1] - a[1] * b[0]


@wp.func
def outline_vertex(p: TPushParams, k: int) -> wp.vec2:
    """Vertex k of the T's outline in the body frame (same order as ``T_OUTLINE``)."""
    bc = p.bar_center
    bh = p.bar_half
    sc = p.stem_center
    sh = p.stem_half
    v = wp.vec2(bc[0] + bh[0], bc[1] + bh[1])
    if k == 0:
        v = wp.vec2(bc[0] - bh[0], bc[1] + bh[1])
    if k == 1:
        v = wp.vec2(bc[0] - bh[0], bc[1] - bh[1])
    if k == 2:
        v = wp.vec2(sc[0] - sh[0], sc[1] + sh[1])
    if k == 3:
        v = wp.vec2(sc[0] - sh[0], sc[1] - sh[1])
    if k == 4:
        v = wp.vec2(sc[0] + sh[0], sc[1] - sh[1])
    if k == 5:
        v = wp.vec2(sc[0] + sh[0], sc[1] + sh[1])
    if k == 6:
        v = wp.vec2(bc[0] + bh[0], bc[1] - bh[1])
    return v


@wp.func
def face_potential(p: TPushParams, pusher: wp.vec2, block: wp.vec2) -> float:
    """cos of the angle, seen from the block's centre of mass, between the pusher and the point
    opposite the goal: 1 with the pusher behind the block on the goal line (where pushing moves the
    block towards the goal), -1 in front of it; faded out (tanh) within about 5 cm of the goal position,
    where that direction is undefined. It depends on the pusher's bearing only, so its gradient is
    tangential: it walks the pusher *around* the block, never through it."""
    rel = pusher - block
    away = block - p.goal_pos
    r = wp.sqrt(wp.dot(rel, rel) + 1.0e-6)
    g = wp.sqrt(wp.dot(away, away) + 1.0e-6)
    return wp.tanh(g / 0.05) * wp.dot(rel, away) / (r * g)


@wp.func
def mean_keypoint_distance(p: TPushParams, pos: wp.vec2, theta: float) -> float:
    """Mean distance between the 8 outline vertices at pose (pos, theta) and at the goal pose."""
    total = float(0.0)
    for k in range(8):
        v = outline_vertex(p, k)
        d = pos + rotate(theta, v) - p.goal_pos - rotate(p.goal_angle, v)
        total = total + wp.sqrt(wp.dot(d, d) + 1.0e-12)  # the epsilon keeps the gradient finite at 0
    return total / 8.0


@wp.func
def softplus(x: float, s: float) -> float:
    """s log(1 + exp(x / s)), a C-infinity max(x, 0), written to not overflow."""
    return wp.max(x, 0.0) + s * wp.log(1.0 + wp.exp(-wp.abs(x) / s))


@wp.func
def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + wp.exp(-x))


@wp.struct
class BoxDistance:
    """``box_signed_distance``'s three results as one value (a Warp function's custom adjoint takes one), and
    the intermediates its gradient needs (``ax``, ``ay``: the softplus of the excesses, ``gx``, ``gy``: their
    slopes; outside the box only)."""
    dist: float
    normal: wp.vec2
    point: wp.vec2
    ax: float
    ay: float
    gx: float
    gy: float


@wp.func
def box_distance(q: wp.vec2, center: wp.vec2, half: wp.vec2, rounding: float) -> BoxDistance:
    """Signed distance from body-frame point q to a box with rounded corners, its outward unit
    normal and the surface point it measures to (body frame), with a hand-written adjoint.

    Outside, the Euclidean distance ``|max(|q - c| - half, 0)|`` has a normal that turns abruptly
    where a face region meets a corner region, so a disc's contact force would only be C0 there and
    finite differences across that line disagree with the gradient. Replacing each ``max(e, 0)`` by
    ``softplus(e, rounding)`` makes distance and normal C-infinity; the distance is exact to
    ``rounding * exp(-(e / rounding))`` away from the corners and overestimates by ``0.98 rounding``
    at a corner. Inside (reached only under a penetration deeper than the pusher's radius) it falls
    back to the nearest face."""
    d = q - center
    ex = wp.abs(d[0]) - half[0]
    ey = wp.abs(d[1]) - half[1]
    sx = wp.where(d[0] >= 0.0, 1.0, -1.0)
    sy = wp.where(d[1] >= 0.0, 1.0, -1.0)
    result = BoxDistance()
    dist = float(0.0)
    normal = wp.vec2(0.0, 0.0)
    if ex > 0.0 or ey > 0.0:
        ax = softplus(ex, rounding)
        ay = softplus(ey, rounding)
        dist = wp.sqrt(ax * ax + ay * ay)
        gx = sigmoid(ex / rounding)  # d ax / d ex
        gy = sigmoid(ey / rounding)
        # the gradient of dist (up to the positive factor 1 / dist)
        normal = wp.normalize(wp.vec2(sx * gx * ax, sy * gy * ay))
        result.ax = ax
        result.ay = ay
        result.gx = gx
        result.gy = gy
    else:
        if ex > ey:
            dist = ex
            normal = wp.vec2(sx, 0.0)
        else:
            dist = ey
            normal = wp.vec2(0.0, sy)
    result.dist = dist
    result.normal = normal
    result.point = q - dist * normal
    return result


@wp.func
def box_signed_distance(q: wp.vec2, center: wp.vec2, half: wp.vec2, rounding: float):
    """``box_distance``'s distance, normal and surface point."""
    box = box_distance(q, center, half, rounding)
    return box.dist, box.normal, box.point


# Written by hand because every substep computes both boxes' distances to find the boxes in reach, and
# Warp's generated adjoint replays and reverses both, with every intermediate's adjoint zero-initialised,
# even for a box out of reach whose results get no gradient (a quarter of the backward pass). This one
# returns at once when no gradient comes in, and otherwise applies the chain rule to the intermediates
# ``box_distance`` returns with its results: the same derivatives as the generated adjoint, term for term
# (equal to float32 round-off), including its choices at the kinks (``wp.abs`` passes +1 at 0, like the
# sign ``box_distance`` uses).
@wp.func
def box_distance_gradient(q: wp.vec2, center: wp.vec2, half: wp.vec2, rounding: float, box: BoxDistance,
                          adj_ret: BoxDistance):
    """The gradient of ``box = box_distance(q, center, half, rounding)`` with respect to ``q``, given the
    gradients ``adj_ret`` of its distance, normal and point."""
    adj_dist = adj_ret.dist
    adj_normal = adj_ret.normal
    adj_point = adj_ret.point
    adj_q = wp.vec2(0.0, 0.0)
    if (adj_dist != 0.0 or adj_normal[0] != 0.0 or adj_normal[1] != 0.0 or adj_point[0] != 0.0
            or adj_point[1] != 0.0):
        d = q - center
        ex = wp.abs(d[0]) - half[0]
        ey = wp.abs(d[1]) - half[1]
        sx = wp.where(d[0] >= 0.0, 1.0, -1.0)
        sy = wp.where(d[1] >= 0.0, 1.0, -1.0)
        adj_ex = float(0.0)
        adj_ey = float(0.0)
        # point = q - dist * normal
        adj_q = adj_point
        if ex > 0.0 or ey > 0.0:
            ax = box.ax
            ay = box.ay
            dist = box.dist
            gx = box.gx
            gy = box.gy
            m = wp.vec2(sx * gx * ax, sy * gy * ay)
            normal = box.normal
            adj_dist = adj_dist - wp.dot(adj_point, normal)
            adj_normal = adj_normal - dist * adj_point
            # normal = m / |m|
            adj_m = (adj_normal - normal * wp.dot(normal, adj_normal)) / wp.length(m)
            # m = (sx gx ax, sy gy ay), dist = sqrt(ax^2 + ay^2); d gx / d ex = gx (1 - gx) / rounding
            adj_ex = adj_dist * ax / dist * gx + adj_m[0] * sx * (gx * (1.0 - gx) / rounding * ax + gx * gx)
            adj_ey = adj_dist * ay / dist * gy + adj_m[1] * sy * (gy * (1.0 - gy) / rounding * ay + gy * gy)
        else:
            # the nearest face: dist = ex along (sx, 0) or ey along (0, sy), constant normals
            if ex > ey:
                adj_ex = adj_dist - adj_point[0] * sx
            else:
                adj_ey = adj_dist - adj_point[1] * sy
        # ex = |d_x| - half_x, d = q - center
        adj_q = adj_q + wp.vec2(sx * adj_ex, sy * adj_ey)
    return adj_q


@wp.func_grad(box_distance)
def _box_distance_adjoint(q: wp.vec2, center: wp.vec2, half: wp.vec2, rounding: float, adj_ret: BoxDistance):
    if (adj_ret.dist != 0.0 or adj_ret.normal[0] != 0.0 or adj_ret.normal[1] != 0.0 or adj_ret.point[0] != 0.0
            or adj_ret.point[1] != 0.0):
        box = box_distance(q, center, half, rounding)
        wp.adjoint[q] += box_distance_gradient(q, center, half, rounding, box, adj_ret)


@wp.func
def smooth_min(a: float, b: float, k: float) -> float:
    """Polynomial smooth minimum (C1): min(a, b) when |a - b| >= k, at most k/4 below it otherwise."""
    t = wp.clamp(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * t - k * t * (1.0 - t)


@wp.func
def pusher_gap(p: TPushParams, pusher: wp.vec2, block: wp.vec2, theta: float) -> float:
    """Signed distance from the pusher's rim to the T (the union: min over its two boxes) [m]."""
    q = rotate(-theta, pusher - block)
    d_bar, n_bar, c_bar = box_signed_distance(q, p.bar_center, p.bar_half, p.corner_smoothing)
    d_stem, n_stem, c_stem = box_signed_distance(q, p.stem_center, p.stem_half, p.corner_smoothing)
    # smoothed where the boxes are equally near, so the reward shaping has no kink on the bisector
    return smooth_min(d_bar, d_stem, p.corner_smoothing) - p.pusher_radius


@wp.func
def normal_force(p: TPushParams, elastic: float, separating_speed: float) -> float:
    """Hunt-Crossley damping of the elastic force: elastic * (1 - c * v_n)."""
    return elastic * (1.0 - p.contact_damping * separating_speed)


def _contact_law(pre_contact: bool):
    """The elastic normal force of a contact at signed ``gap`` [m] and the gap below which it can be
    nonzero (the broad phase), for the exact law or for the pre-contact surrogate (diffgym.envs.pre_contact),
    chosen when the code is generated (``wp.static``): the exact variant is the exact law, op for op."""

    def elastic_force(p: TPushParams, stiffness: float, gap: float) -> float:
        elastic = stiffness * smooth_relu(-gap, p.contact_smoothing)
        if wp.static(pre_contact):
            # the tail's peak scales with the env's stiffness, as PEAK_FRACTION prescribes
            peak = p.contact_gradient_peak_per_stiffness * stiffness
            elastic = elastic + peak * pre_contact_profile(gap, p.contact_gradient_distance, p.contact_smoothing)
        return elastic

    def contact_reach(p: TPushParams) -> float:
        reach = p.contact_smoothing
        if wp.static(pre_contact):
            reach = wp.max(reach, p.contact_gradient_distance)
        return reach

    variant = "pre_contact" if pre_contact else "exact"
    module = "unique" if pre_contact else None  # only the pre-contact kernels compile the surrogate
    return (wp.func(elastic_force, name=f"elastic_force_{variant}", module=module),
            wp.func(contact_reach, name=f"contact_reach_{variant}", module=module))


@wp.func
def friction_impulse(p: TPushParams, friction: float, elastic: float, slip: float, inv_mass: float,
                     h: float) -> float:
    """Tangential impulse opposing the slip speed over a substep: Coulomb friction mu * N smoothed by
    the pseudo-Huber norm, N * mu * slip / sqrt(slip^2 + delta^2), applied linearly-implicitly
    (the damping coefficient is taken at the current slip, the slip at the end of the substep), so
    it can never reverse the slip however stiff the smoothing; ``inv_mass`` is the effective inverse
    mass of the pair along the tangent; ``friction`` is the friction coefficient mu."""
    coeff = friction * elastic / wp.sqrt(slip * slip + p.friction_smoothing * p.friction_smoothing)
    return coeff * h * slip / (1.0 + coeff * h * inv_mass)


@wp.func
def wall_normal(side: int) -> wp.vec2:
    """The inward normal of the arena's side 0 (x = -0.5), 1 (x = 0.5), 2 (y = -0.5) or 3 (y = 0.5)."""
    wall_n = wp.vec2(1.0, 0.0)
    if side == 1:
        wall_n = wp.vec2(-1.0, 0.0)
    if side == 2:
        wall_n = wp.vec2(0.0, 1.0)
    if side == 3:
        wall_n = wp.vec2(0.0, -1.0)
    return wall_n


@wp.func
def smooth_relu_slope(x: float, s: float) -> float:
    """The derivative of ``smooth_relu(x, s)``: 1 for x >= s, else 3 t^2 - 2 t^3 with t = clamp((x + s) / 2s)."""
    t = wp.clamp((x + s) / (2.0 * s), 0.0, 1.0)
    return wp.where(x >= s, 1.0, t * t * (3.0 - 2.0 * t))


@wp.func
def wall_corner_bit(side: int, k: int) -> int:
    """The bit of the T's hull corner ``k`` (``outline_vertex``; not the concave 2 or 5) against wall ``side``
    (``wall_normal``) in a mask of the corners within the contact law's reach of the walls: 6 bits a wall."""
    return 1 << (side * 6 + k - k // 3)


@wp.func
def wall_corners_in_reach(p: TPushParams, xb: wp.vec2, c: float, s: float) -> int:
    """The bits (``wall_corner_bit``) of the hull corners within the exact contact law's reach of a wall, the
    test ``block_wall_wrench`` makes; the block's angle is given by its cosine ``c`` and sine ``s``."""
    corners = int(0)
    for side in range(4):
        wall_n = wall_normal(side)
        # no corner within the law's reach of this wall while the centre of mass is farther from it than
        # the hull's radius: then its six corner tests are skipped
        if wp.dot(xb, wall_n) + p.arena_half - _HULL_REACH < p.contact_smoothing:
            for k in range(8):
                if k != 2 and k != 5:
                    if wp.dot(xb + rotate_cs(c, s, outline_vertex(p, k)), wall_n) + p.arena_half < p.contact_smoothing:
                        corners = corners | wall_corner_bit(side, k)
    return corners


# The exact walls' adjoint, written by hand. Warp's generated adjoint of a function replays it and then
# reverses it with every intermediate's adjoint zero-initialised, all 24 corner-wall branches included
# whether or not they touch: about twelve times the walls' forward cost, once per substep (a quarter of
# the whole backward pass out of contact). This one recomputes only what the chain rule needs, for the
# corners in reach. The same derivatives as the generated adjoint, term for term (equal to float32
# round-off: only the order of the sums differs).
@wp.func
def block_wall_wrench_gradients(p: TPushParams, xb: wp.vec2, c: float, s: float, vb: wp.vec2, omega: float,
                                contact_stiffness: float, adj_force: wp.vec2, adj_torque: float, corners: int):
    """The gradients of the exact ``block_wall_wrench`` with respect to ``xb``, ``c``, ``s``, ``vb``, ``omega``
    and ``contact_stiffness``, given those ``adj_force`` and ``adj_torque`` of the wrench it returns (the
    running sums it adds to take them unchanged) and the hull corners in reach of a wall there (``corners``:
    ``wall_corners_in_reach``'s bits, or those ``block_wall_wrench_record`` returned)."""
    adj_xb = wp.vec2(0.0, 0.0)
    adj_vb = wp.vec2(0.0, 0.0)
    adj_c = float(0.0)
    adj_s = float(0.0)
    adj_omega = float(0.0)
    adj_stiffness = float(0.0)
    for side in range(4):
        if (corners & (63 << (side * 6))) != 0:
            wall_n = wall_normal(side)
            for k in range(8):
                if k != 2 and k != 5:
                    if (corners & wall_corner_bit(side, k)) != 0:
                        vertex = outline_vertex(p, k)
                        r = rotate_cs(c, s, vertex)
                        gap = wp.dot(xb + r, wall_n) + p.arena_half
                        ramp = smooth_relu(-gap, p.contact_smoothing)
                        elastic = contact_stiffness * ramp
                        v_n = wp.dot(vb + omega * perp(r), wall_n)
                        fw = normal_force(p, elastic, v_n) * wall_n
                        # torque += cross2(r, fw), force += fw, fw = elastic (1 - c_d v_n) wall_n
                        adj_fw = adj_force + adj_torque * perp(r)
                        adj_r = adj_torque * wp.vec2(fw[1], -fw[0])
                        adj_normal = wp.dot(adj_fw, wall_n)
                        adj_elastic = adj_normal * (1.0 - p.contact_damping * v_n)
                        adj_v_n = -adj_normal * elastic * p.contact_damping
                        adj_stiffness = adj_stiffness + adj_elastic * ramp
                        adj_gap = -adj_elastic * contact_stiffness * smooth_relu_slope(-gap, p.contact_smoothing)
                        # v_n = (vb + omega perp(r)) . n, gap = (xb + r) . n + half, r = rotate(c, s) vertex
                        adj_vb = adj_vb + adj_v_n * wall_n
                        adj_omega = adj_omega + adj_v_n * wp.dot(perp(r), wall_n)
                        adj_r = adj_r + (adj_v_n * omega) * wp.vec2(wall_n[1], -wall_n[0]) + adj_gap * wall_n
                        adj_xb = adj_xb + adj_gap * wall_n
                        adj_c = adj_c + adj_r[0] * vertex[0] + adj_r[1] * vertex[1]
                        adj_s = adj_s + adj_r[1] * vertex[0] - adj_r[0] * vertex[1]
    return adj_xb, adj_c, adj_s, adj_vb, adj_omega, adj_stiffness


def _block_wall_wrench_adjoint(p: TPushParams, xb: wp.vec2, c: float, s: float, vb: wp.vec2, omega: float,
                               contact_stiffness: float, force_b: wp.vec2, torque_b: float, adj_ret: wp.vec3):
    adj_force = wp.vec2(adj_ret[0], adj_ret[1])
    adj_torque = adj_ret[2]
    adj_xb, adj_c, adj_s, adj_vb, adj_omega, adj_stiffness = block_wall_wrench_gradients(
        p, xb, c, s, vb, omega, contact_stiffness, adj_force, adj_torque, wall_corners_in_reach(p, xb, c, s))
    wp.adjoint[xb] += adj_xb
    wp.adjoint[c] += adj_c
    wp.adjoint[s] += adj_s
    wp.adjoint[vb] += adj_vb
    wp.adjoint[omega] += adj_omega
    wp.adjoint[contact_stiffness] += adj_stiffness
    wp.adjoint[force_b] += adj_force
    wp.adjoint[torque_b] += adj_torque


_BoxRow = wp.types.vector(length=9, dtype=wp.float32)
_BoxDistances = wp.types.matrix(shape=(2, 9), dtype=wp.float32)  # a BoxDistance per row: bar, stem


@wp.func
def box_row(box: BoxDistance) -> _BoxRow:
    """A ``BoxDistance`` as a row of floats (a matrix row can hold it: a struct cannot be indexed)."""
    return _BoxRow(box.dist, box.normal[0], box.normal[1], box.point[0], box.point[1], box.ax, box.ay, box.gx, box.gy)


@wp.func
def box_from_row(row: _BoxRow) -> BoxDistance:
    box = BoxDistance()
    box.dist = row[0]
    box.normal = wp.vec2(row[1], row[2])
    box.point = wp.vec2(row[3], row[4])
    box.ax = row[5]
    box.ay = row[6]
    box.gx = row[7]
    box.gy = row[8]
    return box


@wp.struct
class PusherContacts:
    """What the pusher's contacts add to a substep (``pusher_contacts``) as one value."""
    force_p: wp.vec2
    force_b: wp.vec2
    torque_b: float
    impulse_p: wp.vec2
    impulse_b: wp.vec2
    ang_impulse_b: float
    touching: int
    """Bit 0: the bar in reach, bit 1: the stem, bit 2: a wall (no force, no gradient without one)."""
    boxes: _BoxDistances
    """The pusher's ``box_distance`` to the bar (row 0) and the stem (row 1), as ``box_row``'s."""


@wp.struct
class SubstepRecord:
    """A substep's new state and what ``exact_step``'s adjoint needs of it (``substep_record``)."""
    pusher_pos: wp.vec2
    pusher_vel: wp.vec2
    block_pos: wp.vec2
    block_angle: float
    block_vel: wp.vec2
    block_angvel: float
    cos_angle: float
    """The cosine of the block's angle at the substep's start (as the substep computed it)."""
    sin_angle: float
    """Its sine."""
    friction_speed: float
    """The pseudo-Huber norm of the block's twist the table friction divides by (``speed``)."""
    momentum_b: wp.vec2
    """h times the block's force (walls included) plus its friction impulse."""
    momentum_omega: float
    """The same for its torque."""
    touching: int
    """``PusherContacts.touching``."""
    wall_corners: int
    """The T's hull corners in reach of a wall (``block_wall_wrench_record``)."""
    boxes: _BoxDistances
    """``PusherContacts.boxes`` of the boxes in reach (``touching``); the others' rows may be zero."""


def _make_advance(pre_contact: bool):
    """The substeps of one control step (``advance``), one of them (``substep``; ``substep_record``, which also
    returns what ``exact_step``'s adjoint needs), the pusher's contacts in one (``pusher_contacts``) and the
    walls' wrench on the T in one (``block_wall_wrench``), with the exact contact law or with the pre-contact
    surrogate's (``pre_contact``)."""
    elastic_force, contact_reach = _contact_law(pre_contact)
    variant = "pre_contact" if pre_contact else "exact"
    module = "unique" if pre_contact else None

    def make_block_wall_wrench(record: bool):
        def block_wall_wrench(p: TPushParams, xb: wp.vec2, c: float, s: float, vb: wp.vec2, omega: float,
                              contact_stiffness: float, force_b: wp.vec2, torque_b: float):
            """``force_b`` and ``torque_b`` plus the walls' forces on the T's hull corners and their torque,
            as ``(force x, force y, torque)``; the block's angle is given by its cosine ``c`` and sine ``s``
            (``record``: and the bits of the corners in reach, ``wall_corner_bit``)."""
            if wp.static(record):
                corners = int(0)
            for side in range(4):
                wall_n = wall_normal(side)
                for k in range(8):
                    if k != 2 and k != 5:  # only the six convex-hull corners (not the concave 2, 5) touch a wall
                        r = rotate_cs(c, s, outline_vertex(p, k))
                        gap_v = wp.dot(xb + r, wall_n) + p.arena_half
                        if gap_v < contact_reach(p):
                            v_n = wp.dot(vb + omega * perp(r), wall_n)
                            fw = normal_force(p, elastic_force(p, contact_stiffness, gap_v), v_n) * wall_n
                            force_b = force_b + fw
                            torque_b = torque_b + cross2(r, fw)
                            if wp.static(record):
                                corners = corners | wall_corner_bit(side, k)
            if wp.static(record):
                return wp.vec3(force_b[0], force_b[1], torque_b), corners
            else:
                return wp.vec3(force_b[0], force_b[1], torque_b)

        name = f"block_wall_wrench_record_{variant}" if record else f"block_wall_wrench_{variant}"
        return wp.func(block_wall_wrench, name=name, module=module)

    block_wall_wrench = make_block_wall_wrench(False)
    block_wall_wrench_record = make_block_wall_wrench(True)
    if not pre_contact:
        wp.func_grad(block_wall_wrench)(_block_wall_wrench_adjoint)

    def make_pusher_contacts(record: bool):
        def pusher_contacts(p: TPushParams, h: float, xp: wp.vec2, vp: wp.vec2, xb: wp.vec2, c: float, s: float,
                            vb: wp.vec2, omega: float, block_mass: float, block_inertia: float, contact_friction: float,
                            contact_stiffness: float) -> PusherContacts:
            """The pusher's contacts in a substep (with the T's two boxes and the walls): the forces and friction
            impulses on the pusher and the block, and the bits of those in reach (``PusherContacts``); the block's
            angle is given by its cosine ``c`` and sine ``s``."""
            force_p = wp.vec2(0.0, 0.0)
            force_b = wp.vec2(0.0, 0.0)
            torque_b = float(0.0)
            impulse_p = wp.vec2(0.0, 0.0)
            impulse_b = wp.vec2(0.0, 0.0)
            ang_impulse_b = float(0.0)
            touching = int(0)
            boxes = _BoxDistances()
            # The servo is integrated implicitly, so over a substep the pusher resists like this mass.
            pusher_eff_mass = p.pusher_mass + h * p.servo_gain

            # pusher-block: a penalty per box (their sum is the union's penalty wherever one box is in range,
            # and the correct two-normal force in the T's concave corners; no min() kink)
            q = rotate_cs(c, -s, xp - xb)
            for box in range(2):
                center = p.bar_center
                half = p.bar_half
                if box == 1:
                    center = p.stem_center
                    half = p.stem_half
                if wp.static(record):
                    # The recorded substeps are the backward pass's, which needs only the boxes in reach. The
                    # box's distance is at least its larger excess (box_distance's |q - c| - half; softplus(e)
                    # >= max(e, 0), and the rounded sqrt of a sum of squares is at least each term's root, also
                    # in float32), so a box whose excess is beyond reach is out of reach: its distance (exps
                    # and logs, half a substep's cost) is not computed, its force is zero either way (the same
                    # state, bit for bit), and its row, unused, stays zero. The forward pass keeps its code.
                    offset = q - center
                    excess = wp.max(wp.abs(offset[0]) - half[0], wp.abs(offset[1]) - half[1])
                    if excess - p.pusher_radius >= contact_reach(p):
                        continue
                box_dist = box_distance(q, center, half, p.corner_smoothing)
                dist = box_dist.dist
                n_local = box_dist.normal
                c_local = box_dist.point
                boxes[box] = box_row(box_dist)
                gap = dist - p.pusher_radius
                # Broad phase: the penalty's ramp is exactly zero for gap >= s (the surrogate's tail beyond its
                # distance), and so are the force, the friction (proportional to it) and their derivatives, so
                # skipping them changes no value and no gradient; it spares the forward and, above all, the
                # adjoint the contact terms of every box out of reach.
                if gap < contact_reach(p):
                    touching = touching | (1 << box)
                    n = rotate_cs(c, s, n_local)
                    r = rotate_cs(c, s, c_local)  # contact point relative to the block's centre of mass
                    v_rel = vp - (vb + omega * perp(r))
                    elastic = elastic_force(p, contact_stiffness, gap)
                    # the normal force evaluates the law again rather than reusing ``elastic``: the adjoint then
                    # sums the gap's two paths in the order it always has, so the exact law's gradients stay
                    # bit for bit those of every run recorded before the surrogate existed
                    fn = normal_force(p, elastic_force(p, contact_stiffness, gap), wp.dot(v_rel, n))
                    force_p = force_p + fn * n
                    force_b = force_b - fn * n
                    torque_b = torque_b - fn * cross2(r, n)
                    t = perp(n)
                    rt = cross2(r, t)
                    inv_mass = 1.0 / pusher_eff_mass + 1.0 / block_mass + rt * rt / block_inertia
                    j = friction_impulse(p, contact_friction, elastic, wp.dot(v_rel, t), inv_mass, h)
                    impulse_p = impulse_p - j * t
                    impulse_b = impulse_b + j * t
                    ang_impulse_b = ang_impulse_b + j * rt

            # walls (frictionless): inward normals of the arena's four sides; the same broad phase
            for side in range(4):
                wall_n = wall_normal(side)
                gap_p = wp.dot(xp, wall_n) + p.arena_half - p.pusher_radius
                if gap_p < contact_reach(p):
                    touching = touching | 4
                    force_p = force_p + normal_force(p, elastic_force(p, contact_stiffness, gap_p),
                                                     wp.dot(vp, wall_n)) * wall_n
            contacts = PusherContacts()
            contacts.force_p = force_p
            contacts.force_b = force_b
            contacts.torque_b = torque_b
            contacts.impulse_p = impulse_p
            contacts.impulse_b = impulse_b
            contacts.ang_impulse_b = ang_impulse_b
            contacts.touching = touching
            contacts.boxes = boxes
            return contacts

        name = f"pusher_contacts_record_{variant}" if record else f"pusher_contacts_{variant}"
        return wp.func(pusher_contacts, name=name, module=module)

    pusher_contacts = make_pusher_contacts(False)
    pusher_contacts_record = make_pusher_contacts(True)

    def make_substep(record: bool):
        def substep(p: TPushParams, h: float, command: wp.vec2, xp: wp.vec2, vp: wp.vec2, xb: wp.vec2,
                    theta: float, vb: wp.vec2, omega: float, block_mass: float, block_inertia: float,
                    contact_friction: float, table_friction: float, contact_stiffness: float):
            """One semi-implicit Euler substep of the pusher + block system with the env's physical parameters;
            returns the new state (``record``: as a ``SubstepRecord``, with what ``exact_step``'s adjoint needs)."""
            c = wp.cos(theta)
            s = wp.sin(theta)
            if wp.static(record):
                contacts = pusher_contacts_record(p, h, xp, vp, xb, c, s, vb, omega, block_mass, block_inertia,
                                                  contact_friction, contact_stiffness)
            else:
                contacts = pusher_contacts(p, h, xp, vp, xb, c, s, vb, omega, block_mass, block_inertia,
                                           contact_friction, contact_stiffness)
            force_p = contacts.force_p
            impulse_p = contacts.impulse_p
            impulse_b = contacts.impulse_b
            ang_impulse_b = contacts.ang_impulse_b
            if wp.static(record):
                wrench, wall_corners = block_wall_wrench_record(p, xb, c, s, vb, omega, contact_stiffness,
                                                                contacts.force_b, contacts.torque_b)
            else:
                wrench = block_wall_wrench(p, xb, c, s, vb, omega, contact_stiffness, contacts.force_b,
                                           contacts.torque_b)
            force_b = wp.vec2(wrench[0], wrench[1])
            torque_b = wrench[2]

            # pusher: velocity servo F = servo_gain (v_cmd - v), implicit in v
            vp_next = (vp + (h * force_p + impulse_p) / p.pusher_mass
                       + (h * p.servo_gain / p.pusher_mass) * command) / (1.0 + h * p.servo_gain / p.pusher_mass)
            # block-table friction: mu m g times the gradient of the pseudo-Huber norm of the twist (v, rho w)
            # (an ellipsoidal limit surface whose torque limit is mu m g rho), linearly implicit like above
            rho = p.friction_radius
            speed = wp.sqrt(wp.dot(vb, vb) + rho * rho * omega * omega + p.friction_smoothing * p.friction_smoothing)
            drag = table_friction * block_mass * p.gravity / speed
            momentum_b = h * force_b + impulse_b
            momentum_omega = h * torque_b + ang_impulse_b
            vb_next = (vb + momentum_b / block_mass) / (1.0 + h * drag / block_mass)
            omega_next = (omega + momentum_omega / block_inertia) / (1.0 + h * drag * rho * rho / block_inertia)
            if wp.static(record):
                out = SubstepRecord()
                out.pusher_pos = xp + h * vp_next
                out.pusher_vel = vp_next
                out.block_pos = xb + h * vb_next
                out.block_angle = theta + h * omega_next
                out.block_vel = vb_next
                out.block_angvel = omega_next
                out.cos_angle = c
                out.sin_angle = s
                out.friction_speed = speed
                out.momentum_b = momentum_b
                out.momentum_omega = momentum_omega
                out.touching = contacts.touching
                out.wall_corners = wall_corners
                out.boxes = contacts.boxes
                return out
            else:
                return xp + h * vp_next, vp_next, xb + h * vb_next, theta + h * omega_next, vb_next, omega_next

        name = f"substep_record_{variant}" if record else f"substep_{variant}"
        return wp.func(substep, name=name, module=module)

    substep = make_substep(False)

    def advance(p: TPushParams, command: wp.vec2, pusher: wp.vec2, pusher_vel: wp.vec2, block: wp.vec2,
                angle: float, block_vel: wp.vec2, angvel: float, block_mass: float, contact_friction: float,
                table_friction: float, contact_stiffness: float):
        h = p.dt / float(_SUBSTEPS)
        # a heavier or lighter T of the same shape and uniform density: the inertia follows the mass
        block_inertia = block_mass * p.block_inertia_per_mass
        xp = pusher
        vp = pusher_vel
        xb = block
        theta = angle
        vb = block_vel
        omega = angvel
        for _ in range(_SUBSTEPS):  # unrolled (module max_unroll), so the adjoint replays every substep
            xp, vp, xb, theta, vb, omega = substep(p, h, command, xp, vp, xb, theta, vb, omega, block_mass,
                                                   block_inertia, contact_friction, table_friction,
                                                   contact_stiffness)
        return xp, vp, xb, theta, vb, omega

    advance = wp.func(advance, name=f"advance_{variant}", module=module)
    return advance, substep, make_substep(True), pusher_contacts, block_wall_wrench


advance, substep, substep_record, pusher_contacts, block_wall_wrench = _make_advance(pre_contact=False)


_Observation = wp.types.vector(length=11, dtype=float)


@wp.func
def observation(xp: wp.vec2, vp: wp.vec2, xb: wp.vec2, theta: float, vb: wp.vec2, omega: float) -> _Observation:
    return _Observation(xp[0], xp[1], vp[0], vp[1], xb[0], xb[1], wp.cos(theta), wp.sin(theta), vb[0], vb[1], omega)


@wp.func
def _write_observation(i: int, o: _Observation, obs: wp.array2d(dtype=float)):
    for k in range(11):
        obs[i, k] = o[k]


@wp.func_replay(_write_observation)
def _write_observation_replay(i: int, o: _Observation, obs: wp.array2d(dtype=float)):
    pass  # the backward's replay must not store: it would rewrite obs (docs/adding_a_task.md)


@wp.struct
class Reward:
    """A step's reward and keypoint distance as one value (a Warp function's custom adjoint takes one)."""
    reward: float
    distance: float


@wp.func
def step_reward_result(p: TPushParams, xp: wp.vec2, xb: wp.vec2, theta: float, prev_pusher: wp.vec2,
                       prev_block: wp.vec2) -> Reward:
    """The reward of a step that ends with the pusher at ``xp`` and the block at (``xb``, ``theta``), and
    the keypoint distance D of that pose to the goal pose, with a hand-written adjoint and replay.

    The replay (what a kernel's adjoint runs in place of this call before reversing the kernel) returns
    zeros, not these values: recomputing them would cost the reward once more per backward pass. So in a
    differentiated kernel its results may only be stored to arrays (``reward[i] = r``), compared in a branch
    that only stores (``if distance < success_distance: success[i] = 1``), returned, or passed to a function
    whose adjoint ignores their value (``straight_through``'s exact argument). They must not reach any
    operation whose adjoint reads its operands' values (a product, a division, a ``wp.sqrt``, another
    function with a generated adjoint) nor decide a branch that computes something differentiated, nor be
    added to a differentiated value that such an operation reads later: the adjoint would silently use
    zeros there. This function's own adjoint recomputes everything it needs from its inputs, so calling it
    (or ``step_reward``) under those rules, as the exact and the pre-contact step kernels do, gives exact
    gradients."""
    distance = mean_keypoint_distance(p, xb, theta)
    # shaping: a smoothed max(gap, 0), so it is zero (and gradient-free) in contact
    approach = smooth_relu(pusher_gap(p, xp, xb, theta), p.contact_smoothing)
    # optional potential-based shaping (Ng et al. 1999) with gamma = 1: Phi(s') - Phi(s) telescopes to
    # Phi(s_T) - Phi(s_0) over an episode, so it shifts the undiscounted return by a bounded amount and
    # leaves its optimal policies unchanged (a discounted objective would need gamma Phi(s')); off by default
    face = face_potential(p, xp, xb) - face_potential(p, prev_pusher, prev_block)
    result = Reward()
    result.reward = -distance - p.shaping_weight * approach + p.face_shaping_weight * face
    result.distance = distance
    return result


@wp.func_replay(step_reward_result)
def _step_reward_result_replay(p: TPushParams, xp: wp.vec2, xb: wp.vec2, theta: float, prev_pusher: wp.vec2,
                               prev_block: wp.vec2):
    # zeros: see step_reward_result's docstring for what a caller may do with the replayed results
    return Reward()


@wp.func
def face_potential_gradient(p: TPushParams, pusher: wp.vec2, block: wp.vec2):
    """The gradients of ``face_potential(p, pusher, block)`` with respect to ``pusher`` and ``block``."""
    rel = pusher - block
    away = block - p.goal_pos
    r = wp.sqrt(wp.dot(rel, rel) + 1.0e-6)
    g = wp.sqrt(wp.dot(away, away) + 1.0e-6)
    fade = wp.tanh(g / 0.05)
    alignment = wp.dot(rel, away)
    # face = fade(g) alignment / (r g): r = |rel| and g = |away|, smoothed
    scale = fade / (r * g)
    d_rel = scale * (away - (alignment / (r * r)) * rel)
    d_away = scale * (rel - (alignment / (g * g)) * away) + ((1.0 - fade * fade) / 0.05 * alignment / (r * g * g)) * away
    return d_rel, d_away - d_rel


# The reward's adjoint, written by hand: Warp's generated one replays the reward (32 rotations' sines and
# cosines, two box distances, the face potentials) and then each of its functions once more, after the
# kernel's own replay. The same derivatives as the generated adjoint (equal to float32 round-off), with its
# choices at the kinks: ``wp.clamp`` passes the gradient to its argument on [low, high), ``wp.where``'s
# branch at the switch; the face potentials only where their weight is nonzero.
@wp.func_grad(step_reward_result)
def _step_reward_result_adjoint(p: TPushParams, xp: wp.vec2, xb: wp.vec2, theta: float, prev_pusher: wp.vec2,
                                prev_block: wp.vec2, adj_ret: Reward):
    adj_distance = adj_ret.distance - adj_ret.reward
    adj_xp = wp.vec2(0.0, 0.0)
    adj_xb = wp.vec2(0.0, 0.0)
    adj_theta = float(0.0)
    c = wp.cos(theta)
    s = wp.sin(theta)
    if adj_distance != 0.0:
        # distance = mean over the outline vertices v of |xb + rotate(theta) v - goal - rotate(goal angle) v|
        adj_norm = adj_distance / 8.0
        for k in range(8):
            v = outline_vertex(p, k)
            d = xb + rotate_cs(c, s, v) - p.goal_pos - rotate(p.goal_angle, v)
            adj_d = (adj_norm / wp.sqrt(wp.dot(d, d) + 1.0e-12)) * d
            adj_xb = adj_xb + adj_d
            adj_theta = adj_theta + wp.dot(adj_d, wp.vec2(-s * v[0] - c * v[1], c * v[0] - s * v[1]))
    adj_approach = -p.shaping_weight * adj_ret.reward
    if adj_approach != 0.0:
        # approach = smooth_relu(smooth_min(bar, stem) - radius), the boxes' distances at q = rotate(-theta) d
        d = xp - xb
        q = rotate_cs(c, -s, d)
        bar = box_distance(q, p.bar_center, p.bar_half, p.corner_smoothing)
        stem = box_distance(q, p.stem_center, p.stem_half, p.corner_smoothing)
        blend = p.corner_smoothing
        gap = smooth_min(bar.dist, stem.dist, blend) - p.pusher_radius
        adj_gap = adj_approach * smooth_relu_slope(gap, p.contact_smoothing)
        u = 0.5 + 0.5 * (stem.dist - bar.dist) / blend
        t = wp.clamp(u, 0.0, 1.0)
        adj_t = float(0.0)
        if u >= 0.0 and u < 1.0:
            adj_t = adj_gap * ((bar.dist - stem.dist) - blend * (1.0 - 2.0 * t)) * 0.5 / blend
        adj_bar = BoxDistance()
        adj_bar.dist = adj_gap * t - adj_t
        adj_stem = BoxDistance()
        adj_stem.dist = adj_gap * (1.0 - t) + adj_t
        adj_q = (box_distance_gradient(q, p.bar_center, p.bar_half, p.corner_smoothing, bar, adj_bar)
                 + box_distance_gradient(q, p.stem_center, p.stem_half, p.corner_smoothing, stem, adj_stem))
        adj_d = wp.vec2(c * adj_q[0] - s * adj_q[1], s * adj_q[0] + c * adj_q[1])
        adj_theta = adj_theta + adj_q[0] * q[1] - adj_q[1] * q[0]
        adj_xp = adj_xp + adj_d
        adj_xb = adj_xb - adj_d
    adj_prev_pusher = wp.vec2(0.0, 0.0)
    adj_prev_block = wp.vec2(0.0, 0.0)
    adj_face = p.face_shaping_weight * adj_ret.reward
    if adj_face != 0.0:
        d_pusher, d_block = face_potential_gradient(p, xp, xb)
        adj_xp = adj_xp + adj_face * d_pusher
        adj_xb = adj_xb + adj_face * d_block
        d_pusher, d_block = face_potential_gradient(p, prev_pusher, prev_block)
        adj_prev_pusher = -adj_face * d_pusher
        adj_prev_block = -adj_face * d_block
    wp.adjoint[xp] += adj_xp
    wp.adjoint[xb] += adj_xb
    wp.adjoint[theta] += adj_theta
    wp.adjoint[prev_pusher] += adj_prev_pusher
    wp.adjoint[prev_block] += adj_prev_block


@wp.func
def step_reward(p: TPushParams, xp: wp.vec2, xb: wp.vec2, theta: float, prev_pusher: wp.vec2,
                prev_block: wp.vec2):
    """``step_reward_result``'s reward and distance; in a kernel's adjoint replay both are zero, so its
    caller must use them only as ``step_reward_result``'s docstring allows."""
    result = step_reward_result(p, xp, xb, theta, prev_pusher, prev_block)
    return result.reward, result.distance


# ------------------------------------------------------------------------------- the step and its adjoint
# The exact step kernel integrates the control step in one function, ``exact_step``, whose replay and adjoint
# are written by hand. Warp's adjoint of a kernel first replays the whole kernel, then reverses it with
# generated adjoints, and each generated adjoint of a function replays that function once more and
# zero-initialises every intermediate's adjoint: the 20 substeps were integrated twice more in the backward
# pass and reversed at several times their cost. Here the kernel's replay reads the state the forward pass
# stored (the observation's and the reward's generated adjoints need it; they run once per step), and the
# adjoint integrates the substeps once, keeping each one's start state and what its reverse needs
# (``substep_record``), then sweeps back through them by hand: the servo, the table friction and the
# integration; the walls on the T (``block_wall_wrench_gradients``); the pusher's contacts where one is in
# reach (``pusher_contacts_gradients``, from the box distances the substep measured). The same derivatives
# as the generated adjoints (equal to float32 round-off: the order of the sums differs, and a few divisions
# became multiplications by a reciprocal), with their choices at the kinks.
@wp.struct
class _Motion:
    """A state's float fields as one value (a Warp function's custom replay needs a single return value)."""
    pusher_pos: wp.vec2
    pusher_vel: wp.vec2
    block_pos: wp.vec2
    block_angle: float
    block_vel: wp.vec2
    block_angvel: float


@wp.func
def _motion(xp: wp.vec2, vp: wp.vec2, xb: wp.vec2, theta: float, vb: wp.vec2, omega: float) -> _Motion:
    m = _Motion()
    m.pusher_pos = xp
    m.pusher_vel = vp
    m.block_pos = xb
    m.block_angle = theta
    m.block_vel = vb
    m.block_angvel = omega
    return m


@wp.func
def exact_step(p: TPushParams, command: wp.vec2, pusher: wp.vec2, pusher_vel: wp.vec2, block: wp.vec2,
               angle: float, block_vel: wp.vec2, angvel: float, block_mass: float, contact_friction: float,
               table_friction: float, contact_stiffness: float, i: int, pusher_pos_next: wp.array(dtype=wp.vec2),
               pusher_vel_next: wp.array(dtype=wp.vec2), block_pos_next: wp.array(dtype=wp.vec2),
               block_angle_next: wp.array(dtype=float), block_vel_next: wp.array(dtype=wp.vec2),
               block_angvel_next: wp.array(dtype=float)) -> _Motion:
    """``advance``: the exact step of env ``i`` under the pusher's velocity ``command``. The step kernel's
    next-state arrays are passed for the replay, which reads the state the forward pass stored there (an
    adjoint's replay skips a kernel's array stores, so they still hold it)."""
    xp, vp, xb, theta, vb, omega = advance(p, command, pusher, pusher_vel, block, angle, block_vel, angvel,
                                           block_mass, contact_friction, table_friction, contact_stiffness)
    return _motion(xp, vp, xb, theta, vb, omega)


@wp.func_replay(exact_step)
def _exact_step_replay(p: TPushParams, command: wp.vec2, pusher: wp.vec2, pusher_vel: wp.vec2, block: wp.vec2,
                       angle: float, block_vel: wp.vec2, angvel: float, block_mass: float, contact_friction: float,
                       table_friction: float, contact_stiffness: float, i: int,
                       pusher_pos_next: wp.array(dtype=wp.vec2), pusher_vel_next: wp.array(dtype=wp.vec2),
                       block_pos_next: wp.array(dtype=wp.vec2), block_angle_next: wp.array(dtype=float),
                       block_vel_next: wp.array(dtype=wp.vec2), block_angvel_next: wp.array(dtype=float)):
    # the step the forward pass computed, bit for bit, for the observation's and the reward's adjoints
    return _motion(pusher_pos_next[i], pusher_vel_next[i], block_pos_next[i], block_angle_next[i],
                   block_vel_next[i], block_angvel_next[i])


@wp.func
def pusher_contacts_gradients(p: TPushParams, h: float, xp: wp.vec2, vp: wp.vec2, xb: wp.vec2, c: float, s: float,
                              vb: wp.vec2, omega: float, block_mass: float, block_inertia: float,
                              contact_friction: float, contact_stiffness: float, touching: int,
                              boxes: _BoxDistances, adj: PusherContacts):
    """The gradients of the exact ``pusher_contacts`` with respect to ``xp``, ``vp``, ``xb``, ``c``, ``s``,
    ``vb``, ``omega``, ``block_mass``, ``block_inertia``, ``contact_friction`` and ``contact_stiffness``, given
    the contacts in reach there and the pusher's distances to the boxes (its ``touching`` and ``boxes``) and
    the gradients ``adj`` of its results."""
    return pusher_contacts_gradients_given_reciprocals(
        p, h, xp, vp, xb, c, s, vb, omega, _pusher_inverse_mass(p, h), 1.0 / block_mass, 1.0 / block_inertia,
        contact_friction, contact_stiffness, touching, boxes, adj)


@wp.func
def _pusher_inverse_mass(p: TPushParams, h: float) -> float:
    """The inverse of the mass the pusher resists with over a substep (its servo is implicit)."""
    return 1.0 / (p.pusher_mass + h * p.servo_gain)


@wp.func
def pusher_contacts_gradients_given_reciprocals(p: TPushParams, h: float, xp: wp.vec2, vp: wp.vec2, xb: wp.vec2,
                                                c: float, s: float, vb: wp.vec2, omega: float, inv_pusher_mass: float,
                                                inv_block_mass: float, inv_inertia: float, contact_friction: float,
                                                contact_stiffness: float, touching: int, boxes: _BoxDistances,
                                                adj: PusherContacts):
    """``pusher_contacts_gradients`` given the reciprocals of the pusher's effective mass
    (``_pusher_inverse_mass``), the block's mass and its inertia, which stay the same over a control step's
    substeps: ``exact_step``'s adjoint computes them once instead of three divisions per substep."""
    adj_xp = wp.vec2(0.0, 0.0)
    adj_vp = wp.vec2(0.0, 0.0)
    adj_xb = wp.vec2(0.0, 0.0)
    adj_vb = wp.vec2(0.0, 0.0)
    adj_c = float(0.0)
    adj_s = float(0.0)
    adj_omega = float(0.0)
    adj_mass = float(0.0)
    adj_inertia = float(0.0)
    adj_friction = float(0.0)
    adj_stiffness = float(0.0)
    sc = p.contact_smoothing
    if (touching & 3) != 0:
        d = xp - xb
        q = rotate_cs(c, -s, d)
        adj_q = wp.vec2(0.0, 0.0)
        adj_fn_direction = adj.force_p - adj.force_b  # force_p += fn n, force_b -= fn n
        adj_j_direction = adj.impulse_b - adj.impulse_p  # impulse_p -= j t, impulse_b += j t
        for box in range(2):
            if (touching & (1 << box)) != 0:
                center = p.bar_center
                half = p.bar_half
                if box == 1:
                    center = p.stem_center
                    half = p.stem_half
                box_dist = box_from_row(boxes[box])
                n_local = box_dist.normal
                c_local = box_dist.point
                gap = box_dist.dist - p.pusher_radius
                n = rotate_cs(c, s, n_local)
                r = rotate_cs(c, s, c_local)
                v_rel = vp - (vb + omega * perp(r))
                ramp = smooth_relu(-gap, sc)
                elastic = contact_stiffness * ramp
                v_n = wp.dot(v_rel, n)
                fn = normal_force(p, elastic, v_n)
                t = perp(n)
                rt = cross2(r, t)
                inv_mass = inv_pusher_mass + inv_block_mass + rt * rt * inv_inertia
                slip = wp.dot(v_rel, t)
                inv_width = 1.0 / wp.sqrt(slip * slip + p.friction_smoothing * p.friction_smoothing)
                coeff = contact_friction * elastic * inv_width
                inv_denominator = 1.0 / (1.0 + coeff * h * inv_mass)
                j = coeff * h * slip * inv_denominator
                # force_p += fn n, force_b -= fn n, torque_b -= fn cross2(r, n)
                cross_rn = cross2(r, n)
                adj_fn = wp.dot(adj_fn_direction, n) - adj.torque_b * cross_rn
                adj_n = fn * adj_fn_direction - (adj.torque_b * fn) * wp.vec2(-r[1], r[0])
                adj_r = -(adj.torque_b * fn) * wp.vec2(n[1], -n[0])
                # impulse_b += j t (the pusher's the opposite), ang_impulse_b += j rt
                adj_j = wp.dot(adj_j_direction, t) + adj.ang_impulse_b * rt
                adj_t = j * adj_j_direction
                adj_rt = adj.ang_impulse_b * j
                # j = coeff h slip / (1 + coeff h inv_mass), coeff = mu elastic / sqrt(slip^2 + delta^2)
                adj_numerator = adj_j * inv_denominator
                adj_denominator = -adj_numerator * j
                adj_coeff = adj_numerator * h * slip + adj_denominator * h * inv_mass
                adj_slip = adj_numerator * coeff * h
                adj_inv_mass = adj_denominator * coeff * h
                adj_coeff_width = adj_coeff * inv_width
                adj_friction = adj_friction + adj_coeff_width * elastic
                adj_elastic = adj_coeff_width * contact_friction
                adj_slip = adj_slip - adj_coeff_width * coeff * slip * inv_width
                # inv_mass = 1 / m_p + 1 / m + rt^2 / I
                adj_mass = adj_mass - adj_inv_mass * inv_block_mass * inv_block_mass
                adj_rt_inertia = adj_inv_mass * rt * inv_inertia
                adj_rt = adj_rt + 2.0 * adj_rt_inertia
                adj_inertia = adj_inertia - adj_rt_inertia * rt * inv_inertia
                # slip = v_rel . t, rt = cross2(r, t), t = perp(n)
                adj_v_rel = adj_slip * t
                adj_t = adj_t + adj_slip * v_rel + adj_rt * wp.vec2(-r[1], r[0])
                adj_r = adj_r + adj_rt * wp.vec2(t[1], -t[0])
                adj_n = adj_n + wp.vec2(adj_t[1], -adj_t[0])
                # fn = elastic (1 - c_d v_n), v_n = v_rel . n (the law evaluated twice: the same elastic)
                adj_elastic = adj_elastic + adj_fn * (1.0 - p.contact_damping * v_n)
                adj_v_n = -adj_fn * elastic * p.contact_damping
                adj_v_rel = adj_v_rel + adj_v_n * n
                adj_n = adj_n + adj_v_n * v_rel
                # elastic = stiffness * smooth_relu(-gap, s)
                adj_stiffness = adj_stiffness + adj_elastic * ramp
                adj_gap = -adj_elastic * contact_stiffness * smooth_relu_slope(-gap, sc)
                # v_rel = vp - vb - omega perp(r)
                adj_vp = adj_vp + adj_v_rel
                adj_vb = adj_vb - adj_v_rel
                adj_omega = adj_omega - wp.dot(adj_v_rel, perp(r))
                adj_r = adj_r + omega * wp.vec2(-adj_v_rel[1], adj_v_rel[0])
                # n = rotate(c, s) n_local, r = rotate(c, s) c_local
                adj_c = adj_c + wp.dot(adj_n, n_local) + wp.dot(adj_r, c_local)
                adj_s = (adj_s + adj_n[1] * n_local[0] - adj_n[0] * n_local[1]
                         + adj_r[1] * c_local[0] - adj_r[0] * c_local[1])
                adj_box = BoxDistance()
                adj_box.dist = adj_gap
                adj_box.normal = wp.vec2(c * adj_n[0] + s * adj_n[1], -s * adj_n[0] + c * adj_n[1])
                adj_box.point = wp.vec2(c * adj_r[0] + s * adj_r[1], -s * adj_r[0] + c * adj_r[1])
                adj_q = adj_q + box_distance_gradient(q, center, half, p.corner_smoothing, box_dist, adj_box)
        # q = rotate(c, -s) (xp - xb)
        adj_d = wp.vec2(c * adj_q[0] - s * adj_q[1], s * adj_q[0] + c * adj_q[1])
        adj_c = adj_c + wp.dot(adj_q, d)
        adj_s = adj_s + adj_q[0] * d[1] - adj_q[1] * d[0]
        adj_xp = adj_xp + adj_d
        adj_xb = adj_xb - adj_d
    if (touching & 4) != 0:  # the walls on the pusher: force_p += elastic (1 - c_d v_n) n
        for side in range(4):
            wall_n = wall_normal(side)
            gap_p = wp.dot(xp, wall_n) + p.arena_half - p.pusher_radius
            if gap_p < sc:
                ramp = smooth_relu(-gap_p, sc)
                v_n = wp.dot(vp, wall_n)
                adj_f = wp.dot(adj.force_p, wall_n)
                adj_elastic = adj_f * (1.0 - p.contact_damping * v_n)
                adj_vp = adj_vp - (adj_f * contact_stiffness * ramp * p.contact_damping) * wall_n
                adj_stiffness = adj_stiffness + adj_elastic * ramp
                adj_xp = adj_xp - (adj_elastic * contact_stiffness * smooth_relu_slope(-gap_p, sc)) * wall_n
    return (adj_xp, adj_vp, adj_xb, adj_c, adj_s, adj_vb, adj_omega, adj_mass, adj_inertia, adj_friction,
            adj_stiffness)


_SubstepVec2s = wp.types.matrix(shape=(SUBSTEPS, 2), dtype=wp.float32)  # one vec2 per substep
_SubstepFloats = wp.types.vector(length=SUBSTEPS, dtype=wp.float32)
_SubstepInts = wp.types.vector(length=SUBSTEPS, dtype=wp.int32)
_SubstepBoxes = wp.types.matrix(shape=(SUBSTEPS, 9), dtype=wp.float32)  # a box_row per substep


@wp.func_grad(exact_step)
def _exact_step_adjoint(p: TPushParams, command: wp.vec2, pusher: wp.vec2, pusher_vel: wp.vec2, block: wp.vec2,
                        angle: float, block_vel: wp.vec2, angvel: float, block_mass: float, contact_friction: float,
                        table_friction: float, contact_stiffness: float, i: int,
                        pusher_pos_next: wp.array(dtype=wp.vec2), pusher_vel_next: wp.array(dtype=wp.vec2),
                        block_pos_next: wp.array(dtype=wp.vec2), block_angle_next: wp.array(dtype=float),
                        block_vel_next: wp.array(dtype=wp.vec2), block_angvel_next: wp.array(dtype=float),
                        adj_ret: _Motion):
    h = p.dt / float(_SUBSTEPS)
    inertia = block_mass * p.block_inertia_per_mass
    # The substeps again, keeping each one's start state (index k) and the end state; while loops, which
    # Warp never unrolls: 20 inlined copies of a substep and its adjoint would make slow, oversized code.
    xps = _SubstepVec2s()
    vps = _SubstepVec2s()
    xbs = _SubstepVec2s()
    vbs = _SubstepVec2s()
    cosines = _SubstepFloats()  # of the start angles: the sweep needs no angle, only these
    sines = _SubstepFloats()
    omegas = _SubstepFloats()
    momenta_b = _SubstepVec2s()
    momenta_omega = _SubstepFloats()
    friction_speeds = _SubstepFloats()
    touching = _SubstepInts()
    wall_corners = _SubstepInts()
    bars = _SubstepBoxes()
    stems = _SubstepBoxes()
    xp = pusher
    vp = pusher_vel
    xb = block
    theta = angle
    vb = block_vel
    omega = angvel
    k = int(0)
    while k < _SUBSTEPS:
        xps[k] = xp
        vps[k] = vp
        xbs[k] = xb
        vbs[k] = vb
        omegas[k] = omega
        record = substep_record(p, h, command, xp, vp, xb, theta, vb, omega, block_mass, inertia, contact_friction,
                                table_friction, contact_stiffness)
        cosines[k] = record.cos_angle
        sines[k] = record.sin_angle
        momenta_b[k] = record.momentum_b
        momenta_omega[k] = record.momentum_omega
        friction_speeds[k] = record.friction_speed
        touching[k] = record.touching
        wall_corners[k] = record.wall_corners
        bars[k] = record.boxes[0]
        stems[k] = record.boxes[1]
        xp = record.pusher_pos
        vp = record.pusher_vel
        xb = record.block_pos
        theta = record.block_angle
        vb = record.block_vel
        omega = record.block_angvel
        k = k + 1

    adj_xp = adj_ret.pusher_pos
    adj_vp = adj_ret.pusher_vel
    adj_xb = adj_ret.block_pos
    adj_theta = adj_ret.block_angle
    adj_vb = adj_ret.block_vel
    adj_omega = adj_ret.block_angvel

    # the substeps in reverse; adj_* hold the gradients of substep k's results, then of its start state
    adj_command = wp.vec2(0.0, 0.0)
    adj_mass = float(0.0)
    adj_inertia = float(0.0)
    adj_contact_friction = float(0.0)
    adj_table_friction = float(0.0)
    adj_stiffness = float(0.0)
    rho = p.friction_radius
    servo = h * p.servo_gain / p.pusher_mass
    # reciprocals once: divisions were much of the sweep's cost (the gradient moves by round-off)
    inv_inertia = 1.0 / inertia
    inv_block_mass = 1.0 / block_mass
    inv_pusher_mass = 1.0 / p.pusher_mass
    inv_effective_pusher_mass = _pusher_inverse_mass(p, h)
    inv_servo = 1.0 / (1.0 + servo)
    k = _SUBSTEPS
    while k > 0:
        k = k - 1
        vp_next = vp  # substep k's results: the state after it
        vb_next = vb
        omega_next = omega
        xp = xps[k]
        vp = vps[k]
        xb = xbs[k]
        vb = vbs[k]
        omega = omegas[k]
        # positions and angle: x' = x + h v'
        adj_vp_next = adj_vp + h * adj_xp
        adj_vb_next = adj_vb + h * adj_xb
        adj_omega_next = adj_omega + h * adj_theta
        # the table friction's drag, from the speed the substep computed
        inv_speed = 1.0 / friction_speeds[k]
        drag = table_friction * block_mass * p.gravity * inv_speed
        # omega' = (omega + momentum_omega / I) / (1 + h drag rho^2 / I)
        adj_numerator = adj_omega_next / (1.0 + h * drag * rho * rho * inv_inertia)
        adj_denominator = -adj_numerator * omega_next
        adj_omega = adj_numerator
        adj_inertia = adj_inertia - (adj_numerator * momenta_omega[k]
                                     + adj_denominator * h * drag * rho * rho) * inv_inertia * inv_inertia
        adj_drag = adj_denominator * h * rho * rho * inv_inertia
        adj_torque_b = adj_numerator * h * inv_inertia
        adj_ang_impulse_b = adj_numerator * inv_inertia
        # vb' = (vb + momentum_b / m) / (1 + h drag / m)
        adj_numerator_b = adj_vb_next / (1.0 + h * drag * inv_block_mass)
        adj_denominator = -wp.dot(adj_numerator_b, vb_next)
        adj_vb = adj_numerator_b
        adj_mass = adj_mass - (wp.dot(adj_numerator_b, momenta_b[k])
                               + adj_denominator * h * drag) * inv_block_mass * inv_block_mass
        adj_drag = adj_drag + adj_denominator * h * inv_block_mass
        adj_force_b = adj_numerator_b * (h * inv_block_mass)
        adj_impulse_b = adj_numerator_b * inv_block_mass
        # drag = mu m g / speed, speed = sqrt(|vb|^2 + rho^2 omega^2 + delta^2)
        adj_table_friction = adj_table_friction + adj_drag * block_mass * p.gravity * inv_speed
        adj_mass = adj_mass + adj_drag * table_friction * p.gravity * inv_speed
        adj_speed_squared = -0.5 * adj_drag * drag * inv_speed * inv_speed
        adj_vb = adj_vb + 2.0 * adj_speed_squared * vb
        adj_omega = adj_omega + 2.0 * adj_speed_squared * rho * rho * omega
        # vp' = (vp + (h force_p + impulse_p) / m_p + servo command) / (1 + servo)
        adj_numerator_p = adj_vp_next * inv_servo
        adj_vp = adj_numerator_p
        adj_force_p = adj_numerator_p * (h * inv_pusher_mass)
        adj_impulse_p = adj_numerator_p * inv_pusher_mass
        adj_command = adj_command + servo * adj_numerator_p
        # the walls on the T (they add to the pusher's force and torque on it, which pass through)
        c = cosines[k]
        s = sines[k]
        w_xb, adj_c, adj_s, w_vb, w_omega, w_stiffness = block_wall_wrench_gradients(
            p, xb, c, s, vb, omega, contact_stiffness, adj_force_b, adj_torque_b, wall_corners[k])
        adj_xb = adj_xb + w_xb
        adj_vb = adj_vb + w_vb
        adj_omega = adj_omega + w_omega
        adj_stiffness = adj_stiffness + w_stiffness
        if touching[k] != 0:  # the pusher's contacts, where one is in reach (none: no force, no gradient)
            adj_contacts = PusherContacts()
            adj_contacts.force_p = adj_force_p
            adj_contacts.force_b = adj_force_b
            adj_contacts.torque_b = adj_torque_b
            adj_contacts.impulse_p = adj_impulse_p
            adj_contacts.impulse_b = adj_impulse_b
            adj_contacts.ang_impulse_b = adj_ang_impulse_b
            g_xp, g_vp, g_xb, g_c, g_s, g_vb, g_omega, g_mass, g_inertia, g_friction, g_stiffness = \
                pusher_contacts_gradients_given_reciprocals(
                    p, h, xp, vp, xb, c, s, vb, omega, inv_effective_pusher_mass, inv_block_mass, inv_inertia,
                    contact_friction, contact_stiffness, touching[k], wp.matrix_from_rows(bars[k], stems[k]),
                    adj_contacts)
            adj_xp = adj_xp + g_xp
            adj_vp = adj_vp + g_vp
            adj_xb = adj_xb + g_xb
            adj_c = adj_c + g_c
            adj_s = adj_s + g_s
            adj_vb = adj_vb + g_vb
            adj_omega = adj_omega + g_omega
            adj_mass = adj_mass + g_mass
            adj_inertia = adj_inertia + g_inertia
            adj_contact_friction = adj_contact_friction + g_friction
            adj_stiffness = adj_stiffness + g_stiffness
        # c = cos theta, s = sin theta
        adj_theta = adj_theta - s * adj_c + c * adj_s
    wp.adjoint[command] += adj_command
    wp.adjoint[pusher] += adj_xp
    wp.adjoint[pusher_vel] += adj_vp
    wp.adjoint[block] += adj_xb
    wp.adjoint[angle] += adj_theta
    wp.adjoint[block_vel] += adj_vb
    wp.adjoint[angvel] += adj_omega
    wp.adjoint[block_mass] += adj_mass + adj_inertia * p.block_inertia_per_mass
    wp.adjoint[contact_friction] += adj_contact_friction
    wp.adjoint[table_friction] += adj_table_friction
    wp.adjoint[contact_stiffness] += adj_stiffness


# ----------------------------------------------------------------------------------------- kernels
_MAX_RESET_TRIES = wp.constant(1000)  # then the last sample is kept; acceptance is ~50 %+ with the defaults


@wp.kernel
def t_push_reset(
    seed: wp.array(dtype=wp.int32),
    episode: wp.array(dtype=wp.int32),
    p: TPushParams,
    # outputs
    pusher_pos: wp.array(dtype=wp.vec2),
    pusher_vel: wp.array(dtype=wp.vec2),
    block_pos: wp.array(dtype=wp.vec2),
    block_angle: wp.array(dtype=float),
    block_vel: wp.array(dtype=wp.vec2),
    block_angvel: wp.array(dtype=float),
    step: wp.array(dtype=wp.int32),
):
    i = wp.tid()
    rng = wp.rand_init(seed[i], episode[i])
    # rejection sampling (never differentiated): block pose away from the goal ...
    xb = wp.vec2(0.0, 0.0)
    theta = float(0.0)
    far = int(0)
    tries = int(0)
    while far == 0 and tries < _MAX_RESET_TRIES:  # capped so odd constructor arguments cannot hang a kernel
        tries = tries + 1
        xb = wp.vec2(wp.randf(rng, -p.reset_block_range, p.reset_block_range),
                     wp.randf(rng, -p.reset_block_range, p.reset_block_range))
        theta = wp.randf(rng, -wp.pi, wp.pi)
        if p.reset_angle_range < wp.pi:  # a narrowed start (start_spread < 1): offsets around the goal pose
            theta = p.goal_angle + theta * (p.reset_angle_range / wp.pi)
            xb = xb + p.goal_pos
        if mean_keypoint_distance(p, xb, theta) > p.reset_min_goal_distance:
            far = 1
    # ... and a pusher clear of it
    xp = wp.vec2(0.0, 0.0)
    clear = int(0)
    tries = int(0)
    while clear == 0 and tries < _MAX_RESET_TRIES:
        tries = tries + 1
        xp = wp.vec2(wp.randf(rng, -p.reset_pusher_range, p.reset_pusher_range),
                     wp.randf(rng, -p.reset_pusher_range, p.reset_pusher_range))
        if pusher_gap(p, xp, xb, theta) > p.reset_min_clearance:
            clear = 1
    pusher_pos[i] = xp
    pusher_vel[i] = wp.vec2(0.0, 0.0)
    block_pos[i] = xb
    block_angle[i] = theta
    block_vel[i] = wp.vec2(0.0, 0.0)
    block_angvel[i] = 0.0
    step[i] = 0


@wp.kernel
def t_push_observe(
    pusher_pos: wp.array(dtype=wp.vec2),
    pusher_vel: wp.array(dtype=wp.vec2),
    block_pos: wp.array(dtype=wp.vec2),
    block_angle: wp.array(dtype=float),
    block_vel: wp.array(dtype=wp.vec2),
    block_angvel: wp.array(dtype=float),
    step: wp.array(dtype=wp.int32),
    p: TPushParams,
    # outputs
    obs: wp.array2d(dtype=float),
):
    i = wp.tid()
    _write_observation(i, observation(pusher_pos[i], pusher_vel[i], block_pos[i], block_angle[i], block_vel[i],
                                      block_angvel[i]), obs)


@wp.kernel
def t_push_step(
    pusher_pos: wp.array(dtype=wp.vec2),
    pusher_vel: wp.array(dtype=wp.vec2),
    block_pos: wp.array(dtype=wp.vec2),
    block_angle: wp.array(dtype=float),
    block_vel: wp.array(dtype=wp.vec2),
    block_angvel: wp.array(dtype=float),
    step: wp.array(dtype=wp.int32),
    action: wp.array2d(dtype=float),
    block_mass: wp.array(dtype=float),
    contact_friction: wp.array(dtype=float),
    table_friction: wp.array(dtype=float),
    contact_stiffness: wp.array(dtype=float),
    p: TPushParams,
    # outputs
    pusher_pos_next: wp.array(dtype=wp.vec2),
    pusher_vel_next: wp.array(dtype=wp.vec2),
    block_pos_next: wp.array(dtype=wp.vec2),
    block_angle_next: wp.array(dtype=float),
    block_vel_next: wp.array(dtype=wp.vec2),
    block_angvel_next: wp.array(dtype=float),
    step_next: wp.array(dtype=wp.int32),
    obs: wp.array2d(dtype=float),
    reward: wp.array(dtype=float),
    terminated: wp.array(dtype=wp.int32),
    success: wp.array(dtype=wp.int32),
):
    i = wp.tid()
    command = p.max_speed * wp.vec2(action[i, 0], action[i, 1])
    state = exact_step(p, command, pusher_pos[i], pusher_vel[i], block_pos[i], block_angle[i], block_vel[i],
                       block_angvel[i], block_mass[i], contact_friction[i], table_friction[i], contact_stiffness[i],
                       i, pusher_pos_next, pusher_vel_next, block_pos_next, block_angle_next, block_vel_next,
                       block_angvel_next)
    xp = state.pusher_pos
    vp = state.pusher_vel
    xb = state.block_pos
    theta = state.block_angle
    vb = state.block_vel
    omega = state.block_angvel
    pusher_pos_next[i] = xp
    pusher_vel_next[i] = vp
    block_pos_next[i] = xb
    block_angle_next[i] = theta
    block_vel_next[i] = vb
    block_angvel_next[i] = omega
    step_next[i] = step[i] + 1
    # the kernel's own stores (the adjoint's replay skips them; _write_observation's replay skips its stores too)
    o = observation(xp, vp, xb, theta, vb, omega)
    for k in range(11):
        obs[i, k] = o[k]
    rewarded = step_reward_result(p, xp, xb, theta, pusher_pos[i], block_pos[i])
    reward[i] = rewarded.reward
    terminated[i] = 0
    success[i] = 0
    if rewarded.distance < p.success_distance:
        success[i] = 1


# --------------------------------------------------------------- pre-contact gradients (diffgym.envs.pre_contact)
_surrogate_advance, _, _, _, _ = _make_advance(pre_contact=True)


@wp.func
def _exact_advance(p: TPushParams, command: wp.vec2, pusher: wp.vec2, pusher_vel: wp.vec2, block: wp.vec2,
                   angle: float, block_vel: wp.vec2, angvel: float, block_mass: float, contact_friction: float,
                   table_friction: float, contact_stiffness: float) -> _Motion:
    """``advance`` inside the straight-through kernel, which takes its values and none of its gradient."""
    xp, vp, xb, theta, vb, omega = advance(p, command, pusher, pusher_vel, block, angle, block_vel, angvel,
                                           block_mass, contact_friction, table_friction, contact_stiffness)
    return _motion(xp, vp, xb, theta, vb, omega)


@wp.func_grad(_exact_advance)
def _exact_advance_adjoint(p: TPushParams, command: wp.vec2, pusher: wp.vec2, pusher_vel: wp.vec2, block: wp.vec2,
                           angle: float, block_vel: wp.vec2, angvel: float, block_mass: float,
                           contact_friction: float, table_friction: float, contact_stiffness: float,
                           adj_ret: _Motion):
    # nothing: every gradient of the straight-through kernel comes from the surrogate's substeps
    pass


@wp.func_replay(_exact_advance)
def _exact_advance_replay(p: TPushParams, command: wp.vec2, pusher: wp.vec2, pusher_vel: wp.vec2, block: wp.vec2,
                          angle: float, block_vel: wp.vec2, angvel: float, block_mass: float,
                          contact_friction: float, table_friction: float, contact_stiffness: float):
    # The backward pass never uses the exact values (they only reach straight_through's ignored argument
    # and the output stores, which the replay skips, _write_observation's by its own replay), so it skips
    # their 20 substeps; the inputs stand in.
    return _motion(pusher, pusher_vel, block, angle, block_vel, angvel)


def _pre_contact_step_kernel(straight_through_outputs: bool):
    """The step kernel of ``contact_gradient_distance > 0`` (``straight_through_outputs``): the exact
    step's outputs, the surrogate step's gradients; or, for tests, the surrogate step outright. The exact
    kernel keeps its own body: sharing this one would reorder the sums in its adjoint and change the
    default gradients in their last bits."""
    through_vec2, through_float, through_obs = (straight_through(t) for t in (wp.vec2, float, _Observation))

    def step_kernel(
        pusher_pos: wp.array(dtype=wp.vec2),
        pusher_vel: wp.array(dtype=wp.vec2),
        block_pos: wp.array(dtype=wp.vec2),
        block_angle: wp.array(dtype=float),
        block_vel: wp.array(dtype=wp.vec2),
        block_angvel: wp.array(dtype=float),
        step: wp.array(dtype=wp.int32),
        action: wp.array2d(dtype=float),
        block_mass: wp.array(dtype=float),
        contact_friction: wp.array(dtype=float),
        table_friction: wp.array(dtype=float),
        contact_stiffness: wp.array(dtype=float),
        p: TPushParams,
        # outputs
        pusher_pos_next: wp.array(dtype=wp.vec2),
        pusher_vel_next: wp.array(dtype=wp.vec2),
        block_pos_next: wp.array(dtype=wp.vec2),
        block_angle_next: wp.array(dtype=float),
        block_vel_next: wp.array(dtype=wp.vec2),
        block_angvel_next: wp.array(dtype=float),
        step_next: wp.array(dtype=wp.int32),
        obs: wp.array2d(dtype=float),
        reward: wp.array(dtype=float),
        terminated: wp.array(dtype=wp.int32),
        success: wp.array(dtype=wp.int32),
    ):
        i = wp.tid()
        command = p.max_speed * wp.vec2(action[i, 0], action[i, 1])
        # the surrogate step: the exact step with every contact's force extended to the distance
        xp, vp, xb, theta, vb, omega = _surrogate_advance(p, command, pusher_pos[i], pusher_vel[i], block_pos[i],
                                                          block_angle[i], block_vel[i], block_angvel[i],
                                                          block_mass[i], contact_friction[i], table_friction[i],
                                                          contact_stiffness[i])
        r, distance = step_reward(p, xp, xb, theta, pusher_pos[i], block_pos[i])
        o = observation(xp, vp, xb, theta, vb, omega)
        if wp.static(straight_through_outputs):
            # the exact step from the same inputs; each output takes its value and the surrogate's gradient
            e = _exact_advance(p, command, pusher_pos[i], pusher_vel[i], block_pos[i], block_angle[i],
                               block_vel[i], block_angvel[i], block_mass[i], contact_friction[i],
                               table_friction[i], contact_stiffness[i])
            er, distance = step_reward(p, e.pusher_pos, e.block_pos, e.block_angle, pusher_pos[i], block_pos[i])
            o = through_obs(observation(e.pusher_pos, e.pusher_vel, e.block_pos, e.block_angle, e.block_vel,
                                        e.block_angvel), o)
            r = through_float(er, r)
            xp = through_vec2(e.pusher_pos, xp)
            vp = through_vec2(e.pusher_vel, vp)
            xb = through_vec2(e.block_pos, xb)
            theta = through_float(e.block_angle, theta)
            vb = through_vec2(e.block_vel, vb)
            omega = through_float(e.block_angvel, omega)
        pusher_pos_next[i] = xp
        pusher_vel_next[i] = vp
        block_pos_next[i] = xb
        block_angle_next[i] = theta
        block_vel_next[i] = vb
        block_angvel_next[i] = omega
        step_next[i] = step[i] + 1
        _write_observation(i, o, obs)
        reward[i] = r
        terminated[i] = 0
        success[i] = 0
        if distance < p.success_distance:
            success[i] = 1

    name = "t_push_step_straight_through" if straight_through_outputs else "t_push_step_surrogate"
    # a module of its own: only a sim built with the option compiles it
    return wp.kernel(step_kernel, name=name, module="unique", module_options={"max_unroll": max(SUBSTEPS, 16)})


class TPush(DiffSim):
    """Functional twin of :class:`TPushEnv` (pure ``reset``/``step`` on batched states)."""

    state_type = TPushState
    obs_dim = 11
    act_dim = 2
    dt = 0.05
    default_max_episode_steps = 200
    reset_kernel = t_push_reset
    observe_kernel = t_push_observe
    step_kernel = t_push_step
    straight_through_step_kernel = _pre_contact_step_kernel(straight_through_outputs=True)
    """The step kernel of a sim built with ``contact_gradient_distance > 0`` (``diffgym.envs.pre_contact``)."""
    surrogate_step_kernel = _pre_contact_step_kernel(straight_through_outputs=False)
    """The surrogate step in the forward pass too: for tests only (``pre_contact.surrogate_forward``)."""
    physical_params = ("block_mass", "contact_friction", "table_friction", "contact_stiffness")
    physics_bounds = PHYSICS_BOUNDS
    physics_units = PHYSICS_UNITS

    def __init__(self, device: str = "cpu", max_episode_steps: int | None = None, *,
                 max_speed: float = 0.5, servo_gain: float = 40.0, pusher_mass: float = 0.2,
                 block_mass: float = 1.0, contact_stiffness: float = 5000.0, contact_damping: float = 1.0,
                 contact_smoothing: float = 1e-3, corner_smoothing: float = 2e-3, contact_friction: float = 0.3,
                 table_friction: float = 0.3,
                 friction_smoothing: float = 0.01, shaping_weight: float = 0.1, face_shaping_weight: float = 0.0,
                 success_distance: float = 0.02, start_spread: float = 1.0, contact_gradient_distance: float = 0.0):
        super().__init__(device, max_episode_steps)
        contact_gradient_distance = check_contact_gradient_distance(contact_gradient_distance)
        if not MIN_START_SPREAD <= start_spread <= 1.0:
            raise ValueError(f"start_spread must be in [{MIN_START_SPREAD}, 1], got {start_spread}")
        self.check_default_physics(block_mass=block_mass, contact_friction=contact_friction,
                                   table_friction=table_friction, contact_stiffness=contact_stiffness)
        for name, value in (("max_speed", max_speed), ("servo_gain", servo_gain), ("pusher_mass", pusher_mass),
                            ("contact_smoothing", contact_smoothing),
                            ("corner_smoothing", corner_smoothing), ("friction_smoothing", friction_smoothing),
                            ("success_distance", success_distance)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        for name, value in (("contact_damping", contact_damping), ("shaping_weight", shaping_weight),
                            ("face_shaping_weight", face_shaping_weight)):
            if not value >= 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        self.block_vertex_limit = ARENA_HALF + WALL_SLACK
        """The T's hull vertices must satisfy ``|x|, |y| <= block_vertex_limit`` [m] (``check_state``)."""
        speed_bound = SPEED_BOUND_FACTOR * max_speed
        self.state_bounds = {"pusher_pos": ARENA_HALF, "pusher_vel": speed_bound,
                             "block_pos": self.block_vertex_limit, "block_vel": speed_bound,
                             "block_angvel": ANGULAR_SPEED_BOUND_FACTOR * max_speed}
        self._hull = torch.tensor(_HULL, dtype=torch.float32, device=self.device)
        p = self.params = TPushParams()
        p.dt = self.dt
        p.arena_half = ARENA_HALF
        p.pusher_radius = 0.025
        p.pusher_mass = pusher_mass
        p.max_speed = max_speed
        p.servo_gain = servo_gain
        p.block_mass = block_mass
        p.block_inertia = block_mass * t_inertia_per_mass()
        p.block_inertia_per_mass = t_inertia_per_mass()
        p.friction_radius = t_mean_radius()
        p.bar_center = wp.vec2(*BAR_CENTER)
        p.bar_half = wp.vec2(*BAR_HALF)
        p.stem_center = wp.vec2(*STEM_CENTER)
        p.stem_half = wp.vec2(*STEM_HALF)
        _check_outline_matches_hull(p)
        p.contact_stiffness = contact_stiffness
        p.contact_damping = contact_damping
        p.contact_smoothing = contact_smoothing
        p.corner_smoothing = corner_smoothing
        p.contact_friction = contact_friction
        p.contact_gradient_distance = contact_gradient_distance
        p.contact_gradient_peak_per_stiffness = PEAK_FRACTION * contact_smoothing
        p.table_friction = table_friction
        p.gravity = 9.81
        p.friction_smoothing = friction_smoothing
        p.goal_pos = wp.vec2(*GOAL_POSITION)
        p.goal_angle = GOAL_ANGLE
        p.shaping_weight = shaping_weight
        p.face_shaping_weight = face_shaping_weight
        p.success_distance = success_distance
        # start_spread scales the block's start around the goal pose (a start-state curriculum's knob);
        # at 1 the draws are the registered start distribution's, number for number
        p.reset_block_range = 0.3 * start_spread
        p.reset_angle_range = math.pi * start_spread
        p.reset_pusher_range = 0.4
        p.reset_min_goal_distance = 0.1
        p.reset_min_clearance = 0.02
        install(self, contact_gradient_distance)

    def hull_vertices(self, block_pos: torch.Tensor, block_angle: torch.Tensor) -> torch.Tensor:
        """World positions ``(B, 6, 2)`` [m] of the T's six convex-hull corners at the given poses."""
        c, s = torch.cos(block_angle)[:, None], torch.sin(block_angle)[:, None]
        x, y = self._hull[None, :, 0], self._hull[None, :, 1]
        return block_pos[:, None, :] + torch.stack([c * x - s * y, s * x + c * y], dim=-1)

    def _outside_task_domain(self, state) -> torch.Tensor:
        return self._corner_reach(state) > self.block_vertex_limit

    def _task_domain_message(self, state, env: int) -> str:
        return (f"state.block_pos and block_angle must keep the T's corners within {self.block_vertex_limit:g} m "
                f"of the arena centre per axis (at most {WALL_SLACK:g} m into a wall), got a corner at "
                f"{float(self._corner_reach(state)[env]):.4g} m in env {env}")

    def _corner_reach(self, state) -> torch.Tensor:
        """(B,) the largest |coordinate| of the T's hull vertices [m]."""
        return self.hull_vertices(state.block_pos.detach(), state.block_angle.detach()).abs().amax(dim=(1, 2))

    def render_state(self, state: TPushState, index: int = 0) -> np.ndarray:
        half = self.params.arena_half
        margin = 0.04
        canvas = Canvas(256, 256, xlim=(-half - margin, half + margin), ylim=(-half - margin, half + margin),
                        background=(225, 225, 225))
        canvas.polygon([(-half, -half), (half, -half), (half, half), (-half, half)], (250, 250, 250))
        corners = [(-half, -half), (half, -half), (half, half), (-half, half)]
        for a, b in zip(corners, corners[1:] + corners[:1]):
            canvas.line(a, b, 0.012, (90, 90, 90))

        def outline(pos: np.ndarray, theta: float) -> np.ndarray:
            c, s = math.cos(theta), math.sin(theta)
            return T_OUTLINE @ np.array([[c, s], [-s, c]]) + pos

        goal = outline(np.array(GOAL_POSITION), GOAL_ANGLE)
        block = outline(state.block_pos[index].detach().cpu().numpy().astype(float),
                        float(state.block_angle[index]))
        canvas.polygon(block, (120, 130, 150))
        for a, b in zip(goal, np.roll(goal, -1, axis=0)):
            canvas.line(a, b, 0.006, (40, 170, 60))
        pusher = state.pusher_pos[index].detach().cpu().numpy().astype(float)
        canvas.circle(pusher, self.params.pusher_radius, (40, 90, 220))
        return canvas.image


class TPushEnv(DiffGymEnv):
    """
    ## Description
    Push-T in the plane: a disc pusher (radius 0.025 m) pushes a rigid T-block (bar 0.20 x 0.05 m on
    a stem 0.05 x 0.15 m, 1 kg, uniform density) across a table inside a 1 x 1 m walled arena until
    the T covers its goal pose (arena centre, theta = pi/4). Every contact is a smooth penalty so
    the dynamics are differentiable: the contact-rich task of the suite.

    ## Action Space
    `Box(-1, 1, (2,), float32)`: the pusher's commanded velocity as a fraction of `max_speed`
    (0.5 m/s). A velocity servo `F = servo_gain (max_speed a - v)` (40 N s/m, the damping half of a
    stiff PD tracker; 20 N at stall) drives the 0.2 kg pusher. Out-of-range actions are clipped to
    [-1, 1]; the clip's gradient is 1 inside the box and 0 outside.

    ## Observation Space
    `Box(-inf, inf, (11,), float32)`: `[pusher x, y, pusher vx, vy, block x, y, cos theta, sin theta,
    block vx, vy, block omega]`, where the block position is its centre of mass [m], theta its
    orientation (0: bar up, stem pointing to -y) and velocities are in m/s and rad/s. The goal pose
    is fixed, so it is not observed.

    ## Dynamics
    20 semi-implicit Euler substeps of h = 2.5 ms per 0.05 s control step, all in one kernel launch.
    * Pusher-block: for each of the T's two boxes, a normal force `k relu_s(-gap) (1 - c v_n)` along
      the box's outward normal, where gap is the signed distance from the pusher's rim to the box,
      `relu_s` a C2 ramp of half-width s = 1 mm, k = 5000 N/m and c = 1 s/m (Hunt-Crossley
      damping; v_n > 0 when separating). The boxes' corners are rounded by a softplus of width
      2 mm (`corner_smoothing`) so the contact normal, and with it the force, is smooth.
      Friction: Coulomb `mu N` with mu = 0.3 smoothed by the pseudo-Huber norm of the slip speed
      (delta = `friction_smoothing`), applied as an implicit impulse that never reverses the slip.
    * Block-table: smoothed Coulomb friction `-mu m g grad(pseudo_huber_delta(v, rho omega))` with
      mu = 0.3 and rho the T's mean radius about its centre of mass (an ellipsoidal limit surface),
      integrated implicitly in velocity.
    * Walls: the same damped penalty on the pusher disc and on the T's six hull vertices;
      frictionless.
    * The pusher servo is integrated implicitly. At full speed the pusher moves 1.25 mm per substep
      and the deepest penetration (stall force 20 N / k) is 4 mm, far below the 25 mm half
      thickness of the T, so nothing tunnels.

    ## Physical parameters
    Per env and differentiable (`physical_params`; the constructor's values are the defaults and must lie in
    the same ranges): `block_mass` in [0.5, 2] kg (the moment of inertia follows it, same shape and
    uniform density), `contact_friction` (pusher-block mu) in [0, 1], `table_friction` (block-table mu) in
    [0, 1] and `contact_stiffness` (k of every contact: pusher-block, pusher-wall, block-wall; the
    pre-contact tail's peak scales with it) in [2000, 10000] N/m. `differentiable_step(state, action,
    physics={"block_mass": m, ...})` with `(B,)` tensors (gradients flow into them);
    `reset(options={"physics": {...}})` sets the values later steps use. Within the ranges the valid
    states' bounds below hold (`PHYSICS_BOUNDS`); the default physics is bit for bit the step without it.

    ## Pre-contact gradients
    `contact_gradient_distance=D > 0` (default 0: off) changes the backward pass only: the forward pass
    (states, observations, rewards, success) stays the exact one bit for bit, while the gradient of each
    step is that of a surrogate step in which every contact's elastic force also acts at a positive gap
    `g < D`: `k relu_s(-g) + (k s / 8) (1 - S(g / D)) (1 - S(-g / s))`, S the C2 smoothstep
    `u^3 (10 - 15 u + 6 u^2)` on [0, 1] (peak 0.625 N at touch; exactly the exact law for gap >= D and
    for penetrations deeper than s = 1 mm). Damping and friction scale with it as in contact. So a pusher
    within D of the T gets a gradient saying how pushing the face ahead would move the block, which the
    exact gradient (zero until contact) cannot. Costs about 2x forward and 1.4x forward+backward time;
    `diffgym.envs.pre_contact` and docs/api.md describe the estimator and how to choose D.

    ## Valid states
    `set_state` and `differentiable_step` accept finite states with the pusher centre in the arena
    `[-0.5, 0.5]^2`, the T's six hull corners at most 0.03 m beyond a wall (`|x|, |y| <= 0.53` m),
    pusher and block velocities up to `5 max_speed` (2.5 m/s) and the block's spin up to
    `100 max_speed` (50 rad/s) per axis, and raise `ValueError` naming the field otherwise. The
    dynamics keep every state reached from a reset well inside (corners within ~7 mm of a wall's
    surface, speeds ~1.5 max_speed, spins ~8 rad/s). Outside, contacts deeper than the pusher's radius
    make the depth-proportional damping unstable: a T started 0.3 m beyond a wall became NaN in one step.
    Any finite `block_angle` is valid (it is unwrapped).

    ## Rewards
    `r = -D - 0.1 relu_s(gap)`, where D is the mean distance between the 8 outline vertices of the
    T at its current and its goal pose [m], and the second term (a smoothed pusher-to-block
    clearance, zero in contact) gives a gradient before first contact. With `face_shaping_weight=w`
    (default 0) the reward also gets `w (Phi(s') - Phi(s))`, Phi the cosine of the pusher's bearing
    from the block against the direction away from the goal (potential-based shaping with gamma = 1:
    it telescopes over an episode, shifting the undiscounted return by at most 2w; its gradient walks
    the pusher round the block to the face that pushes it goalwards).

    ## Starting State
    Block centre ~ U([-0.3, 0.3]^2), theta ~ U(-pi, pi), resampled until D > 0.1 m; pusher centre ~
    U([-0.4, 0.4]^2) resampled until its rim is 0.02 m clear of the T; all velocities zero. Drawn
    from Warp's RNG stream `(seed, episode)`. `start_spread=s < 1` narrows the block's start around the goal
    pose (centre `U([-0.3 s, 0.3 s]^2)`, theta the goal angle plus `U(-pi s, pi s)`, still D > 0.1 m;
    s >= 0.3) for start-state curricula; s = 1 is the distribution above, draw for draw.

    ## Episode End
    No termination. Truncation after 200 steps (10 s; v1: 400 steps, 20 s).

    ## Success
    `info["is_success"]`: D < 0.02 m after the step (v1: D < 0.03 m).

    ## Arguments
    `gym.make("DiffGym/TPush-v0", device="cpu", render_mode=None, max_speed=0.5, servo_gain=40.0,
    pusher_mass=0.2, block_mass=1.0, contact_stiffness=5000.0, contact_damping=1.0,
    contact_smoothing=1e-3, corner_smoothing=2e-3, contact_friction=0.3, table_friction=0.3, friction_smoothing=0.01,
    shaping_weight=0.1, face_shaping_weight=0.0, success_distance=0.02, start_spread=1.0,
    contact_gradient_distance=0.0)`; `gym.make_vec(..., num_envs=N)` gives the native
    batched vector env. Stiffer contacts or smaller smoothing give crisper physics and worse
    conditioned gradients.

    ## Version History
    * v1: the same dynamics and reward with twice the time (400 steps) and a 3 cm success tolerance
      (`success_distance=0.03`). On v0 the feasibility reference, an MPPI planner on the exact
      simulator, succeeds in only 69 % of 256 seeded episodes, still gaining at the last step and
      failing mostly by being slow, so a 90 % success criterion was beyond any known controller; on v1
      it is within reach (docs/tasks.md). Zero and random actions stay far from it.
    * v0: initial version.
    """

    sim_class = TPush
