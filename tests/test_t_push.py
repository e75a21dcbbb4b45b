"""TPush: geometry, contact physics sanity, reset, reward, and gradients against finite differences,
including states in contact. The generic contract (check_env, determinism, vector env, bad inputs,
rendering) comes from tests/test_contract.py."""

import dataclasses
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from diffgym.envs.t_push import (BAR_CENTER, BAR_SIZE, GOAL_ANGLE, STEM_CENTER, STEM_SIZE, T_OUTLINE, TPush,
                                 TPushState, t_inertia_per_mass, t_mean_radius)
from diffgym.testing import check_directional, check_entrywise

PUSHER_RADIUS, ARENA_HALF = 0.025, 0.5
BOXES = ((BAR_CENTER, np.array(BAR_SIZE) / 2), (STEM_CENTER, np.array(STEM_SIZE) / 2))


# ----------------------------------------------------------------------------- reference geometry (NumPy)
def rotation(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


def t_signed_distance(point: np.ndarray, block_pos: np.ndarray, theta: float) -> float:
    """Exact signed distance from a world point to the T (union of its two sharp boxes)."""
    q = rotation(theta).T @ (np.asarray(point, float) - np.asarray(block_pos, float))
    best = np.inf
    for centre, half in BOXES:
        e = np.abs(q - centre) - half
        best = min(best, float(np.linalg.norm(np.maximum(e, 0.0)) + min(max(e[0], e[1]), 0.0)))
    return best


def keypoint_distance(block_pos: np.ndarray, theta: float) -> float:
    now = T_OUTLINE @ rotation(theta).T + block_pos
    goal = T_OUTLINE @ rotation(GOAL_ANGLE).T
    return float(np.linalg.norm(now - goal, axis=1).mean())


def make_state(pusher_pos, block_pos, block_angle, pusher_vel=None, block_vel=None, block_angvel=None):
    pusher_pos = torch.as_tensor(np.asarray(pusher_pos, np.float32)).reshape(-1, 2)
    batch = pusher_pos.shape[0]

    def field(value, shape):
        if value is None:
            return torch.zeros(batch, *shape)
        return torch.as_tensor(np.asarray(value, np.float32)).reshape(batch, *shape).clone()

    return TPushState(pusher_pos.clone(), field(pusher_vel, (2,)), field(block_pos, (2,)), field(block_angle, ()),
                      field(block_vel, (2,)), field(block_angvel, ()), torch.zeros(batch, dtype=torch.int32))


def contact_states(batch: int, seed: int, depth: float = 0.002, speed: float = 0.3) -> TPushState:
    """Reset poses with the pusher pressed ``depth`` into the T from a random direction, and random
    pusher and block velocities."""
    sim = TPush()
    base = sim.reset(torch.arange(seed * 1000, seed * 1000 + batch, dtype=torch.int32),
                     torch.zeros(batch, dtype=torch.int32))
    rng = np.random.default_rng(seed)
    pushers = []
    for i in range(batch):
        centre, theta = base.block_pos[i].numpy().astype(float), float(base.block_angle[i])
        direction = rotation(rng.uniform(0, 2 * math.pi)) @ np.array([1.0, 0.0])
        lo, hi = 0.0, 0.4  # bisection on the ray for rim penetration == depth
        for _ in range(40):
            mid = (lo + hi) / 2
            if t_signed_distance(centre + mid * direction, centre, theta) - PUSHER_RADIUS < -depth:
                lo = mid
            else:
                hi = mid
        pushers.append(centre + hi * direction)
    return base.replace(pusher_pos=torch.tensor(np.array(pushers), dtype=torch.float32),
                        pusher_vel=torch.tensor(rng.uniform(-speed, speed, (batch, 2)), dtype=torch.float32),
                        block_vel=torch.tensor(rng.uniform(-speed, speed, (batch, 2)), dtype=torch.float32),
                        block_angvel=torch.tensor(rng.uniform(-1, 1, batch), dtype=torch.float32))


def interior_actions(steps: int, batch: int, seed: int) -> torch.Tensor:
    # stay inside (-1, 1) so +-eps never crosses the clip
    return torch.rand(steps, batch, 2, generator=torch.Generator().manual_seed(seed)) * 1.8 - 0.9


def rollout(sim: TPush, state: TPushState, policy, steps: int) -> list[TPushState]:
    states = [state]
    with torch.no_grad():
        for _ in range(steps):
            states.append(sim.step(states[-1], policy(states[-1])).state)
    return states


# ----------------------------------------------------------------------------- geometry and spec
def test_t_geometry_mass_properties():
    # centre of mass at the origin of the body frame; inertia and mean radius by fine quadrature
    areas = [w * h for w, h in (BAR_SIZE, STEM_SIZE)]
    com = sum(a * c for a, c in zip(areas, (BAR_CENTER, STEM_CENTER))) / sum(areas)
    np.testing.assert_allclose(com, 0.0, atol=1e-12)
    n = 600
    u = (np.arange(n) + 0.5) / n - 0.5
    r2, weights = [], []
    for (w, h), centre in zip((BAR_SIZE, STEM_SIZE), (BAR_CENTER, STEM_CENTER)):
        x, y = np.meshgrid(centre[0] + u * w, centre[1] + u * h)
        r2.append((x * x + y * y).ravel())
        weights.append(np.full(x.size, w * h / x.size))
    r2, weights = np.concatenate(r2), np.concatenate(weights)
    assert t_inertia_per_mass() == pytest.approx((r2 * weights).sum() / weights.sum(), rel=1e-5)
    assert t_mean_radius() == pytest.approx((np.sqrt(r2) * weights).sum() / weights.sum(), rel=1e-4)
    assert TPush().params.block_inertia == pytest.approx(t_inertia_per_mass())


def test_observation_layout_and_reward_at_goal():
    sim = TPush()
    goal_pose = make_state([[0.35, -0.35], [0.35, -0.35]], [[0.0, 0.0], [0.1, -0.05]], [GOAL_ANGLE, 0.3],
                           block_vel=[[0.0, 0.0], [0.1, 0.2]], block_angvel=[0.0, 0.5], pusher_vel=[[0.0, 0.0]] * 2)
    obs = sim.observe(goal_pose)
    expected = torch.cat([goal_pose.pusher_pos, goal_pose.pusher_vel, goal_pose.block_pos,
                          torch.cos(goal_pose.block_angle)[:, None], torch.sin(goal_pose.block_angle)[:, None],
                          goal_pose.block_vel, goal_pose.block_angvel[:, None]], dim=1)
    torch.testing.assert_close(obs, expected)
    out = sim.step(goal_pose, torch.zeros(2, 2))
    torch.testing.assert_close(out.obs, sim.observe(out.state))
    assert out.success.tolist() == [True, False]
    # the pusher is far from the block, so the shaping term is 0.1 * the rim clearance
    for i in range(2):
        s = out.state[i]
        distance = keypoint_distance(s.block_pos[0].numpy(), float(s.block_angle[0]))
        clearance = t_signed_distance(s.pusher_pos[0].numpy(), s.block_pos[0].numpy(), float(s.block_angle[0]))
        expected_reward = -distance - 0.1 * (clearance - PUSHER_RADIUS)
        assert float(out.reward[i]) == pytest.approx(expected_reward, abs=1e-5)
    assert not out.terminated.any()


def test_reset_distribution():
    sim = TPush()
    n = 1024
    state = sim.reset(torch.arange(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32))
    assert state.block_pos.abs().max() <= 0.3 and state.pusher_pos.abs().max() <= 0.4
    assert state.block_angle.abs().max() <= math.pi
    assert abs(float(state.block_pos.mean())) < 0.02 and abs(float(state.block_angle.mean())) < 0.2
    for name in ("pusher_vel", "block_vel", "block_angvel", "step"):
        assert torch.all(getattr(state, name) == 0), name
    for i in range(n):
        block, theta = state.block_pos[i].numpy(), float(state.block_angle[i])
        assert keypoint_distance(block, theta) > 0.1  # away from the goal
        assert t_signed_distance(state.pusher_pos[i].numpy(), block, theta) - PUSHER_RADIUS > 0.019


# ----------------------------------------------------------------------------- physics sanity
def test_block_stays_still_without_contact():
    sim = TPush()
    # pusher in a far corner, driven into the walls: it never reaches the block
    state = make_state([[0.4, 0.4]] * 4, [[-0.2, -0.2], [-0.25, 0.1], [0.0, -0.2], [-0.1, -0.1]], [0.0, 1.0, 2.0, -2.5])
    start = state.clone()
    states = rollout(sim, state, lambda s: torch.tensor([[1.0, 1.0], [1.0, 0.3], [0.3, 1.0], [1.0, -0.2]]), 60)
    end = states[-1]
    for name in ("block_pos", "block_angle", "block_vel", "block_angvel"):
        assert torch.equal(getattr(end, name), getattr(start, name)), name
    assert (end.pusher_pos - start.pusher_pos).abs().max() > 0.01  # the pusher did move


def test_central_push_translates_along_push_direction():
    sim = TPush()
    # push along the T's symmetry axis from under the stem, for several orientations of the scene
    angles = np.linspace(-math.pi, math.pi, 7, endpoint=False)
    axis = np.stack([-np.sin(angles), np.cos(angles)], axis=1)  # body +y in the world
    block = np.zeros((len(angles), 2))
    pusher = block - axis * (0.132 + PUSHER_RADIUS + 0.01)
    state = make_state(pusher, block, angles)
    command = torch.tensor(axis, dtype=torch.float32)
    end = rollout(sim, state, lambda s: command, 12)[-1]
    moved = (end.block_pos - state.block_pos).numpy()
    distance = np.linalg.norm(moved, axis=1)
    assert np.all(distance > 0.1)  # ~0.42 m/s once in contact
    cosine = (moved * axis).sum(1) / distance
    assert np.all(cosine > 0.999)
    assert float((end.block_angle - state.block_angle).abs().max()) < 1e-3


@pytest.mark.parametrize("side", [1.0, -1.0])
def test_off_centre_push_turns_the_block(side):
    sim = TPush()
    # push the bar's end upwards: the right end turns the T counter-clockwise, the left end clockwise
    state = make_state([[side * 0.08, -0.03]], [[0.0, 0.0]], [0.0])
    end = rollout(sim, state, lambda s: torch.tensor([[0.0, 1.0]]), 8)[-1]
    turned = float(end.block_angle[0])
    assert side * turned > 0.2
    assert float(end.block_pos[0, 1]) > 0.01


def chase_policy(noise_seed: int):
    gen = torch.Generator().manual_seed(noise_seed)

    def policy(state: TPushState) -> torch.Tensor:
        # full speed at the block (pins it against the walls: the worst case for tunnelling)
        direction = state.block_pos - state.pusher_pos + 0.05 * torch.randn(state.pusher_pos.shape, generator=gen)
        return direction / direction.norm(dim=1, keepdim=True) * math.sqrt(2.0)  # clipped to the box

    return policy


def test_no_tunnelling_at_full_action_over_long_rollouts():
    sim = TPush()
    n = 16
    state = sim.reset(torch.arange(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32))
    states = rollout(sim, state, chase_policy(0), 200)
    deepest = 0.0
    for s in states[::2]:
        for i in range(n):
            block, theta = s.block_pos[i].numpy().astype(float), float(s.block_angle[i])
            pusher = s.pusher_pos[i].numpy().astype(float)
            deepest = min(deepest, t_signed_distance(pusher, block, theta) - PUSHER_RADIUS)
            vertices = T_OUTLINE @ rotation(theta).T + block
            assert np.abs(vertices).max() < ARENA_HALF + 0.008
            assert np.abs(pusher).max() < ARENA_HALF - PUSHER_RADIUS + 0.008
    # stall force 20 N over k = 5000 N/m is 4 mm (plus up to 2 mm of corner rounding and impact
    # overshoot); the T is 50 mm thick, so nothing comes close to passing through
    assert -0.008 < deepest < -0.001
    assert all(torch.isfinite(t).all() for t in states[-1].tensors())


def kinetic_energy(sim: TPush, s: TPushState) -> torch.Tensor:
    p = sim.params
    return 0.5 * (p.pusher_mass * (s.pusher_vel ** 2).sum(1) + p.block_mass * (s.block_vel ** 2).sum(1)
                  + p.block_inertia * s.block_angvel ** 2)


def test_energy_does_not_grow():
    # servo off: a free pusher bounces off the walls and the block; contacts and friction may only
    # dissipate, so the kinetic energy never exceeds the initial (contact-free) total energy
    sim = TPush(servo_gain=1e-9)
    n = 16
    state = sim.reset(torch.arange(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32))
    gen = torch.Generator().manual_seed(0)
    state = state.replace(pusher_vel=torch.randn(n, 2, generator=gen) * 0.6,
                          block_vel=torch.randn(n, 2, generator=gen) * 0.3,
                          block_angvel=torch.randn(n, generator=gen) * 2.0)
    states = rollout(sim, state, lambda s: torch.zeros(n, 2), 200)
    energy = torch.stack([kinetic_energy(sim, s) for s in states])
    assert torch.all(energy <= energy[0] * (1 + 1e-3) + 1e-7)
    assert torch.all(energy[-1] < energy[0])
    # the pusher keeps most of its energy (frictionless walls, damped impacts): the test is not vacuous
    assert float(energy[-1].sum()) > 0.01 * float(energy[0].sum())
    # with the servo on and zero command, energy decays monotonically
    servo = TPush()
    energy = torch.stack([kinetic_energy(servo, s) for s in rollout(servo, state, lambda s: torch.zeros(n, 2), 40)])
    assert torch.all(energy[1:] <= energy[:-1] + 1e-7)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_one_step_gradients_in_contact_match_finite_differences(seed):
    # documented tolerance for the default (stiff) contact: eps 1e-4, rtol 0.03, atol 0.05. The force
    # varies on the 1 mm smoothing scale, so larger steps see curvature (the error shrinks as eps^2
    # down to float32 round-off near 1e-4; 8 seeds needed rtol <= 0.011 at this atol)
    check = check_entrywise(TPush(), contact_states(4, seed), interior_actions(1, 4, seed), eps=1e-4)
    check.assert_close(rtol=0.03, atol=0.05, what="one step in contact")
    assert float(check.analytic.abs().max()) > 5.0  # the contact force is in the gradient


def test_one_step_gradients_of_softened_contact_match_tightly():
    # softer, wider smoothing: finite differences converge, so the adjoint is checked to 3 %
    sim = TPush(contact_stiffness=2000.0, contact_smoothing=5e-3, friction_smoothing=0.05)
    check = check_entrywise(sim, contact_states(4, 5), interior_actions(1, 4, 5), eps=3e-4)
    check.assert_close(rtol=0.03, atol=0.03, what="softened contact")


def test_one_step_gradients_without_contact_match_finite_differences():
    sim = TPush()
    state = sim.reset(torch.arange(4, dtype=torch.int32), torch.zeros(4, dtype=torch.int32))
    gen = torch.Generator().manual_seed(3)
    state = state.replace(block_vel=torch.randn(4, 2, generator=gen) * 0.2,
                          block_angvel=torch.randn(4, generator=gen))
    check_entrywise(sim, state, interior_actions(1, 4, 3), eps=1e-3).assert_close(rtol=2e-2, atol=5e-3)


def wall_contact_states(depth: float = 0.002) -> TPushState:
    """The T pressed ``depth`` into each of the four walls by one hull corner (at four angles), the pusher
    pressed ``depth`` into a wall too, both moving into it."""
    sim = TPush()
    angles = torch.tensor([0.3, 1.9, -2.4, 0.8])
    normals = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])  # outward, one wall per env
    blocks, pushers = [], []
    for theta, outward in zip(angles.tolist(), normals):
        corners = sim.hull_vertices(torch.zeros(1, 2), torch.tensor([theta]))[0].numpy().astype(float)
        reach = float((corners @ outward).max())  # the corner deepest towards that wall, from the centre
        blocks.append(outward * (ARENA_HALF + depth - reach))
        # the pusher against the next wall round, clear of the T
        side = np.array([outward[1], -outward[0]])
        pushers.append(side * (ARENA_HALF - PUSHER_RADIUS + depth))
    blocks, pushers = np.array(blocks), np.array(pushers)
    inward_block = -normals * 0.2
    inward_pusher = np.array([[n[1], -n[0]] for n in normals]) * 0.2
    return make_state(pushers, blocks, angles.numpy(), pusher_vel=inward_pusher, block_vel=inward_block,
                      block_angvel=[0.5, -0.4, 0.3, -0.2])


