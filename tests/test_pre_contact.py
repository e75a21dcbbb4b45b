"""Pre-contact gradients (``contact_gradient_distance``, diffgym.envs.pre_contact) on TPush and PointNav2D:
the forward pass stays the exact one bit for bit, and the backward pass is the surrogate's (contact forces
extended to the distance), checked against central differences of the surrogate's own forward pass, one
step and chained, in and out of contact."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from diffgym.envs.point_nav_2d import BODY_RADIUS, OBSTACLES, PointNav2D
from diffgym.envs.pre_contact import surrogate_forward
from diffgym.envs.t_push import BAR_CENTER, BAR_SIZE, TPush
from diffgym.testing import check_entrywise, float_fields
from tests.conftest import requires_cuda
from tests.test_point_nav_2d import (contact_depths, contact_state, free_state, nav_state, random_actions,
                                     reference_step)
from tests.test_t_push import PUSHER_RADIUS, contact_states, interior_actions, make_state, t_signed_distance

TPUSH_DISTANCE, NAV_DISTANCE = 0.03, 0.1


def nav_near_state(batch: int, seed: int, gaps=(0.02, 0.08), speed: float = 0.3):
    """The body ``gap`` (uniform in ``gaps``) [m] off a random obstacle's surface, moving towards it."""
    g = torch.Generator().manual_seed(seed)
    obstacle = torch.tensor(OBSTACLES)[torch.randint(0, len(OBSTACLES), (batch,), generator=g)]
    angle = torch.rand(batch, generator=g) * 2 * math.pi
    outward = torch.stack([angle.cos(), angle.sin()], 1)
    gap = gaps[0] + (gaps[1] - gaps[0]) * torch.rand(batch, 1, generator=g)
    pos = obstacle[:, :2] + outward * (obstacle[:, 2:] + BODY_RADIUS + gap)
    return nav_state(pos, -speed * outward, torch.full((batch, 2), 1.3))


def tpush_far_state():
    """Pusher and block far apart (> 10 cm) and clear of the walls: beyond any contact's reach in a step."""
    return make_state([[0.3, 0.25], [-0.3, 0.3], [0.25, -0.3]], [[-0.1, -0.1], [0.1, -0.1], [-0.1, 0.15]],
                      [0.3, -1.2, 2.5], block_vel=[[0.05, 0.0], [0.0, -0.1], [0.1, 0.1]], block_angvel=[0.5, -1, 0])


# situation -> (task, start states, actions, eps, rtol, atol): the exact tasks' tolerances in and out of contact
SITUATIONS = {
    # slow enough to stay 5 mm or more off the T: the surrogate's smooth tail alone
    "tpush-near": (TPush, lambda: contact_states(4, 2, depth=-0.012, speed=0.05),
                   lambda: 0.2 * interior_actions(1, 4, 2), 1e-3, 2e-2, 5e-3),
    "tpush-contact": (TPush, lambda: contact_states(4, 1), lambda: interior_actions(1, 4, 1), 1e-4, 3e-2, 5e-2),
    "tpush-far": (TPush, tpush_far_state, lambda: interior_actions(1, 3, 3), 1e-3, 2e-2, 5e-3),
    "nav-near": (PointNav2D, lambda: nav_near_state(4, 0), lambda: random_actions(1, 4, 5), 3e-3, 1e-2, 2e-3),
    "nav-contact": (PointNav2D, lambda: contact_state(4, 1), lambda: random_actions(1, 4, 11), 3e-4, 2e-2, 3e-2),
    "nav-far": (PointNav2D, lambda: free_state(4, 0), lambda: random_actions(1, 4, 10), 1e-2, 1e-2, 2e-3),
}
DISTANCE = {TPush: TPUSH_DISTANCE, PointNav2D: NAV_DISTANCE}


def analytic(sim, state, actions, weights):
    """Gradients of ``sum_t weights_t . outputs_t`` (every float output of each step) with respect to the
    actions ``(T, B, act)`` and the start's float fields ``(B, n)``."""
    names = float_fields(state)
    actions = actions.clone().requires_grad_(True)
    leaves = [getattr(state, n).clone().requires_grad_(True) for n in names]
    s, total = state.replace(**dict(zip(names, leaves))), 0
    for action, w in zip(actions, weights):
        out = sim.step(s, action)
        total = total + (w * step_outputs(out)).sum()
        s = out.state
    grads = torch.autograd.grad(total, [actions, *leaves])
    return grads[0], flat_fields(grads[1:])


