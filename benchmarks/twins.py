"""Pure-torch and JAX twins of PointMass1D and FrankaReach: the same dynamics and rewards as the Warp
kernels (``diffgym/envs/point_mass_1d.py``, ``diffgym/envs/franka_reach.py``), written from the task
definitions, so ``benchmarks/bench_peers.py`` compares implementations of one model.

Every constant is read from a DiffGym sim (its Warp params struct and the FR3 chain parsed from the URDF),
so a change to a task's numbers reaches the twins; a change to its equations does not, which is what
``tests/test_twins.py`` (torch, and JAX when installed) and the benchmark's own check catch.

A twin's rollout maps a start state and actions ``(T, N, act_dim)`` to per-step rewards ``(T, N)`` and the
final state. As in DiffGym, actions are clipped to [-1, 1] inside the step.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from diffgym.urdf import rpy_to_quat


# --------------------------------------------------------------------------------------------- constants
@dataclasses.dataclass(frozen=True)
class PointMass1DConstants:
    dt: float
    mass: float
    action_cost: float

    @classmethod
    def from_sim(cls, sim) -> PointMass1DConstants:
        p = sim.params
        return cls(float(p.dt), float(p.mass), float(p.action_cost))


def _quat_to_matrix(q: np.ndarray) -> np.ndarray:
    x, y, z, w = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _skew(a: np.ndarray) -> np.ndarray:
    return np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])


@dataclasses.dataclass(frozen=True)
class FrankaReachConstants:
    """The step's numbers, and the FR3 chain as one (origin, revolute joint) pair per arm joint.

    The joint k's pose in its parent is ``origin_k * Rot(axis_k, q_k)``, so with Rodrigues' formula
    ``R_origin Rot(a, q) = cos q * A + sin q * B + (1 - cos q) * C`` with the constant matrices
    ``A = R_origin``, ``B = R_origin [a]x``, ``C = R_origin a a^T``; the fixed joints after the last arm
    joint (flange, hand, TCP) reduce to one offset ``tip`` in joint 7's frame. Float64 here, float32 in use.
    """

    dt: float
    lower: np.ndarray       # (7,)
    upper: np.ndarray       # (7,)
    max_speed: np.ndarray   # (7,) joint speed at |a| = 1 [rad/s]
    translation: np.ndarray  # (7, 3) origin translation of each arm joint in its parent's frame
    rot_a: np.ndarray       # (7, 3, 3)
    rot_b: np.ndarray       # (7, 3, 3)
    rot_c: np.ndarray       # (7, 3, 3)
    tip: np.ndarray         # (3,)

    @classmethod
    def from_sim(cls, sim) -> FrankaReachConstants:
        p = sim.params
        vec = lambda v: np.array([float(v[k]) for k in range(len(v))])  # noqa: E731  (Warp vector -> NumPy)
        pending_r, pending_t = np.eye(3), np.zeros(3)  # fixed joints not yet folded into the next origin
        translation, rot_a, rot_b, rot_c = [], [], [], []
        for joint in sim.chain.joints:
            r_origin = pending_r @ _quat_to_matrix(rpy_to_quat(joint.rpy))
            t_origin = pending_t + pending_r @ np.asarray(joint.xyz, dtype=np.float64)
            if joint.type == "fixed":
                pending_r, pending_t = r_origin, t_origin
                continue
            if joint.type != "revolute":
                raise ValueError(f"the FrankaReach twins handle revolute and fixed joints, not {joint.type!r} "
                                 f"({joint.name})")
            axis = np.asarray(joint.axis, dtype=np.float64)
            translation.append(t_origin)
            rot_a.append(r_origin)
            rot_b.append(r_origin @ _skew(axis))
            rot_c.append(r_origin @ np.outer(axis, axis))
            pending_r, pending_t = np.eye(3), np.zeros(3)
        return cls(float(p.dt), vec(p.lower), vec(p.upper), vec(p.max_speed), np.array(translation),
                   np.array(rot_a), np.array(rot_b), np.array(rot_c), pending_t)


# --------------------------------------------------------------------------------------------- torch
class TorchTwin:
    """Eager torch: one batched step per control step, autograd for the gradient."""

    def __init__(self, constants, device: str = "cpu"):
        import torch

        self.torch = torch
        self.c = constants
        self.device = device
        if isinstance(constants, FrankaReachConstants):
            f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device)  # noqa: E731
            self.lower, self.upper, self.max_speed = f32(constants.lower), f32(constants.upper), f32(constants.max_speed)
            self.translation, self.rot_a = f32(constants.translation), f32(constants.rot_a)
            self.rot_b, self.rot_c, self.tip = f32(constants.rot_b), f32(constants.rot_c), f32(constants.tip)

    def step(self, state: tuple, action):
        if isinstance(self.c, PointMass1DConstants):
            return self._step_point_mass(state, action)
        return self._step_franka(state, action)

    def _step_point_mass(self, state, action):
        x, v, goal = state
        force = action[:, 0].clamp(-1.0, 1.0)
        vel = v + force / self.c.mass * self.c.dt  # semi-implicit Euler, as the kernel
        pos = x + vel * self.c.dt
        error = pos - goal
        return (pos, vel, goal), -error * error - self.c.action_cost * force * force

    def forward_kinematics(self, q):
        torch = self.torch
        rot = torch.eye(3, device=q.device).expand(q.shape[0], 3, 3)
        pos = torch.zeros(q.shape[0], 3, device=q.device)
        cos, sin = torch.cos(q), torch.sin(q)
        for k in range(q.shape[1]):
            c, s = cos[:, k, None, None], sin[:, k, None, None]
            pos = pos + rot @ self.translation[k]
            rot = rot @ (c * self.rot_a[k] + s * self.rot_b[k] + (1 - c) * self.rot_c[k])
        return pos + rot @ self.tip

    def _step_franka(self, state, action):
        q, goal = state
        velocity = action.clamp(-1.0, 1.0) * self.max_speed
        q_next = self.torch.clamp(q + velocity * self.c.dt, self.lower, self.upper)
        tcp = self.forward_kinematics(q_next)
        return (q_next, goal), -self.torch.linalg.vector_norm(goal - tcp, dim=-1)

    def rollout(self, state: tuple, actions):
        rewards = []
        for a in actions:
            state, r = self.step(state, a)
            rewards.append(r)
        return self.torch.stack(rewards), state


# --------------------------------------------------------------------------------------------- JAX
class JaxTwin:
    """JAX: a single-env step, ``vmap`` over envs, ``lax.scan`` over time, ``jit`` compiled;
    the gradient is ``jax.grad`` of the summed reward with respect to the actions."""

    def __init__(self, constants, device=None):
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp, self.c, self.device = jax, jnp, constants, device
        if isinstance(constants, FrankaReachConstants):
            f32 = lambda a: jnp.asarray(np.asarray(a, dtype=np.float32))  # noqa: E731
            self.k = {name: f32(getattr(constants, name))
                      for name in ("lower", "upper", "max_speed", "translation", "rot_a", "rot_b", "rot_c", "tip")}
            single = self._step_franka
        else:
            single = self._step_point_mass
        batched = jax.vmap(single)

        def rollout(state, actions):
            final, rewards = jax.lax.scan(batched, state, actions)
            return rewards, final

        def total(state, actions):
            return rollout(state, actions)[0].sum()

        self.rollout = jax.jit(rollout)
        self.forward = jax.jit(total)
        self.grad = jax.jit(jax.grad(total, argnums=1))

    def put(self, array):
        """A NumPy/torch CPU array as a float32 JAX array on this twin's device."""
        return self.jax.device_put(self.jnp.asarray(np.asarray(array, dtype=np.float32)), self.device)

    def _step_point_mass(self, state, action):
        jnp = self.jnp
        x, v, goal = state
        force = jnp.clip(action[0], -1.0, 1.0)
        vel = v + force / self.c.mass * self.c.dt
        pos = x + vel * self.c.dt
        error = pos - goal
        return (pos, vel, goal), -error * error - self.c.action_cost * force * force

    def forward_kinematics(self, q):
        jnp, k = self.jnp, self.k
        rot, pos = jnp.eye(3, dtype=jnp.float32), jnp.zeros(3, dtype=jnp.float32)
        cos, sin = jnp.cos(q), jnp.sin(q)
        for j in range(q.shape[0]):
            pos = pos + rot @ k["translation"][j]
            rot = rot @ (cos[j] * k["rot_a"][j] + sin[j] * k["rot_b"][j] + (1 - cos[j]) * k["rot_c"][j])
        return pos + rot @ k["tip"]

    def _step_franka(self, state, action):
        jnp, k = self.jnp, self.k
        q, goal = state
        velocity = jnp.clip(action, -1.0, 1.0) * k["max_speed"]
        q_next = jnp.clip(q + velocity * self.c.dt, k["lower"], k["upper"])
        tcp = self.forward_kinematics(q_next)
        return (q_next, goal), -jnp.linalg.norm(goal - tcp)


def start_state(state) -> tuple:
    """The twins' state tuple from a DiffGym state (the step counter is bookkeeping, not dynamics)."""
    if hasattr(state, "x"):
        return state.x, state.v, state.goal
    return state.q, state.goal


def constants_for(sim):
    name = type(sim).__name__
    if name == "PointMass1D":
        return PointMass1DConstants.from_sim(sim)
    if name == "FrankaReach":
        return FrankaReachConstants.from_sim(sim)
    raise ValueError(f"no twin of {name}: the twins cover PointMass1D and FrankaReach")