def test_one_step_gradients_in_wall_contact_match_finite_differences():
    """Walls are contacts too (the broad phase skips only walls out of reach): in wall contact the
    gradients of a step match central differences, and the wall force is in them."""
    state = wall_contact_states()
    sim = TPush()
    reach = sim.hull_vertices(state.block_pos, state.block_angle).abs().amax(dim=(1, 2))
    assert bool(((reach > ARENA_HALF + 0.0015) & (reach < ARENA_HALF + 0.0025)).all())  # 2 mm into a wall
    assert bool((state.pusher_pos.abs().amax(dim=1) > ARENA_HALF - PUSHER_RADIUS + 0.0015).all())
    check = check_entrywise(sim, state, interior_actions(1, 4, 11), eps=1e-4)
    check.assert_close(rtol=0.03, atol=0.05, what="one step in wall contact")
    free = check_entrywise(sim, state.replace(block_pos=state.block_pos * 0.5, pusher_pos=state.pusher_pos * 0.5),
                           interior_actions(1, 4, 11), eps=1e-4)
    assert float((check.analytic - free.analytic).abs().max()) > 1.0  # the wall force changes the gradient


def test_chained_gradients_in_contact_match_finite_differences():
    sim = TPush()
    state = contact_states(2, 7, depth=0.001, speed=0.1)
    # keep pushing into the block so the contact persists through the chain
    toward = (state.block_pos - state.pusher_pos)
    toward = 0.6 * toward / toward.norm(dim=1, keepdim=True)
    actions = toward[None].repeat(10, 1, 1) + 0.2 * interior_actions(10, 2, 8)
    check = check_directional(sim, state, actions, eps=3e-4, directions=8)
    check.assert_close(rtol=0.1, atol=0.1, what="10 steps in contact")


