"""What ``diffgym eval`` and ``diffgym export`` do with a trained policy (the commands themselves, their
arguments and messages, are ``diffgym.commands.evaluate`` and ``diffgym.commands.export``).

``diffgym eval RUN_DIR`` scores the run's policy twice with the shared ``evaluate_policy``, under the run's
evaluation protocol (its ``wrappers`` and ``eval_randomize``, :func:`evaluate`): on the run's own
evaluation seeds (reproducing its last evaluation row when the checkpoint is the final one) and on fresh
seeds the run never used; ``--video FILE`` records a few episodes (``.mp4`` or ``.gif``).
``diffgym export RUN_DIR --out FILE`` writes, by FILE's extension, a self-contained module (normalizer +
actor + squash, deterministic) that maps observations ``(B, obs_dim)`` to actions, as TorchScript
(``.pt``) or ONNX (``.onnx``), or the shareable policy file (``.safetensors``: tensors and config only,
read back by ``diffgym.load_policy`` and ``diffgym eval``). Both commands load checkpoints weights-only;
``--legacy-checkpoint`` reads older checkpoints too, still running nothing from them. An exported module
is the policy alone: a run's ``wrappers`` (action delay, observation noise) belong to the env it acts in.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffgym.policy import SHAREABLE_SUFFIX, Policy, save_policy

EXPORT_SUFFIXES = {"torchscript": ".pt", "onnx": ".onnx", "safetensors": SHAREABLE_SUFFIX}
"""Export format -> the file extension that names it (``diffgym export`` infers the format from it)."""

def _task_arguments(policy: Policy, env_id: str | None) -> dict[str, Any]:
    """The task arguments the policy was trained with (``TrainConfig.env_kwargs``), when it is run on
    its own task; another task gets its defaults."""
    return dict(policy.config.env_kwargs) if env_id in (None, policy.config.env_id) else {}


def check_policy_fits(policy: Policy, env_id: str) -> None:
    """A one-line ``ValueError`` unless ``policy`` can act in task ``env_id``: a registered task whose
    flat observation and action have the sizes the policy was trained with."""
    import gymnasium as gym

    from diffgym.plugins import check_task

    check_task(env_id)
    env = gym.make(env_id, device="cpu", disable_env_checker=True)
    observation, action = env.observation_space.shape, env.action_space.shape
    env.close()
    sizes = tuple(None if shape is None else int(np.prod(shape)) for shape in (observation, action))
    if sizes != (policy.model.obs_dim, policy.model.act_dim):
        has = "a Dict observation" if observation is None else f"observations of size {sizes[0]}"
        raise ValueError(f"the policy was trained on {policy.config.env_id} (observations of size "
                         f"{policy.model.obs_dim}, actions of size {policy.model.act_dim}); {env_id} has {has} "
                         f"and actions of size {sizes[1]}")


def check_protocol_fits(policy: Policy, env_id: str | None = None, nominal: bool = False) -> None:
    """A one-line ``ValueError`` unless the run's ``eval_randomize`` (when not ``nominal``) can be drawn
    on task ``env_id`` (default: its own): a physical parameter of that task, inside its bounds. (Its
    ``wrappers`` were checked when its config was read; they fit every Box-observation task.)"""
    from diffgym.training.randomization import check_ranges, task_sim_class

    config = policy.config
    if config.eval_randomize and not nominal:
        task = env_id or config.env_id
        try:
            check_ranges(config.eval_randomize, task_sim_class(task), task, "eval_randomize")
        except ValueError as error:
            raise ValueError(f"the run's {error}; evaluate at the nominal physics with --nominal") from None


def evaluate(policy: Policy, episodes: int, seed: int, env_id: str | None = None, deterministic: bool = True,
             physics: dict[str, float] | None = None, nominal: bool = False) -> dict[str, float]:
    """``evaluate_policy`` of ``policy`` under its run's evaluation protocol, plus a 95 % normal
    confidence interval of the mean return.

    The envs are always inside the run's ``wrappers`` (action delay, observation noise): they are the task
    the policy acts in. Their physical parameters: with ``physics`` (name -> one value for every env), those
    values, every other parameter at its nominal value (``diffgym robustness``: not the run's
    ``eval_randomize``); otherwise the run's ``eval_randomize`` drawn for these ``episodes`` envs from the
    evaluation seed ``seed`` exactly as the run's evaluations draw them (so the run's seed and
    ``eval_episodes`` reproduce its logged evaluation), their ``eval_physics/<name>_mean`` etc. in the
    result; with ``nominal``, or for a run without ``eval_randomize``, the task's nominal values."""
    from diffgym.training.evaluation import evaluate_policy, evaluation_physics

    def act(obs: np.ndarray) -> np.ndarray:
        return policy.predict(obs, deterministic=deterministic)[0]

    task = env_id or policy.config.env_id
    summary: dict[str, float] = {}
    if physics is None and not nominal:
        physics, summary = evaluation_physics(policy.config.eval_randomize, task, episodes, seed)
    result = evaluate_policy(act, task, episodes, seed, _task_arguments(policy, env_id), physics,
                             policy.config.wrappers)
    half = 1.96 * result["eval_return_std"] / math.sqrt(episodes)
    return {**result, "eval_return_ci_low": result["eval_return"] - half,
            "eval_return_ci_high": result["eval_return"] + half, **summary}


