"""The vector env's tensor-only restart of finished envs, its checkpoint state, and the shared rollout's
use of them: the same seeds, states and observations, bit for bit, as the masked reset they replace."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

from diffgym.core.state import SimState
from diffgym.training.rollout import RESET_SEED_LOW, EnvBatch

# a flat-Box task, a contact task with a narrowed start, and a Dict-observation face
TASKS = ["DiffGym/PointMass1D-v0", "DiffGym/TPush-v1", "DiffGym/FrankaReachGoal-v0"]
N = 6


def make_venv(env_id: str, **kwargs) -> gym.vector.VectorEnv:
    return gym.make_vec(env_id, num_envs=N, vectorization_mode="vector_entry_point", **kwargs)


def stepped_state(venv, steps: int = 3, seed: int = 5) -> SimState:
    """A state a few random steps from a reset, so no env sits at its start."""
    venv.reset(seed=seed)
    state = venv.get_state()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        action = torch.rand(N, venv.sim.act_dim, generator=generator) * 2 - 1
        state = venv.differentiable_step(state, action).state
    return state


def assert_states_equal(a: SimState, b: SimState) -> None:
    for name, x, y in zip(a.field_names(), a.tensors(), b.tensors()):
        assert torch.equal(x, y), name


def assert_observations_equal(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    else:
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("env_id", TASKS)
@pytest.mark.parametrize("with_seeds", [True, False], ids=["seeded", "own-streams"])
def test_restart_equals_the_masked_reset(env_id, with_seeds):
    """``restart(state, mask, seeds)`` on one env and ``set_state(state)`` plus the masked reset on a twin
    give the same states, observations and per-env RNG streams; rows outside the mask are ``state``'s."""
    masked, restarted = make_venv(env_id), make_venv(env_id)
    state = stepped_state(masked)
    stepped_state(restarted)
    mask = torch.tensor([True, False, True, True, False, False])
    seeds = torch.tensor([2**30 + 7, 0, 2**31 - 1, 12, 0, 0]) if with_seeds else None
    masked.set_state(state)
    reset_seeds = [int(s) if m else None for s, m in zip(seeds, mask)] if with_seeds else None
    reset_obs, _ = masked.reset(seed=reset_seeds, options={"reset_mask": mask.numpy()})

    streams = restarted.state_dict()
    new_state, obs = restarted.restart(state, mask, seeds)

    # the masked envs hold the sim's pure reset of the stream they were given (episode 0) or of their own
    # stream's next episode: an oracle that shares no code with the vector env's bookkeeping
    seed, episode = (seeds, torch.zeros(N)) if with_seeds else (streams["seed"], streams["episode"] + 1)
    expected = restarted.sim.reset(seed, episode)
    assert_states_equal(new_state[mask], expected[mask])
    assert torch.equal(obs[mask], restarted.sim.observe(expected)[mask])
    assert_states_equal(new_state, masked.get_state())
    assert_observations_equal(restarted.to_gym_observation(obs, new_state), reset_obs)
    assert bool((new_state.step[mask] == 0).all()) and torch.equal(new_state.step[~mask], state.step[~mask])
    for key in ("seed", "episode"):  # the next restarts draw from the same streams too
        assert torch.equal(restarted.state_dict()[key], masked.state_dict()[key]), key
    # a second restart without seeds continues each env's stream, as the masked reset does
    masked.reset(options={"reset_mask": mask.numpy()})
    assert_states_equal(restarted.restart(new_state, mask)[0], masked.get_state())
    masked.close(), restarted.close()


def test_restart_leaves_the_env_alone_and_gradients_flow_outside_the_mask():
    venv = make_venv("DiffGym/PointMass1D-v0")
    state = stepped_state(venv)
    own = venv.get_state()
    x = state.x.clone().requires_grad_(True)
    mask = torch.tensor([True, False, False, True, False, True])
    new_state, obs = venv.restart(state.replace(x=x), mask, torch.arange(N))
    assert_states_equal(venv.get_state(), own)
    assert not obs.requires_grad
    new_state.x.sum().backward()
    assert torch.equal(x.grad, (~mask).float())


