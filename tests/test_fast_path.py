"""The single env's fast step path (persistent buffers, recorded launches) against the reference path
(the functional sim on fresh tensors): bit-identical over full episodes of every task, and the bridge's
cached launch plans against fresh ones."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import diffgym
from diffgym.core import bridge


def _bits(value) -> bytes:
    """Exact bytes of a result, so -0.0 vs 0.0 or a NaN payload would count as a difference."""
    if isinstance(value, dict):
        return repr(sorted((k, _bits(v)) for k, v in value.items())).encode()
    if isinstance(value, tuple):
        return b"|".join(_bits(v) for v in value)
    if isinstance(value, (bool, int, float, np.bool_)):
        return repr((type(value).__name__, np.float64(value).tobytes() if isinstance(value, float) else value)).encode()
    array = np.asarray(value)
    return repr((array.dtype.str, array.shape)).encode() + array.tobytes()


def _actions(env, steps: int, seed: int) -> list:
    """Mostly in-range float32 actions, some out of range (clipped), some float64 and int arrays."""
    rng = np.random.default_rng(seed)
    shape = env.action_space.shape
    actions = []
    for t in range(steps):
        a = rng.uniform(-1.5, 1.5, shape)
        actions.append(a.astype(np.float32) if t % 7 else (a if t % 2 else np.rint(a).astype(np.int64)))
    return actions


# Newton tasks step in three stages (control kernel, solver substeps, outcome kernel): no fast path
KERNEL_TASK_IDS = [env_id for env_id in diffgym.ALL_TASK_IDS if env_id not in diffgym.NEWTON_TASK_IDS]


@pytest.mark.parametrize("env_id", diffgym.NEWTON_TASK_IDS)
def test_newton_tasks_step_through_the_reference_path(env_id):
    env = gym.make(env_id).unwrapped
    assert not env.use_fast_path and not env._fast_enabled()
    env.use_fast_path = True  # asking for it changes nothing: the sim has none
    env.reset(seed=0)
    env.step(np.zeros(env.action_space.shape, np.float32))
    assert env._fast is None


@pytest.mark.parametrize("env_id", KERNEL_TASK_IDS)
def test_fast_path_is_bit_identical_to_reference_over_full_episodes(env_id):
    fast, ref = gym.make(env_id), gym.make(env_id)
    assert fast.unwrapped.use_fast_path  # the default on CPU
    ref.unwrapped.use_fast_path = False
    horizon = fast.unwrapped.sim.max_episode_steps
    steps = 2 * horizon + horizon // 2  # two full episodes and half of a third
    actions = _actions(fast, steps, seed=3)
    results = {}
    for name, env in (("fast", fast), ("ref", ref)):
        trace = [_bits(env.reset(seed=11))]
        episodes = 0
        for t, action in enumerate(actions):
            if t == horizon // 3:  # set_state mid-episode: both must continue from the given state
                env.unwrapped.set_state(env.unwrapped.get_state())
            obs, reward, terminated, truncated, info = env.step(action)
            trace.append(b"".join(_bits(x) for x in (obs, reward, terminated, truncated, info)))
            trace.append(b"".join(_bits(t) for t in env.unwrapped.get_state().tensors()))
            if terminated or truncated:
                episodes += 1
                trace.append(_bits(env.reset()))  # unseeded: the next episode of the same RNG stream
        assert episodes >= 2
        trace.append(_bits(env.reset(seed=12)))
        results[name] = trace
    assert len(results["fast"]) == len(results["ref"])
    for i, (a, b) in enumerate(zip(results["fast"], results["ref"])):
        assert a == b, f"{env_id}: fast and reference paths differ at trace entry {i}"


def test_switching_paths_mid_episode_continues_the_same_trajectory():
    env_id = "DiffGym/FrankaReach-v0"
    switching, ref = gym.make(env_id), gym.make(env_id)
    ref.unwrapped.use_fast_path = False
    actions = _actions(ref, 30, seed=5)
    switching.reset(seed=2)
    ref.reset(seed=2)
    for t, action in enumerate(actions):
        switching.unwrapped.use_fast_path = (t // 4) % 2 == 0
        a, b = switching.step(action), ref.step(action)
        assert _bits(a) == _bits(b), t


def test_fast_path_outputs_do_not_alias_its_buffers():
    env = gym.make("DiffGym/PointMass1D-v0")
    obs0, _ = env.reset(seed=0)
    obs1, _, _, _, _ = env.step(np.array([1.0], dtype=np.float32))
    state = env.unwrapped.get_state()
    kept = (obs0.copy(), obs1.copy(), state.x.clone())
    env.step(np.array([1.0], dtype=np.float32))
    assert np.array_equal(obs0, kept[0]) and np.array_equal(obs1, kept[1]) and torch.equal(state.x, kept[2])


def test_cached_launch_plans_give_each_call_its_own_tensors():
    """Two forwards on one cached plan, then both backwards (second first): each backward must use its
    own call's tensors, and the results must equal those of plans built fresh for every call."""
    sim = gym.make_vec("DiffGym/PointNav2D-v0", num_envs=3).sim

    def run(state, action):
        out = sim.step(state, action)
        return out.reward.sum() + out.obs.square().sum()

    venv = gym.make_vec("DiffGym/PointNav2D-v0", num_envs=3)
    venv.reset(seed=0)
    s0 = venv.get_state()
    venv.step(np.full((3, 2), 0.7, dtype=np.float32))
    s1 = venv.get_state()
    a0 = torch.tensor([[0.3, -0.2], [0.9, 0.1], [-0.5, 0.5]], requires_grad=True)
    a1 = torch.tensor([[-0.8, 0.4], [0.2, 0.2], [0.1, -0.9]], requires_grad=True)
    l0, l1 = run(s0, a0), run(s1, a1)  # the second forward rewrites the plan's pointers
    l1.backward()
    l0.backward()
    cached = (l0.detach(), l1.detach(), a0.grad.clone(), a1.grad.clone())

    fresh = []
    for state, action in ((s0, a0), (s1, a1)):
        bridge._plans.clear()  # no plan survives: every launch is recorded anew
        leaf = action.detach().clone().requires_grad_(True)
        loss = run(state, leaf)
        loss.backward()
        fresh.append((loss.detach(), leaf.grad))
    assert torch.equal(cached[0], fresh[0][0]) and torch.equal(cached[1], fresh[1][0])
    assert torch.equal(cached[2], fresh[0][1]) and torch.equal(cached[3], fresh[1][1])
    assert not torch.equal(cached[2], cached[3])  # the two calls really had different gradients
