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

Nothing here unpickles: checkpoints are read weights-only (tensors and plain data; a file that needs
more is refused; ``legacy=True`` reads older checkpoints' NumPy data, still running nothing), and :func:`save_policy` writes the shareable form, a
``.safetensors`` file of the policy's tensors with its config as JSON metadata, which
:func:`load_policy` reads back.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffgym.training.networks import ActorCritic
from diffgym.training.normalization import ObservationNormalizer
from diffgym.training.run import UnsafeCheckpointError, list_checkpoints, load_checkpoint, one_line
from diffgym.training.spec import TrainConfig

_REQUIRED_KEYS = ("actor_critic", "normalizer", "config", "env_steps")
SHAREABLE_SUFFIX = ".safetensors"
"""The extension of the shareable policy file (:func:`save_policy`)."""
_SHAREABLE_FORMAT = "diffgym.policy/1"
"""The ``format`` entry of a shareable policy file's metadata; another version is refused, not guessed at."""
_LEGACY_ADVICE = ("; a checkpoint saved before checkpoints became weights-only (e.g. an older PPO run) is read "
                  "with legacy=True (diffgym eval/export: --legacy-checkpoint), which runs nothing from it")


class NotAPolicyFile(ValueError):
    """A file that training or ``diffgym export`` writes but no policy can be loaded from
    (:func:`foreign_policy_file`); ``kind`` says what it is."""

    def __init__(self, path: Path, kind: str):
        super().__init__(f"{path} is {kind}; load_policy takes a run directory, a checkpoint .pt or a "
                         f"{SHAREABLE_SUFFIX} policy")
        self.path, self.kind = path, kind


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
                deterministic: bool = False) -> tuple[np.ndarray, None]:
        """SB3's ``predict``: NumPy observation(s) in, ``(actions, None)`` out (float32, same batch shape).
        As in SB3, actions are sampled unless ``deterministic=True`` (the policy's mean, what evaluations use)."""
        obs = np.asarray(observation, dtype=np.float32)
        if obs.shape[-1:] != (self.model.obs_dim,) or obs.ndim not in (1, 2):
            raise ValueError(f"observation must have shape ({self.model.obs_dim},) or (B, {self.model.obs_dim}), "
                             f"got {obs.shape}")
        with torch.no_grad():
            action = self.act(torch.as_tensor(obs, device=self.device), deterministic=deterministic)
        return action.cpu().numpy(), None

    def extra_repr(self) -> str:
        return f"env_id={self.config.env_id!r}, algo={self.config.algo!r}, env_steps={self.env_steps}"


RUN_FILES = {"config.yaml": "a run's config", "metrics.jsonl": "a run's log of evaluations",
             "vec_normalize.pkl": "Stable-Baselines3's VecNormalize statistics (a pickle)"}
"""The files of a run directory, beside its checkpoints, that hold no policy (by name)."""


def foreign_policy_file(path: str | Path) -> str | None:
    """What the file ``path`` is, when it is one that training or ``diffgym export`` writes but no policy
    can be loaded from: a run's other files (:data:`RUN_FILES`, TensorBoard's event files), an ONNX export
    (told by its extension: ONNX has no signature), a TorchScript export or Stable-Baselines3's model zip
    (told by the names inside the zip; nothing in it is read). ``None`` for any other file."""
    path = Path(path)
    if path.name in RUN_FILES:
        return RUN_FILES[path.name]
    if path.name.startswith("events.out.tfevents."):
        return "a TensorBoard event file (view it with tensorboard --logdir)"
    if path.suffix.lower() == ".onnx":
        return "an ONNX export (run it with onnxruntime)"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):  # not a zip (nor a readable file): for the loader to judge
        return None
    if "_stable_baselines3_version" in names:
        return "Stable-Baselines3's model zip (load it with stable_baselines3.PPO.load)"
    if any(name.split("/")[1:2] == ["code"] for name in names):  # TorchScript's code; torch.save has none
        return "a TorchScript export (load it with torch.jit.load)"
    return None


