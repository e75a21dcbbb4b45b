"""DiffGym's Analytic Policy Gradient trainer plugin (``diffgym train --algo apg``).

Backpropagates returns through ``differentiable_step`` in segments whose tails are bootstrapped by
nothing, a Monte-Carlo value network, a TD(lambda) critic, or the value network of the optional
proximal (clipped-surrogate) path (``docs/apg.md``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from diffgym.training import TrainConfig

from diffgym_apg.losses import MonteCarloReturns, segment_actor_loss, td_lambda_targets
from diffgym_apg.train import BOOTSTRAP_MODES, APGParams, apg_update, train

__all__ = ["APGParams", "APGTrainer", "BOOTSTRAP_MODES", "MonteCarloReturns", "apg_update",
           "default_config", "segment_actor_loss", "td_lambda_targets", "train"]


def default_config(env_id: str) -> dict[str, Any]:
    """Per-task defaults from ``hyperparams/apg.yml`` (the ``default`` entry for unlisted tasks), with
    every :class:`APGParams` field filled in so ``--print-config`` shows them all."""
    table = yaml.safe_load(files("diffgym_apg").joinpath("hyperparams", "apg.yml").read_text())
    entry = dict(table.get(env_id, table["default"]))
    entry["algo_params"] = APGParams(**entry.get("algo_params", {})).__dict__.copy()
    return entry


class APGTrainer:
    """The ``apg`` entry point of the ``diffgym.trainers`` group."""

    name = "apg"
    description = ("Analytic Policy Gradients: segmented backpropagation through the simulator (none/mc/critic/value "
                   "bootstrap), optionally with a proximal likelihood-ratio path")
    cli_flags = {
        "segment-length": "K, steps backpropagated per update, or 'adaptive' (same as --param segment_length=K)",
        "bootstrap": "segment tail: none, mc, critic or value (value: needs proximal_value_fit; same as --param bootstrap=MODE)",
        "estimator": "policy gradient: analytic, likelihood, hybrid or proximal (same as --param estimator=NAME)",
    }
    ablation_grid = {"segment_length": "4,8,16,32,64,full", "bootstrap": "none,mc,critic"}

    def default_config(self, env_id: str) -> dict[str, Any]:
        return default_config(env_id)

    def suggest_hyperparams(self, trial: Any, env_id: str) -> dict[str, Any]:
        """``diffgym tune``'s search space: APG's own settings and the number of envs as dotted
        overrides (the shared policy, normalizer and optimizer specs are not searched)."""
        segment = trial.suggest_categorical("segment_length", ["8", "16", "32", "64", "adaptive"])
        return {
            "num_envs": trial.suggest_categorical("num_envs", [4, 8, 16, 32, 64, 128]),
            "algo_params.segment_length": segment if segment == "adaptive" else int(segment),
            "algo_params.bootstrap": trial.suggest_categorical("bootstrap", ["none", "mc", "critic"]),  # value: proximal only
            "algo_params.estimator": trial.suggest_categorical("estimator", ["analytic", "hybrid"]),
            "algo_params.gamma": trial.suggest_categorical("gamma", [0.97, 0.99, 0.995]),
        }

    def train(self, config: TrainConfig, progress: bool = True) -> Path:
        return train(config, progress=progress)
