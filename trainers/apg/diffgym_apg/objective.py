"""The APG objective of one segment, and what every gradient estimator reads from it.

Tensors are time-major ``(K, N, ...)`` as in :mod:`diffgym.training.returns`. A segment is split, per
env, into pieces: a piece ends where an episode ends or where the segment ends. Each piece contributes
its discounted reward sum plus a tail estimate of what lies beyond it: zero after termination,
``gamma^len * V(s_end)`` after truncation or at the segment's end (``V = 0`` without a value function).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Callable

import torch

from diffgym.training import ActorCritic, Rollout
from diffgym.training.gradients import per_env_analytic_gradients, per_env_likelihood_gradients
from diffgym.training.returns import piece_discounts, returns_to_go


def segment_actor_loss(rewards: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
                       truncated: torch.Tensor, gamma: float) -> torch.Tensor:
    """``-(sum over pieces of discounted rewards + discounted tail value) / (N * K)`` (SHAC's loss).

    Differentiable in ``rewards`` and ``next_values``, once (its backward is closed-form, not itself
    differentiable): the gradient of the tail value with respect to the boundary observation flows back into
    the whole segment.
    """
    return _SegmentLoss.apply(rewards, next_values, terminated, truncated, gamma)


class _SegmentLoss(torch.autograd.Function):
    """:func:`segment_actor_loss` as one autograd node, where its loop would record about ten per step.

    The loss is linear in the rewards and the tail values, so its gradient is known in closed form:
    ``-1 / (N K)`` times each reward's discount, and times each tail value's discount where that value
    closes a piece that did not terminate (zero elsewhere). The backward computes exactly these products,
    the same operations on the same values that autograd's backward through the loop performs, so the
    gradients are the same bits (``tests/test_apg_fast_paths.py`` compares them with the loop's); a segment's
    backward through the simulator then walks ~10 fewer nodes per step."""

    @staticmethod
    def forward(ctx: Any, rewards: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
                truncated: torch.Tensor, gamma: float) -> torch.Tensor:
        num_steps, num_envs = rewards.shape
        done = terminated | truncated
        discounts = piece_discounts(done, gamma, rewards.dtype)  # gamma^(t - piece start)
        tail_discounts = gamma * discounts
        piece_ends = done.clone()
        piece_ends[-1] = True
        zeros = torch.zeros(num_envs, dtype=rewards.dtype, device=rewards.device)
        # the elementwise products for every step at once (the same bits as step by step); the sums in order
        discounted_rewards = discounts * rewards
        tails = torch.where(terminated, zeros, tail_discounts * next_values)
        piece_return = zeros  # of the current piece so far
        total = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
        for t in range(num_steps):
            piece_return = piece_return + discounted_rewards[t]
            total = total + torch.where(piece_ends[t], piece_return + tails[t], zeros).sum()
            piece_return = torch.where(done[t], zeros, piece_return)  # a fresh episode
        ctx.save_for_backward(discounts, tail_discounts, piece_ends & ~terminated)
        ctx.scale = num_envs * num_steps
        return -total / ctx.scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        discounts, tail_discounts, tail_closes = ctx.saved_tensors
        # what reaches every piece's running return and tail: the gradient of -total / (N K) (each step of a
        # piece passes on what its piece's end receives; a where routes zero elsewhere)
        per_term = -(grad / ctx.scale)
        reward_grad = per_term * discounts if ctx.needs_input_grad[0] else None
        tail_grad = None
        if ctx.needs_input_grad[1]:
            tail_grad = torch.where(tail_closes, per_term * tail_discounts, torch.zeros_like(tail_discounts))
        return reward_grad, tail_grad, None, None, None


class SegmentObjective:
    """The actor loss ``L`` of a segment and the gradient ingredients an estimator may ask for.

    Envs whose segment is not finite (in the forward pass or, with ``adjoints``, in their action
    adjoints) are left out: their terms leave ``L``, their rows leave every per-env sample (``valid``).
    Each ingredient is computed once, when first asked for; the per-env samples are scaled so that
    their mean over the kept envs is the batch estimate.
    """

    def __init__(self, model: ActorCritic, segment: Rollout, tail_values: torch.Tensor, gamma: float,
                 baseline: Callable[[torch.Tensor], torch.Tensor], adjoints: bool,
                 bonus: torch.Tensor | None = None, direct_bonus: torch.Tensor | None = None):
        """``bonus`` (K, N): per-step terms added to the rewards, differentiable through the segment's actions
        (e.g. an entropy bonus's squash term); ``direct_bonus`` (K, N): terms in which the parameters enter
        directly, not through the actions (its log-std term): the estimators, which differentiate through
        the actions, do not see them, :meth:`add_direct_gradient` adds their gradient."""
        self.model, self.segment, self.gamma, self._baseline = model, segment, gamma, baseline
        self.num_envs = segment.rewards.shape[1]
        valid = segment.finite
        rewards = segment.rewards if bonus is None else segment.rewards + bonus
        # masked envs contribute zeros to the loss; their gradients are dropped as well
        self.rewards = torch.where(valid[None, :], rewards, torch.zeros_like(rewards))
        self.tail_values = torch.where(valid[None, :] & torch.isfinite(tail_values), tail_values,
                                       torch.zeros_like(tail_values))
        self.direct_bonus = direct_bonus
        if direct_bonus is None:
            self.loss = segment_actor_loss(self.rewards, self.tail_values, segment.terminated, segment.truncated,
                                           gamma)
        else:  # the loss is linear in the rewards: L(r + d, V) = L(r, V) + L(d, 0), the second part kept apart
            self.loss = segment_actor_loss(self.rewards, self.tail_values, segment.terminated, segment.truncated,
                                           gamma) + self._direct_loss(valid).detach()
        self.action_adjoints: torch.Tensor | None = None
        if adjoints:
            # lambda_t = dL/da_t: the total derivative through the simulator, later observations and actions
            grads = torch.autograd.grad(self.loss, segment.actions, allow_unused=True)
            grads = torch.stack([torch.zeros_like(a) if g is None else g for a, g in zip(segment.actions, grads)])
            valid = valid & torch.isfinite(grads).all(dim=2).all(dim=0)
            self.action_adjoints = torch.where(valid[None, :, None], grads, torch.zeros_like(grads))
        self.valid = valid
        self.kept = int(valid.sum())

    def _direct_loss(self, valid: torch.Tensor) -> torch.Tensor:
        """The ``direct_bonus`` part of the loss, over the envs ``valid`` keeps."""
        direct = torch.where(valid[None, :], self.direct_bonus, torch.zeros_like(self.direct_bonus))
        return segment_actor_loss(direct, torch.zeros_like(direct), self.segment.terminated, self.segment.truncated,
                                  self.gamma)

    def add_direct_gradient(self, parameters: list[torch.nn.Parameter]) -> None:
        """Add the gradient of the ``direct_bonus`` part of the loss (as the estimators' gradients, the mean
        over the kept envs, the same envs) to ``parameters``' ``.grad``; nothing without one."""
        if self.direct_bonus is not None and self.kept > 0:
            (self._direct_loss(self.valid) * (self.num_envs / self.kept)).backward(inputs=parameters)

    @cached_property
    def likelihood_weights(self) -> torch.Tensor:
        """``(K, N)``: ``d L / d log pi(u_t | o_t)`` = minus each action's advantage over ``N K``: the return
        it influences (its piece from ``t`` on, with the tail) minus the baseline of that return."""
        with torch.no_grad():
            future, piece_discount = returns_to_go(self.rewards.detach(), self.tail_values.detach(),
                                                   self.segment.terminated, self.segment.truncated, self.gamma)
            baseline = self._baseline(future)
            num_steps = self.rewards.shape[0]
            weights = -(piece_discount * (future - baseline)) / (self.num_envs * num_steps)
            return torch.where(self.valid[None, :], weights, torch.zeros_like(weights))

    # per-env samples are computed for every env and the masked rows dropped: a masked env's inputs are
    # finite (its observations were zeroed, its adjoints and weights set to zero), so nothing leaks
    @cached_property
    def per_env_analytic(self) -> torch.Tensor:
        """``(kept, P)`` analytic samples (needs ``adjoints``)."""
        return per_env_analytic_gradients(self.model, self.segment.obs_normalized, self.segment.noise,
                                          self.action_adjoints)[self.valid] * self.num_envs

    @cached_property
    def per_env_likelihood(self) -> torch.Tensor:
        """``(kept, P)`` likelihood-ratio samples."""
        return per_env_likelihood_gradients(self.model, self.segment.obs_normalized, self.segment.pre_squash,
                                            self.likelihood_weights)[self.valid] * self.num_envs

    def sampled(self, name: str) -> bool:
        """Whether the per-env samples ``name`` were computed already (their mean is then the cheapest
        batch estimate)."""
        return name in self.__dict__
