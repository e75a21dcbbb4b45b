"""``diffgym feasibility``: a planner on the exact simulator, to tell whether a task is solvable."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffgym.commands.options import add_out_argument, key_values

HELP = "a sampling planner (MPPI) on the exact simulator: is the success criterion reachable?"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # defaults None: the task's documented reference settings, else the generic ones
    # (diffgym.experiments.feasibility.REFERENCES and GENERIC_SETTINGS)
    per_task = "default: the task's documented reference, else"
    parser.add_argument("--env", required=True, help="task id, e.g. DiffGym/TPush-v1")
    parser.add_argument("--episodes", type=int, default=None,
                        help=f"seeded episodes per seed, one batch ({per_task} 256; TPush-v1: 128)")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"planner seeds --seed.. run one after another, reported together ({per_task} 1; "
                             "TPush-v1: 2)")
    parser.add_argument("--samples", type=int, default=None, help=f"candidate action sequences per step ({per_task} 64)")
    parser.add_argument("--horizon", type=int, default=None, help=f"planning horizon [control steps] ({per_task} 16)")
    parser.add_argument("--noise-std", type=float, default=None, help=f"std of the action perturbations ({per_task} 0.6)")
    parser.add_argument("--temperature", type=float, default=None, help=f"softmax temperature, relative ({per_task} 0.05)")
    parser.add_argument("--knot-steps", type=int, default=None,
                        help=f"control steps each planned action is held ({per_task} 1)")
    parser.add_argument("--replan-every", type=int, default=None,
                        help=f"control steps executed between replans ({per_task} 1)")
    parser.add_argument("--fine-noise-std", type=float, default=None,
                        help=f"std of the second half of the candidates ({per_task} --noise-std)")
    parser.add_argument("--terminal-weight", type=float, default=None,
                        help=f"extra weight of the horizon's last reward, a crude cost-to-go ({per_task} 0)")
    parser.add_argument("--seed", type=int, default=None, help="first seed of the episodes' start states (default 0)")
    parser.add_argument("--planner", choices=("mppi", "gradient"), default="mppi",
                        help="mppi: the sampling planner; gradient: open-loop trajectory optimisation "
                             "with exact gradients, what first-order optimisation reaches")
    parser.add_argument("--iterations", type=int, default=None,
                        help=f"gradient planner: Adam steps per episode ({per_task} 200)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"gradient planner: Adam learning rate on the logits ({per_task} 0.05)")
    parser.add_argument("--env-kwarg", dest="env_kwargs", action="append", default=[], metavar="KEY=VALUE",
                        help="a task constructor argument, e.g. start_spread=0.3 (repeatable)")
    add_out_argument(parser, "runs/feasibility; the result is <DIR>/<task>.json")


def run(args: argparse.Namespace) -> int:
    import torch

    from diffgym.experiments.feasibility import GENERIC_SETTINGS, describe, planner_settings, run_planner
    from diffgym.plugins import task_observation_space
    from diffgym.training.spec import task_name

    torch.set_num_threads(1)
    env_kwargs = key_values(args.env_kwargs)
    given = {key: getattr(args, key) for key in GENERIC_SETTINGS[args.planner]}
    try:
        task_observation_space(args.env, env_kwargs)  # an unknown task or task argument, before planning
        settings = planner_settings(args.env, args.planner, args.episodes, args.seeds, args.seed, **given)
        result = run_planner(args.env, settings, env_kwargs=env_kwargs, progress=True)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"diffgym feasibility: {error}") from None
    out = Path(args.out or Path("runs") / "feasibility") / f"{task_name(args.env)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(describe(result))
    print(f"wrote {out}")
    return 0
