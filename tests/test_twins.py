"""The peer benchmark's twins (benchmarks/twins.py) follow DiffGym's dynamics: rewards, final states and
action gradients of a short rollout agree to float32 tolerance, so `make bench-peers` compares
implementations of the same model and a change to a task's equations cannot leave the twins behind."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from benchmarks.twins import JaxTwin, TorchTwin, constants_for, start_state

TASKS = ("DiffGym/PointMass1D-v0", "DiffGym/FrankaReach-v0")
STEPS, ENVS = 6, 5


def diffgym_rollout(env_id: str):
    """DiffGym's per-step rewards, final state and d(sum of rewards)/d(actions) from a seeded start."""
    venv = gym.make_vec(env_id, num_envs=ENVS)
    venv.reset(seed=3)
    start = venv.get_state()
    sim = venv.unwrapped.sim if hasattr(venv.unwrapped, "sim") else venv.sim
    # actions beyond [-1, 1] too, so the clip (and its zero gradient outside) is part of the comparison
    actions = torch.empty(STEPS, ENVS, venv.single_action_space.shape[0]).uniform_(
        -1.3, 1.3, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    state, rewards = start, []
    for a in actions:
        out = venv.differentiable_step(state, a)
        state = out.state
        rewards.append(out.reward)
    rewards = torch.stack(rewards)
    rewards.sum().backward()
    return sim, start, actions.detach(), rewards.detach(), tuple(t.detach() for t in start_state(state)), actions.grad


@pytest.mark.parametrize("env_id", TASKS)
def test_torch_twin_matches_diffgym(env_id):
    sim, start, actions, rewards, final, grad = diffgym_rollout(env_id)
    twin = TorchTwin(constants_for(sim))
    leaf = actions.clone().requires_grad_(True)
    twin_rewards, twin_final = twin.rollout(tuple(t.clone() for t in start_state(start)), leaf)
    twin_rewards.sum().backward()
    torch.testing.assert_close(twin_rewards, rewards, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(twin_final, final):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaf.grad, grad, rtol=1e-4, atol=1e-5)
    assert grad.abs().sum() > 0 and (grad == 0).any()  # gradients flow, and the clip cuts some of them


@pytest.mark.parametrize("env_id", TASKS)
def test_jax_twin_matches_diffgym(env_id):
    pytest.importorskip("jax", reason="JAX twin: jax is installed only in the peer venv (make bench-peers)")
    sim, start, actions, rewards, final, grad = diffgym_rollout(env_id)
    twin = JaxTwin(constants_for(sim))
    state = tuple(twin.put(t) for t in start_state(start))
    twin_rewards, twin_final = twin.rollout(state, twin.put(actions))
    np.testing.assert_allclose(np.asarray(twin_rewards), rewards.numpy(), rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(twin_final, final):
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(twin.grad(state, twin.put(actions))), grad.numpy(), rtol=1e-4, atol=1e-5)