def test_gradients_stay_finite_over_a_full_episode():
    env = gym.make("DiffGym/TPush-v0")
    env.reset(seed=0)
    sim = env.unwrapped
    state = sim.get_state()
    actions = torch.zeros(200, 1, 2, requires_grad=True)
    policy = chase_policy(1)
    total = 0.0
    contacts = 0
    for a in actions:
        with torch.no_grad():
            command = policy(state).clamp(-0.9, 0.9)
        out = sim.differentiable_step(state, command + a)
        total = total + out.reward.sum()
        state = out.state
        with torch.no_grad():  # in contact the shaping term vanishes: the reward is -D alone
            contacts += int(out.reward[0] > -keypoint_distance(state.block_pos[0].numpy(),
                                                               float(state.block_angle[0])) - 1e-4)
    total.backward()
    assert contacts > 50  # most of the episode is spent in contact
    assert torch.isfinite(actions.grad).all() and actions.grad.abs().sum() > 0


def test_open_loop_optimisation_reduces_cost():
    # a short APG smoke test: exact gradients through contact improve a 30-step push
    env = gym.make("DiffGym/TPush-v0")
    env.reset(seed=3)
    sim = env.unwrapped
    start = sim.get_state()
    toward = start.block_pos - start.pusher_pos
    actions = (0.8 * toward / toward.norm(dim=1, keepdim=True))[None].repeat(30, 1, 1).requires_grad_(True)
    opt = torch.optim.Adam([actions], lr=0.05)

    def ret() -> torch.Tensor:
        s, total = start, 0
        for a in actions:
            out = sim.differentiable_step(s, a)
            total, s = total + out.reward.sum(), out.state
        return total

    with torch.no_grad():
        before = float(ret())
    for _ in range(15):
        opt.zero_grad()
        (-ret()).backward()
        opt.step()
    with torch.no_grad():
        after = float(ret())
    assert after > before + 0.1 * abs(before), (before, after)


