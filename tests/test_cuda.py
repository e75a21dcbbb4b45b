"""The same code on CUDA: results and gradients agree with the CPU. Skipped without a GPU."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import diffgym
from tests.conftest import requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]


def rollout(env_id: str, device: str, steps: int = 20):
    venv = gym.make_vec(env_id, num_envs=8, device=device)
    venv.reset(seed=0)
    state = venv.get_state()
    actions = torch.linspace(-0.9, 0.9, steps * 8 * venv.single_action_space.shape[0])
    actions = actions.reshape(steps, 8, -1).to(device).requires_grad_(True)
    total = 0
    for a in actions:
        out = venv.differentiable_step(state, a)
        total, state = total + out.reward.sum(), out.state
    total.backward()
    return float(total), actions.grad.cpu(), out.obs.detach().cpu()


@pytest.mark.parametrize("env_id", diffgym.TASK_IDS)
def test_cuda_matches_cpu(env_id):
    cpu_total, cpu_grad, cpu_obs = rollout(env_id, "cpu")
    gpu_total, gpu_grad, gpu_obs = rollout(env_id, "cuda")
    assert gpu_total == pytest.approx(cpu_total, rel=1e-4, abs=1e-4)
    torch.testing.assert_close(gpu_obs, cpu_obs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu_grad, cpu_grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("env_id", diffgym.TASK_IDS)
def test_cuda_gymnasium_step(env_id):
    env = gym.make(env_id, device="cuda")
    obs, _ = env.reset(seed=0)
    assert isinstance(obs, np.ndarray) and obs.dtype == np.float32
    obs, reward, *_ = env.step(env.action_space.sample())
    assert np.isfinite(obs).all() and np.isfinite(reward)
    with pytest.raises(ValueError, match="device"):
        env.unwrapped.differentiable_step(env.unwrapped.get_state(), torch.zeros(1, env.action_space.shape[0]))
