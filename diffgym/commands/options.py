"""The flags several ``diffgym`` subcommands share, so that each name has one meaning everywhere.

* ``--env`` is a task id; ``--env-steps`` (alias ``--total-env-steps``) the env-step budget of every run
  and ``--eval-every`` (alias ``--eval-every-env-steps``) the evaluation interval; every count accepts
  ``1e6`` notation. ``--eval-schedule geometric`` (with ``--eval-first``, ``--eval-growth``) evaluates
  densely early (``TrainConfig.eval_schedule``, ``docs/protocol.md``).
* ``--set KEY=VALUE`` overrides a config field by dotted key (``optimizer.lr=1e-3``,
  ``env_kwargs.mass=2``), ``--param KEY=VALUE`` an algorithm hyperparameter (``--set algo_params.KEY``),
  ``--env-kwarg KEY=VALUE`` a task constructor argument (in ``feasibility``, which has no config).
* ``--out DIR`` is the directory a command writes into (``export --out FILE``: the exported file);
  ``--extend`` lets a sweep continue the runs there that were made with another budget or cadence.
* ``--runner``/``--workers``/``--threads``: where and how parallel the runs of a sweep execute.

Nothing here imports torch: ``diffgym --help`` reads every subcommand's definition.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

if TYPE_CHECKING:
    from diffgym.experiments.sweep import Runner
    from diffgym.training.spec import TrainConfig


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with the project's one-line usage error, ``diffgym <command>: <why> (see diffgym
    <command> --help)``, exit status 2: argparse's own prints the usage block first, which pushes the reason
    below a screenful of flags. ``add_subparsers`` makes the subcommands' parsers of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default: a value default is appended as ``(default: X)``; an
    option whose default depends on something else (the task, the run) says so in its own help text."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.nargs == 0
                or action.default in (None, argparse.SUPPRESS, [])):
            return text
        return f"{text} (default: %(default)s)"


def one_line(error: BaseException) -> str:
    """An exception's message on one line (a ``KeyError``'s without the quotes ``str`` adds)."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(text.split()) or type(error).__name__


def yaml_problem(error: BaseException) -> str:
    """A YAML parse error on one line: what is wrong and where (line and column), without YAML's excerpt of
    the text."""
    problem = getattr(error, "problem", None) or getattr(error, "context", None)
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if problem and mark is not None:
        return f"not valid YAML: {problem} (line {mark.line + 1}, column {mark.column + 1})"
    return f"not valid YAML: {one_line(error)}"


