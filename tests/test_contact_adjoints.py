"""The contact tasks' step kernels compute the step in one function with a hand-written adjoint
(``exact_step``): its values must stay bit for bit those of ``advance``, the observation and the reward
(``advance`` remains the pre-contact kernels' integrator) and its gradients theirs under Warp's generated
adjoints to float32 round-off, in and out of contact; and each hand-written adjoint of a contact function
must match central differences of that function, in and beyond contact."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
import warp as wp

import diffgym  # noqa: F401
from diffgym.envs import point_nav_2d, t_push


def _point_nav_kernel():
    def reference(pos: wp.array(dtype=wp.vec2), vel: wp.array(dtype=wp.vec2), goal: wp.array(dtype=wp.vec2),
                  action: wp.array2d(dtype=float), mass: wp.array(dtype=float), drag: wp.array(dtype=float),
                  p: point_nav_2d.PointNav2DParams, pos_next: wp.array(dtype=wp.vec2),
                  vel_next: wp.array(dtype=wp.vec2), goal_next: wp.array(dtype=wp.vec2),
                  obs: wp.array2d(dtype=float), reward: wp.array(dtype=float)):
        i = wp.tid()
        applied = p.max_force * wp.vec2(action[i, 0], action[i, 1])
        x, v = point_nav_2d.advance(p, applied, pos[i], vel[i], mass[i], drag[i])
        pos_next[i] = x
        vel_next[i] = v
        goal_next[i] = goal[i]
        o = point_nav_2d.observation(x, v, goal[i], p)
        for k in range(point_nav_2d.OBS_DIM):
            obs[i, k] = o[k]
        r, distance = point_nav_2d.step_reward(x, goal[i], p)
        reward[i] = r

    return wp.kernel(reference, module="unique", module_options={"max_unroll": point_nav_2d.OBS_DIM})


def _t_push_kernel():
    def reference(pusher_pos: wp.array(dtype=wp.vec2), pusher_vel: wp.array(dtype=wp.vec2),
                  block_pos: wp.array(dtype=wp.vec2), block_angle: wp.array(dtype=float),
                  block_vel: wp.array(dtype=wp.vec2), block_angvel: wp.array(dtype=float),
                  action: wp.array2d(dtype=float), block_mass: wp.array(dtype=float),
                  contact_friction: wp.array(dtype=float), table_friction: wp.array(dtype=float),
                  contact_stiffness: wp.array(dtype=float), p: t_push.TPushParams,
                  pusher_pos_next: wp.array(dtype=wp.vec2), pusher_vel_next: wp.array(dtype=wp.vec2),
                  block_pos_next: wp.array(dtype=wp.vec2), block_angle_next: wp.array(dtype=float),
                  block_vel_next: wp.array(dtype=wp.vec2), block_angvel_next: wp.array(dtype=float),
                  obs: wp.array2d(dtype=float), reward: wp.array(dtype=float)):
        i = wp.tid()
        command = p.max_speed * wp.vec2(action[i, 0], action[i, 1])
        xp, vp, xb, theta, vb, omega = t_push.advance(p, command, pusher_pos[i], pusher_vel[i], block_pos[i],
                                                      block_angle[i], block_vel[i], block_angvel[i], block_mass[i],
                                                      contact_friction[i], table_friction[i], contact_stiffness[i])
        pusher_pos_next[i] = xp
        pusher_vel_next[i] = vp
        block_pos_next[i] = xb
        block_angle_next[i] = theta
        block_vel_next[i] = vb
        block_angvel_next[i] = omega
        o = t_push.observation(xp, vp, xb, theta, vb, omega)
        for k in range(11):
            obs[i, k] = o[k]
        r, distance = t_push.step_reward(p, xp, xb, theta, pusher_pos[i], block_pos[i])
        reward[i] = r

    return wp.kernel(reference, module="unique", module_options={"max_unroll": max(t_push.SUBSTEPS, 16)})


def _contact_states(venv, steps: int):
    """States along a rollout that drives every body into the nearest obstacle (PointNav2D) or every
    pusher into the T (TPush) at full action, with those actions."""
    sim, state = venv.sim, venv.get_state()
    states, actions = [], []
    with torch.no_grad():
        for _ in range(steps):
            if hasattr(state, "block_pos"):
                target = state.block_pos - state.pusher_pos
            else:
                centres = torch.as_tensor(point_nav_2d.OBSTACLES[:, :2])
                offsets = centres[None] - state.pos[:, None]
                target = offsets[torch.arange(state.batch_size), offsets.norm(dim=-1).argmin(dim=1)]
            action = target / target.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            states.append(state)
            actions.append(action)
            state = sim._step(state, action).state
    return states, actions


# The arena's outward directions: its four walls, then its four corners (two walls at once)
_OUTWARD = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0],
                         [1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])


def _point_nav_wall_state(venv):
    """32 points pressing into each wall and each corner at full force, 4 per side: 0.5 mm into the wall
    moving outwards at 2 m/s (it passes the spring's 10 mm onset band within the step and is still in the
    wall at its end, where the reward's wall term acts), 12 mm at 1 m/s (also still in at the end), and
    20 mm at 2 m/s and 30 mm at 0.5 m/s (thrown back out of the wall by the end); and the action."""
    state = venv.get_state()
    generator = torch.Generator().manual_seed(4)
    outward = _OUTWARD.repeat_interleave(4, dim=0)
    depth = torch.tensor([0.0005, 0.012, 0.02, 0.03]).repeat(8)
    speed = torch.tensor([2.0, 1.0, 2.0, 0.5]).repeat(8)
    along = 1.5 * (2 * torch.rand(32, generator=generator) - 1)  # along a wall: anywhere but its corners
    limit = point_nav_2d.ARENA_HALF_WIDTH - point_nav_2d.BODY_RADIUS
    pos = torch.where(outward != 0, outward * (limit + depth)[:, None], along[:, None])
    vel = outward / outward.norm(dim=1, keepdim=True) * speed[:, None]
    return type(state)(pos, vel, state.goal, state.step), outward


def _t_push_wall_state(venv):
    """32 TPush states against the walls: the T pressed into each wall (a hull corner 2-8 mm into it, beyond
    the 1 mm onset band) by the pusher on its stem's end and by its own velocity, 4 per wall; the T pressed into
    both walls of each corner of the arena, 2 per corner; the pusher 5-20 mm into each wall and 10 mm into each
    corner at full speed, 1 per side (the T clear of it); and the action."""
    sim, state = venv.sim, venv.get_state()
    generator = torch.Generator().manual_seed(6)
    half, radius = t_push.ARENA_HALF, float(sim.params.pusher_radius)
    depth = torch.tensor([0.002, 0.004, 0.006, 0.008])
    # the T against a wall, its bar towards it (tilted up to 0.3 rad, so a corner leads)
    wall_out = _OUTWARD[:4].repeat_interleave(4, dim=0)
    tilt = 0.3 * (2 * torch.rand(16, generator=generator) - 1)
    wall_angle = torch.atan2(wall_out[:, 1], wall_out[:, 0]) - np.pi / 2 + tilt
    # the T in a corner, at any angle
    corner_out = _OUTWARD[4:].repeat_interleave(2, dim=0)
    corner_angle = 2 * np.pi * torch.rand(8, generator=generator)
    angle = torch.cat([wall_angle, corner_angle])
    outward = torch.cat([wall_out, corner_out])
    corners = sim.hull_vertices(torch.zeros(24, 2), angle)
    sign = torch.where(outward != 0, outward.sign(), torch.zeros(()))
    reach = (corners * sign[:, None]).amax(dim=1)  # each axis's farthest corner towards its wall
    block_depth = torch.cat([depth.repeat(4), depth[[0, 3]].repeat(4)])
    along = 0.2 * (2 * torch.rand(24, generator=generator) - 1)
    block_pos = torch.where(sign != 0, sign * (half + block_depth[:, None] - reach), along[:, None])
    # the pusher on the stem's end (the bar faces the wall), 0.5 mm into it, or clear of the T in a corner
    stem_end = torch.tensor(t_push.STEM_CENTER, dtype=torch.float32) + torch.tensor(
        [0.0, -t_push.STEM_SIZE[1] / 2 - radius + 0.0005])
    c, s = torch.cos(angle), torch.sin(angle)
    on_stem = block_pos + torch.stack([c * stem_end[0] - s * stem_end[1], s * stem_end[0] + c * stem_end[1]], -1)
    pusher_pos = torch.where(torch.arange(24)[:, None] < 16, on_stem,
                             block_pos - 0.25 * outward / outward.norm(dim=1, keepdim=True))
    # the pusher against each wall (5-20 mm in) and each corner (10 mm into both walls), the T near the centre
    pusher_depth = torch.tensor([0.005, 0.01, 0.015, 0.02, 0.01, 0.01, 0.01, 0.01])
    along = 0.3 * (2 * torch.rand(8, 2, generator=generator) - 1)
    pusher_pos = torch.cat([pusher_pos, torch.where(_OUTWARD != 0, _OUTWARD * (half - radius + pusher_depth)[:, None],
                                                    along)])
    action = torch.cat([outward, _OUTWARD])
    block_pos = torch.cat([block_pos, 0.05 * (2 * torch.rand(8, 2, generator=generator) - 1)])
    angle = torch.cat([angle, 2 * np.pi * torch.rand(8, generator=generator)])
    block_vel = torch.cat([0.1 * outward, torch.zeros(8, 2)])
    wall_state = type(state)(pusher_pos, 0.3 * action, block_pos, angle, block_vel,
                             torch.randn(32, generator=generator), state.step)
    sim.check_state(wall_state)  # within the valid domain (the T's corners at most 30 mm into a wall)
    return wall_state, action


def _assert_step_is_the_reference_step(env_id: str, sim, reference, state, action, generator) -> None:
    """``sim._step``'s values from ``state`` under ``action`` equal ``reference``'s (``advance``, the observation
    and the reward, differentiated by a Warp tape) bit for bit, and its gradients of a random weighting of
    every output equal the reference's to float32 round-off."""
    batch = state.batch_size
    physics = [t.clone().requires_grad_(True) for t in sim._default_physics(batch)]
    leaves = [t.clone().requires_grad_(True) for t in state.tensors()[:-1]]
    leaf_action = action.clone().requires_grad_(True)
    out = sim._step(type(state)(*leaves, state.step), leaf_action, physics)
    results = [*out.state.tensors()[:-1], out.obs, out.reward]
    weights = [torch.randn(t.shape, generator=generator) for t in results]
    sum(((t * w).sum() for t, w in zip(results, weights)), torch.zeros(())).backward()

    arrays = [wp.from_torch(t.detach().contiguous(), dtype=arg.type.dtype, requires_grad=True)
              for t, arg in zip([*state.tensors()[:-1], action, *physics], reference.adj.args)]
    outputs = [wp.zeros(t.shape[:1] if arg.type.ndim == 1 else t.shape, dtype=arg.type.dtype, requires_grad=True)
               for t, arg in zip(results, reference.adj.args[-len(results):])]
    tape = wp.Tape()
    with tape:
        wp.launch(reference, batch, inputs=[*arrays, sim.params], outputs=outputs)
    tape.backward(grads={o: wp.from_torch(w.contiguous(), dtype=o.dtype) for o, w in zip(outputs, weights)})

    names = [*state.field_names()[:-1], "obs", "reward"]
    for name, ours, theirs in zip(names, results, outputs):
        assert torch.equal(ours.detach(), wp.to_torch(theirs)), f"{env_id}: {name} differs from the reference's"
    names = [*state.field_names()[:-1], "action", *sim.physical_params]
    for name, leaf, array in zip(names, [*leaves, leaf_action, *physics], arrays, strict=True):
        expected = wp.to_torch(array.grad)
        # float32 round-off: the hand-written adjoint sums the same terms in another order
        torch.testing.assert_close(leaf.grad, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()),
                                   msg=lambda m: f"{env_id}: gradient of {name}: {m}")
    assert leaf_action.grad.abs().max() > 0


