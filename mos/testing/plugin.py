"""The pytest plugin of mos (registered through the `pytest11` entry point, so it is active
wherever mos is installed; `-p no:mos` turns it off).

    --mos-device cpu|cuda   the device of the mos_device fixture and the model fixtures (cpu)
    @pytest.mark.gpu        the test needs CUDA and a CUDA build of mos; skipped cleanly without
    mos_device              "cpu" or "cuda" (a test asking for cuda skips when there is none)
    tiny_llama, tiny_gpt2   small seeded transformers models on mos_device (fresh per test)
    token_batch             (2, 8) seeded token ids on mos_device
    mos_record              mos_record(metric=value, ...) adds a row to the results table
                            printed at the end of the run (ablations read like a table)

Everything heavy (torch, transformers) is imported by the fixtures, never at import time, so
pytest runs in environments without torch.
"""
from __future__ import annotations

import pytest

_RESULTS_KEY = pytest.StashKey[list]()


def cuda_available() -> bool:
    """True when torch sees a GPU and mos was built with CUDA."""
    try:
        import torch
    except ImportError:
        return False
    if not torch.cuda.is_available():
        return False
    import mos

    return bool(mos.build_info()["cuda"])


def pytest_addoption(parser):
    group = parser.getgroup("mos", "MoS experiments (mos.testing)")
    group.addoption("--mos-device", choices=("cpu", "cuda"), default="cpu",
                    help="device of the mos_device, tiny_llama, tiny_gpt2 and token_batch fixtures (default cpu)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU and a CUDA build of mos; skipped without them")
    config.stash[_RESULTS_KEY] = []


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and not cuda_available():
        skip = pytest.mark.skip(reason="needs CUDA: no GPU visible or mos built without CUDA")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture
def mos_device(request) -> str:
    device = request.config.getoption("--mos-device")
    if device == "cuda" and not cuda_available():
        pytest.skip("--mos-device cuda: no GPU visible or mos built without CUDA")
    return device


def _models():
    """mos.testing.models, or an ImportError naming the extra its torch/transformers come from."""
    from .._extras import require

    require("torch", "the mos pytest fixtures")
    require("transformers", "the mos pytest fixtures")
    from . import models
    return models


@pytest.fixture
def tiny_llama(mos_device):
    return _models().tiny_llama(device=mos_device)


@pytest.fixture
def tiny_gpt2(mos_device):
    return _models().tiny_gpt2(device=mos_device)


@pytest.fixture
def token_batch(mos_device):
    return _models().token_batch(device=mos_device)


@pytest.fixture
def mos_record(request):
    """Call with metrics (mos_record(loss=0.12, params=1536)); each call adds a row under the test's id."""
    rows = request.config.stash[_RESULTS_KEY]

    def record(**metrics):
        rows.append((request.node.nodeid.split("::")[-1], metrics))

    return record


def pytest_terminal_summary(terminalreporter, config):
    rows = config.stash.get(_RESULTS_KEY, [])
    if not rows:
        return
    columns = list(dict.fromkeys(k for _, metrics in rows for k in metrics))
    terminalreporter.section("mos results")
    table = [["test", *columns]] + [[name, *(_fmt(m.get(c, "")) for c in columns)] for name, m in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for row in table:
        terminalreporter.write_line("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
