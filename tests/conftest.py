"""Shared fixtures: the device list (cpu, plus cuda, which runs when built with CUDA and a GPU is
visible), and the small valid adapter the error tests change one argument of at a time."""
import numpy as np
import pytest

import mos

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


# The error tests start from one valid call on this pool (d_in 8, d_out 6, 3 layers; r=4, l=2, p=1)
# and give it one defect at a time.
SMALL_CONFIG = mos.MoSConfig(r=4, equivalent_rank=2, shards_per_vector=2, private_rank=1)
SMALL_POOL = mos.ShardPool("q", 8, 6, 3, SMALL_CONFIG)


def linear_arrays(n=5, dtype=np.float32):
    """x, both pools and layer 1's index tables of SMALL_POOL, seeded: the arrays of a valid call."""
    rng = np.random.default_rng(0)
    ia, ib = SMALL_POOL.indices(1)
    return dict(x=rng.standard_normal((n, 8)).astype(dtype),
                pool_a=rng.standard_normal(SMALL_POOL.pool_a_shape).astype(dtype), index_a=ia.copy(),
                pool_b=rng.standard_normal(SMALL_POOL.pool_b_shape).astype(dtype), index_b=ib.copy())


def two_adapter_arrays():
    """(x, pool_a, index_a, pool_b, index_b) of a valid batched call: two adapters on one pool."""
    a = linear_arrays()
    tables = np.stack([a["index_a"], a["index_b"]])
    return a["x"], a["pool_a"], tables, a["pool_b"], tables[::-1].copy()


def readonly(array):
    """A read-only copy of `array`."""
    array = array.copy()
    array.flags.writeable = False
    return array