def count(text: str) -> int:
    """A non-negative integer that may be written ``1e6``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 50000 or 5e4, got {text!r}") from None
    if value < 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(value)


def seed_number(text: str) -> int:
    """A seed: a whole number >= 0 (gymnasium and NumPy refuse negative ones, deep inside a run)."""
    if not text.strip().isdecimal():  # also refuses "-1" and "1.5"
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def parse_value(text: str) -> Any:
    """A YAML scalar/list (``32``, ``[64, 64]``, ``true``, ``null``); numbers such as ``1e-3`` that
    YAML 1.1 leaves as strings become floats; text YAML cannot read (``[1``) is an
    ``argparse.ArgumentTypeError`` naming it."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is {yaml_problem(error)}") from None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def key_values(pairs: list[str], prefix: str = "") -> dict[str, Any]:
    """``["a.b=1", ...]`` -> ``{prefix + "a.b": 1, ...}``; a malformed pair is a one-line error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"expected KEY=VALUE, got {pair!r}")
        try:
            out[prefix + key.strip()] = parse_value(value)
        except argparse.ArgumentTypeError as error:
            raise SystemExit(f"{pair}: {error}") from None
    return out


SCHEDULE_FLAGS = {"eval_schedule": "eval_schedule", "eval_first": "eval_first_env_steps", "eval_growth": "eval_growth"}
"""The evaluation-schedule flags (argparse dest -> ``TrainConfig`` field); :func:`overrides` applies them."""
SCHEDULE_DEFAULTS = {"eval_schedule": ("linear", "geometric"), "eval_first_env_steps": "1,000", "eval_growth": "1.25"}
"""``TrainConfig``'s schedules and defaults as the help shows them, written out because importing
``diffgym.training`` here would import torch (``tests/test_eval_schedule.py`` checks they agree)."""


def add_budget_arguments(parser: argparse.ArgumentParser, required: bool, eval_default: str,
                         budget_default: str = "") -> None:
    """``--env-steps`` (alias ``--total-env-steps``), ``--eval-every`` (alias ``--eval-every-env-steps``)
    and the evaluation schedule: ``--eval-schedule``, ``--eval-first`` (alias ``--eval-first-env-steps``),
    ``--eval-growth``."""
    parser.add_argument("--env-steps", "--total-env-steps", dest="env_steps", type=count, required=required,
                        default=None, metavar="N",
                        help="env-step budget of every run, e.g. 1e6"
                             + ("" if required else f" (default: {budget_default})"))
    parser.add_argument("--eval-every", "--eval-every-env-steps", dest="eval_every", type=count, default=None,
                        metavar="N", help=f"env steps between evaluations, e.g. 5e3; with --eval-schedule geometric the "
                                          f"largest gap between two (default: {eval_default})")
    schedules = SCHEDULE_DEFAULTS["eval_schedule"]
    parser.add_argument("--eval-schedule", choices=schedules, default=None,
                        help="when to evaluate: linear, every --eval-every env steps; geometric, dense early: at "
                             "--eval-first, then each gap --eval-growth times the last, up to --eval-every; both "
                             f"also at env step 0 and at the budget (default: {schedules[0]}"
                             + (", or the --config's" if not required else "") + ")")
    parser.add_argument("--eval-first", "--eval-first-env-steps", dest="eval_first", type=count, default=None,
                        metavar="N", help="geometric schedule: the first evaluation after env step 0, e.g. 1e3 "
                                          f"(default: {SCHEDULE_DEFAULTS['eval_first_env_steps']})")
    parser.add_argument("--eval-growth", type=float, default=None, metavar="X",
                        help="geometric schedule: the factor (> 1) from one evaluation point to the next "
                             f"(default: {SCHEDULE_DEFAULTS['eval_growth']})")


def check_schedule_flags(args: argparse.Namespace, config: TrainConfig) -> None:
    """A one-line ``ValueError`` when ``--eval-first`` or ``--eval-growth`` is given for a run whose
    schedule (``config.eval_schedule``) is not geometric: they would change nothing."""
    given = [flag for flag, dest in (("--eval-first", "eval_first"), ("--eval-growth", "eval_growth"))
             if getattr(args, dest, None) is not None]
    if given and config.eval_schedule != "geometric":
        raise ValueError(f"{' and '.join(given)} only apply to the geometric schedule; this one is "
                         f"{config.eval_schedule}: add --eval-schedule geometric")


def add_override_arguments(parser: argparse.ArgumentParser, scope: str) -> None:
    """``--set KEY=VALUE`` and ``--param KEY=VALUE`` (repeatable)."""
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override any config field of {scope} by dotted key, e.g. optimizer.lr=1e-3 "
                             "env_kwargs.mass=2 (repeatable; `diffgym train --print-config` lists the keys)")
    parser.add_argument("--param", dest="params", action="append", default=[], metavar="KEY=VALUE",
                        help="override an algorithm hyperparameter, same as --set algo_params.KEY=VALUE (repeatable)")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config changes of the evaluation-schedule flags (:data:`SCHEDULE_FLAGS`), then the dotted-key
    overrides of ``--set`` and ``--param``."""
    schedule = {field: getattr(args, dest) for dest, field in SCHEDULE_FLAGS.items()
                if getattr(args, dest, None) is not None}
    return {**schedule, **key_values(getattr(args, "sets", [])),
            **key_values(getattr(args, "params", []), prefix="algo_params.")}


def check_output_file(path: str | Path) -> None:
    """A one-line ``ValueError`` unless a file can be written at ``path``, creating its missing parent
    directories as a run directory is created (``check_run_dir``): checked before a command starts its
    work, so a mistyped output path costs nothing."""
    from diffgym.training.run import check_run_dir

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a directory; expected a file name")
    try:
        check_run_dir(path.parent)
    except ValueError as error:
        raise ValueError(f"cannot write {path}: {error}") from None


def add_out_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """``--out DIR``: the directory the command writes into."""
    parser.add_argument("--out", default=None, metavar="DIR", help=f"output directory (default: {default})")


