"""Fused rollouts (``DiffSim.rollout`` / ``differentiable_rollout``): the same numbers and gradients as
``differentiable_step`` in a loop, for every kernel task, and clear errors for bad input."""

import dataclasses

import gymnasium as gym
import pytest
import torch

import diffgym
from diffgym.core.bridge import debug_outputs

TASKS = diffgym.TASK_IDS


def looped(venv, state, actions, physics=None):
    """The reference: ``differentiable_step`` T times, outputs stacked time-major."""
    steps = []
    for action in actions:
        out = venv.differentiable_step(state, action, physics)
        steps.append(out)
        state = out.state
    stack = lambda name: torch.stack([getattr(out, name) for out in steps])  # noqa: E731
    states = [torch.stack([out.state.tensors()[i] for out in steps]) for i in range(len(state.tensors()))]
    return states, {name: stack(name) for name in ("obs", "reward", "terminated", "truncated", "success")}


def differentiable_start(venv):
    """The env's start state with every float field a leaf that requires grad."""
    state = venv.get_state()
    return state.map(lambda t: t.clone().requires_grad_(True) if t.is_floating_point() else t.clone())


@pytest.mark.parametrize("env_id", TASKS)
def test_rollout_equals_the_stepped_loop_with_the_same_gradients(env_id):
    venv = gym.make_vec(env_id, num_envs=3)
    try:
        venv.reset(seed=5)
        generator = torch.Generator().manual_seed(0)
        # beyond [-1, 1] on purpose: the clip (zero gradient outside) must act as in step
        actions = (1.5 * torch.randn(9, 3, venv.sim.act_dim, generator=generator)).requires_grad_(True)
        start = differentiable_start(venv)
        states, ref = looped(venv, start, actions)
        fused = venv.differentiable_rollout(start, actions)
        for name, ours, theirs in zip(start.field_names(), fused.states.tensors(), states):
            assert torch.equal(ours, theirs), name
        for name in ref:
            assert torch.equal(getattr(fused, name), ref[name]), name
        assert fused.horizon == 9 and torch.equal(fused.final_state.step, states[-1][-1])

        # one scalar of every differentiable output, with random weights
        def objective(obs, reward, state_fields):
            gen = torch.Generator().manual_seed(1)
            total = (obs * torch.randn(obs.shape, generator=gen)).sum() + (reward * torch.randn(reward.shape, generator=gen)).sum()
            for field in state_fields:
                if field.is_floating_point():
                    total = total + (field * torch.randn(field.shape, generator=gen)).sum()
            return total

        leaves = [actions, *(t for t in start.tensors() if t.is_floating_point())]
        want = torch.autograd.grad(objective(ref["obs"], ref["reward"], states), leaves)
        got = torch.autograd.grad(objective(fused.obs, fused.reward, fused.states.tensors()), leaves)
        for g, w in zip(got, want):
            assert torch.equal(g, w)  # bit for bit: the same adjoint launches, summed in the same order
        assert any(bool(g.abs().sum() > 0) for g in got)
    finally:
        venv.close()


def test_physical_parameter_gradients_match_the_loop():
    venv = gym.make_vec("DiffGym/PointMass1D-v0", num_envs=4)
    venv.reset(seed=2)
    mass = torch.tensor([0.5, 1.0, 1.7, 3.0], requires_grad=True)
    actions = torch.rand(20, 4, 1, generator=torch.Generator().manual_seed(3)) * 2 - 1
    _, ref = looped(venv, venv.get_state(), actions, {"mass": mass})
    (want,) = torch.autograd.grad(ref["reward"].sum(), mass)
    fused = venv.differentiable_rollout(venv.get_state(), actions, {"mass": mass})
    (got,) = torch.autograd.grad(fused.reward.sum(), mass)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)  # summed over steps in another order
    assert bool((got != 0).all())


def test_gradients_of_two_rollouts_sharing_a_plan_do_not_interfere():
    """Two rollouts of the same shape share one launch plan; back-propagating them in reverse order gives
    each its own gradient."""
    venv = gym.make_vec("DiffGym/PointNav2D-v0", num_envs=2)
    venv.reset(seed=0)
    a1 = torch.full((6, 2, 2), 0.3, requires_grad=True)
    a2 = torch.full((6, 2, 2), -0.7, requires_grad=True)
    r1 = venv.differentiable_rollout(venv.get_state(), a1).reward.sum()
    r2 = venv.differentiable_rollout(venv.get_state(), a2).reward.sum()
    (g2,) = torch.autograd.grad(r2, a2)
    (g1,) = torch.autograd.grad(r1, a1)
    _, ref1 = looped(venv, venv.get_state(), a1)
    _, ref2 = looped(venv, venv.get_state(), a2)
    assert torch.equal(g1, torch.autograd.grad(ref1["reward"].sum(), a1)[0])
    assert torch.equal(g2, torch.autograd.grad(ref2["reward"].sum(), a2)[0])


def test_rollout_without_gradients_and_past_the_horizon():
    """Under no_grad the forward alone runs (same numbers); a rollout never resets: past the horizon the
    step count keeps rising and every such step is flagged truncated."""
    venv = gym.make_vec("DiffGym/PointMass1D-v0", num_envs=2, max_episode_steps=5)
    venv.reset(seed=1)
    actions = torch.full((8, 2, 1), 0.25)
    with torch.no_grad():
        fused = venv.differentiable_rollout(venv.get_state(), actions)
    _, ref = looped(venv, venv.get_state(), actions)
    assert torch.equal(fused.reward, ref["reward"]) and not fused.reward.requires_grad
    assert fused.states.step[:, 0].tolist() == list(range(1, 9))
    assert fused.truncated[:, 0].tolist() == [False] * 4 + [True] * 4


