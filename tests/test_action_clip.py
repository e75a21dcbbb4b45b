"""``clip_to_action_box``: ``clamp(-1, 1)``'s values and gradients, without clamp's autograd node where the
action is in the box already (the step's clip, ``DiffSim._step``)."""

import gymnasium as gym
import pytest
import torch

import diffgym  # noqa: F401  (registers the tasks)
from diffgym.core.sim import clip_to_action_box

CASES = {
    "inside": [[0.0, 0.5], [-0.25, 0.999]],
    "on the edges": [[1.0, -1.0], [0.3, 1.0]],
    "outside": [[1.5, -0.2], [-3.0, 0.7]],
    "NaN": [[float("nan"), 0.2], [0.1, -0.4]],
}


@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_are_clamps(case):
    weights = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    grads = []
    values = []
    for clip in (lambda a: a.clamp(-1.0, 1.0), clip_to_action_box):
        action = torch.tensor(CASES[case]).requires_grad_(True)
        clipped = clip(action)
        (clipped * weights).sum().backward()
        values.append(clipped.detach())
        grads.append(action.grad)
    torch.testing.assert_close(values[1], values[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0, equal_nan=True)


def test_skips_the_clamp_only_where_it_would_change_nothing():
    inside = torch.tensor(CASES["on the edges"]).requires_grad_(True)
    assert clip_to_action_box(inside) is inside  # no autograd node of its own
    outside = torch.tensor(CASES["outside"]).requires_grad_(True)
    assert clip_to_action_box(outside).grad_fn is not None
    with torch.no_grad():  # no node to save: the plain clamp
        assert clip_to_action_box(inside) is not inside


def test_step_gradients_through_the_clip_match_clamp():
    """A PointNav2D step's action gradient, actions inside, on the edge and outside the box, equals the
    gradient of the same step fed ``clamp``'s output (which the clip then passes through unchanged)."""
    venv = gym.make_vec("DiffGym/PointNav2D-v0", num_envs=3, device="cpu")
    venv.reset(seed=0)
    sim, state = venv.sim, venv.get_state()
    raw = torch.tensor([[0.2, -0.7], [1.0, -1.0], [2.0, -0.5]])
    grads = []
    for through_clamp in (False, True):
        action = raw.clone().requires_grad_(True)
        fed = action.clamp(-1.0, 1.0) if through_clamp else action
        out = sim.step(state, fed)
        (out.reward.sum() + out.obs.square().sum()).backward()
        grads.append(action.grad)
    venv.close()
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    assert grads[0][2, 0] == 0.0 and grads[0][1].ne(0.0).all()