@pytest.mark.slow  # compiles a kernel of its own (TPush: 20 unrolled substeps)
@pytest.mark.parametrize("env_id, make_reference, wall_state", [
    ("DiffGym/PointNav2D-v0", _point_nav_kernel, _point_nav_wall_state),
    ("DiffGym/TPush-v1", _t_push_kernel, _t_push_wall_state)])
def test_step_is_the_reference_step_and_its_gradients_to_round_off(env_id, make_reference, wall_state):
    """Free, then in contact with the obstacles or the T, then pressed into the walls and the arena's corners
    (PointNav2D's point; TPush's T, pushed, and its pusher)."""
    venv = gym.make_vec(env_id, num_envs=32, device="cpu")
    venv.reset(seed=5)
    reference = make_reference()
    states, actions = _contact_states(venv, 12)
    generator = torch.Generator().manual_seed(0)
    for state, action in [*zip(states[::3], actions[::3]), wall_state(venv)]:
        _assert_step_is_the_reference_step(env_id, venv.sim, reference, state, action, generator)


def test_t_push_refuses_params_whose_t_is_not_the_outline(monkeypatch):
    """The walls' gradients skip a wall farther from the T's centre of mass than the hull radius measured on
    ``T_OUTLINE``: a sim whose params describe a larger T must not be built."""
    monkeypatch.setattr(t_push, "BAR_HALF", (0.15, 0.025))
    with pytest.raises(ValueError, match="T_OUTLINE"):
        t_push.TPush()


