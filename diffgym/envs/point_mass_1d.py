"""DiffGym/PointMass1D-v0: push a 1 kg point mass on a line to a goal and stop there.

The mass is a per-env, differentiable physical parameter (``physical_params``): the smallest example of
system identification and domain randomisation in DiffGym (docs/api.md)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import warp as wp

from diffgym.core.env import DiffGymEnv
from diffgym.core.render import Canvas
from diffgym.core.sim import DiffSim
from diffgym.core.state import SimState


@dataclasses.dataclass(eq=False, frozen=True)
class PointMass1DState(SimState):
    x: torch.Tensor
    """(B,) position [m]."""
    v: torch.Tensor
    """(B,) velocity [m/s]."""
    goal: torch.Tensor
    """(B,) goal position [m]."""
    step: torch.Tensor
    """(B,) int32 control steps taken this episode."""


@wp.struct
class PointMass1DParams:
    dt: float
    mass: float  # the default of the per-env `mass` array the step kernel reads
    action_cost: float
    reset_range: float
    success_distance: float
    success_speed: float


@wp.func
def _write_observation(i: int, x: float, v: float, goal: float, obs: wp.array2d(dtype=float)):
    obs[i, 0] = x
    obs[i, 1] = v
    obs[i, 2] = goal


@wp.func_replay(_write_observation)
def _write_observation_replay(i: int, x: float, v: float, goal: float, obs: wp.array2d(dtype=float)):
    pass  # the backward's replay must not store: it would rewrite obs (docs/adding_a_task.md)


@wp.kernel
def point_mass_1d_reset(
    seed: wp.array(dtype=wp.int32),
    episode: wp.array(dtype=wp.int32),
    p: PointMass1DParams,
    # outputs
    x: wp.array(dtype=float),
    v: wp.array(dtype=float),
    goal: wp.array(dtype=float),
    step: wp.array(dtype=wp.int32),
):
    i = wp.tid()
    rng = wp.rand_init(seed[i], episode[i])
    x[i] = wp.randf(rng, -p.reset_range, p.reset_range)
    v[i] = 0.0
    goal[i] = wp.randf(rng, -p.reset_range, p.reset_range)
    step[i] = 0


@wp.kernel
def point_mass_1d_observe(
    x: wp.array(dtype=float),
    v: wp.array(dtype=float),
    goal: wp.array(dtype=float),
    step: wp.array(dtype=wp.int32),
    p: PointMass1DParams,
    # outputs
    obs: wp.array2d(dtype=float),
):
    i = wp.tid()
    _write_observation(i, x[i], v[i], goal[i], obs)


@wp.kernel
def point_mass_1d_step(
    x: wp.array(dtype=float),
    v: wp.array(dtype=float),
    goal: wp.array(dtype=float),
    step: wp.array(dtype=wp.int32),
    action: wp.array2d(dtype=float),
    mass: wp.array(dtype=float),
    p: PointMass1DParams,
    # outputs
    x_next: wp.array(dtype=float),
    v_next: wp.array(dtype=float),
    goal_next: wp.array(dtype=float),
    step_next: wp.array(dtype=wp.int32),
    obs: wp.array2d(dtype=float),
    reward: wp.array(dtype=float),
    terminated: wp.array(dtype=wp.int32),
    success: wp.array(dtype=wp.int32),
):
    i = wp.tid()
    force = action[i, 0]
    # semi-implicit Euler: velocity first, then position with the new velocity
    vel = v[i] + force / mass[i] * p.dt
    pos = x[i] + vel * p.dt
    g = goal[i]
    x_next[i] = pos
    v_next[i] = vel
    goal_next[i] = g
    step_next[i] = step[i] + 1
    _write_observation(i, pos, vel, g, obs)
    error = pos - g
    reward[i] = -error * error - p.action_cost * force * force
    terminated[i] = 0
    success[i] = 0
    if wp.abs(error) < p.success_distance and wp.abs(vel) < p.success_speed:
        success[i] = 1


class PointMass1D(DiffSim):
    """Functional twin of :class:`PointMass1DEnv` (pure ``reset``/``step`` on batched states)."""

    state_type = PointMass1DState
    obs_dim = 3
    act_dim = 1
    dt = 0.05
    default_max_episode_steps = 100
    reset_kernel = point_mass_1d_reset
    observe_kernel = point_mass_1d_observe
    step_kernel = point_mass_1d_step
    physical_params = ("mass",)
    # Down to 1 g a full push changes the speed by at most 50 m/s per step, so an episode's states stay
    # far inside state_bounds and its rewards finite; above 1 t a push barely moves the mass at all.
    physics_bounds = {"mass": (1.0e-3, 1.0e3)}
    physics_units = {"mass": "kg"}
    # Far beyond any reachable state (1e9 m takes ~9e5 steps at full force) and small enough that the
    # squared error in the reward stays finite in float32.
    state_bounds = {"x": 1.0e9, "v": 1.0e9, "goal": 1.0e9}

    def __init__(self, device: str = "cpu", max_episode_steps: int | None = None,
                 action_cost: float = 0.01, success_distance: float = 0.05, success_speed: float = 0.1,
                 mass: float = 1.0):
        super().__init__(device, max_episode_steps)
        self.check_default_physics(mass=mass)
        self.params = PointMass1DParams()
        self.params.dt = self.dt
        self.params.mass = mass
        self.params.action_cost = action_cost
        self.params.reset_range = 1.0
        self.params.success_distance = success_distance
        self.params.success_speed = success_speed

    def render_state(self, state: PointMass1DState, index: int = 0) -> np.ndarray:
        x, goal = float(state.x[index]), float(state.goal[index])
        canvas = Canvas(400, 100, xlim=(-2.0, 2.0), ylim=(-0.5, 0.5))
        canvas.line((-2.0, 0.0), (2.0, 0.0), 0.01, (160, 160, 160))
        canvas.line((goal, -0.2), (goal, 0.2), 0.02, (40, 170, 60))
        canvas.circle((x, 0.0), 0.08, (40, 90, 220))
        return canvas.image


class PointMass1DEnv(DiffGymEnv):
    """
    ## Description
    A point mass (1 kg by default) slides without friction on a line. The agent pushes it with a bounded force and
    must bring it to rest at a randomly placed goal. The smallest DiffGym task: linear dynamics and a
    quadratic reward, so exact gradients through long horizons are well conditioned.

    ## Action Space
    `Box(-1, 1, (1,), float32)`: the force in N. Out-of-range actions are clipped to [-1, 1]; the
    clip's gradient is 1 inside the box and 0 outside.

    ## Observation Space
    `Box(-inf, inf, (3,), float32)`: `[x, v, g]`, position [m], velocity [m/s], goal position [m].

    ## Dynamics
    Semi-implicit Euler with dt = 0.05 s: `v' = v + a/m * dt`, `x' = x + v' * dt`, m = `mass` = 1 kg.

    ## Physical parameters
    `mass` (kg, in [0.001, 1000]) is per env and differentiable: `differentiable_step(state, action,
    physics={"mass": m})` with `m` a `(B,)` tensor (gradients flow into it), and
    `reset(options={"physics": {"mass": m}})` sets the value later steps use (domain randomisation).
    The constructor's `mass` is the default.

    ## Rewards
    `r = -(x' - g)^2 - action_cost * a^2` with `action_cost = 0.01` (a after clipping).

    ## Starting State
    `x ~ U(-1, 1)`, `v = 0`, `g ~ U(-1, 1)`, drawn from Warp's RNG stream `(seed, episode)`.

    ## Valid states
    `set_state` and `differentiable_step` accept finite states with `|x|, |v|, |g| <= 1e9` (beyond any
    reachable state, and small enough that the reward stays finite in float32) and raise `ValueError`
    naming the field otherwise.

    ## Episode End
    No termination. Truncation after 100 steps (5 s).

    ## Success
    `info["is_success"]`: `|x - g| < 0.05` m and `|v| < 0.1` m/s after the step.

    ## Arguments
    `gym.make("DiffGym/PointMass1D-v0", device="cpu", render_mode=None, action_cost=0.01,
    success_distance=0.05, success_speed=0.1, mass=1.0)`; `gym.make_vec(..., num_envs=N)` gives the native
    batched vector env.

    ## Version History
    * v0: initial version.
    """

    sim_class = PointMass1D
