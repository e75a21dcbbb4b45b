"""State validation (issue 13, part 3): every task rejects non-finite and out-of-domain states with a
one-line error naming the field, every state inside a task's documented domain steps to finite outputs
with finite gradients, and no kernel guard makes gradients explode (PointNav2D's obstacle centres)."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from diffgym.envs.point_nav_2d import OBSTACLES, PointNav2D
from diffgym.envs.t_push import TPush
from diffgym.testing import tasks_under_test

TASKS = tasks_under_test()  # DIFFGYM_TASKS=my_task:Mine/Task-v0 checks a task of one's own


def reset_state(sim, batch: int = 2):
    return sim.reset(torch.arange(batch, dtype=torch.int32), torch.zeros(batch, dtype=torch.int32))


@pytest.mark.parametrize("env_id", TASKS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_state_fields_are_rejected_by_name(env_id, bad):
    env = gym.make(env_id)
    env.reset(seed=0)
    sim = env.unwrapped
    state = sim.get_state()
    action = torch.zeros(1, env.action_space.shape[0])
    for name, tensor in zip(state.field_names(), state.tensors()):
        if not tensor.is_floating_point():
            continue
        poisoned = tensor.clone()
        poisoned.view(-1)[-1] = bad
        broken = state.replace(**{name: poisoned})
        pattern = rf"^state\.{name} must be finite"
        for call in (lambda: sim.set_state(broken), lambda: sim.differentiable_step(broken, action),
                     lambda: sim.sim.observe(broken)):
            with pytest.raises(ValueError, match=pattern) as error:
                call()
            assert "\n" not in str(error.value)
    # nothing was accepted: the env still steps from its own (finite) state
    obs, *_ = env.step(np.zeros(env.action_space.shape, np.float32))
    assert all(np.isfinite(v).all() for v in (obs.values() if isinstance(obs, dict) else [obs]))


@pytest.mark.parametrize("env_id", TASKS)
def test_states_beyond_the_documented_bounds_are_rejected(env_id):
    env = gym.make(env_id)
    env.reset(seed=0)
    sim = env.unwrapped.sim
    assert sim.state_bounds, "every task documents the bounds of its valid domain"
    state = env.unwrapped.get_state()
    for name, bound in sim.state_bounds.items():
        far = torch.full_like(getattr(state, name), 2 * bound)
        with pytest.raises(ValueError, match=rf"^state\.{name} must lie in \[-"):
            env.unwrapped.set_state(state.replace(**{name: far}))


def random_domain_states(sim, batch: int, seed: int):
    """States spread over (and up to the edges of) a task's validated domain."""
    g = torch.Generator().manual_seed(seed)
    state = reset_state(sim, batch)
    fields = {}
    for name, bound in sim.state_bounds.items():
        tensor = getattr(state, name)
        edge = torch.sign(torch.rand(tensor.shape, generator=g) - 0.5) * bound
        fields[name] = torch.where(torch.rand(tensor.shape, generator=g) < 0.5, edge,
                                   (torch.rand(tensor.shape, generator=g) * 2 - 1) * bound)
    return state.replace(**fields)


@pytest.mark.parametrize("task", ["PointMass1D", "PointNav2D", "FrankaReach"])
def test_extreme_states_inside_the_domain_step_to_finite_values_and_gradients(task):
    sim = gym.make(f"DiffGym/{task}-v0").unwrapped.sim
    state = random_domain_states(sim, 64, seed=0)
    leaves = {n: t.clone().requires_grad_(True) for n, t in zip(state.field_names(), state.tensors())
              if t.is_floating_point()}
    state = state.replace(**leaves)
    action = (torch.rand(64, sim.act_dim, generator=torch.Generator().manual_seed(1)) * 2 - 1).requires_grad_()
    out = sim.step(state, action)
    (out.reward.sum() + out.obs.sum()).backward()
    for tensor in (out.obs, out.reward, *out.state.tensors(), action.grad, *(t.grad for t in leaves.values())):
        assert torch.isfinite(tensor).all()


# ----------------------------------------------------------------------------------------- TPush
def t_push_state(sim, **fields):
    return reset_state(sim, 1).replace(**{k: torch.tensor([v], dtype=torch.float32) for k, v in fields.items()})


@pytest.mark.parametrize("fields, field", [
    ({"block_pos": [0.8, 0.0]}, "block_pos"),       # was: every field NaN after one step
    ({"block_pos": [0.5, 0.0]}, "block_pos"),       # centre inside, bar 10 cm into the wall
    ({"pusher_pos": [0.8, 0.0]}, "pusher_pos"),     # was: every field NaN after one step
    ({"block_vel": [100.0, 0.0]}, "block_vel"),     # was: every field NaN after one step
    ({"pusher_vel": [0.0, -100.0]}, "pusher_vel"),
    ({"block_angvel": 1.0e4}, "block_angvel"),
])
def test_t_push_rejects_states_outside_its_domain(fields, field):
    sim = TPush()
    with pytest.raises(ValueError, match=rf"^state\.{field}( and \w+)? must"):
        sim.step(t_push_state(sim, **fields), torch.zeros(1, 2))


