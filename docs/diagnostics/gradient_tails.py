"""How heavy-tailed are a policy's per-rollout analytic gradients, and does one env set a batch's step?

    .venv/bin/python docs/diagnostics/gradient_tails.py RUN [RUN ...] [--env DiffGym/TPush-v1]
        [--rollouts 2048] [--horizon 16] [--start-after 0,40,150] [--batch 32]

For each run directory (its latest checkpoint) and each ``--start-after`` W, rolls ``--rollouts`` start
states out for ``--horizon`` steps after W steps of the policy's deterministic actions (as
``diffgym grad-stats --start-after`` does) and reports, over the per-rollout analytic gradients of the
h-step return: the median / 90th / 99th percentile and the largest norm, the share of the summed squared
norms carried by the largest 1 %, and, over random batches of ``--batch`` rollouts (an APG update's envs),
the median of (largest norm in the batch) / (norm of the batch's sum). Prints one line per row and writes
them to ``--out`` (default ``gradient_tails.json``; the TPush figures in ``docs/diagnostics.md`` are in
``docs/diagnostics/TPush-v1_solved/gradient_tails.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gymnasium as gym
import torch

import diffgym  # noqa: F401  (registers the tasks)
from diffgym.diagnostics import DIAGNOSTICS_SEED_OFFSET, rollout_gradients
from diffgym.policy import load_policy


def tails(per_rollout: torch.Tensor, batch: int, generator: torch.Generator) -> dict[str, float]:
    norms = per_rollout.norm(dim=1)
    p50, p90, p99 = (float(q) for q in torch.quantile(norms, torch.tensor([0.5, 0.9, 0.99])))
    squared = (norms ** 2).sort(descending=True).values
    top = max(1, len(squared) // 100)
    batches = torch.randperm(len(norms), generator=generator)[: len(norms) // batch * batch].view(-1, batch)
    share = torch.stack([norms[b].max() / per_rollout[b].sum(dim=0).norm() for b in batches])
    return {"norm_median": p50, "norm_p90": p90, "norm_p99": p99, "norm_max": float(norms.max()),
            "top_percent_share_of_squared_norms": float(squared[:top].sum() / squared.sum()),
            "batch_largest_env_over_sum_median": float(share.median())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--env", default="DiffGym/TPush-v1")
    parser.add_argument("--rollouts", type=int, default=2048)
    parser.add_argument("--horizon", type=int, default=16)
    parser.add_argument("--start-after", default="0,40,150")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default="gradient_tails.json")
    args = parser.parse_args()
    starts = [int(w) for w in args.start_after.split(",")]
    episode = gym.spec(args.env).max_episode_steps
    if args.batch < 2 or args.batch > args.rollouts:
        parser.error(f"--batch must be between 2 and --rollouts ({args.rollouts}), got {args.batch}")
    if episode is not None and max(starts) + args.horizon > episode:
        parser.error(f"--start-after {max(starts)} plus --horizon {args.horizon} must fit in the episode ({episode} steps)")
    torch.set_num_threads(1)
    venv = gym.make_vec(args.env, num_envs=args.rollouts, vectorization_mode="vector_entry_point")
    seeds = [DIAGNOSTICS_SEED_OFFSET + i for i in range(args.rollouts)]
    rows = []
    for run in args.runs:
        loaded = load_policy(run)
        gamma = float(loaded.config.algo_params.get("gamma", 0.99))
        for start_after in starts:
            torch.manual_seed(0)
            analytic, _, info = rollout_gradients(venv, loaded.model, loaded.normalizer, seeds, args.horizon,
                                                   gamma, start_after)
            row = {"run": run, "start_after": start_after, "horizon": args.horizon, "rollouts": analytic.shape[0],
                   **tails(analytic, args.batch, torch.Generator().manual_seed(0)), "nonfinite": info["nonfinite"]}
            rows.append(row)
            print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    venv.close()
    Path(args.out).write_text(json.dumps({"env_id": args.env, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