def flat_fields(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)


def step_outputs(out) -> torch.Tensor:
    """``(B, n_out)``: the next state's float fields (in the state's order), the observation, the reward."""
    state = out.state
    return torch.cat([flat_fields([getattr(state, n) for n in float_fields(state)]), out.obs, out.reward[:, None]], 1)


def with_inputs(state, flat: torch.Tensor, act_dim: int):
    """The (state, action) whose action and float fields are the columns of ``flat`` ``(B, act + n)``."""
    columns, fields, start = flat[:, act_dim:], {}, 0
    for name in float_fields(state):
        like = getattr(state, name)
        size = like[0].numel()
        fields[name] = columns[:, start:start + size].reshape(like.shape).contiguous()
        start += size
    return state.replace(**fields), flat[:, :act_dim].contiguous()


def surrogate_jacobian(surrogate, state, action, eps: float) -> torch.Tensor:
    """``(B, n_out, act + n)`` float64: central differences of the surrogate's forward step, per env (envs are
    independent, so one perturbed column for every env at once)."""
    flat = torch.cat([action, flat_fields([getattr(state, n) for n in float_fields(state)])], 1)
    columns = []
    with torch.no_grad():
        for j in range(flat.shape[1]):
            plus, minus = flat.clone(), flat.clone()
            plus[:, j] += eps
            minus[:, j] -= eps
            f_plus = step_outputs(surrogate.step(*with_inputs(state, plus, action.shape[1]))).double()
            f_minus = step_outputs(surrogate.step(*with_inputs(state, minus, action.shape[1]))).double()
            columns.append((f_plus - f_minus) / (2 * eps))
    return torch.stack(columns, dim=2)


def output_weights(sim, state, steps: int, seed: int) -> torch.Tensor:
    with torch.no_grad():
        width = step_outputs(sim.step(state, torch.zeros(state.batch_size, sim.act_dim, device=state.device))).shape[1]
    return torch.randn(steps, state.batch_size, width, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- forward pass
def deepest_contact(sim_class, states) -> float:
    """The deepest penetration [m] (pusher into the T; body into an obstacle or wall) over ``states``."""
    if sim_class is TPush:
        return max(PUSHER_RADIUS - t_signed_distance(s.pusher_pos[i].cpu().numpy(), s.block_pos[i].cpu().numpy(),
                                                     float(s.block_angle[i]))
                   for s in states for i in range(s.batch_size))
    return max(float(contact_depths(s.pos.cpu().double())[0].max()) for s in states)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])])
@pytest.mark.parametrize("sim_class, make_start", [
    (TPush, lambda: contact_states(8, 3, depth=-0.01, speed=0.3)),
    (PointNav2D, lambda: nav_near_state(8, 3, gaps=(0.0, 0.1), speed=1.5)),
])
def test_forward_pass_is_bit_identical_whatever_the_distance(sim_class, make_start, device):
    """States, observations, rewards and flags of a 30-step rollout into contact are the exact ones, bit
    for bit, at any distance (including one shorter than the contact smoothing); only the gradient changes."""
    start, actions = make_start().to(device), interior_actions(30, 8, 4).to(device)
    runs = {}
    for distance in (0.0, 0.004, DISTANCE[sim_class], 0.5):
        sim, states, outputs = sim_class(device=device, contact_gradient_distance=distance), [start], []
        assert (sim.step_kernel is sim_class.step_kernel) == (distance == 0)
        for action in actions:
            out = sim.step(states[-1], action)
            outputs += [*out.state.tensors(), out.obs, out.reward, out.success, out.truncated]
            states.append(out.state)
        runs[distance] = outputs
    for distance, outputs in runs.items():
        assert all(torch.equal(a, b) for a, b in zip(outputs, runs[0.0])), distance
    assert deepest_contact(sim_class, states) > 0.001  # the rollout does press into contact
    weights = output_weights(sim_class(device=device), start, 3, 0).to(device)
    exact, pre_contact = (analytic(sim_class(device=device, contact_gradient_distance=d), start, actions[:3], weights)
                          for d in (0.0, DISTANCE[sim_class]))
    assert float((exact[0] - pre_contact[0]).abs().max()) > 1e-3


