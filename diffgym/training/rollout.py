"""What every trainer that steps DiffGym's tensor API needs, written once.

* :class:`EnvBatch`: the N training envs as a tensor state, with finished episodes restarted in the
  batch (masked reset) from seeds the trainer draws, so checkpoints restart exactly the same episodes.
* :func:`unroll`: K steps of reparameterized actions through ``differentiable_step``; the
  :class:`Rollout` it returns holds the differentiable rewards, observations and actions (where
  analytic gradients are read) and the detached inputs the likelihood ratio and value fits need.
* :class:`EvaluationCadence` and :func:`evaluate_and_checkpoint`: evaluation at env step 0, at every
  point of the config's evaluation schedule (``TrainConfig.next_evaluation``) and at the budget, each
  followed by a checkpoint with the keys every tool reads (``docs/protocol.md``, ``docs/plugins.md``).

APG (``trainers/apg``) and the minimal trainer of ``docs/plugins.md`` are built from these.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import gymnasium as gym
import numpy as np
import torch

from diffgym.core.env import DiffGymVectorEnv
from diffgym.core.tensor_checks import describe_value
from diffgym.core.sim import StepOutput
from diffgym.core.state import SimState
from diffgym.training.evaluation import evaluate_config, train_env_seed
from diffgym.training.networks import ActorCritic
from diffgym.training.normalization import ObservationNormalizer
from diffgym.training.randomization import PhysicsRandomizer, check_generator_state
from diffgym.training.returns import scan_arrays
from diffgym.training.run import Run
from diffgym.training.spec import TrainConfig
from diffgym.wrappers import TensorVectorWrapper, wrap_vector_env

RESET_SEED_LOW = 2**30
"""Episodes after the first draw their reset seeds from [2^30, 2^31): disjoint from the evaluation
seeds and the first episodes' seeds (``diffgym.training.evaluation``) of any run seed below ~10^4."""


