"""PointNav2D: dynamics against an independent float64 model of the documented equations, contact
sanity (no tunnelling, no energy gain), reset, rendering, and gradients against the float64 model's
autograd and against finite differences, in and out of contact."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from diffgym.envs.point_nav_2d import (ARENA_HALF_WIDTH, BODY_RADIUS, DAMPING, GOAL_REGION, OBSTACLES,
                                       RESET_CLEARANCE, START_REGION, STIFFNESS, SUBSTEPS, PointNav2D,
                                       PointNav2DState)
from diffgym.testing import check_directional, check_entrywise

DT = 0.05
WALL_LIMIT = ARENA_HALF_WIDTH - BODY_RADIUS
OBSTACLE_TABLE = torch.tensor(OBSTACLES, dtype=torch.float64)


# ----------------------------------------------------------------------------------------- float64 model
def soft_depth(depth: torch.Tensor, smoothing: float) -> torch.Tensor:
    inner = depth.clamp(0.0, smoothing)
    return inner * inner / (2 * smoothing) + (depth - smoothing).clamp(min=0.0)


def spring_energy(depth: torch.Tensor, smoothing: float) -> torch.Tensor:
    """STIFFNESS * integral of soft_depth from 0 to depth: the contact spring's potential energy."""
    inner, excess = depth.clamp(0.0, smoothing), (depth - smoothing).clamp(min=0.0)
    return STIFFNESS * (inner**3 / (6 * smoothing) + excess**2 / 2 + smoothing * excess / 2)