def test_v1_is_v0_with_a_longer_horizon_and_a_wider_tolerance():
    """TPush-v1 keeps v0's dynamics and reward; only the horizon (400 steps) and the success tolerance
    (3 cm) change, and both reach the simulator (truncation and ``success``), single and vectorized."""
    env0, env1 = gym.make("DiffGym/TPush-v0"), gym.make("DiffGym/TPush-v1")
    vec1 = gym.make_vec("DiffGym/TPush-v1", num_envs=2)
    try:
        assert (env0.spec.max_episode_steps, env1.spec.max_episode_steps) == (200, 400)
        sim0, sim1 = env0.unwrapped.sim, env1.unwrapped.sim
        assert (sim1.max_episode_steps, vec1.sim.max_episode_steps) == (400, 400)
        # the block 2.5 cm off its goal position (D = 0.025 m for a pure translation), pusher far away
        state = make_state([[0.35, -0.35]], [[0.025, 0.0]], [GOAL_ANGLE])
        assert keypoint_distance(np.array([0.025, 0.0]), GOAL_ANGLE) == pytest.approx(0.025)
        out0, out1 = sim0.step(state, torch.zeros(1, 2)), sim1.step(state, torch.zeros(1, 2))
        assert (bool(out0.success), bool(out1.success)) == (False, True)
        torch.testing.assert_close(out0.reward, out1.reward)
        torch.testing.assert_close(out0.obs, out1.obs)
        late = dataclasses.replace(state, step=torch.tensor([398], dtype=torch.int32))
        assert not bool(sim1.step(late, torch.zeros(1, 2)).truncated)
        assert bool(sim1.step(sim1.step(late, torch.zeros(1, 2)).state, torch.zeros(1, 2)).truncated)
        assert bool(sim0.step(dataclasses.replace(state, step=torch.tensor([199], dtype=torch.int32)),
                              torch.zeros(1, 2)).truncated)
    finally:
        env0.close(), env1.close(), vec1.close()


