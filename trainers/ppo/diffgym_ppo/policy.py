"""SB3 PPO built from the shared spec: the policy's network IS :class:`diffgym.training.ActorCritic`,
the shared :class:`ObservationNormalizer` runs inside it, and its optimizer comes from ``make_optimizer``.

Actions: the rollout buffer stores the *pre-squash* Gaussian sample ``u``, so PPO's probability ratio
is the exact ratio of Gaussian densities (the tanh Jacobian depends only on ``u`` and cancels in the
ratio; no ``atanh`` of saturated actions is ever needed). The env receives ``squash(u)``: SB3 passes
policy outputs through ``unscale_action`` when ``squash_output`` is true, and here that method applies
the spec's squash. ``predict`` therefore returns env actions in [-1, 1].

Normalization: statistics are updated once per rollout, *after* PPO's update on it (and once on the
first reset observations), so a rollout is collected and trained on with the same statistics and the
first PPO ratio of every update is exactly 1.

Budget: the last rollout is shortened to what is left of ``total_timesteps`` (rounded up to whole
vector steps) and trained on like any other, so training stops at the budget instead of after a whole
extra rollout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import Schedule
from stable_baselines3.common.vec_env import VecEnv

from diffgym.training import ActorCritic, NormalizerSpec, ObservationNormalizer, OptimizerSpec, PolicySpec
from diffgym.training import make_optimizer


class SpecActorCriticPolicy(BasePolicy):
    """An SB3 on-policy policy whose whole model is the shared ActorCritic + ObservationNormalizer."""

    def __init__(self, observation_space: spaces.Box, action_space: spaces.Box, lr_schedule: Schedule,
                 use_sde: bool = False, policy_spec: PolicySpec | None = None,
                 normalizer_spec: NormalizerSpec | None = None, optimizer_spec: OptimizerSpec | None = None):
        if use_sde:
            raise ValueError("the shared spec has a state-independent log-std; gSDE is not supported")
        if not isinstance(action_space, spaces.Box) or len(action_space.shape) != 1:
            raise ValueError(f"need a 1-D Box action space, got {action_space}")
        super().__init__(observation_space, action_space, squash_output=True)
        self.policy_spec = policy_spec or PolicySpec()
        self.normalizer_spec = normalizer_spec or NormalizerSpec()
        optimizer_spec = optimizer_spec or OptimizerSpec()
        self.optimizer_spec = dataclasses.replace(optimizer_spec, lr=float(lr_schedule(1)))
        obs_dim = int(np.prod(observation_space.shape))
        self.normalizer = ObservationNormalizer(obs_dim, self.normalizer_spec)
        self.actor_critic = ActorCritic(obs_dim, int(action_space.shape[0]), self.policy_spec)
        self.optimizer = make_optimizer(self.actor_critic.parameters(), self.optimizer_spec)

    @property
    def log_std(self) -> torch.nn.Parameter:
        """PPO logs ``exp(policy.log_std)`` as ``train/std``."""
        return self.actor_critic.log_std

    def _normalized(self, obs: torch.Tensor) -> torch.Tensor:
        return self.normalizer(obs.float().reshape(obs.shape[0], -1))

    def forward(self, obs: torch.Tensor, deterministic: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-squash actions ``u``, values ``(B, 1)`` and ``log N(u)`` for rollout collection."""
        obs_n = self._normalized(obs)
        dist = self.actor_critic.distribution(obs_n)
        u = dist.mean if deterministic else dist.sample()
        return u, self.actor_critic.value(obs_n).unsqueeze(-1), dist.log_prob(u).sum(-1)

    def evaluate_actions(self, obs: torch.Tensor, actions: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Values, log-probabilities of stored pre-squash actions and pre-squash Gaussian entropy."""
        obs_n = self._normalized(obs)
        dist = self.actor_critic.distribution(obs_n)
        return self.actor_critic.value(obs_n), dist.log_prob(actions).sum(-1), dist.entropy().sum(-1)

    def predict_values(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor_critic.value(self._normalized(obs)).unsqueeze(-1)

    def _predict(self, observation: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        return self(observation, deterministic)[0]

    def unscale_action(self, scaled_action: np.ndarray) -> np.ndarray:
        """Pre-squash sample ``u`` -> env action: the spec's squash into [-1, 1], mapped onto the box."""
        squashed = self.actor_critic.squash(torch.as_tensor(scaled_action)).numpy()
        low, high = self.action_space.low, self.action_space.high
        return (low + 0.5 * (squashed + 1.0) * (high - low)).astype(np.float32)

    @torch.no_grad()
    def act_deterministic(self, obs: np.ndarray) -> np.ndarray:
        """The deterministic env action ``squash(mean)`` for a NumPy observation batch (for evaluation)."""
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        return self.actor_critic.act(self._normalized(obs_t), deterministic=True).cpu().numpy()

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return dict(observation_space=self.observation_space, action_space=self.action_space,
                    lr_schedule=self._dummy_schedule, policy_spec=self.policy_spec,
                    normalizer_spec=self.normalizer_spec, optimizer_spec=self.optimizer_spec)


class SpecPPO(PPO):
    """SB3 PPO with the spec's normalizer schedule (see module doc) and a count of optimizer steps."""

    policy: SpecActorCriticPolicy

    def _setup_model(self) -> None:
        super()._setup_model()
        if not isinstance(self.policy, SpecActorCriticPolicy):
            raise TypeError("SpecPPO needs policy=SpecActorCriticPolicy")
        self.grad_steps = 0
        self.policy.optimizer.register_step_post_hook(self._count_grad_step)

    def _count_grad_step(self, *_: Any) -> None:
        self.grad_steps += 1

    def _setup_learn(self, *args: Any, **kwargs: Any) -> Any:
        result = super()._setup_learn(*args, **kwargs)
        if float(self.policy.normalizer.count) == 0 and self._last_obs is not None:
            self.policy.normalizer.update(np.asarray(self._last_obs))
        return result

    def collect_rollouts(self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer,
                         n_rollout_steps: int) -> bool:
        """SB3's rollout, shortened to the steps left of the budget when fewer than ``n_rollout_steps``
        remain (``rollout_buffer.reset()`` sizes the buffer to it; PPO then trains on the shorter
        rollout, with a smaller last minibatch when ``batch_size`` does not divide it)."""
        left = -(-(self._total_timesteps - self.num_timesteps) // env.num_envs)
        n_rollout_steps = max(1, min(n_rollout_steps, left))
        rollout_buffer.buffer_size = n_rollout_steps
        return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)

    def train(self) -> None:
        super().train()
        self.policy.normalizer.update(self.rollout_buffer.observations)
