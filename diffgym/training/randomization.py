"""Domain randomization of a task's physical parameters, written once for every trainer and the evaluator.

A config's ``randomize`` (training envs) and ``eval_randomize`` (evaluation envs) map names in the task's
``physical_params`` to ``[low, high]`` ranges. A :class:`PhysicsRandomizer` holds one value per env and
parameter, drawn uniformly from its range at the start of every episode of that env (the first reset and
every restart or autoreset, :meth:`PhysicsRandomizer.draw` with the restarted envs' mask), from a NumPy
generator seeded from the run's seed on a stream of its own, so the same seed and the same episode ends
draw the same values (the first draw, every env's, depends on the seed alone) and the draws leave the
reset seeds' generators alone. Its :meth:`~PhysicsRandomizer.state_dict` (generator and current values)
goes into checkpoints, so a resumed run draws what the uninterrupted one would.

Who applies the values: :class:`~diffgym.training.rollout.EnvBatch` passes them to
``differentiable_step(..., physics=...)`` (APG), the PPO adapter sets them in the native vector env after
each autoreset, and :func:`~diffgym.training.evaluation.evaluate_config` through the evaluation envs'
reset options (``docs/protocol.md``, "Domain randomization").
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

RANDOMIZATION_STREAM = 0xD0_3A1
"""The spawn key of the draws' NumPy stream: a run's physics draws and its reset seeds (drawn from the
same base seed, ``EnvBatch``) come from independent generators."""


def normalized_ranges(ranges: Any, key: str) -> dict[str, list[float]]:
    """``ranges`` (config field ``key``) as ``{name: [low, high]}`` of finite floats with ``low <= high``;
    a one-line ``ValueError`` naming what was expected otherwise. Checks the form only: which names and
    values a task takes is :func:`check_ranges`'s."""
    if not isinstance(ranges, Mapping):
        raise ValueError(f"{key} must be a mapping of physical parameter -> [low, high], got {ranges!r}")
    out: dict[str, list[float]] = {}
    for name, bounds in ranges.items():
        expected = f"{key}.{name} must be [low, high] (two finite numbers, low <= high), got {bounds!r}"
        if not isinstance(bounds, (list, tuple)) or len(bounds) != 2 \
                or any(isinstance(b, bool) or not isinstance(b, (int, float)) for b in bounds):
            raise ValueError(expected)
        low, high = float(bounds[0]), float(bounds[1])
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(expected)
        if low > high:
            raise ValueError(f"{key}.{name}: low {low:g} > high {high:g}; expected [low, high] with low <= high")
        out[str(name)] = [low, high]
    return out


def task_sim_class(env_id: str) -> Any:
    """The simulator class of a registered DiffGym task (``sim_class`` of its env), or ``None`` for a
    task that has none (then it has no physical parameters either)."""
    from gymnasium.envs.registration import load_env_creator

    from diffgym.core.registration import task_spec

    entry_point = task_spec(env_id).entry_point
    creator = load_env_creator(entry_point) if isinstance(entry_point, str) else entry_point
    return getattr(creator, "sim_class", None)


def check_ranges(ranges: Mapping[str, Sequence[float]], sim: Any, task: str, key: str
                 ) -> dict[str, tuple[float, float]]:
    """``ranges`` checked against the task's simulator ``sim`` (class or instance): every name one of its
    ``physical_params``, every range inside its ``physics_bounds``. Returns them in ``physical_params``
    order (so the draws do not depend on the order the config lists them in); a one-line ``ValueError``
    naming the task ``task`` and where the ranges come from otherwise: ``key`` is a config field
    (``randomize``, a range said as ``randomize.mass``) or a command-line option (``--vary``, a range said
    as ``--vary mass``)."""
    checked = normalized_ranges(ranges, key)
    separator = " " if key.startswith("--") else "."
    params = tuple(getattr(sim, "physical_params", ()) or ())
    if checked and not params:
        raise ValueError(f"{key} names {sorted(checked)}, but {task} has no physical parameters to randomize")
    unknown = [name for name in checked if name not in params]
    if unknown:
        raise ValueError(f"{key} names {unknown}, not physical parameters of {task}; its parameters: "
                         f"{', '.join(params)}")
    bounds = getattr(sim, "physics_bounds", {}) or {}
    for name, (low, high) in checked.items():
        valid_low, valid_high = bounds.get(name, (-math.inf, math.inf))
        if low < valid_low or high > valid_high:
            raise ValueError(f"{key}{separator}{name} = [{low:g}, {high:g}] leaves {task}'s valid range of {name}, "
                             f"[{valid_low:g}, {valid_high:g}]")
    return {name: (checked[name][0], checked[name][1]) for name in params if name in checked}


