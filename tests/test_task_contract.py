"""The task contract (diffgym.core.contract), tried on a tiny task and deliberately broken variants of it.

The toy state has two float fields of the same dtype, ``x`` and ``v``: the bridge passes arguments by
position, so a kernel that swaps them would run and return wrong numbers. The contract rejects it by
name when the sim class is defined.
"""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch
import warp as wp

from diffgym.core.bridge import UnwrittenOutputError, debug_outputs, debug_outputs_enabled
from diffgym.core.contract import TaskContractError
from diffgym.core.env import DiffGymEnv
from diffgym.core.sim import DiffSim, StepOutput
from diffgym.core.state import SimState


@dataclasses.dataclass(eq=False, frozen=True)
class ToyState(SimState):
    x: torch.Tensor
    v: torch.Tensor
    step: torch.Tensor


@wp.struct
class ToyParams:
    dt: float


@wp.struct
class OtherParams:
    dt: float


@wp.kernel
def toy_reset(seed: wp.array(dtype=wp.int32), episode: wp.array(dtype=wp.int32), p: ToyParams,
              # outputs
              x: wp.array(dtype=float), v: wp.array(dtype=float), step: wp.array(dtype=wp.int32)):
    i = wp.tid()
    rng = wp.rand_init(seed[i], episode[i])
    x[i] = wp.randf(rng, -1.0, 1.0)
    v[i] = 0.5
    step[i] = 0


@wp.kernel
def toy_observe(x: wp.array(dtype=float), v: wp.array(dtype=float), step: wp.array(dtype=wp.int32), p: ToyParams,
                # outputs
                obs: wp.array2d(dtype=float)):
    i = wp.tid()
    obs[i, 0] = x[i]
    obs[i, 1] = v[i]


@wp.kernel
def toy_step(x: wp.array(dtype=float), v: wp.array(dtype=float), step: wp.array(dtype=wp.int32),
             action: wp.array2d(dtype=float), p: ToyParams,
             # outputs
             x_next: wp.array(dtype=float), v_next: wp.array(dtype=float), step_next: wp.array(dtype=wp.int32),
             obs: wp.array2d(dtype=float), reward: wp.array(dtype=float), terminated: wp.array(dtype=wp.int32),
             success: wp.array(dtype=wp.int32)):
    i = wp.tid()
    vel = v[i] + action[i, 0] * p.dt
    pos = x[i] + vel * p.dt
    x_next[i] = pos
    v_next[i] = vel
    step_next[i] = step[i] + 1
    obs[i, 0] = pos
    obs[i, 1] = vel
    reward[i] = -pos * pos
    terminated[i] = 0
    success[i] = 0


class ToySim(DiffSim):
    state_type = ToyState
    obs_dim = 2
    act_dim = 1
    dt = 0.1
    default_max_episode_steps = 10
    reset_kernel = toy_reset
    observe_kernel = toy_observe
    step_kernel = toy_step

    def __init__(self, device: str = "cpu", max_episode_steps: int | None = None):
        super().__init__(device, max_episode_steps)
        self.params = ToyParams()
        self.params.dt = self.dt


# ------------------------------------------------------------------- broken variants (all compile)
@wp.kernel
def toy_step_swapped_inputs(v: wp.array(dtype=float), x: wp.array(dtype=float), step: wp.array(dtype=wp.int32),
                            action: wp.array2d(dtype=float), p: ToyParams,
                            # outputs
                            x_next: wp.array(dtype=float), v_next: wp.array(dtype=float),
                            step_next: wp.array(dtype=wp.int32), obs: wp.array2d(dtype=float),
                            reward: wp.array(dtype=float), terminated: wp.array(dtype=wp.int32),
                            success: wp.array(dtype=wp.int32)):
    i = wp.tid()
    x_next[i] = x[i]
    v_next[i] = v[i]
    step_next[i] = step[i] + 1
    obs[i, 0] = x[i]
    reward[i] = 0.0
    terminated[i] = 0
    success[i] = 0


