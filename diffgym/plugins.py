"""Trainer plugins: separately installable packages that train policies on DiffGym tasks.

A trainer is an object (or a class with a no-argument constructor) exposed through the entry-point
group ``diffgym.trainers``, e.g. in the plugin's ``setup.cfg``::

    [options.entry_points]
    diffgym.trainers =
        ppo = diffgym_ppo:PPOTrainer

It implements :class:`Trainer`; ``diffgym train --algo NAME`` resolves a :class:`TrainConfig` with
:func:`resolve_config` and calls ``train``. See ``docs/plugins.md`` for a complete minimal plugin.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from diffgym.training.spec import TrainConfig, parse_number
from diffgym.training.shared_specs import SHARED_SECTIONS, shared_specs

ENTRY_POINT_GROUP = "diffgym.trainers"

_registered: dict[str, Any] = {}


@runtime_checkable
class Trainer(Protocol):
    """What a trainer plugin provides."""

    name: str
    """The algorithm name (``--algo NAME``); equal to the entry-point name."""

    def default_config(self, env_id: str) -> dict[str, Any]:
        """Per-task defaults as a (nested) mapping of :class:`TrainConfig` fields, applied on top of
        the dataclass defaults, e.g. ``{"num_envs": 32, "algo_params": {"n_steps": 16}}``. Every
        hyperparameter the trainer reads from ``config.algo_params`` should appear here, so that
        ``diffgym train --print-config`` lists them and ``--param KEY=VALUE`` can override them.
        ``policy``, ``normalizer`` and ``optimizer`` are not the trainer's to set: they come from
        :mod:`diffgym.training.shared_specs`, identical for every trainer."""
        ...

    def train(self, config: TrainConfig, progress: bool = True) -> Path:
        """Train as ``config`` says, write outputs through :class:`diffgym.training.Run`, and return
        the run directory; ``progress`` shows a progress bar."""
        ...


OPTIONAL_TRAINER_ATTRIBUTES = {
    "description": "one line for `diffgym trainers`",
    "cli_flags": "{flag: help}: `--flag VALUE` sets algo_params.<flag with _ for -> in `diffgym train`, "
                 "and `--flag V1,V2` is a grid axis in `diffgym ablate`",
    "ablation_grid": "{algo_params key: 'V1,V2,...'}: what `diffgym ablate --algo NAME` runs without --grid",
    "suggest_hyperparams": "(optuna trial, env_id) -> dotted overrides: the search space of `diffgym tune`",
    "check_config": "(TrainConfig) -> None: raise a one-line ValueError for settings the trainer cannot run; "
                    "resolve_config calls it, so `diffgym train` and every sweep refuse them before any run starts",
    "dict_observations": "True when the trainer trains on tasks with a Dict observation (goal-conditioned ones); "
                         "without it resolve_config refuses such tasks",
    "upgrade_config": "(config mapping) -> config mapping: a config an earlier version of the trainer wrote (a "
                      "`--config` file, a run directory being resumed, keys of its earlier format set on the "
                      "command line) in today's format; pass it to `Run(..., upgrade_config=...)` as well",
}
"""What a trainer may add to :class:`Trainer`; the core knows no trainer by name, so everything
algorithm-specific on the command line comes from these."""


def flag_parameter(flag: str) -> str:
    """The ``algo_params`` key a trainer's CLI flag sets: ``segment-length`` -> ``segment_length``."""
    return flag.lstrip("-").replace("-", "_")


def trainer_flags(trainer: Trainer) -> dict[str, str]:
    """The trainer's own CLI flags (``cli_flags``), ``{flag without dashes: help}``."""
    return {flag.lstrip("-"): help_text for flag, help_text in dict(getattr(trainer, "cli_flags", {}) or {}).items()}


