import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
import warp as wp

import diffgym  # noqa: F401  (registers the tasks)

torch.set_num_threads(1)


def cuda_available() -> bool:
    wp.init()
    return torch.cuda.is_available() and wp.get_cuda_device_count() > 0


requires_cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")


def newton_available() -> bool:
    try:
        import newton  # noqa: F401
    except ImportError:
        return False
    return True


requires_newton = pytest.mark.skipif(not newton_available(), reason="needs Newton (pip install 'diffgym[newton]')")


TINY_RUNS = {"apg": {}, "sapo": {},
             "apg-ppo": {"algo_params.proximal.n_steps": 8, "algo_params.proximal.batch_size": 16},
             "ppo": {"algo_params.n_steps": 16, "algo_params.batch_size": 32}}
"""Per bundled trainer, what makes a run of a few hundred env steps on 4 envs possible (PPO's rollout and
minibatch sizes)."""


@pytest.fixture
def one_thread():
    """Training runs use one torch thread, as every run of a sweep does; the previous count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Tests parametrized over the registered tasks skip the Newton tasks where Newton is not installed
    (they are registered, but making one needs the optional extra)."""
    if newton_available():
        return
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(value in diffgym.NEWTON_TASK_IDS for value in params.values() if isinstance(value, str)):
            item.add_marker(pytest.mark.skip(reason="a Newton task: needs pip install 'diffgym[newton]'"))