def add_extend_argument(parser: argparse.ArgumentParser, out_flag: str = "--out",
                        budget: str = "--env-steps, --eval-every") -> None:
    """``--extend``: a sweep may continue the runs in its ``out_flag`` made with another schedule
    (``diffgym.experiments.training_runs.reuse_plan``)."""
    parser.add_argument("--extend", action="store_true",
                        help=f"continue runs already in {out_flag} that were made with another {budget}, "
                             "evaluation schedule or eval_episodes (refused otherwise: their curves would mix two "
                             "schedules)")


TRAINER_FLAG = "trainer_flag:"  # the prefix of a trainer flag's dest: never a core option's


def add_trainer_flags(parser: argparse.ArgumentParser, command: str, algo: str, values: str = "single") -> list[str]:
    """Add the trainer's own flags (``cli_flags``) to ``command``'s parser as a group of their own, so that
    ``--help`` lists them and argparse parses them with the core flags (a trainer flag that is a prefix of a
    core one, ``--eval`` beside ``--eval-every``, is taken as itself, not as the abbreviation). Returns the
    flags left out because the command already has them (the core flag wins; ``check_trainer`` refuses
    them). ``values="list"`` keeps each value as text (a grid axis, ``V1,V2``). :func:`trainer_params`
    reads them back."""
    from diffgym.plugins import load_trainer, trainer_flags

    try:
        flags = trainer_flags(load_trainer(algo))
    except (KeyError, TypeError, ValueError) as error:  # unknown, not a Trainer, broken package
        raise SystemExit(f"diffgym {command}: {one_line(error)}")
    group = parser.add_argument_group(f"flags of trainer {algo!r} (each the same as --param KEY=VALUE)")
    clashes = []
    for flag, help_text in flags.items():
        try:
            group.add_argument(f"--{flag}", dest=f"{TRAINER_FLAG}{flag}", help=help_text, default=None,
                               metavar="V1,V2,..." if values == "list" else "VALUE",
                               type=str if values == "list" else parse_value)
        except argparse.ArgumentError:
            clashes.append(f"--{flag}")
    return clashes


def trainer_params(args: argparse.Namespace) -> dict[str, Any]:
    """The trainer flags given on the command line (:func:`add_trainer_flags`), ``{algo_params key: value}``."""
    from diffgym.plugins import flag_parameter

    return {flag_parameter(dest.removeprefix(TRAINER_FLAG)): value for dest, value in vars(args).items()
            if dest.startswith(TRAINER_FLAG) and value is not None}


def unknown_flags_error(command: str, algo: str | None, extra: list[str]) -> str:
    """The one line for words no flag took: which flags ``algo`` adds, or that a trainer's flags need --algo."""
    words = " ".join(extra)
    if not algo:
        return (f"diffgym {command}: unrecognized arguments: {words} (a trainer's own flags need --algo, or a "
                "readable --config FILE that names it)")
    from diffgym.plugins import load_trainer, trainer_flags

    own = ", ".join(f"--{flag}" for flag in trainer_flags(load_trainer(algo))) or "none"
    return f"diffgym {command}: unrecognized arguments: {words} (trainer {algo!r} adds the flags: {own})"


def add_sweep_arguments(parser: argparse.ArgumentParser, seeds_of: str, scope: str, out_default: str) -> None:
    """What ``compare`` and ``ablate`` share after their own arguments: seeds per ``seeds_of``, the budget
    and evaluation flags, overrides for ``scope``, parallelism, the success threshold, ``--out``,
    ``--extend`` and where the runs execute."""
    from diffgym.experiments.report import SUCCESS_THRESHOLD
    from diffgym.threads import add_threads_argument

    parser.add_argument("--seeds", type=int, default=3, help=f"seeds per {seeds_of} (0..S-1)")
    add_budget_arguments(parser, required=True, eval_default="budget/20")
    add_override_arguments(parser, scope)
    parser.add_argument("--workers", type=int, default=None, help="parallel runs (default: CPU count)")
    add_threads_argument(parser, "each run")
    parser.add_argument("--threshold", type=float, default=SUCCESS_THRESHOLD, help="success rate that counts as solved")
    add_out_argument(parser, out_default)
    add_extend_argument(parser)
    add_runner_arguments(parser)


