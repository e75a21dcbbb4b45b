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

from diffgym import SimState
from diffgym.training import (ActorCritic, ObservationNormalizer, Run, TrainConfig, clip_gradients,
                              evaluate_policy, make_optimizer)
from diffgym.training.evaluation import train_env_seed
from diffgym.training.spec import from_dict

from diffgym_apg.losses import MonteCarloReturns, segment_actor_loss, td_lambda_targets

BOOTSTRAP_MODES = ("none", "mc", "critic")
"""How a segment's tail is estimated: nothing, a Monte-Carlo value network, or a TD(lambda) critic."""

_RESET_SEED_LOW = 2**30
"""Episodes after the first draw their reset seeds from [2^30, 2^31): disjoint from the evaluation
seeds and the first episodes' seeds (``diffgym.training.evaluation``) of any run seed below ~10^4."""


@dataclasses.dataclass
class APGParams:
    """APG's ``algo_params`` (everything else comes from the shared :class:`TrainConfig`)."""

    segment_length: int = 32
    """K, steps backpropagated through per update; the episode length means full backpropagation."""
    bootstrap: str = "critic"
    """Tail estimate closing each segment and each truncated episode: ``none``, ``mc`` or ``critic``."""
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

    def __post_init__(self) -> None:
        if self.bootstrap not in BOOTSTRAP_MODES:
            raise ValueError(f"bootstrap must be one of {BOOTSTRAP_MODES}, got {self.bootstrap!r}")
        if self.segment_length < 1 or self.critic_epochs < 1 or self.critic_minibatches < 1:
            raise ValueError("segment_length, critic_epochs and critic_minibatches must be >= 1")
        if not (0.0 < self.gamma <= 1.0 and 0.0 <= self.td_lambda <= 1.0 and 0.0 < self.target_tau <= 1.0):
            raise ValueError(f"need 0 < gamma <= 1, 0 <= td_lambda <= 1, 0 < target_tau <= 1; got {self}")
        if self.critic_lr <= 0:
            raise ValueError(f"critic_lr must be > 0, got {self.critic_lr}")

    @classmethod
    def from_config(cls, config: TrainConfig) -> APGParams:
        return from_dict(cls, config.algo_params)


class EnvBatch:
    """The N training envs as a tensor state, advanced with ``differentiable_step``.

    Finished episodes restart in the batch through the vector env's masked reset
    (``reset(seed=..., options={"reset_mask": done})``), spliced in with :meth:`SimState.where`. The
    trainer draws every new episode's seed from its own generator, so the batch (state, observations,
    seed generator) is saved in checkpoints and a resumed run restarts exactly the same episodes.
    """

    def __init__(self, venv: gym.vector.VectorEnv, seed: int, device: torch.device):
        self.venv, self.device = venv, device
        self.num_envs = venv.num_envs
        self.seeds = np.random.default_rng(seed)
        obs, _ = venv.reset(seed=seed)  # env i starts from seed + i (seed = train_env_seed(config.seed))
        self.state: SimState = venv.get_state()
        self.obs = torch.as_tensor(obs, dtype=torch.float32, device=device)
        self.episode_return = torch.zeros(self.num_envs, dtype=torch.float64, device=device)
        self.episode_length = torch.zeros(self.num_envs, dtype=torch.int64, device=device)

    def restart_finished(self, state: SimState, obs: torch.Tensor, done: torch.Tensor
                         ) -> tuple[SimState, torch.Tensor]:
        """``(state, obs)`` with every ``done`` env replaced by a fresh episode (no gradient there)."""
        if not bool(done.any()):
            return state, obs
        done_np = done.cpu().numpy()
        new_seeds = iter(self.seeds.integers(_RESET_SEED_LOW, 2**31, size=int(done_np.sum())).tolist())
        seeds = [next(new_seeds) if d else None for d in done_np]
        fresh_obs, _ = self.venv.reset(seed=seeds, options={"reset_mask": done_np})
        fresh_obs = torch.as_tensor(fresh_obs, dtype=obs.dtype, device=obs.device)
        return state.where(done, self.venv.get_state()), torch.where(done[:, None], fresh_obs, obs)

    def record(self, reward: torch.Tensor, done: torch.Tensor) -> list[float]:
        """Accumulate undiscounted episode returns; return those of the episodes that just ended."""
        self.episode_return += reward.detach().double()
        self.episode_length += 1
        finished = self.episode_return[done].tolist()
        self.episode_return[done] = 0.0
        self.episode_length[done] = 0
        return finished

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state.detach().tensors(), "obs": self.obs, "seeds": self.seeds.bit_generator.state,
                "episode_return": self.episode_return, "episode_length": self.episode_length}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.state = type(self.state)(*(t.to(self.device) for t in saved["state"]))
        self.obs = saved["obs"].to(self.device)
        self.seeds.bit_generator.state = saved["seeds"]
        self.episode_return = saved["episode_return"].to(self.device)
        self.episode_length = saved["episode_length"].to(self.device)


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
    skipped_updates: int = 0
    critic_grad_steps: int = 0

    @classmethod
    def create(cls, obs_dim: int, act_dim: int, config: TrainConfig, params: APGParams, device: torch.device
               ) -> Learner:
        model = ActorCritic(obs_dim, act_dim, config.policy).to(device)
        actor_params = [*model.actor.parameters(), model.log_std]
        critic_params = list(model.critic.parameters())
        critic_spec = dataclasses.replace(config.optimizer, lr=params.critic_lr)
        target_critic = copy.deepcopy(model.critic).requires_grad_(False)
        return cls(model, ObservationNormalizer(obs_dim, config.normalizer).to(device),
                   make_optimizer(actor_params, config.optimizer), make_optimizer(critic_params, critic_spec),
                   target_critic, MonteCarloReturns(params.gamma), actor_params, critic_params)

    def tail_value(self, obs: torch.Tensor, bootstrap: str) -> torch.Tensor:
        """V of (unnormalized, differentiable) observations ``(..., D)`` as the bootstrap mode says."""
        if bootstrap == "none":
            return torch.zeros(obs.shape[:-1], dtype=obs.dtype, device=obs.device)
        critic = self.target_critic if bootstrap == "critic" else self.model.critic
        return critic(self.normalizer(obs)).squeeze(-1)

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint entries; ``actor_critic`` / ``normalizer`` are the keys every trainer's checkpoint has."""
        return {"actor_critic": self.model.state_dict(), "normalizer": self.normalizer.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(),
                "target_critic": self.target_critic.state_dict(), "mc_returns": self.mc_returns.state_dict(),
                "skipped_updates": self.skipped_updates, "critic_grad_steps": self.critic_grad_steps}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["actor_critic"])
        self.normalizer.load_state_dict(saved["normalizer"])
        self.actor_optimizer.load_state_dict(saved["actor_optimizer"])
        self.critic_optimizer.load_state_dict(saved["critic_optimizer"])
        self.target_critic.load_state_dict(saved["target_critic"])
        self.mc_returns.load_state_dict(saved["mc_returns"])
        self.skipped_updates = int(saved["skipped_updates"])
        self.critic_grad_steps = int(saved.get("critic_grad_steps", 0))