@wp.kernel(module="unique")
def _point_nav_contact_force(pos: wp.array(dtype=wp.vec2), vel: wp.array(dtype=wp.vec2),
                             p: point_nav_2d.PointNav2DParams, force: wp.array(dtype=wp.vec2)):
    i = wp.tid()
    force[i] = point_nav_2d.contact_force(pos[i], vel[i], p)


def _contact_points(count: int, generator: torch.Generator) -> torch.Tensor:
    """Positions penetrating an obstacle, a wall or two walls (a corner) by 2-8 mm (inside the 1 cm onset
    band) or 2-8 cm (beyond it), or clear of everything, in turn."""
    points = []
    for k in range(count):
        depth = (0.002 + 0.006 * torch.rand((), generator=generator)) * (10.0 if k % 2 else 1.0)
        kind = k % 4
        if kind == 0:  # an obstacle, from a random direction
            centre_x, centre_y, radius = point_nav_2d.OBSTACLES[k % point_nav_2d.NUM_OBSTACLES]
            angle = 2 * np.pi * torch.rand((), generator=generator)
            reach = radius + point_nav_2d.BODY_RADIUS - depth
            points.append([centre_x + reach * torch.cos(angle), centre_y + reach * torch.sin(angle)])
        elif kind == 1:  # the right wall
            points.append([1.95 + depth, 1.5 * (2 * torch.rand((), generator=generator) - 1)])
        elif kind == 2:  # the lower left corner
            points.append([-1.95 - depth, -1.95 - 0.5 * depth])
        else:  # free
            points.append([1.5, -0.2])
    return torch.tensor(points, dtype=torch.float32)