class EnvBatch:
    """The N training envs as a tensor state, advanced with ``differentiable_step``.

    Finished episodes restart in the batch through the vector env's tensor-only
    :meth:`~diffgym.core.env.DiffGymVectorEnv.restart` (the masked reset for a state the caller holds).
    The batch draws every new episode's seed from its own generator, so its :meth:`state_dict` (state,
    observations, seed generator, running returns, and the own state of any ``diffgym.wrappers`` around
    the env) is all a checkpoint needs to restart the same episodes on resume.

    With ``randomize`` (the config's ranges, ``{name: [low, high]}``) each env draws its physical
    parameters at the first reset and at every restart (:class:`PhysicsRandomizer`, seeded from ``seed``
    on a stream of its own); :meth:`differentiable_step` passes them to the env, and the state dict
    carries the draws.
    """

    def __init__(self, venv: gym.vector.VectorEnv, seed: int, device: torch.device,
                 randomize: Mapping[str, Sequence[float]] | None = None):
        for method in ("get_state", "differentiable_step", "restart"):
            if not hasattr(venv, method):
                raise TypeError(f"the vector env has no {method}(): EnvBatch needs DiffGym's tensor API "
                                f"(gym.make_vec(..., vectorization_mode='vector_entry_point'))")
        self.venv, self.device = venv, device
        self.num_envs = venv.num_envs
        self.seeds = np.random.default_rng(seed)
        self.randomizer: PhysicsRandomizer | None = None
        if randomize:
            sim = getattr(venv, "sim", None)
            self.randomizer = PhysicsRandomizer(randomize, sim, self.num_envs, seed,
                                                getattr(sim, "device", device), task=type(sim).__name__)
            self.randomizer.draw()
        obs, _ = venv.reset(seed=seed)  # env i starts from seed + i (seed = train_env_seed(config.seed))
        self.state: SimState = venv.get_state()
        self.obs = torch.as_tensor(obs, dtype=torch.float32, device=device)
        self.episode_return = torch.zeros(self.num_envs, dtype=torch.float64, device=device)
        self.episode_length = torch.zeros(self.num_envs, dtype=torch.int64, device=device)

    @classmethod
    def for_config(cls, config: TrainConfig) -> EnvBatch:
        """A run's training envs as every trainer makes them: ``config.num_envs`` native envs of its task
        with ``config.env_options()``, inside ``config.wrappers``, seeded ``train_env_seed(config.seed)``
        and drawing ``config.randomize``."""
        venv = gym.make_vec(config.env_id, num_envs=config.num_envs, vectorization_mode="vector_entry_point",
                            **config.env_options())
        return cls(wrap_vector_env(venv, config.wrappers), train_env_seed(config.seed), torch.device(config.device),
                   randomize=config.randomize)

    def restart_finished(self, state: SimState, obs: torch.Tensor, done: torch.Tensor
                         ) -> tuple[SimState, torch.Tensor]:
        """``(state, obs)`` with every ``done`` env replaced by a fresh episode (no gradient there)."""
        finished = int(done.sum())
        if finished == 0:
            return state, obs
        # one seed per finished env, drawn in env order from the batch's generator
        seeds = torch.zeros(self.num_envs, dtype=torch.int64, device=done.device)
        seeds[done] = torch.as_tensor(self.seeds.integers(RESET_SEED_LOW, 2**31, size=finished), device=done.device)
        state, fresh_obs = self.venv.restart(state, done, seeds)
        if self.randomizer is not None:  # the new episodes' physics
            self.randomizer.draw(done)
        return state, torch.where(done[:, None], fresh_obs.to(obs.dtype), obs)

    @property
    def physics(self) -> dict[str, torch.Tensor] | None:
        """The physical parameters of the envs' current episodes (``(N,)`` tensors, not differentiated),
        or ``None`` without randomization: every env at the task's nominal values."""
        return None if self.randomizer is None else self.randomizer.values

    def differentiable_step(self, state: SimState, action: torch.Tensor) -> StepOutput:
        """The env's ``differentiable_step`` with each env's current :attr:`physics` (read at every call:
        a restart in between redraws the restarted envs'); gradients flow through the env, not into the
        drawn values."""
        physics = self.physics
        if physics is None:
            return self.venv.differentiable_step(state, action)
        return self.venv.differentiable_step(state, action, physics=physics)

    def physics_summary(self) -> dict[str, float]:
        """Mean, min and max of each randomized parameter over the envs' current episodes (a run logs them
        with its evaluations as ``physics/<name>_mean`` ...); empty without randomization."""
        return PhysicsRandomizer.summary_of(self.randomizer)

    def record(self, reward: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """Accumulate undiscounted episode returns over one step (``reward``, ``done``: ``(N,)``) or over
        the steps of a segment in order (``(K, N)``, time first); return every env's return so far at each
        step, that step's reward included, as float64 of the same shape: where ``done``, that of the episode
        that just ended. Finished envs start over from zero.

        The ended episodes' returns stay on the tensor: a caller that steps many times reads them out once
        (``returns[done].tolist()`` over the stacked steps, as :func:`unroll` does), instead of a host
        sync at every step; and it records the whole segment at once, after its steps, where a record per
        step would cost five torch ops. The steps run on NumPy views where the tensors are on the CPU
        (:func:`~diffgym.training.returns.scan_arrays`): the same float64 sums."""
        steps = reward.dim() == 2
        rewards, done = (reward, done) if steps else (reward[None], done[None])
        returns = torch.empty(rewards.shape, dtype=torch.float64, device=self.device)
        xp, (rewards_, done_, returns_, running, length) = scan_arrays(
            rewards.detach().double(), done, returns, self.episode_return, self.episode_length)
        for t in range(rewards_.shape[0]):
            returns_[t] = running + rewards_[t]
            running = xp.where(done_[t], 0.0, returns_[t])
            length = xp.where(done_[t], 0, length + 1)
        self.episode_return = torch.as_tensor(running, device=self.device)
        self.episode_length = torch.as_tensor(length, device=self.device)
        return returns if steps else returns[0]

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state.detach().tensors(), "obs": self.obs, "seeds": self.seeds.bit_generator.state,
                "episode_return": self.episode_return, "episode_length": self.episode_length,
                **({"physics": self.randomizer.state_dict()} if self.randomizer is not None else {}),
                **({"wrappers": self.venv.wrapper_state()} if isinstance(self.venv, TensorVectorWrapper) else {})}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Put the envs back where :meth:`state_dict` found them; everything is checked before anything
        changes, so a bad checkpoint leaves the batch as it was (a one-line ``ValueError``)."""
        missing = [key for key in ("state", "obs", "seeds", "episode_return", "episode_length") if key not in saved]
        if missing:
            raise ValueError(f"the saved envs lack {missing}; expected what EnvBatch.state_dict() returns")
        # the saved tensors must be of the kind the batch holds now (same shapes and dtypes)
        now = {"obs": self.obs, "episode_return": self.episode_return, "episode_length": self.episode_length}
        fields = self.state.tensors()
        saved_fields = saved["state"]
        if not isinstance(saved_fields, (list, tuple)) or len(saved_fields) != len(fields) or not all(
                _like(value, current) for value, current in zip(saved_fields, fields)):
            raise ValueError(f"the saved envs' state must be {len(fields)} tensors shaped as "
                             f"{type(self.state).__name__}'s fields {[tuple(t.shape) for t in fields]}")
        for key, current in now.items():
            if not _like(saved[key], current):
                raise ValueError(f"the saved envs' {key} must be a {current.dtype} tensor of shape "
                                 f"{tuple(current.shape)}, got {describe_value(saved[key])}")
        check_generator_state(self.seeds, saved["seeds"], "the saved envs' seeds")
        if self.randomizer is not None:
            self.randomizer.check_saved_envs(saved)
        if isinstance(self.venv, TensorVectorWrapper):  # e.g. the observation noise's generator
            self.venv.check_wrapper_state(saved.get("wrappers", {}))
        # everything checked: nothing below raises on this checkpoint
        if self.randomizer is not None:
            self.randomizer.load_state_dict(saved["physics"])
        if isinstance(self.venv, TensorVectorWrapper):
            self.venv.load_wrapper_state(saved.get("wrappers", {}))
        self.state = type(self.state)(*(t.to(self.device) for t in saved_fields))
        self.obs = saved["obs"].to(self.device)
        self.seeds.bit_generator.state = saved["seeds"]
        self.episode_return = saved["episode_return"].to(self.device)
        self.episode_length = saved["episode_length"].to(self.device)


def _like(value: Any, current: torch.Tensor) -> bool:
    """Whether ``value`` is a tensor of ``current``'s shape and dtype (a saved one that can replace it)."""
    return isinstance(value, torch.Tensor) and value.shape == current.shape and value.dtype == current.dtype


