"""Fixtures of the torch tests: per-test seeding and the device list."""
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import mos  # noqa: E402


def _cuda_ready():
    return bool(mos.build_info()["cuda"]) and torch.cuda.is_available()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not _cuda_ready(), reason="mos built without CUDA or no GPU visible"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
