"""The Ray runner on a local Ray instance (2 CPUs): results equal the local runner's, outputs land in the
driver's run directories, a killed worker's run is retried from its checkpoint, a failing run does not
stop the sweep, Ctrl-C cancels the outstanding runs."""

import _thread
import functools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray runner needs the ray extra: pip install 'diffgym[ray]'")

from diffgym.cli import main  # noqa: E402
from diffgym.experiments import report  # noqa: E402
from diffgym.experiments.compare import compare_configs  # noqa: E402
from diffgym.experiments.ray_runner import RayRunner  # noqa: E402
from diffgym.experiments.sweep import LocalRunner, SweepFailed, is_finished  # noqa: E402
from diffgym.plugins import register_trainer  # noqa: E402
from diffgym.training.run import Run, lock_run_dir, read_metrics  # noqa: E402
from diffgym.training.spec import TrainConfig  # noqa: E402

ENV = "DiffGym/PointMass1D-v0"


@pytest.fixture(scope="module")
def local_ray():
    # the scripted trainers below are sent to the workers by value: Ray's workers need not import tests/
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _deterministic(rows: list[dict]) -> list[dict]:
    """Metrics rows without what measures time."""
    return [{k: v for k, v in row.items() if k not in ("wall_time", "eval_wall_time") and not k.startswith("time/")} for row in rows]


def test_compare_on_ray_equals_the_local_runner(tmp_path, local_ray, capsys, monkeypatch):
    """`diffgym compare --runner ray`: the installed trainers on Ray workers write, into the driver's
    --out, the same metrics and configs as the process pool for the same seeds."""
    # the report's 2000-rep bootstrap would take most of this test; its numbers are not checked here
    monkeypatch.setattr(report, "iqm_with_ci", functools.partial(report.iqm_with_ci, reps=50))
    common = ["compare", "--env", ENV, "--algos", "apg,ppo", "--seeds", "1", "--env-steps", "1000",
              "--eval-every", "500"]
    assert main([*common, "--runner", "ray", "--out", str(tmp_path / "ray")]) == 0
    assert "2 to run on Ray, 2 at a time" in capsys.readouterr().out
    local = compare_configs(ENV, ["apg", "ppo"], 1, 1000, tmp_path / "local", eval_every=500)
    LocalRunner(workers=1).run(local)
    for config in local:
        name = Path(config.run_dir).name
        on_ray = tmp_path / "ray" / "runs" / name
        rows = read_metrics(on_ray)
        assert rows and _deterministic(rows) == _deterministic(read_metrics(config.run_dir)), name
        assert TrainConfig.load(on_ray / "config.yaml") == config.replace(run_dir=str(on_ray))
        final = sorted(p.name for p in (Path(config.run_dir) / "checkpoints").iterdir())[-1]
        assert (on_ray / "checkpoints" / final).exists(), f"{name}: the final checkpoint did not come back"
        assert list(on_ray.glob("events.out.tfevents.*")), f"{name}: no TensorBoard events came back"
        lock_run_dir(on_ray).close()  # the driver's copy is no longer locked once its run ended
    assert (tmp_path / "ray" / "report.md").exists()
    ray_configs = compare_configs(ENV, ["apg", "ppo"], 1, 1000, tmp_path / "ray", eval_every=500)
    assert all(map(is_finished, ray_configs))
    RayRunner().run(ray_configs)  # finished-run detection works on the copied outputs: nothing to run
    assert "all 2 runs already finished" in capsys.readouterr().out


def test_tune_trials_run_as_ray_tasks(tmp_path, local_ray):
    """`diffgym tune --runner ray`: the trials of the installed APG trainer run on Ray workers, which load
    the study from its journal and report to it; two at a time, as the instance holds two runs."""
    from diffgym.experiments.tune import tune

    runner = RayRunner()
    assert runner.workers == 2 and runner.files_shared_with_workers
    report = tune(ENV, "apg", trials=2, env_steps=256, out_dir=tmp_path, runner=runner, eval_every=128)
    assert report.read_text().count("| complete |") == 2
    for trial in ("trial_000", "trial_001"):
        evals = [r for r in read_metrics(tmp_path / "runs" / trial) if "eval_success_rate" in r]
        assert evals[0]["env_steps"] == 0 and evals[-1]["env_steps"] >= 256


