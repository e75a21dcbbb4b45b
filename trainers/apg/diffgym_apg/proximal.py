"""The proximal likelihood-ratio path of ``apg-ppo``: PPO's clipped epochs over the segments APG collects
(``algo_params.proximal``, named as PPO's settings are).

The analytic gradient is exact but local: on TPush it leads every first-order learner onto whichever
face of the T the pusher reaches first (``docs/apg.md``). Choosing the face is a discrete decision that
only a zeroth-order estimator, judging sampled actions by the returns they led to, can make. This path
reuses APG's samples as PPO does (Schulman et al. 2017): every ``n_steps`` steps per env the segments
collected since the last update, with GAE(lambda) advantages from the value function, are replayed for
``n_epochs`` passes of minibatch steps on the clipped surrogate. With ``policy_gradient.estimator:
analytic`` each segment still takes its analytic step as well (first-order steps within a contact mode,
zeroth-order steps between modes: Suh et al.'s alpha-order estimator, GI-PPO, Son et al. 2023);
``estimator: none`` takes none (the zeroth-order ablation: no simulator gradient, no tape).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from diffgym.training import ActorCritic, ObservationNormalizer, OptimizerSpec, Rollout, make_optimizer
from diffgym.training.optim import descend
from diffgym.training.returns import clipped_surrogate_loss, gae_advantages

from diffgym_apg.value import ValueFunction

BUFFER_FIELDS = ("obs_normalized", "pre_squash", "old_log_prob", "values", "next_values", "start_obs", "rewards",
                 "terminated", "truncated", "valid")
"""What each collected segment leaves for the clipped epochs (see :meth:`ProximalBuffer.add`)."""


@dataclasses.dataclass
class ProximalConfig:
    """``algo_params.proximal``: SB3 PPO's names and meanings (``trainers/ppo``)."""

    n_steps: int = 400
    """Steps per env collected between updates (the batch is ``num_envs`` times this)."""
    batch_size: int = 512
    """Samples per minibatch step."""
    n_epochs: int = 10
    """Passes over each batch."""
    clip_range: float = 0.2
    """epsilon of the clipped surrogate: the probability ratio is clipped to [1 - epsilon, 1 + epsilon]."""
    gae_lambda: float = 0.95
    """lambda of the GAE advantages."""
    ent_coef: float = 0.0
    """Weight of the policy's entropy bonus."""
    vf_coef: float = 0.5
    """Weight of the value loss in the joint steps (``value.bootstrap: gae``)."""
    learning_rate: float | None = None
    """Adam learning rate of these steps; None: the shared ``optimizer.lr`` (what PPO uses). They have their
    own Adam: their gradients and the analytic ones differ in scale, so they must not share moments."""
    gate_segment_steps: bool = False
    """Take the segment steps only while they agree with this path. At every clipped update the segment
    steps' gradients summed over the rollout are compared with this path's likelihood-ratio gradient of the
    same rollout (logged as ``proximal_segment_agreement``, their cosine); the next rollout's segment steps
    are taken only if it was positive (the first rollout's are). Both estimate the gradient of the same
    expected return, one without bias; where the analytic one points the other way, it follows a local
    feature of the simulator the sampled returns do not confirm (Suh et al.'s bias check, with this path's
    batch as the reference). The comparison costs one more pass over the batch per update. Needs an
    estimator with a segment step."""

    def __post_init__(self) -> None:
        for name, value, bound in (("n_steps", self.n_steps, 1), ("batch_size", self.batch_size, 2),
                                   ("n_epochs", self.n_epochs, 1)):
            if value < bound:
                raise ValueError(f"proximal.{name} must be >= {bound}, got {value}")
        if self.clip_range <= 0:
            raise ValueError(f"proximal.clip_range must be > 0, got {self.clip_range}")
        if not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(f"proximal.gae_lambda must be in [0, 1], got {self.gae_lambda}")
        if self.ent_coef < 0:
            raise ValueError(f"proximal.ent_coef must be >= 0, got {self.ent_coef}")
        if not self.vf_coef >= 0:
            raise ValueError(f"proximal.vf_coef must be >= 0, got {self.vf_coef}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"proximal.learning_rate must be > 0 (or None: the shared optimizer.lr), got "
                             f"{self.learning_rate}")


class ProximalBuffer:
    """The segments collected since the last clipped update, detached, in the order they were taken."""

    def __init__(self) -> None:
        self.segments: list[dict[str, torch.Tensor]] = []

    @property
    def steps(self) -> int:
        """Steps per env held."""
        return sum(int(s["rewards"].shape[0]) for s in self.segments)

    def add(self, model: ActorCritic, normalizer: ObservationNormalizer, segment: Rollout, valid: torch.Tensor,
            value_scale: float = 1.0) -> None:
        """Keep a segment; call it right after the unroll, before any policy or value step, so the
        log-probabilities are those of the policy that drew the actions and the values those of a value
        network not yet fitted to these very returns (fitted first, it would explain part of every
        advantage away). Rewards are kept divided by ``value_scale`` as it is now, values as the network
        gives them: both in the value network's units, as SB3's ``VecNormalize`` scales each reward when
        it is collected (the alternative, dividing by the scale at the update, is measured in
        ``docs/apg.md``). ``valid`` (N,) marks the envs whose segment is finite (the others are left out
        of the clipped epochs)."""
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


