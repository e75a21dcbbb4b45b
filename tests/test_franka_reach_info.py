"""FrankaReach's `info` extras from its info kernel (issue 27 item 3): the single env's fast path computes
them in the same CPU graph as the step and runs no torch op, and they are the values `info` always
held (`tcp` = the observation's TCP, `goal`, `distance` = -reward), on both paths."""

import gymnasium as gym
import numpy as np
import pytest
import torch
import warp as wp
from torch.overrides import TorchFunctionMode

from diffgym.core.contract import TaskContractError
from diffgym.envs.franka_reach import FrankaReach, FrankaReachParams, vec7


class TorchCalls(TorchFunctionMode):
    """Records every torch function and tensor method called from Python while active."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


def test_single_env_step_runs_no_torch_op():
    env = gym.make("DiffGym/FrankaReach-v0")
    env.reset(seed=0)
    action = np.full(7, 0.3, np.float32)
    env.step(action)  # the fast path's buffers and graphs are built by now
    with TorchCalls() as calls:
        for _ in range(3):
            _, _, _, _, info = env.step(action)
    assert calls.names == [] and set(info) == {"is_success", "tcp", "goal", "distance"}
    # the recorder sees the torch ops of a step that has them (the reference path)
    env.unwrapped.use_fast_path = False
    with TorchCalls() as calls:
        env.step(action)
    assert calls.names


@pytest.mark.parametrize("use_fast_path", [True, False])
def test_info_holds_the_step_outputs_bit_for_bit(use_fast_path):
    env = gym.make("DiffGym/FrankaReach-v0")
    env.unwrapped.use_fast_path = use_fast_path
    env.reset(seed=4)
    actions = np.random.default_rng(0).uniform(-1.2, 1.2, (150, 7)).astype(np.float32)
    previous = None
    for action in actions:  # through a truncation and the reset after it
        obs, reward, terminated, truncated, info = env.step(action)
        goal = env.unwrapped.get_state().goal[0].numpy()
        assert type(info["is_success"]) is bool and type(info["distance"]) is float
        assert info["tcp"].dtype == np.float32 and info["tcp"].shape == (3,) and info["goal"].shape == (3,)
        assert np.array_equal(info["tcp"], obs[7:10]) and np.array_equal(info["goal"], goal)
        assert info["distance"] == -reward and info["is_success"] == (info["distance"] < 0.05)
        if previous is not None:  # each step's info is the caller's: the next step leaves it as it was
            assert np.array_equal(previous[0]["tcp"], previous[1])
        previous = (info, info["tcp"].copy())
        if terminated or truncated:
            env.reset()


def test_sim_info_is_the_kernels_copy_of_the_step_outputs_with_gradients():
    sim = FrankaReach()
    q = torch.tensor([[0.1, -0.6, 0.0, -2.2, 0.0, 1.6, 0.8], [0.0, -0.9, 0.2, -2.5, 0.1, 1.4, 0.7]])
    state = sim.state_type(q=q, goal=torch.tensor([[0.5, 0.1, 0.3], [0.4, -0.2, 0.5]]),
                           step=torch.zeros(2, dtype=torch.int32))
    action = torch.full((2, 7), 0.4, requires_grad=True)
    out = sim.step(state, action)
    info = sim.info(out)
    assert list(info) == ["tcp", "goal", "distance"]
    assert torch.equal(info["tcp"], out.obs[:, 7:10]) and torch.equal(info["goal"], state.goal)
    assert torch.equal(info["distance"], -out.reward)
    (through_info,) = torch.autograd.grad(info["distance"].sum(), action, retain_graph=True)
    (through_reward,) = torch.autograd.grad(-out.reward.sum(), action)
    assert torch.equal(through_info, through_reward)


@wp.kernel
def _info_named_wrong(q: wp.array(dtype=vec7), goal: wp.array(dtype=wp.vec3), step: wp.array(dtype=wp.int32),
                      obs: wp.array2d(dtype=float), reward: wp.array(dtype=float), p: FrankaReachParams,
                      distance: wp.array(dtype=float)):
    distance[wp.tid()] = -reward[wp.tid()]


def test_an_info_kernel_breaking_the_contract_is_refused_in_one_line():
    with pytest.raises(TaskContractError, match=r"^BrokenReach.info_kernel \('_info_named_wrong'\) must write one "
                                                r"or more outputs named 'info_<key>' after its wp.struct argument "
                                                r"\(inputs: q, goal, step, obs, reward, <params>\), got outputs "
                                                r"\['distance'\]$"):
        type("BrokenReach", (FrankaReach,), {"info_kernel": _info_named_wrong})