def available_trainers() -> dict[str, EntryPoint]:
    """Installed trainer plugins by name (entry points of the ``diffgym.trainers`` group)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def register_trainer(name: str, trainer: Any) -> None:
    """Make a trainer loadable by ``name`` in this process without installing it (notebooks, tests).
    Takes precedence over an installed plugin of the same name."""
    _registered[name] = trainer


def registered_trainers() -> dict[str, Any]:
    """The trainers registered in this process with :func:`register_trainer` (a copy), by name: what a
    runner that trains in other processes must send along (installed plugins load there by themselves)."""
    return dict(_registered)


def trainer_names() -> list[str]:
    """Names of every loadable trainer: installed plugins and in-process registrations."""
    return sorted(set(available_trainers()) | set(_registered))


def load_trainer(name: str) -> Trainer:
    """Load, instantiate (when the entry point is a class) and check the trainer called ``name``."""
    if name in _registered:
        obj = _registered[name]
    else:
        found = available_trainers()
        if name not in found:
            installed = ", ".join(trainer_names()) or "none"
            raise KeyError(f"no trainer plugin named {name!r} (installed: {installed}); trainers are "
                           f"packages with an entry point in the {ENTRY_POINT_GROUP!r} group")
        try:
            obj = found[name].load()
        except Exception as error:  # a broken plugin package: one line (a ValueError: the chosen name is unusable)
            raise ValueError(f"trainer {name!r} failed to load ({found[name].value}): {type(error).__name__}: "
                              f"{' '.join(str(error).split())}") from None
    trainer = obj() if isinstance(obj, type) else obj
    if not isinstance(trainer, Trainer):
        missing = [a for a in ("name", "default_config", "train") if not hasattr(trainer, a)]
        raise TypeError(f"trainer {name!r} ({obj!r}) does not implement diffgym.plugins.Trainer: "
                        f"missing {missing}")
    return trainer


def check_task(env_id: str) -> None:
    """A one-line ``ValueError`` naming the registered DiffGym tasks if ``env_id`` is not registered, or is a
    plain Gymnasium env (no ``differentiable_step``), which no command can run."""
    import gymnasium as gym

    from diffgym.core.registration import is_diffgym_task, task_spec

    tasks = (f"DiffGym tasks: {', '.join(e for e in gym.registry if e.startswith('DiffGym/'))}; a task of your "
             "own: --env your_module:Your/Task-v0 (docs/adding_a_task.md)")
    try:
        spec = task_spec(env_id)
    except ImportError as error:
        raise ValueError(f"unknown task {env_id!r}: its module does not import ({error}); the module before "
                         f"':' is imported from the current directory or the Python path") from None
    except gym.error.Error as error:
        raise ValueError(f"unknown task {env_id!r} ({error}); {tasks}") from None
    if not is_diffgym_task(spec):
        raise ValueError(f"{env_id} is not a DiffGym task: its environment ({spec.entry_point}) has no "
                         f"differentiable_step; diffgym runs {tasks}")


def resolve_config(algo: str, env_id: str, overrides: Mapping[str, Any] | None = None,
                   base: TrainConfig | None = None) -> TrainConfig:
    """The config ``diffgym train`` runs: ``TrainConfig`` defaults, then the trainer's per-task
    defaults (its budgets and ``algo_params``), the task's shared specs (``shared_specs``), then ``base`` (e.g. a ``--config`` file) when given, then dotted-key ``overrides``."""
    trainer = load_trainer(algo)
    check_task(env_id)
    defaults = dict(trainer.default_config(env_id) or {})
    trainer_params = dict(defaults.get("algo_params", {}) or {})
    if base is None:
        owned = [section for section in SHARED_SECTIONS if section in defaults]
        if owned:
            raise ValueError(f"trainer {algo!r} sets {owned} in its defaults; policy, normalizer and optimizer "
                             "are shared by every trainer and come from diffgym.training.shared_specs")
        try:
            config = TrainConfig.from_dict({**defaults, **shared_specs(env_id), "algo": algo, "env_id": env_id})
        except ValueError as error:  # the plugin's own defaults, not anything the user typed
            raise ValueError(f"trainer {algo!r}'s default_config({env_id!r}): {error}") from None
    else:
        config = base.replace(algo=algo, env_id=env_id)
    config = config.with_overrides(overrides or {})
    # the keys the user set: the overrides', and a --config file's (``base``) every one
    set_keys = list(config.algo_params) if base is not None else [
        key.split(".")[1] for key in overrides or {} if key.startswith("algo_params.")]
    upgrade = getattr(trainer, "upgrade_config", None)
    if upgrade is not None:  # keys of an earlier format (a --config file, --param KEY) in today's
        data = upgrade(config.to_dict())
        if data.get("algo") != algo:
            raise ValueError(f"these settings are trainer {data.get('algo')!r}'s now: use --algo {data.get('algo')}")
        config = TrainConfig.from_dict(data)
        set_keys = list(config.algo_params)
    _check_algo_params(trainer, trainer_params, set_keys)
    if getattr(trainer, "check_config", None) is None:  # else nested sections are the trainer's to check
        _check_nested_algo_params(trainer, trainer_params, config.algo_params)
    from diffgym.core.env import check_device

    check_device(config.device)
    task_kwargs = task_defaults(env_id)
    config = config.with_overrides(_numbers_from_text("env_kwargs", config.env_kwargs, task_kwargs))
    _check_types("env_kwargs", config.env_kwargs, task_kwargs)
    observation_space = task_observation_space(env_id, config.env_kwargs)
    if type(observation_space).__name__ == "Dict" and not getattr(trainer, "dict_observations", False):
        raise ValueError(f"trainer {algo!r} trains on Box observations, but {env_id}'s observation is a Dict "
                         f"({', '.join(observation_space.spaces)}); choose a task with a Box observation "
                         "(docs/tasks.md) or a trainer that sets dict_observations")
    from diffgym.training.randomization import check_config_ranges

    check_config_ranges(config)
    config = config.with_overrides(_numbers_from_text("algo_params", config.algo_params, trainer_params))
    check = getattr(trainer, "check_config", None)
    if check is not None:  # before the type check: its messages know the trainer's ranges
        check(config)
    _check_types("algo_params", config.algo_params, trainer_params)
    return config


