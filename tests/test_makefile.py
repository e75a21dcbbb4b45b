"""Every Makefile target runs, in a quick mode, so none can rot unnoticed (issue 26 item 7).

Each target passes its ``*_ARGS`` variable on to its command; these tests run the targets with ``make -o
install`` (the installation is this test run's own venv, named by ``VENV``) and smoke-run arguments.
Targets that need what this machine may lack (the peers' venv, a GPU) are checked as far as they go
without it: the command ``make -n`` prints, then that command's script in its quick CPU mode.
``test_every_target_is_checked`` keeps the list complete: a new target without a check here fails it.
"""

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)  # the venv running the tests stands in for the one `make install` builds

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make(*args: str, timeout: float = 120, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``make --no-print-directory -o install ARGS`` with this venv as ``VENV``."""
    return subprocess.run(["make", "--no-print-directory", "-o", "install", f"VENV={VENV}", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def recipe(target: str, *variables: str) -> list[list[str]]:
    """The commands ``make -n`` prints for ``target`` (continuation lines joined), split into words."""
    done = make("-n", target, *variables)
    assert done.returncode == 0, done.stderr
    return [shlex.split(line) for line in done.stdout.replace("\\\n", " ").splitlines() if line.strip()]


def phony_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.search(r"^\.PHONY:(.*)$", text, re.M).group(1).split())


CHECKS = {}  # target -> the test that checks it


def checks(*targets: str):
    def register(test):
        CHECKS.update(dict.fromkeys(targets, test.__name__))
        return test
    return register


def test_every_target_is_checked():
    assert phony_targets() == set(CHECKS), "a Makefile target without a check in tests/test_makefile.py"


@checks("install")
def test_install_names_extras_and_plugins_that_exist_and_are_installed(tmp_path):
    """`make install` into a new venv: the extras it asks for exist in setup.cfg, the trainer plugins it
    installs exist, and what they require is installed in this venv (a dependency added to setup.cfg
    but not installed here would make `make test` behave differently from a fresh `make install`)."""
    done = subprocess.run(["make", "-n", "install", f"VENV={tmp_path / 'venv'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pip = next(shlex.split(line) for line in done.stdout.splitlines() if "pip install" in line)
    assert pip[0] == str(tmp_path / "venv" / "bin" / "python") and "constraints.txt" in pip
    editable = [pip[i + 1] for i, word in enumerate(pip) if word == "-e"]
    project, plugins = editable[0], editable[1:]
    extras = re.fullmatch(r"\.\[([\w,]+)\]", project).group(1).split(",")
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    declared = setup["options.extras_require"]
    assert set(extras) <= set(declared), f"make install asks for extras setup.cfg lacks: {set(extras) - set(declared)}"
    assert plugins and all((REPO / plugin / "setup.cfg").exists() for plugin in plugins)
    from packaging.requirements import Requirement

    missing = []
    for extra in extras:
        for line in declared[extra].strip().splitlines():
            requirement = Requirement(line.strip())
            try:
                installed = metadata.version(requirement.name)
            except metadata.PackageNotFoundError:
                installed = None
            if installed is None or not requirement.specifier.contains(installed, prereleases=True):
                missing.append(f"{requirement} (extra {extra}; installed: {installed})")
    assert not missing, f"setup.cfg requires what this venv lacks (run make install): {missing}"


@checks("demo")
def test_demo_command_is_a_valid_compare(tmp_path, monkeypatch):
    """`make demo`'s command through the CLI up to the training (configs resolved, flags valid)."""
    (command,) = recipe("demo")
    assert command[0] == str(VENV / "bin" / "diffgym")
    from diffgym.cli import main
    from diffgym.experiments import compare as compare_module

    calls = []
    monkeypatch.setattr(compare_module, "compare", lambda *args, **kwargs: calls.append(args) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # the stub: nothing trains
        main([*command[1:], "--out", str(tmp_path)])
    env_id, algos, seeds, env_steps = calls[0][:4]
    assert (env_id, algos, seeds, env_steps) == ("DiffGym/PointMass1D-v0", ["apg", "ppo"], 3, 100_000)


@pytest.mark.slow
def test_demo_runs_in_a_tiny_budget(tmp_path):
    done = make("demo", f"DEMO_ARGS=--seeds 1 --env-steps 2000 --eval-every 1000 --workers 1 --out {tmp_path}",
                timeout=300)
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "report.md").read_text()
    assert "| apg | " in report and "| ppo | " in report


@checks("results")
def test_results_lists_the_manifest_s_experiments():
    done = make("results", "RESULTS_ARGS=--list")
    assert done.returncode == 0, done.stderr
    assert "reuse_PointMass1D (DiffGym/PointMass1D-v0) -> " in done.stdout and "'apg, reuse.epochs=4': apg" in done.stdout


@checks("demo-open-loop")
def test_demo_open_loop_runs(tmp_path):
    done = make("demo-open-loop", "DEMO_OPEN_LOOP_ARGS=--iterations 2 --num-envs 2")
    assert done.returncode == 0, done.stderr
    assert "before: mean return" in done.stdout and "after:" in done.stdout


@checks("test", "test-slow")
def test_test_targets_select_the_default_and_the_slow_suites():
    """`make test` collects the default suite (slow tests deselected), `make test-slow` only slow tests;
    collected from one small test file, without running it."""
    collect = "PYTEST_ARGS=--collect-only -q --noconftest -p no:cacheprovider tests/test_bench_peers.py"
    default, slow = make("test", collect), make("test-slow", collect)
    assert default.returncode == 0 and slow.returncode == 0, default.stdout + slow.stdout
    assert "test_gpu_check_path_on_cpu" not in default.stdout and "1 deselected" in default.stdout
    slow_ids = [line for line in slow.stdout.splitlines() if "::" in line]
    assert slow_ids == ["tests/test_bench_peers.py::test_gpu_check_path_on_cpu"]


@checks("bench")
def test_bench_quick():
    done = make("bench", "BENCH_ARGS=--quick")
    assert done.returncode == 0, done.stderr
    for heading in ("### Cost of gradients", "### Batched throughput", "### Single env"):
        assert heading in done.stdout
    assert "| DiffGym/PointMass1D-v0 | 64 |" in done.stdout


@checks("bench-overhead")
def test_bench_overhead_quick():
    done = make("bench-overhead", "BENCH_OVERHEAD_ARGS=--quick")
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("| DiffGym/PointMass1D-v0 |"))
    assert "n/a" not in row  # every variant measured, the launch floor included


