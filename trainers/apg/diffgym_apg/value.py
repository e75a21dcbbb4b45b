"""The value function: what closes each segment, what the value network is fitted to, in which units
(``algo_params.value``; ``docs/apg.md``, "Bootstrap modes").

| ``bootstrap`` | ``V`` in the tail | the value network is fitted to |
|---|---|---|
| ``none``   | 0 | nothing |
| ``mc``     | the value network | Monte-Carlo returns-to-go, after every segment |
| ``critic`` | a Polyak-averaged target network | TD(lambda) targets from the target network, after every segment |
| ``gae``    | the value network | GAE(lambda) returns, in the ``proximal`` section's joint steps (PPO's value loss) |

With ``critics: 2`` (``critic`` only; SAPO's twin critics) a second value network of the same shape sits
beside the shared actor-critic's: the tail and the likelihood baseline read their mean, the TD(lambda)
targets their minimum (a pessimistic bootstrap, as SAPO's code and clipped double-Q), and both are fitted
to those targets (the mean of their squared errors, as SAPO's). ``target_tau: 1`` is no target network:
the copies then equal the critics wherever read.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import torch

from diffgym.training import ActorCritic, ObservationNormalizer, OptimizerSpec, Rollout, make_optimizer
from diffgym.training.networks import mlp
from diffgym.training.optim import descend
from diffgym.training.gradients import leave_one_out_baseline
from diffgym.training.returns import MonteCarloReturns, ReturnScale, td_lambda_targets

BOOTSTRAP_MODES = ("none", "mc", "critic", "gae")


@dataclasses.dataclass
class ValueConfig:
    """``algo_params.value``."""

    bootstrap: str = "critic"
    """Tail estimate closing each segment and each truncated episode, and the targets the value network is
    fitted to: ``none``, ``mc``, ``critic`` or ``gae`` (table above; ``gae`` needs the ``proximal`` section)."""
    lr: float = 1e-3
    """Adam learning rate of the value network's own steps (``mc``, ``critic``; the other Adam settings
    come from ``optimizer``)."""
    epochs: int = 4
    """Passes over each segment's targets (``mc``, ``critic``)."""
    minibatches: int = 4
    """Minibatches per pass; each is one value-network step."""
    td_lambda: float = 0.95
    """lambda of the TD(lambda) targets (``critic``)."""
    target_tau: float = 0.2
    """Polyak rate of the target network (``critic``): ``target <- (1 - tau) target + tau online`` once
    per segment."""
    critics: int = 1
    """Value networks fitted side by side (``critic`` only): the tail reads their mean, the TD(lambda)
    targets their minimum (SAPO's twin critics: 2)."""
    normalize_reward: bool = False
    """Keep the value network's outputs in units of a running std of the discounted return (SB3's
    ``VecNormalize`` reward scaling, PPO's ``normalize_reward``): its targets are divided by it and its
    outputs multiplied by it wherever a value is used (tails, baselines, advantages)."""

    def __post_init__(self) -> None:
        if self.bootstrap not in BOOTSTRAP_MODES:
            raise ValueError(f"value.bootstrap must be one of {BOOTSTRAP_MODES}, got {self.bootstrap!r}")
        if not self.lr > 0:  # NaN fails too
            raise ValueError(f"value.lr must be > 0, got {self.lr}")
        if self.epochs < 1 or self.minibatches < 1:
            raise ValueError(f"value.epochs and value.minibatches must be >= 1, got {self.epochs} and "
                             f"{self.minibatches}")
        if not 0.0 <= self.td_lambda <= 1.0:  # NaN fails too
            raise ValueError(f"value.td_lambda must be in [0, 1], got {self.td_lambda}")
        if not 0.0 < self.target_tau <= 1.0:
            raise ValueError(f"value.target_tau must be in (0, 1], got {self.target_tau}")
        if self.critics < 1:
            raise ValueError(f"value.critics must be >= 1, got {self.critics}")
        if self.critics > 1 and self.bootstrap != "critic":
            owner = " (bootstrap 'gae' is trainer apg-ppo's: its proximal section fits one value network)" \
                if self.bootstrap == "gae" else ""
            raise ValueError(f"value.critics {self.critics} bootstraps the TD(lambda) targets with their minimum: it "
                             f"needs value.bootstrap 'critic', not {self.bootstrap!r}{owner}")
        if self.normalize_reward and self.bootstrap == "none":
            raise ValueError("value.normalize_reward scales the value network, which bootstrap 'none' does not have")

    @property
    def enabled(self) -> bool:
        return self.bootstrap != "none"


