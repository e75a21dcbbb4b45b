"""The small PPO hyperparameter sweep behind ``diffgym_ppo/hyperparams/ppo.yml``.

Trains PPO once per setting (same seed, same budget) and prints a Markdown table of the final and best
deterministic evaluation. Usage (from the repository root)::

    .venv/bin/python trainers/ppo/sweep.py --env DiffGym/PointMass1D-v0 --steps 400000 \
        --grid '{"base": {}, "lr1e-3": {"optimizer.lr": 1e-3}, "n32": {"algo_params.n_steps": 32}}'

Each grid entry is a dict of dotted ``TrainConfig`` overrides (see ``diffgym train --set``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import diffgym  # noqa: F401  (registers the tasks)
from diffgym.plugins import load_trainer, resolve_config
from diffgym.training.run import read_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="DiffGym/PointMass1D-v0")
    parser.add_argument("--steps", type=lambda s: int(float(s)), default=400_000)
    parser.add_argument("--eval-every", type=lambda s: int(float(s)), default=50_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--grid", required=True, help="JSON: setting name -> dotted overrides")
    parser.add_argument("--out", type=Path, default=None, help="run directories go here (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="ppo_sweep_"))
    trainer = load_trainer("ppo")
    print("| setting | seed | final success | final return | first success >= 0.9 at env steps | wall s |")
    print("|---|---|---|---|---|---|")
    for name, overrides in json.loads(args.grid).items():
        for seed in args.seeds:
            config = resolve_config("ppo", args.env, {
                **overrides, "seed": seed, "total_env_steps": args.steps,
                "eval_every_env_steps": args.eval_every, "run_dir": str(out / f"{name}_s{seed}")})
            run_dir = trainer.train(config, progress=False)
            rows = read_metrics(run_dir)
            evals = [r for r in rows if "eval_success_rate" in r]
            final = evals[-1]
            first = next((r["env_steps"] for r in evals if r["eval_success_rate"] >= 0.9), "never")
            print(f"| {name} | {seed} | {final['eval_success_rate']:.2f} | {final['eval_return']:.2f} | "
                  f"{first} | {final['wall_time']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
