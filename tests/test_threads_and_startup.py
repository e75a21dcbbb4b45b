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