class ProximalPath:
    """Collects every segment and, every ``n_steps`` steps per env, takes the clipped epochs over them."""

    def __init__(self, config: ProximalConfig, model: ActorCritic, normalizer: ObservationNormalizer,
                 actor_parameters: list[nn.Parameter], value: ValueFunction, optimizer: OptimizerSpec, gamma: float):
        self.config, self.model, self.normalizer, self.value, self.gamma = config, model, normalizer, value, gamma
        self.actor_parameters = actor_parameters
        # value.bootstrap gae: PPO's joint step, one loss, one clip and one Adam over actor and value network
        self.value_parameters = value.parameters if value.config.bootstrap == "gae" else []
        self.optimizer_spec = optimizer
        self.optimizer = make_optimizer(actor_parameters + self.value_parameters,
                                        dataclasses.replace(optimizer, lr=config.learning_rate or optimizer.lr))
        self.buffer = ProximalBuffer()
        self.segment_gradient: torch.Tensor | None = None
        """The segment steps' gradients summed since the last clipped update (flat, actor parameter order)."""
        self.segment_steps_agree = True
        """Whether the last comparison found them in agreement (``gate_segment_steps``)."""

    def observe_segment_gradient(self) -> None:
        """With ``gate_segment_steps``: add the segment step's gradient, as its estimator wrote it into the
        actor's ``.grad`` (before the clip), to the sum compared at the next update. A gradient that is not
        finite (its step is skipped) is left out, so it cannot spoil the comparison of the whole rollout."""
        if not self.config.gate_segment_steps:
            return
        flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten()
                          for p in self.actor_parameters])
        if not torch.isfinite(flat).all():
            return
        self.segment_gradient = flat.clone() if self.segment_gradient is None else self.segment_gradient + flat

    @property
    def takes_segment_steps(self) -> bool:
        """Whether the segment steps are taken now (always, unless ``gate_segment_steps`` closed them)."""
        return self.segment_steps_agree or not self.config.gate_segment_steps

    def collect(self, segment: Rollout) -> None:
        """Keep a fresh segment (before any step; :meth:`ProximalBuffer.add`)."""
        self.buffer.add(self.model, self.normalizer, segment, segment.finite, self.value.scale)

    @property
    def due(self) -> bool:
        return self.buffer.steps >= self.config.n_steps

    def update(self) -> dict[str, float]:
        """The clipped epochs over everything collected; their statistics. Before them, the segment steps'
        gradients of the same rollout are compared with this path's (``gate_segment_steps``)."""
        batch = self.buffer.take()
        agreement = {}
        if self.segment_gradient is not None:
            reference = likelihood_ratio_gradient(self.model, self.actor_parameters, batch, self.config, self.gamma)
            norms = reference.norm() * self.segment_gradient.norm()
            cosine = float(reference @ self.segment_gradient / norms) if norms > 0 else math.nan
            if math.isfinite(cosine):  # else no comparison (e.g. no step kept): the gate stays as it was
                self.segment_steps_agree = cosine > 0
            agreement = {"proximal_segment_agreement": cosine,
                         "proximal_segment_steps_next": float(self.takes_segment_steps)}
            self.segment_gradient = None
        stats = clipped_epochs(self.model, self.normalizer, self.optimizer, self.actor_parameters, batch,
                               self.config, gamma=self.gamma, optimizer_spec=self.optimizer_spec,
                               value_parameters=self.value_parameters)
        self.value.grad_steps += int(stats["proximal_grad_steps"]) if self.value_parameters else 0
        return {**stats, **agreement}

    def state_dict(self) -> dict[str, Any]:
        return {"proximal_optimizer": self.optimizer.state_dict(), "proximal_buffer": self.buffer.state_dict(),
                "proximal_segment_gradient": self.segment_gradient,
                "proximal_segment_steps_agree": self.segment_steps_agree}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if saved.get("proximal_optimizer"):
            self.optimizer.load_state_dict(saved["proximal_optimizer"])
        self.buffer.load_state_dict(saved.get("proximal_buffer", []))
        gradient = saved.get("proximal_segment_gradient")  # (checkpoints before it: none)
        device = self.actor_parameters[0].device  # checkpoints are read onto the CPU
        self.segment_gradient = None if gradient is None else gradient.to(device)
        self.segment_steps_agree = bool(saved.get("proximal_segment_steps_agree", True))


