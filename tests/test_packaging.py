"""Packaging (issue 13, part 4): DiffGym and its bundled trainer plugins build as wheels that work
non-editable, from outside the repository: every task makes and steps (FrankaReach needs its URDF as
package data) and both trainer plugins load with their packaged hyperparameters.

Builds without network access: the wheels are built with the running interpreter's setuptools
(``--no-build-isolation``) and installed with ``--no-deps`` into a fresh venv whose dependencies
(torch, warp, ...) come from the running interpreter's site-packages, minus any DiffGym install.
About 12 s, so it runs with the default suite.
"""

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECTS = {"diffgym": REPO, "diffgym_apg": REPO / "trainers" / "apg", "diffgym_ppo": REPO / "trainers" / "ppo"}


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def copy_project(source: Path, target: Path) -> Path:
    """The project's sources without build leftovers or the other projects nested in it."""
    ignore = shutil.ignore_patterns(".git", ".venv", ".venv-*", "runs", "build", "*.egg-info", "__pycache__", "tests",
                                    "docs", "benchmarks", "trainers", "shared")
    shutil.copytree(source, target, ignore=ignore)
    return target


def dependency_dir(tmp: Path) -> Path:
    """Links to every package of the running interpreter except DiffGym's own installs (editable or not)."""
    deps = tmp / "deps"
    deps.mkdir()
    for directory in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]}:
        for entry in Path(directory).iterdir():
            name = entry.name.lower()
            if name.startswith(("diffgym", "__editable__")) or name.endswith(".pth") or (deps / entry.name).exists():
                continue
            (deps / entry.name).symlink_to(entry)
    return deps


SMOKE = textwrap.dedent("""
    import sys
    from pathlib import Path

    import gymnasium as gym
    import numpy as np

    import diffgym
    import diffgym_apg
    import diffgym_ppo
    from diffgym.plugins import load_trainer

    prefix = Path(sys.prefix).resolve()
    for module in (diffgym, diffgym_apg, diffgym_ppo):
        assert prefix in Path(module.__file__).resolve().parents, (module.__file__, prefix)
    assert diffgym.ALL_TASK_IDS
    for env_id in diffgym.ALL_TASK_IDS:
        env = gym.make(env_id)
        env.reset(seed=0)
        env.step(np.zeros(env.action_space.shape, np.float32))
        venv = gym.make_vec(env_id, num_envs=2)
        venv.reset(seed=0)
        venv.step(np.zeros(venv.action_space.shape, np.float32))
        print("made", env_id)
    for algo in ("apg", "ppo"):
        config = load_trainer(algo).default_config(diffgym.TASK_IDS[0])
        assert config, algo
        print("trainer", algo)
""")


def test_wheels_install_non_editable_and_make_every_task(tmp_path):
    wheels = tmp_path / "wheels"
    for name, source in PROJECTS.items():
        project = copy_project(source, tmp_path / "src" / name)
        run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
            "--disable-pip-version-check", "-q", "-w", wheels, project, cwd=tmp_path)
    built = sorted(wheels.glob("*.whl"))
    assert len(built) == 3, built

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                       cwd=tmp_path).strip())
    (purelib / "zz_diffgym_test_deps.pth").write_text(f"{dependency_dir(tmp_path)}\n")
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", "-q",
        *built, cwd=tmp_path)
    installed = {p.name for p in purelib.iterdir()}
    assert {"diffgym", "diffgym_apg", "diffgym_ppo"} <= installed
    assert (purelib / "diffgym" / "assets" / "fr3" / "fr3.urdf").is_file()
    assert not any(n.startswith("__editable__") for n in installed)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    output = run(python, "-c", SMOKE, cwd=outside, env=env)
    import diffgym
    for env_id in diffgym.ALL_TASK_IDS:
        assert f"made {env_id}" in output
    assert "trainer apg" in output and "trainer ppo" in output
