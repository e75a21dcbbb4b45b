"""``diffgym train --algo ppo``: SB3 PPO on the native batched env, logging through the shared ``Run``.

Checkpoints are weights-only (``torch.load(..., weights_only=True)`` reads them; ``docs/protocol.md``):
SB3's NumPy arrays and scalars are stored as tensors (:func:`_plain`) and VecNormalize's running
statistics as plain numbers, never as pickled SB3 or NumPy objects.
"""

from __future__ import annotations

import math
import random
from collections import deque
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecMonitor, VecNormalize

from diffgym.training import EvaluationCadence, Run, TrainConfig
from diffgym.training.evaluation import evaluate_config, train_env_seed
from diffgym.training.randomization import check_config_ranges
from diffgym.training.spec import parse_number
from diffgym_ppo.policy import SpecActorCriticPolicy, SpecPPO
from diffgym_ppo.vec_env import SB3VecEnvAdapter

PPO_PARAMS: dict[str, Any] = {
    "n_steps": 64,               # rollout length per env; a rollout is n_steps * num_envs transitions
    "batch_size": 1024,          # minibatch size (transitions)
    "n_epochs": 10,              # passes over each rollout
    "gamma": 0.99,
    "gae_lambda": 0.95,
    "clip_range": 0.2,
    "clip_range_vf": None,       # None: the value loss is not clipped
    "ent_coef": 0.0,
    "vf_coef": 0.5,
    "target_kl": None,           # None: no early stop of the epochs on KL
    "normalize_advantage": True,
    "normalize_reward": False,   # scale rewards by a running std of the discounted return (SB3 VecNormalize)
}
"""Every PPO hyperparameter read from ``TrainConfig.algo_params`` and its default."""

NUMBER_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "gamma": (lambda x: 0.0 < x <= 1.0, "in (0, 1]"),
    "gae_lambda": (lambda x: 0.0 <= x <= 1.0, "in [0, 1]"),
    "clip_range": (lambda x: x > 0.0, "> 0"),
    "clip_range_vf": (lambda x: x > 0.0, "> 0"),
    "ent_coef": (lambda x: x >= 0.0, ">= 0"),
    "vf_coef": (lambda x: x >= 0.0, ">= 0"),
    "target_kl": (lambda x: x > 0.0, "> 0"),
}
"""PPO's real-valued settings and the values SB3 can run with (checked before any run)."""
OPTIONAL_PARAMS = ("clip_range_vf", "target_kl")
"""Settings that ``null`` turns off."""

TENSORBOARD_TAGS = {"train/std": "policy/std", "train/value_loss": "losses/value_loss",
                    "train/policy_gradient_loss": "losses/policy_gradient_loss", "train/entropy_loss": "losses/entropy_loss",
                    "train/approx_kl": "losses/approx_kl", "train/clip_fraction": "losses/clip_fraction",
                    "rollout/ep_rew_mean": "rollout/episode_return", "rollout/ep_len_mean": "rollout/episode_length"}
"""SB3's logger keys under the shared TensorBoard tags (``docs/protocol.md``)."""


def load_hyperparams() -> dict[str, Any]:
    """The bundled per-task table ``hyperparams/ppo.yml`` (env id -> TrainConfig fields; not rl-zoo's format)."""
    text = resources.files("diffgym_ppo").joinpath("hyperparams/ppo.yml").read_text()
    return yaml.safe_load(text) or {}


