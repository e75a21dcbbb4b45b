"""The policy's entropy in the returns, weighted by a learned temperature (``algo_params.entropy``; trainer
``sapo``, ``docs/apg.md`` "SAPO").

SAPO (Xing et al., ICLR 2025, "Stabilizing Reinforcement Learning in Differentiable Multiphysics
Simulation"): every step's reward is augmented with ``-alpha * log pi(a_t | o_t)``, in the segment's
objective (so the analytic gradient also maximizes entropy) and in the critic's TD(lambda) targets (so the
value is the soft value the tail needs); ``alpha = exp(log_alpha)`` is learned by its own Adam towards a
target entropy, as in SAC (Haarnoja et al. 2018).

For the tanh-squashed reparameterized sample ``a = tanh(u)``, ``u = mu(o) + sigma * eps``:

    log pi(a | o) = sum_i [ -eps_i^2 / 2 - log(2 pi) / 2 - log sigma_i - log(1 - a_i^2) ]

The parameters enter it in two ways: through the action ``a`` (the squash term; ``a`` is the tensor the
simulator received, so the analytic estimator's action adjoints carry it, including its effect on later
observations), and directly through ``log sigma`` (no action in between: its gradient is added after the
estimator's, ``SegmentObjective.direct_bonus``). ``eps`` is a constant of the sample.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from diffgym.training import ActorCritic, OptimizerSpec, Rollout, make_optimizer
from diffgym.training.optim import descend


@dataclasses.dataclass
class EntropyConfig:
    """``algo_params.entropy`` (trainer ``sapo``). Needs ``policy_gradient.estimator: analytic`` and no
    ``reuse`` steps (both read only the action adjoints, which do not carry the log-std term), and a
    tanh-squashed policy (the squash's Jacobian is part of ``log pi``)."""

    alpha_init: float = 1.0
    """Initial temperature (SAPO's 1.0)."""
    lr: float = 5e-3
    """Adam learning rate of ``log alpha`` (SAPO's 5e-3)."""
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.7, 0.95])
    """Adam betas of ``log alpha`` (SAPO's; its epsilon and gradient clip are the shared ``optimizer``'s)."""
    target_entropy: float | None = None
    """Entropy ``-E[log pi]`` (nats per action, summed over its dimensions) the temperature steers to;
    None: ``-0.5 x`` the action dimension (SAPO's)."""

    def __post_init__(self) -> None:
        self.betas = [float(b) for b in self.betas]  # a list, as a saved config reads it back
        if not (self.alpha_init > 0 and math.isfinite(self.alpha_init)):
            raise ValueError(f"entropy.alpha_init must be a finite number > 0, got {self.alpha_init}")
        if not self.lr > 0:
            raise ValueError(f"entropy.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"entropy.betas must be two numbers in [0, 1), got {self.betas}")
        if self.target_entropy is not None and not math.isfinite(self.target_entropy):
            raise ValueError(f"entropy.target_entropy must be a finite number or None, got {self.target_entropy}")


@dataclasses.dataclass
class SegmentLogProb:
    """``log pi(a_t | o_t)`` ``(K, N)`` of a segment's actions under the policy that acted, in its two parts."""

    through_actions: torch.Tensor
    """``(K, N)``: the noise's and the squash's terms, differentiable through the segment's actions."""
    log_std: torch.Tensor
    """Scalar: ``sum_i log sigma_i``, differentiable in the log-std parameter itself."""

    @property
    def value(self) -> torch.Tensor:
        """``(K, N)`` detached ``log pi``."""
        return (self.through_actions - self.log_std).detach()


def squash_log_jacobian(actions: torch.Tensor, pre_squash: torch.Tensor) -> torch.Tensor:
    """``log(1 - tanh(u)^2)`` per dimension: its value from the (detached) pre-squash sample ``u``, in a form
    that stays finite where ``tanh(u)`` rounds to 1, and its gradient through ``actions = tanh(u)``
    (zero where ``1 - a^2`` underflows, instead of ``inf * 0``)."""
    stable = 2.0 * (math.log(2.0) - pre_squash - nn.functional.softplus(-2.0 * pre_squash))
    through = torch.log((1.0 - actions.square()).clamp_min(torch.finfo(actions.dtype).tiny))
    return through + (stable - through).detach()


class Temperature:
    """The entropy bonus ``-alpha * log pi`` of each step and the temperature ``alpha`` that weights it."""

    def __init__(self, config: EntropyConfig, act_dim: int, optimizer: OptimizerSpec, device: torch.device):
        self.config = config
        self.target_entropy = -0.5 * act_dim if config.target_entropy is None else float(config.target_entropy)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(config.alpha_init), device=device))
        self.optimizer_spec = dataclasses.replace(optimizer, lr=config.lr, betas=tuple(config.betas))
        self.optimizer = make_optimizer([self.log_alpha], self.optimizer_spec)

    @property
    def alpha(self) -> float:
        return float(self.log_alpha.detach().exp())

    @staticmethod
    def log_prob(model: ActorCritic, segment: Rollout) -> SegmentLogProb:
        """The segment's ``log pi(a_t | o_t)``, differentiable as the module doc says."""
        actions = torch.stack(segment.actions)
        noise = segment.noise.detach()
        gaussian = -0.5 * noise.square() - 0.5 * math.log(2.0 * math.pi)
        through_actions = (gaussian - squash_log_jacobian(actions, segment.pre_squash.detach())).sum(-1)
        return SegmentLogProb(through_actions, model.log_std.sum())

    def bonus(self, log_prob: SegmentLogProb) -> tuple[torch.Tensor, torch.Tensor]:
        """``-alpha * log pi`` ``(K, N)`` in the segment objective's two parts: through the actions, and
        directly in the log-std (``SegmentObjective``'s ``bonus`` and ``direct_bonus``), at the current alpha."""
        alpha = self.alpha
        return -alpha * log_prob.through_actions, (alpha * log_prob.log_std).expand_as(log_prob.through_actions)

    def step(self, log_prob: SegmentLogProb, valid: torch.Tensor) -> dict[str, float]:
        """One Adam step of ``log alpha`` on SAC's temperature loss ``alpha * (H - target)``, ``H`` the mean
        of ``-log pi`` over the segment's steps of the ``valid`` (N,) envs: alpha falls while the entropy is
        above the target and rises while it is below."""
        log_pi = log_prob.value[:, valid]
        log_pi = log_pi[torch.isfinite(log_pi)]
        if log_pi.numel() == 0:
            return {"alpha": self.alpha, "entropy": math.nan}
        entropy = float(-log_pi.mean())
        loss = self.log_alpha.exp() * (entropy - self.target_entropy)
        descend(self.optimizer, loss, [self.log_alpha], self.optimizer_spec)
        self.optimizer.zero_grad(set_to_none=True)
        return {"alpha": self.alpha, "entropy": entropy}

    def target_bonus(self, log_prob: SegmentLogProb) -> torch.Tensor:
        """``-alpha * log pi`` ``(K, N)``, detached, for the critic's targets (after :meth:`step`, as SAPO)."""
        return -self.alpha * log_prob.value

    def state_dict(self) -> dict[str, Any]:
        return {"log_alpha": self.log_alpha.detach().clone(), "alpha_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        with torch.no_grad():
            self.log_alpha.copy_(saved["log_alpha"])
        self.optimizer.load_state_dict(saved["alpha_optimizer"])