def load_policy(path: str | Path, device: str | torch.device = "cpu", step: int | None = None,
                legacy: bool = False) -> Policy:
    """The policy saved in a run directory (its latest valid checkpoint, or the one at ``step`` env
    steps), in one checkpoint file, or in a shareable ``.safetensors`` policy file (:func:`save_policy`).

    Checkpoints are read weights-only: a file that would need unpickling (which can run code from it)
    raises :class:`~diffgym.training.run.UnsafeCheckpointError`, a ``ValueError``, whose one line names
    the file. ``legacy=True`` reads checkpoints saved before they became weights-only, still without
    running anything from them (:func:`diffgym.training.run.load_checkpoint`).

    Raises ``FileNotFoundError`` for a path that is not a run or has no such checkpoint, and
    ``ValueError`` for a file that is not a readable checkpoint or policy, or a checkpoint that lacks the
    shared keys or belongs to another task than the run.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: expected a run directory, a checkpoint file or a "
                                f"{SHAREABLE_SUFFIX} policy")
    if path.is_file():
        foreign = foreign_policy_file(path)
        if foreign:  # said before torch.load, whose error about such a file says nothing of what it is
            raise NotAPolicyFile(path, foreign)
        if step is not None:
            raise ValueError(f"step={step} selects a checkpoint of a run directory; {path} is one file")
        if path.suffix == SHAREABLE_SUFFIX:
            return _load_shareable(path, device)
        return _load_checkpoint(path, device, expected=None, legacy=legacy)
    if not (path / "config.yaml").exists():
        raise FileNotFoundError(f"{path} is not a run directory: it has no config.yaml")
    run_config = TrainConfig.load(path / "config.yaml")
    found = list_checkpoints(path)
    if step is not None:
        chosen = [p for s, p in found if s == int(step)]
        if not chosen:
            steps = ", ".join(str(s) for s, _ in found) or "none"
            raise FileNotFoundError(f"{path} has no checkpoint at {step} env steps (it has: {steps})")
        return _load_checkpoint(chosen[0], device, run_config, legacy)
    if not found:
        raise FileNotFoundError(f"{path} has no checkpoints/step_*.pt")
    errors = []
    for _, candidate in reversed(found):  # the latest one that loads; a truncated file falls back
        try:
            policy = _load_checkpoint(candidate, device, run_config, legacy)
        except (TaskMismatchError, UnsafeCheckpointError):
            raise  # not damage: an earlier checkpoint would hide what is wrong with the run
        except ValueError as error:
            errors.append(str(error))
            continue
        if errors:
            warnings.warn(f"skipped unreadable checkpoint(s) in {path}: {'; '.join(errors)}", stacklevel=2)
        return policy
    raise ValueError(f"no checkpoint in {path} could be loaded: {'; '.join(errors)}")


def save_policy(policy: Policy, path: str | Path) -> Path:
    """Write ``policy`` as a shareable ``.safetensors`` file: the actor-critic's and normalizer's tensors
    (``actor_critic.<name>``, ``normalizer.<name>``) and, as JSON metadata, its training config (without
    the maker's ``run_dir``) and env steps. Loading it (:func:`load_policy`, ``diffgym eval``) reads
    tensors and JSON only, so it is safe to pass around. Returns the path."""
    safetensors = _safetensors()
    path = Path(path)
    if path.suffix != SHAREABLE_SUFFIX:
        raise ValueError(f"a shareable policy file ends in {SHAREABLE_SUFFIX}, got {path}")
    tensors = {f"{part}.{name}": tensor.detach().cpu().contiguous().clone()  # clone: no shared storage
               for part, module in (("actor_critic", policy.model), ("normalizer", policy.normalizer))
               for name, tensor in module.state_dict().items()}
    metadata = {"format": _SHAREABLE_FORMAT, "env_steps": str(policy.env_steps),
                "config": json.dumps(policy.config.replace(run_dir=None).to_dict())}
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def _load_shareable(path: Path, device: str | torch.device) -> Policy:
    safetensors = _safetensors()
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors' own error types for a damaged header or data
        raise ValueError(f"{path}: not a readable {SHAREABLE_SUFFIX} file ({one_line(error)})") from None
    if metadata.get("format") != _SHAREABLE_FORMAT:
        raise ValueError(f"{path}: not a DiffGym policy file (metadata format {metadata.get('format')!r}, "
                         f"expected {_SHAREABLE_FORMAT!r}); write one with diffgym export --out FILE{SHAREABLE_SUFFIX}")
    parts: dict[str, dict[str, torch.Tensor]] = {"actor_critic": {}, "normalizer": {}}
    for name, tensor in tensors.items():
        part, _, key = name.partition(".")
        if part not in parts:
            raise ValueError(f"{path}: unexpected tensor {name!r} (a DiffGym policy holds actor_critic.* and "
                             "normalizer.* only)")
        parts[part][key] = tensor
    try:
        config = TrainConfig.from_dict(json.loads(metadata.get("config", "")))
        env_steps = int(metadata.get("env_steps", ""))
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: unreadable policy metadata ({one_line(error)})") from None
    return _build_policy(parts["actor_critic"], parts["normalizer"], config, env_steps, path, device)


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as error:  # the optional extra
        raise ImportError(f"{SHAREABLE_SUFFIX} policies need safetensors (pip install 'diffgym[export]', "
                          "installed by make)") from error
    return safetensors


def _load_checkpoint(path: Path, device: str | torch.device, expected: TrainConfig | None,
                     legacy: bool = False) -> Policy:
    try:
        saved = load_checkpoint(path, device, legacy, advice=_LEGACY_ADVICE)
    except UnsafeCheckpointError:
        raise
    except Exception as error:  # truncated, not a torch file, a TorchScript module, ...: whatever torch raises
        raise ValueError(f"{path}: not a readable checkpoint ({type(error).__name__}: {one_line(error)})") from None
    if not isinstance(saved, dict) or any(k not in saved for k in _REQUIRED_KEYS):
        have = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"{path} is not a DiffGym checkpoint: it needs the keys {list(_REQUIRED_KEYS)}, has {have}")
    config = TrainConfig.from_dict(saved["config"])
    if expected is not None and config.env_id != expected.env_id:
        raise TaskMismatchError(f"{path} was trained on task {config.env_id}, but its run directory is for "
                                f"{expected.env_id}")
    return _build_policy(saved["actor_critic"], saved["normalizer"], config, int(saved["env_steps"]), path, device)


def _build_policy(weights: dict[str, torch.Tensor], normalizer_state: dict[str, torch.Tensor], config: TrainConfig,
                  env_steps: int, path: Path, device: str | torch.device) -> Policy:
    try:
        obs_dim, act_dim = int(weights["actor.0.weight"].shape[1]), int(weights["log_std"].shape[0])
        model = ActorCritic(obs_dim, act_dim, config.policy).to(device)
        model.load_state_dict(weights)
        normalizer = ObservationNormalizer(obs_dim, config.normalizer).to(device)
        normalizer.load_state_dict(normalizer_state)
    except (KeyError, RuntimeError) as error:  # missing or misshapen tensors for the config's architecture
        raise ValueError(f"{path}: its weights do not fit its config's policy ({one_line(error)})") from None
    return Policy(model, normalizer, config, env_steps, path).eval()
