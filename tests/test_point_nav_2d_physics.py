"""PointNav2D's per-env, differentiable physical parameters (the point's ``mass`` and its velocity
``drag``): gradients of chained-step returns against central differences in and out of contact, for the
exact kernel and the pre-contact surrogate; default physics bit-identical to none; bad values refused;
``reset(options={"physics": ...})`` taking effect."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from diffgym.envs.point_nav_2d import (ARENA_HALF_WIDTH, BODY_RADIUS, OBSTACLES, SUBSTEPS, PointNav2D,
                                       PointNav2DState)
from diffgym.envs.pre_contact import surrogate_forward
from tests.test_point_nav_2d import contact_depths, free_state, nav_state, random_actions

# per-env values spread over the valid ranges (mass [0.5, 2] kg, drag [0, 2] N s/m), defaults included, at
# least the finite-difference step (1e-2) inside them
MASSES = torch.tensor([0.6, 1.0, 1.3, 0.8, 1.8, 1.0, 0.55, 1.95])
DRAGS = torch.tensor([0.25, 0.1, 0.9, 0.25, 1.5, 0.02, 0.6, 1.95])


def surface_state(batch: int, seed: int, depth: float, normal_speed: float, tangent_speed: float):
    """Bodies ``depth`` [m] into (negative: off) an obstacle's surface (even envs, obstacles in turn) or a side
    wall (odd envs), moving into it at ``normal_speed`` and along it at ``tangent_speed``; with each env's
    inward normal and tangent."""
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(batch, generator=g) * 2 * math.pi
    outward = torch.stack([angle.cos(), angle.sin()], 1)
    obstacle = torch.tensor(OBSTACLES)[torch.arange(batch) % len(OBSTACLES)]
    pos = obstacle[:, :2] + outward * (obstacle[:, 2:] + BODY_RADIUS - depth)
    side = torch.where(torch.arange(batch) % 4 == 1, 1.0, -1.0)  # right and left walls
    wall_pos = torch.stack([side * (ARENA_HALF_WIDTH - BODY_RADIUS + depth), -1.0 + torch.rand(batch, generator=g)], 1)
    wall_outward = torch.stack([-side, torch.zeros(batch)], 1)
    odd = (torch.arange(batch) % 2 == 1)[:, None]
    inward = -torch.where(odd, wall_outward, outward)
    tangent = torch.stack([-inward[:, 1], inward[:, 0]], 1)
    pos = torch.where(odd, wall_pos, pos)
    return nav_state(pos, normal_speed * inward + tangent_speed * tangent), inward, tangent


def pressed_in_contact(steps: int):
    """Bodies 3 mm into an obstacle or a wall, pushed into it and slid along it: every env stays in contact
    for all ``steps`` (checked by the test), so mass and drag act through the contact's dynamics."""
    state, inward, tangent = surface_state(8, 0, depth=0.003, normal_speed=0.0, tangent_speed=0.2)
    jitter = torch.rand(steps, 8, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return state, 0.9 * inward + 0.25 * tangent + 0.05 * jitter


def open_space(steps: int):
    """Bodies in the two open patches of the arena (0.65 m or more from every surface), moving and pushed
    slowly enough that none touches anything for ``steps`` (checked by the test)."""
    g = torch.Generator().manual_seed(3)
    centres = torch.tensor([[1.3, -0.2], [-1.2, 1.3]]).repeat(4, 1)
    pos = centres + 0.15 * (torch.rand(8, 2, generator=g) * 2 - 1)
    return nav_state(pos, 0.3 * torch.randn(8, 2, generator=g)), 0.6 * random_actions(steps, 8, seed=4)


def chained_return(sim, state: PointNav2DState, actions: torch.Tensor, physics: dict[str, torch.Tensor]):
    """Each env's summed reward over the chained steps, and its deepest penetration at each step ``(T, B)``."""
    total, depths = torch.zeros(state.batch_size), []
    for action in actions:
        out = sim.step(state, action, physics=physics)
        state, total = out.state, total + out.reward
        depths.append(contact_depths(state.pos.detach().double())[0].max(1).values)
    return total, torch.stack(depths)


def gradient_and_central_difference(sim, state, actions, name: str, eps: float):
    """d(return)/d(name) per env, by the kernel's adjoint and by a central difference. Envs are independent,
    so one difference of every env's value at once gives each env's derivative."""
    physics = {"mass": MASSES.clone().requires_grad_(True), "drag": DRAGS.clone().requires_grad_(True)}
    total, depths = chained_return(sim, state, actions, physics)
    total.sum().backward()
    with torch.no_grad():
        shifted = [{**physics, name: physics[name] + sign * eps} for sign in (1, -1)]
        up, down = (chained_return(sim, state, actions, p)[0] for p in shifted)
    return physics[name].grad, (up - down) / (2 * eps), depths


@pytest.mark.parametrize("name", ["mass", "drag"])
@pytest.mark.parametrize("situation", ["contact", "free"])
def test_gradient_of_a_chained_return_matches_central_differences(name, situation):
    steps = 12
    state, actions = (pressed_in_contact if situation == "contact" else open_space)(steps)
    gradient, numeric, depths = gradient_and_central_difference(PointNav2D(), state, actions, name, eps=1e-2)
    if situation == "contact":
        assert bool((depths > 0).all()), "every env stays in contact at every step"
    else:
        assert bool((depths < 0).all()), "no env touches anything"
    # The derivatives range over 4e-3 to 0.5 here and the float32 differences agree to ~3e-4: a zero or a
    # partial gradient (a kernel reading the shared default, or a term the adjoint missed) fails.
    assert float(gradient.abs().max()) > 0.05
    torch.testing.assert_close(gradient, numeric, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("name", ["mass", "drag"])
def test_pre_contact_gradient_is_the_surrogates_and_matches_its_central_differences(name):
    """Near an obstacle or wall (3 cm off, within the 0.1 m distance, moving in) the straight-through
    kernel's gradient for mass and drag is the surrogate's over one step, bit for bit, and the surrogate's
    over 8 chained steps matches central differences of its forward pass; its forward is the exact one."""
    sim = PointNav2D(contact_gradient_distance=0.1)
    surrogate = surrogate_forward(sim)
    state, inward, _ = surface_state(8, 5, depth=-0.03, normal_speed=0.2, tangent_speed=0.1)
    actions = 0.5 * inward + 0.1 * (torch.rand(8, 8, 2, generator=torch.Generator().manual_seed(6)) * 2 - 1)
    physics = {"mass": MASSES, "drag": DRAGS}
    exact = PointNav2D().step(state, actions[0], physics=physics)
    through = sim.step(state, actions[0], physics=physics)
    assert all(torch.equal(a, b) for a, b in zip(exact.state.tensors(), through.state.tensors()))
    assert torch.equal(exact.reward, through.reward) and torch.equal(exact.obs, through.obs)
    one_step = [gradient_and_central_difference(s, state, actions[:1], name, eps=1e-2)[0]
                for s in (sim, surrogate, PointNav2D())]
    assert torch.equal(one_step[0], one_step[1])
    # the surrogate's tail already acts: the exact gradient differs by a good part of its size
    assert float((one_step[0] - one_step[2]).abs().max()) > 0.1 * float(one_step[2].abs().max())
    gradient, numeric, depths = gradient_and_central_difference(surrogate, state, actions, name, eps=1e-2)
    assert bool((depths < 0).all()), "no env touches anything: only the surrogate's tail acts"
    assert float(gradient.abs().max()) > 0.05
    torch.testing.assert_close(gradient, numeric, rtol=2e-2, atol=1e-3)


def test_default_physics_is_bit_identical_to_none_and_per_env_values_follow_the_free_flight_law():
    sim = PointNav2D()
    state, actions = open_space(4)
    defaults = {"mass": torch.ones(8), "drag": torch.full((8,), 0.25)}
    assert all(torch.equal(sim.default_physics(8)[k], v) for k, v in defaults.items())
    for action in actions:
        reference = sim.step(state, action)
        for physics in (defaults, {"mass": torch.ones(8)}, {"drag": torch.full((8,), 0.25)}):
            other = sim.step(state, action, physics=physics)
            assert all(torch.equal(a, b) for a, b in zip(reference.state.tensors(), other.state.tensors()))
            assert torch.equal(reference.obs, other.obs) and torch.equal(reference.reward, other.reward)
        state = reference.state
    # per-env values: SUBSTEPS semi-implicit Euler substeps of v' = v + (a - drag v) h / m (no contact here)
    state, (action, *_) = open_space(1)
    out = sim.step(state, action, physics={"mass": MASSES, "drag": DRAGS})
    h, vel, pos = 0.05 / SUBSTEPS, state.vel.double(), state.pos.double()
    for _ in range(SUBSTEPS):
        vel = vel + (action.double() - DRAGS.double()[:, None] * vel) * (h / MASSES.double()[:, None])
        pos = pos + vel * h
    torch.testing.assert_close(out.state.vel.double(), vel, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.state.pos.double(), pos, rtol=1e-6, atol=1e-6)
    # the constructor's mass and drag are the defaults, and the fused rollout takes per-env values too
    heavy = PointNav2D(mass=1.8, drag=1.5).step(state, action)
    explicit = sim.step(state, action, physics={"mass": torch.full((8,), 1.8), "drag": torch.full((8,), 1.5)})
    assert torch.equal(heavy.state.vel, explicit.state.vel)
    actions = random_actions(3, 8, seed=5)
    rollout = sim.rollout(state, actions, physics={"mass": MASSES, "drag": DRAGS})
    for t, action in enumerate(actions):
        out = sim.step(state, action, physics={"mass": MASSES, "drag": DRAGS})
        assert torch.equal(rollout.states.pos[t], out.state.pos) and torch.equal(rollout.reward[t], out.reward)
        state = out.state


MASS_RANGE_ERROR = r"physics\['mass'\] must be finite and lie in \[0.5, 2\], "
DRAG_RANGE_ERROR = r"physics\['drag'\] must be finite and lie in \[0, 2\], "


@pytest.mark.parametrize("physics, message", [
    ({"mass": torch.tensor([1.0, 0.4])}, MASS_RANGE_ERROR + r"got 0.4\d* in env 1"),
    ({"mass": torch.tensor([2.5, 1.0])}, MASS_RANGE_ERROR + r"got 2.5 in env 0"),
    ({"drag": torch.tensor([0.25, -0.1])}, DRAG_RANGE_ERROR + r"got -0.1\d* in env 1"),
    ({"drag": torch.tensor([float("inf"), 0.25])}, DRAG_RANGE_ERROR + r"got inf in env 0"),
])
def test_out_of_range_physics_is_refused_with_one_line(physics, message):
    sim = PointNav2D()
    with pytest.raises(ValueError, match=message) as error:
        sim.step(free_state(2, seed=0), torch.zeros(2, 2), physics=physics)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("arguments, message", [
    ({"mass": 0.3}, r"^mass must lie in \[0.5, 2\] kg, got 0.3$"),
    ({"mass": float("nan")}, r"^mass must lie in \[0.5, 2\] kg, got nan$"),
    ({"drag": 3.0}, r"^drag must lie in \[0, 2\] N s/m, got 3.0$"),
])
def test_out_of_range_defaults_are_refused_with_one_line(arguments, message):
    with pytest.raises(ValueError, match=message):
        PointNav2D(**arguments)
    with pytest.raises(ValueError, match=message):
        gym.make("DiffGym/PointNav2D-v0", **arguments)


def test_vector_env_reset_option_sets_the_physics_of_later_steps():
    venv = gym.make_vec("DiffGym/PointNav2D-v0", num_envs=4)
    masses, drags = np.array([0.5, 1.0, 1.5, 2.0], np.float32), np.array([0.0, 0.25, 1.0, 2.0], np.float32)
    venv.reset(seed=0, options={"physics": {"mass": masses, "drag": drags}})
    assert np.array_equal(venv.get_physics()["mass"].numpy(), masses)
    assert np.array_equal(venv.get_physics()["drag"].numpy(), drags)
    action = np.full((4, 2), 0.7, np.float32)
    start = venv.get_state()
    venv.step(action)
    given = {"mass": torch.from_numpy(masses), "drag": torch.from_numpy(drags)}
    expected = venv.differentiable_step(start, torch.from_numpy(action), physics=given)
    assert torch.equal(venv.get_state().vel, expected.state.vel)
    default = venv.differentiable_step(start, torch.from_numpy(action))
    differs = (venv.get_state().vel != default.state.vel).any(1)
    assert differs.tolist() == [True, False, True, True]  # env 1 has the default mass and drag
    # under a reset_mask only the reset envs take the new value; the other parameter keeps its values
    venv.reset(options={"reset_mask": np.array([True, False, False, True]), "physics": {"drag": 0.5}})
    assert venv.get_physics()["drag"].tolist() == [0.5, 0.25, 1.0, 0.5]
    assert np.array_equal(venv.get_physics()["mass"].numpy(), masses)
    with pytest.raises(ValueError, match=MASS_RANGE_ERROR + r"got 3.0 in env 0"):
        venv.reset(options={"physics": {"mass": 3.0}})
    assert np.array_equal(venv.get_physics()["mass"].numpy(), masses)  # a rejected reset changes nothing
    venv.close()
