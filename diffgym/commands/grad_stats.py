"""``diffgym grad-stats``: analytic against likelihood-ratio policy gradients, horizon by horizon."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffgym.commands.options import add_out_argument, key_values

HELP = "analytic vs likelihood-ratio policy gradients per horizon: norm, variance, cosine, bias"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", required=True, help="task id, e.g. DiffGym/PointNav2D-v0")
    parser.add_argument("--policy", default=None,
                        help="a run directory of this task (its latest checkpoint) (default: a fresh policy)")
    parser.add_argument("--horizons", default=None,
                        help="comma-separated h (default: 1,2,4,... up to the episode length)")
    parser.add_argument("--envs", type=int, default=64, help="start states")
    parser.add_argument("--samples", type=int, default=4, help="rollouts (action-noise draws) per start state")
    parser.add_argument("--seed", type=int, default=0, help="seed of the start states and the action noise")
    parser.add_argument("--gamma", type=float, default=None,
                        help="discount of the h-step return (default: the policy's algo_params.gamma, else 0.99)")
    parser.add_argument("--start-after", type=int, default=0, metavar="W",
                        help="measure from the states the policy's deterministic actions reach in W steps "
                             "(default: 0, the reset states)")
    parser.add_argument("--env-kwarg", dest="env_kwargs", action="append", default=[], metavar="KEY=VALUE",
                        help="a task constructor argument, e.g. contact_gradient_distance=0.03 (repeatable)")
    add_out_argument(parser, "runs/grad_stats/<task>")


def run(args: argparse.Namespace) -> int:
    import torch

    from diffgym.diagnostics import format_table, gradient_stats, plot
    from diffgym.plugins import task_observation_space
    from diffgym.training.spec import task_name

    torch.set_num_threads(1)
    horizons = [int(h) for h in args.horizons.split(",")] if args.horizons else None
    if args.envs < 2 or args.samples < 1:
        raise SystemExit("diffgym grad-stats: need --envs >= 2 and --samples >= 1")
    env_kwargs = key_values(args.env_kwargs)
    try:
        task_observation_space(args.env, env_kwargs)  # an unknown task or task argument, before any rollout
        rows = gradient_stats(args.env, horizons, args.envs, args.samples, args.policy, args.seed, args.gamma,
                              env_kwargs=env_kwargs, start_after=args.start_after)
    except (TypeError, ValueError) as error:  # TypeError: a task argument the task does not take
        raise SystemExit(f"diffgym grad-stats: {error}") from None
    out = Path(args.out or Path("runs") / "grad_stats" / task_name(args.env))
    out.mkdir(parents=True, exist_ok=True)
    meta = {"env_id": args.env, "policy": args.policy or "fresh", "envs": args.envs, "samples": args.samples,
            "seed": args.seed, "gamma": rows[0]["gamma"] if rows else args.gamma, "start_after": args.start_after,
            "env_kwargs": env_kwargs}
    (out / "grad_stats.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    title = f"{task_name(args.env)}: {args.policy or 'fresh policy'}, {args.envs} x {args.samples} rollouts"
    if args.start_after:
        title += f", from step {args.start_after}"
    plot(rows, title, out / "grad_stats.png")
    print(format_table(rows))
    print(f"\nwrote {out / 'grad_stats.json'} and {out / 'grad_stats.png'}")
    return 0
