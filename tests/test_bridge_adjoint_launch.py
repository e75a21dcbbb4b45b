"""The bridge's adjoint launch on the CPU keeps its arguments packed between calls (``_PackedCpuAdjoint``):
each backward must still see its own call's tensors and gradients, with a null adjoint wherever autograd
brings none, and a launch inside a CPU graph capture must refuse rather than run unrecorded."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch
import warp as wp

import diffgym  # noqa: F401
from diffgym.core import bridge


def _gradients(sim, state, action, wants: str):
    """The gradients of one step's loss that uses the outputs ``wants`` names, with respect to the action
    and, where ``wants`` says so, the state's position and velocity."""
    pos = state.pos.detach().clone().requires_grad_("pos" in wants)
    vel = state.vel.detach().clone().requires_grad_("vel" in wants)
    leaf = action.detach().clone().requires_grad_(True)
    out = sim._step(type(state)(pos, vel, state.goal, state.step), leaf)
    loss = out.reward.sum()
    if "obs" in wants:
        loss = loss + (out.obs * torch.linspace(-1.0, 1.0, out.obs.shape[1])).sum()
    if "next" in wants:
        loss = loss + out.state.pos.square().sum() - out.state.vel.sum()
    loss.backward()
    return [t.grad for t in (leaf, pos, vel) if t.requires_grad]


def test_packed_adjoint_follows_each_calls_gradients(monkeypatch):
    """One cached plan, backwards whose adjoint arrays switch between null and real from call to call (the
    observation's, the next state's, the position's and velocity's): each equals the backward that Warp's own
    ``Launch.launch`` gives on a plan recorded for that call alone."""
    venv = gym.make_vec("DiffGym/PointNav2D-v0", num_envs=3)
    venv.reset(seed=0)
    sim, state = venv.sim, venv.get_state()
    action = torch.tensor([[0.3, -0.2], [0.9, 0.1], [-0.5, 0.5]])
    sequence = ["obs pos", "", "next vel", "obs next pos vel", "", "obs"]
    bridge._plans.clear()
    on_one_plan = [_gradients(sim, state, action + 0.1 * n, wants) for n, wants in enumerate(sequence)]
    (plan,) = bridge._plans[sim.step_kernel].values()
    assert isinstance(plan.adjoint_packed, bridge._PackedCpuAdjoint)
    monkeypatch.setattr(bridge._PackedCpuAdjoint, "usable", staticmethod(lambda launch, wp_device: False))
    for n, wants in enumerate(sequence):
        bridge._plans.clear()  # a plan recorded for this call alone, launched by ``Launch.launch``
        unpacked = _gradients(sim, state, action + 0.1 * n, wants)
        (plan,) = bridge._plans[sim.step_kernel].values()
        assert plan.adjoint_packed is None and len(unpacked) == len(on_one_plan[n])
        for packed, reference in zip(on_one_plan[n], unpacked):
            assert torch.equal(packed, reference), wants
    # the calls really differed: a gradient that reaches the observation changes the action's
    assert not torch.equal(on_one_plan[1][0], _gradients(sim, state, action + 0.1, "obs")[0])


def test_packed_adjoint_refuses_a_cpu_graph_capture():
    venv = gym.make_vec("DiffGym/PointNav2D-v0", num_envs=2)
    venv.reset(seed=0)
    sim, state = venv.sim, venv.get_state()
    _gradients(sim, state, torch.zeros(2, 2), "")  # the adjoint launch is recorded and packed outside the capture
    leaf = torch.zeros(2, 2, requires_grad=True)
    loss = sim._step(state, leaf).reward.sum()
    with pytest.raises(RuntimeError, match="cannot be recorded in a CPU graph capture"):
        with wp.ScopedCapture(device="cpu"):
            loss.backward()
    assert leaf.grad is None and not wp.get_device("cpu").is_capturing  # the capture ended with the error


def test_packed_adjoint_is_used_only_on_the_warp_release_it_reads(monkeypatch):
    venv = gym.make_vec("DiffGym/PointNav2D-v0", num_envs=2)
    venv.reset(seed=0)
    sim, state = venv.sim, venv.get_state()
    action = torch.tensor([[0.3, -0.2], [0.9, 0.1]])
    bridge._plans.clear()
    packed = _gradients(sim, state, action, "obs pos")
    monkeypatch.setattr(wp.config, "version", "1.20.0")
    bridge._plans.clear()
    unpacked = _gradients(sim, state, action, "obs pos")
    (plan,) = bridge._plans[sim.step_kernel].values()
    assert plan.adjoint_packed is None  # another release: Warp's own Launch.launch
    assert all(torch.equal(a, b) for a, b in zip(packed, unpacked))
    bridge._plans.clear()


# ------------------------------------------------------------------------ output gradients left uncloned
@wp.func
def _double(value: float):
    return 2.0 * value


@wp.kernel
def _outputs_of_every_kind(x: wp.array(dtype=float), stored: wp.array(dtype=float),
                           stored_2d: wp.array2d(dtype=float), read_back: wp.array(dtype=float),
                           added_to: wp.array(dtype=float), atomic: wp.array(dtype=float),
                           component: wp.array(dtype=wp.vec2), passed_on: wp.array(dtype=float)):
    i = wp.tid()
    stored[i] = _double(x[i])
    stored_2d[i, 0] = x[i]
    stored_2d[i, 1] = 3.0 * x[i]
    read_back[i] = x[i]
    added_to[i] = read_back[i] * x[i]
    added_to[i] += x[i]
    wp.atomic_add(atomic, i, x[i])
    component[i][0] = x[i]
    _fill(passed_on, i, x[i])


@wp.func
def _fill(out: wp.array(dtype=float), i: int, value: float):
    out[i] = value


def test_only_outputs_the_kernel_just_stores_to_are_marked_read_only():
    assert bridge.outputs_only_stored(_outputs_of_every_kind, 7) == (True, True, False, False, False, False, False)


def test_a_gradient_the_adjoint_reads_is_passed_and_one_it_may_write_is_cloned():
    """Backward with caller-given output gradients: every one of them is unchanged afterwards, and the
    input's gradient is the kernel's derivative, whether the bridge passed a gradient as it is (outputs only
    stored to) or cloned it (an output read back, whose adjoint the launch accumulates into)."""
    x = torch.tensor([0.5, -1.0, 2.0]).requires_grad_(True)
    specs = [bridge.Out((3,)), bridge.Out((3, 2)), bridge.Out((3,)), bridge.Out((3,)), bridge.Out((3,)),
             bridge.Out((3, 2)), bridge.Out((3,))]
    outputs = bridge.warp_call(_outputs_of_every_kind, 3, [x], [], specs)
    weights = [torch.full(o.shape, float(n + 1)) for n, o in enumerate(outputs)]
    given = [w.clone() for w in weights]
    torch.autograd.backward([o for o in outputs], given)
    for before, after in zip(weights, given):
        assert torch.equal(before, after)
    w = [float(n + 1) for n in range(len(outputs))]
    # d/dx of w0*2x + w1*(x + 3x) + w2*x + w3*(x*x + x) + w4*x (the atomic add) + w5*x (component 0) + w6*x
    expected = (2 * w[0] + 4 * w[1] + w[2] + w[3] * (2 * x.detach() + 1) + w[4] + w[5] + w[6])
    torch.testing.assert_close(x.grad, expected)
