"""APG's proximal likelihood-ratio path: clipped-surrogate epochs over the segments APG has collected.

The analytic gradient is exact but local: on TPush it leads every first-order learner onto whichever
face of the T the pusher reaches first (``docs/apg.md``). Choosing the face is a discrete decision that
only a zeroth-order estimator, judging sampled actions by the returns they led to, can make. APG's
one-step likelihood-ratio path (``estimator: likelihood``) spends each segment's samples on a single
gradient step; this path reuses them as PPO does (Schulman et al. 2017): every ``proximal_horizon`` steps
the segments collected since the last update, with their GAE(lambda) advantages from APG's own critic,
are replayed for ``proximal_epochs`` passes of minibatch steps on the clipped surrogate.

With ``estimator: analytic`` each segment still takes its analytic step as well (first-order steps
within a contact mode, zeroth-order steps between modes: the division of labour of Suh et al.'s
alpha-order estimator and of GI-PPO, Son et al. 2023); ``estimator: proximal`` takes none (the
zeroth-order ablation: no simulator gradient, no tape).

All tensors are time-major ``(T, N, ...)`` as in ``losses.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from diffgym.training import ActorCritic, NormalizerSpec, ObservationNormalizer, OptimizerSpec, clip_gradients

BUFFER_FIELDS = ("obs_normalized", "pre_squash", "old_log_prob", "values", "next_values", "start_obs", "rewards",
                 "terminated", "truncated", "valid")
"""What each collected segment leaves for the clipped epochs (see :meth:`ProximalBuffer.add`)."""


@torch.no_grad()
def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor,
                   terminated: torch.Tensor, truncated: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """GAE(lambda) advantages ``(T, N)`` (Schulman et al. 2016) of the steps of contiguous segments.

    ``delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)``, with ``V(s_{t+1})`` zero after a termination and the
    value of the pre-reset observation after a truncation; ``A_t = delta_t + gamma * lam * A_{t+1}``,
    the recursion cut at every episode end and closed by the last step's ``delta`` (its ``V(s_{t+1})``
    is the bootstrap).
    """
    done = terminated | truncated
    next_values = torch.where(terminated, torch.zeros_like(next_values), next_values)
    deltas = rewards + gamma * next_values - values
    advantages = torch.empty_like(rewards)
    following = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        following = deltas[t] + gamma * lam * torch.where(done[t], torch.zeros_like(following), following)
        advantages[t] = following
    return advantages


def clipped_surrogate_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                           clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's ``-mean(min(rho A, clip(rho, 1 - eps, 1 + eps) A))`` and the fraction of clipped ratios."""
    ratio = (log_prob - old_log_prob).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_range, 1.0 + clip_range) * advantages
    fraction_clipped = ((ratio - 1.0).abs() > clip_range).float().mean()
    return -torch.minimum(unclipped, clipped).mean(), fraction_clipped


