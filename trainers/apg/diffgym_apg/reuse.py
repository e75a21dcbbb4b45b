"""Rollout reuse for the analytic gradient (``algo_params.reuse``): more policy steps per simulated segment.

A segment's backward pass through the simulator gives every action's adjoint ``lambda_t = dL/da_t``, the
expensive part of an analytic gradient; the segment step spends it on a single Adam step. RPO
(Reparameterization Proximal Policy Optimization, Zhong et al. 2025, arXiv 2508.06214) reuses it for
several epochs. With the observations and the noise of the rollout held fixed, the actions are
functions of the parameters alone, ``a_t(theta) = squash(mu_theta(o_t) + sigma_theta * eps_t)``, and

    L(theta) ~ L(theta_old) + sum_t lambda_t . (a_t(theta) - a_t(theta_old))

to first order in the change of the actions. Each reuse step descends this surrogate (its gradient at
``theta_old`` is exactly the segment step's analytic gradient), on minibatches of the segment's
(step, env) samples. The expansion holds only while the policy stays close to the one that acted, so,
as PPO does for the likelihood ratio: a sample whose probability ratio ``pi_theta(u_t | o_t) /
pi_old(u_t | o_t)`` of the action it took has left ``[1 - clip_range, 1 + clip_range]`` stops contributing
(its first-order term is no longer trusted), and ``kl_coef`` times the mean KL divergence
``KL(pi_old || pi_theta)`` over the segment's observations is added; a minibatch with nothing left to
descend takes no step. No step simulates: the env steps of an update stay ``num_envs * K`` whatever
``epochs`` is; every reuse step taken is a gradient step.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from diffgym.training import ActorCritic, OptimizerSpec
from diffgym.training.gradients import surrogate_for_adjoints
from diffgym.training.optim import descend

from diffgym_apg.objective import SegmentObjective


@dataclasses.dataclass
class ReuseConfig:
    """``algo_params.reuse``."""

    epochs: int = 0
    """Passes over the segment's samples after its own step; 0: none (one step per segment)."""
    minibatches: int = 1
    """Steps per pass: the segment's kept (step, env) samples split into this many minibatches."""
    clip_range: float = 0.2
    """A sample whose probability ratio leaves ``[1 - clip_range, 1 + clip_range]`` stops contributing."""
    kl_coef: float = 0.0
    """Weight of the mean ``KL(pi_old || pi_theta)`` over the segment's observations."""

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"reuse.epochs must be >= 0 (0: off), got {self.epochs}")
        if self.minibatches < 1:
            raise ValueError(f"reuse.minibatches must be >= 1, got {self.minibatches}")
        if not self.clip_range > 0:
            raise ValueError(f"reuse.clip_range must be > 0, got {self.clip_range}")
        if not self.kl_coef >= 0:
            raise ValueError(f"reuse.kl_coef must be >= 0, got {self.kl_coef}")

    @property
    def enabled(self) -> bool:
        return self.epochs > 0


@dataclasses.dataclass
class ReuseBatch:
    """A segment's kept (step, env) samples as the policy that acted saw them, detached."""

    obs: torch.Tensor
    noise: torch.Tensor
    pre_squash: torch.Tensor
    adjoints: torch.Tensor
    acting: torch.distributions.Normal
    """The acting policy's pre-squash Gaussians."""
    scale: float
    """``N / kept``: the segment loss is a mean over all N envs."""

    @classmethod
    def of(cls, model: ActorCritic, objective: SegmentObjective) -> ReuseBatch:
        """Take it before any step moves the policy."""
        segment, valid = objective.segment, objective.valid
        obs = segment.obs_normalized[:, valid].flatten(0, 1)
        with torch.no_grad():
            acting = model.distribution(obs)
            acting = torch.distributions.Normal(acting.mean.detach(), acting.stddev.detach())
        return cls(obs, segment.noise[:, valid].flatten(0, 1).detach(), segment.pre_squash[:, valid].flatten(0, 1),
                   objective.action_adjoints[:, valid].flatten(0, 1).detach(), acting,
                   objective.num_envs / objective.kept)


def reuse_steps(config: ReuseConfig, model: ActorCritic, batch: ReuseBatch, parameters: list[nn.Parameter],
                optimizer: torch.optim.Optimizer, optimizer_spec: OptimizerSpec) -> dict[str, float]:
    """``config.epochs`` passes of clipped, KL-regularized steps on the first-order surrogate of the
    segment's objective, with the segment step's ``optimizer``; their statistics. Steps whose gradient is
    not finite are skipped (nothing reaches Adam)."""
    obs, noise, pre_squash, adjoints, scale = batch.obs, batch.noise, batch.pre_squash, batch.adjoints, batch.scale
    old_log_prob = batch.acting.log_prob(pre_squash).sum(-1)
    steps = skipped = 0
    clipped, last_kl = [], math.nan
    # no more minibatches than samples (a segment with envs left out may keep few): each has at least one
    minibatches = max(1, min(config.minibatches, obs.shape[0]))
    for epoch in range(config.epochs):
        order = torch.randperm(obs.shape[0], device=obs.device)
        for part, index in enumerate(order.tensor_split(minibatches)):
            last = epoch == config.epochs - 1 and part == minibatches - 1
            # one actor pass: the surrogate's actions and the ratio's Gaussian share its means; the ratio
            # only masks samples, so only a KL term in the loss needs a graph through the Gaussian, and the
            # statistic needs only the last minibatch's KL
            mean = model.actor(obs[index])
            with torch.set_grad_enabled(bool(config.kl_coef)):
                dist = torch.distributions.Normal(mean, model.log_std.exp().expand_as(mean))
                ratio = (dist.log_prob(pre_squash[index]).sum(-1) - old_log_prob[index]).exp()
                trusted = ((ratio - 1.0).abs() <= config.clip_range).to(adjoints.dtype)
                kl = torch.distributions.kl_divergence(
                    torch.distributions.Normal(batch.acting.mean[index], batch.acting.stddev[index]),
                    dist).sum(-1).mean() if config.kl_coef or last else None
            clipped.append(1.0 - float(trusted.mean()))
            if last:
                last_kl = float(kl.detach())
            if not config.kl_coef and not bool(trusted.any()):
                continue  # nothing to descend: a step would only carry Adam's momentum past the clip
            # the samples of a minibatch stand for the whole segment: the surrogate's scale is the segment's
            share = obs.shape[0] / index.numel()
            surrogate = share * scale * surrogate_for_adjoints(model, obs[index], noise[index],
                                                               adjoints[index] * trusted[:, None], mean=mean)
            loss = surrogate + config.kl_coef * kl if config.kl_coef else surrogate
            steps += 1
            skipped += not descend(optimizer, loss, parameters, optimizer_spec)
    optimizer.zero_grad(set_to_none=True)
    return {"reuse_grad_steps": float(steps), "reuse_skipped_steps": float(skipped),
            "reuse_clip_fraction": sum(clipped) / len(clipped) if clipped else math.nan,
            "reuse_kl": last_kl}
