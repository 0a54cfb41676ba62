"""Shared fixtures: the device list (cpu, plus cuda, which runs when built with CUDA and a GPU is visible)."""
import numpy as np
import pytest

pytest_plugins = ["pytester"]  # tests of the mos pytest plugin run pytest inside pytest


# The mos pytest plugin (mos.testing.plugin) skips `gpu`-marked tests without a GPU and a CUDA build.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.has_plugin("mos"):  # run with -p no:mos or without the entry point
        from mos.testing.plugin import pytest_collection_modifyitems as skip_gpu_tests

        skip_gpu_tests(config, items)


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
