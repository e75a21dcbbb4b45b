"""TPush's per-env, differentiable physical parameters: block mass (the inertia follows it), pusher-block and
table friction, contact stiffness (``TPush.physical_params``)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import diffgym  # noqa: F401
from diffgym.envs.pre_contact import surrogate_forward
from diffgym.envs.t_push import TPush
from tests.test_t_push import make_state

_COM_BELOW_BAR = 0.0179  # the T's centre of mass lies this far below the bar's bottom edge [m]
_STEPS = 12


def scenario_states():
    """Five envs, the T at angle 0 (bar up) unless said otherwise:
    0-2 in contact: the pusher pressed 2 mm into the T (0: under the bar's left wing, 1: on the stem's left
    side, 2: on top of the bar), commanded into it and along the face, so the T slides, turns and rubs;
    3: the T sliding and spinning freely mid-arena, the pusher idle in a far corner (no contact at all);
    4: the T sliding into the right wall, the pusher idle far away (wall contact only, frictionless)."""
    pusher_rim = 0.025 - 0.002
    state = make_state(
        pusher_pos=[[-0.07, -0.1 + _COM_BELOW_BAR - pusher_rim], [0.1 - 0.025 - pusher_rim, -0.16],
                    [0.03, -0.1 + 0.05 + _COM_BELOW_BAR + pusher_rim], [-0.4, -0.4], [-0.4, 0.4]],
        block_pos=[[0.0, -0.1], [0.1, -0.1], [0.0, -0.1], [-0.1, 0.1], [0.33, 0.0]],
        block_angle=[0.0, 0.0, 0.0, 0.5, 0.0],
        pusher_vel=[[0.1, 0.3], [0.3, 0.0], [0.0, -0.3], [0.0, 0.0], [0.0, 0.0]],
        block_vel=[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.8, -0.5], [0.8, 0.0]],
        block_angvel=[0.0, 0.0, 0.0, 2.0, 0.0])
    actions = torch.tensor([[0.4, 1.0], [1.0, -0.3], [-0.3, -1.0], [0.0, 0.0], [0.0, 0.0]])
    return state, actions.expand(_STEPS, 5, 2).contiguous()


def returns(sim: TPush, state, actions, physics) -> torch.Tensor:
    """Each env's summed reward over the chained steps."""
    return sim.rollout(state, actions, physics).reward.sum(0)


# Where each parameter's gradient must be nonzero, and where it is exactly zero for a physical reason.
# Out of contact the block's mass cancels (table friction decelerates it by mu g), up to round-off.
NONZERO = {"block_mass": [0, 1, 2, 4], "contact_friction": [0, 1, 2], "table_friction": [0, 1, 2, 3, 4],
           "contact_stiffness": [0, 1, 2, 4]}
ZERO = {"block_mass": [], "contact_friction": [3, 4], "table_friction": [], "contact_stiffness": [3]}


@pytest.mark.parametrize("name", TPush.physical_params)
def test_gradient_matches_central_differences_in_and_out_of_contact(name):
    sim = TPush()
    state, actions = scenario_states()
    physics = sim.default_physics(5)
    value = physics[name].clone().requires_grad_(True)
    returns(sim, state, actions, {**physics, name: value}).sum().backward()
    # d return / d log(value): a relative step of 1 % for every parameter; envs are independent, so one
    # central difference of the whole batch gives every env's derivative
    analytic = value.grad * value.detach()
    rel = 1e-2
    with torch.no_grad():
        numeric = (returns(sim, state, actions, {**physics, name: physics[name] * (1 + rel)})
                   - returns(sim, state, actions, {**physics, name: physics[name] * (1 - rel)})) / (2 * rel)
    # float32 round-off of the returns (~5e-7) makes the differences noisy at ~5e-5; the derivatives
    # checked as nonzero are 2e-4 (stiffness, env 1) and 4e-4 (pusher friction, env 0) to 0.5
    torch.testing.assert_close(analytic, numeric, rtol=2e-2, atol=1e-4)
    assert (analytic[NONZERO[name]].abs() > 1e-4).all(), analytic
    assert (analytic[ZERO[name]] == 0).all(), analytic
    if name == "block_mass":
        assert abs(float(analytic[3])) < 1e-6  # the free slide: the mass cancels but for round-off


def test_default_physics_is_bit_identical_to_no_physics():
    sim = TPush()
    state, actions = scenario_states()
    explicit = {"block_mass": torch.full((5,), 1.0), "contact_friction": torch.full((5,), 0.3),
                "table_friction": torch.full((5,), 0.3), "contact_stiffness": torch.full((5,), 5000.0)}
    results = []
    for physics in (None, {}, sim.default_physics(5), explicit):
        action = actions[0].clone().requires_grad_(True)
        start = state.replace(pusher_pos=state.pusher_pos.clone().requires_grad_(True))
        out = sim.step(start, action, physics)
        out.reward.sum().backward()
        results.append([*out.state.tensors(), out.obs, out.reward, action.grad, start.pusher_pos.grad])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_inertia_follows_the_mass():
    # Doubling every mass, stiffness and the servo gain doubles every force and leaves the motion unchanged
    # (friction forces scale with the normal force or the block's weight) -- only if the T's moment of
    # inertia doubles with its mass too; the contact envs turn the T
    state, actions = scenario_states()
    heavy = TPush(pusher_mass=0.4, servo_gain=80.0)
    doubled = {"block_mass": torch.full((5,), 2.0), "contact_stiffness": torch.full((5,), 10000.0)}
    base, scaled = TPush().rollout(state, actions).states, heavy.rollout(state, actions, doubled).states
    assert float(base.block_angle[-1, :3].sub(state.block_angle[:3]).abs().min()) > 0.2
    for a, b in zip(base.tensors(), scaled.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, value, message", [
    ("block_mass", 3.0, r"physics\['block_mass'\] must be finite and lie in \[0.5, 2\], got 3.0 in env 1"),
    ("contact_friction", -0.1, r"physics\['contact_friction'\] must be finite and lie in \[0, 1\], got -0.1"),
    ("table_friction", float("nan"), r"physics\['table_friction'\] must be finite and lie in \[0, 1\], got nan"),
    ("contact_stiffness", 1e5, r"physics\['contact_stiffness'\] must be finite and lie in \[2000, 10000\]"),
])
def test_out_of_range_physics_is_refused_with_one_line(name, value, message):
    sim = TPush()
    state, actions = scenario_states()
    physics = sim.default_physics(5)
    physics[name][1] = value
    with pytest.raises(ValueError, match=message) as error:
        sim.step(state, actions[0], physics)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=message.replace(r"in env 1", "")):
        sim.rollout(state, actions, physics)


