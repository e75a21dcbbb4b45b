"""Sweeps, compare and ablate on a scripted trainer: the report's numbers follow from the metrics."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffgym.experiments import ablate as ablate_mod
from diffgym.experiments.compare import compare
from diffgym.experiments.report import load_run, threshold_table, group
from diffgym.experiments.sweep import LocalRunner, is_finished, load_sweep, save_sweep
from diffgym.plugins import register_trainer
from diffgym.training.run import Run, read_metrics
from diffgym.training.spec import TrainConfig

ENV = "DiffGym/PointMass1D-v0"


class ScriptedTrainer:
    """Writes an evaluation curve that reaches 100 % success after ``solve_at`` env steps (no learning)."""

    def __init__(self, name: str, solve_at: int, grad_steps_per_eval: int):
        self.name, self.solve_at, self.grad_steps_per_eval = name, solve_at, grad_steps_per_eval

    def default_config(self, env_id):
        return {"num_envs": 4, "algo_params": {"segment_length": 8, "bootstrap": "none"}}

    def train(self, config):
        solve_at = self.solve_at * (1 + config.seed) / config.algo_params["segment_length"] * 8
        with Run(config, progress=False) as run:
            steps = 0
            for i in range(1, config.total_env_steps // config.eval_every_env_steps + 1):
                steps = i * config.eval_every_env_steps
                run.log(steps, i * self.grad_steps_per_eval, eval_return=-1.0 / i,
                        eval_success_rate=float(steps >= solve_at))
        return run.dir


@pytest.fixture
def trainers():
    register_trainer("slow_algo", ScriptedTrainer("slow_algo", solve_at=50_000, grad_steps_per_eval=10))
    register_trainer("fast_algo", ScriptedTrainer("fast_algo", solve_at=5_000, grad_steps_per_eval=100))


def test_compare_report_and_ratios(tmp_path, trainers):
    # the contender is the first algorithm, the baseline the last: ratios are baseline / contender
    report = compare(ENV, ["fast_algo", "slow_algo"], seeds=2, env_steps=100_000, out_dir=tmp_path,
                     runner=LocalRunner(workers=1), eval_every=5_000)
    assert "Ratio slow_algo/fast_algo" in report.read_text()
    assert report.exists()
    for name in ("eval_success_rate_vs_env_steps.png", "eval_success_rate_vs_grad_steps.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert len(load_sweep(tmp_path / "sweep.jsonl")) == 4
    runs = [load_run(p) for p in sorted((tmp_path / "runs").iterdir())]
    _, summary = threshold_table(group(runs), baseline="slow_algo", contender="fast_algo")
    # seeds 0 and 1 solve at 1x and 2x solve_at: medians 75k (slow) and 7.5k (fast) env steps
    assert summary["slow_algo"]["median_env_steps_to_threshold"] == 75_000
    assert summary["fast_algo"]["median_env_steps_to_threshold"] == 7_500
    assert summary["ratios"]["env_steps"] == pytest.approx(10.0)
    assert summary["ratios"]["grad_steps"] == pytest.approx(150 / 150)  # 10 per 5k vs 100 per 5k steps
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["fast_algo"]["reached"] == 2 and written["ratios"]["env_steps"] == pytest.approx(10.0)
    # every seed's cost to the threshold, not only the median: seed s solves at (1 + s) x solve_at
    assert (written["slow_algo"]["seeds"], written["slow_algo"]["env_steps_to_threshold"]) == ([0, 1], [50_000, 100_000])
    assert written["fast_algo"]["grad_steps_to_threshold"] == [100, 200]
    assert "| fast_algo | 5,000 (100) | 10,000 (200) |" in report.read_text()
    with pytest.raises(ValueError, match="baseline 'ppo' is not one of"):
        compare(ENV, ["fast_algo"], seeds=1, env_steps=10_000, out_dir=tmp_path / "x", baseline="ppo")


def test_unreached_threshold_is_reported(tmp_path, trainers):
    report = compare(ENV, ["slow_algo"], seeds=1, env_steps=20_000, out_dir=tmp_path,
                     runner=LocalRunner(workers=1), eval_every=5_000)
    assert "0/1" in report.read_text() and "| slow_algo | not reached |" in report.read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["slow_algo"]["env_steps_to_threshold"] == [None]
    run = load_run(tmp_path / "runs" / "slow_algo__s0")
    assert math.isinf(run.steps_to(0.9)["env_steps"])


def test_sweep_round_trip_and_skip_finished(tmp_path, trainers):
    from diffgym.experiments.compare import compare_configs

    configs = compare_configs(ENV, ["fast_algo"], 2, 10_000, tmp_path, eval_every=5_000)
    path = save_sweep(configs, tmp_path / "sweep.jsonl")
    assert [c.to_dict() for c in load_sweep(path)] == [c.to_dict() for c in configs]
    assert not any(is_finished(c) for c in configs)
    LocalRunner(workers=1).run(configs)
    assert all(is_finished(c) for c in configs)


def test_ablate_grid(tmp_path, trainers):
    segments = ablate_mod.parse_values("8,full", ENV)
    assert segments == [8, 100]
    configs = ablate_mod.grid_configs(ENV, {"segment_length": segments, "bootstrap": ["none", "mc"]}, 1, 20_000,
                                      tmp_path, algo="fast_algo")
    assert {(c.algo_params["segment_length"], c.algo_params["bootstrap"]) for c in configs} == {
        (8, "none"), (8, "mc"), (100, "none"), (100, "mc")}
    LocalRunner(workers=1).run(configs)
    runs = [load_run(c.run_dir) for c in configs]
    keys = ["segment_length", "bootstrap"]
    _, summary = threshold_table(group(runs, lambda r: ablate_mod.cell_label(r.config.algo_params, keys)),
                                 baseline=None, contender=None)
    assert summary["segment_length=8 bootstrap=none"]["median_env_steps_to_threshold"] == 5_000
    # solved by the first eval (budget/20)
    assert summary["segment_length=100 bootstrap=mc"]["median_env_steps_to_threshold"] == 1_000


def test_ablate_writes_heatmaps(tmp_path, trainers):
    report = ablate_mod.ablate(ENV, {"segment_length": [8, 16], "bootstrap": ["none", "critic"]}, 1, 20_000,
                               tmp_path, "slow_algo", LocalRunner(workers=1))
    text = report.read_text()
    assert "segment_length=8 bootstrap=none" in text and "segment_length=16 bootstrap=critic" in text
    assert (tmp_path / "heatmap_final_success.png").exists() and (tmp_path / "heatmap_steps_to_threshold.png").exists()


def test_ablate_any_algo_params_from_the_command_line(tmp_path, trainers):
    """--grid sweeps any algo_params key (strings included); one key still gets its heatmaps."""
    from diffgym.cli import main

    assert main(["ablate", "--env", ENV, "--algo", "fast_algo", "--grid", "bootstrap=none,critic",
                 "--seeds", "1", "--env-steps", "20000", "--workers", "1", "--out", str(tmp_path)]) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["bootstrapcritic__s0", "bootstrapnone__s0"]
    assert (tmp_path / "heatmap_final_success.png").exists()
    with pytest.raises(SystemExit, match="KEY=V1,V2"):
        main(["ablate", "--env", ENV, "--algo", "fast_algo", "--grid", "segment_length", "--env-steps", "1000"])


class TunableTrainer(ScriptedTrainer):
    """Its evaluation curve solves sooner the larger ``speed`` is: the tuner should find that."""

    def suggest_hyperparams(self, trial, env_id):
        return {"algo_params.speed": trial.suggest_float("speed", 0.1, 10.0, log=True)}

    def default_config(self, env_id):
        return {"num_envs": 4, "algo_params": {"segment_length": 8, "speed": 1.0}}

    def train(self, config, progress=True):
        solve_at = 50_000 / config.algo_params["speed"]
        with Run(config, progress=False) as run:
            for i in range(0, config.total_env_steps // config.eval_every_env_steps + 1):
                steps = i * config.eval_every_env_steps
                run.log(steps, i, eval_return=-solve_at, eval_success_rate=float(steps >= solve_at))
        return run.dir


def test_tune_finds_the_fast_setting_prunes_and_continues(tmp_path):
    import yaml

    from diffgym.experiments.tune import tune

    register_trainer("tunable", TunableTrainer("tunable", solve_at=0, grad_steps_per_eval=1))
    report = tune(ENV, "tunable", trials=12, env_steps=100_000, out_dir=tmp_path, runner=LocalRunner(workers=1))
    text = report.read_text()
    assert text.count("| complete |") + text.count("| pruned |") == 12
    assert "| pruned |" in text  # the median pruner stopped some slow settings early
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best["overrides"]["algo_params.speed"] > 2.0 and best["value"] > 0.5
    pruned = [p for p in (tmp_path / "runs").iterdir()
              if f"| {int(p.name.split('_')[1])} | pruned |" in text]
    # stopped early, but never inside the warm-up (the first third of the 11 evaluations, every 10k)
    assert all(3 * 10_000 <= max(r["env_steps"] for r in read_metrics(p)) < 100_000 for p in pruned)
    # re-running continues the same study
    tune(ENV, "tunable", trials=14, env_steps=100_000, out_dir=tmp_path, runner=LocalRunner(workers=1))
    assert len(list((tmp_path / "runs").iterdir())) == 14
    import optuna
    from diffgym.experiments.tune import _storage

    study = optuna.load_study(study_name="tunable__PointMass1D", storage=_storage(tmp_path / "study.log"))
    speeds = [t.params["speed"] for t in study.trials]
    assert len(set(speeds)) == len(speeds)  # the continued study drew new settings


def test_tune_needs_a_search_space(tmp_path, trainers):
    from diffgym.experiments.tune import tune

    with pytest.raises(TypeError, match="suggest_hyperparams"):
        tune(ENV, "slow_algo", trials=1, env_steps=1000, out_dir=tmp_path, runner=LocalRunner(workers=1))


def test_feasibility_planner_solves_point_mass(tmp_path):
    from diffgym.experiments.feasibility import mppi_episodes

    result = mppi_episodes(ENV, episodes=8, samples=32, horizon=20, seed=0)
    assert result["success_rate"] == 1.0 and result["reached_rate"] == 1.0
    assert result["mean_return"] > -30.0  # zero actions score about -60


def test_gradient_planner_solves_point_mass_from_the_same_starts(tmp_path):
    """``--planner gradient``: open-loop Adam through exact gradients from the MPPI planner's starts; on
    the smooth task it solves every episode, and the CLI writes its JSON with a one-line summary."""
    from diffgym.experiments.feasibility import gradient_episodes, mppi_episodes

    result = gradient_episodes(ENV, episodes=8, iterations=300, lr=0.1, seed=0)
    assert result["success_rate"] == 1.0 and result["mean_return"] > -30.0  # zero actions: about -60
    assert result["mean_best_return"] >= result["mean_return"] - 1e-9
    assert result["env_steps_simulated"] == 301 * 100 * 8  # iterations + the final scoring, 100-step episodes
    mppi = mppi_episodes(ENV, episodes=8, samples=4, horizon=4, seed=0)
    assert result["returns"] != mppi["returns"]  # different controllers ...
    zero = gradient_episodes(ENV, episodes=8, iterations=1, lr=1e-12, seed=0)
    assert zero["mean_return"] < -40.0  # ... on the same starts: essentially zero actions score about -60
    from diffgym.cli import main

    assert main(["feasibility", "--env", ENV, "--planner", "gradient", "--episodes", "2", "--iterations", "3",
                 "--env-kwarg", "mass=2.0", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "PointMass1D.json").read_text())["env_kwargs"] == {"mass": 2.0}
    light = gradient_episodes(ENV, episodes=4, iterations=5, lr=0.1, seed=0)
    heavy = gradient_episodes(ENV, episodes=4, iterations=5, lr=0.1, seed=0, env_kwargs={"mass": 2.0})
    assert heavy["returns"] != light["returns"]  # the argument reaches the sim: same pushes, other motion


def test_tune_runs_real_trials_in_worker_processes(tmp_path):
    """The process-pool path: trials of the installed APG trainer run in spawned workers that load the
    study from the journal file and report to it."""
    from diffgym.experiments.tune import tune

    report = tune(ENV, "apg", trials=2, env_steps=256, out_dir=tmp_path, runner=LocalRunner(workers=2),
                  eval_every=128)
    text = report.read_text()
    assert text.count("| complete |") == 2
    for trial in ("trial_000", "trial_001"):
        evals = [r for r in read_metrics(tmp_path / "runs" / trial) if "eval_success_rate" in r]
        assert [r["env_steps"] for r in evals][0] == 0 and evals[-1]["env_steps"] >= 256


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path):
    from diffgym.experiments.tune import tune

    class Failing(TunableTrainer):
        def train(self, config, progress=True):
            if config.algo_params["speed"] < 1.0:
                raise RuntimeError("diverged")
            return super().train(config, progress)

    register_trainer("failing", Failing("failing", solve_at=0, grad_steps_per_eval=1))
    report = tune(ENV, "failing", trials=6, env_steps=100_000, out_dir=tmp_path, runner=LocalRunner(workers=1))
    text = report.read_text()
    assert "| fail |" in text and "| complete |" in text
    assert text.count("| complete |") + text.count("| pruned |") + text.count("| fail |") == 6


def test_tune_takes_a_repeated_settings_result_instead_of_running_it_again(tmp_path):
    from diffgym.experiments.tune import tune

    class Coarse(TunableTrainer):
        def suggest_hyperparams(self, trial, env_id):  # two settings only: TPE must draw repeats
            return {"algo_params.speed": trial.suggest_categorical("speed", [0.5, 4.0])}

    register_trainer("coarse", Coarse("coarse", solve_at=0, grad_steps_per_eval=1))
    report = tune(ENV, "coarse", trials=6, env_steps=100_000, out_dir=tmp_path, runner=LocalRunner(workers=1))
    text = report.read_text()
    assert len(list((tmp_path / "runs").iterdir())) == 2  # one run per distinct setting
    assert text.count("(repeat of trial ") == 4
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "repeat of" in line]
    values = {line.split(" | ")[4]: line.split(" | ")[2] for line in text.splitlines()
              if line.startswith("| ") and "repeat of" not in line and "speed" in line}
    assert all(row[2] == values[row[4]] for row in rows)  # each repeat carries its setting's result
    import optuna
    from diffgym.experiments.tune import _storage

    study = optuna.load_study(study_name="coarse__PointMass1D", storage=_storage(tmp_path / "study.log"))
    first = {t.params["speed"]: t for t in study.trials if "repeat_of" not in t.user_attrs}
    for repeat in (t for t in study.trials if "repeat_of" in t.user_attrs):  # its curve too, for the pruner
        assert repeat.intermediate_values == first[repeat.params["speed"]].intermediate_values != {}
    # a continued study with another budget runs its settings again: another config, another result
    tune(ENV, "coarse", trials=8, env_steps=50_000, out_dir=tmp_path, runner=LocalRunner(workers=1))
    study = optuna.load_study(study_name="coarse__PointMass1D", storage=_storage(tmp_path / "study.log"))
    assert (tmp_path / "runs" / "trial_006").is_dir()  # trial 6 ran, though its speed had run at 100k
    assert all(t.user_attrs.get("repeat_of", 6) >= 6 for t in study.trials[6:])


class FlaggedTrainer(ScriptedTrainer):
    """A third-party trainer that brings its own command-line flags and default ablation grid."""

    cli_flags = {"segment-length": "K", "bootstrap": "tail"}
    ablation_grid = {"segment_length": "8,16"}


def test_trainer_flags_belong_to_their_trainer(tmp_path, trainers, capsys):
    """A trainer's own flags set its algo_params in `train` and are grid axes in `ablate`; the same flag
    given to a trainer that does not declare it is a one-line error, and so is an ablation with no grid."""
    from diffgym.cli import main

    register_trainer("flagged", FlaggedTrainer("flagged", solve_at=5_000, grad_steps_per_eval=10))
    assert main(["train", "--algo", "flagged", "--env", ENV, "--segment-length", "16", "--print-config"]) == 0
    assert "segment_length: 16" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="trainer 'fast_algo' adds the flags: none"):
        main(["train", "--algo", "fast_algo", "--env", ENV, "--segment-length", "16", "--print-config"])
    assert main(["ablate", "--env", ENV, "--algo", "flagged", "--bootstrap", "none,mc", "--seeds", "1",
                 "--env-steps", "10000", "--workers", "1", "--out", str(tmp_path / "flags")]) == 0
    assert sorted(p.name for p in (tmp_path / "flags" / "runs").iterdir()) == ["bootstrapmc__s0", "bootstrapnone__s0"]
    assert main(["ablate", "--env", ENV, "--algo", "flagged", "--seeds", "1", "--env-steps", "10000",
                 "--workers", "1", "--out", str(tmp_path / "default")]) == 0
    assert sorted(p.name for p in (tmp_path / "default" / "runs").iterdir()) == ["segment_length16__s0",
                                                                                 "segment_length8__s0"]
    with pytest.raises(SystemExit, match="has no ablation_grid"):
        main(["ablate", "--env", ENV, "--algo", "fast_algo", "--seeds", "1", "--env-steps", "10000"])


def test_train_help_lists_the_chosen_trainers_flags(trainers, capsys):
    from diffgym.cli import main

    register_trainer("flagged", FlaggedTrainer("flagged", solve_at=5_000, grad_steps_per_eval=10))
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--algo=flagged", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "flags of trainer 'flagged'" in out and "--segment-length VALUE" in out and "--bootstrap VALUE" in out
    with pytest.raises(SystemExit):
        main(["ablate", "--algo", "flagged", "--help"])
    assert "--segment-length V1,V2,..." in capsys.readouterr().out


class ClashingTrainer(ScriptedTrainer):
    cli_flags = {"seed": "a seed of its own"}


class PrefixTrainer(ScriptedTrainer):
    cli_flags = {"eval": "an evaluation knob of its own"}  # a prefix of train's --eval-every, --eval-episodes

    def default_config(self, env_id):
        config = super().default_config(env_id)
        return {**config, "algo_params": {**config["algo_params"], "eval": 1}}


def test_a_trainer_flag_the_command_already_has_is_left_out_and_a_prefix_is_taken_as_itself(trainers, capsys,
                                                                                             tmp_path):
    """A `cli_flags` entry equal to a core flag could never be set (the core flag wins): a warning, and the
    contract check refuses it; one that is a prefix of core flags used to be read as their abbreviation (or an
    ambiguity error) when the words reached the core parser first."""
    from diffgym.cli import main

    from diffgym.testing import TrainerContractError, check_trainer

    register_trainer("clashing", ClashingTrainer("clashing", solve_at=5_000, grad_steps_per_eval=10))
    assert main(["train", "--algo", "clashing", "--env", ENV, "--seed", "3", "--print-config"]) == 0
    captured = capsys.readouterr()
    assert "seed: 3" in captured.out  # the core's --seed, as before; the plugin stays usable, with a warning
    assert captured.err.strip() == ("diffgym train: warning: trainer 'clashing' declares --seed in its cli_flags, "
                                    "which diffgym train already has: ignored (the trainer should rename it)")
    with pytest.raises(TrainerContractError, match=r"cli_flags \['--seed'\] are flags diffgym train already has"):
        check_trainer("clashing", tmp_path / "run", ENV)
    register_trainer("prefix", PrefixTrainer("prefix", solve_at=5_000, grad_steps_per_eval=10))
    assert main(["train", "--algo", "prefix", "--env", ENV, "--eval", "3", "--print-config"]) == 0
    assert "eval: 3" in capsys.readouterr().out


_PARENT = """
import time
from diffgym.experiments.sweep import LocalRunner
LocalRunner(workers=2).map(time.sleep, [(300,), (300,), (300,)])
"""


def _worker_pids(parent: int) -> list[int]:
    """The parent's spawned pool workers (not the resource tracker), from /proc."""
    pids = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                pids.append(int(child))
    return pids


