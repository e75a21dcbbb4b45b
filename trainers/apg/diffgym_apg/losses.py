"""The APG objective, read top to bottom: the segment's actor loss and the value targets that close it.

All functions take time-major tensors of one segment of ``K`` steps over ``N`` envs:

* ``rewards[t]``     (K, N)  reward of the transition taken at step ``t``;
* ``terminated[t]``  (K, N)  bool, the transition reached a terminal state (nothing after it);
* ``truncated[t]``   (K, N)  bool, the episode hit its time limit (its future is cut, not zero);
* ``next_values[t]`` (K, N)  value of the observation the transition led to, *before* any reset.

A segment is split, per env, into pieces: a piece ends where an episode ends or where the segment
ends. Each piece contributes its discounted reward sum plus a tail estimate of what lies beyond it:
zero after termination, ``gamma^len * V(s_end)`` after truncation or at the segment's end. In
``none`` mode the caller passes ``next_values = 0`` (no tail at all).
"""

from __future__ import annotations

import torch


def segment_actor_loss(rewards: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
                       truncated: torch.Tensor, gamma: float) -> torch.Tensor:
    """``-(sum over pieces of discounted rewards + discounted tail value) / (N * K)`` (SHAC's loss).

    Differentiable in ``rewards`` and ``next_values``: the gradient of the tail value with respect to
    the boundary observation flows back into the whole segment.
    """
    num_steps, num_envs = rewards.shape
    done = terminated | truncated
    discount = torch.ones(num_envs, dtype=rewards.dtype, device=rewards.device)  # gamma^(t - piece start)
    piece_return = torch.zeros_like(discount)  # discounted rewards of the current piece so far
    total = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    for t in range(num_steps):
        piece_return = piece_return + discount * rewards[t]
        tail = torch.where(terminated[t], torch.zeros_like(discount), gamma * discount * next_values[t])
        piece_ends = done[t] | (t == num_steps - 1)
        total = total + torch.where(piece_ends, piece_return + tail, torch.zeros_like(discount)).sum()
        # a new piece (a fresh episode) starts after an episode end
        discount = torch.where(done[t], torch.ones_like(discount), gamma * discount)
        piece_return = torch.where(done[t], torch.zeros_like(piece_return), piece_return)
    return -total / (num_envs * num_steps)


@torch.no_grad()
def td_lambda_targets(rewards: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
                      truncated: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """TD(lambda) value targets ``(K, N)`` for the observations the segment's steps start from.

    ``G_t = r_t + gamma * [(1 - lam) * V(s_{t+1}) + lam * G_{t+1}]``, where the bracket is just
    ``V(s_{t+1})`` at a truncation or at the segment's last step (the lambda-return is cut there and
    closed by the value) and zero at a termination. ``next_values`` must come from the target network.
    """
    num_steps = rewards.shape[0]
    done = terminated | truncated
    next_values = torch.where(terminated, torch.zeros_like(next_values), next_values)
    targets = torch.empty_like(rewards)
    following = next_values[-1]  # G_{t+1}; unused where the bracket is cut
    for t in reversed(range(num_steps)):
        cut = done[t] | (t == num_steps - 1)
        blended = (1.0 - lam) * next_values[t] + lam * following
        targets[t] = rewards[t] + gamma * torch.where(cut, next_values[t], blended)
        following = targets[t]
    return targets


class MonteCarloReturns:
    """Discounted Monte-Carlo returns-to-go, emitted as soon as the episode they belong to has ended.

    Segments are appended as they are collected; a step's return-to-go
    ``G_t = r_t + gamma * r_{t+1} + ... + gamma^(T-1-t) * r_{T-1}`` is known once its episode ends at
    ``T`` (by termination or by the time limit: these are the returns the rollouts actually observed,
    with nothing bootstrapped). Steps whose episode is still running stay pending (at most one episode
    plus one segment per env), so the value network is only ever fitted to exact returns.
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
        returns = torch.empty_like(rewards)
        known = torch.empty_like(done)
        following = torch.zeros_like(rewards[0])
        following_known = torch.zeros_like(done[0])
        for t in reversed(range(rewards.shape[0])):
            following = rewards[t] + self.gamma * torch.where(done[t], torch.zeros_like(following), following)
            following_known = done[t] | following_known
            returns[t], known[t] = following, following_known
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