@pytest.mark.parametrize("kwargs, message", [
    ({"block_mass": 0.1}, r"block_mass must lie in \[0.5, 2\] kg, got 0.1"),
    ({"contact_friction": 1.5}, r"contact_friction must lie in \[0, 1\] \(dimensionless\), got 1.5"),
    ({"table_friction": -0.3}, r"table_friction must lie in \[0, 1\] \(dimensionless\), got -0.3"),
    ({"contact_stiffness": 500.0}, r"contact_stiffness must lie in \[2000, 10000\] N/m, got 500.0"),
])
def test_constructor_values_outside_the_range_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TPush(**kwargs)


def test_vector_env_reset_option_sets_the_physics_of_later_steps():
    venv = gym.make_vec("DiffGym/TPush-v1", num_envs=3)
    venv.reset(seed=0, options={"physics": {"block_mass": [0.75, 1.0, 2.0], "contact_friction": 0.39}})
    physics = venv.get_physics()
    assert physics["block_mass"].tolist() == [0.75, 1.0, 2.0]
    assert torch.equal(physics["contact_friction"], torch.full((3,), 0.39))
    assert torch.equal(physics["table_friction"], torch.full((3,), 0.3))  # a name left out keeps its value
    state, actions = scenario_states()
    start = type(state)(*(t[:3] for t in state.tensors()))
    venv.set_state(start)
    action = actions[0, :3]
    venv.step(action.numpy())
    expected = venv.differentiable_step(start, action, physics=physics).state
    default = venv.differentiable_step(start, action).state
    assert torch.equal(venv.get_state().block_pos, expected.block_pos)
    # the envs whose physics changed moved differently from the defaults, the unchanged one did not
    moved = (venv.get_state().block_pos - default.block_pos).abs().amax(dim=1)
    assert bool((moved[[0, 2]] > 1e-5).all()) and float(moved[1]) > 0  # env 1: friction 0.39 still acts
    with pytest.raises(ValueError, match=r"physics\['block_mass'\] must be finite and lie in \[0.5, 2\], got 5.0"):
        venv.reset(options={"physics": {"block_mass": 5.0}})
    assert venv.get_physics()["block_mass"].tolist() == [0.75, 1.0, 2.0]  # a refused reset changes nothing


def test_pre_contact_kernels_take_the_per_env_physics():
    # contact_gradient_distance > 0: the forward pass is the exact one under the same physics, bit for bit,
    # and each parameter's gradient of one step is the surrogate step's (central differences of its own
    # forward pass; over several steps the surrogate's Jacobians chain along the exact trajectory instead)
    exact, pre_contact = TPush(), TPush(contact_gradient_distance=0.01)
    surrogate = surrogate_forward(pre_contact)
    state, actions = scenario_states()
    # env 5: the pusher resting 3 mm below the bar, inside the tail (D = 1 cm) but out of contact, so only
    # the surrogate's tail, whose peak scales with the stiffness, gives the parameters a gradient
    tail = make_state(pusher_pos=[[-0.05, -0.1 + _COM_BELOW_BAR - 0.025 - 0.003]], block_pos=[[0.0, -0.1]],
                      block_angle=[0.0])
    state = type(state)(*(torch.cat([a, b]) for a, b in zip(state.tensors(), tail.tensors())))
    actions = torch.cat([actions, torch.zeros(_STEPS, 1, 2)], dim=1)
    physics = {"block_mass": torch.full((6,), 0.75), "contact_friction": torch.full((6,), 0.39),
               "table_friction": torch.full((6,), 0.25), "contact_stiffness": torch.full((6,), 6000.0)}
    ours, theirs = pre_contact.rollout(state, actions, physics), exact.rollout(state, actions, physics)
    assert all(torch.equal(a, b) for a, b in zip(ours.states.tensors(), theirs.states.tensors()))
    assert torch.equal(ours.reward, theirs.reward)
    leaves = {name: value.clone().requires_grad_(True) for name, value in physics.items()}
    first = actions[:1]
    returns(pre_contact, state, first, leaves).sum().backward()
    rel = 1e-2
    for name, value in physics.items():
        with torch.no_grad():
            numeric = (returns(surrogate, state, first, {**physics, name: value * (1 + rel)})
                       - returns(surrogate, state, first, {**physics, name: value * (1 - rel)})) / (2 * rel)
        torch.testing.assert_close(leaves[name].grad * value, numeric, rtol=2e-2, atol=1e-5, msg=name)
    assert float((leaves["contact_stiffness"].grad * physics["contact_stiffness"])[5].abs()) > 1e-5  # 2.4e-5