def task_observation_space(env_id: str, env_kwargs: Mapping[str, Any]) -> Any:
    """Make the task once, on the CPU, with ``env_kwargs`` (what every env of a run gets) and return its
    observation space: a misspelt or out-of-range task argument is a one-line ``ValueError`` when the
    config is built, not a traceback once a run has started."""
    import warnings

    import gymnasium as gym

    check_task(env_id)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. an older task version's deprecation note: the run shows it
            env = gym.make(env_id, disable_env_checker=True, **{**env_kwargs, "device": "cpu"})
    except TypeError as error:  # an argument the task does not take (or one of the wrong type)
        takes = task_arguments(env_id)
        unknown = sorted(key for key in env_kwargs if key not in takes) if takes else []
        if not unknown:
            # Gymnasium appends where it was raised, with every kwarg: said already
            reason = str(error).split(" was raised from the environment creator")[0]
            raise ValueError(f"{' '.join(reason.split())} (making {env_id} with env_kwargs "
                             f"{dict(env_kwargs)})") from None
        raise ValueError(f"unknown env_kwargs {unknown} for {env_id}; it takes: {', '.join(takes)}") from None
    except (ValueError, ImportError) as error:  # a value the task refuses, a missing optional extra
        # the task's own words first (they name the argument); then which task and arguments
        given = f" with env_kwargs {dict(env_kwargs)}" if env_kwargs else ""
        raise ValueError(f"{' '.join(str(error).split())} (making {env_id}{given})") from None
    try:
        return env.observation_space
    finally:
        env.close()