def add_runner_arguments(parser: argparse.ArgumentParser, out_flag: str = "--out") -> None:
    """The flags that choose where a sweep's runs execute (``compare``, ``ablate``, ``tune``)."""
    group = parser.add_argument_group("where the runs execute")
    group.add_argument("--runner", choices=("local", "ray"), default="local",
                       help="local: a process pool on this machine (--workers); ray: a Ray cluster (--ray-address) "
                            "or, without one, a local Ray instance of --workers runs (see docs/scaling.md)")
    group.add_argument("--ray-address", default=None,
                       help="Ray cluster to join, e.g. auto or HOST:6379 (default: $RAY_ADDRESS, else a local "
                            "instance)")
    group.add_argument("--cpus-per-run", type=float, default=None,
                       help="CPUs Ray reserves for each run, which also sets its torch threads (default: 1)")
    group.add_argument("--gpus-per-run", type=float, default=None,
                       help="GPUs Ray reserves for each run (a fraction shares one); above 0 runs train on it "
                            "(default: 0)")
    group.add_argument("--shared-out", action="store_true",
                       help=f"{out_flag} is on storage every Ray node mounts at the same path: runs write there "
                            "directly instead of being copied back to this machine")


def make_runner(args: argparse.Namespace, command: str) -> Runner:
    """The runner ``add_runner_arguments``' flags ask for; a one-line error for flags that do not fit."""
    import os

    from diffgym.experiments.sweep import LocalRunner

    ray_flags = {"--ray-address": args.ray_address, "--cpus-per-run": args.cpus_per_run,
                 "--gpus-per-run": args.gpus_per_run, "--shared-out": args.shared_out or None}
    if args.runner == "local":
        given = [flag for flag, value in ray_flags.items() if value is not None]
        if given:
            raise SystemExit(f"diffgym {command}: {', '.join(given)} need --runner ray")
        return LocalRunner(args.workers, threads=getattr(args, "threads", None))
    if args.workers is not None and (args.ray_address or os.environ.get("RAY_ADDRESS")):
        raise SystemExit(f"diffgym {command}: --workers sizes a local Ray instance; a cluster "
                         "(--ray-address or $RAY_ADDRESS) runs as many runs as its resources hold")
    try:
        from diffgym.experiments.ray_runner import RayRunner

        return RayRunner(address=args.ray_address,
                         cpus_per_run=1.0 if args.cpus_per_run is None else args.cpus_per_run,
                         gpus_per_run=0.0 if args.gpus_per_run is None else args.gpus_per_run,
                         shared_out=args.shared_out, local_runs=args.workers)
    except (ImportError, ValueError) as error:
        raise SystemExit(f"diffgym {command}: {error}")


# ----------------------------------------------------------------------------- a trained policy (eval, export)
def add_policy_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The policy to use, shared by ``eval`` and ``export``."""
    parser.add_argument("run_dir", help="a run directory, one checkpoint file or a .safetensors policy")
    parser.add_argument("--step", type=int, default=None,
                        help="the checkpoint at this many env steps (default: latest)")
    parser.add_argument("--legacy-checkpoint", action="store_true",
                        help="also read checkpoints saved before they became weights-only (older PPO runs): "
                             "NumPy data is read, any other object the file names is replaced by an inert "
                             "stand-in, so nothing from the file runs (default: tensors and plain data only)")


def load_policy_source(command: str, args: argparse.Namespace):
    """The chosen policy (:class:`diffgym.policy.Policy`), or ``None`` after printing
    ``diffgym <command>: <why>`` in one line."""
    from diffgym.policy import NotAPolicyFile, load_policy

    try:
        return load_policy(args.run_dir, step=args.step, legacy=args.legacy_checkpoint)
    except NotAPolicyFile as error:  # what the command takes instead, and the run the file belongs to
        source = error.path
        print(f"diffgym {command}: {source} is {error.kind}; diffgym {command} takes a run directory"
              + (f" (this file's: {source.parent})" if (source.parent / "config.yaml").is_file() else "")
              + ", a checkpoint .pt or a .safetensors policy", file=sys.stderr)
        return None
    except (FileNotFoundError, ValueError, ImportError, yaml.YAMLError) as error:
        message = " ".join(str(error).split())
        if isinstance(error, yaml.YAMLError):  # the run's config.yaml; YAML's message does not name it
            message = f"{Path(args.run_dir) / 'config.yaml'}: not a readable config ({message})"
        print(f"diffgym {command}: {message}", file=sys.stderr)
        return None