class ValueFunction:
    """The value network of the shared actor-critic, as :class:`ValueConfig` says to use and fit it."""

    def __init__(self, config: ValueConfig, model: ActorCritic, normalizer: ObservationNormalizer,
                 optimizer: OptimizerSpec, num_envs: int, gamma: float):
        self.config, self.model, self.normalizer, self.gamma = config, model, normalizer, gamma
        device = next(model.critic.parameters()).device
        self.critics = [model.critic, *(mlp(model.obs_dim, model.spec.hidden_sizes, 1, model.spec.activation,
                                            output_gain=1.0).to(device) for _ in range(config.critics - 1))]
        self.parameters = [p for critic in self.critics for p in critic.parameters()]
        self.optimizer_spec = optimizer
        self.optimizer = make_optimizer(self.parameters, dataclasses.replace(optimizer, lr=config.lr))
        self.target = copy.deepcopy(model.critic).requires_grad_(False)
        self.targets = [self.target, *(copy.deepcopy(critic).requires_grad_(False) for critic in self.critics[1:])]
        self.mc_returns = MonteCarloReturns(gamma)
        self.return_scale = ReturnScale(num_envs, gamma) if config.normalize_reward else None
        self.grad_steps = 0
        """Value-network Adam steps, its own and any joint ones (``docs/protocol.md``)."""

    @property
    def scale(self) -> float:
        """Return units per value-network output unit (1 without ``normalize_reward``)."""
        return self.return_scale.scale if self.return_scale is not None else 1.0

    def __call__(self, obs_normalized: torch.Tensor) -> torch.Tensor:
        """V of normalized observations, in return units."""
        return combined(self.critics, obs_normalized) * self.scale

    def tail(self, obs: torch.Tensor, pessimistic: bool = False) -> torch.Tensor:
        """V of (unnormalized, differentiable) observations ``(..., D)`` closing a piece: the critics' mean,
        or with ``pessimistic`` their minimum."""
        if not self.config.enabled:
            return torch.zeros(obs.shape[:-1], dtype=obs.dtype, device=obs.device)
        networks = self.targets if self.config.bootstrap == "critic" else self.critics
        return combined(networks, self.normalizer(obs), pessimistic) * self.scale

    def baseline(self, segment: Rollout, future: torch.Tensor) -> torch.Tensor:
        """The likelihood ratio's baseline of ``future`` (K, N): V, or without one the other envs' mean."""
        return self(segment.obs_normalized) if self.config.enabled else leave_one_out_baseline(future)

    def observe(self, segment: Rollout) -> None:
        """Fold a fresh segment's returns into the running scale (before anything uses the values)."""
        if self.return_scale is not None:
            self.return_scale.update(segment.rewards.detach(), segment.done)

    def fit(self, segment: Rollout, bonus: torch.Tensor | None = None) -> float | None:
        """The value network's own steps on the segment's detached targets (``mc``, ``critic``), then the
        target network's Polyak step; the mean loss, or None where nothing was fitted. ``bonus`` (K, N):
        terms added to the rewards the targets are built from (the entropy bonus of a soft value)."""
        with torch.no_grad():
            rewards = segment.rewards.detach() if bonus is None else segment.rewards.detach() + bonus.detach()
            if self.config.bootstrap == "critic":
                next_values = self.tail(segment.next_obs.detach(), pessimistic=True)
                targets = td_lambda_targets(rewards, next_values, segment.terminated, segment.truncated, self.gamma,
                                            self.config.td_lambda)
                obs, targets = segment.start_obs.flatten(0, 1), targets.flatten()
            elif self.config.bootstrap == "mc":
                obs, targets = self.mc_returns.add(segment.start_obs, rewards, segment.terminated | segment.truncated)
            else:
                return None
        loss = self.regress(obs, targets)
        if self.config.bootstrap == "critic":
            with torch.no_grad():
                for target_network, critic in zip(self.targets, self.critics):
                    for target, online in zip(target_network.parameters(), critic.parameters()):
                        target.lerp_(online, self.config.target_tau)
        return loss

    def regress(self, obs: torch.Tensor, targets: torch.Tensor) -> float | None:
        """Minibatch MSE regression on ``targets`` (return units); non-finite targets are dropped (a
        diverged env must not poison the value network)."""
        keep = torch.isfinite(targets) & torch.isfinite(obs).all(dim=1)
        obs, targets = obs[keep], targets[keep]
        if targets.numel() == 0:
            return None
        inputs = self.normalizer(obs)
        targets = targets / self.scale
        losses = []
        for _ in range(self.config.epochs):
            order = torch.randperm(targets.numel(), device=targets.device)
            for batch in order.chunk(self.config.minibatches):
                losses_per_critic = [(critic(inputs[batch]).squeeze(-1) - targets[batch]).square().mean()
                                     for critic in self.critics]  # in network units
                loss = losses_per_critic[0] if len(self.critics) == 1 else torch.stack(losses_per_critic).mean()
                self.grad_steps += descend(self.optimizer, loss, self.parameters, self.optimizer_spec)
                losses.append(float(loss.detach()))
        self.optimizer.zero_grad(set_to_none=True)
        return float(np.mean(losses))

    def state_dict(self) -> dict[str, Any]:
        return {"critic_optimizer": self.optimizer.state_dict(), "target_critic": self.target.state_dict(),
                "mc_returns": self.mc_returns.state_dict(), "critic_grad_steps": self.grad_steps,
                "return_scale": self.return_scale.state_dict() if self.return_scale else None,
                **({"twin_critics": [critic.state_dict() for critic in self.critics[1:]],
                    "twin_target_critics": [target.state_dict() for target in self.targets[1:]]}
                   if len(self.critics) > 1 else {})}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(saved["critic_optimizer"])
        self.target.load_state_dict(saved["target_critic"])
        self.mc_returns.load_state_dict(saved["mc_returns"])
        self.grad_steps = int(saved.get("critic_grad_steps", 0))
        for network, state in zip(self.critics[1:] + self.targets[1:],
                                  saved.get("twin_critics", []) + saved.get("twin_target_critics", [])):
            network.load_state_dict(state)
        if self.return_scale is not None and saved.get("return_scale"):
            self.return_scale.load_state_dict(saved["return_scale"])


def combined(networks: list[torch.nn.Module], inputs: torch.Tensor, pessimistic: bool = False) -> torch.Tensor:
    """The value networks' outputs ``(...)`` on ``inputs``: the one network's, else their mean (or minimum)."""
    if len(networks) == 1:
        return networks[0](inputs).squeeze(-1)
    values = torch.stack([network(inputs).squeeze(-1) for network in networks])
    return values.min(dim=0).values if pessimistic else values.mean(dim=0)