@wp.kernel
def toy_reset_swapped_outputs(seed: wp.array(dtype=wp.int32), episode: wp.array(dtype=wp.int32), p: ToyParams,
                              # outputs
                              v: wp.array(dtype=float), x: wp.array(dtype=float), step: wp.array(dtype=wp.int32)):
    i = wp.tid()
    x[i] = 0.0
    v[i] = 0.0
    step[i] = 0


@wp.kernel
def toy_step_unwritten(x: wp.array(dtype=float), v: wp.array(dtype=float), step: wp.array(dtype=wp.int32),
                       action: wp.array2d(dtype=float), p: ToyParams,
                       # outputs
                       x_next: wp.array(dtype=float), v_next: wp.array(dtype=float),
                       step_next: wp.array(dtype=wp.int32), obs: wp.array2d(dtype=float),
                       reward: wp.array(dtype=float), terminated: wp.array(dtype=wp.int32),
                       success: wp.array(dtype=wp.int32)):
    i = wp.tid()
    x_next[i] = x[i] + v[i] * p.dt  # v_next forgotten
    step_next[i] = step[i] + 1
    obs[i, 0] = x[i]
    reward[i] = 0.0
    terminated[i] = 0
    success[i] = 0


@wp.kernel
def toy_step_sometimes_unwritten(x: wp.array(dtype=float), v: wp.array(dtype=float), step: wp.array(dtype=wp.int32),
                                 action: wp.array2d(dtype=float), p: ToyParams,
                                 # outputs
                                 x_next: wp.array(dtype=float), v_next: wp.array(dtype=float),
                                 step_next: wp.array(dtype=wp.int32), obs: wp.array2d(dtype=float),
                                 reward: wp.array(dtype=float), terminated: wp.array(dtype=wp.int32),
                                 success: wp.array(dtype=wp.int32)):
    i = wp.tid()
    x_next[i] = x[i] + v[i] * p.dt
    if action[i, 0] >= 0.0:  # v_next is left unwritten for every env pushed left (not at the first-use check's 0)
        v_next[i] = v[i]
    step_next[i] = step[i] + 1
    obs[i, 0] = x[i]
    obs[i, 1] = v[i]
    reward[i] = 0.0
    terminated[i] = 0
    success[i] = 0


@wp.kernel
def toy_step_wrong_suffix(x: wp.array(dtype=float), v: wp.array(dtype=float), step: wp.array(dtype=wp.int32),
                          action: wp.array2d(dtype=float), p: ToyParams,
                          # outputs
                          x_new: wp.array(dtype=float), v_new: wp.array(dtype=float),
                          step_new: wp.array(dtype=wp.int32), obs: wp.array2d(dtype=float),
                          reward: wp.array(dtype=float), terminated: wp.array(dtype=wp.int32),
                          success: wp.array(dtype=wp.int32)):
    i = wp.tid()
    x_new[i] = x[i]
    v_new[i] = v[i]
    step_new[i] = step[i] + 1
    obs[i, 0] = x[i]
    reward[i] = 0.0
    terminated[i] = 0
    success[i] = 0


@wp.kernel
def toy_step_nan(x: wp.array(dtype=float), v: wp.array(dtype=float), step: wp.array(dtype=wp.int32),
                 action: wp.array2d(dtype=float), p: ToyParams,
                 # outputs
                 x_next: wp.array(dtype=float), v_next: wp.array(dtype=float), step_next: wp.array(dtype=wp.int32),
                 obs: wp.array2d(dtype=float), reward: wp.array(dtype=float), terminated: wp.array(dtype=wp.int32),
                 success: wp.array(dtype=wp.int32)):
    i = wp.tid()
    x_next[i] = x[i]
    v_next[i] = wp.sqrt(action[i, 0])  # NaN for a negative action: computed, not unwritten
    step_next[i] = step[i] + 1
    obs[i, 0] = x[i]
    obs[i, 1] = v[i]
    reward[i] = 0.0
    terminated[i] = 0
    success[i] = 0


@wp.kernel
def toy_observe_float_step(x: wp.array(dtype=float), v: wp.array(dtype=float), step: wp.array(dtype=float),
                           p: ToyParams,
                           # outputs
                           obs: wp.array2d(dtype=float)):
    i = wp.tid()
    obs[i, 0] = x[i] + step[i]


