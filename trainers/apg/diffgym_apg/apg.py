"""Analytic Policy Gradients with segmented backpropagation (SHAC-style short horizons).

N envs are unrolled for K steps through ``differentiable_step`` with reparameterized actions; the loss
is minus the discounted segment return plus a bootstrapped tail (``objective.py``, ``docs/apg.md``); its
exact gradient flows back through the simulator into the policy. The graph is cut at the segment
boundary and the next segment carries on from the detached state. Finished episodes restart inside the
batch.

Read :func:`apg_update` top to bottom for the algorithm: one call of one component per numbered step of
``docs/apg.md``. The components, each configured by its own section of ``algo_params``:

* ``segment``         :mod:`diffgym_apg.segments`    K, fixed or adaptive;
* ``policy_gradient`` :mod:`diffgym_apg.estimators`  the segment step's gradient estimator;
* ``value``           :mod:`diffgym_apg.value`       tail, targets and units of the value network;
* ``reuse``           :mod:`diffgym_apg.reuse`       more steps on the segment's action adjoints (RPO-style);
* ``proximal``        :mod:`diffgym_apg.proximal`    PPO's clipped epochs beside it (``apg-ppo`` only);
* ``entropy``         :mod:`diffgym_apg.entropy`     the entropy bonus and its temperature (``sapo`` only).

:func:`train` is the loop around the update (logging, evaluation, checkpoints with exact resume).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffgym.training import ActorCritic, ObservationNormalizer, Run, TrainConfig, clip_gradients, make_optimizer
from diffgym.training.gradients import actor_parameters
from diffgym.training.optim import adam_step
from diffgym.training.randomization import check_config_ranges
from diffgym.training.rollout import EnvBatch, EvaluationCadence, Rollout, evaluate_and_checkpoint, unroll

from diffgym_apg.config import APGConfig, upgrade_config
from diffgym_apg.entropy import SegmentLogProb, Temperature
from diffgym_apg.estimators import Estimator, registered_estimators
from diffgym_apg.objective import SegmentObjective
from diffgym_apg.proximal import ProximalPath
from diffgym_apg.reuse import ReuseBatch, reuse_steps
from diffgym_apg.segments import AdaptiveSegmentLength, FixedSegmentLength
from diffgym_apg.value import ValueFunction

TENSORBOARD_TAGS = {"policy_std": "policy/std", "actor_loss": "losses/actor_loss", "critic_loss": "losses/value_loss",
                    "grad_norm": "losses/grad_norm", "train_episode_return": "rollout/episode_return"}
"""APG's logged names under the shared TensorBoard tags (``docs/protocol.md``)."""


