"""The shared training pieces' cheaper paths give what the plain computations give, bit for bit: the
normalizer's cached statistics, and episode returns read once per unroll."""

from __future__ import annotations

import gymnasium as gym
import torch

import diffgym  # noqa: F401  (registers the tasks)
from diffgym.training import ActorCritic, NormalizerSpec, ObservationNormalizer, PolicySpec
from diffgym.training.rollout import EnvBatch, unroll


def plain_normalization(normalizer: ObservationNormalizer, obs: torch.Tensor) -> torch.Tensor:
    mean = normalizer.mean.to(obs.dtype)
    std = torch.sqrt(normalizer.var + normalizer.spec.epsilon).to(obs.dtype)
    return ((obs - mean) / std).clamp(-normalizer.spec.clip, normalizer.spec.clip)


def test_normalizer_statistics_are_cached_until_they_change():
    torch.manual_seed(0)
    normalizer = ObservationNormalizer(3, NormalizerSpec())
    normalizer.update(torch.randn(50, 3) * 3.0 + 1.0)
    obs = torch.randn(4, 3) * 2.0
    first = normalizer._statistics(torch.float32)
    assert all(a is b for a, b in zip(first, normalizer._statistics(torch.float32)))  # no recomputation
    assert torch.equal(normalizer(obs), plain_normalization(normalizer, obs))

    changes = [lambda: normalizer.update(torch.randn(20, 3)),                       # the trainers' update
               lambda: normalizer.var.copy_(torch.tensor([0.5, 2.0, 0.25], dtype=torch.float64)),  # a caller's write
               lambda: normalizer.load_state_dict(ObservationNormalizer(3, NormalizerSpec()).state_dict()),
               lambda: normalizer.float()]  # buffers replaced (float32 copies)
    for change in changes:
        before = normalizer._statistics(torch.float32)
        change()
        after = normalizer._statistics(torch.float32)
        assert after[1] is not before[1]
        assert torch.equal(normalizer(obs), plain_normalization(normalizer, obs))
    assert normalizer._statistics(torch.float64)[1].dtype == torch.float64  # one cache per dtype asked


def test_a_normalization_under_inference_mode_leaves_later_gradients_working():
    """Statistics computed under ``torch.inference_mode`` (an evaluation) are not cached: a later
    differentiable step would have to save those inference tensors for its backward."""
    normalizer = ObservationNormalizer(3, NormalizerSpec())
    normalizer.update(torch.randn(50, 3) * 3.0 + 1.0)
    with torch.inference_mode():
        normalizer(torch.randn(4, 3))
    obs = torch.randn(4, 3, requires_grad=True)
    normalizer(obs).square().sum().backward()
    assert obs.grad is not None and torch.isfinite(obs.grad).all()


def test_record_returns_the_running_returns_and_restarts_finished_envs():
    venv = gym.make_vec("DiffGym/PointMass1D-v0", num_envs=3, vectorization_mode="vector_entry_point")
    envs = EnvBatch(venv, 0, torch.device("cpu"))
    first = envs.record(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([False, True, False]))
    assert first.dtype == torch.float64 and first.tolist() == [1.0, 2.0, 3.0]
    second = envs.record(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([True, False, False]))
    assert second.tolist() == [1.5, 0.5, 3.5]  # env 1 started over after its episode ended
    assert envs.episode_return.tolist() == [0.0, 0.5, 3.5] and envs.episode_length.tolist() == [0, 1, 2]


def test_unroll_lists_the_finished_episodes_in_step_then_env_order():
    venv = gym.make_vec("DiffGym/PointMass1D-v0", num_envs=3, vectorization_mode="vector_entry_point",
                        max_episode_steps=3)
    envs = EnvBatch(venv, 0, torch.device("cpu"))
    torch.manual_seed(0)
    obs_dim, act_dim = venv.single_observation_space.shape[0], venv.single_action_space.shape[0]
    with torch.no_grad():
        segment, _, _ = unroll(ActorCritic(obs_dim, act_dim, PolicySpec()),
                               ObservationNormalizer(obs_dim, NormalizerSpec()), envs, 7)
    running, expected = [0.0] * 3, []
    for t in range(7):
        for i in range(3):
            running[i] += float(segment.rewards[t, i])
            if segment.done[t, i]:
                expected.append(running[i])
                running[i] = 0.0
    assert len(expected) >= 6 and segment.finished_returns == expected