@dataclasses.dataclass
class Rollout:
    """What one unroll leaves for a loss and for value targets; time-major ``(K, N, ...)``."""

    start_obs: torch.Tensor
    """Detached observations each step started from (the value network's inputs)."""
    rewards: torch.Tensor
    """Differentiable rewards."""
    next_obs: torch.Tensor
    """Differentiable observations each step led to, before any reset (where tails are evaluated)."""
    terminated: torch.Tensor
    truncated: torch.Tensor
    diverged: torch.Tensor
    """(N,) bool: the env's state stopped being finite somewhere in the rollout."""
    finished_returns: list[float]
    """Undiscounted returns of the episodes that ended in this rollout."""
    actions: list[torch.Tensor]
    """The K differentiable action tensors (N, A): where the action adjoints are read."""
    obs_normalized: torch.Tensor
    """Detached normalized observations the actions were drawn on."""
    noise: torch.Tensor
    """The standard-normal draws of the reparameterized actions."""
    pre_squash: torch.Tensor
    """Detached Gaussian samples before the squash (the likelihood ratio's ``u``)."""

    @property
    def done(self) -> torch.Tensor:
        """(K, N) bool: the step ended its episode (the next step belongs to a fresh one)."""
        return self.terminated | self.truncated

    @property
    def finite(self) -> torch.Tensor:
        """(N,) bool: the env neither diverged nor earned a non-finite reward in this rollout."""
        return ~self.diverged & torch.isfinite(self.rewards.detach()).all(dim=0)


