"""The shared actor-critic: every trainer builds its model from ``(obs_dim, act_dim, PolicySpec)`` only.

Two separate MLPs (no shared trunk, so value and policy gradients never interfere): the actor outputs
the mean of a pre-squash Gaussian whose log-std is a learned, state-independent vector, and the critic
outputs a scalar value. Actions are bounded by squashing a Gaussian sample ``u`` into [-1, 1]
(``tanh(u)``, or ``clamp(u, -1, 1)`` with ``squash="clip"``). Inputs are *normalized* observations:
the :class:`~diffgym.training.normalization.ObservationNormalizer` is applied by the caller.

Initialization follows the PPO implementation details (Huang et al., 2022) that SB3 and CleanRL use:
orthogonal weights with gain sqrt(2) on hidden layers, 0.01 on the actor output (near-zero initial
mean) and 1 on the critic output; zero biases.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffgym.training.spec import PolicySpec

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU,
}


def mlp(in_dim: int, hidden_sizes: tuple[int, ...], out_dim: int, activation: str,
        output_gain: float) -> nn.Sequential:
    """Linear layers with ``activation`` between them, orthogonally initialized (see module doc)."""
    layers: list[nn.Module] = []
    width = in_dim
    for hidden in hidden_sizes:
        layers += [_orthogonal(nn.Linear(width, hidden), math.sqrt(2.0)), _ACTIVATIONS[activation]()]
        width = hidden
    layers.append(_orthogonal(nn.Linear(width, out_dim), output_gain))
    return nn.Sequential(*layers)


def forward_layers(network: nn.Sequential, inputs: torch.Tensor) -> torch.Tensor:
    """``network(inputs)`` with each layer's ``forward`` called directly: the same operations (the same
    bits) without ``nn.Module.__call__``'s per-layer dispatch (hook checks and the like), about a third
    of an :func:`mlp`'s cost on the small batches a trainer acts on at every env step. Forward hooks on
    the layers are not run."""
    for layer in network:
        inputs = layer.forward(inputs)
    return inputs


def _orthogonal(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain=gain)
    nn.init.zeros_(layer.bias)
    return layer


class ActorCritic(nn.Module):
    """Gaussian actor with state-independent log-std, squashed into [-1, 1], and a separate critic."""

    def __init__(self, obs_dim: int, act_dim: int, spec: PolicySpec):
        super().__init__()
        self.obs_dim, self.act_dim, self.spec = int(obs_dim), int(act_dim), spec
        self.actor = mlp(self.obs_dim, spec.hidden_sizes, self.act_dim, spec.activation, output_gain=0.01)
        self.log_std = nn.Parameter(torch.full((self.act_dim,), float(spec.log_std_init)))
        self.critic = mlp(self.obs_dim, spec.hidden_sizes, 1, spec.activation, output_gain=1.0)

    def distribution(self, obs_normalized: torch.Tensor) -> torch.distributions.Normal:
        """The pre-squash Gaussian ``N(actor(obs), exp(log_std))`` over ``u``, batch shape ``(B, act_dim)``."""
        mean = self.actor(obs_normalized)
        return torch.distributions.Normal(mean, self.log_std.exp().expand_as(mean))

    def log_prob(self, obs_normalized: torch.Tensor, pre_squash: torch.Tensor) -> torch.Tensor:
        """``log N(pre_squash; actor(obs), std)`` summed over the action dimensions, shape ``(B,)``. The
        squash's Jacobian is left out: it has no parameters and cancels in every probability ratio."""
        return self.distribution(obs_normalized).log_prob(pre_squash).sum(-1)

    def squash(self, pre_squash_action: torch.Tensor) -> torch.Tensor:
        """Map a Gaussian sample ``u`` into the action box [-1, 1] as the spec says (tanh or clip)."""
        if self.spec.squash == "tanh":
            return torch.tanh(pre_squash_action)
        return pre_squash_action.clamp(-1.0, 1.0)

    def act(self, obs_normalized: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """An action in [-1, 1]: ``squash(rsample())`` (reparameterized, so differentiable in the
        parameters and the observation), or ``squash(mean)`` when ``deterministic``."""
        if deterministic:
            return self.squash(self.actor(obs_normalized))
        return self.squash(self.distribution(obs_normalized).rsample())

    def sample(self, obs_normalized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(action, pre_squash, noise)``: ``action = squash(pre_squash)``, ``pre_squash = mean + std *
        noise`` with ``noise ~ N(0, I)``; the same reparameterized sample as :meth:`act`, with the pieces
        gradient estimators need (``diffgym.training.gradients``)."""
        mean = forward_layers(self.actor, obs_normalized)
        noise = torch.randn_like(mean)
        pre_squash = mean + self.log_std.exp() * noise
        return self.squash(pre_squash), pre_squash, noise

    def value(self, obs_normalized: torch.Tensor) -> torch.Tensor:
        """State values, shape ``(B,)``."""
        return self.critic(obs_normalized).squeeze(-1)

    def extra_repr(self) -> str:
        return f"obs_dim={self.obs_dim}, act_dim={self.act_dim}, squash={self.spec.squash!r}"