@dataclasses.dataclass
class Segment:
    """What one unrolled segment leaves for the loss and the value targets; time-major ``(K, N, ...)``."""

    start_obs: torch.Tensor
    """Detached observations each step started from (the value network's inputs)."""
    rewards: torch.Tensor
    """Differentiable rewards."""
    next_obs: torch.Tensor
    """Differentiable observations each step led to, before any reset (where tails are evaluated)."""
    terminated: torch.Tensor
    truncated: torch.Tensor
    finished_returns: list[float]
    """Undiscounted returns of the episodes that ended in this segment."""


def unroll(model: ActorCritic, normalizer: ObservationNormalizer, envs: EnvBatch, steps: int
           ) -> tuple[Segment, SimState, torch.Tensor]:
    """Roll the batch forward ``steps`` steps with reparameterized actions, restarting finished
    episodes; return the segment and the (still differentiable) state and observation it ends in."""
    state, obs = envs.state, envs.obs
    start_obs, rewards, next_obs, terminated, truncated, finished = [], [], [], [], [], []
    for _ in range(steps):
        action = model.act(normalizer(obs))
        out = envs.venv.differentiable_step(state, action)
        # An env whose observation is no longer finite has diverged: it ends like a termination (no
        # tail) and restarts; its reward still enters the loss, so a NaN there skips the update.
        diverged = ~torch.isfinite(out.obs).all(dim=1)
        step_obs = torch.where(diverged[:, None], torch.zeros_like(out.obs), out.obs)
        start_obs.append(obs.detach())
        rewards.append(out.reward)
        next_obs.append(step_obs)  # before any reset: the tail value of a truncated episode uses it
        terminated.append(out.terminated | diverged)
        truncated.append(out.truncated & ~terminated[-1])
        done = terminated[-1] | truncated[-1]
        finished += envs.record(out.reward, done)
        state, obs = envs.restart_finished(out.state, step_obs, done)
    segment = Segment(torch.stack(start_obs), torch.stack(rewards), torch.stack(next_obs),
                      torch.stack(terminated), torch.stack(truncated), finished)
    return segment, state, obs