def test_point_nav_contact_force_adjoint_matches_central_differences():
    sim = gym.make_vec("DiffGym/PointNav2D-v0", num_envs=1, device="cpu").sim
    generator = torch.Generator().manual_seed(0)
    count = 64
    pos = _contact_points(count, generator)
    vel = 2 * torch.rand(count, 2, generator=generator) - 1
    weights = torch.randn(count, 2, generator=generator)

    def forces(pos_, vel_, tape=None):
        arrays = [wp.from_torch(t.contiguous(), dtype=wp.vec2, requires_grad=True) for t in (pos_, vel_)]
        out = wp.zeros(count, dtype=wp.vec2, requires_grad=True)
        if tape is None:
            wp.launch(_point_nav_contact_force, count, inputs=[*arrays, sim.params], outputs=[out])
            return wp.to_torch(out).double()
        with tape:
            wp.launch(_point_nav_contact_force, count, inputs=[*arrays, sim.params], outputs=[out])
        tape.backward(grads={out: wp.from_torch(weights.contiguous(), dtype=wp.vec2)})
        return [wp.to_torch(a.grad).double() for a in arrays]

    grads = forces(pos, vel, wp.Tape())
    eps = 5e-5  # float32 depths carry ~3e-8 m of round-off, worth ~1e-4 N at k = 4000 N/m: hence the tolerances
    for which, grad in enumerate(grads):
        for axis in range(2):
            shifted = [t.clone() for t in (pos, vel)]
            shifted[which][:, axis] += eps
            upper = shifted[which][:, axis].double()
            plus = (forces(*shifted) * weights).sum(dim=1)
            shifted[which][:, axis] -= 2 * eps
            minus = (forces(*shifted) * weights).sum(dim=1)
            # divided by the float32 inputs' actual spacing, not 2 eps (a 0.15 % difference at 0.5 m)
            central = (plus - minus) / (upper - shifted[which][:, axis].double())
            torch.testing.assert_close(grad[:, axis], central, rtol=1e-2, atol=5.0)
    in_contact = torch.ones(count, dtype=torch.bool)
    in_contact[3::4] = False
    assert (grads[0][~in_contact] == 0).all() and (grads[0][in_contact].norm(dim=1) > 1).all()


def _scalar_launch(kernel, count: int, inputs: list, tape=None):
    """Launch ``kernel(*inputs, out)`` with a (count,) float output: its values (float64), or with ``tape``
    the backward pass of their sum (the inputs' ``.grad``)."""
    out = wp.zeros(count, dtype=float, requires_grad=True)
    if tape is None:
        wp.launch(kernel, count, inputs=inputs, outputs=[out])
        return wp.to_torch(out).double()
    with tape:
        wp.launch(kernel, count, inputs=inputs, outputs=[out])
    tape.backward(grads={out: wp.ones(count, dtype=float)})
    return None


def _taped_values(kernel, tensors: dict, extra_inputs: list, tape=None):
    """``kernel(*tensors, *extra_inputs, out)``'s values (float64), or with ``tape`` the gradients of their
    sum with respect to ``tensors`` (name -> ``(count, width)``)."""
    count = len(next(iter(tensors.values())))
    arrays = {name: wp.from_torch(t.contiguous(), dtype=wp.vec2 if t.dim() == 2 else wp.float32, requires_grad=True)
              for name, t in tensors.items()}
    result = _scalar_launch(kernel, count, [*arrays.values(), *extra_inputs], tape)
    if tape is None:
        return result
    return {name: wp.to_torch(a.grad).double().reshape(count, -1) for name, a in arrays.items()}


def _assert_central_differences(values, inputs: dict, steps: dict, grads: dict) -> None:
    """Check each gradient in ``grads`` (name -> ``(count, width)``) against central differences of
    ``values(inputs)`` (one float64 per element) with the per-input ``steps``: to 1 %, or to 0.2 % of the
    gradient's largest entry, or to the differences' float32 round-off (a few ulps of the values over the
    spacing), whichever is largest."""
    reference = values(inputs).detach()
    count, scale = len(reference), float(reference.abs().max())
    for name, grad in grads.items():
        for axis in range(grad.shape[1]):
            plus, minus = dict(inputs), dict(inputs)
            plus[name], minus[name] = inputs[name].clone(), inputs[name].clone()
            (plus[name][:, axis] if inputs[name].dim() == 2 else plus[name]).add_(steps[name])
            (minus[name][:, axis] if inputs[name].dim() == 2 else minus[name]).sub_(steps[name])
            spacing = (plus[name] - minus[name]).double().reshape(count, -1)[:, axis]
            central = (values(plus) - values(minus)).detach() / spacing
            noise = 4 * 2.0 ** -23 * scale / float(spacing.min())
            torch.testing.assert_close(grad[:, axis], central, rtol=1e-2,
                                       atol=max(2e-3 * float(grad.abs().max()), noise),
                                       msg=lambda m: f"d/d{name}[{axis}]: {m}")


@wp.kernel(module="unique")
def _t_push_box_distance(q: wp.array(dtype=wp.vec2), p: t_push.TPushParams, weights: wp.array(dtype=wp.vec3),
                         point_weights: wp.array(dtype=wp.vec2), out: wp.array(dtype=float)):
    i = wp.tid()
    box = t_push.box_distance(q[i], p.bar_center, p.bar_half, p.corner_smoothing)
    w = weights[i]
    out[i] = w[0] * box.dist + w[1] * box.normal[0] + w[2] * box.normal[1] + wp.dot(point_weights[i], box.point)