def face_potential_reference(pusher: np.ndarray, block: np.ndarray) -> float:
    rel, away = pusher - block, block - np.zeros(2)
    r, g = math.sqrt(rel @ rel + 1e-6), math.sqrt(away @ away + 1e-6)
    return math.tanh(g / 0.05) * float(rel @ away) / (r * g)


def test_face_shaping_is_a_potential_difference_with_exact_gradients():
    """face_shaping_weight adds w (Phi(s') - Phi(s)), Phi the pusher's bearing behind the block: the
    reward equals v0's plus exactly that, sums to w (Phi(s_T) - Phi(s_0)) over a rollout, and its
    gradients (in and out of contact) match central differences."""
    plain, shaped = TPush(), TPush(face_shaping_weight=2.0)
    state = plain.reset(torch.arange(8, dtype=torch.int32), torch.zeros(8, dtype=torch.int32))
    actions = interior_actions(30, 8, 5)
    extra = torch.zeros(8, dtype=torch.float64)
    s = state
    for action in actions:
        out0, out1 = plain.step(s, action), shaped.step(s, action)
        torch.testing.assert_close(out1.state.block_pos, out0.state.block_pos)  # dynamics untouched
        extra += (out1.reward - out0.reward).double()
        s = out0.state
    phi = [face_potential_reference(x.pusher_pos[0].numpy().astype(float), x.block_pos[0].numpy().astype(float))
           for x in (state, s)]
    assert float(extra[0]) == pytest.approx(2.0 * (phi[1] - phi[0]), abs=1e-4)
    check_entrywise(shaped, state, interior_actions(1, 8, 3), eps=1e-3).assert_close(rtol=2e-2, atol=5e-3)
    pressed = contact_states(8, seed=4)
    check_entrywise(TPush(face_shaping_weight=2.0), pressed, interior_actions(1, 8, 6),
                    eps=1e-4).assert_close(rtol=3e-2, atol=5e-2)