@wp.kernel
def toy_observe_vec_x(x: wp.array(dtype=wp.vec2), v: wp.array(dtype=float), step: wp.array(dtype=wp.int32),
                      p: ToyParams,
                      # outputs
                      obs: wp.array2d(dtype=float)):
    i = wp.tid()
    obs[i, 0] = x[i][0]


@wp.kernel
def toy_observe_other_params(x: wp.array(dtype=float), v: wp.array(dtype=float), step: wp.array(dtype=wp.int32),
                             p: OtherParams,
                             # outputs
                             obs: wp.array2d(dtype=float)):
    i = wp.tid()
    obs[i, 0] = x[i] * p.dt


@wp.kernel
def toy_observe_missing_obs(x: wp.array(dtype=float), v: wp.array(dtype=float), step: wp.array(dtype=wp.int32),
                            p: ToyParams):
    i = wp.tid()


@wp.kernel
def toy_observe_extra(x: wp.array(dtype=float), v: wp.array(dtype=float), step: wp.array(dtype=wp.int32),
                      p: ToyParams,
                      # outputs
                      obs: wp.array2d(dtype=float), debug: wp.array(dtype=float)):
    i = wp.tid()
    obs[i, 0] = x[i]
    debug[i] = v[i]


def define_sim(**overrides):
    """Define a ToySim subclass with some class attributes replaced (the contract runs on definition)."""
    return type("BrokenSim", (ToySim,), overrides)


# ------------------------------------------------------------------- the contract at definition time
def test_toy_task_satisfies_the_contract_and_derives_shapes():
    assert ToyState.shapes == {"x": (), "v": (), "step": ()}
    sim = ToySim()
    state = sim.reset(torch.arange(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))
    out = sim.step(state, torch.ones(3, 1))
    assert torch.allclose(out.state.v, state.v + 0.1) and torch.allclose(out.state.x, state.x + out.state.v * 0.1)
    assert out.state.step.dtype == torch.int32 and (out.state.step == 1).all()


def test_swapped_state_inputs_are_rejected_by_name():
    with pytest.raises(TaskContractError) as error:
        define_sim(step_kernel=toy_step_swapped_inputs)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("BrokenSim.step_kernel ('toy_step_swapped_inputs') argument 0 is named 'v', "
                              "expected 'x'")
    assert "ToyState's field order: x, v, step, action" in message


def test_swapped_state_outputs_are_rejected_by_name():
    with pytest.raises(TaskContractError, match=r"reset_kernel \('toy_reset_swapped_outputs'\) argument 3 is "
                                                r"named 'v', expected 'x'"):
        define_sim(reset_kernel=toy_reset_swapped_outputs)


def test_next_outputs_must_carry_the_next_suffix():
    with pytest.raises(TaskContractError, match=r"step_kernel \('toy_step_wrong_suffix'\) argument 5 is named "
                                                r"'x_new', expected 'x_next'"):
        define_sim(step_kernel=toy_step_wrong_suffix)


def test_never_written_output_is_rejected():
    with pytest.raises(TaskContractError, match=r"step_kernel \('toy_step_unwritten'\) never writes its output "
                                                r"'v_next'"):
        define_sim(step_kernel=toy_step_unwritten)


@pytest.mark.parametrize("kernel, expected", [
    (toy_observe_float_step, r"argument 2 'step' \(state field step\) is array\(ndim=1, dtype=float32\), "
                             r"expected wp.array\(dtype=wp.int32\)"),
    (toy_observe_other_params, r"argument 3 'p' is a OtherParams, but reset_kernel takes a ToyParams"),
    (toy_observe_missing_obs, r"has 4 arguments; argument 4 'obs' is missing"),
    (toy_observe_extra, r"has an unexpected argument 5 'debug'"),
    (toy_observe_vec_x, r"argument 0 'x' has per-env shape \(2,\) \(array\(ndim=1, dtype=vec2f\)\), but "
                        r"reset_kernel gives x the shape \(\)"),
])
def test_wrong_observe_kernels_are_rejected(kernel, expected):
    with pytest.raises(TaskContractError, match=r"BrokenSim.observe_kernel \('%s'\) " % kernel.key + expected):
        define_sim(observe_kernel=kernel)


