"""PointMass1D: dynamics against the closed form, success, and gradients against finite differences."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from diffgym.envs.point_mass_1d import PointMass1D, PointMass1DState
from diffgym.testing import check_directional, check_entrywise


def random_state(batch: int, seed: int) -> PointMass1DState:
    g = torch.Generator().manual_seed(seed)
    u = lambda: torch.rand(batch, generator=g) * 2 - 1  # noqa: E731
    return PointMass1DState(x=u(), v=u(), goal=u(), step=torch.zeros(batch, dtype=torch.int32))


def random_actions(steps: int, batch: int, seed: int) -> torch.Tensor:
    # stay inside (-1, 1) so +-eps never crosses the clip
    return (torch.rand(steps, batch, 1, generator=torch.Generator().manual_seed(seed)) * 1.8 - 0.9)


def test_semi_implicit_euler_and_reward_match_closed_form():
    sim = PointMass1D()
    state = random_state(16, seed=0)
    action = random_actions(1, 16, seed=1)[0]
    out = sim.step(state, action)
    a = action[:, 0]
    v = state.v + a * 0.05
    x = state.x + v * 0.05
    torch.testing.assert_close(out.state.v, v)
    torch.testing.assert_close(out.state.x, x)
    torch.testing.assert_close(out.reward, -(x - state.goal) ** 2 - 0.01 * a**2)
    torch.testing.assert_close(out.obs, torch.stack([x, v, state.goal], dim=1))
    assert torch.equal(out.state.step, torch.ones(16, dtype=torch.int32))
    assert not out.terminated.any() and not out.truncated.any()


def test_success_and_truncation():
    sim = PointMass1D(max_episode_steps=3)
    state = PointMass1DState(x=torch.tensor([0.5, 0.5, 0.5]), v=torch.tensor([0.0, 0.5, 0.0]),
                             goal=torch.tensor([0.52, 0.52, 0.9]), step=torch.tensor([2, 0, 0], dtype=torch.int32))
    out = sim.step(state, torch.zeros(3, 1))
    assert out.success.tolist() == [True, False, False]  # moving too fast; too far
    assert out.truncated.tolist() == [True, False, False]


def test_reset_distribution():
    sim = PointMass1D()
    n = 4096
    state = sim.reset(torch.arange(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32))
    for field in (state.x, state.goal):
        assert field.min() >= -1 and field.max() <= 1
        assert abs(float(field.mean())) < 0.05 and abs(float(field.var()) - 1 / 3) < 0.03
    assert torch.all(state.v == 0) and torch.all(state.step == 0)
    assert abs(float(torch.corrcoef(torch.stack([state.x, state.goal]))[0, 1])) < 0.05


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_step_gradients_match_finite_differences(seed):
    sim = PointMass1D()
    check = check_entrywise(sim, random_state(4, seed), random_actions(1, 4, seed + 10), eps=1e-2)
    check.assert_close(rtol=1e-2, atol=2e-3)


def test_fifty_chained_steps_gradients_match_finite_differences():
    sim = PointMass1D()
    state, actions = random_state(2, 3), random_actions(50, 2, 4)
    check_directional(sim, state, actions, eps=1e-2, directions=8).assert_close(rtol=2e-2, atol=5e-3)
    # entry-wise on the first actions too: the earliest action has the longest chain
    entry = check_entrywise(sim, state[0], actions[:, :1], eps=1e-2)
    entry.assert_close(rtol=2e-2, atol=5e-3)


def test_chained_gradient_equals_analytic_value():
    # d/da_0 of x_H for H steps of a constant-goal rollout is sum_{k=1..H} dt^2 = H dt^2 (linear dynamics)
    sim = PointMass1D()
    state = random_state(1, 5)
    actions = torch.zeros(50, 1, 1, requires_grad=True)
    s = state
    for a in actions:
        s = sim.step(s, a).state
    s.x.sum().backward()
    expected = torch.tensor([(50 - k) * 0.05**2 for k in range(50)])
    torch.testing.assert_close(actions.grad[:, 0, 0], expected)


def test_open_loop_optimisation_reduces_cost():
    env = gym.make("DiffGym/PointMass1D-v0")
    env.reset(seed=1)  # starts 0.65 m from the goal
    sim = env.unwrapped
    start = sim.get_state()
    actions = torch.zeros(100, 1, 1, requires_grad=True)
    opt = torch.optim.Adam([actions], lr=0.1)

    def ret():
        s, total = start, 0
        for a in actions:
            out = sim.differentiable_step(s, a)
            total, s = total + out.reward.sum(), out.state
        return total

    before = float(ret())
    for _ in range(20):
        opt.zero_grad()
        (-ret()).backward()
        opt.step()
    assert float(ret()) > 0.5 * before  # the cost (negative return) at least halves