def test_t_push_box_distance_adjoint_matches_central_differences():
    """Around the T's bar: near its corners (within a few corner-smoothing widths, where the rounded
    distance's normal turns), off its faces, and inside it."""
    sim = t_push.TPush()
    generator = torch.Generator().manual_seed(0)
    centre, half = torch.tensor(t_push.BAR_CENTER, dtype=torch.float32), torch.tensor([0.1, 0.025])
    corners = centre + half * torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])
    near_corners = corners.repeat(8, 1) + 0.006 * (2 * torch.rand(32, 2, generator=generator) - 1)
    off_faces = centre + torch.tensor([[0.0, 0.04], [0.13, 0.01], [-0.05, -0.03], [0.115, -0.015]])
    inside = centre + torch.tensor([[0.02, 0.01], [-0.09, -0.02], [0.05, 0.02], [0.0, -0.005]])
    q = torch.cat([near_corners, off_faces, inside])
    count = len(q)
    weights = torch.randn(count, 3, generator=generator)
    point_weights = torch.randn(count, 2, generator=generator)

    def values(points, tape=None):
        q_array = wp.from_torch(points.contiguous(), dtype=wp.vec2, requires_grad=True)
        inputs = [q_array, sim.params, wp.from_torch(weights, dtype=wp.vec3),
                  wp.from_torch(point_weights, dtype=wp.vec2)]
        result = _scalar_launch(_t_push_box_distance, count, inputs, tape)
        return result if tape is None else wp.to_torch(q_array.grad).double()

    grad = values(q, wp.Tape())
    eps = 1e-5
    for axis in range(2):
        plus, minus = q.clone(), q.clone()
        plus[:, axis] += eps
        minus[:, axis] -= eps
        central = (values(plus) - values(minus)) / (plus[:, axis].double() - minus[:, axis].double())
        torch.testing.assert_close(grad[:, axis], central, rtol=1e-2, atol=0.05)
    assert float(grad[:32].abs().max()) > 50  # the corners' turning normals are in the gradient


@wp.kernel(module="unique")
def _t_push_block_wall_wrench(xb: wp.array(dtype=wp.vec2), c: wp.array(dtype=float), s: wp.array(dtype=float),
                              vb: wp.array(dtype=wp.vec2), omega: wp.array(dtype=float),
                              stiffness: wp.array(dtype=float), p: t_push.TPushParams,
                              weights: wp.array(dtype=wp.vec3), out: wp.array(dtype=float)):
    i = wp.tid()
    # nonzero running sums, as in a substep after the pusher's contacts
    wrench = t_push.block_wall_wrench(p, xb[i], c[i], s[i], vb[i], omega[i], stiffness[i], wp.vec2(0.5, -0.25), 0.125)
    out[i] = wp.dot(weights[i], wrench)


