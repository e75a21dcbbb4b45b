"""Torch thread defaults for training, and a start-up that does not import torch before it is needed."""

import subprocess
import sys

import pytest

from diffgym.threads import resolve_threads


def test_cpu_training_defaults_to_one_thread_and_cuda_keeps_torch_default():
    assert resolve_threads(None, "cpu") == 1
    assert resolve_threads(None, None) == 1
    assert resolve_threads(None, "cuda:0") is None
    assert resolve_threads(4, "cpu") == 4
    with pytest.raises(ValueError, match="--threads"):
        resolve_threads(0, "cpu")


@pytest.mark.parametrize("code", [
    "import diffgym; assert diffgym.TASK_IDS",
    "import sys; sys.argv = ['diffgym', '--help']\nfrom diffgym.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass",
])
def test_import_and_help_do_not_import_torch_or_warp(code):
    check = code + "\nimport sys\nleft = [m for m in ('torch', 'warp') if m in sys.modules]\nassert not left, left"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_lazy_api_names_resolve():
    import diffgym

    assert diffgym.DiffSim.__name__ == "DiffSim" and callable(diffgym.warp_call)
    with pytest.raises(AttributeError):
        diffgym.no_such_name


def test_no_cuda_driver_warning_on_machines_without_a_driver():
    """Warp's native "could not load the CUDA driver" line is not printed where no driver exists."""
    import ctypes.util

    if ctypes.util.find_library("cuda") is not None:
        pytest.skip("a CUDA driver is installed: Warp's own messages apply")
    code = ("import gymnasium as gym, diffgym; env = gym.make('DiffGym/PointMass1D-v0'); env.reset(seed=0); "
            "env.step(env.action_space.sample())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert "CUDA" not in result.stderr, result.stderr