def check_config_ranges(config: Any) -> None:
    """A one-line ``ValueError`` if ``config.randomize`` or ``config.eval_randomize`` names something its
    task cannot draw (see :func:`check_ranges`): ``resolve_config`` and the trainers call it before any
    run starts."""
    for key in ("randomize", "eval_randomize"):
        ranges = getattr(config, key)
        if ranges:
            check_ranges(ranges, task_sim_class(config.env_id), config.env_id, key)


def check_generator_state(generator: np.random.Generator, state: Any, name: str) -> None:
    """A one-line ``ValueError`` (naming ``name``) unless ``state`` can be set on ``generator``'s bit
    generator; checked on a throwaway one of its kind, so ``generator`` is left as it was."""
    kind = type(generator.bit_generator)
    try:
        kind().state = state
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"{name} state is not a {kind.__name__} state: {error}") from None


def _float32_inside(low: float, high: float) -> tuple[np.float32, np.float32]:
    """The float32 bounds nearest to ``[low, high]`` that lie inside it, so a float64 draw rounded to
    float32 never leaves the range (and with it the task's valid domain)."""
    lo, hi = np.float32(low), np.float32(high)
    if float(lo) < low:
        lo = np.nextafter(lo, np.float32(np.inf))
    if float(hi) > high:
        hi = np.nextafter(hi, np.float32(-np.inf))
    if lo > hi:  # a degenerate range between two float32 values: its nearest one
        lo = hi = np.float32(low)
    return lo, hi


