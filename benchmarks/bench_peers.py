"""DiffGym against its peers, interleaved in one run, printed as ratios (issue 12; docs/benchmarks.md).

    make bench-peers                      # installs the peers into .venv-peers, then runs this there
    python benchmarks/bench_peers.py [--device cpu] [--quick] [--sizes 64,4096] [--tasks ...]

1. Single-env `step` rate, random actions, after warm-up: DiffGym/FrankaReach-v0 against panda-gym's
   PandaReach-v3 (PyBullet), DiffGym/TPush-v1 and -v0 against gym-pusht's PushT-v0 (state observations).
2. Batched rollouts of --steps control steps at N envs: forward (no gradient) and forward+backward
   (gradient of the summed reward with respect to every action) of `differentiable_step` against a JAX
   twin (jit + vmap + lax.scan, jax.grad) and a pure-torch twin (benchmarks/twins.py) of PointMass1D and
   FrankaReach. Before timing, every twin's rewards, final state and action gradient are checked against
   DiffGym's on the same start states and actions (float32 tolerance): a mismatch stops the run.

Each figure is the median of --repeats timed samples, the implementations taking turns within every
repeat, after three warm-up calls (the first compiles Warp kernels and XLA programs); a sample repeats a
call that is shorter than 20 ms until it lasts about 20 ms. Ratios are DiffGym's
rate over the peer's: above 1, DiffGym is faster.

Threads: torch runs one thread (torch.set_num_threads(1)); XLA gets XLA_FLAGS=
"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" unless XLA_FLAGS is already set, and
JAX_PLATFORMS=cpu with --device cpu. With --device cuda, DiffGym and the torch twin run on the GPU and
JAX on a GPU only when a CUDA jaxlib is installed (otherwise on the CPU, said in the output); panda-gym
and gym-pusht are CPU simulators whatever the device.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from importlib import metadata

XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
# one CPU thread for every library, set before NumPy, torch, Warp or XLA read these at import
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", XLA_ONE_THREAD)

import numpy as np  # noqa: E402
SINGLE_PAIRS = (("DiffGym/FrankaReach-v0", "PandaReach-v3"), ("DiffGym/TPush-v1", "PushT-v0"),
                ("DiffGym/TPush-v0", "PushT-v0"))
TWIN_TASKS = ("DiffGym/PointMass1D-v0", "DiffGym/FrankaReach-v0")
PEER_PACKAGES = {"PandaReach-v3": "panda-gym", "PushT-v0": "gym-pusht", "jax": "jax"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:k], for DiffGym and the twins")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: N=64 only, 8-step rollouts, 100 single-env steps, 2 repeats")
    parser.add_argument("--sizes", default=None, help="batch sizes N, comma-separated (default 64,4096)")
    parser.add_argument("--steps", type=int, default=None, help="control steps per batched rollout (default 32)")
    parser.add_argument("--single-steps", type=int, default=None, help="single-env steps per timed run (default 500)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 7)")
    parser.add_argument("--tasks", default=",".join(TWIN_TASKS), help="tasks of the twin comparison")
    parser.add_argument("--forward-only", action="store_true", help="batched part: forward rollouts only")
    parser.add_argument("--skip-single", action="store_true", help="leave out the single-env comparison")
    parser.add_argument("--skip-batched", action="store_true", help="leave out the twin comparison")
    parser.add_argument("--allow-missing", action="store_true",
                        help="run without peers that are not installed (their columns read n/a) instead of "
                             "stopping; for smoke tests in the project venv")
    args = parser.parse_args(argv)
    quick = args.quick
    args.sizes = [int(n) for n in (args.sizes or ("64" if quick else "64,4096")).split(",") if n]
    args.steps = args.steps or (8 if quick else 32)
    args.single_steps = args.single_steps or (100 if quick else 500)
    args.repeats = args.repeats or (2 if quick else 7)
    args.tasks = [t for t in args.tasks.split(",") if t]
    for task in args.tasks:
        if task not in TWIN_TASKS:
            parser.error(f"--tasks: no twin of {task}; choose from {', '.join(TWIN_TASKS)}")
    if min(args.sizes) < 1 or args.steps < 1 or args.single_steps < 1 or args.repeats < 1:
        parser.error("--sizes, --steps, --single-steps and --repeats must be positive")
    return args


def configure_jax(device: str) -> None:
    """Before JAX is imported: with --device cpu, no probing for GPU plugins, and JAX's arrays on the CPU
    like everything else."""
    if device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def missing_peers(args) -> list[str]:
    needed = set()
    if not args.skip_single:
        needed |= {"panda-gym", "gym-pusht"}
    if not args.skip_batched:
        needed.add("jax")
    return sorted(p for p in needed if version(p) is None)


# --------------------------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict, device: str, repeats: int, warmup: int = 3, sample_s: float = 0.02) -> dict[str, float]:
    """Median seconds per call of each function; every repeat times each one in turn.

    A timed sample is `calls` back-to-back calls, `calls` chosen from the last warm-up call so that a
    sample lasts about `sample_s`: a JAX rollout of ~20 us timed alone is at the mercy of one scheduler
    tick on a shared machine, while a 20 ms sample of a thousand of them is not."""
    calls = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
        calls[name] = max(1, min(10_000, round(sample_s / max(time.perf_counter() - start, 1e-9))))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(t) for name, t in times.items()}


# --------------------------------------------------------------------------------------------- single env
def make_single(env_id: str, device: str):
    import gymnasium as gym

    if env_id.startswith("DiffGym/"):
        with warnings.catch_warnings():  # TPush-v0 is measured on purpose: no "out of date" warning
            warnings.simplefilter("ignore", DeprecationWarning)
            return gym.make(env_id, device=device)
    if env_id == "PandaReach-v3":
        import panda_gym  # noqa: F401  (registers the Panda tasks)

        from diffgym.core.native import native_output_silenced

        with native_output_silenced():  # PyBullet's banner and renderer arguments, printed from C
            return gym.make("PandaReach-v3")
    if env_id == "PushT-v0":
        import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)

        return gym.make("gym_pusht/PushT-v0", obs_type="state")
    raise ValueError(f"unknown env {env_id}")


def single_runner(env, steps: int, seed: int):
    """A function that takes `steps` random-action steps, resetting at episode ends (as a user's loop)."""
    space = env.action_space
    low, high = space.low.astype(float), space.high.astype(float)
    actions = np.random.default_rng(seed).uniform(low, high, (steps, *space.shape)).astype(space.dtype)
    env.reset(seed=seed)

    def run():
        for a in actions:
            _, _, terminated, truncated, _ = env.step(a)
            if terminated or truncated:
                env.reset()

    return run


def single_env_table(args, available: set[str]) -> list[str]:
    lines = [f"### Single-env `step`, steps/s ({args.single_steps} random-action steps per run, "
             f"DiffGym on {args.device}; peers on the CPU)", "",
             "| DiffGym task | steps/s | peer | steps/s | DiffGym / peer |", "|---|---:|---|---:|---:|"]
    for ours, peer in SINGLE_PAIRS:
        fns = {ours: single_runner(make_single(ours, args.device), args.single_steps, 0)}
        if PEER_PACKAGES[peer] in available:
            fns[peer] = single_runner(make_single(peer, "cpu"), args.single_steps, 0)
        t = interleaved(fns, args.device, args.repeats)
        ours_rate = args.single_steps / t[ours]
        if peer in t:
            peer_rate = args.single_steps / t[peer]
            lines.append(f"| {ours} | {ours_rate:,.0f} | {peer} | {peer_rate:,.0f} | {ours_rate / peer_rate:.3g}x |")
        else:
            lines.append(f"| {ours} | {ours_rate:,.0f} | {peer} | n/a (not installed) | n/a |")
        print(lines[-1], file=sys.stderr)  # progress, while the table is printed at the end
    return lines


# --------------------------------------------------------------------------------------------- twins
class TwinMismatch(RuntimeError):
    pass


def check_close(what: str, ours, reference, rtol: float, atol: float) -> None:
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if ours.shape != reference.shape:
        raise TwinMismatch(f"{what}: shape {ours.shape} != DiffGym's {reference.shape}")
    error = np.abs(ours - reference)
    bound = atol + rtol * np.abs(reference)
    if not (error <= bound).all():
        worst = tuple(int(i) for i in np.unravel_index(np.argmax(error - bound), error.shape))
        raise TwinMismatch(f"{what} differs from DiffGym's beyond float32 tolerance (rtol {rtol}, atol {atol}): "
                           f"max abs error {error.max():.3g} (at {worst}: {ours[worst]:.7g} vs {reference[worst]:.7g})")


def batched_case(task: str, n: int, args, jax_twin_device):
    """Timed functions of every implementation for one (task, N), after checking the twins against DiffGym."""
    import gymnasium as gym
    import torch
    from twins import JaxTwin, TorchTwin, constants_for, start_state

    device = args.device
    venv = gym.make_vec(task, num_envs=n, device=device)
    venv.reset(seed=0)
    start = venv.get_state()
    act_dim = venv.single_action_space.shape[0]
    actions = (torch.rand(args.steps, n, act_dim, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    constants = constants_for(venv.sim)

    def diffgym_forward():
        with torch.no_grad():
            state = start
            for a in actions:
                state = venv.differentiable_step(state, a).state
        return state

    def diffgym_rewards(leaf):
        state, rewards = start, []
        for a in leaf:
            out = venv.differentiable_step(state, a)
            state = out.state
            rewards.append(out.reward)
        return torch.stack(rewards), state

    def diffgym_backward():
        leaf = actions.clone().requires_grad_(True)
        diffgym_rewards(leaf)[0].sum().backward()
        return leaf.grad

    def fused_forward():
        with torch.no_grad():
            return venv.differentiable_rollout(start, actions).final_state

    def fused_backward():
        leaf = actions.clone().requires_grad_(True)
        venv.differentiable_rollout(start, leaf).reward.sum().backward()
        return leaf.grad

    torch_twin = TorchTwin(constants, device)
    twin_start = tuple(t.clone() for t in start_state(start))

    def torch_forward():
        with torch.no_grad():
            return torch_twin.rollout(twin_start, actions)

    def torch_backward():
        leaf = actions.clone().requires_grad_(True)
        torch_twin.rollout(twin_start, leaf)[0].sum().backward()
        return leaf.grad

    # the reference: DiffGym's rewards, final state and gradient on these start states and actions
    leaf = actions.clone().requires_grad_(True)
    ref_rewards, ref_final = diffgym_rewards(leaf)
    ref_rewards.sum().backward()
    ref_rewards, ref_grad = ref_rewards.detach().cpu().numpy(), leaf.grad.cpu().numpy()
    ref_final = [t.detach().cpu().numpy() for t in start_state(ref_final)]
    # FrankaReach's twins compose the chain as rotation matrices (Warp: quaternions), hence the wider
    # absolute tolerance of the gradient; both are float32 round-off, 1e-2 of the smallest gradients.
    rtol, atol = 1e-4, 1e-4
    name = task.split("/")[1]

    with torch.no_grad():
        twin_rewards, twin_final = torch_twin.rollout(twin_start, actions)
    check_close(f"{name} torch twin rewards (N={n})", twin_rewards.cpu(), ref_rewards, rtol, atol)
    for k, (ours, ref) in enumerate(zip(twin_final, ref_final)):
        check_close(f"{name} torch twin final state[{k}] (N={n})", ours.cpu(), ref, rtol, atol)
    check_close(f"{name} torch twin action gradient (N={n})", torch_backward().cpu(), ref_grad, rtol, atol)

    # the fused rollout is the stepped loop bit for bit (tests/test_multistep.py); checked here as well
    with torch.no_grad():
        fused = venv.differentiable_rollout(start, actions)
    check_close(f"{name} fused rollout rewards (N={n})", fused.reward.cpu(), ref_rewards, 0.0, 0.0)
    for k, (ours, ref) in enumerate(zip(start_state(fused.final_state), ref_final)):
        check_close(f"{name} fused rollout final state[{k}] (N={n})", ours.cpu(), ref, 0.0, 0.0)
    check_close(f"{name} fused rollout action gradient (N={n})", fused_backward().cpu(), ref_grad, 0.0, 0.0)
    fns = {"diffgym fwd": diffgym_forward, "fused fwd": fused_forward, "torch fwd": torch_forward}
    if not args.forward_only:
        fns |= {"diffgym fwd+bwd": diffgym_backward, "fused fwd+bwd": fused_backward, "torch fwd+bwd": torch_backward}

    if jax_twin_device is not None:
        jax_twin = JaxTwin(constants, jax_twin_device)
        jax_start = tuple(jax_twin.put(t.cpu()) for t in start_state(start))
        jax_actions = jax_twin.put(actions.cpu())
        jax_rewards, jax_final = jax_twin.rollout(jax_start, jax_actions)
        check_close(f"{name} JAX twin rewards (N={n})", jax_rewards, ref_rewards, rtol, atol)
        for k, (ours, ref) in enumerate(zip(jax_final, ref_final)):
            check_close(f"{name} JAX twin final state[{k}] (N={n})", ours, ref, rtol, atol)
        check_close(f"{name} JAX twin action gradient (N={n})", jax_twin.grad(jax_start, jax_actions), ref_grad,
                    rtol, atol)
        fns["jax fwd"] = lambda: jax_twin.forward(jax_start, jax_actions).block_until_ready()
        if not args.forward_only:
            fns["jax fwd+bwd"] = lambda: jax_twin.grad(jax_start, jax_actions).block_until_ready()
    return fns


def jax_device(args, available: set[str]):
    """The JAX device the JAX twin runs on, a note on it, or (None, why) without JAX."""
    if "jax" not in available:
        return None, "JAX twin: n/a (jax not installed)"
    import jax

    if args.device.startswith("cuda"):
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        if gpus:
            return gpus[0], f"JAX twin on {gpus[0]}"
        return jax.devices("cpu")[0], ("JAX twin on the CPU: this jaxlib has no CUDA backend (install "
                                       "jax[cuda12] for a GPU twin), so its ratios compare GPU DiffGym with CPU JAX")
    return jax.devices("cpu")[0], f"JAX twin on {jax.devices('cpu')[0]} (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})"


def rate(seconds: float | None, work: int) -> str:
    return "n/a" if seconds is None else f"{work / seconds:,.0f}"


def ratio(ours: float | None, theirs: float | None) -> str:
    # times in, rate ratio out; three significant digits, so that 0.031x does not read as 0.03x
    return "n/a" if ours is None or theirs is None else f"{theirs / ours:.3g}x"


def batched_tables(args, available: set[str]) -> list[str]:
    jax_dev, jax_note = jax_device(args, available)
    modes = ["fwd"] if args.forward_only else ["fwd", "fwd+bwd"]
    rates = [f"### Batched rollouts, env-steps/s ({args.steps}-step rollouts; DiffGym and torch twin on "
             f"{args.device}; {jax_note})", "",
             "| task | N | " + " | ".join(f"{impl} {m}" for m in modes
                                         for impl in ("DiffGym step loop", "DiffGym fused", "JAX twin", "torch twin"))
             + " |", "|---|---:|" + "---:|" * (4 * len(modes))]
    ratios = ["### DiffGym / twin (rate ratio; above 1: DiffGym faster; loop: `differentiable_step` per step, "
              "fused: `differentiable_rollout`)", "",
              "| task | N | " + " | ".join(f"{ours} vs {impl} {m}" for m in modes for ours in ("loop", "fused")
                                          for impl in ("JAX", "torch")) + " |",
              "|---|---:|" + "---:|" * (4 * len(modes))]
    for task in args.tasks:
        for n in args.sizes:
            t = interleaved(batched_case(task, n, args, jax_dev), args.device, args.repeats)
            work = n * args.steps
            cells, ratio_cells = [], []
            for m in modes:
                cells += [rate(t.get(f"{impl} {m}"), work) for impl in ("diffgym", "fused", "jax", "torch")]
                for ours in ("diffgym", "fused"):
                    ratio_cells += [ratio(t.get(f"{ours} {m}"), t.get(f"{impl} {m}")) for impl in ("jax", "torch")]
            rates.append(f"| {task} | {n} | " + " | ".join(cells) + " |")
            ratios.append(f"| {task} | {n} | " + " | ".join(ratio_cells) + " |")
            print(rates[-1], file=sys.stderr)
    return rates + [""] + ratios


# --------------------------------------------------------------------------------------------- main
def machine_line(args, available: set[str]) -> str:
    import torch
    import warp as wp

    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    load = "n/a"
    if hasattr(os, "getloadavg"):
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    peers = ", ".join(f"{p} {version(p) or 'not installed'}" for p in ("panda-gym", "gym-pusht", "jax", "jaxlib",
                                                                       "pybullet", "pymunk"))
    gpu = ""
    if args.device.startswith("cuda"):
        gpu = f"; GPU {torch.cuda.get_device_name(torch.device(args.device))}"
    return (f"machine: {cpu}, {os.cpu_count()} cores, load average {load}{gpu}; device {args.device}; "
            f"torch {torch.__version__} ({torch.get_num_threads()} thread), warp {wp.config.version}, "
            f"Python {platform.python_version()}; {peers}")


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_jax(args.device)
    missing = missing_peers(args)
    if missing and not args.allow_missing:
        print(f"bench_peers: {', '.join(missing)} not installed in {sys.prefix}; run `make bench-peers` (it "
              f"installs the peers into .venv-peers) or pass --allow-missing", file=sys.stderr)
        return 2

    import torch

    import diffgym  # noqa: F401  (registers the tasks)

    torch.set_num_threads(1)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench_peers: --device {args.device} but torch {torch.__version__} sees no CUDA GPU", file=sys.stderr)
        return 2
    available = {p for p in ("panda-gym", "gym-pusht", "jax") if p not in missing}
    print(machine_line(args, available))
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}; medians of {args.repeats} "
          f"interleaved samples (each >= ~20 ms) after 3 warm-up calls\n")
    try:
        if not args.skip_single:
            print("\n".join(single_env_table(args, available)) + "\n", flush=True)
        if not args.skip_batched:
            print("\n".join(batched_tables(args, available)) + "\n", flush=True)
    except TwinMismatch as error:
        print(f"bench_peers: {error}; the comparison would not be of the same dynamics", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
