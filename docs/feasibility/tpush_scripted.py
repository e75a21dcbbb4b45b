"""Scripted reference controllers on TPush: what touching the block without choosing a face does.

    .venv/bin/python docs/feasibility/tpush_scripted.py [--env DiffGym/TPush-v1] [--episodes 64]

Zero actions, uniform random actions, and "chase": drive the pusher straight at the block's centre of
mass at a fixed fraction of full speed (no notion of which face to push). Prints and writes
``docs/feasibility/<task>_scripted.json``: mean and std of the return and the last-step success rate
over the same seeded episodes for every controller.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gymnasium as gym
import torch

import diffgym  # noqa: F401  (registers the tasks)
from diffgym.training.spec import task_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="DiffGym/TPush-v1")
    parser.add_argument("--episodes", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    env = gym.make(args.env)
    sim = env.unwrapped.sim
    env.close()
    batch = args.episodes
    noise = torch.Generator().manual_seed(0)

    def chase(speed: float):
        def act(state):
            direction = state.block_pos - state.pusher_pos
            return speed * direction / direction.norm(dim=1, keepdim=True)
        return act

    controllers = {"zero": lambda state: torch.zeros(batch, 2),
                   "random": lambda state: torch.rand(batch, 2, generator=noise) * 2 - 1,
                   **{f"chase {speed}": chase(speed) for speed in (0.2, 0.5, 1.0)}}
    results = {}
    for name, act in controllers.items():
        state = sim.reset(torch.arange(batch, dtype=torch.int32) + 777, torch.zeros(batch, dtype=torch.int32))
        returns = torch.zeros(batch, dtype=torch.float64)
        for _ in range(sim.max_episode_steps):
            out = sim.step(state, act(state))
            state, returns = out.state, returns + out.reward.double()
        results[name] = {"return_mean": round(float(returns.mean()), 2), "return_std": round(float(returns.std()), 2),
                         "success_rate": float(out.success.float().mean())}
        print(f"{name:<10} return {results[name]['return_mean']:8.2f} +- {results[name]['return_std']:6.2f}  "
              f"success {results[name]['success_rate']:.2f}")
    out_path = Path(__file__).parent / f"{task_name(args.env)}_scripted.json"
    out_path.write_text(json.dumps({"env_id": args.env, "episodes": batch, "controllers": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