def record_video(policy: Policy, path: str | Path, episodes: int = 2, seed: int = 0, env_id: str | None = None,
                 deterministic: bool = True, fps: int | None = None, nominal: bool = False) -> Path:
    """Roll out the first ``episodes`` evaluation episodes of evaluation seed ``seed`` under the run's
    evaluation protocol, as :func:`evaluate` does (the run's ``wrappers``; its ``eval_randomize`` draws
    unless ``nominal``), with ``render_mode="rgb_array"``, and write their frames one episode after the other
    to ``path`` (``.mp4`` through imageio-ffmpeg, ``.gif`` through imageio). The episodes are those
    :func:`evaluate` scores first (same reset seeds and physics; the same observation noise too when
    ``episodes`` is as many as it scores, since the noise is drawn for all envs at once). Returns the path."""
    import gymnasium as gym

    try:
        import imageio.v2 as imageio
    except ImportError as error:  # the optional extra
        raise ImportError("recording needs imageio (pip install 'diffgym[video]', installed by make)") from error
    from diffgym.training.evaluation import eval_env_seed, evaluation_physics
    from diffgym.wrappers import wrap_vector_env

    task = env_id or policy.config.env_id
    physics = None if nominal else evaluation_physics(policy.config.eval_randomize, task, episodes, seed)[0]
    # a vector env, since the wrappers are vector wrappers: env i is evaluate_policy's env i of this seed
    venv = wrap_vector_env(gym.make_vec(task, num_envs=episodes, vectorization_mode="vector_entry_point",
                                        render_mode="rgb_array", **_task_arguments(policy, env_id)),
                           policy.config.wrappers)
    frames_of: list[list[Any]] = [[] for _ in range(episodes)]
    running = np.ones(episodes, dtype=bool)

    def keep_frames() -> None:
        for i, frame in enumerate(venv.render()):
            if running[i]:
                frames_of[i].append(frame)

    try:
        obs, _ = venv.reset(seed=eval_env_seed(seed), options={"physics": physics} if physics else None)
        keep_frames()
        while running.any():
            actions = policy.predict(obs, deterministic=deterministic)[0].reshape(venv.action_space.shape)
            obs, _, terminated, truncated, _ = venv.step(actions)
            keep_frames()  # an episode that just ended still shows its last state (NEXT_STEP autoreset)
            running &= ~(terminated | truncated)
        fps = fps or int(venv.metadata.get("render_fps") or 20)
    finally:
        venv.close()
    frames = [frame for episode in frames_of for frame in episode]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        imageio.mimsave(path, frames, duration=1000 / fps, loop=0)
    else:
        imageio.mimsave(path, frames, fps=fps, macro_block_size=1)
    return path