def test_rollout_state_history_is_frozen_and_per_step():
    venv = gym.make_vec("DiffGym/PointMass1D-v0", num_envs=2)
    venv.reset(seed=1)
    fused = venv.differentiable_rollout(venv.get_state(), torch.zeros(3, 2, 1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        fused.reward = fused.reward  # type: ignore[misc]
    assert fused.state_at(1).batch_size == 2 and torch.equal(fused.state_at(-1).step, fused.final_state.step)
    assert (fused.horizon, fused.batch_size) == (3, 2)


def test_rollout_raises_where_the_stepped_loop_would():
    """A state a later step would start from that leaves the task's domain is the stepped loop's one-line
    ValueError (naming the step), not silently stepped on; the final state is not checked (as in the loop)."""
    venv = gym.make_vec("DiffGym/PointMass1D-v0", num_envs=2)
    venv.reset(seed=0)
    start = venv.get_state()
    bound = venv.sim.state_bounds["x"]  # 1e9 m: from 0.9999e9 m at 0.9e9 m/s one step leaves it
    far = start.replace(x=torch.full_like(start.x, 0.9999 * bound), v=torch.full_like(start.v, 0.9 * bound))
    with pytest.raises(ValueError) as loop_error:
        looped(venv, far, torch.ones(3, 2, 1))
    with pytest.raises(ValueError, match=r"rollout step 2 of 3 would start from an invalid state: ") as error:
        venv.differentiable_rollout(far, torch.ones(3, 2, 1))
    assert str(loop_error.value) in str(error.value) and "\n" not in str(error.value)
    venv.differentiable_rollout(far, torch.ones(1, 2, 1))  # one step: only its start is checked


def test_double_backward_raises_instead_of_returning_zeros():
    venv = gym.make_vec("DiffGym/PointMass1D-v0", num_envs=2)
    venv.reset(seed=0)
    actions = torch.zeros(4, 2, 1, requires_grad=True)
    (grad,) = torch.autograd.grad(venv.differentiable_rollout(venv.get_state(), actions).reward.sum(), actions,
                                  create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad.sum().backward()


@pytest.mark.parametrize("actions, message", [
    (torch.zeros(4, 3, 1), r"actions must be a torch.float32 tensor of shape \(T, 2, 1\)"),
    (torch.zeros(2, 1), r"actions must be a torch.float32 tensor of shape \(T, 2, 1\)"),
    (torch.zeros(0, 2, 1), r"with T >= 1, got shape \(0, 2, 1\)"),
    (torch.zeros(4, 2, 1, dtype=torch.float64), "got dtype torch.float64"),
    (torch.tensor([[[0.0], [float("nan")]]]), r"NaN or Inf at \(step, env, dim\) \[\(0, 1, 0\)\]"),
])
def test_bad_action_sequences_are_one_line_errors(actions, message):
    venv = gym.make_vec("DiffGym/PointMass1D-v0", num_envs=2)
    venv.reset(seed=0)
    with pytest.raises(ValueError, match=message) as error:
        venv.differentiable_rollout(venv.get_state(), actions)
    assert "\n" not in str(error.value)
    with pytest.raises(TypeError, match="actions must be"):
        venv.differentiable_rollout(venv.get_state(), [[0.0]])
    venv.step(torch.zeros(2, 1).numpy())  # the env is still usable


def test_debug_outputs_mode_runs_every_step():
    """In the bridge's debug mode a rollout's outputs start as sentinels and every step's are checked
    (a kernel leaving one unwritten: tests/test_task_contract.py); a correct task passes."""
    venv = gym.make_vec("DiffGym/TPush-v1", num_envs=2)
    venv.reset(seed=0)
    with debug_outputs():
        fused = venv.differentiable_rollout(venv.get_state(), torch.zeros(3, 2, 2))
    assert bool(torch.isfinite(fused.obs).all()) and bool(torch.isfinite(fused.states.block_pos).all())


def test_a_task_with_its_own_step_is_rolled_out_step_by_step():
    """A task whose ``_step`` is not the single kernel launch (a Newton task runs a solver) gets the same
    API by looping its own ``_step``: same outputs and gradients as the fused path of the kernel it wraps."""
    from diffgym.envs.point_mass_1d import PointMass1D

    calls = []

    class CountingPointMass(PointMass1D):
        def _step(self, state, action, physics=None):
            calls.append(1)
            return super()._step(state, action, physics)

    plain, counting = PointMass1D(), CountingPointMass()
    start = plain.reset(torch.arange(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))
    actions = torch.linspace(-1.2, 1.2, 21).reshape(7, 3, 1).requires_grad_(True)
    fused, looped_out = plain.rollout(start, actions), counting.rollout(start, actions)
    assert len(calls) == 7
    for a, b in zip(fused.states.tensors(), looped_out.states.tensors()):
        assert torch.equal(a, b)
    assert torch.equal(fused.obs, looped_out.obs) and torch.equal(fused.truncated, looped_out.truncated)
    (g_fused,) = torch.autograd.grad(fused.reward.sum(), actions)
    (g_looped,) = torch.autograd.grad(looped_out.reward.sum(), actions)
    torch.testing.assert_close(g_fused, g_looped, rtol=1e-6, atol=1e-7)
