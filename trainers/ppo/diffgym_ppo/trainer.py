"""``diffgym train --algo ppo``: SB3 PPO on the native batched env, logging through the shared ``Run``."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.vec_env import VecMonitor, VecNormalize

from diffgym.training import Run, TrainConfig, evaluate_policy
from diffgym.training.evaluation import train_env_seed
from diffgym_ppo.policy import SpecActorCriticPolicy, SpecPPO
from diffgym_ppo.vec_env import DiffGymVecEnv

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


def load_hyperparams() -> dict[str, Any]:
    """The bundled per-task table ``hyperparams/ppo.yml`` (rl-zoo style: env id -> TrainConfig fields)."""
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

    def train(self, config: TrainConfig, progress: bool = True) -> Path:
        params = {**PPO_PARAMS, **config.algo_params}
        unknown = sorted(set(params) - set(PPO_PARAMS))
        if unknown:
            raise ValueError(f"unknown PPO algo_params {unknown}; valid: {sorted(PPO_PARAMS)}")
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        with Run(config.replace(algo_params=params), progress=progress) as run:
            config = run.config
            venv = DiffGymVecEnv.make(config.env_id, config.num_envs, **config.env_options())
            env: Any = VecMonitor(venv)
            if params["normalize_reward"]:
                env = VecNormalize(env, norm_obs=False, norm_reward=True, gamma=params["gamma"])
            rollout = params["n_steps"] * config.num_envs
            if rollout % params["batch_size"]:
                raise ValueError(f"batch_size {params['batch_size']} must divide n_steps * num_envs = {rollout}")
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
            callback = _RunCallback(run, config, model)
            model.learn(total_timesteps=config.total_env_steps, callback=callback, log_interval=1)
            model.save(run.dir / "sb3_model.zip")
            if isinstance(env, VecNormalize):
                env.save(str(run.dir / "vec_normalize.pkl"))
            env.close()
            return run.dir


def checkpoint(model: SpecPPO, config: TrainConfig) -> dict[str, Any]:
    """The shared checkpoint keys (``actor_critic``, ``normalizer``, ``config``, step counts) + PPO's optimizer."""
    return {
        "actor_critic": model.policy.actor_critic.state_dict(),
        "normalizer": model.policy.normalizer.state_dict(),
        "optimizer": model.policy.optimizer.state_dict(),
        "config": config.to_dict(),
        "env_steps": int(model.num_timesteps),
        "grad_steps": int(model.grad_steps),
    }


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
    """Progress bar every step; deterministic evaluation + checkpoint every ``eval_every_env_steps``."""

    def __init__(self, run: Run, config: TrainConfig, model: SpecPPO):
        super().__init__()
        self.run, self.config, self.ppo = run, config, model
        self.next_eval = 0
        self.last_eval = -1

    def _on_training_start(self) -> None:
        self._evaluate()

    def _on_step(self) -> bool:
        self.run.progress(self.num_timesteps)
        return True

    def _on_rollout_start(self) -> None:
        # The policy has now been trained on every collected step: an update boundary (protocol.md).
        if self.num_timesteps >= self.next_eval:
            self._evaluate()

    def _on_training_end(self) -> None:
        if self.ppo.num_timesteps != self.last_eval:
            self._evaluate()

    def _evaluate(self) -> None:
        policy = self.ppo.policy
        policy.set_training_mode(False)
        result = evaluate_policy(policy.act_deterministic, self.config.env_id, self.config.eval_episodes,
                                 self.config.seed, env_kwargs=self.config.env_options())
        env_steps = int(self.ppo.num_timesteps)
        self.run.log(env_steps, self.ppo.grad_steps, **result)
        self.run.save_checkpoint(checkpoint(self.ppo, self.config), env_steps)
        self.last_eval = env_steps
        every = self.config.eval_every_env_steps
        self.next_eval = (env_steps // every + 1) * every
