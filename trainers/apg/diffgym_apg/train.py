"""Analytic Policy Gradients with segmented backpropagation (SHAC-style short horizons).

N envs are unrolled for ``segment_length`` steps through ``differentiable_step`` with reparameterized
actions; the loss is minus the discounted segment return plus a bootstrapped tail (see ``losses.py``
and ``docs/apg.md``); its exact gradient flows back through the simulator into the policy. The graph
is cut at the segment boundary and the next segment carries on from the detached state. Finished
episodes restart inside the batch.

Read :func:`apg_update` top to bottom for the algorithm; :func:`train` is the loop around it (logging,
evaluation, checkpoints with exact resume).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from diffgym.training import ActorCritic, ObservationNormalizer, Run, TrainConfig, clip_gradients, make_optimizer
from diffgym.training.evaluation import train_env_seed
from diffgym.training.gradients import (hybrid_weight, leave_one_out_baseline, per_env_analytic_gradients,
                                        per_env_likelihood_gradients, returns_to_go, sample_statistics,
                                        surrogate_for_adjoints)
from diffgym.training.rollout import EnvBatch, EvaluationCadence, evaluate_and_checkpoint, unroll
from diffgym.training.rollout import Rollout as Segment  # APG's rollouts are its segments
from diffgym.training.spec import from_dict

from diffgym_apg.losses import MonteCarloReturns, segment_actor_loss, td_lambda_targets
from diffgym_apg.proximal import ProximalBuffer, ReturnScale, proximal_update

TENSORBOARD_TAGS = {"policy_std": "policy/std", "actor_loss": "losses/actor_loss", "critic_loss": "losses/value_loss",
                    "grad_norm": "losses/grad_norm", "train_episode_return": "rollout/episode_return"}
"""APG's logged names under the shared TensorBoard tags (``docs/protocol.md``)."""

BOOTSTRAP_MODES = ("none", "mc", "critic", "value")
"""How a segment's tail is estimated: nothing, a Monte-Carlo value network, a TD(lambda) critic, or the
value network as the proximal path's joint steps alone fit it (``value``: no fit of its own)."""
ESTIMATORS = ("analytic", "likelihood", "hybrid", "proximal")
"""How the policy gradient is estimated from a segment: through the simulator (first order), by the
likelihood ratio (zeroth order, REINFORCE with a baseline), or their alpha-order combination; ``proximal``
takes no step per segment and learns from the clipped epochs alone (``proximal_epochs``, ``proximal.py``)."""