@dataclasses.dataclass
class Learner:
    """What APG optimizes and the state of every component."""

    model: ActorCritic
    normalizer: ObservationNormalizer
    optimizer: torch.optim.Adam
    """Adam of the segment steps (``policy_gradient.lr``)."""
    schedule: FixedSegmentLength | AdaptiveSegmentLength
    estimator: Estimator
    value: ValueFunction
    proximal: ProximalPath | None
    entropy: Temperature | None = None
    skipped_updates: int = 0
    """Policy steps not applied because their gradient was not finite (cumulative)."""
    masked_envs: int = 0
    """Env segments left out of an update because their gradient was not finite (cumulative)."""

    @classmethod
    def create(cls, obs_dim: int, act_dim: int, config: TrainConfig, params: APGConfig, device: torch.device
               ) -> Learner:
        model = ActorCritic(obs_dim, act_dim, config.policy).to(device)
        normalizer = ObservationNormalizer(obs_dim, config.normalizer).to(device)
        actor = actor_parameters(model)
        step_spec = dataclasses.replace(config.optimizer, lr=params.policy_gradient.lr or config.optimizer.lr)
        value = ValueFunction(params.value, model, normalizer, config.optimizer, config.num_envs, params.gamma)
        proximal = None if params.proximal is None else ProximalPath(params.proximal, model, normalizer, actor, value,
                                                                     config.optimizer, params.gamma)
        estimator = registered_estimators()[params.policy_gradient.estimator](params.policy_gradient)
        entropy_section = getattr(params, "entropy", None)  # SAPOConfig's (trainer sapo); APGConfig has none
        entropy = None if entropy_section is None else Temperature(entropy_section, act_dim, config.optimizer, device)
        return cls(model, normalizer, make_optimizer(actor, step_spec), params.segment.schedule(), estimator, value,
                   proximal, entropy)

    @property
    def actor_parameters(self) -> list[torch.nn.Parameter]:
        return actor_parameters(self.model)

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint entries; ``actor_critic`` / ``normalizer`` are the keys every trainer's checkpoint has."""
        return {"actor_critic": self.model.state_dict(), "normalizer": self.normalizer.state_dict(),
                "actor_optimizer": self.optimizer.state_dict(), "segment_schedule": self.schedule.state_dict(),
                "skipped_updates": self.skipped_updates, "masked_envs": self.masked_envs,
                **self.value.state_dict(), **(self.proximal.state_dict() if self.proximal else {}),
                **(self.entropy.state_dict() if self.entropy else {})}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["actor_critic"])
        self.normalizer.load_state_dict(saved["normalizer"])
        self.optimizer.load_state_dict(saved["actor_optimizer"])
        self.schedule.load_state_dict(saved.get("segment_schedule"))
        self.skipped_updates = int(saved["skipped_updates"])
        self.masked_envs = int(saved.get("masked_envs", 0))
        self.value.load_state_dict(saved)
        if self.proximal is not None:
            self.proximal.load_state_dict(saved)
        if self.entropy is not None:
            self.entropy.load_state_dict(saved)


def policy_gradient(learner: Learner, segment: Rollout, params: APGConfig, log_prob: SegmentLogProb | None = None
                    ) -> tuple[dict[str, float], SegmentObjective]:
    """Step 2: the segment's actor loss and its gradient as the estimator says, written into the actor's
    ``.grad``; the statistics and the objective. Envs whose segment is not finite are left out
    (``masked_envs``); with none left the loss is NaN and no gradient is written. With the ``entropy``
    section the rewards carry its bonus, ``-alpha log pi`` of ``log_prob``."""
    num_envs = segment.rewards.shape[1]
    bonus, direct_bonus = (None, None) if log_prob is None else learner.entropy.bonus(log_prob)
    objective = SegmentObjective(learner.model, segment, learner.value.tail(segment.next_obs), params.gamma,
                                 baseline=lambda future: learner.value.baseline(segment, future),
                                 adjoints=learner.estimator.analytic, bonus=bonus, direct_bonus=direct_bonus)
    stats = {"actor_loss": float(objective.loss.detach()), "masked_envs": float(num_envs - objective.kept)}
    learner.masked_envs += num_envs - objective.kept
    if objective.kept == 0:
        stats["actor_loss"] = math.nan
        return stats, objective
    if learner.schedule.needs_samples:  # the raw variance, before any clipping
        stats["variance_ratio"] = learner.schedule.observe(objective.per_env_analytic, objective.per_env_likelihood)
    stats.update(learner.estimator.estimate(objective, learner.actor_parameters))
    objective.add_direct_gradient(learner.actor_parameters)
    return stats, objective


