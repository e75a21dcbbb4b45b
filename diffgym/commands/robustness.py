"""``diffgym robustness``: a trained policy's success and return as the task's physical parameters vary.

``diffgym robustness RUN [RUN ...] --vary PARAM=LO:HI[:N]`` scores each run's deterministic policy (a RUN
may also be one checkpoint file or ``.safetensors`` policy, as for ``diffgym eval``) at N
evenly spaced values of each varied parameter (one parameter at a time, the others nominal, not drawn
from the run's ``eval_randomize``), with the value set in every env through the vector env's ``reset``
options, the envs inside the run's ``wrappers``; several runs (seeds) are summarised by
their IQM per point. Everything that can be refused (the ranges, the task's parameters and bounds, the
runs and their checkpoints) is checked before the first evaluation. The work is
:mod:`diffgym.experiments.robustness`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from diffgym.commands.evaluate import FRESH_SEED_OFFSET
from diffgym.commands.options import add_out_argument, one_line, seed_number

HELP = "a policy's success and return as the task's physical parameters vary (--vary mass=0.25:4:9)"
CHECKPOINTS = ("final", "best")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN",
                        help="run directories, checkpoint files or .safetensors policies of one task (several, "
                             "e.g. seeds, are summarised by their IQM)")
    parser.add_argument("--vary", action="append", default=[], required=True, metavar="PARAM=LO:HI[:N]",
                        help="a physical parameter and the range to sweep it over, N evenly spaced values (default "
                             "N: 7; the nominal value is added when it lies inside); repeatable, one parameter "
                             "at a time")
    parser.add_argument("--episodes", type=int, default=None,
                        help="episodes per point (default: each run's eval_episodes)")
    parser.add_argument("--seed", type=seed_number, default=None,
                        help=f"evaluation seed of every point (default: each run's seed + {FRESH_SEED_OFFSET}, "
                             "the fresh seeds of `diffgym eval`)")
    parser.add_argument("--checkpoint", choices=CHECKPOINTS, default="final",
                        help="each run's latest checkpoint, or the one of its best evaluation (highest success "
                             "rate, then return)")
    add_out_argument(parser, "RUN/robustness, or the runs' common parent/robustness for several")


def run(args: argparse.Namespace) -> int:
    import torch

    from diffgym.experiments import robustness

    torch.set_num_threads(1)
    try:
        variations = [robustness.parse_variation(text) for text in args.vary]
        if args.episodes is not None and args.episodes < 1:
            raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
        runs = _runs_under_test(args, variations)
    except (FileNotFoundError, ImportError, KeyError, TypeError, ValueError) as error:
        raise SystemExit(f"diffgym robustness: {one_line(error)}")
    results = robustness.sweep(runs, variations, args.checkpoint,
                               progress=lambda line: print(f"robustness: {line}", file=sys.stderr))
    out = Path(args.out) if args.out else _default_out([run.run_dir for run in runs])
    written = robustness.write_outputs(results, out)
    print(robustness.markdown_table(results), end="")
    print(f"robustness: wrote {', '.join(str(path) for path in written.values())}", file=sys.stderr)
    return 0


def _runs_under_test(args: argparse.Namespace, variations) -> list:
    """Each run's policy at the chosen checkpoint with its episodes, seed and nominal physics; a
    ``ValueError`` (or ``FileNotFoundError``) in one line for anything that is not a run of one task
    whose parameters the variations fit."""
    import yaml

    from diffgym.experiments.robustness import RunUnderTest, check_variations, task_physics
    from diffgym.policy import load_policy
    from diffgym.training.evaluation import EVAL_SEED_OFFSET, SEED_STRIDE
    from diffgym.training.run import evaluation_milestones, read_metrics
    from diffgym.training.spec import TrainConfig

    limit = SEED_STRIDE - EVAL_SEED_OFFSET
    if args.episodes is not None and args.episodes > limit:
        raise ValueError(f"--episodes must be at most {limit} (evaluation seeds are spaced so), got {args.episodes}")
    paths = [Path(text) for text in args.run_dirs]
    if len({path.resolve() for path in paths}) < len(paths):
        raise ValueError("a run directory is given twice; each run counts once in the IQM")
    configs, policy_files = [], {}
    for path in paths:
        if not path.is_dir():  # a checkpoint or .safetensors policy: its config (task, wrappers) is inside it
            if args.checkpoint == "best":
                raise ValueError(f"{path} is one policy file; --checkpoint best picks among a run directory's "
                                 "checkpoints: give the run directory")
            policy_files[path] = load_policy(path)  # a missing path: "does not exist", as in `diffgym eval`
            configs.append(policy_files[path].config)
            continue
        if not (path / "config.yaml").is_file():
            raise FileNotFoundError(f"{path} is not a run directory: it has no config.yaml")
        try:
            configs.append(TrainConfig.load(path / "config.yaml"))
        except yaml.YAMLError as error:
            raise ValueError(f"{path / 'config.yaml'}: not a readable config ({one_line(error)})") from None
    tasks = sorted({config.env_id for config in configs})
    if len(tasks) > 1:
        raise ValueError(f"the runs are of different tasks ({', '.join(tasks)}); give runs of one task")
    kwargs_keys = [repr(sorted(config.env_kwargs.items())) for config in configs]
    physics_of = {}  # a run's task as its env_kwargs make it (its nominal physics), read once per distinct kwargs
    for key, config in zip(kwargs_keys, configs):
        if key not in physics_of:
            physics_of[key] = task_physics(config.env_id, config.env_kwargs)
            check_variations(variations, physics_of[key])
    runs = []
    for path, config, key in zip(paths, configs, kwargs_keys):
        if path in policy_files:
            policy = policy_files[path]
        elif args.checkpoint == "best":
            metrics = path / "metrics.jsonl"
            milestones = evaluation_milestones(read_metrics(metrics)) if metrics.is_file() else {}
            if "best" not in milestones:
                raise ValueError(f"{path} has no evaluations in metrics.jsonl to pick the best checkpoint by; "
                                 "use --checkpoint final")
            policy = load_policy(path, step=milestones["best"])
        else:
            policy = load_policy(path)
        episodes = args.episodes or config.eval_episodes
        if episodes > limit:
            raise ValueError(f"{path}: eval_episodes {episodes} is above {limit}; give --episodes")
        seed = config.seed + FRESH_SEED_OFFSET if args.seed is None else args.seed
        runs.append(RunUnderTest(path, policy, episodes, seed, dict(physics_of[key].nominal)))
    return runs


def _default_out(run_dirs: list[Path]) -> Path:
    """``RUN/robustness`` for one run (a policy file's: its folder's); for several, ``robustness`` in the
    folder that holds them all."""
    folders = [path if path.is_dir() else path.parent for path in run_dirs]
    if len(folders) == 1:
        return folders[0] / "robustness"
    return Path(os.path.commonpath([str(path.resolve()) for path in folders])) / "robustness"
