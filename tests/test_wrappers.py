"""The partial observability wrappers (``diffgym.wrappers``): observation noise that gradients pass through,
and an action delay whose queue lives in the state, both on the tensor API and the Gymnasium API."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from diffgym.commands.options import key_values
from diffgym.plugins import resolve_config
from diffgym.training.rollout import EnvBatch
from diffgym.wrappers import ActionDelay, ObservationNoise, inner_state
from tests.test_domain_randomization import resumed_exactly, tiny_run

POINT_MASS = "DiffGym/PointMass1D-v0"
N = 3


def make_venv(num_envs: int = N, env_id: str = POINT_MASS, **kwargs) -> gym.vector.VectorEnv:
    return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point", **kwargs)


def assert_states_equal(a, b) -> None:
    for name, x, y in zip(b.field_names(), a.tensors(), b.tensors()):
        assert torch.equal(x, y), name


# ------------------------------------------------------------------------------------ ObservationNoise
def test_noise_is_reparameterized_and_its_gradient_matches_finite_differences():
    venv = make_venv()
    noisy = ObservationNoise(venv, std=0.3, seed=4)
    noisy.reset(seed=0)
    state = noisy.get_state()
    action = torch.tensor([[0.2], [-0.5], [0.7]], requires_grad=True)

    def noisy_obs(a: torch.Tensor) -> torch.Tensor:
        noisy.seed_noise(11)  # the same eps at every call
        return noisy.differentiable_step(state, a).obs

    clean = venv.differentiable_step(state, action.detach()).obs
    eps = torch.randn(clean.shape, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(noisy_obs(action.detach()), clean + 0.3 * eps)
    weights = torch.tensor([1.0, -2.0, 0.5])
    (noisy_obs(action) @ weights).sum().backward()
    h = 1e-2
    for env in range(N):
        step = torch.zeros(N, 1)
        step[env] = h
        difference = (noisy_obs(action.detach() + step) - noisy_obs(action.detach() - step)) @ weights
        assert float(action.grad[env, 0]) == pytest.approx(float(difference[env]) / (2 * h), rel=1e-3)
        assert float(action.grad[env, 0]) != 0.0


def test_noise_on_the_gymnasium_api_is_seeded_and_leaves_the_state_alone():
    venv, twin = make_venv(), make_venv()
    noisy = ObservationNoise(venv, std=0.1)
    obs, _ = noisy.reset(seed=3)
    clean, _ = twin.reset(seed=3)
    assert not np.array_equal(obs, clean) and np.abs(obs - clean).max() < 1.0
    action = np.full((N, 1), 0.4, dtype=np.float32)
    obs, *_ = noisy.step(action)
    clean, *_ = twin.step(action)
    assert_states_equal(noisy.get_state(), twin.get_state())
    # reset(seed=s) reseeds the noise: the same seed gives the same noisy observations
    again = ObservationNoise(make_venv(), std=0.1, seed=99)
    again.reset(seed=3)
    np.testing.assert_array_equal(again.step(action)[0], obs)
    # the resumed wrapper continues the same noise
    saved = noisy.state_dict()
    resumed = ObservationNoise(make_venv(), std=0.1)
    resumed.reset(seed=0)
    resumed.load_state_dict(saved)
    np.testing.assert_array_equal(resumed.step(action)[0], noisy.step(action)[0])


def test_noise_restart_and_env_batch_use_the_wrapper():
    noisy = ObservationNoise(make_venv(), std=0.5, seed=1)
    envs = EnvBatch(noisy, seed=2, device=torch.device("cpu"))
    clean_obs = noisy.sim.observe(envs.state)
    assert not torch.equal(envs.obs, clean_obs)
    done = torch.tensor([True, False, True])
    _, obs = envs.restart_finished(envs.state, clean_obs, done)
    assert torch.equal(obs[~done], clean_obs[~done]) and not torch.equal(obs[done], clean_obs[done])


# ------------------------------------------------------------------------------------ ActionDelay
@pytest.mark.parametrize("k", [1, 3])
def test_delay_applies_each_action_k_steps_later_in_differentiable_step(k):
    venv = make_venv()
    delayed = ActionDelay(venv, steps=k)
    delayed.reset(seed=1)
    start = delayed.get_state()
    assert start.pending_actions.shape == (N, k, 1) and not bool(start.pending_actions.any())
    horizon = k + 3
    actions = [torch.full((N, 1), 0.1 * (t + 1), requires_grad=True) for t in range(horizon)]
    states, state = [], start
    for action in actions:
        state = delayed.differentiable_step(state, action).state
        states.append(state)
    # the plain env, given zeros for k steps and then the same actions, passes through the same states
    plain = inner_state(start)
    for t in range(horizon):
        plain = venv.differentiable_step(plain, actions[t - k].detach() if t >= k else torch.zeros(N, 1)).state
        assert_states_equal(inner_state(states[t]), plain)
    # the first action reaches the state after step k (index k) and none before it
    for t, state in enumerate(states):
        if not state.v.requires_grad:  # no action has reached the state yet
            assert t < k
            continue
        grad, = torch.autograd.grad(state.v.sum(), actions[0], retain_graph=True, allow_unused=True)
        if t < k:
            assert grad is None or not bool(grad.any()), t
        else:
            assert grad is not None and bool((grad != 0).all()), t
    # and the state after step k does not depend on the actions given after the first
    later = torch.autograd.grad(states[k].v.sum(), actions[1:], retain_graph=True, allow_unused=True)
    assert all(grad is None or not bool(grad.any()) for grad in later)


def test_delay_on_the_gymnasium_api_and_its_autoreset():
    venv, twin = make_venv(), make_venv()
    k = 2
    delayed = ActionDelay(venv, steps=k)
    delayed.reset(seed=5)
    twin.reset(seed=5)
    given = [np.full((N, 1), 0.2 * (t + 1) - 0.5, dtype=np.float32) for t in range(5)]
    for t, action in enumerate(given):
        obs, reward, *_ = delayed.step(action)
        expected_obs, expected_reward, *_ = twin.step(given[t - k] if t >= k else np.zeros((N, 1), np.float32))
        np.testing.assert_array_equal(obs, expected_obs)
        np.testing.assert_array_equal(reward, expected_reward)
    np.testing.assert_array_equal(delayed.get_state().pending_actions.numpy(), np.stack(given[-k:], axis=1))
    # env 1 ends its episode; at the next step (NEXT_STEP) it restarts with an empty queue
    state = delayed.get_state()
    ending = state.step.clone()
    ending[1] = venv.sim.max_episode_steps - 1
    delayed.set_state(state.replace(step=ending))
    _, _, _, truncated, _ = delayed.step(given[0])
    assert truncated.tolist() == [False, True, False]
    delayed.step(given[1])
    pending = delayed.get_state().pending_actions
    assert not bool(pending[1].any()) and bool(pending[0].any())
    # a saved wrapper resumes with its queue
    resumed = ActionDelay(make_venv(), steps=k)
    resumed.reset(seed=0)
    resumed.load_state_dict(delayed.state_dict())
    np.testing.assert_array_equal(resumed.step(given[2])[0], delayed.step(given[2])[0])


def test_delay_restart_empties_only_the_restarted_queues_and_trains_through_env_batch():
    delayed = ActionDelay(make_venv(), steps=2)
    envs = EnvBatch(delayed, seed=3, device=torch.device("cpu"), randomize={"mass": [0.5, 2.0]})
    out = envs.differentiable_step(envs.state, torch.ones(N, 1))
    assert bool(out.state.pending_actions[:, -1].eq(1).all())
    done = torch.tensor([False, True, False])
    state, _ = envs.restart_finished(out.state, out.obs, done)
    assert not bool(state.pending_actions[1].any()) and bool(state.pending_actions[[0, 2], -1].eq(1).all())
    assert int(state.step[1]) == 0
    saved = envs.state_dict()
    envs.load_state_dict(saved)
    assert type(envs.state).__name__ == "DelayedPointMass1DState"


def test_bad_wrapper_arguments_are_refused():
    with pytest.raises(ValueError, match="std must be a finite number >= 0"):
        ObservationNoise(make_venv(), std=-1.0)
    with pytest.raises(ValueError, match="steps must be a whole number >= 1"):
        ActionDelay(make_venv(), steps=0)
    with pytest.raises(TypeError, match="supports Box observations"):
        ActionDelay(make_venv(env_id="DiffGym/FrankaReachGoal-v0"), steps=1)
    delayed = ActionDelay(make_venv(), steps=1)
    delayed.reset(seed=0)
    with pytest.raises(ValueError, match="must be an ActionDelay state"):
        delayed.differentiable_step(make_venv().sim.reset(torch.zeros(N), torch.zeros(N)), torch.zeros(N, 1))


def test_a_delayed_differentiable_step_checks_the_action_it_queues():
    delayed = ActionDelay(make_venv(), steps=2)
    delayed.reset(seed=0)
    state = delayed.get_state()
    nan_action = torch.zeros(N, 1)
    nan_action[1, 0] = float("nan")
    for action, message in [(nan_action, r"action contains NaN or Inf at \(env, dim\) \[\(1, 0\)\]"),
                            (torch.zeros(N, 1, dtype=torch.float64), "got dtype torch.float64"),
                            (torch.zeros(N, 2), r"got shape \(3, 2\)"),
                            ([0.0] * N, "action must be a torch.float32 tensor")]:
        with pytest.raises((ValueError, TypeError), match=message) as error:
            delayed.differentiable_step(state, action)
        assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------ from the config
def test_wrappers_from_the_config_are_checked_in_one_line():
    sets = ["wrappers.action_delay=2", "wrappers.observation_noise=0.05"]
    config = resolve_config("apg", POINT_MASS, key_values(sets))
    assert config.wrappers == {"action_delay": 2, "observation_noise": 0.05}
    for sets, message in [(["wrappers.action_delay=0"], r"wrappers.action_delay: ActionDelay steps must be a whole "
                                                         r"number >= 1, got 0"),
                          (["wrappers.observation_noise=-1"], r"wrappers.observation_noise: ObservationNoise std"),
                          (["wrappers.frame_skip=2"], r"unknown wrappers \['frame_skip'\]; expected action_delay")]:
        with pytest.raises(ValueError, match=message) as error:
            resolve_config("ppo", POINT_MASS, key_values(sets))
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("algo", ["apg", "ppo"])
def test_a_wrapped_run_evaluates_wrapped_and_resumes_exactly(tmp_path, algo):
    straight = resumed_exactly(tmp_path, algo, **{"wrappers.action_delay": 2, "wrappers.observation_noise": 0.05})
    plain = tiny_run(tmp_path, algo, "plain")
    assert plain[0]["eval_return"] != straight[0]["eval_return"]  # the untrained policy, evaluated wrapped