def test_start_spread_narrows_the_start_around_the_goal_pose():
    """start_spread=1 draws the registered start distribution number for number; a smaller spread keeps
    the block within 0.3 s m and pi s rad of the goal pose (still at least D = 0.1 m from it) and the
    pusher drawn as before (anywhere in the arena's inner square, clear of the T); a spread outside
    [0.3, 1] is one clear error."""
    # draws of the tree before start_spread existed (commit 0f1b242), streams (0, 0), (1, 0), (7, 3), (123, 0)
    before = TPush(start_spread=1.0).reset(torch.tensor([0, 1, 7, 123], dtype=torch.int32),
                                           torch.tensor([0, 0, 3, 0], dtype=torch.int32))
    assert before.block_pos.tolist() == [[-0.0003139972686767578, 0.030929088592529297],
                                         [0.17705708742141724, -0.019156992435455322],
                                         [-0.1491304636001587, 0.14254635572433472],
                                         [-0.2150912582874298, -0.1229880154132843]]
    assert before.block_angle.tolist() == [-1.7947624921798706, 2.4802486896514893, 0.032941341400146484,
                                           2.015763998031616]
    assert before.pusher_pos.tolist() == [[-0.2506937086582184, 0.10396215319633484],
                                          [0.24674424529075623, 0.22498014569282532],
                                          [0.09300422668457031, -0.006952136754989624],
                                          [-0.3412168622016907, 0.2898538410663605]]
    seeds, episodes = torch.arange(256, dtype=torch.int32), torch.zeros(256, dtype=torch.int32)
    narrow = TPush(start_spread=0.3, success_distance=0.03).reset(seeds, episodes)
    assert narrow.block_pos.abs().max() <= 0.09 + 1e-6
    offset = torch.remainder(narrow.block_angle - GOAL_ANGLE + math.pi, 2 * math.pi) - math.pi
    assert offset.abs().max() <= 0.3 * math.pi + 1e-5
    for i in range(256):
        block, theta = narrow.block_pos[i].numpy(), float(narrow.block_angle[i])
        assert keypoint_distance(block, theta) > 0.1
        assert t_signed_distance(narrow.pusher_pos[i].numpy(), block, theta) - PUSHER_RADIUS > 0.019
    assert narrow.pusher_pos.abs().max() <= 0.4 and narrow.pusher_pos.abs().max() > 0.35
    for bad in (0.0, 0.25, 1.5, -0.2):
        with pytest.raises(ValueError, match="start_spread must be in"):
            TPush(start_spread=bad)
