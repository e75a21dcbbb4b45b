"""DiffGym's Analytic Policy Gradient trainer plugins.

* ``apg`` (``diffgym train --algo apg``): the paper's APG, purely first order by default: segments
  backpropagated through ``differentiable_step``, their tails bootstrapped by nothing, a Monte-Carlo
  value network or a TD(lambda) critic (``docs/apg.md``).
* ``apg-ppo``: the same segment steps with PPO's clipped likelihood-ratio epochs beside them, over the
  same samples (``proximal.py``); a named variant, so no number of it passes for purely analytic.
* ``sapo``: maximum-entropy first-order actor-critic (SAPO's recipe): the entropy bonus and its learned
  temperature (``entropy.py``), twin critics without a target network (``value.critics``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from diffgym.training import TrainConfig

from diffgym_apg.apg import Learner, apg_update, checked_params, train
from diffgym_apg.config import APGConfig, SAPOConfig, upgrade_config, upgrade_params
from diffgym_apg.entropy import EntropyConfig, Temperature
from diffgym_apg.estimators import (Estimator, PolicyGradientConfig, register_estimator, registered_estimators,
                                    set_gradient)
from diffgym_apg.objective import SegmentObjective, segment_actor_loss
from diffgym_apg.proximal import ProximalConfig
from diffgym_apg.value import BOOTSTRAP_MODES

__all__ = ["APGConfig", "APGPPOTrainer", "APGTrainer", "BOOTSTRAP_MODES", "EntropyConfig", "Estimator", "Learner",
           "PolicyGradientConfig", "ProximalConfig", "SAPOConfig", "SAPOTrainer", "SegmentObjective", "Temperature",
           "apg_update", "default_config",
           "register_estimator", "registered_estimators", "segment_actor_loss", "set_gradient", "train",
           "upgrade_config", "upgrade_params"]


def default_config(env_id: str, table: str = "apg", config_class: type[APGConfig] = APGConfig) -> dict[str, Any]:
    """Per-task defaults from ``hyperparams/<table>.yml`` (its ``default`` entry for unlisted tasks), with
    every field of every section (of ``config_class``) filled in so ``--print-config`` shows them all."""
    entries = yaml.safe_load(files("diffgym_apg").joinpath("hyperparams", f"{table}.yml").read_text())
    entry = dict(entries.get(env_id, entries["default"]))
    entry["algo_params"] = config_class.from_params(entry.get("algo_params", {})).to_dict()
    return entry


class APGTrainer:
    """The ``apg`` entry point of the ``diffgym.trainers`` group."""

    name = "apg"
    description = ("Analytic Policy Gradients: segmented backpropagation through the simulator "
                   "(none/mc/critic bootstrap; analytic, likelihood or hybrid estimator)")
    cli_flags = {
        "segment-length": "K, steps backpropagated per update, or 'adaptive' (sets segment.length)",
        "bootstrap": "segment tail: none, mc or critic (sets value.bootstrap)",
        "estimator": "segment step's gradient: analytic, likelihood or hybrid (sets policy_gradient.estimator)",
    }
    ablation_grid = {"segment.length": "4,8,16,32,64,full", "value.bootstrap": "none,mc,critic"}
    upgrade_config = staticmethod(upgrade_config)
    """How a config this trainer saved in an earlier format reads today (``diffgym.plugins``)."""
    with_proximal = False
    config_class: type[APGConfig] = APGConfig
    """How this variant reads ``algo_params``."""

    def default_config(self, env_id: str) -> dict[str, Any]:
        return default_config(env_id, self.name, self.config_class)

    def suggest_hyperparams(self, trial: Any, env_id: str) -> dict[str, Any]:
        """``diffgym tune``'s search space: APG's own settings and the number of envs as dotted
        overrides (the shared policy, normalizer and optimizer specs are not searched); rollout reuse
        beside the analytic estimator, whose surrogate it descends."""
        segment = trial.suggest_categorical("segment_length", ["8", "16", "32", "64", "adaptive"])
        estimator = trial.suggest_categorical("estimator", ["analytic", "hybrid"])
        return {
            "num_envs": trial.suggest_categorical("num_envs", [4, 8, 16, 32, 64, 128]),
            "algo_params.segment.length": segment if segment == "adaptive" else int(segment),
            "algo_params.value.bootstrap": trial.suggest_categorical("bootstrap", ["none", "mc", "critic"]),
            "algo_params.policy_gradient.estimator": estimator,
            "algo_params.gamma": trial.suggest_categorical("gamma", [0.97, 0.99, 0.995]),
            **({"algo_params.reuse.epochs": trial.suggest_categorical("reuse_epochs", [0, 2, 4, 8]),
                "algo_params.reuse.minibatches": trial.suggest_categorical("reuse_minibatches", [1, 2])}
               if estimator == "analytic" else {}),
        }

    def check_config(self, config: TrainConfig) -> None:
        """One-line ``ValueError`` for settings this trainer cannot run; ``resolve_config`` calls it, so
        ``diffgym train`` and every sweep refuse them before any run starts."""
        self.checked_params(config)

    def checked_params(self, config: TrainConfig) -> APGConfig:
        params = checked_params(config, self.config_class)
        has_proximal = params.proximal is not None
        if has_proximal != self.with_proximal:
            other = "apg-ppo" if has_proximal else "apg"
            raise ValueError(f"trainer {self.name!r} {'takes no' if has_proximal else 'needs the'} proximal section: "
                             f"train this config with --algo {other}")
        return params

    def train(self, config: TrainConfig, progress: bool = True) -> Path:
        return train(config, progress=progress, params=self.checked_params(config))


class APGPPOTrainer(APGTrainer):
    """The ``apg-ppo`` entry point: APG's segment steps beside PPO's clipped likelihood-ratio epochs."""

    name = "apg-ppo"
    description = ("APG's segment steps with PPO's clipped likelihood-ratio epochs beside them (not purely "
                   "analytic; proximal section in PPO's names)")
    cli_flags = {**APGTrainer.cli_flags,
                 "bootstrap": "segment tail: gae, mc or critic (sets value.bootstrap)",
                 "estimator": "segment step's gradient: analytic, likelihood, hybrid or none (sets "
                              "policy_gradient.estimator)"}
    ablation_grid = {"policy_gradient.estimator": "analytic,none"}
    with_proximal = True

    def suggest_hyperparams(self, trial: Any, env_id: str) -> dict[str, Any]:
        """The number of envs, K, gamma, the segment step's estimator and rate, and the clipped epochs'
        settings (PPO's ranges); the value network is the one the joint steps fit (``gae``)."""
        estimator = trial.suggest_categorical("estimator", ["analytic", "none"])
        return {
            "num_envs": trial.suggest_categorical("num_envs", [8, 16, 32, 64]),
            "algo_params.segment.length": trial.suggest_categorical("segment_length", [8, 16, 32]),
            "algo_params.gamma": trial.suggest_categorical("gamma", [0.97, 0.99, 0.995]),
            "algo_params.value.bootstrap": "gae",
            "algo_params.policy_gradient.estimator": estimator,
            **({"algo_params.policy_gradient.lr": trial.suggest_float("segment_lr", 1e-5, 1e-3, log=True)}
               if estimator == "analytic" else {}),
            "algo_params.proximal.n_epochs": trial.suggest_categorical("n_epochs", [5, 10, 20]),
            "algo_params.proximal.clip_range": trial.suggest_categorical("clip_range", [0.1, 0.2, 0.3]),
            "algo_params.proximal.gae_lambda": trial.suggest_categorical("gae_lambda", [0.9, 0.95, 0.98]),
        }


class SAPOTrainer(APGTrainer):
    """The ``sapo`` entry point: APG's segment steps on the entropy-augmented objective, a learned
    temperature, twin critics trained on entropy-augmented TD(lambda) targets (``docs/apg.md``, "SAPO")."""

    name = "sapo"
    description = ("SAPO: maximum-entropy analytic policy gradients (entropy bonus in the segment returns and "
                   "critic targets, learned temperature, twin critics without a target network)")
    cli_flags = {"segment-length": "K, steps backpropagated per update (sets segment.length)"}
    ablation_grid = {"entropy.alpha_init": "0.01,0.1,1.0", "value.critics": "1,2"}
    config_class = SAPOConfig

    def checked_params(self, config: TrainConfig) -> APGConfig:
        """The bonus's ``log pi`` includes the tanh squash's Jacobian; a clipped Gaussian has no density."""
        if config.policy.squash != "tanh":
            raise ValueError(f"trainer 'sapo' needs policy.squash 'tanh' (its entropy bonus is the tanh-squashed "
                             f"Gaussian's log-density), got {config.policy.squash!r}")
        return super().checked_params(config)

    def suggest_hyperparams(self, trial: Any, env_id: str) -> dict[str, Any]:
        """``diffgym tune``'s search space: the number of envs, K, gamma and the initial temperature."""
        return {
            "num_envs": trial.suggest_categorical("num_envs", [4, 8, 16, 32, 64]),
            "algo_params.segment.length": trial.suggest_categorical("segment_length", [8, 16, 32, 64]),
            "algo_params.gamma": trial.suggest_categorical("gamma", [0.97, 0.99, 0.995]),
            "algo_params.entropy.alpha_init": trial.suggest_float("alpha_init", 1e-3, 1.0, log=True),
        }