@checks("bench-peers")
def test_bench_peers_command_and_its_quick_cpu_path():
    """`make bench-peers` builds `.venv-peers` (not here): its command is the script, which runs its
    quick CPU path in this venv with the peers that are missing reading n/a."""
    commands = recipe("bench-peers", "BENCH_PEERS_ARGS=--quick", "PEERS_VENV=.venv-peers-never-built")
    run = commands[-1]
    assert run[-3:] == [".venv-peers-never-built/bin/python", "benchmarks/bench_peers.py", "--quick"]
    installs = [c for c in commands if "pip" in c]
    assert installs and (REPO / installs[0][installs[0].index("-r") + 1]).exists()
    done = subprocess.run([sys.executable, run[-2], *run[-1:], "--allow-missing"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| DiffGym/PointMass1D-v0 | 64 |" in done.stdout


@checks("gpu-check")
def test_gpu_check_command_and_its_refusal_without_a_gpu():
    """`make gpu-check`'s command is benchmarks/gpu_check.py with GPU_CHECK_ARGS (its CPU path runs in
    tests/test_bench_peers.py, slow); without a GPU the target itself stops at once with one line."""
    run = recipe("gpu-check", "GPU_CHECK_ARGS=--device cpu --quick", "PEERS_VENV=.venv-peers-never-built")[-1]
    assert run[-4:] == ["benchmarks/gpu_check.py", "--device", "cpu", "--quick"]
    if shutil.which("nvidia-smi"):
        return
    done = make("gpu-check", "PEERS_VENV=.venv-peers-never-built")
    assert done.returncode == 2 and not (REPO / ".venv-peers-never-built").exists()
    assert done.stderr.strip().splitlines()[0].startswith("make gpu-check: no NVIDIA GPU")


@checks("clean")
def test_clean_removes_the_build_outputs_only(tmp_path):
    for made in (".venv/bin", ".venv-peers/bin", "build/lib", "diffgym.egg-info"):
        (tmp_path / made).mkdir(parents=True)
    (tmp_path / "runs").mkdir()
    (tmp_path / "keep.py").write_text("")
    done = subprocess.run(["make", "--no-print-directory", "-f", str(REPO / "Makefile"), "clean"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.py", "runs"]