class CheckpointingTrainer:
    """Evaluates every ``eval_every_env_steps`` and checkpoints each evaluation; resumes from the
    latest checkpoint. On its first attempt it kills its own process (like the OOM killer) once the
    checkpoint at ``algo_params.die_at`` has reached the driver's copy (``algo_params.driver_dir``);
    a seed listed in ``algo_params.fail_seeds`` raises instead. Writes ``starts.json``: the env steps
    each attempt started from."""

    name = "checkpointing"

    def default_config(self, env_id):
        return {"num_envs": 1, "eval_episodes": 1, "algo_params": {"die_at": -1, "fail_seeds": [], "driver_dir": ""}}

    def train(self, config, progress=True):
        params = config.algo_params
        if config.seed in params["fail_seeds"]:
            raise RuntimeError("diverged")
        with Run(config, progress=False) as run:
            saved = run.load_latest_checkpoint()
            steps, starts = (saved["env_steps"], saved["starts"]) if saved else (-config.eval_every_env_steps, [])
            starts = [*starts, max(steps, 0)]
            if saved:
                run.resume_from(steps)
            while steps < config.total_env_steps:
                steps += config.eval_every_env_steps
                run.log(steps, steps // 10, eval_return=-100.0 / (steps + 1) + config.seed,
                        eval_success_rate=float(steps >= 40))
                run.save_checkpoint({"env_steps": steps, "starts": starts, "config": run.config.to_dict()}, steps)
                if steps == params["die_at"] and len(starts) == 1:
                    copied = Path(params["driver_dir"]) / "checkpoints" / f"step_{steps:012d}.pt"
                    deadline = time.monotonic() + 60
                    while not copied.exists() and time.monotonic() < deadline:
                        time.sleep(0.05)
                    os.kill(os.getpid(), signal.SIGKILL)
            (run.dir / "starts.json").write_text(json.dumps(starts))
        return run.dir


def _config(tmp_path, seed=0, **params) -> TrainConfig:
    run_dir = tmp_path / "runs" / f"checkpointing__s{seed}"
    return TrainConfig(algo="checkpointing", env_id=ENV, seed=seed, num_envs=1, total_env_steps=60,
                       eval_every_env_steps=10, eval_episodes=1, run_dir=str(run_dir),
                       algo_params={"die_at": -1, "fail_seeds": [], "driver_dir": str(run_dir), **params})


def test_a_killed_worker_is_retried_and_resumes_from_its_checkpoint(tmp_path, local_ray, capsys):
    register_trainer("checkpointing", CheckpointingTrainer())
    config = _config(tmp_path, die_at=30)
    RayRunner(sync_every=0.1).run([config])
    assert "checkpointing__s0: its worker died" in capsys.readouterr().err
    assert json.loads((Path(config.run_dir) / "starts.json").read_text()) == [0, 30]
    # every evaluation exactly once, as in an uninterrupted run
    reference = _config(tmp_path / "reference")
    LocalRunner(workers=1).run([reference])
    assert _deterministic(read_metrics(config.run_dir)) == _deterministic(read_metrics(reference.run_dir))
    assert [row["env_steps"] for row in read_metrics(config.run_dir)] == [0, 10, 20, 30, 40, 50, 60]


def test_a_failing_run_is_reported_by_name_and_the_sweep_goes_on(tmp_path, local_ray, capsys):
    register_trainer("checkpointing", CheckpointingTrainer())
    configs = [_config(tmp_path, seed, fail_seeds=[1]) for seed in (0, 1)]
    expected = r"1 of 2 runs failed: checkpointing__s1 \(RuntimeError: diverged\)"
    with pytest.raises(SweepFailed, match=expected) as failed:
        RayRunner(sync_every=0.1).run(configs)
    assert failed.value.failures == [("checkpointing__s1", "RuntimeError: diverged")]
    assert "checkpointing__s1 failed: RuntimeError: diverged" in capsys.readouterr().out
    assert [is_finished(c) for c in configs] == [True, False]


def _busy(seconds: float) -> None:
    """Stands in for a training loop: Python code that a cancelled task's KeyboardInterrupt can stop."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.slow  # in one full-suite run on the shared VM the CPUs were not free again: see the note below
def test_ctrl_c_cancels_the_outstanding_runs(local_ray):
    import ray

    runner = RayRunner()
    # Ctrl-C while two hour-long items run and a third waits for a CPU
    threading.Timer(3.0, _thread.interrupt_main).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        runner.map(_busy, [(3600,), (3600,), (3600,)])
    assert time.monotonic() - started < 30
    # both CPUs are free again: the cancelled items no longer hold them. Polled with a deadline rather than
    # by mapping more work, which would wait forever if they did not (it did once after the whole suite,
    # with earlier tests' tasks still alive; alone this test passes in seconds)
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() - started < 60:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) >= 2
    assert runner.map(int, [("1",), ("2",)]) == [1, 2]


def test_runner_flags_are_checked(tmp_path):
    common = ["compare", "--env", ENV, "--algos", "apg", "--env-steps", "100", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="--cpus-per-run, --shared-out need --runner ray"):
        main([*common, "--cpus-per-run", "2", "--shared-out"])
    with pytest.raises(SystemExit, match="cpus_per_run must be > 0, got 0"):
        main([*common, "--runner", "ray", "--cpus-per-run", "0"])
    with pytest.raises(SystemExit, match="--workers sizes a local Ray instance"):
        main([*common, "--runner", "ray", "--workers", "2", "--ray-address", "127.0.0.1:6379"])
    with pytest.raises(ValueError, match="trains on cuda but --gpus-per-run is 0"):
        RayRunner().run([TrainConfig(algo="apg", env_id=ENV, device="cuda", run_dir=str(tmp_path / "gpu"))])
