"""How reset seeds become Warp's 31-bit RNG seeds: seeds below 2**31 are themselves (every recorded stream
depends on it), larger ones are hashed instead of aliasing modulo 2**31."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from diffgym.core.env import warp_seeds

ENV_ID = "DiffGym/PointMass1D-v0"
SMALL_SEEDS = [0, 1, 5, 12345, 2**30 + 7, 2**31 - 2, 2**31 - 1]
# seeds equal modulo 2**31 (the old mapping gave them all seed 5's stream), and 2**32 against 0
ALIASED_SEEDS = [5, 2**31 + 5, 2**32 + 5, 2**33 + 5]
U64 = 2**64 - 1


def splitmix64_reference(state: int) -> int:
    """splitmix64's output for ``state`` on Python ints (Vigna's reference, uint64 arithmetic)."""
    z = (state + 0x9E3779B97F4A7C15) & U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
    return z ^ (z >> 31)


def test_seeds_below_2_pow_31_map_to_themselves():
    assert warp_seeds(SMALL_SEEDS).tolist() == SMALL_SEEDS
    assert warp_seeds(torch.tensor(SMALL_SEEDS)).tolist() == SMALL_SEEDS
    assert warp_seeds(SMALL_SEEDS).dtype == torch.int32


def test_the_hash_is_splitmix64_on_the_tensor_and_python_paths_alike():
    """The int64 tensor mix (wrapping arithmetic, masked shifts) against uint64 Python arithmetic, near
    every wrap-around point; a tensor's negative values are their unsigned bits."""
    assert splitmix64_reference(0) == 0xE220A8397B1DCDAF  # the first output of splitmix64 seeded with 0
    rng = np.random.default_rng(0)
    edges = [2**31, 2**32, 2**32 + 5, 2**62, 2**63 - 2, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 2, 2**64 - 1]
    seeds = edges + [int(s) for s in rng.integers(2**31, 2**64, size=2000, dtype=np.uint64)]
    expected = [splitmix64_reference(s) & 0x7FFFFFFF for s in seeds]
    assert warp_seeds(seeds).tolist() == expected
    as_int64 = torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds], dtype=torch.int64)
    assert warp_seeds(as_int64).tolist() == expected
    assert warp_seeds(torch.tensor([-1])).tolist() == warp_seeds([2**64 - 1]).tolist()


def test_seeds_apart_only_above_bit_31_map_apart():
    assert len(set(warp_seeds(ALIASED_SEEDS).tolist())) == len(ALIASED_SEEDS)
    assert warp_seeds([2**32]).item() != 0
    wide = [2**64, 2**64 + 5, 2**65 + 5, 2**128 + 5, 2**64 * 5]  # wider than 64 bits: every word counts
    assert len(set(warp_seeds(wide + [0, 5]).tolist())) == len(wide) + 2


def test_single_env_streams_of_aliased_seeds_differ_and_small_seeds_are_unchanged():
    env = gym.make(ENV_ID)
    first = [env.reset(seed=seed)[0] for seed in ALIASED_SEEDS]
    assert len({obs.tobytes() for obs in first}) == len(ALIASED_SEEDS)
    assert not np.array_equal(env.reset(seed=2**32)[0], env.reset(seed=0)[0])
    for seed in SMALL_SEEDS:  # the stream is Warp's (seed, episode 0) itself
        obs = env.reset(seed=seed)[0]
        expected = env.unwrapped.sim.reset(torch.tensor([seed], dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
        np.testing.assert_array_equal(obs, env.unwrapped.sim.observe(expected).detach().numpy()[0])


def test_vector_env_seeds_map_like_the_single_env():
    venv = gym.make_vec(ENV_ID, num_envs=len(ALIASED_SEEDS), vectorization_mode="vector_entry_point")
    env = gym.make(ENV_ID)
    obs = venv.reset(seed=ALIASED_SEEDS)[0]
    assert len({row.tobytes() for row in obs}) == len(ALIASED_SEEDS)
    for row, seed in zip(obs, ALIASED_SEEDS):
        np.testing.assert_array_equal(row, env.reset(seed=seed)[0])
    obs = venv.reset(seed=2**31 - 2)[0]  # env i gets seed + i, across the 2**31 boundary too
    for i, row in enumerate(obs):
        np.testing.assert_array_equal(row, env.reset(seed=2**31 - 2 + i)[0])
    venv.restart(venv.get_state(), torch.ones(len(ALIASED_SEEDS), dtype=torch.bool), torch.tensor(ALIASED_SEEDS))
    assert venv.state_dict()["seed"].tolist() == warp_seeds(ALIASED_SEEDS).tolist()


def test_negative_seeds_are_refused_in_one_line():
    venv = gym.make_vec(ENV_ID, num_envs=2, vectorization_mode="vector_entry_point")
    with pytest.raises(ValueError, match=r"^seed must be a non-negative int, got -1$"):
        venv.reset(seed=[-1, 3])
    with pytest.raises(gym.error.Error, match="greater or equal to zero"):  # Gymnasium's own check
        gym.make(ENV_ID).reset(seed=-1)
