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


# ------------------------------------------------------------------- the per-env, differentiable mass
def mass_return(sim: PointMass1D, state: PointMass1DState, actions: torch.Tensor,
                mass: torch.Tensor) -> torch.Tensor:
    """Each env's summed reward over ``len(actions)`` chained steps with per-env ``mass``."""
    ret = torch.zeros(state.batch_size)
    for action in actions:
        out = sim.step(state, action, physics={"mass": mass})
        state, ret = out.state, ret + out.reward
    return ret


@pytest.mark.parametrize("steps", [1, 20])
def test_mass_gradient_matches_central_finite_differences(steps):
    sim = PointMass1D()
    state, actions = random_state(6, seed=7), random_actions(steps, 6, seed=8)
    mass = torch.tensor([0.5, 0.8, 1.0, 1.3, 1.7, 2.5], requires_grad=True)
    mass_return(sim, state, actions, mass).sum().backward()
    # envs are independent, so one central difference of every mass at once gives each env's derivative
    eps = 1e-2
    with torch.no_grad():
        numeric = (mass_return(sim, state, actions, mass + eps)
                   - mass_return(sim, state, actions, mass - eps)) / (2 * eps)
    # float32 round-off in the difference is ~2e-6 here, the derivatives 4e-5 to 0.25: atol is far below
    # them, so a zero or partial gradient (e.g. a kernel reading the shared default mass) fails
    torch.testing.assert_close(mass.grad, numeric, rtol=1e-2, atol=5e-6)


def test_per_env_mass_follows_the_closed_form_and_default_is_bit_identical():
    sim = PointMass1D()
    state, action = random_state(4, seed=0), random_actions(1, 4, seed=1)[0]
    mass = torch.tensor([0.5, 1.0, 2.0, 4.0])
    out = sim.step(state, action, physics={"mass": mass})
    torch.testing.assert_close(out.state.v, state.v + action[:, 0] / mass * 0.05)
    # no physics, an empty mapping and the constructor's value given explicitly are the same launch
    reference = sim.step(state, action)
    for physics in ({}, {"mass": torch.ones(4)}, {"mass": None}):
        other = sim.step(state, action, physics=physics)
        assert all(torch.equal(a, b) for a, b in zip(reference.state.tensors(), other.state.tensors()))
        assert torch.equal(reference.obs, other.obs) and torch.equal(reference.reward, other.reward)
    assert torch.equal(out.state.v[1], reference.state.v[1])
    # the constructor's mass is the default
    heavy = PointMass1D(mass=2.0).step(state, action)
    assert torch.equal(heavy.state.v, sim.step(state, action, physics={"mass": torch.full((4,), 2.0)}).state.v)
    assert torch.equal(sim.default_physics(3)["mass"], torch.ones(3))


@pytest.mark.parametrize("physics, error, message", [
    ({"mas": torch.ones(2)}, ValueError, r"physics names \['mas'\] are not physical parameters of PointMass1D; "
                                         r"expected names in \('mass',\)"),
    ({"mass": torch.ones(3)}, ValueError, r"physics\['mass'\] must be a torch.float32 tensor of shape \(2,\) on cpu, "
                                          r"got shape \(3,\)"),
    ({"mass": torch.ones(2, dtype=torch.float64)}, ValueError, r"got shape \(2,\), dtype torch.float64"),
    ({"mass": np.ones(2, np.float32)}, TypeError, r"physics\['mass'\] must be a torch.float32 tensor"),
    ({"mass": torch.tensor([1.0, 0.0])}, ValueError, r"physics\['mass'\] must be finite and lie in \[0.001, 1000\], "
                                                     r"got 0.0 in env 1"),
    ({"mass": torch.tensor([float("nan"), 1.0])}, ValueError, r"got nan in env 0"),
    ([1.0, 1.0], TypeError, r"physics must be a mapping of names in \('mass',\) to tensors, got list"),
])
def test_bad_physics_is_rejected_with_one_line(physics, error, message):
    with pytest.raises(error, match=message):
        PointMass1D().step(random_state(2, seed=0), torch.zeros(2, 1), physics=physics)
    with pytest.raises(ValueError, match=r"mass must lie in \[0.001, 1000\] kg, got -1.0"):
        PointMass1D(mass=-1.0)