def contact_depths(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Penetration depths (B, 9) and outward unit normals (B, 9, 2): five obstacles, then walls +x, -x, +y, -y."""
    offset = pos[:, None, :] - OBSTACLE_TABLE[None, :, :2].to(pos)
    distance = offset.norm(dim=-1)
    obstacle_depth = OBSTACLE_TABLE[:, 2].to(pos) + BODY_RADIUS - distance
    obstacle_normal = offset / distance.clamp(min=1e-6)[..., None]
    x, y = pos[:, 0], pos[:, 1]
    wall_depth = torch.stack([x - WALL_LIMIT, -WALL_LIMIT - x, y - WALL_LIMIT, -WALL_LIMIT - y], dim=1)
    wall_normal = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]]).to(pos).expand(len(pos), 4, 2)
    return torch.cat([obstacle_depth, wall_depth], 1), torch.cat([obstacle_normal, wall_normal], 1)


def smoothstep5(u: torch.Tensor) -> torch.Tensor:
    u = u.clamp(0.0, 1.0)
    return u**3 * (10 - 15 * u + 6 * u**2)


def reference_step(pos, vel, goal, action, drag=0.25, smoothing=0.01, penetration_weight=10.0,
                   contact_gradient_distance=0.0):
    """The documented dynamics and reward, written independently of the Warp kernels (any dtype). With
    ``contact_gradient_distance`` D > 0: the documented pre-contact surrogate, whose springs reach out to D."""
    h = DT / SUBSTEPS
    for _ in range(SUBSTEPS):
        depth, normal = contact_depths(pos)
        t = (depth / smoothing).clamp(0.0, 1.0)
        gate = t * t * (3 - 2 * t)
        spring = STIFFNESS * soft_depth(depth, smoothing)
        if contact_gradient_distance > 0:
            tail = (1 - smoothstep5(-depth / contact_gradient_distance)) * (1 - smoothstep5(depth / smoothing))
            spring = spring + STIFFNESS * smoothing / 8 * tail
        magnitude = spring - DAMPING * gate * (normal * vel[:, None]).sum(-1)
        force = action - drag * vel + (magnitude[..., None] * normal).sum(1)
        vel = vel + force * h
        pos = pos + vel * h
    depth, _ = contact_depths(pos)
    reward = -(pos - goal).norm(dim=1) - penetration_weight * soft_depth(depth, smoothing).sum(1)
    return pos, vel, reward


def mechanical_energy(state: PointNav2DState, smoothing: float = 0.01) -> torch.Tensor:
    pos = state.pos.double()
    depth, _ = contact_depths(pos)
    return 0.5 * (state.vel.double() ** 2).sum(1) + spring_energy(depth, smoothing).sum(1)


# ----------------------------------------------------------------------------------------- states
def nav_state(pos, vel, goal=None) -> PointNav2DState:
    pos = torch.as_tensor(pos, dtype=torch.float32).reshape(-1, 2)
    vel = torch.as_tensor(vel, dtype=torch.float32).reshape(-1, 2)
    goal = torch.full_like(pos, 1.3) if goal is None else torch.as_tensor(goal, dtype=torch.float32).reshape(-1, 2)
    return PointNav2DState(pos, vel, goal, torch.zeros(len(pos), dtype=torch.int32))


def free_state(batch: int, seed: int) -> PointNav2DState:
    """Random states in the open space of the start region, moving at up to ~1 m/s."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.tensor([[-1.5, -1.5]]) + 0.2 * (torch.rand(batch, 2, generator=g) * 2 - 1)
    return nav_state(pos, 0.6 * torch.randn(batch, 2, generator=g), 0.8 + torch.rand(batch, 2, generator=g))


def contact_state(batch: int, seed: int) -> PointNav2DState:
    """Random states touching or penetrating an obstacle (even envs) or a wall (odd envs), moving inwards."""
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(batch, generator=g) * 2 * np.pi
    normal = torch.stack([angle.cos(), angle.sin()], 1)
    depth = -0.01 + 0.05 * torch.rand(batch, generator=g)
    obstacle = OBSTACLE_TABLE[torch.randint(0, len(OBSTACLES), (batch,), generator=g)].float()
    pos = obstacle[:, :2] + normal * (obstacle[:, 2:] + BODY_RADIUS - depth[:, None])
    side = torch.randint(0, 2, (batch,), generator=g) * 2 - 1.0  # left/right wall
    wall_pos = torch.stack([side * (WALL_LIMIT + depth), -1.5 + torch.rand(batch, generator=g)], 1)
    wall_normal = torch.stack([-side, torch.zeros(batch)], 1)
    odd = (torch.arange(batch) % 2 == 1)[:, None]
    pos, normal = torch.where(odd, wall_pos, pos), torch.where(odd, wall_normal, normal)
    vel = -normal * (0.3 + 1.5 * torch.rand(batch, 1, generator=g)) + 0.3 * torch.randn(batch, 2, generator=g)
    return nav_state(pos, vel, 0.8 + torch.rand(batch, 2, generator=g))


def random_actions(steps: int, batch: int, seed: int) -> torch.Tensor:
    # stay inside (-1, 1) so +-eps never crosses the clip
    return torch.rand(steps, batch, 2, generator=torch.Generator().manual_seed(seed)) * 1.8 - 0.9


def rollout(sim: PointNav2D, state: PointNav2DState, policy, steps: int):
    """States after each step (the first entry is ``state``) and the summed rewards."""
    states, total = [state], torch.zeros(state.batch_size)
    for _ in range(steps):
        out = sim.step(states[-1], policy(states[-1]))
        states.append(out.state)
        total = total + out.reward
    return states, total


def max_penetration(states: list[PointNav2DState]) -> float:
    return max(float(contact_depths(s.pos.detach().double())[0].max()) for s in states)


# ----------------------------------------------------------------------------------------- dynamics
@pytest.mark.parametrize("make_state", [free_state, contact_state])
def test_step_matches_float64_model_of_documented_equations(make_state):
    sim = PointNav2D()
    state, action = make_state(16, seed=0), random_actions(1, 16, seed=1)[0]
    out = sim.step(state, action)
    pos, vel, reward = reference_step(state.pos.double(), state.vel.double(), state.goal.double(), action.double())
    torch.testing.assert_close(out.state.pos.double(), pos, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.state.vel.double(), vel, rtol=0, atol=2e-4)
    torch.testing.assert_close(out.reward.double(), reward, rtol=0, atol=1e-4)
    assert torch.equal(out.state.goal, state.goal) and torch.equal(out.state.step, torch.ones(16, dtype=torch.int32))
    assert not out.terminated.any() and not out.truncated.any()


def test_free_flight_is_drag_damped_semi_implicit_euler():
    # closed form of SUBSTEPS semi-implicit Euler substeps of v' = v + (a - drag v) h: no contact involved
    sim = PointNav2D()
    state = free_state(8, seed=2)
    action = random_actions(1, 8, seed=3)[0]
    pos, vel = state.pos.double(), state.vel.double()
    h = DT / SUBSTEPS
    for _ in range(SUBSTEPS):
        vel = vel + (action.double() - 0.25 * vel) * h
        pos = pos + vel * h
    out = sim.step(state, action)
    torch.testing.assert_close(out.state.vel.double(), vel, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.state.pos.double(), pos, rtol=0, atol=1e-6)
    # no drag, no force: uniform motion
    still = PointNav2D(drag=0.0).step(state, torch.zeros(8, 2))
    torch.testing.assert_close(still.state.vel, state.vel)
    torch.testing.assert_close(still.state.pos, state.pos + DT * state.vel)


def test_observation_layout():
    sim = PointNav2D()
    state = contact_state(6, seed=4)
    obs = sim.observe(state).double()
    pos, vel, goal = state.pos.double(), state.vel.double(), state.goal.double()
    torch.testing.assert_close(obs[:, :6], torch.cat([pos, vel, goal - pos], 1), rtol=0, atol=1e-6)
    rel = OBSTACLE_TABLE[None, :, :2] - pos[:, None]
    clearance = rel.norm(dim=-1) - OBSTACLE_TABLE[:, 2] - BODY_RADIUS
    per_obstacle = torch.cat([rel, clearance[..., None]], -1).reshape(6, -1)
    torch.testing.assert_close(obs[:, 6:], per_obstacle, rtol=0, atol=1e-6)
    assert obs.shape == (6, sim.obs_dim) == (6, 21)
    penetrating = contact_depths(pos)[0][:, :5].max(1).values > 0
    assert torch.equal(obs[:, 8::3].min(1).values < 0, penetrating)


def test_reward_penetration_penalty_and_success():
    sim = PointNav2D()
    goal = torch.tensor([[1.2, 1.2]] * 4)
    # at the goal; 0.12 m away; pressed at full force into obstacle 0 and into the +x wall, resting at
    # the equilibrium depth where k soft(d) = k d^2 / (2 s) = 1 N (inside the smoothing band)
    rest = float(np.sqrt(2 * 0.01 / STIFFNESS))
    pos = torch.tensor([[1.2, 1.2], [1.32, 1.2], [0.55 - rest, 0.0], [WALL_LIMIT + rest, 1.0]])
    action = torch.tensor([[0.0, 0.0], [0.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    out = sim.step(nav_state(pos, torch.zeros(4, 2), goal), action)
    assert out.success.tolist() == [True, False, False, False]
    torch.testing.assert_close(out.state.pos, pos, rtol=0, atol=1e-6)  # in balance: nothing moves
    distance = (pos - goal).norm(dim=1)
    penalty = 10.0 * rest**2 / (2 * 0.01)
    expected = -distance - torch.tensor([0.0, 0.0, penalty, penalty], dtype=torch.float32)
    torch.testing.assert_close(out.reward, expected, rtol=0, atol=1e-5)


def test_penetrating_body_is_pushed_out_along_the_normal():
    sim = PointNav2D()
    # at rest 3 cm inside obstacle 0 at 30 degrees, and 3 cm inside the -y wall
    normal = torch.tensor([np.cos(np.pi / 6), np.sin(np.pi / 6)], dtype=torch.float32)
    pos = torch.stack([(0.55 - 0.03) * normal, torch.tensor([0.5, -WALL_LIMIT - 0.03])])
    out = sim.step(nav_state(pos, torch.zeros(2, 2)), torch.zeros(2, 2))
    direction = out.state.vel / out.state.vel.norm(dim=1, keepdim=True)
    torch.testing.assert_close(direction, torch.stack([normal, torch.tensor([0.0, 1.0])]), rtol=0, atol=1e-5)
    assert float(contact_depths(out.state.pos.double())[0].max()) < 0  # out of contact after one step
    # the damper took energy: the exit speed is below the elastic sqrt(k) * depth
    assert float(out.state.vel.norm(dim=1).max()) < np.sqrt(STIFFNESS) * 0.03


def test_resting_contact_settles_at_the_surface():
    # pressing into obstacle 0 with full force for 10 s: the body comes to rest at the balance depth
    sim = PointNav2D()
    start = nav_state([[-1.0, 0.0], [0.0, -1.0]], torch.zeros(2, 2))
    states, _ = rollout(sim, start, lambda s: -s.pos / s.pos.abs().amax(1, keepdim=True), 200)
    final = states[-1]
    depth = float(contact_depths(final.pos.double())[0][:, 0].max())
    # balance of k soft(d) = |F| = 1 N in the smoothing band: d = sqrt(2 s / k)
    assert depth == pytest.approx(np.sqrt(2 * 0.01 / STIFFNESS), abs=1e-5)
    assert float(final.vel.norm(dim=1).max()) < 1e-3


@pytest.mark.parametrize("speed", [2.0, 5.66])
def test_no_tunnelling_at_full_force(speed):
    # bodies launched at up to top speed (sqrt(2)/drag = 5.66 m/s) at every obstacle from 8 sides and at
    # every wall, then pushed at full force towards the obstacle's centre / through the wall for 10 s
    sim = PointNav2D()
    angle = torch.arange(8, dtype=torch.float64) * np.pi / 4
    around = torch.stack([angle.cos(), angle.sin()], 1)
    targets = [OBSTACLE_TABLE[k, :2].expand(8, 2) for k in range(len(OBSTACLES))]
    starts = [OBSTACLE_TABLE[k, :2] + (OBSTACLE_TABLE[k, 2] + BODY_RADIUS + 0.3) * around
              for k in range(len(OBSTACLES))]
    along = torch.linspace(-1.5, 1.5, 5, dtype=torch.float64)
    for axis in range(2):
        for side in (-1.0, 1.0):
            start = torch.zeros(5, 2, dtype=torch.float64)
            start[:, axis], start[:, 1 - axis] = side * 1.5, along
            target = start.clone()
            target[:, axis] = side * 3.0
            starts.append(start)
            targets.append(target)
    starts, targets = torch.cat(starts), torch.cat(targets)
    free = (contact_depths(starts)[0].max(1).values < -0.02)  # drop run-ups that start in contact
    starts, targets = starts[free].float(), targets[free].float()
    assert len(starts) >= 50
    aim = (targets - starts) / (targets - starts).norm(dim=1, keepdim=True)

    def full_force(s: PointNav2DState) -> torch.Tensor:
        direction = targets - s.pos
        return direction / direction.abs().amax(1, keepdim=True)  # on the edge of the action box

    states, _ = rollout(sim, nav_state(starts, speed * aim), full_force, 200)
    depth = max_penetration(states)
    assert 0.0 < depth < 0.1  # < 0.30 m, the smallest obstacle radius plus body radius
    for s in states:
        centre_distance = (s.pos[:, None].double() - OBSTACLE_TABLE[None, :, :2]).norm(dim=-1)
        assert bool((centre_distance > OBSTACLE_TABLE[:, 2] - 0.05).all())  # never reached an obstacle's core
        assert float(s.vel.norm(dim=1).max()) <= max(speed, 5.66) + 1e-3


@pytest.mark.parametrize("drag", [0.25, 0.0])
def test_contacts_do_not_add_energy(drag):
    # unforced bodies bouncing between obstacles and walls at 4 m/s for 10 s
    sim = PointNav2D(drag=drag)
    g = torch.Generator().manual_seed(5)
    angle = torch.rand(32, generator=g) * 2 * np.pi
    state = nav_state(torch.tensor([[-1.5, -1.5]]).repeat(32, 1) + 0.2 * torch.rand(32, 2, generator=g),
                      4.0 * torch.stack([angle.cos(), angle.sin()], 1))
    states, _ = rollout(sim, state, lambda s: torch.zeros(s.batch_size, 2), 200)
    energy = torch.stack([mechanical_energy(s) for s in states])  # kinetic + contact spring, (201, B)
    in_contact = torch.stack([contact_depths(s.pos.double())[0].max(1).values > 0 for s in states])
    assert bool(in_contact.any(0).all())  # every body hit something
    for b in range(32):  # between contacts the energy never grows: each contact is a net loss
        free_flight = energy[~in_contact[:, b], b]
        assert bool((free_flight[1:] <= free_flight[:-1] * (1 + 1e-6)).all())
    # inside a contact semi-implicit Euler's energy error is bounded (omega h = 0.4), not a gain
    assert bool((energy <= 1.1 * energy[0]).all())
    assert bool((energy[-1] < 0.5 * energy[0]).all())  # the damper (and drag) dissipate


# ----------------------------------------------------------------------------------------- reset
def test_reset_distribution_rejects_obstacles():
    sim = PointNav2D()
    n = 8192
    state = sim.reset(torch.arange(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32))
    assert torch.all(state.vel == 0) and torch.all(state.step == 0)
    reference_rng = np.random.default_rng(0)
    for field, (low, high) in ((state.pos, START_REGION), (state.goal, GOAL_REGION)):
        assert field.min() >= low and field.max() <= high
        depth = contact_depths(field.double())[0][:, :5]
        assert float(depth.max()) <= -RESET_CLEARANCE + 1e-5  # body clear of every obstacle by the margin
        # an obstacle cuts into each region, so rejections happen ...
        candidates = torch.as_tensor(reference_rng.uniform(low, high, (4 * n, 2)))
        accepted = contact_depths(candidates)[0][:, :5].max(1).values <= -RESET_CLEARANCE
        assert 0.1 < 1 - float(accepted.double().mean()) < 0.3
        # ... and what is left is uniform over the free part: 6 x 6 histograms agree with NumPy rejection
        edges = np.linspace(low, high, 7)
        ours = np.histogram2d(*field.numpy().T, bins=[edges, edges])[0] / n
        expected = np.histogram2d(*candidates[accepted].numpy().T, bins=[edges, edges])[0] / int(accepted.sum())
        assert np.abs(ours - expected).max() < 0.01  # cell shares are ~1/36 = 0.028 (std ~0.002)
        assert (ours[expected == 0] == 0).all()  # nothing lands where only the obstacle is
    assert abs(float(torch.corrcoef(torch.stack([state.pos[:, 0], state.goal[:, 0]]))[0, 1])) < 0.05
    again = sim.reset(torch.arange(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32))
    assert torch.equal(again.pos, state.pos) and torch.equal(again.goal, state.goal)


def test_invalid_constructor_arguments():
    for bad in ({"contact_smoothing": 0.0}, {"success_distance": -0.1}, {"drag": -1.0},
                {"penetration_weight": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PointNav2D(**bad)
    with pytest.raises(ValueError, match="contact_smoothing"):
        gym.make("DiffGym/PointNav2D-v0", contact_smoothing=-1.0)


# ----------------------------------------------------------------------------------------- rendering
def test_render_shows_walls_obstacles_mass_and_goal():
    env = gym.make("DiffGym/PointNav2D-v0", render_mode="rgb_array")
    env.reset(seed=0)
    sim = env.unwrapped
    sim.set_state(nav_state([[-1.5, 1.5]], [[0.0, 0.0]], [[1.5, -1.5]]))
    frame = env.render()
    assert frame.shape == (400, 400, 3) and frame.dtype == np.uint8

    def pixel(x: float, y: float) -> tuple[int, ...]:
        half = ARENA_HALF_WIDTH + 0.1
        col = int((x + half) / (2 * half) * 400)
        row = int((half - y) / (2 * half) * 400)
        return tuple(int(c) for c in frame[row, col])

    assert pixel(-2.05, 0.3) == pixel(2.05, -0.3) == pixel(0.3, 2.05) == (70, 70, 80)  # walls
    assert all(pixel(x, y) == (120, 120, 130) for x, y, _ in OBSTACLES)  # obstacles
    assert pixel(-1.5, 1.5) == (40, 90, 220)  # mass
    assert pixel(1.5, -1.5) == (120, 210, 130)  # goal
    assert pixel(-1.0, 1.5) == (245, 245, 240)  # free floor


# ----------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("make_state", [free_state, contact_state])
def test_warp_adjoint_equals_float64_model_autograd(make_state):
    # the exact derivative of the documented equations: Warp's adjoint through 3 chained steps (in and out
    # of contact) against torch autograd of the float64 model, from the same inputs
    sim = PointNav2D()
    state, actions = make_state(8, seed=6), random_actions(3, 8, seed=7)
    weights = torch.randn(2, 8, 2, generator=torch.Generator().manual_seed(8))

    def gradients(step, dtype):
        leaves = [t.to(dtype).clone().requires_grad_(True) for t in (state.pos, state.vel, state.goal, actions)]
        pos, vel, goal, acts = leaves
        total = 0
        for a in acts:
            pos, vel, reward = step(pos, vel, goal, a)
            total = total + reward.sum()
        total = total + (weights[0].to(dtype) * pos).sum() + (weights[1].to(dtype) * vel).sum()
        return torch.autograd.grad(total, leaves)

    def warp_step(pos, vel, goal, a):
        out = sim.step(PointNav2DState(pos, vel, goal, torch.zeros(len(pos), dtype=torch.int32)), a)
        return out.state.pos, out.state.vel, out.reward

    for ours, exact in zip(gradients(warp_step, torch.float32), gradients(reference_step, torch.float64)):
        scale = float(exact.abs().max())
        assert scale > 0
        torch.testing.assert_close(ours.double(), exact, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_step_gradients_match_finite_differences_in_free_flight(seed):
    check = check_entrywise(PointNav2D(), free_state(4, seed), random_actions(1, 4, seed + 10), eps=1e-2)
    check.assert_close(rtol=1e-2, atol=2e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_step_gradients_match_finite_differences_in_contact(seed):
    # the contact spring's slope ramps 0 -> 4000 N/m over the 1 cm smoothing band, so the second
    # derivative is ~4e5: a small eps keeps truncation error below the float32 round-off (~1e-2 here)
    state = contact_state(4, seed)
    assert int((contact_depths(state.pos.double())[0].max(1).values > 0).sum()) >= 2
    check = check_entrywise(PointNav2D(), state, random_actions(1, 4, seed + 10), eps=3e-4)
    check.assert_close(rtol=2e-2, atol=3e-2)


def test_fifty_chained_steps_through_contact_match_finite_differences():
    sim = PointNav2D()
    # env 0 grazes obstacle 1 on its way up; env 1 drives into obstacle 3 and slides along it
    state = nav_state([[-0.9, -0.45], [-1.6, -1.5]], [[0.5, 0.5], [1.0, 0.8]], [[1.2, 1.3], [1.5, 1.0]])
    base = torch.tensor([[0.8, 0.6], [0.9, 0.9]])
    actions = (base + 0.1 * torch.randn(50, 2, 2, generator=torch.Generator().manual_seed(0))).clamp(-0.95, 0.95)
    remaining = iter(actions)
    states, _ = rollout(sim, state, lambda s: next(remaining), 50)
    assert max_penetration(states) > 0  # the chain really goes through contact
    check_directional(sim, state, actions, eps=1e-3, directions=8).assert_close(rtol=2e-2, atol=5e-2)


def test_gradients_are_finite_over_full_episodes_with_contact():
    env = gym.make_vec("DiffGym/PointNav2D-v0", num_envs=8)
    env.reset(seed=0)
    sim = env.unwrapped
    state = sim.get_state()
    # bang-bang pushes: bodies run into obstacles and walls again and again
    pattern = torch.tensor([[1.0, 1.0], [-1.0, 0.3], [0.2, -1.0], [1.0, -0.4]])
    actions = pattern.repeat_interleave(50, 0)[:, None].repeat(1, 8, 1)
    actions = (actions * torch.linspace(0.6, 1.0, 8)[None, :, None]).requires_grad_(True)
    leaves = {n: getattr(state, n).clone().requires_grad_(True) for n in ("pos", "vel", "goal")}
    s, total, penetration = state.replace(**leaves), 0, 0.0
    for a in actions:
        out = sim.differentiable_step(s, a)
        total, s = total + out.reward.sum(), out.state
        penetration = max(penetration, float(contact_depths(s.pos.detach().double())[0].max()))
    assert penetration > 0.01
    total.backward()
    for grad in (actions.grad, *(leaf.grad for leaf in leaves.values())):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert float(actions.grad.abs().max()) < 1e4


# ----------------------------------------------------------------------------------------- solvability
def scripted_action(obs: np.ndarray) -> np.ndarray:
    """Potential-field navigation from the observation: head for the goal, slide tangentially around
    obstacles that lie between the body and the goal, and track that velocity with a P controller."""
    vel, to_goal = obs[:, 2:4], obs[:, 4:6]
    distance = np.linalg.norm(to_goal, axis=1, keepdims=True)
    heading = to_goal / np.maximum(distance, 1e-6)
    desired = heading * np.minimum(1.2, 1.5 * distance)
    for k in range(len(OBSTACLES)):
        rel, clearance = obs[:, 6 + 3 * k: 8 + 3 * k], obs[:, 8 + 3 * k: 9 + 3 * k]
        rel_distance = np.linalg.norm(rel, axis=1, keepdims=True)
        away = -rel / rel_distance
        tangent = np.stack([-away[:, 1], away[:, 0]], axis=1)
        tangent *= np.sign(np.sum(tangent * heading, axis=1, keepdims=True) + 1e-9)
        weight = np.clip((0.35 - clearance) / 0.3, 0.0, 1.0)
        blocking = (np.sum(-away * heading, axis=1, keepdims=True) > -0.2) & (rel_distance < distance)
        desired = desired + blocking * weight * (1.2 * tangent + 0.8 * away)
    return np.clip(3.0 * (desired - vel) + 0.25 * vel, -1.0, 1.0).astype(np.float32)


def test_scripted_controller_solves_the_task_above_reward_threshold():
    # the registered reward_threshold is this controller's mean return (-203 over 4096 seeds), rounded down
    venv = gym.make_vec("DiffGym/PointNav2D-v0", num_envs=256)
    obs, _ = venv.reset(seed=123)
    returns, success = np.zeros(256), None
    for _ in range(200):
        obs, reward, terminated, truncated, info = venv.step(scripted_action(obs))
        returns += reward
        success = info["is_success"]
    assert truncated.all() and not terminated.any()
    assert success.mean() >= 0.97
    assert returns.mean() >= gym.spec("DiffGym/PointNav2D-v0").reward_threshold


def test_open_loop_gradient_descent_steers_around_the_central_obstacle():
    # start and goal on opposite sides of obstacle 0: APG on 60 open-loop forces (3 s) must find a way round
    env = gym.make("DiffGym/PointNav2D-v0")
    env.reset(seed=0)
    sim = env.unwrapped
    start = nav_state([[-0.8, -0.6]], [[0.0, 0.0]], [[0.7, 0.7]])
    actions = torch.full((60, 1, 2), 0.5).requires_grad_(True)
    optimiser = torch.optim.Adam([actions], lr=0.05)

    def episode() -> tuple[torch.Tensor, list[PointNav2DState]]:
        s, total, states = start, 0, []
        for a in actions:
            out = sim.differentiable_step(s, a)
            total, s = total + out.reward.sum(), out.state
            states.append(s.detach())
        return total, states

    before = float(episode()[0].detach())
    for _ in range(30):
        optimiser.zero_grad()
        (-episode()[0]).backward()
        optimiser.step()
    after, states = episode()
    assert float(after.detach()) > before + 0.2 * abs(before)
    assert float((states[-1].pos - start.goal).norm()) < 0.1  # reached the goal, so it went round
    assert max_penetration(states) < 0.03


@pytest.mark.slow
def test_apg_trains_a_policy_through_full_episodes():
    # backpropagating 200-step returns through the simulator: 60 updates of 64 episodes lift a random
    # MLP policy from about -655 to about -245 (zero actions score -780; the scripted controller -203)
    torch.manual_seed(0)
    sim = PointNav2D()
    policy = torch.nn.Sequential(torch.nn.Linear(sim.obs_dim, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                 torch.nn.Tanh(), torch.nn.Linear(64, 2), torch.nn.Tanh())
    optimiser = torch.optim.Adam(policy.parameters(), lr=3e-3)

    def mean_return(seeds: torch.Tensor) -> torch.Tensor:
        state = sim.reset(seeds, torch.zeros_like(seeds))
        obs, total = sim.observe(state), 0
        for _ in range(200):
            out = sim.step(state, policy(obs))
            state, obs, total = out.state, out.obs, total + out.reward.mean()
        return total

    held_out = torch.arange(128, dtype=torch.int32) + 10_000
    with torch.no_grad():
        before = float(mean_return(held_out))
    for _ in range(60):
        optimiser.zero_grad()
        (-mean_return(torch.randint(0, 2**30, (64,), dtype=torch.int32)) / 200).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimiser.step()
    with torch.no_grad():
        after = float(mean_return(held_out))
    assert before < -500 and after > -300
