"""APG's cheaper paths (issue 27, item 1) give what the plain computations give, bit for bit: the fused
divergence check of a step, the scans on the host, episode returns recorded once per segment, the
segment loss as one autograd node, the multi-tensor Adam step and the column variance of per-env
gradients."""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import pytest
import torch

import diffgym  # noqa: F401  (registers the tasks)
from diffgym.training import OptimizerSpec, make_optimizer, mlp
from diffgym.training.gradients import column_variance
from diffgym.training.optim import adam_step, clip_gradients
from diffgym.training.returns import lambda_returns, piece_discounts, scan_arrays
from diffgym.training.rollout import EnvBatch
from diffgym_apg import segment_actor_loss


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaNs in the same places and zeros of the same sign."""
    return (a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5)) and torch.equal(a.signbit(), b.signbit()))


@pytest.mark.parametrize("task", ["DiffGym/PointNav2D-v0", "DiffGym/FrankaTorqueReach-v0"])
def test_diverged_flags_what_the_finiteness_and_domain_checks_flag(task):
    """Values at, just beyond and far beyond each field's bound, and non-finite ones, in the observation,
    the reward and every float state field (FrankaTorqueReach adds its own joint-limit domain)."""
    venv = gym.make_vec(task, num_envs=4, vectorization_mode="vector_entry_point")
    venv.reset(seed=0)
    sim = venv.sim
    out = sim.step(venv.get_state(), torch.zeros(4, sim.act_dim))
    fields = [name for name in sim.state_type.field_names() if name != "step"]
    bounds = [float(b) for b in sim.state_bounds.values()]
    values = [float("nan"), float("inf"), -float("inf"), 3.4028234e38, 1e30,
              *[b * s for b in bounds for s in (1.0, -1.0, 1.0000001, 0.9999999)]]
    generator = torch.Generator().manual_seed(0)
    checked = flagged = 0
    for value in values:
        for target in ["obs", "reward", *fields]:
            env = int(torch.randint(4, (1,), generator=generator))
            state = out.state
            obs, reward = out.obs.clone(), out.reward.clone()
            if target in ("obs", "reward"):
                tensor = obs if target == "obs" else reward
            else:
                state = state.replace(**{target: getattr(state, target).clone()})
                tensor = getattr(state, target)
            tensor[env].view(-1)[int(torch.randint(tensor[env].numel(), (1,), generator=generator))] = value
            changed = dataclasses.replace(out, state=state, obs=obs, reward=reward)
            expected = ~(torch.isfinite(obs).all(dim=1) & torch.isfinite(reward)) | sim.outside_domain(state)
            assert torch.equal(sim.diverged(changed), expected), (target, value)
            checked, flagged = checked + 1, flagged + int(expected.any())
    assert 0 < flagged < checked  # both outcomes were exercised


def test_scans_on_the_host_give_the_bits_of_the_torch_loop():
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        rewards = torch.randn(40, 5, generator=generator, dtype=dtype) * 10.0
        tails = torch.randn(40, 5, generator=generator, dtype=dtype)
        cut = torch.rand(40, 5, generator=generator) < 0.1
        assert scan_arrays(rewards, cut)[0] is not torch  # NumPy views where no gradient is asked
        for gamma, lam in [(0.995, 0.95), (0.99, 1.0), (0.97 * 0.95, 1.0)]:
            with torch.no_grad():
                host = lambda_returns(rewards, tails, cut, gamma, lam)
                discounts = piece_discounts(cut, gamma, dtype)
            # a gradient asked of the rewards keeps the torch loop
            looped = lambda_returns(rewards.clone().requires_grad_(True), tails, cut, gamma, lam)
            assert looped.requires_grad and same_bits(host, looped.detach())
            with torch.enable_grad():
                assert scan_arrays(rewards.clone().requires_grad_(True))[0] is torch
            torch_discounts = torch.empty_like(discounts)
            discount = torch.ones(5, dtype=dtype)
            for t in range(40):
                torch_discounts[t] = discount
                discount = torch.where(cut[t], torch.ones_like(discount), gamma * discount)
            assert same_bits(discounts, torch_discounts)


def test_a_segment_is_recorded_as_its_steps_one_by_one():
    venv = gym.make_vec("DiffGym/PointMass1D-v0", num_envs=3, vectorization_mode="vector_entry_point")
    stepwise, segment = EnvBatch(venv, 0, torch.device("cpu")), EnvBatch(venv, 0, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(6, 3, generator=generator)
    done = torch.rand(6, 3, generator=generator) < 0.3
    expected = torch.stack([stepwise.record(r, d) for r, d in zip(rewards, done)])
    assert same_bits(segment.record(rewards, done), expected)
    assert same_bits(segment.episode_return, stepwise.episode_return)
    assert torch.equal(segment.episode_length, stepwise.episode_length)
    # both against the torch formula record() had before issue 27 (one step at a time)
    running, length, returns = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.int64), []
    for reward, ended in zip(rewards, done):
        returns.append(running + reward.double())
        running = returns[-1].masked_fill(ended, 0.0)
        length = (length + 1).masked_fill(ended, 0)
    assert same_bits(expected, torch.stack(returns))
    assert same_bits(segment.episode_return, running) and torch.equal(segment.episode_length, length)


def looped_segment_loss(rewards, next_values, terminated, truncated, gamma):
    """The segment loss as the loop autograd records step by step (the definition before issue 27)."""
    num_steps, num_envs = rewards.shape
    done = terminated | truncated
    discounts = piece_discounts(done, gamma, rewards.dtype)
    piece_ends = done.clone()
    piece_ends[-1] = True
    zeros = torch.zeros(num_envs, dtype=rewards.dtype)
    piece_return, total = zeros, torch.zeros((), dtype=rewards.dtype)
    for t in range(num_steps):
        piece_return = piece_return + discounts[t] * rewards[t]
        tail = torch.where(terminated[t], zeros, gamma * discounts[t] * next_values[t])
        total = total + torch.where(piece_ends[t], piece_return + tail, zeros).sum()
        piece_return = torch.where(done[t], zeros, piece_return)
    return -total / (num_envs * num_steps)


@pytest.mark.parametrize("seed", range(3))
def test_the_segment_loss_is_one_node_with_the_gradients_of_the_loop(seed):
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(30, 4, generator=generator) * 3.0
    rewards[:, 1] = 0.0  # zero gradients and zero terms keep their signs as well
    values = torch.randn(30, 4, generator=generator)
    terminated = torch.rand(30, 4, generator=generator) < 0.08
    truncated = (torch.rand(30, 4, generator=generator) < 0.08) & ~terminated
    results = []
    for loss_of in (segment_actor_loss, looped_segment_loss):
        leaves = rewards.clone().requires_grad_(True), values.clone().requires_grad_(True)
        loss = loss_of(leaves[0] * 1.0, leaves[1] * 1.0, terminated, truncated, 0.99)  # non-leaf, as in an unroll
        results.append((loss.detach(), *torch.autograd.grad(loss * 0.37, leaves)))
        if loss_of is segment_actor_loss:
            assert type(loss.grad_fn).__name__ == "_SegmentLossBackward"  # one node, not ~10 per step
    for fast, looped in zip(*results):
        assert same_bits(fast, looped)


def test_adam_step_and_the_clip_give_torchs_bits():
    torch.manual_seed(0)
    spec = OptimizerSpec(lr=1e-3, max_grad_norm=0.5)
    networks = [mlp(4, (64, 64), 2, "tanh", 0.01) for _ in range(2)]
    networks[1].load_state_dict(networks[0].state_dict())
    params = [list(network.parameters()) for network in networks]
    optimizers = [make_optimizer(p, spec) for p in params]
    for step in range(30):
        grads = [torch.randn_like(p) * 10.0 ** (step % 5 - 2) for p in params[0]]
        for group in params:
            for i, (p, g) in enumerate(zip(group, grads)):
                p.grad = None if step % 7 == 3 and i == 2 else g.clone()  # a parameter without a gradient
        norm = float(torch.nn.utils.clip_grad_norm_([p for p in params[0] if p.grad is not None], spec.max_grad_norm))
        optimizers[0].step()
        assert clip_gradients(params[1], spec) == norm
        adam_step(optimizers[1])
    for a, b in zip(*params):
        assert same_bits(a.detach(), b.detach())
    states = [optimizer.state_dict()["state"] for optimizer in optimizers]
    for index, state in states[0].items():
        for key, value in state.items():
            assert same_bits(value, states[1][index][key])


def test_column_variance_gives_the_bits_of_torchs_var():
    generator = torch.Generator().manual_seed(0)
    for rows in (2, 3, 4, 8, 64):
        for columns in (1, 2, 17, 4612):
            for scale in (1e-9, 1.0, 1e7):
                samples = (torch.randn(rows, columns, generator=generator, dtype=torch.float64) * scale
                           + float(torch.randn(1, generator=generator)) * scale)
                if rows == 4:  # an exploding gradient: non-finite entries
                    samples[0, 0], samples[-1, -1] = float("inf"), float("nan")
                assert same_bits(column_variance(samples), samples.var(dim=0, unbiased=True)), (rows, columns)


def test_adam_step_leaves_an_optimizer_with_step_hooks_to_its_own_step():
    network = mlp(3, (8,), 1, "tanh", 1.0)
    optimizer = make_optimizer(network.parameters(), OptimizerSpec(lr=1e-3))
    calls = []
    optimizer.register_step_post_hook(lambda *args: calls.append(1))
    for _ in range(3):
        for p in network.parameters():
            p.grad = torch.ones_like(p)
        adam_step(optimizer)
    assert len(calls) == 3  # every step ran the hook, not only the first (which creates the state)