class ReturnScale:
    """A running standard deviation of the discounted return, the scale SB3's ``VecNormalize`` divides
    rewards by: every env accumulates ``ret <- gamma * ret + r`` (restarted after an episode end), and
    the variance of all ``ret`` values seen so far is kept by the shared running statistics
    (:class:`ObservationNormalizer`'s update, over a one-dimensional "observation")."""

    def __init__(self, num_envs: int, gamma: float, epsilon: float = 1e-8):
        self.gamma = gamma
        self.returns = torch.zeros(num_envs, dtype=torch.float64)
        self.stats = ObservationNormalizer(1, NormalizerSpec(epsilon=epsilon))
        self.stats.count.fill_(epsilon)  # SB3's prior: variance 1 with weight epsilon

    @property
    def scale(self) -> float:
        return math.sqrt(float(self.stats.var) + self.stats.spec.epsilon)

    def update(self, rewards: torch.Tensor, done: torch.Tensor) -> None:
        """Fold a segment's ``rewards`` / ``done`` ``(K, N)`` in (non-finite rewards count as zero)."""
        rewards = torch.where(torch.isfinite(rewards), rewards, 0.0).detach().cpu().double()
        done = done.cpu()
        seen = []
        for t in range(rewards.shape[0]):
            self.returns = self.gamma * self.returns + rewards[t]
            seen.append(self.returns.clone())
            self.returns = torch.where(done[t], 0.0, self.returns)
        self.stats.update(torch.stack(seen).reshape(-1, 1))

    def state_dict(self) -> dict[str, Any]:
        return {"returns": self.returns, "stats": self.stats.state_dict()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.returns = saved["returns"]
        self.stats.load_state_dict(saved["stats"])


class ProximalBuffer:
    """The segments collected since the last clipped update, detached, in the order they were taken."""

    def __init__(self) -> None:
        self.segments: list[dict[str, torch.Tensor]] = []

    @property
    def steps(self) -> int:
        """Steps per env held."""
        return sum(int(s["rewards"].shape[0]) for s in self.segments)

    def add(self, model: ActorCritic, normalizer: ObservationNormalizer, segment: Any, valid: torch.Tensor,
            value_scale: float = 1.0) -> None:
        """Keep a segment; call it right after the unroll, before any policy or value step, so the
        log-probabilities are those of the policy that drew the actions and the values those of a value
        network not yet fitted to these very returns (fitted first, it would explain part of every
        advantage away). Rewards are kept divided by ``value_scale`` as it is now, values as the network
        gives them: both in the value network's units, as SB3's ``VecNormalize`` scales each reward when
        it is collected (the alternative, dividing by the scale at the update, is measured in
        ``docs/apg.md``). ``valid`` (N,) marks the envs whose segment is finite (the others are left out of the clipped
        epochs)."""
        with torch.no_grad():
            old_log_prob = model.log_prob(segment.obs_normalized, segment.pre_squash)
            next_obs = segment.next_obs.detach()
            next_values = model.value(normalizer(torch.where(torch.isfinite(next_obs), next_obs, 0.0)))
            self.segments.append({
                "obs_normalized": segment.obs_normalized.detach(), "pre_squash": segment.pre_squash.detach(),
                "old_log_prob": old_log_prob, "values": model.value(segment.obs_normalized),
                "next_values": next_values, "start_obs": segment.start_obs.detach(),
                "rewards": segment.rewards.detach() / value_scale,
                "terminated": segment.terminated, "truncated": segment.truncated,
                "valid": valid.expand_as(segment.terminated).clone()})

    def take(self) -> dict[str, torch.Tensor]:
        """All held steps, concatenated along time, and empty the buffer."""
        batch = {key: torch.cat([s[key] for s in self.segments]) for key in BUFFER_FIELDS}
        self.segments = []
        return batch

    def state_dict(self) -> list[dict[str, torch.Tensor]]:
        return [dict(s) for s in self.segments]

    def load_state_dict(self, saved: list[dict[str, torch.Tensor]]) -> None:
        self.segments = [dict(s) for s in saved]


def proximal_update(model: ActorCritic, normalizer: ObservationNormalizer, optimizer: torch.optim.Optimizer,
                    actor_params: list[nn.Parameter], batch: dict[str, torch.Tensor], *, gamma: float, lam: float,
                    epochs: int, minibatch_size: int, clip_range: float, entropy_coef: float,
                    optimizer_spec: OptimizerSpec, critic_params: list[nn.Parameter] | None = None,
                    value_coef: float = 0.5) -> dict[str, float]:
    """Clipped-surrogate epochs on ``batch`` (from :meth:`ProximalBuffer.take`); returns the statistics.

    Advantages are GAE over the batch's contiguous steps, from the values recorded at collection (as SB3
    and CleanRL compute them), normalized per minibatch. With ``critic_params`` each minibatch step is
    PPO's joint step: ``surrogate + value_coef * MSE(V, GAE return)``, one gradient clip over actor and
    critic together, one ``optimizer`` over both (it must hold both); the batch is in the value network's
    units (``ProximalBuffer.add``); the value fit's inputs are normalized with the current statistics,
    those the value network is used with next. A step whose gradient is not finite is skipped. Returns
    the mean losses, clip fraction, approximate KL, the minibatch steps taken and how many of them were
    skipped.

    Steps of envs left out (``valid`` false) neither get advantages nor pass anything to the steps
    before them: their TD errors are zero, so the last kept step's advantage is closed by its own next
    value, as at a truncation."""
    with torch.no_grad():
        valid = batch["valid"]
        values = torch.where(valid, batch["values"], 0.0)
        rewards = torch.where(valid, batch["rewards"], 0.0)
        next_values = torch.where(valid, batch["next_values"], 0.0)
        advantages = gae_advantages(rewards, values, next_values, batch["terminated"], batch["truncated"], gamma, lam)
        keep = valid & torch.isfinite(advantages)
        obs, pre_squash = batch["obs_normalized"][keep], batch["pre_squash"][keep]
        old_log_prob, advantages = batch["old_log_prob"][keep], advantages[keep]
        value_inputs = normalizer(batch["start_obs"][keep])
        returns = advantages + values[keep]
    parameters = actor_params + (critic_params or [])
    losses, value_losses, clip_fractions, kls, steps, skipped = [], [], [], [], 0, 0
    for _ in range(epochs):
        order = torch.randperm(advantages.numel(), device=advantages.device)
        for index in order.split(minibatch_size):
            if index.numel() < 2:
                continue  # no advantage spread to normalize
            dist = model.distribution(obs[index])
            log_prob = dist.log_prob(pre_squash[index]).sum(-1)
            adv = advantages[index]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            loss, fraction = clipped_surrogate_loss(log_prob, old_log_prob[index], adv, clip_range)
            if entropy_coef:
                loss = loss - entropy_coef * dist.entropy().sum(-1).mean()
            total = loss
            if critic_params:
                value_loss = (model.value(value_inputs[index]) - returns[index]).square().mean()
                total = loss + value_coef * value_loss
                value_losses.append(float(value_loss.detach()))
            optimizer.zero_grad(set_to_none=True)
            total.backward(inputs=parameters)
            steps += 1
            if math.isfinite(clip_gradients(parameters, optimizer_spec)):
                optimizer.step()
            else:
                skipped += 1
            with torch.no_grad():
                log_ratio = log_prob.detach() - old_log_prob[index]
                kls.append(float(((log_ratio.exp() - 1.0) - log_ratio).mean()))  # the k3 estimator
            losses.append(float(loss.detach()))
            clip_fractions.append(float(fraction))
    optimizer.zero_grad(set_to_none=True)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else math.nan

    return {"proximal_loss": mean(losses), "proximal_clip_fraction": mean(clip_fractions),
            "proximal_approx_kl": mean(kls), "proximal_grad_steps": float(steps),
            "proximal_skipped_steps": float(skipped),
            **({"proximal_value_loss": mean(value_losses)} if critic_params else {})}