def segment_step(learner: Learner, segment: Rollout, params: APGConfig, config: TrainConfig,
                 log_prob: SegmentLogProb | None = None) -> tuple[dict[str, float], float, int]:
    """Steps 2-3: the policy gradient, then one clipped Adam step, skipped where the loss or the gradient
    is not finite (nothing reaches Adam); then any reuse steps on the same action adjoints. With the
    proximal section the gradient is handed to it, and where it says the segment steps disagree with its own
    gradient (``proximal.gate_segment_steps``) no step is taken. Returns the statistics, the gradient norm of
    the first step and the number of steps taken."""
    learner.optimizer.zero_grad(set_to_none=True)
    stats, objective = policy_gradient(learner, segment, params, log_prob)
    grad_norm = math.nan
    if math.isfinite(stats["actor_loss"]):
        if learner.proximal is not None:
            learner.proximal.observe_segment_gradient()
        grad_norm = clip_gradients(learner.actor_parameters, config.optimizer)
    if learner.proximal is not None and not learner.proximal.takes_segment_steps:
        learner.optimizer.zero_grad(set_to_none=True)  # no step: Adam and its rate stay as they were
        return stats, grad_norm, 0
    reuse = ReuseBatch.of(learner.model, objective) if params.reuse.enabled and math.isfinite(grad_norm) else None
    if math.isfinite(grad_norm):
        adam_step(learner.optimizer)
    else:
        learner.skipped_updates += 1
    learner.optimizer.zero_grad(set_to_none=True)
    steps = 1  # counted even when skipped, as every update is
    if reuse is not None:  # the acting policy's samples, taken before the step above moved it
        stats.update(reuse_steps(params.reuse, learner.model, reuse, learner.actor_parameters, learner.optimizer,
                                 config.optimizer))
        steps += int(stats["reuse_grad_steps"])
        learner.skipped_updates += int(stats["reuse_skipped_steps"])
    if params.policy_gradient.lr_decay != 1.0:  # after every update, skipped or not; the rate is Adam state (resumed)
        for group in learner.optimizer.param_groups:
            group["lr"] *= params.policy_gradient.lr_decay
    return stats, grad_norm, steps


def apg_update(learner: Learner, envs: EnvBatch, params: APGConfig, config: TrainConfig,
               max_steps: int | None = None) -> dict[str, float]:
    """One APG update: unroll a segment, step the policy on its gradient, fit the value network.

    ``max_steps`` caps the segment (the trainer ends segments at evaluation points and at the budget)."""
    model, normalizer, value, proximal = learner.model, learner.normalizer, learner.value, learner.proximal
    # 1. Unroll K steps through the simulator. Actions are reparameterized samples, so the segment's
    #    rewards and its last observations are differentiable functions of the policy parameters. (An
    #    estimator that reads no simulator gradient records no graph.) The value units follow the new
    #    returns; the proximal path keeps the segment with the log-probabilities of the policy that acted.
    num_steps = learner.schedule.length if max_steps is None else max(1, min(learner.schedule.length, int(max_steps)))
    with torch.set_grad_enabled(learner.estimator.analytic):
        segment, state, obs = unroll(model, normalizer, envs, num_steps)
    value.observe(segment)
    if proximal is not None:
        proximal.collect(segment)
    log_prob = None if learner.entropy is None else learner.entropy.log_prob(model, segment)  # of the acting policy

    # 2-3. The actor loss -(discounted rewards + gamma^len * V(boundary obs)) / (N K), its gradient as the
    #    estimator says, a clipped Adam step, and any reuse steps on the same action adjoints.
    stats: dict[str, float] = {}
    grad_norm, policy_steps = math.nan, 0
    if learner.estimator.steps:
        stats, grad_norm, policy_steps = segment_step(learner, segment, params, config, log_prob)
    else:  # no segment step to count them: the envs the proximal path leaves out
        learner.masked_envs += int((~segment.finite).sum())
    if learner.entropy is not None:  # the temperature's step towards the target entropy
        stats.update(learner.entropy.step(log_prob, segment.finite))

    # 4. Cut the graph at the segment boundary; the next segment carries on from the detached state.
    envs.state, envs.obs = state.detach(), obs.detach()

    # 5. The value network's own fit on detached targets (mc, critic) and the target network's step; with
    #    the entropy section the targets' rewards carry its bonus at the new temperature (a soft value).
    critic_loss = value.fit(segment, None if log_prob is None else learner.entropy.target_bonus(log_prob))

    # 6. Update the observation statistics from the segment's detached observations.
    start_obs = segment.start_obs.flatten(0, 1)
    normalizer.update(start_obs[torch.isfinite(start_obs).all(dim=1)])

    # 7. Every n_steps steps per env: the proximal path's clipped epochs over the segments collected.
    if proximal is not None and proximal.due:
        stats.update(proximal.update())
        policy_steps += int(stats["proximal_grad_steps"])  # counted even when skipped, as above
        learner.skipped_updates += int(stats["proximal_skipped_steps"])

    rewards = segment.rewards.detach()
    finite_rewards = rewards[torch.isfinite(rewards)]
    return {**stats, "grad_norm": grad_norm, "segment_length": float(num_steps), "policy_steps": float(policy_steps),
            "skipped_updates": float(learner.skipped_updates), "masked_envs_total": float(learner.masked_envs),
            "critic_grad_steps": float(value.grad_steps),  # value-network Adam steps (protocol.md)
            **({"critic_loss": critic_loss} if critic_loss is not None else {}),
            "segment_reward": float(finite_rewards.mean()) if finite_rewards.numel() else math.nan,
            "policy_std": float(model.log_std.detach().exp().mean()),
            "episodes_finished": float(len(segment.finished_returns)),
            **({"train_episode_return": float(np.mean(segment.finished_returns))} if segment.finished_returns else {})}


