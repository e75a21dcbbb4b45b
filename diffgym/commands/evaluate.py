"""``diffgym eval``: score a trained policy on its run's evaluation seeds and on fresh ones.

``diffgym eval RUN_DIR`` scores the run's policy twice with the shared ``evaluate_policy``, under the run's
own evaluation protocol (its ``wrappers``, and its ``eval_randomize`` drawn from the evaluation seed as its
evaluations drew them; ``--nominal``: the task's nominal physics instead): on the run's own evaluation
seeds (reproducing its last evaluation row when the checkpoint is the final one) and on fresh seeds the
run never used; ``--video FILE`` records a few episodes (``.mp4`` or ``.gif``). What can be checked before
the policy is loaded is checked first, so a bad flag never costs an evaluation."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from diffgym.commands.options import (add_policy_source_arguments, check_output_file, load_policy_source,
                                      seed_number)

HELP = "evaluate a trained policy on its run's and on fresh seeds; --video records episodes"

VIDEO_WRITERS = {".mp4": ("imageio", "imageio_ffmpeg"), ".gif": ("imageio",)}
"""The video formats ``--video`` writes (by the file's extension) and the modules each needs."""


FRESH_SEED_OFFSET = 1000
"""Fresh episodes are scored as if the run's seed were ``seed + FRESH_SEED_OFFSET``: seeds
``EVAL_SEED_OFFSET + SEED_STRIDE * (seed + 1000) + i``, which neither the run's training envs
(``SEED_STRIDE * seed + i`` and reset seeds >= 2^30) nor its evaluations used."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_policy_source_arguments(parser)
    parser.add_argument("--episodes", type=int, default=None, help="fresh episodes (default: the run's eval_episodes)")
    parser.add_argument("--seed", type=seed_number, default=None,
                        help=f"evaluation seed of the fresh episodes (default: the run's seed + {FRESH_SEED_OFFSET})")
    parser.add_argument("--env", default=None,
                        help="evaluate on another registered task id with the same spaces (default: the run's task)")
    parser.add_argument("--nominal", action="store_true",
                        help="every env at the task's nominal physics instead of the run's eval_randomize draws "
                             "(the run's wrappers stay: they are the task the policy acts in)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--deterministic", dest="deterministic", action="store_true", default=True,
                      help="the squashed mean action (default; what training evaluates)")
    mode.add_argument("--stochastic", dest="deterministic", action="store_false", help="sample actions")
    parser.add_argument("--video", default=None, metavar="FILE",
                        help="also record episodes to this .mp4 or .gif (default: no video)")
    parser.add_argument("--video-episodes", type=int, default=2, metavar="N", help="episodes the video shows")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the results to this JSON file (default: none)")


def run(args: argparse.Namespace) -> int:
    for flag, value in (("--episodes", args.episodes), ("--video-episodes", args.video_episodes)):
        if value is not None and value < 1:
            raise SystemExit(f"diffgym eval: {flag} must be >= 1, got {value}")
    if args.video:
        suffix = Path(args.video).suffix.lower()
        if suffix not in VIDEO_WRITERS:
            raise SystemExit(f"diffgym eval: --video {args.video}: expected a {' or '.join(VIDEO_WRITERS)} file")
        missing = [name for name in VIDEO_WRITERS[suffix] if importlib.util.find_spec(name) is None]
        if missing:
            raise SystemExit(f"diffgym eval: --video {suffix} needs {', '.join(missing)} "
                             "(pip install 'diffgym[video]')")
    for flag, path in (("--video", args.video), ("--json", args.json)):
        if path:
            try:
                check_output_file(path)
            except ValueError as error:
                raise SystemExit(f"diffgym eval: {flag}: {error}") from None
    return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    import diffgym  # noqa: F401  (registers the tasks)
    from diffgym import policy_commands as library

    torch.set_num_threads(1)
    policy = load_policy_source("eval", args)
    if policy is None:
        return 2
    try:
        # the run's own task too: one trained on a task of one's own needs it registered here
        library.check_policy_fits(policy, args.env or policy.config.env_id)
        library.check_protocol_fits(policy, args.env, args.nominal)
    except ValueError as error:
        print(f"diffgym eval: {error}", file=sys.stderr)
        return 2
    config = policy.config
    results: dict[str, Any] = {"checkpoint": str(policy.checkpoint), "env_steps": policy.env_steps,
                               "env_id": args.env or config.env_id, "deterministic": args.deterministic,
                               "wrappers": dict(config.wrappers),
                               "eval_randomize": {} if args.nominal else dict(config.eval_randomize)}
    if args.env is None and args.deterministic:
        results["run_seeds"] = library.evaluate(policy, config.eval_episodes, config.seed, nominal=args.nominal)
    fresh_seed = config.seed + FRESH_SEED_OFFSET if args.seed is None else args.seed
    results["fresh_seeds"] = {"seed": fresh_seed, **library.evaluate(
        policy, args.episodes or config.eval_episodes, fresh_seed, args.env, args.deterministic,
        nominal=args.nominal)}
    print(f"{config.algo} on {results['env_id']}, checkpoint {Path(results['checkpoint']).name} "
          f"({policy.env_steps:,} env steps)")
    print(f"  protocol: wrappers {_listed(results['wrappers'])}, physics "
          + (f"eval_randomize {_listed(results['eval_randomize'])}" if results["eval_randomize"] else "nominal"))
    for name, label in (("run_seeds", "the run's evaluation seeds"), ("fresh_seeds", f"fresh seeds (seed {fresh_seed})")):
        if name in results:
            r = results[name]
            print(f"  {label}: success {r['eval_success_rate']:.3f}, return {r['eval_return']:.2f} "
                  f"[95% CI {r['eval_return_ci_low']:.2f}, {r['eval_return_ci_high']:.2f}], "
                  f"episode length {r['eval_episode_length']:.1f}")
    if args.video:
        path = library.record_video(policy, args.video, args.video_episodes, fresh_seed, args.env,
                                     args.deterministic, nominal=args.nominal)
        results["video"] = str(path)
        print(f"  video: {path}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _listed(options: dict[str, Any]) -> str:
    return ", ".join(f"{name}={value}" for name, value in options.items()) or "none"