def _exited(pid: int) -> bool:
    try:  # reparented workers may stay zombies when the container's init does not reap them
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads worker pids from /proc")
def test_sweep_workers_exit_when_their_parent_dies():
    """Killing only the parent of `diffgym compare` used to leave its workers running the queued runs
    (behind a re-run's back), then idling forever."""
    parent = subprocess.Popen([sys.executable, "-c", _PARENT],
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            workers = _worker_pids(parent.pid)
        assert len(workers) == 2
        time.sleep(1.0)  # let them start their work
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 15
        while not all(map(_exited, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(map(_exited, workers)), "pool workers outlived their parent"
    finally:
        parent.kill()
        parent.wait()
        for pid in workers:  # on failure, do not leave them behind
            if not _exited(pid):
                os.kill(pid, signal.SIGKILL)


_SWEEP_PARENT = """
import os, sys, time
from pathlib import Path
from diffgym.experiments.sweep import LocalRunner

def work(marker, seconds):
    first = not Path(marker).exists()
    Path(marker).touch()
    if first and marker.endswith("dies0"):
        os._exit(1)  # as an out-of-memory kill would end it, the first time
    time.sleep(seconds)
    return Path(marker).name

if __name__ == "__main__":
    out, seconds = Path(sys.argv[1]), [float(s) for s in sys.argv[3:]]
    try:
        print(LocalRunner(workers=2).map(work, [(str(out / f"{sys.argv[2]}{i}"), s) for i, s in enumerate(seconds)]))
    except KeyboardInterrupt:
        (out / "interrupted").touch()
        sys.exit(130)
"""


def _sweep_parent(tmp_path: Path, name: str, seconds: list[float]) -> subprocess.Popen:
    """A process running a LocalRunner(workers=2) sweep of items that sleep ``seconds`` each (the one named
    ``dies0`` kills its worker the first time), in a session of its own, like a terminal's job."""
    script = tmp_path / "parent.py"
    script.write_text(_SWEEP_PARENT)
    return subprocess.Popen([sys.executable, str(script), str(tmp_path), name, *map(str, seconds)],
                            start_new_session=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(paths: list[Path], seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not all(p.exists() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads worker pids from /proc")
@pytest.mark.parametrize("whom", ["terminal", "parent alone"])
def test_ctrl_c_ends_a_local_sweep_at_once_and_starts_no_queued_item(whom, tmp_path):
    """Ctrl-C used to leave `diffgym compare` running every queued run, silently, before it exited: the
    workers took the KeyboardInterrupt as one item's failure and went on with the queue. `terminal`: the
    SIGINT reaches the whole process group, as Ctrl-C does; `parent alone`: `kill -INT` of the parent only."""
    parent = _sweep_parent(tmp_path, "started", [300] * 5)
    workers: list[int] = []
    try:
        _wait_for([tmp_path / "started0", tmp_path / "started1"])
        workers = _worker_pids(parent.pid)
        assert len(workers) == 2
        if whom == "terminal":
            os.killpg(parent.pid, signal.SIGINT)
        else:
            parent.send_signal(signal.SIGINT)
        _, err = parent.communicate(timeout=30)  # the queued items would take minutes
        assert parent.returncode == 130 and (tmp_path / "interrupted").exists()
        assert "interrupted: stopping the running items, starting none of the queued ones" in err
        assert "Traceback" not in err
        assert sorted(p.name for p in tmp_path.glob("started*")) == ["started0", "started1"]
        assert all(map(_exited, workers))
    finally:
        parent.kill()
        parent.wait()
        for pid in workers:
            if not _exited(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads worker pids from /proc")
def test_ctrl_c_reaching_an_idle_worker_does_not_break_the_pool(tmp_path):
    """One item finished, its worker idle, the other running: the idle worker used to raise in the pool's
    queue, print a traceback and break the pool, which then killed the run that was stopping."""
    parent = _sweep_parent(tmp_path, "started", [0, 300])
    try:
        _wait_for([tmp_path / "started0", tmp_path / "started1"])
        time.sleep(1.0)  # item 0 is done: its worker waits for work
        os.killpg(parent.pid, signal.SIGINT)
        _, err = parent.communicate(timeout=30)
        assert parent.returncode == 130 and "Traceback" not in err, err
    finally:
        parent.kill()
        parent.wait()


def test_a_dead_worker_gets_its_items_run_again_in_a_fresh_pool(tmp_path):
    """A worker killed (out of memory, a crash) takes its pool down with every unfinished item; they used to
    fail together. Now a fresh pool runs them again (runs resume from their last checkpoint)."""
    parent = _sweep_parent(tmp_path, "dies", [0, 0, 0])
    out, err = parent.communicate(timeout=120)
    assert parent.returncode == 0, err
    assert out.strip() == "['dies0', 'dies1', 'dies2']"
    assert "a worker process died (BrokenProcessPool: " in err and "(attempt 2 of 4; runs resume" in err


def test_a_failing_item_of_a_parallel_sweep_is_reported_and_the_others_go_on(capsys):
    """As on Ray: the failure is named when it happens, the other items finish, and SweepFailed lists the
    failures at the end (before, the first error surfaced only after every other run, with no line for it)."""
    from diffgym.experiments.sweep import SweepFailed

    with pytest.raises(SweepFailed, match=r"1 of 3 runs failed: item 1 \(ValueError: math domain error\)") as failed:
        LocalRunner(workers=2).map(math.sqrt, [(4.0,), (-1.0,), (9.0,)], lambda i, r: f"sqrt {r}")
    assert failed.value.failures == [("item 1", "ValueError: math domain error")]
    out = capsys.readouterr().out
    assert "item 1 failed: ValueError: math domain error" in out and "sqrt 2.0" in out and "sqrt 3.0" in out


@pytest.mark.parametrize("argv, message", [
    (["train", "--algo", "fast_algo", "--env", "Nope-v0"], "unknown task 'Nope-v0'"),
    (["train", "--algo", "fast_algo", "--env", ENV, "--param", "segment_lenght=4"], "unknown algo_params"),
    (["train", "--algo", "fast_algo", "--env", ENV, "--device", "banana"], "device must be 'cpu' or 'cuda"),
    (["compare", "--env", ENV, "--algos", "fast_algo,nope", "--env-steps", "1e3"], "no trainer plugin named 'nope'"),
    (["compare", "--env", ENV, "--algos", "fast_algo", "--env-steps", "1e3", "--baseline", "x"], "baseline 'x'"),
    (["compare", "--env", ENV, "--algos", "fast_algo", "--env-steps", "1e3", "--eval-schedule", "geometric",
      "--eval-growth", "1"], "eval_growth must be a number > 1"),
    (["compare", "--env", ENV, "--algos", "fast_algo", "--env-steps", "1e3", "--eval-first", "100"],
     "--eval-first only apply to the geometric schedule; this one is linear: add --eval-schedule geometric"),
    (["train", "--algo", "fast_algo", "--env", ENV, "--eval-growth", "2"], "add --eval-schedule geometric"),
    (["ablate", "--env", "Nope-v0", "--algo", "fast_algo", "--grid", "bootstrap=none", "--env-steps", "1e3"],
     "unknown task"),
    (["tune", "--env", ENV, "--algo", "fast_algo", "--trials", "1", "--env-steps", "1e3"], "no suggest_hyperparams"),
    (["train", "--algo", "fast_algo", "--env", ENV, "--config", "missing.yaml"], "No such file"),
    (["train", "--algo", "fast_algo", "--env", ENV, "--config", "list.yaml"], "expected a mapping"),
    (["train", "--algo", "fast_algo", "--env", ENV, "--config", "broken.yaml"], "--config broken.yaml"),
])
def test_user_errors_are_one_line_before_any_run(argv, message, trainers, tmp_path, monkeypatch, capsys):
    """Wrong task, misspelt hyperparameter, bad device, unknown trainer or role: one line naming what was
    expected (exit status 2 from `train`, SystemExit from the sweeps), and no run directory is made."""
    from diffgym.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "list.yaml").write_text("- 1\n")
    (tmp_path / "broken.yaml").write_text("seed: [1, 2\n")
    try:
        code = main(argv + (["--no-progress"] if argv[0] == "train" else []))
        text = capsys.readouterr().err
    except SystemExit as stop:
        code, text = 2, str(stop)
    assert code == 2 and message in text and len(text.strip().splitlines()) == 1, text
    assert not (tmp_path / "runs").exists()


def test_one_flag_vocabulary_across_commands(tmp_path, trainers, capsys):
    """train, compare, ablate and tune share --env-steps/--total-env-steps, --eval-every/--eval-every-env-steps
    (1e3 notation everywhere) and --set/--param, which a sweep applies to every run."""
    import yaml

    from diffgym.cli import main

    for budget, every in (("--env-steps", "--eval-every"), ("--total-env-steps", "--eval-every-env-steps")):
        assert main(["train", "--algo", "fast_algo", "--env", ENV, budget, "2e4", every, "5e3", "--print-config"]) == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert (printed["total_env_steps"], printed["eval_every_env_steps"]) == (20_000, 5_000)
    geometric = ["--eval-schedule", "geometric", "--eval-first", "2e3", "--eval-growth", "1.5"]
    assert main(["train", "--algo", "fast_algo", "--env", ENV, *geometric, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["eval_schedule"], printed["eval_first_env_steps"], printed["eval_growth"]) == ("geometric", 2_000, 1.5)
    sweeps = {"compare": ["--algos", "fast_algo"], "ablate": ["--algo", "fast_algo", "--grid", "bootstrap=none"]}
    for command, extra in sweeps.items():
        out = tmp_path / command
        assert main([command, "--env", ENV, *extra, "--total-env-steps", "1e4", "--eval-every-env-steps", "5e3",
                     "--seeds", "1", "--workers", "1", "--set", "num_envs=2", "--param", "segment_length=16",
                     *geometric, "--out", str(out)]) == 0
        (config,) = load_sweep(out / "sweep.jsonl")
        assert (config.num_envs, config.algo_params["segment_length"]) == (2, 16)
        assert (config.total_env_steps, config.eval_every_env_steps) == (10_000, 5_000)
        assert (config.eval_schedule, config.eval_first_env_steps, config.eval_growth) == ("geometric", 2_000, 1.5)
    with pytest.raises(SystemExit, match="unknown config key 'nope'"):
        main(["compare", "--env", ENV, "--algos", "fast_algo", "--env-steps", "1e4", "--set", "nope=1"])


def test_rerun_reuses_finished_runs_and_refuses_another_schedule(tmp_path, trainers, capsys):
    """Re-running compare into its --out reuses finished runs and says so; another budget or evaluation
    interval is refused in one line before anything trains (one curve would mix two schedules), unless
    --extend."""
    from diffgym.cli import main
    from diffgym.experiments.compare import compare_configs

    def metrics():
        return read_metrics(tmp_path / "runs" / "fast_algo__s0")

    argv = ["compare", "--env", ENV, "--algos", "fast_algo", "--seeds", "1", "--workers", "1", "--out", str(tmp_path)]
    LocalRunner(workers=1).run(compare_configs(ENV, ["fast_algo"], 1, 20_000, tmp_path, eval_every=5_000))
    first = metrics()
    capsys.readouterr()
    assert main([*argv, "--env-steps", "20000", "--eval-every", "5000"]) == 0
    assert "compare: reusing 1 finished run(s) (fast_algo__s0)" in capsys.readouterr().out
    for changed in (["--env-steps", "40000", "--eval-every", "5000"], ["--env-steps", "20000", "--eval-every", "2000"],
                    ["--env-steps", "20000", "--eval-every", "5000", "--eval-schedule", "geometric"]):
        with pytest.raises(SystemExit) as refused:
            main([*argv, *changed])
        lines = capsys.readouterr().err.strip().splitlines()
        assert refused.value.code == 2 and len(lines) == 1, lines
        assert lines[0].startswith("diffgym compare: 1 of the runs in") and "pass --extend" in lines[0]
        assert "eval_schedule" not in changed or "eval_schedule linear -> geometric" in lines[0]
        assert metrics() == first  # nothing ran
    assert "total_env_steps 20,000 -> 40,000" in str(pytest.raises(ValueError, compare, ENV, ["fast_algo"], 1, 40_000,
                                                                    tmp_path, eval_every=5_000).value)
    assert main([*argv, "--env-steps", "40000", "--eval-every", "5000", "--extend"]) == 0
    assert "compare: extending 1 run(s) made with another schedule (total_env_steps 20,000 -> 40,000)" in \
        capsys.readouterr().out
    assert metrics()[-1]["env_steps"] == 40_000


def test_reuse_plan_names_interrupted_runs(tmp_path, trainers):
    from diffgym.experiments.compare import compare_configs
    from diffgym.experiments.training_runs import reuse_plan

    configs = compare_configs(ENV, ["fast_algo"], 2, 20_000, tmp_path, eval_every=5_000)
    assert reuse_plan(configs) == ""  # nothing there yet
    LocalRunner(workers=1).run(configs)
    interrupted = Path(configs[1].run_dir) / "metrics.jsonl"
    interrupted.write_text("".join(interrupted.read_text().splitlines(keepends=True)[:2]))
    assert reuse_plan(configs) == (f"reusing 1 finished run(s) (fast_algo__s0); resuming 1 run(s) from their last "
                                   f"checkpoint (fast_algo__s1) in {tmp_path / 'runs'}")


def test_ablate_refuses_another_schedule_unless_extended(tmp_path, trainers, capsys):
    from diffgym.cli import main

    argv = ["ablate", "--env", ENV, "--algo", "fast_algo", "--grid", "bootstrap=none", "--seeds", "1",
            "--workers", "1", "--out", str(tmp_path)]
    assert main([*argv, "--env-steps", "20000"]) == 0
    with pytest.raises(SystemExit):
        main([*argv, "--env-steps", "40000"])
    assert "pass --extend" in capsys.readouterr().err
    assert main([*argv, "--env-steps", "40000", "--extend"]) == 0
    assert "ablate: extending 1 run(s)" in capsys.readouterr().out


def test_report_plots_draw_thresholds_and_offer_a_log_axis(tmp_path, trainers, monkeypatch):
    """Success curves carry the success threshold, return curves the task's reward_threshold; --log-x
    log-scales the step axes (wall-clock stays linear) on a grid that starts at the first evaluation
    after 0."""
    import gymnasium as gym

    from diffgym.cli import main
    from diffgym.experiments import report as report_module

    drawn = []
    plot = report_module.plot_curves
    monkeypatch.setattr(report_module, "plot_curves", lambda *args: drawn.append(args) or plot(*args))
    assert main(["compare", "--env", ENV, "--algos", "fast_algo", "--seeds", "2", "--env-steps", "20000",
                 "--eval-every", "1000", "--workers", "1", "--out", str(tmp_path), "--log-x"]) == 0
    lines = {(args[1], args[2]): args[5] for args in drawn}
    assert lines[("env_steps", "eval_success_rate")] == (0.9, "success threshold (90%)")
    target = gym.spec(ENV).reward_threshold
    assert lines[("grad_steps", "eval_return")] == (target, f"reward_threshold ({target:g})")
    assert all(args[6] is True for args in drawn)  # log_x reached every plot

    groups = group(load_run(p) for p in sorted((tmp_path / "runs").iterdir()))
    figure = report_module.curves_figure(groups, "env_steps", "eval_success_rate", "t", (0.9, "threshold"),
                                         log_x=True)
    ax = figure.axes[0]
    assert ax.get_xscale() == "log"
    assert any(list(line.get_ydata()) == [0.9, 0.9] for line in ax.get_lines())
    curve = ax.get_lines()[0].get_xdata()
    assert curve[0] == 1000 and curve[-1] == 20_000 and curve[1] / curve[0] == pytest.approx(curve[-1] / curve[-2])
    linear = report_module.curves_figure(groups, "env_steps", "eval_success_rate", "t")
    assert linear.axes[0].get_xscale() == "linear" and len(linear.axes[0].get_lines()) == 1
    assert report_module.curves_figure(groups, "wall_time", "eval_return", "t", log_x=True).axes[0].get_xscale() \
        == "linear"


def test_report_lists_the_training_wall_clock_without_evaluations_and_n_a_where_not_recorded(tmp_path, monkeypatch):
    from diffgym.training import run as run_module

    clock = [0.0]
    monkeypatch.setattr(run_module.time, "perf_counter", lambda: clock[0])

    def scripted(algo: str, seed: int, train_seconds: float, eval_seconds: float) -> Path:
        config = TrainConfig(algo=algo, env_id=ENV, seed=seed, total_env_steps=2000, eval_every_env_steps=1000,
                             run_dir=str(tmp_path / f"{algo}_{seed}"))
        with Run(config, progress=False) as run:
            for steps, success in ((0, 0.0), (1000, 0.5), (2000, 1.0)):
                clock[0] += train_seconds if steps else 0.0
                with run.evaluating():
                    clock[0] += eval_seconds
                    run.log(steps, steps // 100, eval_return=-1.0, eval_success_rate=success)
        return run.dir

    dirs = [scripted("cheap_evals", 0, 10.0, 1.0), scripted("dear_evals", 0, 1.0, 10.0)]
    _, summary = threshold_table(group(load_run(d) for d in dirs), baseline="cheap_evals", contender="dear_evals")
    # solved at the third evaluation: two training stretches, three evaluations, all before the row
    assert summary["cheap_evals"]["median_wall_time_to_threshold"] == 23.0
    assert summary["cheap_evals"]["median_train_wall_time_to_threshold"] == 20.0
    assert summary["dear_evals"]["median_wall_time_to_threshold"] == 32.0
    assert summary["dear_evals"]["median_train_wall_time_to_threshold"] == 2.0
    assert summary["ratios"]["train_wall_time"] == pytest.approx(10.0)
    # rows written before evaluation time was recorded: the training column says n/a, no ratio
    metrics = Path(dirs[1]) / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "eval_wall_time"}) + "\n"
                               for line in metrics.read_text().splitlines()))
    table, summary = threshold_table(group(load_run(d) for d in dirs), baseline="cheap_evals", contender="dear_evals")
    assert summary["ratios"]["train_wall_time"] is None and summary["ratios"]["wall_time"] == pytest.approx(23 / 32)
    assert "| dear_evals | 1/1 | 2,000 | 20 | 32 | n/a |" in table


def test_trainer_flags_work_when_only_a_config_file_names_the_trainer(trainers, tmp_path, capsys):
    from diffgym.cli import main

    register_trainer("flagged", FlaggedTrainer("flagged", solve_at=5_000, grad_steps_per_eval=10))
    config = tmp_path / "config.yaml"
    assert main(["train", "--algo", "flagged", "--env", ENV, "--print-config"]) == 0
    config.write_text(capsys.readouterr().out)
    assert main(["train", "--config", str(config), "--segment-length", "16", "--print-config"]) == 0
    assert "segment_length: 16" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", str(tmp_path / "missing.yaml"), "--segment-length", "16"])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip().endswith(
        "(a trainer's own flags need --algo, or a readable --config FILE that names it)")