class ExportedPolicy(nn.Module):
    """``squash(actor(clip((obs - mean) / sqrt(var + eps), -clip, clip)))`` with everything as float32
    buffers and parameters: no DiffGym or training code needed to run it."""

    def __init__(self, policy: Policy):
        super().__init__()
        normalizer, model = policy.normalizer, policy.model
        self.normalize = bool(normalizer.spec.enabled)
        self.register_buffer("mean", normalizer.mean.detach().float().cpu().clone())
        self.register_buffer("std", torch.sqrt(normalizer.var + normalizer.spec.epsilon).detach().float().cpu().clone())
        self.clip = float(normalizer.spec.clip)
        self.tanh = model.spec.squash == "tanh"
        self.actor = _copy_module(model.actor).cpu().float().eval()

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs
        if self.normalize:
            x = ((obs - self.mean) / self.std).clamp(-self.clip, self.clip)
        u = self.actor(x)
        return torch.tanh(u) if self.tanh else u.clamp(-1.0, 1.0)


def _copy_module(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module).requires_grad_(False)


def export_format(path: str | Path, fmt: str | None = None) -> str:
    """The export format of ``path``: named by its extension (:data:`EXPORT_SUFFIXES`); ``fmt``, when
    given, must agree with it (a TorchScript file named ``.onnx`` fails only later, in onnxruntime)."""
    suffix = Path(path).suffix
    by_suffix = {ext: name for name, ext in EXPORT_SUFFIXES.items()}
    known = ", ".join(f"{ext} ({name})" for name, ext in EXPORT_SUFFIXES.items())
    if fmt is not None and fmt not in EXPORT_SUFFIXES:
        raise ValueError(f"format must be one of {', '.join(EXPORT_SUFFIXES)}, got {fmt!r}")
    if suffix not in by_suffix:
        expected = EXPORT_SUFFIXES[fmt] if fmt else f"one of {known}"
        raise ValueError(f"{path}: cannot tell the export format from its extension; expected {expected}")
    if fmt is not None and by_suffix[suffix] != fmt:
        raise ValueError(f"format {fmt} writes {EXPORT_SUFFIXES[fmt]} files, but the output is {path} "
                         f"({by_suffix[suffix]}); change the extension or drop the format")
    return by_suffix[suffix]


def default_export_path(source: str | Path, fmt: str, step: int | None = None) -> Path:
    """Where ``diffgym export`` writes without ``--out``: ``policy<ext>`` (``policy_step_<N><ext>`` for
    ``--step N``) inside a run directory; beside a file, under its name with the format's extension
    (``<name>_policy<ext>`` where that would be the file itself)."""
    source, suffix = Path(source), EXPORT_SUFFIXES[fmt]
    if source.is_dir():
        return source / (f"policy_step_{step}{suffix}" if step is not None else f"policy{suffix}")
    beside = source.with_suffix(suffix)
    return beside if beside != source else source.with_name(f"{source.stem}_policy{suffix}")


def export_policy(policy: Policy, path: str | Path, fmt: str | None = None) -> Path:
    """Write ``policy`` to ``path`` in the format its extension names (``fmt``, if given, must agree):
    a self-contained TorchScript (``.pt``) or ONNX (``.onnx``) module whose output for observations
    ``(B, obs_dim)`` float32 is ``policy.predict(obs, deterministic=True)``, or the shareable
    ``.safetensors`` policy of :func:`diffgym.policy.save_policy`."""
    fmt = export_format(path, fmt)
    if fmt == "safetensors":
        return save_policy(policy, path)
    module = ExportedPolicy(policy).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, policy.model.obs_dim)
    if fmt == "torchscript":
        torch.jit.script(module).save(str(path))
    elif fmt == "onnx":
        try:
            import onnxscript  # noqa: F401  (the exporter's dependency)
        except ImportError as error:
            raise ImportError("ONNX export needs onnx and onnxscript (pip install 'diffgym[export]', "
                              "installed by make)") from error
        with _quiet_onnx_exporter():
            program = torch.onnx.export(module, (example,), input_names=["obs"], output_names=["action"],
                                        dynamic_shapes={"obs": {0: torch.export.Dim("batch")}}, dynamo=True,
                                        verbose=False)
        program.save(str(path))
    return path


@contextlib.contextmanager
def _quiet_onnx_exporter() -> Iterator[None]:
    """Hide what torch's ONNX exporter says about itself, not about the policy: a line per torchvision
    operator it skips when torchvision is not installed (a policy uses none) and torch's own deprecation
    of ``LeafSpec``, which its exporter still uses. Everything else it says is still shown."""
    def not_torchvision(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")

    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    registration.addFilter(not_torchvision)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        registration.removeFilter(not_torchvision)