def test_restart_rejects_bad_arguments_in_one_line():
    venv = make_venv("DiffGym/PointMass1D-v0")
    with pytest.raises(RuntimeError, match=r"call reset\(\) before restart\(\)"):
        venv.restart(venv.sim.reset(torch.zeros(N), torch.zeros(N)), torch.ones(N, dtype=torch.bool))
    venv.reset(seed=0)
    state, mask = venv.get_state(), torch.ones(N, dtype=torch.bool)
    with pytest.raises(ValueError, match=rf"mask must be a torch.bool tensor of shape \({N},\) on cpu, got ndarray"):
        venv.restart(state, mask.numpy())
    with pytest.raises(ValueError, match=r"got torch.int64 of shape"):
        venv.restart(state, mask.long())
    with pytest.raises(ValueError, match=rf"seeds must be an integer tensor of shape \({N},\), got torch.float32"):
        venv.restart(state, mask, torch.zeros(N))
    with pytest.raises(ValueError, match=rf"state must be a PointMass1DState of batch size {N}, got "
                                         r"PointMass1DState of batch size 2"):
        venv.restart(state[:2], mask)


def test_env_batch_restarts_what_the_masked_reset_restarted():
    """``EnvBatch.restart_finished`` against the path it replaces (NumPy masks and seeds through
    ``venv.reset(seed=..., options={"reset_mask": ...})``): the same seeds from the same generator, the
    same states and observations, twice in a row."""
    def through_masked_reset(envs: EnvBatch, state, obs, done):
        done_np = done.cpu().numpy()
        new_seeds = iter(envs.seeds.integers(RESET_SEED_LOW, 2**31, size=int(done_np.sum())).tolist())
        seeds = [next(new_seeds) if d else None for d in done_np]
        fresh_obs, _ = envs.venv.reset(seed=seeds, options={"reset_mask": done_np})
        fresh_obs = torch.as_tensor(fresh_obs, dtype=obs.dtype, device=obs.device)
        return state.where(done, envs.venv.get_state()), torch.where(done[:, None], fresh_obs, obs)

    reference = EnvBatch(make_venv("DiffGym/TPush-v1"), 3, torch.device("cpu"))
    batch = EnvBatch(make_venv("DiffGym/TPush-v1"), 3, torch.device("cpu"))
    state = stepped_state(make_venv("DiffGym/TPush-v1"), seed=3)  # the two batches keep equal histories
    obs = batch.venv.sim.observe(state)
    for done in (torch.tensor([True, False, True, False, False, True]), torch.tensor([False, True, True] * 2)):
        expected = through_masked_reset(reference, state, obs, done)
        state, obs = batch.restart_finished(state, obs, done)
        assert_states_equal(state, expected[0])
        assert torch.equal(obs, expected[1])
        assert batch.seeds.bit_generator.state == reference.seeds.bit_generator.state
    assert batch.restart_finished(state, obs, torch.zeros(N, dtype=torch.bool)) == (state, obs)


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_vector_env_state_dict_resumes_the_same_episodes(mode):
    """A twin loaded from ``state_dict`` mid-run steps (through autoresets) exactly as the original."""
    original = make_venv("DiffGym/PointMass1D-v0", max_episode_steps=4, autoreset_mode=mode)
    twin = make_venv("DiffGym/PointMass1D-v0", max_episode_steps=4, autoreset_mode=mode)
    original.reset(seed=11)
    twin.reset(seed=99)
    actions = np.random.default_rng(0).uniform(-1, 1, (12, N, 1)).astype(np.float32)
    for action in actions[:6]:
        original.step(action)
    saved = original.state_dict()
    twin.load_state_dict(saved)
    kept = {key: value.clone() for key, value in saved.items() if key != "state"}
    for action in actions[6:]:
        a, b = original.step(action), twin.step(action)
        for x, y in zip(a[:4], b[:4]):
            np.testing.assert_array_equal(x, y)
    assert all(torch.equal(saved[key], value) for key, value in kept.items())  # the checkpoint is a copy
    with pytest.raises(ValueError, match=rf"saved\['episode'\] must be a torch.int32 tensor of shape \({N},\)"):
        twin.load_state_dict({**saved, "episode": saved["episode"].long()})
    with pytest.raises(ValueError, match=r"lacks \['needs_reset'\]"):
        twin.load_state_dict({key: value for key, value in saved.items() if key != "needs_reset"})