def batch_advantages(batch: dict[str, torch.Tensor], config: ProximalConfig, gamma: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GAE advantages of a batch from :meth:`ProximalBuffer.take` over its contiguous steps, from the values
    recorded at collection (as SB3 and CleanRL compute them); returns them for the kept steps (``valid`` and
    finite), the mask of those, and the values they were computed from.

    Steps of envs left out (``valid`` false) neither get advantages nor pass anything to the steps
    before them: their TD errors are zero, so the last kept step's advantage is closed by its own next
    value, as at a truncation."""
    with torch.no_grad():
        valid = batch["valid"]
        values = torch.where(valid, batch["values"], 0.0)
        rewards = torch.where(valid, batch["rewards"], 0.0)
        next_values = torch.where(valid, batch["next_values"], 0.0)
        advantages = gae_advantages(rewards, values, next_values, batch["terminated"], batch["truncated"], gamma,
                                    config.gae_lambda)
        keep = valid & torch.isfinite(advantages)
        return advantages[keep], keep, values


def likelihood_ratio_gradient(model: ActorCritic, actor_parameters: list[nn.Parameter],
                              batch: dict[str, torch.Tensor], config: ProximalConfig, gamma: float) -> torch.Tensor:
    """The policy gradient of the batch at the current policy, ``-mean(A grad log pi)`` with the advantages
    normalized over the batch, flat in ``actor_parameters`` order: the likelihood-ratio estimate the clipped
    epochs follow, from all the batch at once and without importance weights (the segment steps taken while
    the batch was collected moved the policy a little). Summed over minibatches of ``config.batch_size``, so
    its memory is one clipped step's. Zero where no step is kept."""
    advantages, keep, _ = batch_advantages(batch, config, gamma)
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    obs, pre_squash = batch["obs_normalized"][keep], batch["pre_squash"][keep]
    total = [torch.zeros_like(p) for p in actor_parameters]
    for index in torch.arange(advantages.numel(), device=advantages.device).split(config.batch_size):
        loss = -(model.log_prob(obs[index], pre_squash[index]) * advantages[index]).sum() / advantages.numel()
        for sum_, grad in zip(total, torch.autograd.grad(loss, actor_parameters, allow_unused=True)):
            if grad is not None:
                sum_ += grad
    return torch.cat([g.flatten() for g in total])


def clipped_epochs(model: ActorCritic, normalizer: ObservationNormalizer, optimizer: torch.optim.Optimizer,
                   actor_parameters: list[nn.Parameter], batch: dict[str, torch.Tensor], config: ProximalConfig, *,
                   gamma: float, optimizer_spec: OptimizerSpec, value_parameters: list[nn.Parameter] = ()
                   ) -> dict[str, float]:
    """Clipped-surrogate epochs on ``batch`` (from :meth:`ProximalBuffer.take`); returns the statistics.

    Advantages are GAE (:func:`batch_advantages`), normalized per minibatch. With ``value_parameters`` each
    minibatch step is PPO's joint step: ``surrogate + vf_coef * MSE(V, GAE return)``, one gradient clip over actor and
    critic together, one ``optimizer`` over both (it must hold both); the batch is in the value network's
    units (``ProximalBuffer.add``); the value fit's inputs are normalized with the current statistics,
    those the value network is used with next. A step whose gradient is not finite is skipped. Returns
    the mean losses, clip fraction, approximate KL, the minibatch steps taken and how many were skipped."""
    advantages, keep, values = batch_advantages(batch, config, gamma)
    with torch.no_grad():
        obs, pre_squash = batch["obs_normalized"][keep], batch["pre_squash"][keep]
        old_log_prob = batch["old_log_prob"][keep]
        value_inputs = normalizer(batch["start_obs"][keep])
        returns = advantages + values[keep]
    parameters = list(actor_parameters) + list(value_parameters)
    losses, value_losses, clip_fractions, kls, steps, skipped = [], [], [], [], 0, 0
    for _ in range(config.n_epochs):
        order = torch.randperm(advantages.numel(), device=advantages.device)
        for index in order.split(config.batch_size):
            if index.numel() < 2:
                continue  # no advantage spread to normalize
            dist = model.distribution(obs[index])
            log_prob = dist.log_prob(pre_squash[index]).sum(-1)
            adv = advantages[index]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            loss, fraction = clipped_surrogate_loss(log_prob, old_log_prob[index], adv, config.clip_range)
            if config.ent_coef:
                loss = loss - config.ent_coef * dist.entropy().sum(-1).mean()
            total = loss
            if value_parameters:
                value_loss = (model.value(value_inputs[index]) - returns[index]).square().mean()
                total = loss + config.vf_coef * value_loss
                value_losses.append(float(value_loss.detach()))
            steps += 1
            skipped += not descend(optimizer, total, parameters, optimizer_spec)
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
            **({"proximal_value_loss": mean(value_losses)} if value_parameters else {})}
