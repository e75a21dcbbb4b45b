"""The core contract, checked on every registered task (a new task gets these tests for free)."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import diffgym
from diffgym.testing import tasks_under_test
from diffgym import SimState, StepOutput
from diffgym.core.bridge import debug_outputs
from diffgym.core.registration import task_spec

TASKS = tasks_under_test()  # DIFFGYM_TASKS=my_task:Mine/Task-v0 checks a task of one's own


def flat(obs) -> np.ndarray:
    """An observation as one array: a Dict observation's values concatenated in key order."""
    if isinstance(obs, dict):
        return np.concatenate([np.asarray(obs[key]) for key in sorted(obs)], axis=-1)
    return np.asarray(obs)


@pytest.fixture(autouse=True)
def sentinel_filled_outputs():
    """Every contract test runs in the bridge's debug mode: kernel outputs start as sentinels and each
    launch checks they were all overwritten, so an output a task leaves unwritten on any path these
    tests reach fails here (rather than returning whatever ``torch.empty`` held)."""
    with debug_outputs():
        yield


def random_actions(env, steps, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (steps, *env.action_space.shape)).astype(np.float32)


@pytest.mark.parametrize("env_id", TASKS)
def test_gymnasium_check_env(env_id):
    env = gym.make(env_id, render_mode="rgb_array").unwrapped
    gym_check_env(env, skip_render_check=False)


@pytest.mark.parametrize("env_id", TASKS)
def test_sb3_check_env(env_id):
    sb3_check_env(gym.make(env_id).unwrapped, warn=True)


@pytest.mark.parametrize("env_id", TASKS)
def test_spaces_and_registration(env_id):
    spec = task_spec(env_id)
    assert spec.max_episode_steps and spec.reward_threshold is not None and spec.vector_entry_point
    env = gym.make(env_id)
    # one horizon: Gymnasium's TimeLimit, the single env's sim and the vector env's sim
    assert env.unwrapped.sim.max_episode_steps == spec.max_episode_steps
    assert gym.make_vec(env_id, num_envs=2).sim.max_episode_steps == spec.max_episode_steps
    obs_spaces = env.observation_space.values() if isinstance(env.observation_space, gym.spaces.Dict) \
        else [env.observation_space]
    assert env.action_space.dtype == np.float32 and all(space.dtype == np.float32 for space in obs_spaces)
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    assert "rgb_array" in env.metadata["render_modes"] and env.metadata["render_fps"] > 0


