"""Returns, value targets and advantages of time-major rollouts, written once for every trainer.

All functions take tensors of ``K`` steps over ``N`` envs, time first:

* ``rewards[t]``     (K, N)  reward of the transition taken at step ``t``;
* ``terminated[t]``  (K, N)  bool, the transition reached a terminal state (nothing after it);
* ``truncated[t]``   (K, N)  bool, the episode hit its time limit (its future is cut, not zero);
* ``next_values[t]`` (K, N)  value of the observation the transition led to, *before* any reset.

Every backward recursion here is one call of :func:`lambda_returns`; every running discount restarted
at episode ends is :func:`piece_discounts`. The clipped surrogate and the running return scale of
PPO-style updates live here too (``clipped_surrogate_loss``, :class:`ReturnScale`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from diffgym.training.normalization import ObservationNormalizer
from diffgym.training.spec import NormalizerSpec


# ------------------------------------------------------------------------------------ the scans
def lambda_returns(rewards: torch.Tensor, tails: torch.Tensor, cut: torch.Tensor, gamma: float,
                   lam: float = 1.0) -> torch.Tensor:
    """``G_t = r_t + gamma * (tail_t if cut_t else (1 - lam) * tail_t + lam * G_{t+1})``, backwards in time.

    ``cut`` (K, N) marks the steps after which the recursion does not continue (an episode end, the
    last step of a segment); there the bracket is ``tail_t`` alone (zero after a termination, a value
    after a truncation). With ``lam = 1`` the bracket elsewhere is ``G_{t+1}`` exactly, so the function
    is a discounted return-to-go; with ``lam < 1`` it is the TD(lambda) return; with the TD errors as
    ``rewards``, zero ``tails`` and ``gamma * lam`` as ``gamma`` it is GAE. Past the last step ``G`` is
    zero (cut the last step to close it with its tail instead).
    """
    returns = torch.empty_like(rewards)
    xp, (rewards_, tails_, cut_, returns_) = scan_arrays(rewards, tails, cut, returns)
    following = xp.zeros_like(rewards_[0])
    for t in reversed(range(rewards_.shape[0])):
        blended = following if lam == 1.0 else (1.0 - lam) * tails_[t] + lam * following
        following = rewards_[t] + gamma * xp.where(cut_[t], tails_[t], blended)
        returns_[t] = following
    return returns


def piece_discounts(done: torch.Tensor, gamma: float, dtype: torch.dtype) -> torch.Tensor:
    """``(K, N)``: ``gamma^(t - b)`` with ``b`` the first step of the episode piece ``t`` belongs to
    (the discount restarts at 1 after every episode end)."""
    discounts = torch.empty(done.shape, dtype=dtype, device=done.device)
    if done.shape[0] == 0:
        return discounts
    xp, (done_, discounts_) = scan_arrays(done, discounts)
    one = xp.ones_like(discounts_[0])
    discount = one
    for t in range(done_.shape[0]):
        discounts_[t] = discount
        discount = xp.where(done_[t], one, gamma * discount)
    return discounts


def scan_arrays(*tensors: torch.Tensor) -> tuple[Any, list[Any]]:
    """The array module and arrays a scan over time steps runs on (those above; ``EnvBatch.record``): NumPy
    views of the tensors (sharing their memory) where they are float32, float64, int64 or bool CPU tensors
    and no gradient is asked of them, else the tensors.

    A scan is K steps of a few elementwise operations on ``(N,)`` rows; NumPy does each in well under a
    microsecond where a torch op costs a few, and in the same IEEE arithmetic (NumPy, like torch, rounds a
    Python scalar to the array's dtype before multiplying), so the results are the same bits
    (``tests/test_apg_fast_paths.py`` compares the two)."""
    on_host = all(t.device.type == "cpu" and t.dtype in _HOST_DTYPES for t in tensors) and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    if not on_host:
        return torch, list(tensors)
    return np, [t.detach().numpy() for t in tensors]


_HOST_DTYPES = (torch.float32, torch.float64, torch.int64, torch.bool)


def _segment_cut(terminated: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Episode ends and the segment's last step."""
    cut = terminated | truncated
    cut[-1] = True
    return cut


# ------------------------------------------------------------------------------ what trainers use
def returns_to_go(rewards: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
                  truncated: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(future, piece_discount)``, both ``(K, N)``: the part of a segment objective each action can
    influence is ``piece_discount * future``.

    The objective splits each env's segment into pieces at episode ends and at the segment end; a piece
    starting at ``b`` contributes ``sum_{t=b..e} gamma^(t-b) r_t + tail`` (``tail`` = 0 after termination,
    ``gamma^(e-b+1) V(o_{e+1})`` otherwise). The action at ``t`` influences its piece from ``t`` on:
    ``future_t = sum_{u=t..e} gamma^(u-t) r_u + gamma^(e-t+1) V(o_{e+1})``, weighted by
    ``piece_discount_t = gamma^(t-b)``. A state-value baseline is compared with ``future``.
    """
    tails = torch.where(terminated, torch.zeros_like(next_values), next_values)
    future = lambda_returns(rewards, tails, _segment_cut(terminated, truncated), gamma)
    return future, piece_discounts(terminated | truncated, gamma, rewards.dtype)


@torch.no_grad()
def td_lambda_targets(rewards: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
                      truncated: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """TD(lambda) value targets ``(K, N)`` for the observations the segment's steps start from.

    ``G_t = r_t + gamma * [(1 - lam) * V(s_{t+1}) + lam * G_{t+1}]``, where the bracket is just
    ``V(s_{t+1})`` at a truncation or at the segment's last step (the lambda-return is cut there and
    closed by the value) and zero at a termination. ``next_values`` should come from a target network.
    """
    tails = torch.where(terminated, torch.zeros_like(next_values), next_values)
    return lambda_returns(rewards, tails, _segment_cut(terminated, truncated), gamma, lam)


@torch.no_grad()
def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor,
                   terminated: torch.Tensor, truncated: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """GAE(lambda) advantages ``(T, N)`` (Schulman et al. 2016) of the steps of contiguous segments.

    ``delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)``, with ``V(s_{t+1})`` zero after a termination and the
    value of the pre-reset observation after a truncation; ``A_t = delta_t + gamma * lam * A_{t+1}``,
    the recursion cut at every episode end and closed by the last step's ``delta`` (its ``V(s_{t+1})``
    is the bootstrap).
    """
    next_values = torch.where(terminated, torch.zeros_like(next_values), next_values)
    deltas = rewards + gamma * next_values - values
    return lambda_returns(deltas, torch.zeros_like(deltas), terminated | truncated, gamma * lam)


class MonteCarloReturns:
    """Discounted Monte-Carlo returns-to-go, emitted as soon as the episode they belong to has ended.

    Segments are appended as they are collected; a step's return-to-go
    ``G_t = r_t + gamma * r_{t+1} + ... + gamma^(T-1-t) * r_{T-1}`` is known once its episode ends at
    ``T`` (by termination or by the time limit: these are the returns the rollouts actually observed,
    with nothing bootstrapped). Steps whose episode is still running stay pending (at most one episode
    plus one segment per env), so a value network is only ever fitted to exact returns.
    """

    def __init__(self, gamma: float):
        self.gamma = gamma
        self.obs: torch.Tensor | None = None      # (W, N, obs_dim) pending steps, oldest first
        self.rewards: torch.Tensor | None = None  # (W, N)
        self.done: torch.Tensor | None = None     # (W, N)
        self.emitted: torch.Tensor | None = None  # (W, N) already handed out

    def add(self, obs: torch.Tensor, rewards: torch.Tensor, done: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a segment (detached ``obs`` (K, N, D) the steps start from, ``rewards``, ``done``);
        return ``(obs (M, D), returns (M,))`` for every step whose return-to-go became known."""
        obs, rewards, done = obs.detach(), rewards.detach(), done.detach()
        emitted = torch.zeros_like(done)
        if self.obs is not None:
            obs = torch.cat([self.obs, obs])
            rewards = torch.cat([self.rewards, rewards])
            done = torch.cat([self.done, done])
            emitted = torch.cat([self.emitted, emitted])
        # the window's last pending steps have no known future yet: cutting there is harmless, as
        # only steps with an episode end at or after them are emitted
        returns = lambda_returns(rewards, torch.zeros_like(rewards), done, self.gamma)
        known = done.flip(0).cumsum(0).flip(0) > 0  # an episode end at or after the step
        ready = known & ~emitted
        emitted = emitted | ready
        # drop the leading steps every env has handed out; keep the rest pending
        fully_emitted = emitted.all(dim=1)
        keep_from = int(fully_emitted.long().cumprod(0).sum())
        self.obs, self.rewards = obs[keep_from:], rewards[keep_from:]
        self.done, self.emitted = done[keep_from:], emitted[keep_from:]
        return obs[ready], returns[ready]

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"obs": self.obs, "rewards": self.rewards, "done": self.done, "emitted": self.emitted}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        self.obs, self.rewards, self.done, self.emitted = (state["obs"], state["rewards"], state["done"],
                                                           state["emitted"])


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
        """Fold a rollout's ``rewards`` / ``done`` ``(K, N)`` in (non-finite rewards count as zero)."""
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


def clipped_surrogate_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                           clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's ``-mean(min(rho A, clip(rho, 1 - eps, 1 + eps) A))`` and the fraction of clipped ratios."""
    ratio = (log_prob - old_log_prob).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_range, 1.0 + clip_range) * advantages
    fraction_clipped = ((ratio - 1.0).abs() > clip_range).float().mean()
    return -torch.minimum(unclipped, clipped).mean(), fraction_clipped
