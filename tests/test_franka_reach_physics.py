"""FrankaReach's per-env, differentiable `velocity_gain` (issue 28): gradients against central finite
differences through free and joint-limited steps, the default left bit for bit as it was, the range
check, and the envs' reset option."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from diffgym.envs.franka_reach import READY_POSE, FrankaReach, FrankaReachState

LOWER = torch.as_tensor(FrankaReach.joint_lower)
UPPER = torch.as_tensor(FrankaReach.joint_upper)
STEPS = 12
GAINS = torch.tensor([0.5, 1.0, 1.8, 1.0, 1.3, 0.7])
FREE_ENVS, LIMITED_ENVS = (0, 1, 2), (3, 4, 5)


def limit_scenario() -> tuple[FrankaReachState, torch.Tensor]:
    """Six envs near the ready pose with random actions (|a| <= 0.6): envs 0-2 stay clear of every joint
    limit; env 3 starts with joint 4 at its upper limit and pushes into it at every step, env 4 drives
    joint 1 into its upper limit in the second step and holds it there, env 5 drives joint 6 into its
    lower limit in the first step, pushes on for five steps and then backs away from it."""
    g = torch.Generator().manual_seed(0)
    q = torch.tensor([READY_POSE] * 6) + (torch.rand(6, 7, generator=g) * 2 - 1) * 0.1
    actions = (torch.rand(STEPS, 6, 7, generator=g) * 2 - 1) * 0.6
    q[3, 3], actions[:, 3, 3] = UPPER[3], 1.0
    q[4, 0], actions[:, 4, 0] = UPPER[0] - 0.1, 1.0
    q[5, 5], actions[:6, 5, 5], actions[6:, 5, 5] = LOWER[5] + 0.05, -1.0, 1.0
    goal = torch.tensor([0.5, 0.0, 0.3]) + (torch.rand(6, 3, generator=g) * 2 - 1) * 0.2
    return FrankaReachState(q=q, goal=goal, step=torch.zeros(6, dtype=torch.int32)), actions


def chained_return(sim: FrankaReach, state: FrankaReachState, actions: torch.Tensor, gain: torch.Tensor):
    """Each env's summed reward over the chained steps, and the joint positions after every step."""
    total, positions = torch.zeros(len(gain)), []
    for action in actions:
        out = sim.step(state, action, physics={"velocity_gain": gain})
        total, state = total + out.reward, out.state
        positions.append(out.state.q.detach())
    return total, torch.stack(positions)


def test_velocity_gain_gradient_matches_central_finite_differences_with_and_without_limits():
    sim = FrankaReach()
    state, actions = limit_scenario()
    gain = GAINS.clone().requires_grad_(True)
    total, positions = chained_return(sim, state, actions, gain)
    total.sum().backward()
    # the scenario does what it says: the limited envs sit at a limit at some step, the free ones never
    at_limit = ((positions == UPPER) | (positions == LOWER)).any(dim=2).any(dim=0)
    assert at_limit.tolist() == [False, False, False, True, True, True]
    assert (positions[:, 5, 5] > LOWER[5]).tolist() == [False] * 6 + [True] * 6  # env 5 leaves its limit
    # envs are independent, so one central difference of every gain at once gives each env's derivative;
    # dividing by the float32 spacing actually taken keeps the representation error out of it. At 1e-2 the
    # float32 rounding of the returns stays below 1e-3 of the derivatives (it reaches 2 % at 1e-3), and no
    # joint crosses a limit between the two runs (the closest is 0.015 rad from one, the shift < 1e-3 rad)
    eps = 1e-2
    with torch.no_grad():
        up, down = GAINS + eps, GAINS - eps
        numeric = (chained_return(sim, state, actions, up)[0] - chained_return(sim, state, actions, down)[0]) / (up - down)
    torch.testing.assert_close(gain.grad, numeric, rtol=1e-2, atol=1e-4)
    assert (gain.grad.abs() > 1e-2).all()  # every env's return depends on its gain, limited ones included
    # the fused rollout gives the same gradient, bit for bit
    fused_gain = GAINS.clone().requires_grad_(True)
    sim.rollout(state, actions, physics={"velocity_gain": fused_gain}).reward.sum().backward()
    assert torch.equal(fused_gain.grad, gain.grad)


def test_a_joint_held_at_its_limit_takes_no_gradient_from_the_gain():
    sim = FrankaReach()
    state, actions = limit_scenario()
    gain = GAINS.clone().requires_grad_(True)
    out = sim.step(state, actions[0], physics={"velocity_gain": gain})
    (grad,) = torch.autograd.grad(out.state.q[3, 3] + out.state.q[0, 3], gain)
    # env 3's joint 4 was pushed beyond its limit and clamped: no gradient; env 0's moved freely: a*v*dt
    assert grad[3] == 0
    torch.testing.assert_close(grad[0], actions[0, 0, 3] * float(sim.params.max_speed[3]) * sim.dt)