def test_t_push_steps_every_state_of_its_domain_to_finite_values():
    """Poses with the T touching or pressed into a wall up to the domain's slack, pusher at the arena's
    edge, every velocity at its bound: stiff-contact corner cases, still finite (values and gradients)."""
    sim = TPush()
    g = torch.Generator().manual_seed(0)
    batch = 64
    state = reset_state(sim, batch)
    angle = torch.rand(batch, generator=g) * 2 * np.pi
    hull = sim.hull_vertices(torch.zeros(batch, 2), angle)  # body-frame hull rotated by the angle
    # push the block against a random wall until its outermost vertex reaches the domain's edge
    side = torch.randint(0, 4, (batch,), generator=g)
    axis, sign = side % 2, (side // 2) * 2 - 1.0
    reach = (hull[torch.arange(batch), :, axis] * sign[:, None]).max(dim=1).values
    block = torch.zeros(batch, 2)
    block[torch.arange(batch), axis] = sign * (sim.block_vertex_limit - reach - 1e-4)
    bounds = sim.state_bounds
    state = state.replace(
        block_pos=block, block_angle=angle,
        pusher_pos=(torch.rand(batch, 2, generator=g) * 2 - 1) * bounds["pusher_pos"],
        pusher_vel=torch.sign(torch.rand(batch, 2, generator=g) - 0.5) * bounds["pusher_vel"],
        block_vel=torch.sign(torch.rand(batch, 2, generator=g) - 0.5) * bounds["block_vel"],
        block_angvel=torch.sign(torch.rand(batch, generator=g) - 0.5) * bounds["block_angvel"])
    sim.check_state(state)  # the constructed states are inside the domain
    leaves = {n: t.clone().requires_grad_(True) for n, t in zip(state.field_names(), state.tensors())
              if t.is_floating_point()}
    state = state.replace(**leaves)
    action = torch.rand(batch, 2, generator=g) * 2 - 1
    out = sim.step(state, action)
    (out.reward.sum() + out.obs.sum()).backward()
    for tensor in (out.obs, out.reward, *out.state.tensors(), *(t.grad for t in leaves.values())):
        assert torch.isfinite(tensor).all()


# ----------------------------------------------------------------------------------------- PointNav2D
def test_point_nav_2d_gradient_is_bounded_at_and_near_obstacle_centres():
    """The contact normal used to divide by max(distance, 1e-6): 8.9e9 at an obstacle's centre."""
    sim = PointNav2D()
    offsets = torch.tensor([[0.0, 0.0], [1e-7, 0.0], [0.0, -1e-5], [3e-4, 3e-4], [0.02, -0.01], [0.12, 0.0],
                            [0.0, 0.2]])
    pos = (torch.tensor(OBSTACLES[:, None, :2]) + offsets[None]).reshape(-1, 2)
    batch = len(pos)
    state = reset_state(sim, batch).replace(pos=pos.clone().requires_grad_(True), vel=torch.zeros(batch, 2))
    out = sim.step(state, torch.zeros(batch, 2))
    (out.reward.sum() + out.state.pos.sum() + out.state.vel.sum()).backward()
    grad = state.pos.grad
    assert torch.isfinite(grad).all()
    # ~3.5e3 at a centre: the velocity's real sensitivity after being pushed off an unstable equilibrium
    assert float(grad.abs().max()) < 1e4, float(grad.abs().max())


def test_unroll_restarts_envs_that_leave_the_domain_instead_of_failing():
    """A finite state outside the task's valid domain is rejected by the next step, so the shared
    rollout marks such envs diverged and restarts them (here a velocity bound shrunk to 1 mm/s)."""
    from diffgym.training import ActorCritic, NormalizerSpec, ObservationNormalizer, PolicySpec
    from diffgym.training.rollout import EnvBatch, unroll

    venv = gym.make_vec("DiffGym/PointMass1D-v0", num_envs=4, vectorization_mode="vector_entry_point")
    venv.sim.state_bounds = {**venv.sim.state_bounds, "v": 1e-3}
    envs = EnvBatch(venv, 0, torch.device("cpu"))
    torch.manual_seed(0)
    model = ActorCritic(venv.single_observation_space.shape[0], 1, PolicySpec())
    normalizer = ObservationNormalizer(venv.single_observation_space.shape[0], NormalizerSpec())
    rollout, state, _ = unroll(model, normalizer, envs, 5)
    # every env left the domain at least once, and each such step ended its episode
    assert bool(rollout.diverged.all()) and bool(rollout.terminated.any(dim=0).all())
    assert not bool(venv.sim.outside_domain(state).any())
    venv.close()
