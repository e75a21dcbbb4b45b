"""FrankaReach: FK values and Jacobian, dynamics and spec, and gradients against finite differences.
(The generic contract suite, both check_envs included, runs on this task from tests/test_contract.py.)"""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from diffgym.envs.franka_reach import FR3, GOAL_HIGH, GOAL_LOW, READY_POSE, FrankaReach, FrankaReachState
from diffgym.testing import check_directional, check_entrywise

LOWER = torch.as_tensor(FrankaReach.joint_lower)
UPPER = torch.as_tensor(FrankaReach.joint_upper)


def interior_q(batch: int, seed: int, margin: float = 0.3) -> torch.Tensor:
    """Configurations at least ``margin`` rad inside every joint limit."""
    g = torch.Generator().manual_seed(seed)
    return LOWER + margin + torch.rand(batch, 7, generator=g) * (UPPER - LOWER - 2 * margin)


def random_state(batch: int, seed: int) -> FrankaReachState:
    g = torch.Generator().manual_seed(seed + 100)
    goal = torch.as_tensor(GOAL_LOW) + torch.rand(batch, 3, generator=g) * (
        torch.as_tensor(GOAL_HIGH) - torch.as_tensor(GOAL_LOW))
    return FrankaReachState(q=interior_q(batch, seed), goal=goal, step=torch.zeros(batch, dtype=torch.int32))