class PhysicsRandomizer:
    """Per-env physical parameters drawn uniformly from ranges at each episode start, reproducibly.

    ``values`` maps each randomized name to a ``(num_envs,)`` float32 tensor on ``device``: the values the
    envs' current episodes use. :meth:`draw` replaces them with new tensors (never in place: a step that
    read the old ones may still be in an autograd graph)."""

    def __init__(self, ranges: Mapping[str, Sequence[float]], sim: Any, num_envs: int, seed: int,
                 device: torch.device | str = "cpu", task: str | None = None, key: str = "randomize"):
        """``sim``: the task's simulator (class or instance), whose ``physical_params`` and
        ``physics_bounds`` the ranges are checked against (``task`` names it in errors; ``key`` is the
        config field). ``seed``: the base seed the generator's stream is spawned from."""
        self.ranges = check_ranges(ranges, sim, task or type(sim).__name__, key)
        self.num_envs, self.device = int(num_envs), torch.device(device)
        self.generator = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(RANDOMIZATION_STREAM,)))
        self._limits = {name: _float32_inside(low, high) for name, (low, high) in self.ranges.items()}
        self.values: dict[str, torch.Tensor] = {}
        self.draws = 0
        """How many episode starts have drawn values so far (summed over envs)."""

    def draw(self, mask: torch.Tensor | np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """New values for the envs where ``mask`` is true (every env without one, as at the first reset),
        the others' kept (the first draw is every env's, whatever the mask); returns :attr:`values`. Draws go
        env by env in index order, each env's parameters in ``physical_params`` order, so they depend on the
        seed and the sequence of masks only."""
        if mask is None or not self.values:
            chosen = np.ones(self.num_envs, dtype=bool)
        else:
            chosen = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
            chosen = chosen.astype(bool, copy=False).reshape(self.num_envs)
        count = int(chosen.sum())
        if count == 0:
            return self.values
        samples = self.generator.uniform(size=(count, len(self.ranges)))
        index = torch.as_tensor(np.flatnonzero(chosen), device=self.device)
        values = {}
        for column, (name, (low, high)) in enumerate(self.ranges.items()):
            lo, hi = self._limits[name]
            drawn = np.clip((low + (high - low) * samples[:, column]).astype(np.float32), lo, hi)
            current = self.values.get(name)
            fresh = torch.empty(self.num_envs, dtype=torch.float32, device=self.device) if current is None \
                else current.clone()
            fresh[index] = torch.as_tensor(drawn, device=self.device)
            values[name] = fresh
        self.values = values
        self.draws += count
        return self.values

    @staticmethod
    def summary_of(randomizer: "PhysicsRandomizer | None") -> dict[str, float]:
        """What a run logs of its envs' current physics with its evaluations (``physics/<name>_mean``,
        ``_min``, ``_max``); empty without randomization (``randomizer`` None)."""
        return {} if randomizer is None else randomizer.summary("physics")

    def summary(self, prefix: str) -> dict[str, float]:
        """``{prefix/<name>_mean, _min, _max}`` over the envs' current values (what a run logs)."""
        out: dict[str, float] = {}
        for name, value in self.values.items():
            out.update({f"{prefix}/{name}_mean": float(value.mean()), f"{prefix}/{name}_min": float(value.min()),
                        f"{prefix}/{name}_max": float(value.max())})
        return out

    def state_dict(self) -> dict[str, Any]:
        """The generator's state, the current values and the draw count: plain data and tensors (copies),
        so a weights-only checkpoint holds them."""
        return {"generator": self.generator.bit_generator.state, "draws": self.draws,
                "values": {name: value.detach().cpu().clone() for name, value in self.values.items()}}

    def check_state_dict(self, saved: Any) -> None:
        """A one-line ``ValueError`` unless ``saved`` is a :meth:`state_dict` this randomizer can load:
        the same names, ``(num_envs,)`` values inside their ranges, a state of its generator. Changes
        nothing, so a caller loading more than the randomizer checks everything before it loads anything."""
        if not isinstance(saved, Mapping) or not {"generator", "draws", "values"} <= set(saved):
            raise ValueError("the saved domain randomization lacks generator, draws or values; expected what "
                             "PhysicsRandomizer.state_dict() returns")
        values, draws = saved["values"], saved["draws"]
        if not isinstance(values, Mapping) or set(values) != set(self.ranges):
            drawn = sorted(values) if isinstance(values, Mapping) else repr(values)
            raise ValueError(f"the saved domain randomization draws {drawn}, this run {sorted(self.ranges)}")
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 0:
            raise ValueError(f"the saved domain randomization's draws must be a whole number >= 0, got {draws!r}")
        for name, value in values.items():
            lo, hi = self._limits[name]
            if not isinstance(value, torch.Tensor) or value.shape != (self.num_envs,) \
                    or not bool(((value >= float(lo)) & (value <= float(hi))).all()):
                raise ValueError(f"saved values of {name} must be a tensor of shape ({self.num_envs},) inside "
                                 f"[{lo:g}, {hi:g}]")
        check_generator_state(self.generator, saved["generator"], "the saved domain randomization's generator")

    def check_saved_envs(self, saved_envs: Mapping[str, Any]) -> Mapping[str, Any]:
        """The randomization in a saved envs' state (its ``physics`` entry, as ``EnvBatch`` and PPO's
        adapter save it), checked (:meth:`check_state_dict`); a one-line ``ValueError`` if it has none, a
        run that randomizes cannot resume from envs that did not. Changes nothing."""
        if "physics" not in saved_envs:
            raise ValueError("the saved envs hold no domain randomization, but this run randomizes "
                             f"{sorted(self.ranges)}")
        self.check_state_dict(saved_envs["physics"])
        return saved_envs["physics"]

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Back to where :meth:`state_dict` found the randomizer (checked before anything changes)."""
        self.check_state_dict(saved)
        values = saved["values"]
        self.generator.bit_generator.state = saved["generator"]
        self.draws = int(saved["draws"])
        self.values = {name: values[name].to(device=self.device, dtype=torch.float32).clone() for name in self.ranges}