def test_gym_envs_pass_the_option_and_step_exactly():
    """``gym.make`` / ``gym.make_vec`` take the option as a task argument; the single env's recorded
    fast path and the vector env step the exact dynamics with it."""
    plain, option = gym.make("DiffGym/TPush-v1"), gym.make("DiffGym/TPush-v1", contact_gradient_distance=0.05)
    vec = gym.make_vec("DiffGym/PointNav2D-v0", num_envs=3, contact_gradient_distance=0.1)
    vec_plain = gym.make_vec("DiffGym/PointNav2D-v0", num_envs=3)
    try:
        assert option.unwrapped.sim.contact_gradient_distance == 0.05 and vec.sim.contact_gradient_distance == 0.1
        trajectories = []
        for env in (plain, option):
            obs, _ = env.reset(seed=5)
            frames = [obs]
            for t in range(25):
                obs, reward, *_ = env.step(np.array([math.cos(0.3 * t), math.sin(0.2 * t)], np.float32))
                frames += [obs, np.float32(reward)]
            trajectories.append(frames)
        assert all(np.array_equal(a, b) for a, b in zip(*trajectories))
        obs_vec, _ = vec.reset(seed=2)
        obs_plain, _ = vec_plain.reset(seed=2)
        for _ in range(10):
            action = np.tile(np.float32([1.0, 0.8]), (3, 1))
            (obs_vec, r_vec, *_), (obs_plain, r_plain, *_) = vec.step(action), vec_plain.step(action)
            assert np.array_equal(obs_vec, obs_plain) and np.array_equal(r_vec, r_plain)
    finally:
        for env in (plain, option, vec, vec_plain):
            env.close()


@pytest.mark.parametrize("sim_class, make_start", [
    (TPush, lambda: contact_states(3, 5, depth=-0.01, speed=0.2)), (PointNav2D, lambda: nav_near_state(3, 5))])
def test_fused_rollout_is_the_stepped_loop_with_the_option(sim_class, make_start):
    """``sim.rollout`` replays the instance's step kernel: the surrogate's gradients, as the stepped loop."""
    sim, start = sim_class(contact_gradient_distance=DISTANCE[sim_class]), make_start()
    actions = interior_actions(6, 3, 9).requires_grad_(True)
    rollout = sim.rollout(start, actions)
    fused = torch.autograd.grad(rollout.reward.sum() + rollout.obs.sum(), actions)[0]
    state, total = start, 0
    for action in actions:
        out = sim.step(state, action)
        total, state = total + out.reward.sum() + out.obs.sum(), out.state
    stepped = torch.autograd.grad(total, actions)[0]
    assert torch.equal(fused, stepped)
    exact = sim_class().rollout(start, actions)
    assert not torch.equal(fused, torch.autograd.grad(exact.reward.sum() + exact.obs.sum(), actions)[0])


@pytest.mark.parametrize("sim_class", [TPush, PointNav2D])
def test_a_bad_distance_is_one_clear_error(sim_class):
    for bad in (-0.01, math.nan, math.inf, True, "0.1"):
        with pytest.raises(ValueError, match=r"^contact_gradient_distance must be a finite distance >= 0 in m "
                                             r"\(0: exact gradients\), got "):
            sim_class(contact_gradient_distance=bad)
    with pytest.raises(ValueError, match="needs a sim built with contact_gradient_distance > 0"):
        surrogate_forward(sim_class())