def task_arguments(env_id: str) -> list[str]:
    """The constructor arguments a registered task takes (its simulator's, for a DiffGym task), for
    error messages; empty where they cannot be read."""
    return list(task_defaults(env_id))


def task_defaults(env_id: str) -> dict[str, Any]:
    """The constructor arguments a registered task takes (its simulator's, for a DiffGym task) and their
    defaults (``inspect.Parameter.empty`` where none); empty where they cannot be read."""
    import inspect

    from gymnasium.envs.registration import load_env_creator

    from diffgym.core.registration import task_spec

    entry_point = task_spec(env_id).entry_point
    try:
        creator = load_env_creator(entry_point) if isinstance(entry_point, str) else entry_point
        signature = inspect.signature(getattr(creator, "sim_class", creator))
    except (TypeError, ValueError, ImportError, AttributeError):
        return {}
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name: parameter.default for name, parameter in signature.parameters.items()
            if parameter.kind in named and name not in ("self", "device", "render_mode")}


def _check_algo_params(trainer: Trainer, defaults: Mapping[str, Any], keys: Sequence[str]) -> None:
    """A misspelt hyperparameter is an error, not a silently ignored key: every ``algo_params`` key an
    override sets (``keys``, first level) must be one the trainer's per-task defaults (``defaults``) list
    (as the protocol asks them to)."""
    known = set(defaults)
    if not known:
        return  # a trainer that lists none: nothing to check against
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ValueError(f"unknown algo_params {unknown} for trainer {trainer.name!r}; it has: {', '.join(sorted(known))}")


def _check_nested_algo_params(trainer: Trainer, defaults: Mapping[str, Any], values: Mapping[str, Any],
                              parents: tuple[str, ...] = ()) -> None:
    """For a trainer without ``check_config``: every key inside a section of ``algo_params`` (``values``, the
    resolved config's, set by an override or a ``--config`` file) must be one that section of the trainer's
    defaults has (``algo_params.optim.lrr`` is refused). An empty section in the defaults is free-form. (A
    trainer with ``check_config`` checks its sections itself: their fields may depend on another key.)"""
    for key, value in values.items():
        default = defaults.get(key)
        if not isinstance(value, Mapping) or not isinstance(default, Mapping) or not default:
            continue
        unknown = sorted(set(value) - set(default))
        section = ".".join((*parents, key))
        if unknown:
            raise ValueError(f"unknown algo_params key '{section}.{unknown[0]}' for trainer {trainer.name!r}; "
                             f"algo_params.{section} has: {', '.join(sorted(default))}")
        _check_nested_algo_params(trainer, default, value, (*parents, key))


def _numbers_from_text(section: str, values: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The dotted overrides that turn a value of ``section`` written as text (``1e-5``, which YAML keeps a
    string) into a number where its default is a number (``algo_params``: the trainer's per-task defaults;
    ``env_kwargs``: the task constructor's), so a trainer's ``check_config`` and a task see numbers; and a
    whole float into an int where the default is an int."""
    numbers = {}
    for key, value in values.items():
        default = defaults.get(key)
        if not isinstance(default, (int, float)) or isinstance(default, bool):
            continue
        number = parse_number(value, integer=isinstance(default, int))  # a number is returned as it is
        if isinstance(default, int) and isinstance(number, float) and number.is_integer():
            number = int(number)  # "1e1", or 10.0, where the default is an int: 10, its default's type
        if number is not None and number is not value:
            numbers[f"{section}.{key}"] = number
    return numbers


def _check_types(section: str, values: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """A value of ``section`` whose default is a number must be a number, and one whose default is a
    boolean a boolean: so every trainer and task, a third party's too, refuses ``--sigma abc`` before its
    run starts rather than failing inside it."""
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"{section}.{key} must be true or false (its default is {default}), got {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool) and parse_number(value) is None:
            raise ValueError(f"{section}.{key} must be a number (its default is {default}), got {value!r}")