class PPOTrainer:
    """Stable-Baselines3 PPO whose model, normalizer and optimizer come from the shared spec."""

    name = "ppo"
    description = "Stable-Baselines3 PPO (the model-free baseline) on the native batched vector env"

    def default_config(self, env_id: str) -> dict[str, Any]:
        table = load_hyperparams()
        entry = dict(table.get(env_id, table.get("default", {})))
        entry["algo_params"] = {**PPO_PARAMS, **entry.get("algo_params", {})}
        return entry

    def suggest_hyperparams(self, trial: Any, env_id: str) -> dict[str, Any]:
        """``diffgym tune``'s search space (rl-zoo's PPO space, sized for these tasks): PPO's own settings
        and the number of envs as dotted overrides; the shared specs are not searched."""
        num_envs = trial.suggest_categorical("num_envs", [16, 32, 64, 128])
        n_steps = trial.suggest_categorical("n_steps", [16, 32, 64, 128, 256])
        minibatches = trial.suggest_categorical("minibatches", [1, 2, 4, 8, 16])
        return {
            "num_envs": num_envs,
            "algo_params.n_steps": n_steps,
            "algo_params.batch_size": max(32, num_envs * n_steps // minibatches),
            "algo_params.n_epochs": trial.suggest_categorical("n_epochs", [3, 5, 10, 20]),
            "algo_params.gamma": trial.suggest_categorical("gamma", [0.95, 0.98, 0.99, 0.995, 0.999]),
            "algo_params.gae_lambda": trial.suggest_categorical("gae_lambda", [0.8, 0.9, 0.92, 0.95, 0.98]),
            "algo_params.clip_range": trial.suggest_categorical("clip_range", [0.1, 0.2, 0.3]),
            "algo_params.ent_coef": trial.suggest_float("ent_coef", 1e-8, 1e-2, log=True),
            "algo_params.normalize_reward": trial.suggest_categorical("normalize_reward", [False, True]),
        }

    def check_config(self, config: TrainConfig) -> dict[str, Any]:
        """PPO's settings in ``config`` with the defaults filled in, or a one-line ``ValueError`` naming the
        first one PPO cannot run; ``resolve_config`` calls it, so a sweep refuses them before any run."""
        params = {**PPO_PARAMS, **config.algo_params}
        unknown = sorted(set(params) - set(PPO_PARAMS))
        if unknown:
            raise ValueError(f"unknown PPO algo_params {unknown}; valid: {sorted(PPO_PARAMS)}")
        for name in ("n_steps", "batch_size", "n_epochs"):
            value = params[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"algo_params.{name} must be a whole number >= 1, got {value!r}")
        for name, (accepts, expected) in NUMBER_RANGES.items():
            value = params[name]
            if value is None and name in OPTIONAL_PARAMS:
                continue
            number = parse_number(value)  # also YAML's text 1e-5 (no dot), in a config given to train() directly
            if number is None or not (math.isfinite(number) and accepts(number)):
                also = " or null (off)" if name in OPTIONAL_PARAMS else ""
                raise ValueError(f"algo_params.{name} must be a number {expected}{also}, got {params[name]!r}")
            params[name] = float(number)
        for name in ("normalize_advantage", "normalize_reward"):
            if not isinstance(params[name], bool):
                raise ValueError(f"algo_params.{name} must be true or false, got {params[name]!r}")
        if params["normalize_advantage"] and params["batch_size"] < 2:  # SB3 asserts it
            raise ValueError("algo_params.batch_size must be >= 2 with normalize_advantage (a minibatch's "
                             f"advantages are normalized by their spread), got {params['batch_size']}")
        rollout = params["n_steps"] * config.num_envs
        if rollout % params["batch_size"]:  # SB3 would only warn and take a last, smaller minibatch
            small = [d for d in range(1, math.isqrt(rollout) + 1) if rollout % d == 0]
            divisors = sorted({*small, *(rollout // d for d in small)} - {1})
            nearest = sorted(sorted(divisors, key=lambda d: (abs(d - params["batch_size"]), d))[:2])
            instead = f"set --param batch_size={' or '.join(map(str, nearest))}, or another n_steps" if nearest \
                else "set a larger n_steps"
            raise ValueError(f"batch_size {params['batch_size']} must divide n_steps * num_envs = {rollout} "
                             f"({params['n_steps']} x {config.num_envs}): {instead}")
        return params

    def train(self, config: TrainConfig, progress: bool = True) -> Path:
        """Train as ``config`` says; resume exactly from the run directory's latest checkpoint if it has one."""
        params = self.check_config(config)
        check_config_ranges(config)  # before the run directory is made
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        with Run(config.replace(algo_params=params), progress=progress) as run:
            run.tensorboard_tags.update(TENSORBOARD_TAGS)
            config = run.config
            venv = SB3VecEnvAdapter.make(config.env_id, config.num_envs, randomize=config.randomize,
                                         randomize_seed=train_env_seed(config.seed), wrappers=config.wrappers,
                                         **config.env_options())
            env: Any = VecMonitor(venv)
            if params["normalize_reward"]:
                env = VecNormalize(env, norm_obs=False, norm_reward=True, gamma=params["gamma"])
            model = SpecPPO(
                SpecActorCriticPolicy, env,
                learning_rate=config.optimizer.lr,
                max_grad_norm=config.optimizer.max_grad_norm if config.optimizer.max_grad_norm > 0 else math.inf,
                seed=train_env_seed(config.seed),  # SB3 seeds env i with this + i
                device=config.device, verbose=0,
                policy_kwargs=dict(policy_spec=config.policy, normalizer_spec=config.normalizer,
                                   optimizer_spec=config.optimizer),
                **{k: v for k, v in params.items() if k != "normalize_reward"},
            )
            model.set_logger(Logger(folder=None, output_formats=[_RunWriter(run, model)]))
            saved = run.load_latest_checkpoint(require=RESUME_KEYS)
            if saved is not None:
                restore(model, env, saved)
                run.resume_from(model.num_timesteps)
            callback = _RunCallback(run, config, model, venv, resumed=saved is not None)
            model.learn(total_timesteps=max(0, config.total_env_steps - model.num_timesteps), callback=callback,
                        log_interval=1, reset_num_timesteps=saved is None)
            model.save(run.dir / "sb3_model.zip")
            if isinstance(env, VecNormalize):
                env.save(str(run.dir / "vec_normalize.pkl"))
            env.close()
            return run.dir


def policy_snapshot(model: SpecPPO, config: TrainConfig) -> dict[str, Any]:
    """The shared checkpoint keys every trainer saves (``actor_critic``, ``normalizer``, ``config``, step
    counts): what ``diffgym.load_policy`` needs, not enough to resume training."""
    return {
        "actor_critic": model.policy.actor_critic.state_dict(),
        "normalizer": model.policy.normalizer.state_dict(),
        "config": config.to_dict(),
        "env_steps": int(model.num_timesteps),
        "grad_steps": int(model.grad_steps),
    }


RESUME_KEYS = ("optimizer", "sb3", "envs", "rng")
"""What a checkpoint holds beyond :func:`policy_snapshot` when training can resume from it."""


def checkpoint(model: SpecPPO, config: TrainConfig) -> dict[str, Any]:
    """:func:`policy_snapshot`, PPO's optimizer, and everything else an exact resume needs (see
    :func:`restore`). Taken at an update boundary: the rollout buffer is empty then. Only tensors and
    plain data, so it loads weights-only."""
    env = model.get_env()
    logger = model.logger
    return {
        **policy_snapshot(model, config),
        "optimizer": model.policy.optimizer.state_dict(),
        "sb3": _plain({
            "n_updates": model._n_updates,
            "episode_num": model._episode_num,
            "last_obs": np.array(model._last_obs, copy=True),
            "last_episode_starts": np.array(model._last_episode_starts, copy=True),
            "ep_info_buffer": list(model.ep_info_buffer or []),
            "ep_success_buffer": list(model.ep_success_buffer or []),
            # the last update's train/* values: SB3 logs them with the next rollout's statistics
            "pending_log": (dict(logger.name_to_value), dict(logger.name_to_count), dict(logger.name_to_excluded)),
        }),
        "envs": _plain(_wrapper_states(env)),
        "rng": {"torch": torch.get_rng_state(), "numpy": _plain(np.random.get_state()), "python": random.getstate(),
                **({"cuda": torch.cuda.get_rng_state(model.device)} if model.device.type == "cuda" else {})},
    }


def restore(model: SpecPPO, env: Any, saved: dict[str, Any]) -> None:
    """Put a freshly built ``model`` (and its ``env`` stack) into the state of a :func:`checkpoint`, so
    that ``model.learn(..., reset_num_timesteps=False)`` continues exactly as the saved run would have:
    the policy, normalizer and Adam state, the step and update counts, SB3's current observations and
    episode statistics, the pending log values, the envs (simulator state, reset streams, monitor and
    reward-normalization statistics) and the torch, NumPy and Python RNGs (action noise, minibatches)."""
    policy = model.policy
    policy.actor_critic.load_state_dict(saved["actor_critic"])
    policy.normalizer.load_state_dict(saved["normalizer"])
    policy.optimizer.load_state_dict(saved["optimizer"])
    model.num_timesteps, model.grad_steps = int(saved["env_steps"]), int(saved["grad_steps"])
    sb3 = _from_plain(saved["sb3"])
    model._n_updates, model._episode_num = int(sb3["n_updates"]), int(sb3["episode_num"])
    model._last_obs = np.array(sb3["last_obs"], copy=True)
    model._last_episode_starts = np.array(sb3["last_episode_starts"], copy=True)
    # learn(reset_num_timesteps=False) keeps existing episode buffers and does not reset the envs
    model.ep_info_buffer = deque(sb3["ep_info_buffer"], maxlen=model._stats_window_size)
    model.ep_success_buffer = deque(sb3["ep_success_buffer"], maxlen=model._stats_window_size)
    values, counts, excluded = sb3["pending_log"]
    model.logger.name_to_value.update(values)
    model.logger.name_to_count.update(counts)
    model.logger.name_to_excluded.update(excluded)
    _load_wrapper_states(env, _from_plain(saved["envs"]))
    if isinstance(env, VecNormalize):
        model._last_original_obs = env.get_original_obs()
    rng = saved["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(_from_plain(rng["numpy"]))
    random.setstate(rng["python"])
    if model.device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], model.device)


def _wrapper_states(env: Any) -> dict[str, Any]:
    """The state of each layer of the env stack: VecNormalize's return statistics, VecMonitor's running
    episodes, the native envs."""
    states: dict[str, Any] = {}
    while True:
        if isinstance(env, VecNormalize):
            rms = env.ret_rms
            states["vec_normalize"] = {"ret_rms": {"mean": rms.mean, "var": rms.var, "count": rms.count},
                                       "returns": env.returns.copy(),
                                       "old_obs": np.array(env.old_obs, copy=True)}
        elif isinstance(env, VecMonitor):
            states["monitor"] = {"returns": env.episode_returns.copy(), "lengths": env.episode_lengths.copy(),
                                 "count": env.episode_count}
        elif isinstance(env, SB3VecEnvAdapter):
            states["native"] = env.state_dict()
            return states
        env = env.venv


def _load_wrapper_states(env: Any, states: dict[str, Any]) -> None:
    while True:
        if isinstance(env, VecNormalize):
            saved = states["vec_normalize"]
            env.ret_rms = RunningMeanStd(shape=np.shape(saved["ret_rms"]["mean"]))
            env.ret_rms.mean, env.ret_rms.var = saved["ret_rms"]["mean"], saved["ret_rms"]["var"]
            env.ret_rms.count = saved["ret_rms"]["count"]
            env.returns, env.old_obs = saved["returns"].copy(), np.array(saved["old_obs"], copy=True)
        elif isinstance(env, VecMonitor):
            saved = states["monitor"]
            env.episode_returns, env.episode_lengths = saved["returns"].copy(), saved["lengths"].copy()
            env.episode_count = saved["count"]
        elif isinstance(env, SB3VecEnvAdapter):
            env.load_state_dict(states["native"])
            return
        env = env.venv


_NDARRAY, _NUMPY_SCALAR = "__ndarray__", "__numpy_scalar__"


def _plain(value: Any) -> Any:
    """``value`` with every NumPy array and scalar replaced by a one-key dict holding it as a tensor of
    its dtype, so ``torch.load(weights_only=True)`` reads it back without unpickling NumPy objects, and
    :func:`_from_plain` restores the exact type (a float32 scalar stays float32: SB3's logger averages
    in the type it is given, and an exact resume depends on it)."""
    if isinstance(value, np.ndarray):
        return {_NDARRAY: torch.from_numpy(np.ascontiguousarray(value).copy())}
    if isinstance(value, np.generic):
        return {_NUMPY_SCALAR: torch.from_numpy(np.asarray(value).copy())}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    raise TypeError(f"a PPO checkpoint holds tensors and plain data only, got {type(value).__name__}")


def _from_plain(value: Any) -> Any:
    """The inverse of :func:`_plain`."""
    if isinstance(value, dict):
        if value.keys() == {_NDARRAY}:
            return value[_NDARRAY].numpy()
        if value.keys() == {_NUMPY_SCALAR}:
            return value[_NUMPY_SCALAR].numpy()[()]
        return {key: _from_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_from_plain(item) for item in value)
    return value


class _RunWriter(KVWriter):
    """Forwards SB3's logger (``train/*``, ``rollout/*``, ``time/fps``) to the shared Run."""

    def __init__(self, run: Run, model: SpecPPO):
        self.run, self.model = run, model

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        scalars = {k: float(v) for k, v in key_values.items()
                   if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                   and k not in ("time/total_timesteps", "time/iterations", "time/time_elapsed")}
        self.run.log(step, self.model.grad_steps, **scalars)

    def close(self) -> None:
        pass


class _RunCallback(BaseCallback):
    """Progress bar every step; deterministic evaluations on the config's schedule; checkpoints.

    Evaluations happen at env step 0, at every point of the config's evaluation schedule (at the first
    vector step at or past it; :class:`~diffgym.training.EvaluationCadence`), and at the end. A point
    reached inside a rollout is evaluated there, with the policy of the last update (the one acting at
    that env step), and its parameters are saved as a
    :func:`policy_snapshot`; one reached by a rollout's last step is evaluated after the update on that
    rollout. PPO's full state can only be saved between rollouts, so each evaluation is also followed by
    a resumable checkpoint at the next update boundary (and at the end).
    """

    def __init__(self, run: Run, config: TrainConfig, model: SpecPPO, envs: SB3VecEnvAdapter, resumed: bool):
        super().__init__()
        self.run, self.config, self.ppo, self.envs = run, config, model, envs
        steps = int(model.num_timesteps)
        # a resumed run's checkpoint follows every evaluation up to its env steps
        self.last_eval = self.last_checkpoint = steps if resumed else -1
        self.cadence = EvaluationCadence(config, steps, resumed=resumed)

    def _on_training_start(self) -> None:
        if self.last_eval < 0:
            self._evaluate()
            self._checkpoint()

    def _on_step(self) -> bool:
        steps = self.ppo.num_timesteps
        self.run.progress(steps)
        last_step_of_rollout = self.locals["n_steps"] + 1 >= self.locals["n_rollout_steps"]
        if steps >= self.cadence.next_eval and not last_step_of_rollout:
            self._evaluate()
            # the evaluated parameters, for diffgym eval / load_policy; a resume passes over this snapshot
            with self.run.evaluating():
                self.run.save_checkpoint(policy_snapshot(self.ppo, self.config), steps)
        return True

    def _on_rollout_start(self) -> None:
        # The policy has now been trained on every collected step: an update boundary (protocol.md).
        if self.ppo.num_timesteps >= self.cadence.next_eval:
            self._evaluate()
        if self.last_eval > self.last_checkpoint:
            self._checkpoint()

    def _on_training_end(self) -> None:
        if self.ppo.num_timesteps != self.last_eval:
            self._evaluate()
        if self.ppo.num_timesteps != self.last_checkpoint:
            self._checkpoint()

    def _evaluate(self) -> None:
        policy = self.ppo.policy
        policy.set_training_mode(False)
        env_steps = int(self.ppo.num_timesteps)
        with self.run.evaluating():  # left out of the training wall-clock, with the checkpoints after it
            result = evaluate_config(policy.act_deterministic, self.config)
            self.run.log(env_steps, self.ppo.grad_steps, **result, **self.envs.physics_summary())
        self.last_eval = env_steps
        self.cadence.evaluated(env_steps)

    def _checkpoint(self) -> None:
        with self.run.evaluating():  # a checkpoint follows an evaluation (Run.evaluating)
            self.run.save_checkpoint(checkpoint(self.ppo, self.config), self.ppo.num_timesteps)
        self.last_checkpoint = int(self.ppo.num_timesteps)
