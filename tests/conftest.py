"""Shared fixtures: the device list (cpu, plus cuda when built with CUDA and a GPU is visible)."""
import numpy as np
import pytest

import mos

pytest_plugins = ["pytester"]  # tests of the mos pytest plugin run pytest inside pytest


def _cuda_available():
    if not mos.build_info()["cuda"]:
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not _cuda_available(), reason="mos built without CUDA or no GPU visible"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def to_device(array, device):
    """NumPy stays NumPy on cpu; on cuda the array becomes a torch CUDA tensor."""
    if device == "cpu":
        return array
    import torch

    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def to_numpy(value):
    if isinstance(value, np.ndarray):
        return value
    return value.detach().cpu().numpy()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