def unroll(model: ActorCritic, normalizer: ObservationNormalizer, envs: EnvBatch, steps: int
           ) -> tuple[Rollout, SimState, torch.Tensor]:
    """Roll the batch forward ``steps`` steps with reparameterized actions, restarting finished
    episodes; return the rollout and the (still differentiable) state and observation it ends in.

    The batch itself is not advanced: assign ``envs.state, envs.obs`` from the returned pair (detached
    to cut the graph) when the update is done. An env whose observation or reward stops being finite
    has diverged: its step counts as a termination (no tail), it restarts, and ``Rollout.diverged``
    marks it so the trainer can leave it out of the update. So does an env whose state leaves the task's
    valid domain (``DiffSim.outside_domain``) while still finite: stepping it again would be an error.
    """
    state, obs = envs.state, envs.obs
    sim = getattr(envs.venv, "sim", None)
    step = _unroll_step(envs, sim, state)
    start_obs, rewards, next_obs, terminated, truncated, finite_rewards = [], [], [], [], [], []
    actions, obs_normalized, noises, pre_squashes = [], [], [], []
    diverged_any = torch.zeros(envs.num_envs, dtype=torch.bool, device=envs.device)
    for _ in range(steps):
        obs_norm = normalizer(obs)
        action, pre_squash, noise = model.sample(obs_norm)
        out = step(state, action)
        if sim is not None:  # not finite, or finite but outside the task's valid domain (the next step would reject it)
            diverged = sim.diverged(out)
        else:
            diverged = ~(torch.isfinite(out.obs).all(dim=1) & torch.isfinite(out.reward))
        # Divergence is rare: without it the masking below would only copy (values and gradients alike),
        # so it is skipped, sparing each step five torch ops and an autograd node.
        step_obs, step_terminated, finite_reward = out.obs, out.terminated, out.reward
        if bool(diverged.any()):
            diverged_any |= diverged
            step_obs = torch.where(diverged[:, None], torch.zeros_like(out.obs), out.obs)
            step_terminated = out.terminated | diverged
            finite_reward = torch.where(diverged, torch.zeros_like(out.reward), out.reward)
        start_obs.append(obs.detach())
        rewards.append(out.reward)
        next_obs.append(step_obs)  # before any reset: the tail value of a truncated episode uses it
        terminated.append(step_terminated)
        truncated.append(out.truncated)  # a termination takes precedence: masked once, after the loop
        actions.append(action)
        obs_normalized.append(obs_norm.detach())
        noises.append(noise)
        pre_squashes.append(pre_squash.detach())
        done = step_terminated | out.truncated
        finite_rewards.append(finite_reward.detach())  # record() reads values only
        state, obs = envs.restart_finished(out.state, step_obs, done)
    terminated = torch.stack(terminated)
    truncated = torch.stack(truncated) & ~terminated
    done = terminated | truncated
    # the ended episodes' returns in step order, env order within a step: one host sync per segment
    finished = envs.record(torch.stack(finite_rewards), done)[done].tolist()
    rollout = Rollout(torch.stack(start_obs), torch.stack(rewards), torch.stack(next_obs), terminated, truncated,
                      diverged_any, finished, actions, torch.stack(obs_normalized), torch.stack(noises),
                      torch.stack(pre_squashes))
    return rollout, state, obs