def test_state_type_and_dimensions_are_checked():
    @dataclasses.dataclass(eq=False, frozen=True)
    class NoStep(SimState):
        x: torch.Tensor

    with pytest.raises(TaskContractError, match="NoStep's last field must be the int32 'step' counter"):
        define_sim(state_type=NoStep)
    with pytest.raises(TaskContractError, match="BrokenSim.default_max_episode_steps must be a positive int"):
        define_sim(default_max_episode_steps=0)
    with pytest.raises(TaskContractError, match="BrokenSim.step_kernel .* must be a @wp.kernel"):
        define_sim(step_kernel=lambda *args: None)


def test_declared_shapes_must_agree_with_the_kernels():
    @dataclasses.dataclass(eq=False, frozen=True)
    class DeclaredState(SimState):
        x: torch.Tensor
        v: torch.Tensor
        step: torch.Tensor
        shapes = {"x": (2,), "v": (), "step": ()}  # x is a float in the kernels

    with pytest.raises(TaskContractError, match=r"DeclaredState.shapes is .* but BrokenSim's kernels give"):
        define_sim(state_type=DeclaredState)


def test_intermediate_class_without_kernels_is_not_checked():
    class Base(DiffSim):
        state_type = ToyState  # kernels come from a subclass

    assert not hasattr(Base, "_field_specs")
    # but it cannot be built: a task that forgot a kernel is told which, not an AttributeError at reset
    with pytest.raises(TaskContractError, match="^Base is not a complete task: it does not define reset_kernel, "
                                                "observe_kernel, step_kernel"):
        Base()


# ------------------------------------------------------------------- the debug mode of the bridge
def test_output_left_unwritten_on_some_paths_fails_in_debug_mode():
    sim = define_sim(step_kernel=toy_step_sometimes_unwritten)()  # passes the static check: v_next is mentioned
    state = sim.reset(torch.arange(4, dtype=torch.int32), torch.zeros(4, dtype=torch.int32))
    action = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    assert not debug_outputs_enabled()
    sim.step(state, action)  # without the debug mode nothing notices
    with debug_outputs():
        assert debug_outputs_enabled()
        sim.step(state, torch.ones(4, 1))  # every env takes the writing branch
        with pytest.raises(UnwrittenOutputError) as error:
            sim.step(state, action)
    assert not debug_outputs_enabled()
    assert str(error.value).startswith("kernel toy_step_sometimes_unwritten: output argument 6 'v_next' was left "
                                       "unwritten in 2 of 4 rows (batch entries [1, 3])")
    # a fused rollout checks every step's outputs the same way (here the second step's)
    with debug_outputs():
        with pytest.raises(UnwrittenOutputError) as error:
            sim.rollout(state, torch.stack([torch.ones(4, 1), action]))
    assert str(error.value).startswith("kernel toy_step_sometimes_unwritten: output argument 6 'v_next' was left "
                                       "unwritten in 2 of 4 rows (batch entries [1, 3])")


def test_first_use_checks_every_task_class_for_writes_past_an_output():
    """An ``obs_dim`` smaller than the columns the kernels write would corrupt memory: each task class's
    first reset runs its kernels once in debug mode, whose guard rows catch it in one line."""
    narrow = define_sim(obs_dim=1)  # toy_observe writes obs[i, 1]
    for _ in range(2):  # not marked checked after a failure: every use says it
        with pytest.raises(UnwrittenOutputError, match=r"^kernel toy_observe: output argument 4 'obs' was written "
                                                       r"past its end \(shape \(1, 1\)\)"):
            narrow().reset(torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(UnwrittenOutputError, match="past its end"):  # the single env (its fast path) too
        type("NarrowEnv", (ToyEnv,), {"sim_class": narrow})().reset(seed=0)
    assert not debug_outputs_enabled()


def test_debug_mode_is_per_thread():
    import threading

    seen, outside = [], debug_outputs_enabled()  # False, or True under DIFFGYM_DEBUG_OUTPUTS=1
    with debug_outputs(not outside):
        worker = threading.Thread(target=lambda: seen.append(debug_outputs_enabled()))
        worker.start()
        worker.join()
        assert debug_outputs_enabled() is not outside
    assert seen == [outside] and debug_outputs_enabled() is outside


def test_debug_mode_tells_computed_nan_from_unwritten():
    sim = define_sim(step_kernel=toy_step_nan)()
    state = sim.reset(torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32))
    with debug_outputs():
        out = sim.step(state, torch.tensor([[-1.0], [1.0]]))  # a computed NaN is written: no error
    assert torch.isnan(out.state.v[0]) and out.state.v[1] == 1.0