@dataclasses.dataclass
class APGParams:
    """APG's ``algo_params`` (everything else comes from the shared :class:`TrainConfig`)."""

    segment_length: int | str = 32
    """K, steps backpropagated through per update; the episode length means full backpropagation.
    ``adaptive``: chosen every update between ``min_segment_length`` and ``max_segment_length`` from the
    analytic gradient's variance relative to the likelihood ratio's (:class:`AdaptiveSegmentLength`)."""
    bootstrap: str = "critic"
    """Tail estimate closing each segment and each truncated episode: ``none``, ``mc``, ``critic`` or
    ``value`` (the value network fitted only by the proximal path's joint steps; needs
    ``proximal_value_fit``). ``mc`` and ``critic`` fit the value network themselves, after every segment."""
    estimator: str = "analytic"
    """Policy-gradient estimator: ``analytic``, ``likelihood``, ``hybrid`` or ``proximal`` (``ESTIMATORS``)."""
    gamma: float = 0.99
    """Discount factor of the return (in the actor loss and in the value targets)."""
    td_lambda: float = 0.95
    """lambda of the TD(lambda) targets of the ``critic`` mode."""
    critic_lr: float = 1e-3
    """Adam learning rate of the value network (the other Adam settings come from ``optimizer``)."""
    critic_epochs: int = 4
    """Passes over each segment's value targets (``mc``, ``critic``)."""
    critic_minibatches: int = 4
    """Minibatches per pass; each is one value-network gradient step."""
    target_tau: float = 0.2
    """Polyak rate of the ``critic`` mode's target network: ``target <- (1 - tau) target + tau critic``
    once per segment."""
    min_segment_length: int = 8
    """Lower bound of the adaptive segment length (and where it starts)."""
    max_segment_length: int = 64
    """Upper bound of the adaptive segment length."""
    noise_high: float = 1.0
    """Adaptive K halves when the analytic gradient's variance exceeds this times the likelihood
    ratio's (per-sample variance traces over the envs) ..."""
    noise_low: float = 0.1
    """... and doubles when it stays below this times it."""
    proximal_epochs: int = 0
    """Passes of clipped-surrogate (PPO) minibatch steps over the segments of every ``proximal_horizon``
    steps, on top of each segment's own step (none with ``estimator: proximal``; ``proximal.py``); 0 turns
    the proximal path off."""
    proximal_horizon: int = 400
    """Steps per env collected between proximal updates (the batch is ``num_envs`` times this)."""
    proximal_minibatch_size: int = 512
    """Samples per proximal gradient step."""
    segment_lr: float | None = None
    """Adam learning rate of each segment's own policy step (the analytic, likelihood or hybrid step);
    None: the shared ``optimizer.lr``. Next to the proximal path the analytic steps need a far smaller
    rate than the clipped epochs (``docs/apg.md``, TPush), and the shared optimizer spec is PPO's too."""
    proximal_lr: float | None = None
    """Adam learning rate of the proximal steps; None: the shared ``optimizer.lr`` (what PPO uses). They
    have their own Adam: their gradients and the analytic ones differ in scale, so they must not share
    Adam's moment estimates."""
    proximal_value_coef: float = 0.5
    """Weight of the value loss in the joint proximal step (``proximal_value_fit``; PPO's ``vf_coef``)."""
    clip_range: float = 0.2
    """epsilon of the clipped surrogate: the probability ratio is clipped to [1 - epsilon, 1 + epsilon]."""
    gae_lambda: float = 0.95
    """lambda of the GAE advantages of the proximal path."""
    entropy_coef: float = 0.0
    """Weight of the policy's entropy bonus in the proximal loss."""
    proximal_value_fit: bool = False
    """Fit the value network in the proximal steps as PPO does: each minibatch step minimizes
    ``surrogate + proximal_value_coef * MSE(V, GAE return)`` under one gradient clip and one Adam over the
    actor and the value network together."""
    env_gradient_clip: float = 0.0
    """A robust mean of the analytic gradient: each env's share of it (its row of the per-env
    decomposition, ``diffgym.training.gradients.per_env_analytic_gradients``) is scaled down to at most
    this multiple of the batch's median per-env norm before the mean; 0 (off) takes the plain mean.
    Through sustained contact the per-env gradients are heavy-tailed (``docs/apg.md``), and one env
    can set the direction of a whole batch."""
    value_scaling: bool = False
    """Let the value network predict values divided by a running std of the discounted return (SB3's
    ``VecNormalize`` reward scaling, applied to the values instead of the env): its targets are divided
    by it and its outputs multiplied by it wherever a value is used (tails, baselines, advantages)."""

    def __post_init__(self) -> None:
        if self.bootstrap not in BOOTSTRAP_MODES:
            raise ValueError(f"bootstrap must be one of {BOOTSTRAP_MODES}, got {self.bootstrap!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if isinstance(self.segment_length, str) and self.segment_length != "adaptive":
            raise ValueError(f"segment_length must be a positive integer or 'adaptive', got {self.segment_length!r}")
        if self.adaptive and not 1 <= self.min_segment_length <= self.max_segment_length:
            raise ValueError(f"need 1 <= min_segment_length <= max_segment_length, got "
                             f"{self.min_segment_length} and {self.max_segment_length}")
        if not self.env_gradient_clip >= 0:  # NaN fails too
            raise ValueError(f"env_gradient_clip must be >= 0 (0: off), got {self.env_gradient_clip}")
        if self.env_gradient_clip > 0 and self.estimator in ("likelihood", "proximal"):
            raise ValueError(f"env_gradient_clip ({self.env_gradient_clip}) clips the per-env analytic gradients: "
                             f"set it to 0 with estimator {self.estimator!r}, or use 'analytic' or 'hybrid'")
        if self.adaptive and self.estimator in ("likelihood", "proximal"):
            raise ValueError("segment_length 'adaptive' compares the analytic gradient with the likelihood ratio: "
                             "it needs estimator 'analytic' or 'hybrid'")
        if not self.adaptive and self.segment_length < 1:
            raise ValueError(f"segment_length must be a positive integer or 'adaptive', got {self.segment_length!r}")
        if self.critic_epochs < 1 or self.critic_minibatches < 1:
            raise ValueError("critic_epochs and critic_minibatches must be >= 1")
        if not (0.0 < self.gamma <= 1.0 and 0.0 <= self.td_lambda <= 1.0 and 0.0 < self.target_tau <= 1.0):
            raise ValueError(f"need 0 < gamma <= 1, 0 <= td_lambda <= 1, 0 < target_tau <= 1; got {self}")
        if self.critic_lr <= 0:
            raise ValueError(f"critic_lr must be > 0, got {self.critic_lr}")
        if not 0.0 < self.noise_low < self.noise_high:
            raise ValueError(f"need 0 < noise_low < noise_high, got {self.noise_low} and {self.noise_high}")
        if self.proximal_epochs < 0:
            raise ValueError(f"proximal_epochs must be >= 0 (0: off), got {self.proximal_epochs}")
        if self.estimator == "proximal" and self.proximal_epochs == 0:
            raise ValueError("estimator 'proximal' learns from the clipped epochs alone: set proximal_epochs >= 1")
        if self.proximal_value_fit and self.proximal_epochs == 0:
            raise ValueError("proximal_value_fit fits the value network in the proximal steps: set proximal_epochs >= 1")
        if self.bootstrap == "value" and not self.proximal_value_fit:
            raise ValueError("bootstrap 'value' takes the tail from the value network the proximal path fits: "
                             "set proximal_epochs >= 1 and proximal_value_fit")
        if self.proximal and self.bootstrap == "none" and not self.proximal_value_fit:
            raise ValueError("the proximal path's advantages need a fitted value network: set proximal_value_fit "
                             "or bootstrap 'mc' or 'critic'")
        if self.value_scaling and self.bootstrap == "none" and not self.proximal:
            raise ValueError("value_scaling scales the value network, which bootstrap 'none' without the proximal "
                             "path does not use")
        for name, value, bound in (("proximal_horizon", self.proximal_horizon, 1),
                                   ("proximal_minibatch_size", self.proximal_minibatch_size, 2)):
            if value < bound:
                raise ValueError(f"{name} must be >= {bound}, got {value}")
        if self.segment_lr is not None and not self.segment_lr > 0:
            raise ValueError(f"segment_lr must be > 0 (or None: the shared optimizer.lr), got {self.segment_lr}")
        if self.proximal_lr is not None and self.proximal_lr <= 0:
            raise ValueError(f"proximal_lr must be > 0 (or None: the shared optimizer.lr), got {self.proximal_lr}")
        if self.clip_range <= 0:
            raise ValueError(f"clip_range must be > 0, got {self.clip_range}")
        if not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(f"gae_lambda must be in [0, 1], got {self.gae_lambda}")
        for name, value in (("entropy_coef", self.entropy_coef), ("proximal_value_coef", self.proximal_value_coef)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    @property
    def adaptive(self) -> bool:
        return self.segment_length == "adaptive"

    @property
    def proximal(self) -> bool:
        """Whether the clipped epochs run (``proximal_epochs >= 1``)."""
        return self.proximal_epochs > 0

    @classmethod
    def from_config(cls, config: TrainConfig) -> APGParams:
        return from_dict(cls, config.algo_params)


class AdaptiveSegmentLength:
    """Segment length K chosen by comparing the analytic gradient's variance with the likelihood ratio's.

    Long segments give an exact gradient of a long-horizon objective, until the dynamics make it
    explode: through stiff contacts or chaotic stretches the per-env gradients grow exponentially with
    the horizon (Metz et al. 2021, "Gradients are not all you need"; AHAC, Georgiev et al. 2024, cuts
    horizons at stiff contacts for this reason). The analytic estimate is worth backpropagating only
    while it is less noisy than the likelihood-ratio estimate of the same rollouts, which needs no
    simulator gradient and whose variance grows only with the return's scale (Suh et al. 2022; see
    ``diffgym grad-stats``, where the two variance curves cross on the contact tasks). Every update
    measures ``rho = tr Cov(g_analytic) / tr Cov(g_likelihood)`` over the envs: ``rho > noise_high``
    halves K, ``rho < noise_low`` doubles it, within ``[min_segment_length, max_segment_length]``. Both
    variances are exponential moving averages (weight ``smoothing``), K changes at most every
    ``patience`` updates, and the averages restart after a change (they belong to the previous K).
    K starts at the lower bound.
    """

    def __init__(self, params: APGParams, smoothing: float = 0.7, patience: int = 4):
        self.minimum, self.maximum = params.min_segment_length, params.max_segment_length
        self.high, self.low = params.noise_high, params.noise_low
        self.smoothing, self.patience = smoothing, patience
        self.length = self.minimum
        self.analytic_variance = self.likelihood_variance = None
        self.updates = 0

    def observe(self, analytic: torch.Tensor, likelihood: torch.Tensor) -> float:
        """Fold one update's per-env gradients ``(N, P)`` of both estimators into the averages; maybe
        change K. Returns the smoothed variance ratio ``rho``."""
        if analytic.shape[0] < 2:
            return math.nan  # no spread to measure (too few envs kept this update): nothing learned
        a = sample_statistics(analytic).variance_trace
        z = sample_statistics(likelihood).variance_trace
        if not math.isfinite(a):
            a = math.inf  # exploding analytic gradients: the ratio below is inf and K halves
        if not math.isfinite(z) or (math.isinf(a) and self.analytic_variance is not None and
                                    math.isinf(self.analytic_variance)):
            return math.nan  # nothing comparable this update
        if self.analytic_variance is None:
            self.analytic_variance, self.likelihood_variance = a, z
        else:
            w = self.smoothing
            self.analytic_variance = w * self.analytic_variance + (1 - w) * a
            self.likelihood_variance = w * self.likelihood_variance + (1 - w) * z
        self.updates += 1
        ratio = self.analytic_variance / self.likelihood_variance if self.likelihood_variance > 0 else math.inf
        if self.updates >= self.patience:
            changed = self.length
            if ratio > self.high:
                changed = max(self.minimum, self.length // 2)
            elif ratio < self.low:
                changed = min(self.maximum, self.length * 2)
            if changed != self.length:
                self.length, self.analytic_variance, self.likelihood_variance, self.updates = changed, None, None, 0
        return ratio

    def state_dict(self) -> dict[str, Any]:
        return {"length": self.length, "analytic_variance": self.analytic_variance,
                "likelihood_variance": self.likelihood_variance, "updates": self.updates}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.length, self.updates = saved["length"], saved["updates"]
        self.analytic_variance, self.likelihood_variance = saved["analytic_variance"], saved["likelihood_variance"]


@dataclasses.dataclass
class Learner:
    """Everything APG optimizes: the shared actor-critic and normalizer, their optimizers, the target
    value network (``critic`` mode) and the pending Monte-Carlo returns (``mc`` mode)."""

    model: ActorCritic
    normalizer: ObservationNormalizer
    actor_optimizer: torch.optim.Adam
    critic_optimizer: torch.optim.Adam
    target_critic: nn.Module
    mc_returns: MonteCarloReturns
    actor_params: list[nn.Parameter]
    critic_params: list[nn.Parameter]
    segment_schedule: AdaptiveSegmentLength | None = None
    """The adaptive segment length's state (``segment_length: adaptive``), else None."""
    proximal_optimizer: torch.optim.Adam | None = None
    """Adam of the proximal path's steps (``proximal_epochs >= 1``), else None."""
    proximal_buffer: ProximalBuffer = dataclasses.field(default_factory=ProximalBuffer)
    """Segments collected since the last proximal update."""
    return_scale: ReturnScale | None = None
    """The running return scale of the value network's units (``value_scaling``), else None."""
    skipped_updates: int = 0
    masked_envs: int = 0
    """Env segments left out of an update because their gradient was not finite (cumulative)."""
    critic_grad_steps: int = 0

    @classmethod
    def create(cls, obs_dim: int, act_dim: int, config: TrainConfig, params: APGParams, device: torch.device
               ) -> Learner:
        model = ActorCritic(obs_dim, act_dim, config.policy).to(device)
        actor_params = [*model.actor.parameters(), model.log_std]
        critic_params = list(model.critic.parameters())
        critic_spec = dataclasses.replace(config.optimizer, lr=params.critic_lr)
        target_critic = copy.deepcopy(model.critic).requires_grad_(False)
        segment_spec = dataclasses.replace(config.optimizer, lr=params.segment_lr or config.optimizer.lr)
        proximal_spec = dataclasses.replace(config.optimizer, lr=params.proximal_lr or config.optimizer.lr)
        proximal_params = actor_params + (critic_params if params.proximal_value_fit else [])
        return cls(model, ObservationNormalizer(obs_dim, config.normalizer).to(device),
                   make_optimizer(actor_params, segment_spec), make_optimizer(critic_params, critic_spec),
                   target_critic, MonteCarloReturns(params.gamma), actor_params, critic_params,
                   AdaptiveSegmentLength(params) if params.adaptive else None,
                   make_optimizer(proximal_params, proximal_spec) if params.proximal else None,
                   return_scale=ReturnScale(config.num_envs, params.gamma) if params.value_scaling else None)

    def segment_length(self, params: APGParams) -> int:
        """K for the next update."""
        return self.segment_schedule.length if self.segment_schedule is not None else int(params.segment_length)

    @property
    def value_scale(self) -> float:
        """Return units per value-network output unit (1 without ``value_scaling``)."""
        return self.return_scale.scale if self.return_scale is not None else 1.0

    def value(self, obs_normalized: torch.Tensor) -> torch.Tensor:
        """The value network's V of normalized observations, in return units."""
        return self.model.value(obs_normalized) * self.value_scale

    def tail_value(self, obs: torch.Tensor, bootstrap: str) -> torch.Tensor:
        """V of (unnormalized, differentiable) observations ``(..., D)`` as the bootstrap mode says."""
        if bootstrap == "none":
            return torch.zeros(obs.shape[:-1], dtype=obs.dtype, device=obs.device)
        critic = self.target_critic if bootstrap == "critic" else self.model.critic  # mc, value: the online net
        return critic(self.normalizer(obs)).squeeze(-1) * self.value_scale

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint entries; ``actor_critic`` / ``normalizer`` are the keys every trainer's checkpoint has."""
        return {"actor_critic": self.model.state_dict(), "normalizer": self.normalizer.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(),
                "target_critic": self.target_critic.state_dict(), "mc_returns": self.mc_returns.state_dict(),
                "skipped_updates": self.skipped_updates, "critic_grad_steps": self.critic_grad_steps,
                "masked_envs": self.masked_envs,
                "segment_schedule": self.segment_schedule.state_dict() if self.segment_schedule else None,
                "proximal_optimizer": self.proximal_optimizer.state_dict() if self.proximal_optimizer else None,
                "proximal_buffer": self.proximal_buffer.state_dict(),
                "return_scale": self.return_scale.state_dict() if self.return_scale else None}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["actor_critic"])
        self.normalizer.load_state_dict(saved["normalizer"])
        self.actor_optimizer.load_state_dict(saved["actor_optimizer"])
        self.critic_optimizer.load_state_dict(saved["critic_optimizer"])
        self.target_critic.load_state_dict(saved["target_critic"])
        self.mc_returns.load_state_dict(saved["mc_returns"])
        self.skipped_updates = int(saved["skipped_updates"])
        self.critic_grad_steps = int(saved.get("critic_grad_steps", 0))
        self.masked_envs = int(saved.get("masked_envs", 0))
        if self.segment_schedule is not None and saved.get("segment_schedule"):
            self.segment_schedule.load_state_dict(saved["segment_schedule"])
        if self.proximal_optimizer is not None and saved.get("proximal_optimizer"):
            self.proximal_optimizer.load_state_dict(saved["proximal_optimizer"])
        self.proximal_buffer.load_state_dict(saved.get("proximal_buffer", []))
        if self.return_scale is not None and saved.get("return_scale"):
            self.return_scale.load_state_dict(saved["return_scale"])


def policy_gradient(learner: Learner, segment: Segment, params: APGParams) -> dict[str, float]:
    """Write the segment's policy gradient into the actor's ``.grad`` as ``params.estimator`` says;
    return the loss and the estimator's statistics.

    The objective is the segment's (SHAC) return, ``-segment_actor_loss``. Envs whose segment is not
    finite, in the forward pass or in their action adjoints, are left out, and the gradient is the mean
    over the others (``masked_envs``); with none left the update is skipped (``loss`` NaN).
    """
    num_steps, num_envs = segment.rewards.shape
    valid = segment.finite
    # masked envs contribute zeros to the loss; their gradients are dropped below as well
    rewards = torch.where(valid[None, :], segment.rewards, torch.zeros_like(segment.rewards))
    next_values = learner.tail_value(segment.next_obs, params.bootstrap)
    next_values = torch.where(valid[None, :] & torch.isfinite(next_values), next_values, torch.zeros_like(next_values))
    actor_loss = segment_actor_loss(rewards, next_values, segment.terminated, segment.truncated, params.gamma)
    stats: dict[str, float] = {"actor_loss": float(actor_loss.detach())}

    analytic = likelihood = None
    if params.estimator != "likelihood":
        # lambda_t = dLoss/da_t: the total derivative through the simulator, later observations and actions
        adjoints = torch.autograd.grad(actor_loss, segment.actions, allow_unused=True)
        adjoints = torch.stack([torch.zeros_like(a) if g is None else g for a, g in zip(segment.actions, adjoints)])
        valid &= torch.isfinite(adjoints).all(dim=2).all(dim=0)
        analytic = torch.where(valid[None, :, None], adjoints, torch.zeros_like(adjoints))
    needs_samples = params.estimator == "hybrid" or learner.segment_schedule is not None  # both, per env
    clips = params.env_gradient_clip > 0
    if params.estimator != "analytic" or needs_samples:
        with torch.no_grad():
            future, piece_discount = returns_to_go(rewards.detach(), next_values.detach(), segment.terminated,
                                                   segment.truncated, params.gamma)
            if params.bootstrap == "none":
                baseline = leave_one_out_baseline(future)
            else:
                baseline = learner.value(segment.obs_normalized)
            # d(loss)/d(log pi_t) = -(advantage) / (N K), as the actor loss is scaled
            likelihood = -(piece_discount * (future - baseline)) / (num_envs * num_steps)
            likelihood = torch.where(valid[None, :], likelihood, torch.zeros_like(likelihood))

    kept = int(valid.sum())
    stats["masked_envs"] = float(num_envs - kept)
    learner.masked_envs += num_envs - kept
    if kept == 0:
        stats["actor_loss"] = math.nan
        return stats
    rescale = num_envs / kept  # the mean over the envs that are left
    model = learner.model
    # per-env samples are computed for every env and the masked rows dropped: a masked env's inputs are
    # finite (its observations were zeroed, its adjoints and weights set to zero), so nothing leaks
    if needs_samples:
        g0 = per_env_likelihood_gradients(model, segment.obs_normalized, segment.pre_squash, likelihood)[valid] * num_envs
    if analytic is not None and (needs_samples or clips):
        g1 = per_env_analytic_gradients(model, segment.obs_normalized, segment.noise, analytic)[valid] * num_envs
        if learner.segment_schedule is not None:
            stats["variance_ratio"] = learner.segment_schedule.observe(g1, g0)  # the raw variance, before clipping
        if clips:
            g1, stats["env_gradients_clipped"] = clip_env_gradients(g1, params.env_gradient_clip)
    if params.estimator == "hybrid":
        alpha, parts = hybrid_weight(g1, g0)
        stats.update(hybrid_alpha=alpha, **parts)
        _set_gradient(learner.actor_params, alpha * g1.mean(dim=0) + (1.0 - alpha) * g0.mean(dim=0))
        return stats
    if needs_samples or clips:  # the per-env samples are there already: their mean is the batch gradient
        _set_gradient(learner.actor_params, (g1 if params.estimator == "analytic" else g0).mean(dim=0))
        return stats
    if params.estimator == "analytic":
        surrogate = surrogate_for_adjoints(model, segment.obs_normalized, segment.noise, analytic)
    else:
        surrogate = _likelihood_surrogate(model, segment, likelihood)
    (surrogate * rescale).backward(inputs=learner.actor_params)
    return stats


def clip_env_gradients(per_env: torch.Tensor, multiple: float) -> tuple[torch.Tensor, float]:
    """Rows of ``per_env`` (N, P) scaled down to at most ``multiple`` times the median norm of the rows
    that carry any gradient (zero rows, e.g. envs that never touched anything, neither set the bound nor
    change); returns them and the fraction of rows that were scaled. A row whose norm overflows the
    dtype is scaled to zero."""
    norms = per_env.norm(dim=1)
    carrying = norms[norms > 0]
    if carrying.numel() == 0:
        return per_env, 0.0
    bound = multiple * carrying.median()
    over = norms > bound
    scale = torch.where(over, bound / norms, torch.ones_like(norms))
    return per_env * scale[:, None], float(over.float().mean())


def _set_gradient(parameters: list[nn.Parameter], flat: torch.Tensor) -> None:
    """Write a flat gradient (in ``parameters`` order) into their ``.grad``."""
    offset = 0
    for p in parameters:
        p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype).clone()
        offset += p.numel()


def _likelihood_surrogate(model: ActorCritic, segment: Segment, weights: torch.Tensor) -> torch.Tensor:
    """``sum_{t,i} weights * log pi(u | o)``: its gradient is the likelihood-ratio estimate."""
    return (model.log_prob(segment.obs_normalized, segment.pre_squash) * weights).sum()


def apg_update(learner: Learner, envs: EnvBatch, params: APGParams, config: TrainConfig,
               max_steps: int | None = None) -> dict[str, float]:
    """One APG update: unroll a segment, step the policy on its gradient, fit the value network.

    ``max_steps`` caps the segment (the trainer ends segments at evaluation points and at the budget)."""
    model, normalizer = learner.model, learner.normalizer
    # 1. Unroll K steps through the simulator. Actions are reparameterized samples, so the segment's
    #    rewards and its last observations are differentiable functions of the policy parameters.
    #    (The likelihood-ratio estimator needs no simulator gradient: no graph is recorded.)
    num_steps = learner.segment_length(params)
    if max_steps is not None:
        num_steps = max(1, min(num_steps, int(max_steps)))
    with torch.set_grad_enabled(params.estimator not in ("likelihood", "proximal")):
        segment, state, obs = unroll(model, normalizer, envs, num_steps)
    if learner.return_scale is not None:  # the value network's units follow the returns seen so far
        learner.return_scale.update(segment.rewards.detach(), segment.done)
    if params.proximal:  # kept with the log-probabilities of the policy that drew its actions
        learner.proximal_buffer.add(model, normalizer, segment, segment.finite, learner.value_scale)
        if params.estimator == "proximal":  # no segment step counts them (policy_gradient does otherwise)
            learner.masked_envs += int((~segment.finite).sum())

    # 2-3. The actor loss -(discounted rewards + gamma^len * V(boundary obs)) / (N K) and its gradient as
    #    the estimator says (exact through the simulator, likelihood ratio, or their mix); diverged envs
    #    are left out. The step is skipped if the gradient is not finite (nothing reaches Adam).
    #    (``proximal`` takes no step here: its policy learns in step 7 only.)
    stats: dict[str, float] = {}
    grad_norm = math.nan
    policy_steps = 0
    if params.estimator != "proximal":
        learner.actor_optimizer.zero_grad(set_to_none=True)
        stats = policy_gradient(learner, segment, params)
        if math.isfinite(stats["actor_loss"]):
            grad_norm = clip_gradients(learner.actor_params, config.optimizer)
        policy_steps += 1  # counted even when skipped, as every update is (docs/protocol.md)
        if math.isfinite(grad_norm):
            learner.actor_optimizer.step()
        else:
            learner.skipped_updates += 1
        learner.actor_optimizer.zero_grad(set_to_none=True)

    # 4. Cut the graph at the segment boundary; the next segment carries on from the detached state.
    envs.state, envs.obs = state.detach(), obs.detach()

    # 5. Fit the value network on detached targets: TD(lambda) from the target network (critic) or the
    #    Monte-Carlo returns-to-go of episodes that have ended (mc).
    with torch.no_grad():
        rewards = segment.rewards.detach()
        if params.bootstrap == "critic":
            target_next = learner.tail_value(segment.next_obs.detach(), "critic")
            targets = td_lambda_targets(rewards, target_next, segment.terminated, segment.truncated,
                                        params.gamma, params.td_lambda)
            value_obs, value_targets = segment.start_obs.flatten(0, 1), targets.flatten()
        elif params.bootstrap == "mc":
            value_obs, value_targets = learner.mc_returns.add(segment.start_obs, rewards,
                                                              segment.terminated | segment.truncated)
        else:  # none: no value network; value: the proximal path's joint steps fit it (step 7)
            value_obs = value_targets = None
    critic_loss = fit_value(learner, value_obs, value_targets, params, config)
    if params.bootstrap == "critic":
        with torch.no_grad():
            for target, online in zip(learner.target_critic.parameters(), learner.critic_params):
                target.lerp_(online, params.target_tau)

    # 6. Update the observation statistics from the segment's detached observations.
    normalizer.update(segment.start_obs.flatten(0, 1)[torch.isfinite(segment.start_obs.flatten(0, 1)).all(dim=1)])

    # 7. Every proximal_horizon steps: clipped-surrogate epochs over the segments collected since the last
    #    ones, with GAE advantages from the values recorded at collection (``proximal.py``).
    if params.proximal and learner.proximal_buffer.steps >= params.proximal_horizon:
        proximal = proximal_update(
            model, normalizer, learner.proximal_optimizer, learner.actor_params, learner.proximal_buffer.take(),
            gamma=params.gamma, lam=params.gae_lambda, epochs=params.proximal_epochs,
            minibatch_size=params.proximal_minibatch_size, clip_range=params.clip_range,
            entropy_coef=params.entropy_coef, optimizer_spec=config.optimizer,
            critic_params=learner.critic_params if params.proximal_value_fit else None,
            value_coef=params.proximal_value_coef)
        stats.update(proximal)
        policy_steps += int(proximal["proximal_grad_steps"])  # counted even when skipped, as above
        learner.skipped_updates += int(proximal["proximal_skipped_steps"])
        if params.proximal_value_fit:  # the joint steps are value-network steps as well
            learner.critic_grad_steps += int(proximal["proximal_grad_steps"])

    finite_rewards = rewards[torch.isfinite(rewards)]
    return {**stats, "grad_norm": grad_norm, "segment_length": float(num_steps), "policy_steps": float(policy_steps),
            "skipped_updates": float(learner.skipped_updates),
            "masked_envs_total": float(learner.masked_envs),
            "critic_grad_steps": float(learner.critic_grad_steps),  # value-network Adam steps (protocol.md)
            **({"critic_loss": critic_loss} if critic_loss is not None else {}),
            "segment_reward": float(finite_rewards.mean()) if finite_rewards.numel() else math.nan,
            "policy_std": float(model.log_std.detach().exp().mean()),
            "episodes_finished": float(len(segment.finished_returns)),
            **({"train_episode_return": float(np.mean(segment.finished_returns))} if segment.finished_returns else {})}


def fit_value(learner: Learner, obs: torch.Tensor | None, targets: torch.Tensor | None,
              params: APGParams, config: TrainConfig) -> float | None:
    """Minibatch MSE regression of the value network on ``targets``; the mean loss (None if no data).

    Non-finite targets are dropped (a diverged env must not poison the value network)."""
    if obs is None or targets is None:
        return None
    keep = torch.isfinite(targets) & torch.isfinite(obs).all(dim=1)
    obs, targets = obs[keep], targets[keep]
    if targets.numel() == 0:
        return None
    inputs = learner.normalizer(obs)
    targets = targets / learner.value_scale
    losses = []
    for _ in range(params.critic_epochs):
        order = torch.randperm(targets.numel(), device=targets.device)
        for batch in order.chunk(params.critic_minibatches):
            loss = (learner.model.value(inputs[batch]) - targets[batch]).square().mean()  # in value-network units
            learner.critic_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if math.isfinite(clip_gradients(learner.critic_params, config.optimizer)):
                learner.critic_optimizer.step()
                learner.critic_grad_steps += 1
            losses.append(float(loss.detach()))
    learner.critic_optimizer.zero_grad(set_to_none=True)
    return float(np.mean(losses))


def train(config: TrainConfig, progress: bool = True) -> Path:
    """Train APG as ``config`` says; resume from the run directory's latest checkpoint if it has one.

    Returns the run directory (``config.yaml``, ``metrics.jsonl``, TensorBoard events, checkpoints).
    """
    params = APGParams.from_config(config)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    venv = gym.make_vec(config.env_id, num_envs=config.num_envs, vectorization_mode="vector_entry_point",
                        **config.env_options())
    obs_dim = int(np.prod(venv.single_observation_space.shape))
    act_dim = int(np.prod(venv.single_action_space.shape))
    if (params.adaptive or params.estimator == "hybrid") and config.num_envs < 3:
        raise ValueError(f"segment_length 'adaptive' and estimator 'hybrid' compare per-env gradient samples: "
                         f"they need num_envs >= 3, got {config.num_envs}")
    envs = EnvBatch(venv, train_env_seed(config.seed), device)
    learner = Learner.create(obs_dim, act_dim, config, params, device)
    env_steps = grad_steps = 0

    with Run(config, progress=progress) as run:
        run.tensorboard_tags.update(TENSORBOARD_TAGS)
        saved = run.load_latest_checkpoint()
        if saved is not None:
            learner.load_state_dict(saved)
            envs.load_state_dict(saved["envs"])
            torch.set_rng_state(saved["torch_rng"])
            if device.type == "cuda":
                torch.cuda.set_rng_state(saved["cuda_rng"], device)
            env_steps, grad_steps = int(saved["env_steps"]), int(saved["grad_steps"])
            run.resume_from(env_steps)
        cadence = EvaluationCadence(config, env_steps)

        def evaluate() -> None:
            resume = {**learner.state_dict(), "envs": envs.state_dict(), "torch_rng": torch.get_rng_state(),
                      **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}
            evaluate_and_checkpoint(run, learner.model, learner.normalizer, env_steps, grad_steps, resume)
            cadence.evaluated(env_steps)

        if saved is None:
            evaluate()  # the untrained policy: the first point of every learning curve
        while not cadence.finished(env_steps):
            # A segment ends at the next evaluation point or the budget, whichever comes first, so the run
            # evaluates on the requested interval and stops at the budget (in whole vector steps: past it
            # by fewer than num_envs env steps when num_envs does not divide it).
            stats = apg_update(learner, envs, params, config,
                               max_steps=cadence.steps_to_next(env_steps, config.num_envs))
            env_steps += config.num_envs * int(stats["segment_length"])
            grad_steps += int(stats["policy_steps"])  # the analytic step and any proximal steps
            run.log(env_steps, grad_steps, **stats)
            if cadence.due(env_steps):
                evaluate()
        return run.dir