@pytest.mark.parametrize("use_fast_path", [True, False])
def test_single_env_reset_option_sets_the_mass_of_later_steps(use_fast_path):
    env = gym.make("DiffGym/PointMass1D-v0").unwrapped
    env.use_fast_path = use_fast_path
    env.reset(seed=0, options={"physics": {"mass": 2.0}})
    assert env.get_physics()["mass"].tolist() == [2.0]
    assert env.get_state().field_names() == ("x", "v", "goal", "step")  # physics is not state
    v0 = float(env.get_state().v[0])
    env.step(np.ones(1, np.float32))
    assert float(env.get_state().v[0]) == np.float32(v0 + np.float32(1.0 / 2.0 * 0.05))
    env.reset()  # no option: the mass stays
    start = env.get_state()
    obs, *_ = env.step(np.ones(1, np.float32))
    expected = env.differentiable_step(start, torch.ones(1, 1), physics=env.get_physics())
    assert np.array_equal(obs, expected.obs[0].numpy())  # bit-identical to the tensor API with that mass
    with pytest.raises(ValueError, match=r"options\['physics'\] names 'friction', which is not a physical "
                                         r"parameter of PointMass1D"):
        env.reset(options={"physics": {"friction": 1.0}})
    with pytest.raises(ValueError, match=r"physics\['mass'\] must be finite and lie in \[0.001, 1000\]"):
        env.reset(options={"physics": {"mass": -2.0}})
    assert env.get_physics()["mass"].tolist() == [2.0]  # a rejected reset changes nothing
    env.reset(options={"physics": {"mass": 1.0}})
    start = env.get_state()
    obs, *_ = env.step(np.ones(1, np.float32))
    assert np.array_equal(obs, env.differentiable_step(start, torch.ones(1, 1)).obs[0].numpy())


def test_single_env_keeps_its_mass_through_pickling():
    import pickle

    env = gym.make("DiffGym/PointMass1D-v0").unwrapped
    env.reset(seed=0, options={"physics": {"mass": 3.0}})
    copy = pickle.loads(pickle.dumps(env))
    assert copy.get_physics()["mass"].tolist() == [3.0]
    a = np.full(1, 0.5, np.float32)
    assert np.array_equal(env.step(a)[0], copy.step(a)[0])


def test_vector_env_reset_option_sets_per_env_masses():
    venv = gym.make_vec("DiffGym/PointMass1D-v0", num_envs=4)
    masses = np.array([0.5, 1.0, 2.0, 4.0], np.float32)
    venv.reset(seed=0, options={"physics": {"mass": masses}})
    assert np.array_equal(venv.get_physics()["mass"].numpy(), masses)
    start = venv.get_state()
    venv.step(np.ones((4, 1), np.float32))
    expected = start.v + torch.ones(4) / torch.from_numpy(masses) * 0.05
    assert torch.equal(venv.get_state().v, expected)
    # under a reset_mask only the reset envs take the new values; a tensor works as well as an array
    mask = np.array([True, False, False, True])
    venv.reset(options={"reset_mask": mask, "physics": {"mass": torch.full((4,), 3.0)}})
    assert venv.get_physics()["mass"].tolist() == [3.0, 1.0, 2.0, 3.0]
    # the masses hold through autoresets, and the vector env steps what differentiable_step computes
    autoresetting, autoresets = np.zeros(4, bool), 0
    for _ in range(120):
        start = venv.get_state()
        _, reward, _, truncated, _ = venv.step(np.full((4, 1), 0.3, np.float32))
        out = venv.differentiable_step(start, torch.full((4, 1), 0.3), physics=venv.get_physics())
        stepped = ~autoresetting  # NEXT_STEP: an env truncated last step was reset instead of stepped
        assert np.array_equal(reward[stepped], out.reward.numpy()[stepped])
        autoresets += int(autoresetting.sum())
        autoresetting = truncated
    assert autoresets == 4  # every env went through one autoreset (horizon 100)
    assert venv.get_physics()["mass"].tolist() == [3.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=r"options\['physics'\]\['mass'\] must be a number or have shape \(4,\), "
                                         r"got shape \(3,\)"):
        venv.reset(options={"physics": {"mass": [1.0, 2.0, 3.0]}})