# ------------------------------------------------------------------- frozen states and outputs
def test_a_task_without_render_state_says_what_rendering_needs():
    sim = ToySim()
    with pytest.raises(NotImplementedError, match=r"^ToySim does not draw itself: define render_state\(state, "
                                                  r"index\) returning an \(H, W, 3\) uint8 frame"):
        sim.render_state(sim.reset(torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)))


def test_states_and_step_outputs_are_frozen():
    sim = ToySim()
    state = sim.reset(torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.x = torch.zeros(2)
    moved = state.replace(x=torch.ones(2))
    assert torch.equal(moved.x, torch.ones(2)) and not torch.equal(state.x, torch.ones(2))
    out = sim.step(state, torch.zeros(2, 1))
    assert isinstance(out, StepOutput)
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.reward = torch.zeros(2)
    assert torch.equal(dataclasses.replace(out, reward=torch.zeros(2)).reward, torch.zeros(2))


def test_a_mutable_state_subclass_cannot_be_declared():
    with pytest.raises(TypeError, match="non-frozen dataclass"):
        @dataclasses.dataclass(eq=False)
        class Mutable(SimState):
            x: torch.Tensor
            step: torch.Tensor


# ------------------------------------------------------------------- the horizon
class ToyEnv(DiffGymEnv):
    sim_class = ToySim


def test_registered_horizon_must_equal_the_sims():
    env_id = "DiffGymTest/ToyHorizon-v0"
    entry = f"{__name__}:ToyEnv"
    gym.register(env_id, entry, max_episode_steps=25)  # plain gym.register: the sim would keep its 10
    try:
        with pytest.raises(ValueError, match=r"DiffGymTest/ToyHorizon-v0: registered max_episode_steps=25 "
                                             r"\(Gymnasium's TimeLimit\) but ToySim truncates at 10"):
            gym.make(env_id)
        gym.registry.pop(env_id)
        gym.register(env_id, entry, max_episode_steps=25, kwargs={"max_episode_steps": 25})
        env = gym.make(env_id)
        assert env.unwrapped.sim.max_episode_steps == 25
        env.reset(seed=0)
        truncated = [env.step(np.zeros(1, np.float32))[3] for _ in range(25)]
        assert truncated == [False] * 24 + [True]
    finally:
        gym.registry.pop(env_id, None)


# ------------------------------------------------------------------- physical parameters
# ToySim with its time step declared a per-env, differentiable physical parameter: the step kernel takes a
# `dt` array right after `action`, and ToyParams.dt is the default.
@wp.kernel
def toy_step_per_env_dt(x: wp.array(dtype=float), v: wp.array(dtype=float), step: wp.array(dtype=wp.int32),
                        action: wp.array2d(dtype=float), dt: wp.array(dtype=float), p: ToyParams,
                        # outputs
                        x_next: wp.array(dtype=float), v_next: wp.array(dtype=float),
                        step_next: wp.array(dtype=wp.int32), obs: wp.array2d(dtype=float),
                        reward: wp.array(dtype=float), terminated: wp.array(dtype=wp.int32),
                        success: wp.array(dtype=wp.int32)):
    i = wp.tid()
    vel = v[i] + action[i, 0] * dt[i]
    pos = x[i] + vel * dt[i]
    x_next[i] = pos
    v_next[i] = vel
    step_next[i] = step[i] + 1
    obs[i, 0] = pos
    obs[i, 1] = vel
    reward[i] = -pos * pos
    terminated[i] = 0
    success[i] = 0


@wp.kernel
def toy_step_reads_shared_dt(x: wp.array(dtype=float), v: wp.array(dtype=float), step: wp.array(dtype=wp.int32),
                             action: wp.array2d(dtype=float), dt: wp.array(dtype=float), p: ToyParams,
                             # outputs
                             x_next: wp.array(dtype=float), v_next: wp.array(dtype=float),
                             step_next: wp.array(dtype=wp.int32), obs: wp.array2d(dtype=float),
                             reward: wp.array(dtype=float), terminated: wp.array(dtype=wp.int32),
                             success: wp.array(dtype=wp.int32)):
    i = wp.tid()
    vel = v[i] + action[i, 0] * dt[i]
    pos = x[i] + vel * p.dt  # the shared default: the per-env dt would get a wrong (partial) gradient
    x_next[i] = pos
    v_next[i] = vel
    step_next[i] = step[i] + 1
    obs[i, 0] = pos
    obs[i, 1] = vel
    reward[i] = 0.0
    terminated[i] = 0
    success[i] = 0


@wp.kernel
def toy_step_gain(x: wp.array(dtype=float), v: wp.array(dtype=float), step: wp.array(dtype=wp.int32),
                  action: wp.array2d(dtype=float), gain: wp.array(dtype=float), p: ToyParams,
                  # outputs
                  x_next: wp.array(dtype=float), v_next: wp.array(dtype=float),
                  step_next: wp.array(dtype=wp.int32), obs: wp.array2d(dtype=float),
                  reward: wp.array(dtype=float), terminated: wp.array(dtype=wp.int32),
                  success: wp.array(dtype=wp.int32)):
    i = wp.tid()
    x_next[i] = x[i]
    v_next[i] = v[i] + gain[i] * action[i, 0]
    step_next[i] = step[i] + 1
    obs[i, 0] = x[i]
    reward[i] = 0.0
    terminated[i] = 0
    success[i] = 0


def test_declared_physical_parameter_is_a_per_env_differentiable_input():
    sim = define_sim(physical_params=("dt",), step_kernel=toy_step_per_env_dt)()
    state = sim.reset(torch.arange(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))
    action = torch.ones(3, 1)
    default = sim.step(state, action)  # every env uses ToyParams.dt = 0.1
    assert torch.allclose(default.state.v, state.v + 0.1)
    dt = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    out = sim.step(state, action, physics={"dt": dt})
    assert torch.equal(out.state.v[0], default.state.v[0]) and torch.allclose(out.state.v, state.v + dt)
    out.state.x.sum().backward()  # x' = x + (v + a dt) dt: d/d dt = v + 2 a dt
    torch.testing.assert_close(dt.grad, state.v + 2 * dt.detach())


@pytest.mark.parametrize("overrides, expected", [
    ({"physical_params": ("dt",)},  # declared, but the kernel has no `dt` array
     r"BrokenSim.step_kernel \('toy_step'\) argument 4 is named 'p', expected 'dt' \(BrokenSim.physical_params "
     r"\('dt',\) follow 'action': x, v, step, action, dt, <params>"),
    ({"physical_params": (), "step_kernel": toy_step_per_env_dt},  # an array the task did not declare
     r"BrokenSim.step_kernel \('toy_step_per_env_dt'\) argument 4 'dt' must be the task's wp.struct"),
    ({"physical_params": ("dt",), "step_kernel": toy_step_reads_shared_dt},
     r"BrokenSim.step_kernel \('toy_step_reads_shared_dt'\) reads 'p.dt', the shared default of the physical "
     r"parameter 'dt'; read the per-env 'dt\[i\]'"),
    ({"physical_params": ("gain",), "step_kernel": toy_step_gain},
     r"physical parameter 'gain' needs a float field 'gain' in ToyParams \(its default value\), got no such field"),
    ({"physical_params": ("v",)}, r"BrokenSim.physical_params 'v' clashes with a state field"),
    ({"physical_params": "dt"}, r"BrokenSim.physical_params must be a tuple of names, got 'dt'"),
])
def test_wrong_physical_parameters_are_rejected(overrides, expected):
    with pytest.raises(TaskContractError, match=expected):
        define_sim(**overrides)