def checked_params(config: TrainConfig, config_class: type[APGConfig] = APGConfig) -> APGConfig:
    """The run's ``algo_params``, with a one-line ``ValueError`` for anything it cannot run."""
    params = config_class.from_config(config)
    if params.per_env_samples and config.num_envs < 3:
        reader = "segment.length 'adaptive'" if params.segment.adaptive else \
            f"policy_gradient.estimator {params.policy_gradient.estimator!r}"
        raise ValueError(f"{reader} compares per-env gradient samples: it needs num_envs >= 3, got {config.num_envs}")
    return params


def train(config: TrainConfig, progress: bool = True, params: APGConfig | None = None) -> Path:
    """Train as ``config`` says; resume from the run directory's latest checkpoint if it has one.
    ``params``: ``config.algo_params`` as a variant reads them (e.g. ``sapo``'s :class:`SAPOConfig`).

    Returns the run directory (``config.yaml``, ``metrics.jsonl``, TensorBoard events, checkpoints).
    """
    params = checked_params(config) if params is None else params
    check_config_ranges(config)  # randomize and eval_randomize, before the run directory is made
    config = TrainConfig.from_dict(upgrade_config(config.to_dict()))  # config.yaml in today's format
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    envs = EnvBatch.for_config(config)  # with the config's wrappers and domain randomization
    obs_dim = int(np.prod(envs.venv.single_observation_space.shape))
    act_dim = int(np.prod(envs.venv.single_action_space.shape))
    learner = Learner.create(obs_dim, act_dim, config, params, device)
    env_steps = grad_steps = 0

    with Run(config, progress=progress, upgrade_config=upgrade_config) as run:
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
        cadence = EvaluationCadence(config, env_steps, resumed=saved is not None)

        def evaluate() -> None:
            with run.evaluating():  # the checkpoint's contents too, as PPO's (Run.evaluating)
                resume = {**learner.state_dict(), "envs": envs.state_dict(), "torch_rng": torch.get_rng_state(),
                          **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}
                evaluate_and_checkpoint(run, learner.model, learner.normalizer, env_steps, grad_steps, resume,
                                        envs=envs)
            cadence.evaluated(env_steps)

        if saved is None:
            evaluate()  # the untrained policy: the first point of every learning curve
        while not cadence.finished(env_steps):
            # A segment ends at the next evaluation point or the budget, whichever comes first, so the run
            # evaluates on the requested interval and stops at the budget (in whole vector steps: past it
            # by fewer than num_envs env steps when num_envs does not divide it).
            max_steps = cadence.steps_to_next(env_steps, config.num_envs)
            stats = apg_update(learner, envs, params, config, max_steps=max_steps)
            env_steps += config.num_envs * int(stats["segment_length"])
            grad_steps += int(stats["policy_steps"])  # the segment step and any proximal steps
            run.log(env_steps, grad_steps, **stats)
            if cadence.due(env_steps):
                evaluate()
        return run.dir
