"""The typed training configuration shared by every trainer (one doc line per field, CleanRL style).

A :class:`TrainConfig` fully describes a run: the algorithm, the task, the budget, and the three
shared specs (:class:`PolicySpec`, :class:`NormalizerSpec`, :class:`OptimizerSpec`) that every trainer
builds its actor-critic, observation normalizer and optimizer from, so that algorithms are compared on
identical models. It round-trips through YAML/JSON (``save`` / ``load``) and is saved with every run.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

ACTIVATIONS = ("tanh", "relu", "elu", "gelu", "silu")
"""Hidden-layer activations a :class:`PolicySpec` may name."""
SQUASHES = ("tanh", "clip")
"""How a Gaussian sample is mapped into the action box [-1, 1]."""
EVAL_SCHEDULES = ("linear", "geometric")
"""The evaluation schedules a :class:`TrainConfig` may name (``docs/protocol.md``)."""

T = TypeVar("T")


@dataclasses.dataclass
class PolicySpec:
    """Actor-critic architecture: two separate MLPs and a Gaussian policy with state-independent log-std."""

    hidden_sizes: tuple[int, ...] = (64, 64)
    """Widths of the hidden layers of both the actor and the critic MLP."""
    activation: str = "tanh"
    """Hidden-layer activation, one of ``ACTIVATIONS``."""
    log_std_init: float = -0.5
    """Initial log standard deviation of the pre-squash Gaussian (one learned value per action dim)."""
    squash: str = "tanh"
    """How actions are bounded: ``tanh`` of the Gaussian sample (smooth), or ``clip`` to [-1, 1]."""

    def __post_init__(self) -> None:
        self.hidden_sizes = tuple(int(h) for h in self.hidden_sizes)
        if not self.hidden_sizes or min(self.hidden_sizes) < 1:
            raise ValueError(f"hidden_sizes must be non-empty positive widths, got {self.hidden_sizes}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.squash not in SQUASHES:
            raise ValueError(f"squash must be one of {SQUASHES}, got {self.squash!r}")


@dataclasses.dataclass
class NormalizerSpec:
    """Running observation normalization: ``clip((obs - mean) / sqrt(var + epsilon), -clip, clip)``."""

    enabled: bool = True
    """Normalize observations with running statistics (off: observations pass through unchanged)."""
    clip: float = 10.0
    """Normalized observations are clipped to [-clip, clip]."""
    epsilon: float = 1e-8
    """Added to the running variance before the square root."""

    def __post_init__(self) -> None:
        if not self.clip > 0:  # NaN fails too
            raise ValueError(f"normalizer.clip must be > 0, got {self.clip}")
        if not self.epsilon >= 0:
            raise ValueError(f"normalizer.epsilon must be >= 0, got {self.epsilon}")


@dataclasses.dataclass
class OptimizerSpec:
    """Adam settings and the global gradient-norm clip shared by every trainer."""

    lr: float = 3e-4
    """Adam learning rate (constant)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's exponential decay rates for the first and second moment estimates."""
    eps: float = 1e-8
    """Adam's denominator epsilon."""
    max_grad_norm: float = 0.5
    """Gradients are rescaled so their global L2 norm is at most this (``inf`` or <= 0: no clipping)."""

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optimizer.betas must be two numbers in [0, 1), got {self.betas}")
        if not self.lr > 0:  # NaN fails too
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr}")
        if not self.eps >= 0:
            raise ValueError(f"optimizer.eps must be >= 0, got {self.eps}")


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines one training run; saved as ``config.yaml`` in the run directory."""

    algo: str
    """Trainer plugin name (entry point in the ``diffgym.trainers`` group), e.g. ``ppo`` or ``apg``."""
    env_id: str
    """Gymnasium id of the task, e.g. ``DiffGym/PointMass1D-v0``."""
    seed: int = 0
    """Seeds torch, the training envs (env ``i`` gets ``100000 * seed + i``, see
    ``diffgym.training.evaluation.train_env_seed``) and the evaluation envs."""
    num_envs: int = 64
    """Number of parallel envs in the native batched vector env."""
    total_env_steps: int = 1_000_000
    """Training budget in env transitions, summed over all parallel envs."""
    eval_every_env_steps: int = 50_000
    """Evaluate the deterministic policy every this many env steps (and once at the end); with the
    ``geometric`` schedule, the largest gap between two evaluations."""
    eval_schedule: str = "linear"
    """When to evaluate, one of ``EVAL_SCHEDULES`` (:meth:`next_evaluation`): ``linear``, at every multiple
    of ``eval_every_env_steps``; ``geometric``, dense early (from ``eval_first_env_steps``, each gap
    ``eval_growth`` times the last, up to ``eval_every_env_steps``). Both at env step 0 and at the budget."""
    eval_first_env_steps: int = 1_000
    """``geometric`` only: the first evaluation after env step 0 (at most ``eval_every_env_steps``)."""
    eval_growth: float = 1.25
    """``geometric`` only: each evaluation point is this factor past the previous one (> 1) until their
    gap reaches ``eval_every_env_steps``."""
    eval_episodes: int = 32
    """Episodes per evaluation, on held-out seeds (see ``diffgym.training.evaluation``)."""
    device: str = "cpu"
    """Torch/Warp device for the simulator and the networks: ``cpu`` or ``cuda[:N]``."""
    run_dir: str | None = None
    """Output directory; ``None`` picks ``runs/<algo>__<task>__s<seed>__<timestamp>``."""
    policy: PolicySpec = dataclasses.field(default_factory=PolicySpec)
    """Shared actor-critic architecture."""
    normalizer: NormalizerSpec = dataclasses.field(default_factory=NormalizerSpec)
    """Shared observation normalization."""
    optimizer: OptimizerSpec = dataclasses.field(default_factory=OptimizerSpec)
    """Shared optimizer settings."""
    algo_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Algorithm-specific hyperparameters (e.g. PPO's ``n_steps``, APG's ``segment_length``)."""
    env_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Task constructor arguments (the ``Arguments`` of its docs, e.g. TPush's ``contact_stiffness``)
    for every env the run makes, training and evaluation alike; see :meth:`env_options`."""
    randomize: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Domain randomization of the training envs: physical parameter -> ``[low, high]``, e.g.
    ``{"mass": [0.5, 2.0]}`` (``--set randomize.mass=[0.5,2]``). Each training env draws every listed
    parameter uniformly from its range at the start of each of its episodes, from a generator seeded by
    ``seed``; empty: the task's nominal values (``docs/protocol.md``, "Domain randomization")."""
    eval_randomize: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The same for the evaluation envs, drawn from the evaluation seed (the same values at every
    evaluation); empty: the evaluation runs at the nominal values, whatever ``randomize`` says."""
    wrappers: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Partial observability of every env the run makes, training and evaluation alike
    (``diffgym.wrappers``): ``action_delay: K`` (actions take effect K steps later) and
    ``observation_noise: STD`` (Gaussian noise on every observation), e.g. ``--set wrappers.action_delay=2``;
    empty: the task as it is."""
    keep_checkpoints: int = 4
    """Checkpoints kept besides those at the evaluations a report reads (the first to reach the success
    threshold and the best): the newest this many; older ones are deleted as new ones are saved
    (``Run.save_checkpoint``). 0 keeps every checkpoint."""

    def __post_init__(self) -> None:
        for name in ("policy", "normalizer", "optimizer"):  # accept plain mappings, e.g. from kwargs
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, from_dict(_FIELD_TYPES[name], value, f"{name}."))
        for name in ("num_envs", "total_env_steps", "eval_every_env_steps", "eval_episodes", "eval_first_env_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_schedule not in EVAL_SCHEDULES:
            raise ValueError(f"eval_schedule must be one of {EVAL_SCHEDULES}, got {self.eval_schedule!r}")
        if not 1.0 < float(self.eval_growth) < float("inf"):
            raise ValueError(f"eval_growth must be a number > 1, got {self.eval_growth}")
        if int(self.keep_checkpoints) < 0:
            raise ValueError(f"keep_checkpoints must be >= 0 (0 keeps every checkpoint), got {self.keep_checkpoints}")
        self.algo_params = dict(self.algo_params)
        import torch  # here, not at the top: the CLI and sweep drivers import this module and start fast

        try:
            device_type = torch.device(self.device).type
        except (RuntimeError, TypeError):
            device_type = None
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        from diffgym.training.randomization import normalized_ranges

        self.randomize = normalized_ranges(self.randomize, "randomize")
        self.eval_randomize = normalized_ranges(self.eval_randomize, "eval_randomize")
        if self.wrappers:  # imported only then: the wrappers import the simulator (Warp)
            from diffgym.wrappers import check_wrapper_options

            self.wrappers = check_wrapper_options(self.wrappers)
        self.env_kwargs = dict(self.env_kwargs)
        for reserved in ("device", "num_envs", "render_mode"):
            if reserved in self.env_kwargs:
                raise ValueError(f"env_kwargs may not set {reserved!r}: the run sets it "
                                 f"({'the device field' if reserved == 'device' else 'per env it makes'})")

    # ------------------------------------------------------------------------------ round trip
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of builtins (tuples become lists), ready for YAML or JSON."""
        return _to_builtin(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``, values are type-checked."""
        return from_dict(cls, data)

    def save(self, path: str | Path) -> None:
        """Write the config as YAML (``.yaml``/``.yml``) or JSON (``.json``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        if path.suffix == ".json":
            path.write_text(json.dumps(data, indent=2) + "\n")
        else:
            path.write_text(yaml.safe_dump(data, sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a config written by :meth:`save` (YAML or JSON, chosen by suffix)."""
        text = Path(path).read_text()
        data = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
        if data is None:
            raise ValueError(f"{path}: the file is empty (a config file holds a whole run's config)")
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a mapping of TrainConfig fields, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ValueError as error:
            if str(error).startswith("missing key(s)"):  # e.g. a file of a few settings, not a whole config
                raise ValueError(f"{error}: a config file holds a whole run's config, as `diffgym train ... "
                                 f"--print-config` prints it") from None
            raise

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with top-level fields changed (nested specs may be given as dicts)."""
        return self.from_dict({**self.to_dict(), **_to_builtin(changes)})

    def with_overrides(self, overrides: Mapping[str, Any]) -> TrainConfig:
        """A copy with dotted-key overrides applied, e.g. ``{"optimizer.lr": 1e-3, "algo_params.n_steps": 32,
        "env_kwargs.contact_stiffness": 2000.0, "randomize.mass": [0.5, 2.0]}``."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            *parents, leaf = dotted.split(".")
            node = data
            for key in parents:
                if not isinstance(node.get(key), dict):
                    raise ValueError(f"unknown config key {dotted!r}: {key!r} is not a section")
                node = node[key]
            # free-form: any key (a misnamed parameter of randomize is refused against the task)
            free_form = ("algo_params", "env_kwargs", "randomize", "eval_randomize", "wrappers")
            open_sections = tuple(data.get(key) for key in free_form)
            # the sections nested in algo_params are the trainer's to check (its check_config): their fields
            # may depend on another key (APG's policy_gradient takes the options of the estimator it names)
            in_algo_params = parents[:1] == ["algo_params"]
            if not any(node is section for section in open_sections) and not in_algo_params and leaf not in node:
                raise ValueError(unknown_keys_message([dotted], ".".join(parents) or "the config", sorted(node)))
            node[leaf] = _to_builtin(value)
        return self.from_dict(data)

    def env_options(self) -> dict[str, Any]:
        """Keyword arguments of every ``gym.make``/``gym.make_vec`` of this run: the device and
        :attr:`env_kwargs`. Trainers and the evaluator pass these, so a task argument set in the config
        holds for training and evaluation alike."""
        return {"device": self.device, **self.env_kwargs}

    def next_evaluation(self, env_steps: int) -> int:
        """The first point of the evaluation schedule after ``env_steps`` (``docs/protocol.md``); a trainer
        evaluates at the first vector step at or past it, and at the budget, which this does not cap.

        ``linear``: the next multiple of ``eval_every_env_steps``. ``geometric``: the points
        ``eval_first_env_steps`` (at most ``eval_every_env_steps``), then each ``eval_growth`` times the
        last (rounded to whole env steps, at least one apart), until a gap would reach
        ``eval_every_env_steps``; from there on every ``eval_every_env_steps``. So the geometric schedule is
        never sparser than the linear one with the same interval, and both depend on the config alone:
        a resumed run continues its schedule."""
        every = self.eval_every_env_steps
        if self.eval_schedule == "linear":
            return (env_steps // every + 1) * every
        point = min(self.eval_first_env_steps, every)
        while point <= env_steps:
            following = max(point + 1, round(point * self.eval_growth))
            if following - point >= every:  # the gaps have reached the interval: linear from this point on
                return point + ((env_steps - point) // every + 1) * every
            point = following
        return point

    def evaluation_points(self) -> list[int]:
        """Every point of the schedule from env step 0 to the budget, both included, before the trainer
        rounds them up to whole vector steps of ``num_envs``."""
        points = [0]
        while points[-1] < self.total_env_steps:
            points.append(min(self.next_evaluation(points[-1]), self.total_env_steps))
        return points

    @property
    def task_name(self) -> str:
        """The task part of ``env_id`` (see :func:`task_name`), e.g. ``PointMass1D``."""
        return task_name(self.env_id)


def task_name(env_id: str) -> str:
    """The task part of an id for file names: ``DiffGym/PointMass1D-v0`` -> ``PointMass1D``; later
    versions keep their suffix, ``DiffGym/TPush-v1`` -> ``TPush-v1``, so their runs and reports never
    overwrite the first version's."""
    bare = env_id.rpartition(":")[2].split("/")[-1]  # without Gymnasium's module: prefix and the namespace
    name, _, version = bare.rpartition("-v")
    if not name or not version.isdigit():
        return bare
    return name if version == "0" else f"{name}-v{version}"


# ---------------------------------------------------------------------------------- helpers
def unknown_keys_message(keys: list[str], holder: str | None, valid: list[str]) -> str:
    """The one wording of a misnamed key, from ``--set``, ``--param`` or a config file: the dotted ``keys``
    and what their section (``holder``; ``None``: valid keys of an unnamed section) holds instead."""
    holds = f"the keys {holder} holds" if holder else "valid keys"
    return (f"unknown config key{'s' if len(keys) > 1 else ''} {', '.join(map(repr, keys))}; {holds}: "
            f"{', '.join(valid)}")


def parse_number(value: Any, integer: bool = False) -> int | float | None:
    """``value`` if it is a real number (not a bool; NumPy's too); the text of one (YAML 1.1 keeps ``1e-5`` as a
    string) as an int when ``integer`` and it is written as one, else as a float; ``None`` for anything else."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        return None
    try:
        return int(value) if integer and value.strip().lstrip("+-").isdigit() else float(value)
    except ValueError:
        return None


def _to_builtin(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_builtin(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, coercing values to the annotated field types.

    Errors name a field by the dotted key a user writes, ``prefix + name`` (``prefix`` ``"policy."`` gives
    ``policy.log_std_init must be a number``; ``""`` a top-level key); nested dataclass fields extend the
    key (``segment.length``)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{prefix[:-1] or cls.__name__} must be given as a mapping, got {type(data).__name__}")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    names = [f.name for f in fields]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(unknown_keys_message([prefix + key for key in unknown], prefix[:-1] or None, names))
    missing = [prefix + f.name for f in fields
               if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing key(s) {missing}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _coerce(hints[name], data[name], prefix + name) for name in names if name in data})


_MAPPING_ENTRIES = {
    "randomize": "randomize.PARAM=[low,high] (e.g. --set randomize.mass=[0.5,2])",
    "eval_randomize": "eval_randomize.PARAM=[low,high] (e.g. --set eval_randomize.mass=[0.5,2])",
    "env_kwargs": "env_kwargs.KEY=VALUE (e.g. --set env_kwargs.mass=2)",
    "wrappers": "wrappers.NAME=VALUE (e.g. --set wrappers.action_delay=2)",
    "algo_params": "algo_params.KEY=VALUE (e.g. --param KEY=VALUE)",
}
"""How a mapping field's entries are written as dotted keys, for the error when one is given a non-mapping
(``--set randomize=[0.5,2]`` reads as a range for the whole mapping)."""


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """``value`` as type ``tp``; errors name it by its dotted key ``where``, a nested dataclass's fields
    ``where.field``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except (TypeError, ValueError) as error:
                errors.append(str(error))
        raise ValueError("; ".join(errors))
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, where + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise ValueError(f"{where} must have {len(item_types)} items, got {value!r}")
        return tuple(_coerce(t, v, where) for t, v in zip(item_types, value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            entries = f", given entry by entry as {_MAPPING_ENTRIES[where]}" if where in _MAPPING_ENTRIES else ""
            raise ValueError(f"{where} must be a mapping{entries}, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        number = parse_number(value)  # YAML reads "1e6" as a string
        try:
            if number is None or float(number) != int(number):
                raise ValueError
        except (ValueError, OverflowError):
            raise ValueError(f"{where} must be an integer, got {value!r}") from None
        return int(number)
    if tp is float:
        number = parse_number(value)
        if number is None:
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    return value


_FIELD_TYPES = {"policy": PolicySpec, "normalizer": NormalizerSpec, "optimizer": OptimizerSpec}