def test_t_push_block_wall_wrench_adjoint_matches_central_differences():
    """The T's hull corners 0.3-8 mm into each wall (inside and beyond the 1 mm onset band), moving and
    spinning, and a T clear of the walls (no gradient but the running sums')."""
    sim = t_push.TPush()
    generator = torch.Generator().manual_seed(1)
    count = 24
    angles = 2 * np.pi * torch.rand(count, generator=generator)
    outward = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]]).repeat(count // 4, 1)
    depth = torch.tensor([0.0003, 0.0008, 0.002, 0.008]).repeat_interleave(count // 4)
    corners = sim.hull_vertices(torch.zeros(count, 2), angles)
    reach = (corners * outward[:, None]).sum(-1).amax(dim=1)
    xb = outward * (t_push.ARENA_HALF + depth - reach)[:, None]
    xb[-1] = 0.0  # clear of every wall
    inputs = {"xb": xb, "c": torch.cos(angles), "s": torch.sin(angles),
              "vb": 0.3 * torch.randn(count, 2, generator=generator), "omega": torch.randn(count, generator=generator),
              "stiffness": 2000.0 + 8000.0 * torch.rand(count, generator=generator)}
    steps = {"xb": 2e-5, "c": 1e-3, "s": 1e-3, "vb": 1e-3, "omega": 1e-3, "stiffness": 1.0}  # float32: not smaller
    weights = torch.randn(count, 3, generator=generator)

    def values(tensors, tape=None):
        return _taped_values(_t_push_block_wall_wrench, tensors, [sim.params, wp.from_torch(weights, dtype=wp.vec3)],
                             tape)

    grads = values(inputs, wp.Tape())
    _assert_central_differences(values, inputs, steps, grads)
    for name, grad in grads.items():
        assert float(grad[:-1].abs().max()) > 0, name
    assert float(grads["xb"][-1].abs().max()) == 0.0 and float(grads["omega"][-1]) == 0.0


@wp.func
def _contacts_weights(w: wp.array2d(dtype=float), i: int) -> t_push.PusherContacts:
    """Row ``i`` of ``w`` as weights of ``pusher_contacts``' results."""
    adj = t_push.PusherContacts()
    adj.force_p = wp.vec2(w[i, 0], w[i, 1])
    adj.force_b = wp.vec2(w[i, 2], w[i, 3])
    adj.torque_b = w[i, 4]
    adj.impulse_p = wp.vec2(w[i, 5], w[i, 6])
    adj.impulse_b = wp.vec2(w[i, 7], w[i, 8])
    adj.ang_impulse_b = w[i, 9]
    return adj


_GradientRow = wp.types.vector(length=15, dtype=float)


@wp.kernel(module="unique")
def _t_push_pusher_contacts(xp: wp.array(dtype=wp.vec2), vp: wp.array(dtype=wp.vec2), xb: wp.array(dtype=wp.vec2),
                            c: wp.array(dtype=float), s: wp.array(dtype=float), vb: wp.array(dtype=wp.vec2),
                            omega: wp.array(dtype=float), mass: wp.array(dtype=float), inertia: wp.array(dtype=float),
                            friction: wp.array(dtype=float), stiffness: wp.array(dtype=float), p: t_push.TPushParams,
                            weights: wp.array2d(dtype=float), value: wp.array(dtype=float),
                            gradient: wp.array2d(dtype=float)):
    """The weighted sum of ``pusher_contacts``' results, and its gradient by ``pusher_contacts_gradients``."""
    i = wp.tid()
    h = p.dt / float(t_push.SUBSTEPS)
    r = t_push.pusher_contacts(p, h, xp[i], vp[i], xb[i], c[i], s[i], vb[i], omega[i], mass[i], inertia[i],
                               friction[i], stiffness[i])
    w = _contacts_weights(weights, i)
    value[i] = (wp.dot(w.force_p, r.force_p) + wp.dot(w.force_b, r.force_b) + w.torque_b * r.torque_b
                + wp.dot(w.impulse_p, r.impulse_p) + wp.dot(w.impulse_b, r.impulse_b)
                + w.ang_impulse_b * r.ang_impulse_b)
    g_xp, g_vp, g_xb, g_c, g_s, g_vb, g_omega, g_mass, g_inertia, g_friction, g_stiffness = \
        t_push.pusher_contacts_gradients(p, h, xp[i], vp[i], xb[i], c[i], s[i], vb[i], omega[i], mass[i], inertia[i],
                                         friction[i], stiffness[i], r.touching, r.boxes, w)
    row = _GradientRow(g_xp[0], g_xp[1], g_vp[0], g_vp[1], g_xb[0], g_xb[1], g_c, g_s, g_vb[0], g_vb[1], g_omega,
                       g_mass, g_inertia, g_friction, g_stiffness)
    for k in range(15):
        gradient[i, k] = row[k]


def test_t_push_pusher_contacts_gradients_match_central_differences():
    """The pusher on the bar's face and corner, the stem's face, in the concave corner between the boxes and on
    a wall, 0.3-0.8 mm into the 1 mm onset band or 2-8 mm beyond it, sliding and spinning; and clear of all."""
    sim = t_push.TPush()
    radius = float(sim.params.pusher_radius)
    generator = torch.Generator().manual_seed(2)
    bar, stem = torch.tensor(t_push.BAR_CENTER, dtype=torch.float32), torch.tensor(t_push.STEM_CENTER,
                                                                                  dtype=torch.float32)
    depths = [0.0003, 0.0008, 0.003, 0.008]
    diagonal = torch.tensor([-1.0, 1.0]) / 2 ** 0.5
    local, on_wall = [], []
    for depth in depths:
        local += [bar + torch.tensor([0.03, 0.025 + radius - depth]),  # the bar's top face
                  bar + torch.tensor([-0.1, 0.025]) + (radius - depth) * diagonal,  # its top-left corner
                  stem + torch.tensor([0.01, -0.075 - radius + depth]),  # the stem's bottom face
                  torch.tensor([stem[0] + 0.025 + radius - depth, bar[1] - 0.025 - radius + depth])]  # between
        on_wall.append(depth)
    count = len(local) + len(on_wall) + 1
    angles = 2 * np.pi * torch.rand(count, generator=generator)
    xb = 0.1 * (2 * torch.rand(count, 2, generator=generator) - 1)
    rotation = torch.stack([torch.stack([torch.cos(angles), -torch.sin(angles)], -1),
                            torch.stack([torch.sin(angles), torch.cos(angles)], -1)], -2)
    xp = torch.empty(count, 2)
    xp[:len(local)] = xb[:len(local)] + (rotation[:len(local)] @ torch.stack(local)[..., None])[..., 0]
    xp[len(local):-1] = torch.tensor([[t_push.ARENA_HALF - radius + d, 0.2] for d in on_wall])
    xb[len(local):] = torch.tensor([-0.3, -0.3])  # the T far from the pusher on the wall, and from the free one
    xp[-1] = torch.tensor([0.3, 0.3])
    inputs = {"xp": xp, "vp": 0.3 * torch.randn(count, 2, generator=generator), "xb": xb,
              "c": torch.cos(angles), "s": torch.sin(angles), "vb": 0.3 * torch.randn(count, 2, generator=generator),
              "omega": torch.randn(count, generator=generator),
              "mass": 0.5 + 1.5 * torch.rand(count, generator=generator)}
    inputs["inertia"] = inputs["mass"] * float(sim.params.block_inertia_per_mass)
    inputs["friction"] = torch.rand(count, generator=generator)
    inputs["stiffness"] = 2000.0 + 8000.0 * torch.rand(count, generator=generator)
    # float32: steps no smaller; the masses and friction act only through the small friction impulse
    steps = {"xp": 2e-5, "vp": 1e-3, "xb": 2e-5, "c": 1e-3, "s": 1e-3, "vb": 1e-3, "omega": 1e-3, "mass": 0.05,
             "inertia": 5e-5, "friction": 0.01, "stiffness": 1.0}
    weights = torch.randn(count, 10, generator=generator)

    def launch(tensors):
        arrays = [wp.from_torch(t.contiguous(), dtype=wp.vec2 if t.dim() == 2 else wp.float32)
                  for t in tensors.values()]
        value, gradient = wp.zeros(count, dtype=float), wp.zeros((count, 15), dtype=float)
        wp.launch(_t_push_pusher_contacts, count, inputs=[*arrays, sim.params, wp.from_torch(weights)],
                  outputs=[value, gradient])
        return wp.to_torch(value).double(), wp.to_torch(gradient).double()

    gradient = launch(inputs)[1]
    widths = [t.shape[1] if t.dim() == 2 else 1 for t in inputs.values()]
    grads = dict(zip(inputs, gradient.split(widths, dim=1)))  # the kernel's columns, in the inputs' order
    _assert_central_differences(lambda tensors: launch(tensors)[0], inputs, steps, grads)
    assert float(gradient[:-1].abs().amax(dim=1).min()) > 0 and float(gradient[-1].abs().max()) == 0.0


@wp.kernel(module="unique")
def _t_push_reward(xp: wp.array(dtype=wp.vec2), xb: wp.array(dtype=wp.vec2), theta: wp.array(dtype=float),
                   prev_pusher: wp.array(dtype=wp.vec2), prev_block: wp.array(dtype=wp.vec2), p: t_push.TPushParams,
                   distance_weight: wp.array(dtype=float), out: wp.array(dtype=float)):
    i = wp.tid()
    result = t_push.step_reward_result(p, xp[i], xb[i], theta[i], prev_pusher[i], prev_block[i])
    out[i] = result.reward + distance_weight[i] * result.distance


def test_t_push_reward_adjoint_matches_central_differences():
    """The reward with both shapings on: the pusher 0.5 mm into and out of the T's bar (inside the 1 mm onset
    of the approach shaping), 3 mm into and out of it (beyond), where the boxes' distances blend (the concave
    corner), and far from the T; the block near and far from the goal pose."""
    sim = t_push.TPush(shaping_weight=0.1, face_shaping_weight=0.5)
    radius = float(sim.params.pusher_radius)
    generator = torch.Generator().manual_seed(3)
    bar, stem = torch.tensor(t_push.BAR_CENTER, dtype=torch.float32), torch.tensor(t_push.STEM_CENTER,
                                                                                  dtype=torch.float32)
    local = [bar + torch.tensor([0.03, 0.025 + radius + gap]) for gap in (-0.003, -0.0005, 0.0005, 0.003)]
    # in the concave corner, 1 mm nearer the stem or the bar: the boxes' distances blend (smooth_min)
    local += [torch.tensor([stem[0] + 0.025 + radius + gap + skew, bar[1] - 0.025 - radius - gap])
              for gap, skew in ((0.0005, 0.001), (0.002, -0.001))]
    local += [bar + torch.tensor([0.0, 0.2])]
    count = 2 * len(local)
    angles = 2 * np.pi * torch.rand(count, generator=generator)
    xb = torch.cat([0.05 * (2 * torch.rand(count // 2, 2, generator=generator) - 1),  # near the goal
                    0.3 * (2 * torch.rand(count // 2, 2, generator=generator) - 1)])
    rotation = torch.stack([torch.stack([torch.cos(angles), -torch.sin(angles)], -1),
                            torch.stack([torch.sin(angles), torch.cos(angles)], -1)], -2)
    xp = xb + (rotation @ torch.stack(local + local)[..., None])[..., 0]
    inputs = {"xp": xp, "xb": xb, "theta": angles,
              "prev_pusher": xp + 0.01 * torch.randn(count, 2, generator=generator),
              "prev_block": xb + 0.01 * torch.randn(count, 2, generator=generator)}
    steps = {"xp": 2e-5, "xb": 2e-5, "theta": 1e-4, "prev_pusher": 2e-5, "prev_block": 2e-5}
    distance_weight = torch.randn(count, generator=generator)

    def values(tensors, tape=None):
        return _taped_values(_t_push_reward, tensors, [sim.params, wp.from_torch(distance_weight)], tape)

    grads = values(inputs, wp.Tape())
    _assert_central_differences(values, inputs, steps, grads)
    for name, grad in grads.items():
        assert float(grad.abs().max()) > 0, name


_SubstepRow = wp.types.vector(length=10, dtype=float)


@wp.kernel(module="unique")
def _t_push_substeps(xp: wp.array(dtype=wp.vec2), vp: wp.array(dtype=wp.vec2), xb: wp.array(dtype=wp.vec2),
                     theta: wp.array(dtype=float), vb: wp.array(dtype=wp.vec2), omega: wp.array(dtype=float),
                     command: wp.array(dtype=wp.vec2), p: t_push.TPushParams, plain: wp.array2d(dtype=float),
                     recorded: wp.array2d(dtype=float), bits: wp.array2d(dtype=wp.int32)):
    """A substep by ``substep`` (the forward pass's) and by ``substep_record`` (the adjoint's), and the contact
    bits: the recorded ones, then those ``pusher_contacts`` and ``wall_corners_in_reach`` find."""
    i = wp.tid()
    h = p.dt / float(t_push.SUBSTEPS)
    mass = 1.3
    inertia = mass * p.block_inertia_per_mass
    x_p, v_p, x_b, angle, v_b, w = t_push.substep(p, h, command[i], xp[i], vp[i], xb[i], theta[i], vb[i], omega[i],
                                                  mass, inertia, 0.4, 0.3, 6000.0)
    r = t_push.substep_record(p, h, command[i], xp[i], vp[i], xb[i], theta[i], vb[i], omega[i], mass, inertia, 0.4,
                              0.3, 6000.0)
    a = _SubstepRow(x_p[0], x_p[1], v_p[0], v_p[1], x_b[0], x_b[1], angle, v_b[0], v_b[1], w)
    b = _SubstepRow(r.pusher_pos[0], r.pusher_pos[1], r.pusher_vel[0], r.pusher_vel[1], r.block_pos[0],
                    r.block_pos[1], r.block_angle, r.block_vel[0], r.block_vel[1], r.block_angvel)
    for k in range(10):
        plain[i, k] = a[k]
        recorded[i, k] = b[k]
    c = wp.cos(theta[i])
    s = wp.sin(theta[i])
    contacts = t_push.pusher_contacts(p, h, xp[i], vp[i], xb[i], c, s, vb[i], omega[i], mass, inertia, 0.4, 6000.0)
    bits[i, 0] = r.touching
    bits[i, 1] = contacts.touching
    bits[i, 2] = r.wall_corners
    bits[i, 3] = t_push.wall_corners_in_reach(p, xb[i], c, s)


def test_t_push_recorded_substep_is_the_substep_bit_for_bit():
    """``exact_step``'s adjoint integrates with ``substep_record``, which skips the distance to a box the
    pusher is beyond the reach of by a bound, and records the bits of the contacts in reach: its substep
    must be the forward pass's bit for bit, and its bits those the contact code finds, wherever the pusher is
    around the T (4000 poses in and around the boxes' reach, including the bound's edge) and with the T's hull
    corners up to 3 mm on either side of a wall's reach."""
    sim = t_push.TPush()
    generator = torch.Generator().manual_seed(9)
    count = 4000
    angle = 2 * np.pi * torch.rand(count, generator=generator)
    c, s = torch.cos(angle), torch.sin(angle)
    # the pusher anywhere in the T's bounding box grown by 12 mm (5 % of the poses within 2 mm of the bound's edge)
    outline = torch.tensor(t_push.T_OUTLINE, dtype=torch.float32)
    low, high = outline.amin(dim=0) - 0.012, outline.amax(dim=0) + 0.012
    local = low + (high - low) * torch.rand(count, 2, generator=generator)
    # the T with its farthest corner towards a random wall 3 mm short of it to 3 mm into it
    xb = 0.2 * (2 * torch.rand(count, 2, generator=generator) - 1)
    outward = _OUTWARD[:4][torch.randint(0, 4, (count,), generator=generator)]
    reach = (sim.hull_vertices(torch.zeros(count, 2), angle) * outward[:, None]).sum(-1).amax(dim=1)
    depth = 0.006 * torch.rand(count, generator=generator) - 0.003
    along = (xb * outward).sum(-1, keepdim=True)
    xb = xb + (t_push.ARENA_HALF + depth - reach)[:, None] * outward - along * outward
    xp = xb + torch.stack([c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1]], -1)
    vp, vb = 0.3 * torch.randn(count, 2, generator=generator), 0.2 * torch.randn(count, 2, generator=generator)
    omega, command = torch.randn(count, generator=generator), 0.1 * torch.randn(count, 2, generator=generator)
    arrays = [wp.from_torch(t.contiguous(), dtype=wp.vec2 if t.dim() == 2 else wp.float32)
              for t in (xp, vp, xb, angle, vb, omega, command)]
    plain, recorded = wp.zeros((count, 10), dtype=float), wp.zeros((count, 10), dtype=float)
    bits = wp.zeros((count, 4), dtype=wp.int32)
    wp.launch(_t_push_substeps, count, inputs=[*arrays, sim.params], outputs=[plain, recorded, bits])
    assert torch.equal(wp.to_torch(plain), wp.to_torch(recorded))
    bits = wp.to_torch(bits)
    assert torch.equal(bits[:, 0], bits[:, 1]) and torch.equal(bits[:, 2], bits[:, 3])
    # every case is there: each box in reach and out of it, walls' corners in reach and none
    for bit in (1, 2):
        assert 50 < int((bits[:, 0] & bit != 0).sum()) < count - 50
    assert 200 < int((bits[:, 2] != 0).sum()) < count - 200