# ----------------------------------------------------------------------------------------- backward pass
@pytest.mark.parametrize("situation", list(SITUATIONS))
def test_one_step_backward_is_the_surrogates_and_matches_its_finite_differences(situation):
    """One step's backward pass equals the surrogate step's (Warp's ordinary adjoint of the surrogate
    kernel, bit for bit), which matches central differences of the surrogate's forward pass entry by entry.
    Near a contact it differs from the exact gradient; beyond the distance it is the exact gradient."""
    sim_class, make_state_, make_actions, eps, rtol, atol = SITUATIONS[situation]
    sim = sim_class(contact_gradient_distance=DISTANCE[sim_class])
    state, actions = make_state_(), make_actions()
    weights = output_weights(sim, state, 1, seed=1)
    ours, surrogate = analytic(sim, state, actions, weights), analytic(surrogate_forward(sim), state, actions, weights)
    assert all(torch.equal(a, b) for a, b in zip(ours, surrogate))
    check = check_entrywise(surrogate_forward(sim), state, actions, eps=eps)
    check.assert_close(rtol=rtol, atol=atol, what=f"surrogate step, {situation}")
    exact = analytic(sim_class(), state, actions, weights)
    if situation.endswith("far"):  # the same derivatives, up to float32 round-off in another kernel
        for a, b in zip(ours, exact):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    elif situation.endswith("near"):
        difference = max(float((a - b).abs().max()) for a, b in zip(ours, exact))
        assert difference > 0.01 * max(float(g.abs().max()) for g in exact)


@pytest.mark.parametrize("make_state", [lambda: nav_near_state(8, 6, gaps=(0.0, 0.12)), lambda: contact_state(8, 2)])
def test_nav_surrogate_is_the_documented_force_law(make_state):
    """PointNav2D's surrogate, written independently in float64 from docs/tasks.md (``reference_step``):
    the surrogate kernel's forward pass is its values, and the straight-through backward pass its autograd."""
    sim, state = PointNav2D(contact_gradient_distance=NAV_DISTANCE), make_state()
    action = random_actions(1, 8, 3)[0]
    out = surrogate_forward(sim).step(state, action)
    pos, vel, reward = reference_step(state.pos.double(), state.vel.double(), state.goal.double(), action.double(),
                                      contact_gradient_distance=NAV_DISTANCE)
    torch.testing.assert_close(out.state.pos.double(), pos, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.state.vel.double(), vel, rtol=0, atol=2e-4)
    torch.testing.assert_close(out.reward.double(), reward, rtol=0, atol=1e-4)
    weights = torch.randn(3, 8, 2, generator=torch.Generator().manual_seed(4))

    def gradients(step, dtype):
        leaves = [t.to(dtype).clone().requires_grad_(True) for t in (state.pos, state.vel, action)]
        pos, vel, reward = step(*leaves[:2], state.goal.to(dtype), leaves[2])
        total = reward.sum() + (weights[0].to(dtype) * pos).sum() + (weights[1].to(dtype) * vel).sum()
        return torch.autograd.grad(total, leaves)

    def warp_step(pos, vel, goal, a):
        out = sim.step(state.replace(pos=pos, vel=vel, goal=goal), a)
        return out.state.pos, out.state.vel, out.reward

    documented = gradients(lambda *x: reference_step(*x, contact_gradient_distance=NAV_DISTANCE), torch.float64)
    for ours, reference in zip(gradients(warp_step, torch.float32), documented):
        torch.testing.assert_close(ours.double(), reference, rtol=1e-3, atol=1e-4 * float(reference.abs().max()))


def surrogate_autograd_jacobian(surrogate, state, action) -> torch.Tensor:
    """``(B, n_out, act + n)`` float64: the surrogate step's Jacobian by its own (Warp) adjoint."""
    flat = torch.cat([action, flat_fields([getattr(state, n) for n in float_fields(state)])], 1)
    jacobian = torch.autograd.functional.jacobian(
        lambda x: step_outputs(surrogate.step(*with_inputs(state, x, action.shape[1]))), flat)
    return torch.stack([jacobian[b, :, b, :] for b in range(flat.shape[0])]).double()


