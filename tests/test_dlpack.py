"""Inputs that used to crash the process: each runs in a child, so a crash fails only its test.

Covered: x without columns (a division by d_in / shard length), index tables changed by another
thread between the check and the use, and DLPack producers that break the protocol."""
import numpy as np
import pytest

from mos import _C
from child import run_child
from dlpack_producer import DL_CPU, DL_CUDA, Producer

SETUP = """
import numpy as np
import mos
from mos import _C, functional as F
from dlpack_producer import Producer, DL_CPU, DL_CUDA

f32 = np.float32
pa, pb = np.ones((12, 4), f32), np.ones((12, 3), f32)
ia, ib = np.arange(8, dtype=np.int32), np.arange(8, 0, -1, dtype=np.int32)

def expect(error, text, call):
    try:
        call()
    except error as e:
        assert text in str(e), (text, str(e))
        print("ok", type(e).__name__, e)
        return
    raise AssertionError(f"no {error.__name__} ({text})")
"""


def test_x_without_columns_is_refused_by_every_entry_point():
    out = run_child(SETUP + """
x0, y, dy = np.zeros((5, 0), f32), np.zeros((5, 6), f32), np.zeros((5, 6), f32)
ids = np.zeros(5, np.int32)
expect(ValueError, "x: has no columns", lambda: _C.linear_forward(y, x0, pa, ia, pb, ib, 0.5))
expect(ValueError, "x: has no columns", lambda: _C.linear_backward(None, None, None, dy, x0, pa, ia, pb, ib, 0.5))
expect(ValueError, "x: has no columns", lambda: _C.batched_forward(y, x0, pa, ia[None], pb, ib[None],
                                                                  np.ones(1), ids))
expect(ValueError, "x: has no columns", lambda: F.forward(x0, pa, ia, pb, ib, 0.5))
expect(ValueError, "x: has no columns", lambda: F.backward(dy, x0, pa, ia, pb, ib, 0.5))
expect(ValueError, "x: has no columns", lambda: F.batched_forward(x0, pa, ia[None], pb, ib[None], [1.0], ids))
expect(ValueError, "x: has no columns", lambda: F.forward(np.zeros((2, 3, 0), f32), pa, ia, pb, ib, 0.5))
expect(ValueError, "y: has no columns", lambda: _C.linear_forward(np.zeros((5, 0), f32), np.zeros((5, 8), f32),
                                                                 pa, ia, pb, ib, 0.5))
""")
    assert out.count("ok ValueError") == 8


@pytest.mark.parametrize("entry", ["scatter_add", "linear_forward", "batched_forward"])
def test_an_index_changed_by_another_thread_mid_call_is_never_used_unchecked(entry):
    # The racing thread flips one index between valid and far out of range while the call runs
    # without the GIL; each call must see one consistent copy: success or a ValueError.
    out = run_child(SETUP + f"""
import threading, time
n, width = 4096, 64
pool = np.zeros((n, width), f32)
rows = np.ones((n, width), f32)
index = np.arange(n, dtype=np.int32)
x, y = np.ones((4, 2 * width), f32), np.zeros((4, 2 * width), f32)   # <= 4 rows: direct path
xb, yb = np.ones((256, 2 * width), f32), np.zeros((256, 2 * width), f32)
ids = np.zeros(256, np.int32)
table = index[:2 * 64].reshape(1, -1).copy()
target = table.reshape(-1) if "{entry}" == "batched_forward" else index   # a view: flips reach the call
bad, good = 2**31 - 1, int(target[-1])
stop = False

def flip():
    while not stop:
        target[-1] = bad   # the last entry: read last, long after the check
        target[-1] = good

def call():
    if "{entry}" == "scatter_add":
        _C.scatter_add(pool, rows, index)
    elif "{entry}" == "linear_forward":
        _C.linear_forward(y, x, pool, index, pool, index, 0.5)
    else:
        _C.batched_forward(yb, xb, pool, table, pool, table, np.ones(1), ids)

thread = threading.Thread(target=flip)
thread.start()
ok = refused = 0
deadline = time.monotonic() + 1.5
try:
    while time.monotonic() < deadline:
        try:
            call()
            ok += 1
        except ValueError as e:
            assert "out of range" in str(e), e
            refused += 1
finally:
    stop = True
    thread.join()
print("calls", ok, refused)
""")
    ok, refused = map(int, out.split()[-2:])
    assert ok + refused > 10


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
