"""DLPack import (csrc/tensor.c) of producers that break the protocol: refused with a clear error,
never a crash. Calls that used to crash the process run in a child, so a crash fails only its test."""
import numpy as np
import pytest

from mos import _C
from mos.testing.dlpack_producer import DL_CPU, DL_CUDA, Producer

from child import SETUP, run_child


def test_dlpack_capsule_without_data_for_a_non_empty_shape_is_refused():
    out = run_child(SETUP + """
x = Producer(np.ones((5, 8), f32), data=None)
expect(BufferError, "x: the DLPack capsule has no data", lambda: _C.linear_forward(
    np.zeros((5, 6), f32), x, pa, ia, pb, ib, 0.5))
pool = Producer(np.ones((12, 4), f32), data=None)
expect(BufferError, "pool: the DLPack capsule has no data", lambda: _C.assemble(np.zeros((8, 4), f32), pool, ia))
empty = Producer(np.ones((0, 8), f32), data=None)   # size 0: no data is allowed
_C.linear_forward(np.zeros((0, 6), f32), empty, pa, ia, pb, ib, 0.5)
print("ok empty")
""")
    assert out.count("ok") == 3


def test_dlpack_capsule_on_another_device_than_announced_is_refused():
    # The capsule says CUDA with a pointer that is not host memory; reading it on the host crashed.
    out = run_child(SETUP + """
x = Producer(np.ones((5, 8), f32), data=4096, capsule_device=(DL_CUDA, 0), reported_device=(DL_CPU, 0))
expect(BufferError, "the DLPack capsule is on device (2, 0) but __dlpack_device__() said (1, 0)",
       lambda: _C.linear_forward(np.zeros((5, 6), f32), x, pa, ia, pb, ib, 0.5))
x = Producer(np.ones((5, 8), f32), capsule_device=(DL_CPU, 0), reported_device=(DL_CPU, 3))
expect(BufferError, "__dlpack_device__() said (1, 3)",
       lambda: _C.linear_forward(np.zeros((5, 6), f32), x, pa, ia, pb, ib, 0.5))
""")
    assert out.count("ok BufferError") == 2


@pytest.mark.parametrize("device", [[DL_CPU, 0], DL_CPU, (DL_CPU,), ("cpu", 0), (DL_CPU, 2**40)])
def test_malformed_dlpack_device_gives_a_clear_error(device):
    x = Producer(np.ones((5, 8), np.float32), reported_device=device)
    y = np.zeros((5, 6), np.float32)
    pa, pb = np.ones((12, 4), np.float32), np.ones((12, 3), np.float32)
    ia = np.arange(8, dtype=np.int32)
    error = ValueError if device == (DL_CPU, 2**40) else TypeError
    with pytest.raises(error, match=r"x: __dlpack_device__\(\) (must return|returned an out-of-range)"):
        _C.linear_forward(y, x, pa, ia, pb, ia, 0.5)
    assert not y.any()


def test_deleter_running_python_code_keeps_the_pending_error():
    calls = []
    # A float64 pool next to float32 x: a validation error is pending when the deleters run.
    pool_a = Producer(np.ones((12, 4), np.float64), on_delete=lambda: calls.append(sum(range(3))))
    x = Producer(np.ones((5, 8), np.float32), on_delete=lambda: calls.append("x"))
    y = np.zeros((5, 6), np.float32)
    ia = np.arange(8, dtype=np.int32)
    with pytest.raises(TypeError, match="pool_a: dtype float64 does not match x's float32"):
        _C.linear_forward(y, x, pool_a, ia, np.ones((12, 3), np.float32), ia, 0.5)
    assert pool_a.deleted == 1 and x.deleted == 1 and sorted(map(str, calls)) == ["3", "x"]
    assert not y.any()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_deleter_that_raises_is_reported_and_the_call_still_succeeds():
    def boom():
        raise RuntimeError("deleter failed")
    x = Producer(np.ones((5, 8), np.float32), on_delete=boom)
    y = np.zeros((5, 6), np.float32)
    ia = np.arange(8, dtype=np.int32)
    _C.linear_forward(y, x, np.ones((12, 4), np.float32), ia, np.ones((12, 3), np.float32), ia, 0.5)
    assert x.deleted == 1 and y.all()
