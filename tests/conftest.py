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