def random_actions(steps: int, batch: int, seed: int, scale: float = 0.9) -> torch.Tensor:
    return (torch.rand(steps, batch, 7, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * scale


def test_forward_kinematics_at_the_ready_pose():
    env = gym.make("DiffGym/FrankaReach-v0")
    tcp = env.unwrapped.forward_kinematics(torch.tensor([READY_POSE], dtype=torch.float32))
    # Panda/FR3 ready pose: flange 0.5903 m high, the hand pointing down, TCP 0.1034 m below it
    torch.testing.assert_close(tcp, torch.tensor([[0.30689, 0.0, 0.48688]]), atol=2e-5, rtol=0)
    zero = env.unwrapped.forward_kinematics(torch.zeros(1, 7))  # straight up (outside joint 4's limits)
    torch.testing.assert_close(zero, torch.tensor([[0.088, 0.0, 0.333 + 0.316 + 0.384 - 0.107 - 0.1034]]),
                               atol=1e-6, rtol=0)


def test_forward_kinematics_jacobian_matches_finite_differences_and_geometry():
    sim = FrankaReach()
    q = interior_q(6, seed=0)
    jacobian = torch.autograd.functional.jacobian(sim.forward_kinematics, q)  # (B, 3, B, 7)
    jacobian = torch.stack([jacobian[b, :, b] for b in range(6)])
    assert torch.count_nonzero(jacobian.sum(0)) > 15
    eps = 1e-3
    numeric = torch.stack([(sim.forward_kinematics(q + eps * e) - sim.forward_kinematics(q - eps * e)) / (2 * eps)
                           for e in torch.eye(7)], dim=-1)
    torch.testing.assert_close(jacobian, numeric, atol=2e-4, rtol=1e-3)
    # geometric Jacobian of revolute joints: column k = z_k x (tcp - o_k), from the link frames
    frames = FR3.link_frames(q)[:, :7].double()
    x, y, z, w = frames[..., 3:].unbind(-1)
    axis = torch.stack([2 * (x * z + w * y), 2 * (y * z - w * x), 1 - 2 * (x * x + y * y)], dim=-1)
    tcp = sim.forward_kinematics(q).double()
    geometric = torch.cross(axis, tcp[:, None] - frames[..., :3], dim=-1).transpose(1, 2)
    torch.testing.assert_close(jacobian.double(), geometric, atol=2e-6, rtol=0)


def test_step_dynamics_observation_reward_and_info():
    sim = FrankaReach()
    state = random_state(16, seed=1)
    action = random_actions(1, 16, seed=2, scale=1.0)[0]
    out = sim.step(state, action)
    speed = 0.5 * torch.tensor([2.62, 2.62, 2.62, 2.62, 5.26, 4.18, 5.26])
    q_next = torch.clamp(state.q + action * speed * 0.05, LOWER, UPPER)
    torch.testing.assert_close(out.state.q, q_next)
    tcp = sim.forward_kinematics(q_next)
    torch.testing.assert_close(out.obs, torch.cat([q_next, tcp, state.goal - tcp], dim=1))
    torch.testing.assert_close(out.reward, -(tcp - state.goal).norm(dim=1))
    assert torch.equal(out.state.goal, state.goal) and torch.equal(out.state.step, torch.ones(16, dtype=torch.int32))
    assert not out.terminated.any() and not out.truncated.any()
    info = sim.info(out)
    assert torch.equal(info["distance"], -out.reward) and torch.equal(info["tcp"], out.obs[:, 7:10])
    assert torch.equal(info["goal"], state.goal)


def test_joint_limits_clip_positions_and_gradients():
    sim = FrankaReach()
    state = random_state(1, seed=3)
    q = state.q.clone()
    q[0, 3] = UPPER[3] - 0.01  # joint 4 just below its upper limit, pushed further up
    state = state.replace(q=q)
    action = torch.full((1, 7), 0.5, requires_grad=True)
    out = sim.step(state, action)
    assert out.state.q[0, 3] == UPPER[3]
    (grad,) = torch.autograd.grad(out.reward.sum(), action)
    assert grad[0, 3] == 0 and torch.count_nonzero(grad[0]) == 6  # documented: no gradient beyond a limit


def test_success_uses_distance_threshold_and_truncation():
    sim = FrankaReach(max_episode_steps=3, distance_threshold=0.02)
    q = torch.tensor([READY_POSE] * 3, dtype=torch.float32)
    tcp = sim.forward_kinematics(q)
    goal = tcp + torch.tensor([[0.01, 0, 0], [0.03, 0, 0], [0.0, 0.015, 0]])
    state = FrankaReachState(q=q, goal=goal, step=torch.tensor([0, 0, 2], dtype=torch.int32))
    out = sim.step(state, torch.zeros(3, 7))
    assert out.success.tolist() == [True, False, True]
    assert out.truncated.tolist() == [False, False, True]
    env = gym.make("DiffGym/FrankaReach-v0", distance_threshold=0.02)
    assert env.unwrapped.sim.distance_threshold == 0.02
    with pytest.raises(ValueError, match="distance_threshold must be positive"):
        FrankaReach(distance_threshold=0.0)


def test_reset_distribution():
    sim = FrankaReach()
    n = 4096
    state = sim.reset(torch.arange(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32))
    offset = state.q - torch.tensor(READY_POSE)
    assert offset.abs().max() <= 0.1 + 1e-6 and torch.all(state.q >= LOWER) and torch.all(state.q <= UPPER)
    assert offset.mean(0).abs().max() < 0.005 and (offset.var(0) - 0.01 / 3).abs().max() < 0.0005
    low, high = torch.tensor(GOAL_LOW), torch.tensor(GOAL_HIGH)
    assert torch.all(state.goal >= low) and torch.all(state.goal <= high)
    torch.testing.assert_close(state.goal.mean(0), (low + high) / 2, atol=0.01, rtol=0)
    torch.testing.assert_close(state.goal.var(0), (high - low) ** 2 / 12, atol=0.002, rtol=0)
    assert torch.all(state.step == 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_one_step_gradients_match_finite_differences(seed):
    sim = FrankaReach()
    check = check_entrywise(sim, random_state(2, seed), random_actions(1, 2, seed + 10), eps=1e-2)
    check.assert_close(rtol=1e-2, atol=2e-3)


def test_fifty_chained_steps_gradients_match_finite_differences():
    sim = FrankaReach(velocity_scale=0.1)  # small moves keep +-eps rollouts inside the joint limits
    state, actions = random_state(2, 4), random_actions(50, 2, 5)
    check_directional(sim, state, actions, eps=1e-2, directions=8).assert_close(rtol=2e-2, atol=5e-3)
    entry = check_entrywise(sim, state[0], actions[:2, :1], eps=1e-2)  # the first actions: longest chains
    entry.assert_close(rtol=2e-2, atol=5e-3)


def test_bad_configurations_rejected_with_clear_errors():
    env = gym.make("DiffGym/FrankaReach-v0")
    sim = env.unwrapped
    with pytest.raises(ValueError, match=r"shape \(B, 7\).*got shape \(2, 6\)"):
        sim.forward_kinematics(torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r"got shape \(7,\)"):
        sim.forward_kinematics(torch.zeros(7))
    q = torch.zeros(3, 7)
    q[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf at \(row, joint\) \[\(1, 4\)\]"):
        sim.forward_kinematics(q)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        sim.forward_kinematics(torch.zeros(1, 7, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.float32 tensor"):
        sim.forward_kinematics(np.zeros((1, 7), np.float32))
    with pytest.raises(ValueError, match="device"):
        sim.forward_kinematics(torch.zeros(1, 7, device="meta"))
    env.reset(seed=0)
    state = sim.get_state()
    with pytest.raises(ValueError, match=r"^state\.q must be finite, got \[nan, .* in env 0$"):
        sim.set_state(state.replace(q=state.q.clone().fill_(math.nan)))
    with pytest.raises(ValueError, match=r"state.goal must have shape \(\d+, 3\)"):
        sim.differentiable_step(state.replace(goal=torch.zeros(1, 2)), torch.zeros(1, 7))


def test_scripted_controller_solves_the_task_above_the_reward_threshold():
    """Damped least squares on the differentiable FK: the scripted return the threshold was set from."""
    sim = FrankaReach()
    n = 64
    state = sim.reset(torch.arange(n, dtype=torch.int32) + 1000, torch.zeros(n, dtype=torch.int32))
    speed = torch.as_tensor(sim.velocity_limits) * sim.velocity_scale
    episode_return = torch.zeros(n)
    for _ in range(sim.max_episode_steps):
        q = state.q.clone().requires_grad_(True)
        tcp = sim.forward_kinematics(q)
        jac = torch.stack([torch.autograd.grad(tcp[:, k].sum(), q, retain_graph=True)[0] for k in range(3)], 1)
        error = (state.goal - tcp.detach()).unsqueeze(-1)
        damped = jac @ jac.transpose(1, 2) + 0.05**2 * torch.eye(3)
        qdot = (jac.transpose(1, 2) @ torch.linalg.solve(damped, error * 0.5 / sim.dt)).squeeze(-1)
        out = sim.step(state, (qdot / speed).clamp(-1, 1))
        episode_return += out.reward
        state = out.state
    assert out.success.all()
    assert float(episode_return.mean()) > gym.spec("DiffGym/FrankaReach-v0").reward_threshold + 2.0


def test_open_loop_gradient_descent_reaches_the_goal():
    env = gym.make("DiffGym/FrankaReach-v0")
    env.reset(seed=0)
    sim = env.unwrapped
    start = sim.get_state()
    actions = torch.zeros(20, 1, 7, requires_grad=True)
    opt = torch.optim.Adam([actions], lr=0.1)

    def rollout():
        s, total = start, 0
        for a in actions:
            out = sim.differentiable_step(s, a)
            total, s = total + out.reward.sum(), out.state
        return total, out

    before, _ = rollout()
    for _ in range(40):
        opt.zero_grad()
        (-rollout()[0]).backward()
        opt.step()
    after, out = rollout()
    assert float(after.detach()) > 0.5 * float(before.detach()) and bool(out.success.all())


def test_render_shows_both_views():
    env = gym.make("DiffGym/FrankaReach-v0", render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (240, 484, 3) and frame.dtype == np.uint8
    goal_green = np.all(frame == (40, 170, 60), axis=-1)
    assert goal_green[:, :240].any() and goal_green[:, 244:].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_matches_cpu():
    cpu, gpu = FrankaReach(), FrankaReach(device="cuda")
    state, action = random_state(64, 7), random_actions(1, 64, 8)[0]
    out_cpu = cpu.step(state, action)
    out_gpu = gpu.step(state.to("cuda"), action.cuda())
    torch.testing.assert_close(out_gpu.obs.cpu(), out_cpu.obs, atol=2e-6, rtol=0)
    torch.testing.assert_close(gpu.forward_kinematics(state.q.cuda()).cpu(), cpu.forward_kinematics(state.q),
                               atol=2e-6, rtol=0)