def apg_update(learner: Learner, envs: EnvBatch, params: APGParams, config: TrainConfig) -> dict[str, float]:
    """One APG update: unroll a segment, step the policy on its exact gradient, fit the value network."""
    model, normalizer = learner.model, learner.normalizer
    # 1. Unroll K steps through the simulator. Actions are reparameterized samples, so the segment's
    #    rewards and its last observations are differentiable functions of the policy parameters.
    segment, state, obs = unroll(model, normalizer, envs, params.segment_length)

    # 2. The actor loss: -(discounted rewards + gamma^len * V(boundary obs)) / (N K). The tail's gradient
    #    with respect to the boundary observation flows into the segment; terminated pieces get none.
    next_values = learner.tail_value(segment.next_obs, params.bootstrap)
    actor_loss = segment_actor_loss(segment.rewards, next_values, segment.terminated, segment.truncated,
                                    params.gamma)

    # 3. Step the actor on the exact gradient, unless the loss or gradient is not finite (then the
    #    update is skipped and counted: no NaN ever reaches the parameters or Adam's moments).
    learner.actor_optimizer.zero_grad(set_to_none=True)
    grad_norm = math.nan
    if torch.isfinite(actor_loss):
        actor_loss.backward(inputs=learner.actor_params)  # the value network is not moved by this loss
        grad_norm = clip_gradients(learner.actor_params, config.optimizer)
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
        else:
            value_obs = value_targets = None
    critic_loss = fit_value(learner, value_obs, value_targets, params, config)
    if params.bootstrap == "critic":
        with torch.no_grad():
            for target, online in zip(learner.target_critic.parameters(), learner.critic_params):
                target.lerp_(online, params.target_tau)

    # 6. Update the observation statistics from the segment's detached observations.
    normalizer.update(segment.start_obs.flatten(0, 1))

    return {"actor_loss": float(actor_loss.detach()), "grad_norm": grad_norm,
            "skipped_updates": float(learner.skipped_updates),
            "critic_grad_steps": float(learner.critic_grad_steps),  # value-network-only Adam steps (protocol.md)
            **({"critic_loss": critic_loss} if critic_loss is not None else {}),
            "segment_reward": float(rewards.mean()),
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
    losses = []
    for _ in range(params.critic_epochs):
        order = torch.randperm(targets.numel(), device=targets.device)
        for batch in order.chunk(params.critic_minibatches):
            loss = (learner.model.value(inputs[batch]) - targets[batch]).square().mean()
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
    env_kwargs = {} if device.type == "cpu" else {"device": config.device}
    venv = gym.make_vec(config.env_id, num_envs=config.num_envs, vectorization_mode="vector_entry_point",
                        **env_kwargs)
    for method in ("get_state", "differentiable_step"):
        if not hasattr(venv, method):
            raise TypeError(f"{config.env_id}'s vector env has no {method}(): APG needs DiffGym's tensor API")
    obs_dim = int(np.prod(venv.single_observation_space.shape))
    act_dim = int(np.prod(venv.single_action_space.shape))
    envs = EnvBatch(venv, train_env_seed(config.seed), device)
    learner = Learner.create(obs_dim, act_dim, config, params, device)
    env_steps = grad_steps = 0
    steps_per_update = config.num_envs * params.segment_length

    with Run(config, progress=progress) as run:
        saved = run.load_latest_checkpoint()
        if saved is not None:
            learner.load_state_dict(saved)
            envs.load_state_dict(saved["envs"])
            torch.set_rng_state(saved["torch_rng"])
            if device.type == "cuda":
                torch.cuda.set_rng_state(saved["cuda_rng"], device)
            env_steps, grad_steps = int(saved["env_steps"]), int(saved["grad_steps"])
            run.resume_from(env_steps)
        next_eval = (env_steps // config.eval_every_env_steps + 1) * config.eval_every_env_steps

        def evaluate() -> None:
            def act(obs: np.ndarray) -> np.ndarray:
                obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
                return learner.model.act(learner.normalizer(obs_t), deterministic=True).cpu().numpy()

            run.log(env_steps, grad_steps, **evaluate_policy(act, config.env_id, config.eval_episodes,
                                                             config.seed, env_kwargs))
            run.save_checkpoint({**learner.state_dict(), "envs": envs.state_dict(),
                                 "torch_rng": torch.get_rng_state(), "env_steps": env_steps,
                                 **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                                 "grad_steps": grad_steps, "config": run.config.to_dict()}, env_steps)

        if saved is None:
            evaluate()  # the untrained policy: the first point of every learning curve
        while env_steps < config.total_env_steps:
            stats = apg_update(learner, envs, params, config)
            env_steps += steps_per_update
            grad_steps += 1
            run.log(env_steps, grad_steps, **stats)
            if env_steps >= next_eval or env_steps >= config.total_env_steps:
                evaluate()
                next_eval = (env_steps // config.eval_every_env_steps + 1) * config.eval_every_env_steps
        return run.dir