def test_per_env_gain_scales_the_commanded_velocity_and_default_is_bit_identical():
    sim = FrankaReach()
    state, actions = limit_scenario()
    out = sim.step(state, actions[0], physics={"velocity_gain": GAINS})
    speed = torch.tensor([float(sim.params.max_speed[k]) for k in range(7)])
    expected = torch.clamp(state.q + GAINS[:, None] * actions[0] * speed * sim.dt, LOWER, UPPER)
    torch.testing.assert_close(out.state.q, expected)
    # gain 1 (the default) multiplies the commanded velocity by exactly one: same bits, same gradients
    results = []
    for physics in (None, {"velocity_gain": torch.ones(6)}, {"velocity_gain": None}):
        action = actions[0].clone().requires_grad_(True)
        out = sim.step(state, action, physics=physics)
        (grad,) = torch.autograd.grad(out.reward.sum() + out.obs.sum(), action)
        results.append((out.obs, out.reward, out.state.q, grad))
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], result))
    # the constructor's gain is the default every env uses
    fast = FrankaReach(velocity_gain=1.5).step(state, actions[0])
    assert torch.equal(fast.obs, sim.step(state, actions[0], physics={"velocity_gain": torch.full((6,), 1.5)}).obs)
    assert torch.equal(sim.default_physics(3)["velocity_gain"], torch.ones(3))


def test_out_of_range_gains_are_refused_in_one_line():
    state, actions = limit_scenario()
    with pytest.raises(ValueError, match=r"^physics\['velocity_gain'\] must be finite and lie in \[0.1, 2\], "
                                         r"got 2.5 in env 4$"):
        FrankaReach().step(state, actions[0], physics={"velocity_gain": torch.tensor([1.0] * 4 + [2.5, 1.0])})
    with pytest.raises(ValueError, match=r"got 0.0 in env 0"):
        FrankaReach().step(state, actions[0], physics={"velocity_gain": torch.zeros(6)})
    with pytest.raises(ValueError, match=r"^velocity_gain must lie in \[0.1, 2\], got 0.05$"):
        FrankaReach(velocity_gain=0.05)
    env = gym.make("DiffGym/FrankaReach-v0").unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"^physics\['velocity_gain'\] must be finite and lie in \[0.1, 2\], "
                                         r"got nan in env 0$"):
        env.reset(options={"physics": {"velocity_gain": float("nan")}})
    assert env.get_physics()["velocity_gain"].tolist() == [1.0]  # a refused reset changes nothing


@pytest.mark.parametrize("use_fast_path", [True, False])
def test_single_env_reset_option_sets_the_gain_of_later_steps(use_fast_path):
    env = gym.make("DiffGym/FrankaReach-v0").unwrapped
    env.use_fast_path = use_fast_path
    action = np.full(7, 0.5, np.float32)
    env.reset(seed=0, options={"physics": {"velocity_gain": 0.4}})
    for _ in range(2):  # the gain holds through a reset without the option
        start = env.get_state()
        obs, reward, *_ = env.step(action)
        expected = env.differentiable_step(start, torch.from_numpy(action)[None],
                                           physics={"velocity_gain": torch.tensor([0.4])})
        assert np.array_equal(obs, expected.obs[0].numpy()) and reward == float(expected.reward[0])
        moved = obs[:7] - start.q[0].numpy()
        np.testing.assert_allclose(moved, 0.4 * 0.5 * env.sim.velocity_scale * env.sim.velocity_limits * 0.05,
                                   rtol=1e-4)
        env.reset()


def test_vector_env_reset_option_sets_per_env_gains():
    venv = gym.make_vec("DiffGym/FrankaReach-v0", num_envs=3)
    gains = np.array([0.5, 1.0, 2.0], np.float32)
    venv.reset(seed=0, options={"physics": {"velocity_gain": gains}})
    assert np.array_equal(venv.get_physics()["velocity_gain"].numpy(), gains)
    action = np.full((3, 7), 0.5, np.float32)
    start = venv.get_state()
    obs, reward, *_ = venv.step(action)
    moved = obs[:, :7] - start.q.numpy()
    np.testing.assert_allclose(moved, gains[:, None] * 0.5 * 0.5 * FrankaReach.velocity_limits * 0.05, rtol=1e-4)
    expected = venv.differentiable_step(start, torch.from_numpy(action), physics=venv.get_physics())
    assert np.array_equal(obs, expected.obs.numpy()) and np.array_equal(reward, expected.reward.numpy())
    venv.reset(options={"reset_mask": np.array([False, True, False]), "physics": {"velocity_gain": 1.5}})
    assert venv.get_physics()["velocity_gain"].tolist() == [0.5, 1.5, 2.0]