def _unroll_step(envs: EnvBatch, sim: Any, state: SimState) -> Callable[[SimState, torch.Tensor], StepOutput]:
    """The batch's ``differentiable_step`` for :func:`unroll`, validating the state only where it has to.

    The env's step validates the state it starts from on every call (types, shapes and a domain check of
    every field: a dozen torch ops and a host sync). In :func:`unroll` every later state is a step's
    output that the loop found inside the domain, or a fresh restart, so where the env's step is
    ``DiffSim.step`` itself the start state is validated here, once, and the steps skip that check; the
    action and the physics are still checked at every step, as ``DiffSim.step`` does. A vector env with
    its own ``differentiable_step`` (a wrapper), or an ``EnvBatch`` subclass overriding it, keeps it."""
    if (sim is None or type(envs).differentiable_step is not EnvBatch.differentiable_step
            or getattr(type(envs.venv), "differentiable_step", None) is not DiffGymVectorEnv.differentiable_step):
        return envs.differentiable_step
    sim.check_state(state)
    batch = envs.num_envs

    def step(state: SimState, action: torch.Tensor) -> StepOutput:
        return sim._step(state, sim.check_action(action, batch), sim.check_physics(envs.physics, batch))

    return step


class EvaluationCadence:
    """When a trainer evaluates (and checkpoints): env step 0 of a fresh run, every point of the config's
    evaluation schedule (``eval_schedule``: every ``eval_every_env_steps``, or geometric from
    ``eval_first_env_steps``; :meth:`TrainConfig.next_evaluation`) and the budget (``docs/protocol.md``).
    Trainers end their updates at these points (:meth:`steps_to_next`), so the curves of every trainer
    share their x values."""

    def __init__(self, config: TrainConfig, env_steps: int = 0, resumed: bool | None = None):
        """``env_steps``: where the run starts; ``resumed`` (default: ``env_steps > 0``) says it continues
        from a checkpoint, which follows the evaluation at its env steps: the next is the schedule's
        next point. A fresh run evaluates its untrained policy first."""
        self.config, self.budget = config, config.total_env_steps
        resumed = env_steps > 0 if resumed is None else resumed
        self.next_eval = config.next_evaluation(env_steps) if resumed else 0

    def steps_to_next(self, env_steps: int, num_envs: int) -> int:
        """Vector steps (of ``num_envs`` env steps) until the next evaluation point or the budget,
        rounded up: at least 1."""
        return max(1, -(-(min(self.next_eval, self.budget) - env_steps) // num_envs))

    def due(self, env_steps: int) -> bool:
        """An evaluation point or the budget has been reached; call :meth:`evaluated` after it."""
        return env_steps >= self.next_eval or env_steps >= self.budget

    def evaluated(self, env_steps: int) -> None:
        self.next_eval = self.config.next_evaluation(env_steps)

    def finished(self, env_steps: int) -> bool:
        return env_steps >= self.budget


def evaluate_and_checkpoint(run: Run, model: ActorCritic, normalizer: ObservationNormalizer, env_steps: int,
                            grad_steps: int, extra: dict[str, Any] | None = None,
                            act: Callable[[np.ndarray], np.ndarray] | None = None,
                            envs: EnvBatch | None = None) -> dict[str, float]:
    """Evaluate the deterministic policy ``squash(actor(normalize(obs)))`` on the run's held-out seeds
    (with the run's task arguments and evaluation randomization, :func:`evaluate_config`), log the row
    (with the training envs' physics summary if ``envs`` is given and randomizes), and checkpoint the
    evaluated parameters with the keys every tool reads (``actor_critic``, ``normalizer``, ``config``,
    ``env_steps``, ``grad_steps``) plus ``extra`` (what the trainer needs to resume). ``act`` replaces the
    policy if given."""
    config = run.config
    device = next(model.parameters()).device

    def deterministic(obs: np.ndarray) -> np.ndarray:
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
        return model.act(normalizer(obs_t), deterministic=True).cpu().numpy()

    with run.evaluating():  # left out of the training wall-clock (Run.evaluating)
        result = evaluate_config(act or deterministic, config)
        run.log(env_steps, grad_steps, **result, **(envs.physics_summary() if envs is not None else {}))
        run.save_checkpoint({"actor_critic": model.state_dict(), "normalizer": normalizer.state_dict(),
                             **(extra or {}), "config": config.to_dict(), "env_steps": env_steps,
                             "grad_steps": grad_steps}, env_steps)
    return result
