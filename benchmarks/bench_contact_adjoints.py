"""The cost of gradients through contact: forward+backward against forward for the contact tasks, in and
out of contact (issue 27, item 2).

    OMP_NUM_THREADS=1 python benchmarks/bench_contact_adjoints.py [--sizes 64,4096] [--repeats 5]
    OMP_NUM_THREADS=1 python benchmarks/bench_contact_adjoints.py --trees /tmp/before,. [--rounds 3]

Per task and batch size, a 32-step rollout of ``DiffSim._step`` calls from the reset states, twice:

* ``contact``: a closed-loop controller drives every TPush pusher at full speed into the T's centre of mass
  and every PointNav2D point at full force into the nearest obstacle's centre; the timed window starts
  after a lead-in of ``LEAD_IN`` steps of it, when most bodies press on a surface (contact_fraction);
* ``free``: zero actions, so every body stays where it was reset, clear of every surface (the broad phase
  skips every contact).

The controller runs once, without gradients, to record its actions; the timed rollouts replay them open
loop. Times are CPU time (``time.process_time``: one thread, so other jobs on a shared machine matter less
than for wall-clock) of the forward without autograd and of the forward with autograd plus the backward of
the summed rewards into the actions, medians of ``--repeats`` samples after two warm-ups. A sample repeats
the rollout until it has run ``MIN_SAMPLE`` and takes the mean: a 64-env rollout lasts 1.5-25 ms, where one
run's time moved a ratio by 0.1 or more from run to run.

With ``--trees A,B`` the same measurement runs in alternating processes that import ``diffgym`` from each
source tree (``--rounds`` rounds, medians over the rounds), so a before/after comparison sees the same
machine load; it prints one table with both trees' times and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import gymnasium as gym
import torch

TASKS = ("DiffGym/TPush-v1", "DiffGym/PointNav2D-v0")
STEPS = 32
LEAD_IN = 48
"""Control steps the ``contact`` controller runs before the timed window, so the window starts in contact."""


def controller_actions(sim, state, scenario: str, steps: int = STEPS) -> torch.Tensor:
    """The (steps, B, 2) actions of ``scenario`` from ``state``, recorded closed loop without gradients."""
    actions = []
    with torch.no_grad():
        for _ in range(steps):
            if scenario == "free":
                action = torch.zeros(state.batch_size, 2, device=sim.device)
            elif hasattr(state, "block_pos"):  # TPush: the pusher towards the T's centre of mass
                action = state.block_pos - state.pusher_pos
            else:  # PointNav2D: the point towards the nearest obstacle's centre
                from diffgym.envs.point_nav_2d import OBSTACLES
                centres = torch.as_tensor(OBSTACLES[:, :2], device=sim.device)
                offsets = centres[None] - state.pos[:, None]
                nearest = offsets.norm(dim=-1).argmin(dim=1)
                action = offsets[torch.arange(state.batch_size), nearest]
            if scenario == "contact":
                action = action / action.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            actions.append(action)
            state = sim._step(state, action).state
    return torch.stack(actions)


MIN_SAMPLE = 0.05
"""CPU seconds a timed sample lasts at least (``sample``)."""


def sample(sim, state, actions: torch.Tensor, backward: bool) -> float:
    """CPU seconds of one rollout: the mean over as many as last ``MIN_SAMPLE`` together (at least one)."""
    calls, total = 0, 0.0
    while total < MIN_SAMPLE:
        total += rollout(sim, state, actions, backward)
        calls += 1
    return total / calls


def rollout(sim, state, actions: torch.Tensor, backward: bool) -> float:
    """CPU seconds of one rollout (forward without autograd, or forward and backward)."""
    start = time.process_time()
    if backward:
        leaf = actions.detach().requires_grad_(True)
        total = 0.0
        for action in leaf:
            out = sim._step(state, action)
            state, total = out.state, total + out.reward.sum()
        total.backward()
    else:
        with torch.no_grad():
            for action in actions:
                state = sim._step(state, action).state
    return time.process_time() - start


def measure(tasks, sizes, repeats: int) -> dict[str, dict[str, float]]:
    """{"task|N|scenario": {"fwd": seconds, "fwd_bwd": seconds}} (medians)."""
    results = {}
    for env_id in tasks:
        for batch in sizes:
            venv = gym.make_vec(env_id, num_envs=batch, device="cpu")
            venv.reset(seed=0)
            sim, state = venv.sim, venv.get_state()
            for scenario in ("contact", "free"):
                start = state
                if scenario == "contact":  # lead in: the timed window starts with the bodies pressed on
                    with torch.no_grad():
                        for action in controller_actions(sim, state, scenario, LEAD_IN):
                            start = sim._step(start, action).state
                actions = controller_actions(sim, start, scenario)
                times = {"fwd": [], "fwd_bwd": []}
                for repeat in range(repeats + 2):  # two warm-ups: kernel loads, allocator
                    for key, backward in (("fwd", False), ("fwd_bwd", True)):
                        seconds = sample(sim, start, actions, backward)
                        if repeat >= 2:
                            times[key].append(seconds)
                results[f"{env_id}|{batch}|{scenario}"] = {k: statistics.median(v) for k, v in times.items()}
            venv.close()
    return results


def compare(trees, args) -> None:
    rounds: dict[str, list[dict]] = {tree: [] for tree in trees}
    for _ in range(args.rounds):
        for tree in trees:  # alternating processes, so every tree sees the same load
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), OMP_NUM_THREADS="1")
            command = [sys.executable, __file__, "--json", "--sizes", args.sizes, "--repeats", str(args.repeats),
                       "--tasks", args.tasks]
            done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
            rounds[tree].append(json.loads(done.stdout.strip().splitlines()[-1]))
    names = " | ".join(f"fwd {i} (ms) | fwd+bwd {i} (ms) | ratio {i}" for i in range(1, len(trees) + 1))
    print(f"trees: {', '.join(f'{i}: {t}' for i, t in enumerate(trees, 1))}; medians of {args.rounds} rounds")
    print(f"| task | N | scenario | {names} |")
    print("|---|---:|---|" + "---:|" * (3 * len(trees)))
    for key in rounds[trees[0]][0]:
        env_id, batch, scenario = key.split("|")
        cells = []
        for tree in trees:
            fwd = statistics.median(r[key]["fwd"] for r in rounds[tree]) * 1e3
            both = statistics.median(r[key]["fwd_bwd"] for r in rounds[tree]) * 1e3
            cells.append(f"{fwd:.1f} | {both:.1f} | {both / fwd:.2f}")
        print(f"| {env_id} | {batch} | {scenario} | {' | '.join(cells)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,4096")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--trees", help="comma-separated source trees to compare in alternating processes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the raw medians as one JSON line")
    args = parser.parse_args()
    if args.trees:
        compare(args.trees.split(","), args)
        return
    torch.set_num_threads(1)
    import diffgym  # noqa: F401  (registers the tasks; imported here so --trees picks each tree's)
    results = measure(args.tasks.split(","), [int(s) for s in args.sizes.split(",")], args.repeats)
    if args.json:
        print(json.dumps(results))
        return
    print(f"diffgym from {os.path.dirname(diffgym.__file__)}")
    print("| task | N | scenario | fwd (ms) | fwd+bwd (ms) | ratio |")
    print("|---|---:|---|---:|---:|---:|")
    for key, value in results.items():
        env_id, batch, scenario = key.split("|")
        print(f"| {env_id} | {batch} | {scenario} | {value['fwd'] * 1e3:.1f} | {value['fwd_bwd'] * 1e3:.1f} | "
              f"{value['fwd_bwd'] / value['fwd']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