@pytest.mark.parametrize("env_id", TASKS)
def test_seeded_reset_and_rollout_are_deterministic(env_id):
    def rollout(seed):
        env = gym.make(env_id)
        obs, _ = env.reset(seed=seed)
        trace = [flat(obs)]
        for a in random_actions(env, 20):
            obs, reward, *_ = env.step(a)
            trace += [flat(obs), np.float32(reward)]
        trace.append(flat(env.reset()[0]))  # an unseeded reset continues the seeded stream
        return trace

    a, b, c = rollout(7), rollout(7), rollout(8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("env_id", TASKS)
def test_step_equals_differentiable_step(env_id):
    env = gym.make(env_id)
    sim = env.unwrapped
    env.reset(seed=1)
    for a in random_actions(env, 10, seed=1):
        state = sim.get_state()
        out = sim.differentiable_step(state, torch.as_tensor(a)[None])
        obs, reward, terminated, truncated, info = env.step(a)
        assert isinstance(out, StepOutput) and isinstance(out.state, SimState)
        np.testing.assert_array_equal(flat(sim.to_gym_observation(out.obs, out.state))[0], flat(obs))
        assert out.reward[0].item() == np.float32(reward)
        assert bool(out.terminated[0]) == terminated and bool(out.success[0]) == info["is_success"]
        for x, y in zip(out.state.tensors(), sim.get_state().tensors()):
            assert torch.equal(x, y)
        if terminated or truncated:
            break


@pytest.mark.parametrize("env_id", TASKS)
def test_differentiable_step_is_pure(env_id):
    env = gym.make(env_id)
    sim = env.unwrapped
    env.reset(seed=2)
    before = sim.get_state()
    sim.differentiable_step(before, torch.zeros(1, env.action_space.shape[0]))
    for x, y in zip(before.tensors(), sim.get_state().tensors()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("env_id", TASKS)
def test_set_state_round_trip(env_id):
    env = gym.make(env_id)
    sim = env.unwrapped
    env.reset(seed=3)
    saved = sim.get_state()
    a = random_actions(env, 5, seed=3)
    first = [flat(env.step(x)[0]) for x in a]
    sim.set_state(saved)
    second = [flat(env.step(x)[0]) for x in a]
    assert all(np.array_equal(x, y) for x, y in zip(first, second))


@pytest.mark.parametrize("env_id", TASKS)
def test_vector_env_matches_single_envs(env_id):
    n, steps, horizon = 3, 25, 10  # a short horizon so autoresets happen inside the test
    venv = gym.make_vec(env_id, num_envs=n, max_episode_steps=horizon)
    assert isinstance(venv, diffgym.DiffGymVectorEnv) and venv.num_envs == n
    assert venv.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    envs = [gym.make(env_id, max_episode_steps=horizon) for _ in range(n)]
    vobs, _ = venv.reset(seed=10)
    sobs = np.stack([flat(e.reset(seed=10 + i)[0]) for i, e in enumerate(envs)])
    np.testing.assert_array_equal(flat(vobs), sobs)
    done = np.zeros(n, dtype=bool)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        actions = rng.uniform(-1, 1, venv.action_space.shape).astype(np.float32)
        vobs, vrew, vterm, vtrunc, vinfo = venv.step(actions)
        vobs = flat(vobs)
        for i, env in enumerate(envs):
            if done[i]:  # NEXT_STEP: this step resets the env and ignores its action
                obs, _ = env.reset()
                rew, term, trunc, succ = 0.0, False, False, False
            else:
                obs, rew, term, trunc, info = env.step(actions[i])
                succ = info["is_success"]
            np.testing.assert_array_equal(vobs[i], flat(obs))
            assert np.float32(vrew[i]) == np.float32(rew) and vterm[i] == term and vtrunc[i] == trunc
            assert vinfo["is_success"][i] == succ
            assert vinfo["_is_success"][i] == (not done[i])  # a resetting env has no step info
        done = vterm | vtrunc
    assert venv.get_state().batch_size == n


@pytest.mark.parametrize("env_id", TASKS)
def test_vector_same_step_autoreset_and_reset_mask(env_id):
    venv = gym.make_vec(env_id, num_envs=2, max_episode_steps=3, autoreset_mode=AutoresetMode.SAME_STEP)
    venv.reset(seed=0)
    for _ in range(3):
        obs, _, term, trunc, info = venv.step(np.zeros(venv.action_space.shape, np.float32))
    assert trunc.all() and info["_final_obs"].all()
    assert not np.array_equal(flat(info["final_obs"][0]), flat(obs)[0])  # obs is already the next episode's
    assert (venv.get_state().step == 0).all()
    venv.step(np.zeros(venv.action_space.shape, np.float32))
    before = venv.get_state()
    venv.reset(options={"reset_mask": np.array([True, False])})
    after = venv.get_state()
    assert after.step[0] == 0 and after.step[1] == before.step[1]


@pytest.mark.parametrize("env_id", TASKS)
def test_bad_actions_rejected_and_env_survives(env_id):
    env = gym.make(env_id)
    sim = env.unwrapped
    env.reset(seed=4)
    dim = env.action_space.shape[0]
    good = np.zeros(dim, np.float32)
    nan = good.copy()
    nan[-1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or Inf at index \[\(%d,\)\]" % (dim - 1)):
        env.step(nan)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(dim + 1, np.float32))
    with pytest.raises(ValueError, match="dtype"):
        env.step(np.array(["a"] * dim))
    state = sim.get_state()
    with pytest.raises(ValueError, match="NaN or Inf"):
        sim.differentiable_step(state, torch.full((1, dim), float("inf")))
    with pytest.raises(ValueError, match=r"shape \(1, %d\)" % dim):
        sim.differentiable_step(state, torch.zeros(2, dim))
    with pytest.raises(ValueError, match="float32"):
        sim.differentiable_step(state, torch.zeros(1, dim, dtype=torch.float64))
    with pytest.raises(ValueError, match="device"):
        sim.differentiable_step(state, torch.zeros(1, dim, device="meta"))
    with pytest.raises(TypeError, match="torch.float32 tensor"):
        sim.differentiable_step(state, np.zeros((1, dim), np.float32))
    with pytest.raises(TypeError, match="state must be"):
        sim.differentiable_step(object(), torch.zeros(1, dim))
    with pytest.raises(ValueError, match="int32"):
        sim.set_state(state.replace(step=state.step.float()))
    # still usable, and the rejected calls changed nothing
    assert torch.equal(sim.get_state().tensors()[0], state.tensors()[0])
    obs, *_ = env.step(good)
    assert np.isfinite(flat(obs)).all()


@pytest.mark.parametrize("env_id", TASKS)
def test_out_of_range_actions_are_clipped(env_id):
    env = gym.make(env_id)
    sim = env.unwrapped
    env.reset(seed=5)
    state = sim.get_state()
    dim = env.action_space.shape[0]
    big = torch.full((1, dim), 3.0, requires_grad=True)
    clipped = sim.differentiable_step(state, big)
    edge = sim.differentiable_step(state, torch.ones(1, dim))
    assert torch.equal(clipped.obs, edge.obs) and torch.equal(clipped.reward, edge.reward)
    clipped.reward.sum().backward()
    assert torch.all(big.grad == 0)  # documented: the clip passes no gradient outside [-1, 1]


@pytest.mark.parametrize("env_id", TASKS)
def test_gradients_reach_action_and_float_state(env_id):
    env = gym.make(env_id)
    sim = env.unwrapped
    env.reset(seed=6)
    state = sim.get_state()
    leaves = {n: t.clone().requires_grad_(True) for n, t in zip(state.field_names(), state.tensors())
              if t.is_floating_point()}
    state = state.replace(**leaves)
    action = torch.full((1, env.action_space.shape[0]), 0.3, requires_grad=True)
    total = 0
    for _ in range(5):
        out = sim.differentiable_step(state, action)
        total = total + out.reward.sum() + out.obs.sum()
        state = out.state
    total.backward()
    assert action.grad is not None and torch.isfinite(action.grad).all() and action.grad.abs().sum() > 0
    for name, leaf in leaves.items():
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), name


PRE_CONTACT = {"DiffGym/PointNav2D-v0": 0.1, "DiffGym/TPush-v0": 0.05, "DiffGym/TPush-v1": 0.05}
"""Tasks with pre-contact gradients, and a distance at which their straight-through kernel runs."""


@pytest.mark.parametrize("env_id, kwargs", [(task, {}) for task in TASKS] + [
    (task, {"contact_gradient_distance": distance}) for task, distance in PRE_CONTACT.items() if task in TASKS])
def test_backward_leaves_the_forward_outputs_as_they_were(env_id, kwargs):
    """Warp's adjoint replays each kernel's forward code: a store it replays (a called function's) would
    rewrite an output after the step returned it, so the observation a trainer keeps would be another."""
    venv = gym.make_vec(env_id, num_envs=3, **kwargs)
    venv.reset(seed=4)
    state = venv.get_state()
    actions = torch.full((4, 3, venv.single_action_space.shape[0]), 0.3, requires_grad=True)
    step = venv.differentiable_step(state, actions[0])
    observed = venv.sim.observe(step.state)
    rollout = venv.differentiable_rollout(state, actions)
    named = {"observe": observed, **{f"step {k}": v for k, v in vars(step).items() if k != "state"},
             **{f"step {k}": v for k, v in zip(step.state.field_names(), step.state.tensors())},
             **{f"rollout {k}": v for k, v in vars(rollout).items() if k != "states"},
             **{f"rollout {k}": v for k, v in zip(rollout.states.field_names(), rollout.states.tensors())}}
    assert {"step obs", "step reward", "step terminated", "step truncated", "step success"} <= set(named)
    before = {name: t.detach().clone() for name, t in named.items()}
    sum(t.sum() for t in named.values() if t.is_floating_point()).backward()
    for name, now in named.items():
        assert torch.equal(now.detach(), before[name]), f"{name} changed by backward"


@pytest.mark.parametrize("env_id", TASKS)
def test_render_rgb_array(env_id):
    env = gym.make(env_id, render_mode="rgb_array")
    env.reset(seed=0)
    first = env.render()
    assert first.dtype == np.uint8 and first.ndim == 3 and first.shape[2] == 3
    for a in random_actions(env, 10):
        env.step(np.ones_like(a))
    assert not np.array_equal(first, env.render())
    frames = gym.make_vec(env_id, num_envs=2, render_mode="rgb_array")
    frames.reset(seed=0)
    assert len(frames.render()) == 2


@pytest.mark.parametrize("env_id", TASKS)
def test_info_arrays_do_not_alias_the_state(env_id):
    venv = gym.make_vec(env_id, num_envs=2)
    venv.reset(seed=0)
    *_, info = venv.step(np.zeros(venv.action_space.shape, np.float32))
    before = venv.get_state()
    for key, value in info.items():
        if isinstance(value, np.ndarray) and value.dtype != object:
            value[...] = 0
    for x, y in zip(before.tensors(), venv.get_state().tensors()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("env_id", TASKS)
def test_same_step_info_of_reset_envs_is_in_final_info(env_id):
    venv = gym.make_vec(env_id, num_envs=2, max_episode_steps=2, autoreset_mode=AutoresetMode.SAME_STEP)
    venv.reset(seed=0)
    zeros = np.zeros(venv.action_space.shape, np.float32)
    *_, info = venv.step(zeros)
    assert info["_is_success"].all() and "final_info" not in info
    *_, trunc, info = venv.step(zeros)
    assert trunc.all() and not info["_is_success"].any()  # top level: the new episodes' (empty) reset info
    assert info["final_info"]["_is_success"].all()


@pytest.mark.parametrize("env_id", TASKS)
def test_single_env_pickles_mid_episode_and_the_vector_env_says_why_not(env_id):
    """A pickled single env (SB3's SubprocVecEnv, multiprocessing) continues exactly where it was; the
    vector env refuses with a TypeError that says what to do instead."""
    import pickle

    env = gym.make(env_id)
    env.reset(seed=3)
    actions = random_actions(env, 8, seed=1)
    for action in actions[:3]:
        env.step(action)
    copy = pickle.loads(pickle.dumps(env))
    for action in actions[3:]:
        a, b = env.step(action), copy.step(action)
        np.testing.assert_array_equal(flat(a[0]), flat(b[0]))
        assert a[1:4] == b[1:4]
    venv = gym.make_vec(env_id, num_envs=2)
    with pytest.raises(TypeError, match="cannot be pickled.*gym.make_vec"):
        pickle.dumps(venv)
