"""Use a trained policy: load it from any trainer's run directory, act with it, evaluate, export.

Every trainer's checkpoints hold the shared keys ``actor_critic``, ``normalizer``, ``config``,
``env_steps`` and ``grad_steps`` (``docs/plugins.md``), so one loader serves APG, PPO and third-party
trainers alike::

    policy = diffgym.load_policy("runs/apg__PointMass1D__s0__...")
    action, _ = policy.predict(obs, deterministic=True)      # NumPy in, NumPy out (SB3's signature)
    action = policy.act(obs_tensor)                          # torch, differentiable (fine-tuning)

The policy is the shared :class:`~diffgym.training.ActorCritic` behind its
:class:`~diffgym.training.ObservationNormalizer`: ``squash(actor(normalize(obs)))`` when deterministic,
a squashed Gaussian sample otherwise.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffgym.training.networks import ActorCritic
from diffgym.training.normalization import ObservationNormalizer
from diffgym.training.run import list_checkpoints
from diffgym.training.spec import TrainConfig

_REQUIRED_KEYS = ("actor_critic", "normalizer", "config", "env_steps")


class TaskMismatchError(ValueError):
    """A checkpoint trained on another task than the run directory it lies in."""


class Policy(nn.Module):
    """A trained policy: normalizer + actor (+ the critic, for fine-tuning), with its training config."""

    def __init__(self, model: ActorCritic, normalizer: ObservationNormalizer, config: TrainConfig,
                 env_steps: int = 0, checkpoint: Path | None = None):
        super().__init__()
        self.model, self.normalizer = model, normalizer
        self.config, self.env_steps, self.checkpoint = config, int(env_steps), checkpoint

    @property
    def device(self) -> torch.device:
        return self.model.log_std.device

    def act(self, obs: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """Actions in [-1, 1] for a batch of observations ``(B, obs_dim)`` (or one ``(obs_dim,)``);
        differentiable in ``obs`` and the parameters."""
        return self.model.act(self.normalizer(obs), deterministic=deterministic)

    forward = act

    def predict(self, observation: Any, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> tuple[np.ndarray, None]:
        """SB3's ``predict``: NumPy observation(s) in, ``(actions, None)`` out (float32, same batch shape)."""
        obs = np.asarray(observation, dtype=np.float32)
        if obs.shape[-1:] != (self.model.obs_dim,) or obs.ndim not in (1, 2):
            raise ValueError(f"observation must have shape ({self.model.obs_dim},) or (B, {self.model.obs_dim}), "
                             f"got {obs.shape}")
        with torch.no_grad():
            action = self.act(torch.as_tensor(obs, device=self.device), deterministic=deterministic)
        return action.cpu().numpy(), None

    def extra_repr(self) -> str:
        return f"env_id={self.config.env_id!r}, algo={self.config.algo!r}, env_steps={self.env_steps}"


def load_policy(path: str | Path, device: str | torch.device = "cpu", step: int | None = None) -> Policy:
    """The policy saved in a run directory (its latest valid checkpoint, or the one at ``step`` env
    steps) or in one checkpoint file. Checkpoints are pickles: load only runs you trust.

    Raises ``FileNotFoundError`` for a path that is not a run or has no such checkpoint, and
    ``ValueError`` for a checkpoint that lacks the shared keys or belongs to another task than the run.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: expected a run directory or a checkpoint file")
    if path.is_file():
        if step is not None:
            raise ValueError(f"step={step} selects a checkpoint of a run directory; {path} is one checkpoint file")
        return _load_checkpoint(path, device, expected=None)
    if not (path / "config.yaml").exists():
        raise FileNotFoundError(f"{path} is not a run directory: it has no config.yaml")
    run_config = TrainConfig.load(path / "config.yaml")
    found = list_checkpoints(path)
    if step is not None:
        chosen = [p for s, p in found if s == int(step)]
        if not chosen:
            steps = ", ".join(str(s) for s, _ in found) or "none"
            raise FileNotFoundError(f"{path} has no checkpoint at {step} env steps (it has: {steps})")
        return _load_checkpoint(chosen[0], device, run_config)
    if not found:
        raise FileNotFoundError(f"{path} has no checkpoints/step_*.pt")
    errors = []
    for _, candidate in reversed(found):  # the latest one that loads; a truncated file falls back
        try:
            policy = _load_checkpoint(candidate, device, run_config)
        except TaskMismatchError:
            raise
        except (OSError, RuntimeError, EOFError, ValueError, KeyError) as error:
            errors.append(f"{candidate.name}: {type(error).__name__}: {error}")
            continue
        if errors:
            warnings.warn(f"skipped unreadable checkpoint(s) in {path}: {'; '.join(errors)}", stacklevel=2)
        return policy
    raise ValueError(f"no checkpoint in {path} could be loaded: {'; '.join(errors)}")


def _load_checkpoint(path: Path, device: str | torch.device, expected: TrainConfig | None) -> Policy:
    saved = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(saved, dict) or any(k not in saved for k in _REQUIRED_KEYS):
        have = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"{path} is not a DiffGym checkpoint: it needs the keys {list(_REQUIRED_KEYS)}, has {have}")
    config = TrainConfig.from_dict(saved["config"])
    if expected is not None and config.env_id != expected.env_id:
        raise TaskMismatchError(f"{path} was trained on task {config.env_id}, but its run directory is for "
                                f"{expected.env_id}")
    weights = saved["actor_critic"]
    obs_dim, act_dim = int(weights["actor.0.weight"].shape[1]), int(weights["log_std"].shape[0])
    model = ActorCritic(obs_dim, act_dim, config.policy).to(device)
    model.load_state_dict(weights)
    normalizer = ObservationNormalizer(obs_dim, config.normalizer).to(device)
    normalizer.load_state_dict(saved["normalizer"])
    return Policy(model, normalizer, config, int(saved["env_steps"]), path).eval()