def chain(jacobians, weights, n_state: int, act_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse accumulation of ``sum_t weights_t . outputs_t`` through per-step Jacobians: the gradients
    with respect to the actions ``(T, B, act)`` and the start state ``(B, n_state)``."""
    adjoint, per_action = torch.zeros(weights.shape[1], n_state, dtype=torch.float64), []
    for jacobian, w in zip(reversed(jacobians), reversed(weights)):
        adj_out = w.double()
        adj_out[:, :n_state] += adjoint  # the next state's adjoint from the steps after this one
        adj_in = torch.einsum("bo,boi->bi", adj_out, jacobian)
        per_action.append(adj_in[:, :act_dim])
        adjoint = adj_in[:, act_dim:]
    return torch.stack(per_action[::-1]), adjoint


@pytest.mark.parametrize("sim_class, make_start, steps, eps, tolerance", [
    # the pusher 12 mm off the T, driven at it: out of contact, within the distance, then pushing
    (TPush, lambda: contact_states(2, 7, depth=-0.012, speed=0.1), 8, 1e-4, 0.1),
    # the body 5-9 cm off an obstacle, driven into it and sliding along
    (PointNav2D, lambda: nav_near_state(2, 4, gaps=(0.05, 0.09), speed=0.5), 12, 1e-3, 0.02),
])
def test_chained_backward_chains_the_surrogate_steps_jacobians(sim_class, make_start, steps, eps, tolerance):
    """Over a rollout the backward pass chains each step's surrogate Jacobian, taken at the exact state the
    forward pass reached: autograd through the chain equals the chain of the surrogate step's own
    Jacobians to float32 round-off, and the chain of its central-difference Jacobians to ``tolerance`` in
    norm (stiff contact makes single entries of the latter err by a few %, and the chain adds them up)."""
    sim = sim_class(contact_gradient_distance=DISTANCE[sim_class])
    surrogate, start = surrogate_forward(sim), make_start()
    toward = start.block_pos - start.pusher_pos if sim_class is TPush else -start.vel
    toward = 0.6 * toward / toward.norm(dim=1, keepdim=True)
    actions = (toward[None] + 0.2 * interior_actions(steps, 2, 8)).clamp(-0.9, 0.9)
    weights = output_weights(sim, start, steps, seed=2)
    ours = analytic(sim, start, actions, weights)
    states = [start]
    with torch.no_grad():
        for action in actions[:-1]:
            states.append(sim.step(states[-1], action).state)
    sizes = ours[1].shape[1], actions.shape[2]
    exact_chain = chain([surrogate_autograd_jacobian(surrogate, s, a) for s, a in zip(states, actions)], weights,
                        *sizes)
    numeric_chain = chain([surrogate_jacobian(surrogate, s, a, eps) for s, a in zip(states, actions)], weights,
                          *sizes)
    for mine, exact, numeric, what in zip(ours, exact_chain, numeric_chain, ("actions", "start state")):
        mine = mine.double()
        torch.testing.assert_close(mine, exact, rtol=1e-4, atol=1e-5 * float(exact.abs().max()))
        error = float((numeric - mine).norm() / mine.norm())
        assert error < tolerance, f"{what}: the chained central differences differ by {error:.3g} in norm"
    contact = analytic(sim_class(), start, actions, weights)
    assert float((contact[0] - ours[0]).abs().max()) > 1e-3  # the tail is in the chain's gradient


def test_tpush_pre_contact_gradient_says_pushing_moves_the_block():
    """Without the approach shaping, the exact gradient of everything about the block is zero until the
    pusher touches it; with the option, a pusher at rest 1 cm from the bar's top face learns that driving
    at the face (and starting closer to it) pushes the block along the face's normal."""
    # theta = -pi/2 turns the bar's top face (body +y) to world +x; the pusher's rim 1 cm beyond it
    face_x = BAR_CENTER[1] + BAR_SIZE[1] / 2
    state = make_state([[face_x + 0.025 + 0.01, 0.0]], [[0.0, 0.0]], [-math.pi / 2])
    for distance in (0.0, TPUSH_DISTANCE):
        sim = TPush(contact_gradient_distance=distance, shaping_weight=0.0)
        action = torch.zeros(1, 2, requires_grad=True)
        pusher = state.pusher_pos.clone().requires_grad_(True)
        out = sim.step(state.replace(pusher_pos=pusher), action)
        assert torch.equal(out.state.block_pos, state.block_pos)  # the block stays put: no contact
        d_action, d_pusher = torch.autograd.grad(out.state.block_pos[0, 0] + out.reward.sum(), [action, pusher])
        if distance == 0.0:
            assert float(d_action.abs().max()) == 0.0 and float(d_pusher.abs().max()) == 0.0
        else:  # moving the pusher or its command towards -x (at the face) would push the block to -x
            assert float(d_action[0, 0]) > 0 and float(d_pusher[0, 0]) > 0
