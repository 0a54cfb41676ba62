"""Argument validation of the linear entry points of mos._C and mos.functional: bad input raises a
clear TypeError, ValueError or BufferError naming the argument, and no output is touched. Inputs
that used to crash the process run in a child, so a crash fails only its test. (Batched forward:
tests/test_serving_ops.py; DLPack producers: tests/test_dlpack.py.)"""
import re

import numpy as np
import pytest

import mos
from mos import _C
from mos import functional as F
from child import SETUP, run_child
from conftest import SMALL_POOL as POOL, linear_arrays, readonly, two_adapter_arrays

f32 = np.float32


def good(n=5, dtype=np.float32):
    return dict(y=np.full((n, 6), 7.0, dtype=dtype), **linear_arrays(n, dtype), scale=0.5)


def bad_index(which, value, at=0):
    def change(args):
        idx = args[which].copy()
        idx[at] = value
        args[which] = idx
    return change


# Each case: (id, change applied to good() args, exception type, message regex)
FORWARD_CASES = [
    ("x float16", lambda a: a.update(x=a["x"].astype(np.float16)), TypeError, "x: dtype float16 does not match|pool_a: dtype float32 does not match x's float16"),
    ("x int32", lambda a: a.update(x=a["x"].astype(np.int32)), TypeError, "x: expected a floating-point tensor"),
    ("x int64", lambda a: a.update(x=a["x"].astype(np.int64)), TypeError, "x: unsupported dtype"),
    ("pool_a float64", lambda a: a.update(pool_a=a["pool_a"].astype(np.float64)), TypeError, "pool_a: dtype float64 does not match x's float32"),
    ("pool_b float64", lambda a: a.update(pool_b=a["pool_b"].astype(np.float64)), TypeError, "pool_b: dtype float64 does not match x's float32"),
    ("y float64", lambda a: a.update(y=a["y"].astype(np.float64)), TypeError, "y: dtype float64 does not match x's float32"),
    ("index int64", lambda a: a.update(index_a=a["index_a"].astype(np.int64)), TypeError, "index_a: unsupported dtype"),
    ("index float", lambda a: a.update(index_b=a["index_b"].astype(np.float32)), TypeError, "index_b: index tables must be int32"),
    ("x 1-D", lambda a: a.update(x=a["x"][0]), ValueError, "x: expected a 2-D array, got 1-D"),
    ("x 3-D", lambda a: a.update(x=a["x"][None]), ValueError, "x: expected a 2-D array, got 3-D"),
    ("y rows", lambda a: a.update(y=a["y"][:4]), ValueError, r"y: dimension 0 is 4, expected 5 \(rows of x\)"),
    ("y features", lambda a: a.update(y=np.zeros((5, 5), np.float32)), ValueError, "y: d_out = 5 does not match pool_b's shard length 3"),
    ("d_in not multiple of shard", lambda a: a.update(x=np.zeros((5, 9), np.float32)), ValueError, "pool_a: shard length 4 must divide x's d_in = 9"),
    ("index length", lambda a: a.update(index_a=a["index_a"][:7].copy()), ValueError, "index_a: length 7 must be a positive multiple of shards_per_vector = 2"),
    ("index_b length", lambda a: a.update(index_b=a["index_b"][:6].copy()), ValueError, r"index_b: dimension 0 is 6, expected 8"),
    ("index_a out of range", bad_index("index_a", 12), ValueError, r"index_a\[0\] = 12 is out of range \[0, 12\)"),
    ("index_b negative", bad_index("index_b", -1, 3), ValueError, r"index_b\[3\] = -1 is out of range"),
    ("x column-strided", lambda a: a.update(x=np.zeros((5, 16), np.float32)[:, ::2]), BufferError, "x: columns must be contiguous"),
    ("x broadcast rows", lambda a: a.update(x=np.broadcast_to(a["x"][:1], (5, 8))), BufferError, "x: row stride 0 is smaller than the row length 8"),
    ("x reversed rows", lambda a: a.update(x=a["x"][::-1]), BufferError, "x: row stride -8 is smaller"),
    ("pool_a not contiguous", lambda a: a.update(pool_a=np.zeros((12, 8), np.float32)[:, ::2]), BufferError, "pool_a: must be contiguous"),
    ("y read-only", lambda a: a.update(y=readonly(a["y"])), BufferError, "y: output is read-only"),
    ("y overlaps x", lambda a: a.update(x=a["y"][:, :6].copy(), y=a["y"]) or a.update(x=np.zeros((5, 8), np.float32)) or a.update(y=a["x"][:, :6]), BufferError, "y: output memory overlaps x"),
    ("y overlaps pool", lambda a: a.update(y=a["pool_a"][:5, :4].copy()) or a.update(y=np.lib.stride_tricks.as_strided(a["pool_b"], (5, 6), (24, 4))), BufferError, "y: output memory overlaps pool_b"),
    ("scale nan", lambda a: a.update(scale=float("nan")), ValueError, "scale must be finite"),
    ("scale inf", lambda a: a.update(scale=float("inf")), ValueError, "scale must be finite"),
    ("scale string", lambda a: a.update(scale="1"), TypeError, "scale: expected a real number, got str"),
    ("x a list", lambda a: a.update(x=[[1.0] * 8] * 5), TypeError, "x: expected a NumPy array, a DLPack capsule or an object with __dlpack__, got list"),
    ("x None", lambda a: a.update(x=None), TypeError, "x: expected a NumPy array, a DLPack capsule or an object with __dlpack__, got NoneType"),
    ("x byte-swapped", lambda a: a.update(x=a["x"].astype(">f4")), BufferError, "x: byte-swapped arrays are not supported"),
]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward_rejects_and_leaves_output_untouched(case):
    _, change, exc, message = case
    args = good()
    change(args)
    y = args["y"]
    before = np.array(y, copy=True) if isinstance(y, np.ndarray) else None
    pool_b_before = args["pool_b"].copy()
    with pytest.raises(exc, match=message):
        _C.linear_forward(args["y"], args["x"], args["pool_a"], args["index_a"], args["pool_b"],
                          args["index_b"], args["scale"])
    if before is not None:
        np.testing.assert_array_equal(y, before)
    np.testing.assert_array_equal(args["pool_b"], pool_b_before)


def backward_args():
    a = good()
    rng = np.random.default_rng(1)
    return dict(dx=np.full((5, 8), 3.0, np.float32), dpool_a=np.full(POOL.pool_a_shape, 2.0, np.float32),
                dpool_b=np.full(POOL.pool_b_shape, 2.0, np.float32),
                dy=rng.standard_normal((5, 6)).astype(np.float32), x=a["x"], pool_a=a["pool_a"],
                index_a=a["index_a"], pool_b=a["pool_b"], index_b=a["index_b"], scale=0.5)


BACKWARD_CASES = [
    ("repeated index", bad_index("index_a", None), ValueError, r"index_a\[1\] = .* repeats an earlier entry"),
    ("dpool_a shape", lambda a: a.update(dpool_a=np.zeros((11, 4), np.float32)), ValueError, r"dpool_a: dimension 0 is 11, expected 12 \(pool rows\)"),
    ("dpool_b read-only", lambda a: a.update(dpool_b=readonly(a["dpool_b"])), BufferError, "dpool_b: output is read-only"),
    ("dx dtype", lambda a: a.update(dx=a["dx"].astype(np.float64)), TypeError, "dx: dtype float64 does not match x's float32"),
    ("dx rows", lambda a: a.update(dx=a["dx"][:3]), ValueError, "dx: dimension 0 is 3, expected 5"),
    ("dx aliases dpool_a", lambda a: a.update(dpool_a=np.zeros((12, 4), np.float32)) or a.update(dx=np.lib.stride_tricks.as_strided(a["dpool_a"], (5, 8), (32, 4))), BufferError, "dx: output memory overlaps dpool_a"),
    ("dpool_a is pool_a", lambda a: a.update(dpool_a=a["pool_a"]), BufferError, "dpool_a: output memory overlaps pool_a"),
    ("dy features", lambda a: a.update(dy=np.zeros((5, 4), np.float32)), ValueError, "dy: d_out = 4 does not match pool_b's shard length 3"),
]


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=[c[0] for c in BACKWARD_CASES])
def test_backward_rejects_and_leaves_gradients_untouched(case):
    _, change, exc, message = case
    args = backward_args()
    if case[0] == "repeated index":
        idx = args["index_a"].copy()
        idx[1] = idx[0]
        args["index_a"] = idx
    else:
        change(args)
    snapshots = {k: args[k].copy() for k in ("dx", "dpool_a", "dpool_b")}
    with pytest.raises(exc, match=message):
        _C.linear_backward(args["dx"], args["dpool_a"], args["dpool_b"], args["dy"], args["x"],
                           args["pool_a"], args["index_a"], args["pool_b"], args["index_b"], args["scale"])
    for k, before in snapshots.items():
        np.testing.assert_array_equal(args[k], before, err_msg=k)


def test_argument_parsing_errors_name_the_function():
    a = good()
    with pytest.raises(TypeError, match="linear_forward\\(\\) missing required argument 'scale'"):
        _C.linear_forward(a["y"], a["x"], a["pool_a"], a["index_a"], a["pool_b"], a["index_b"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        _C.linear_forward(**{k: a[k] for k in a}, bogus=1)
    with pytest.raises(ValueError, match="stream=0 is invalid"):
        _C.linear_forward(**a, stream=0)


def test_cpu_refuses_16_bit_with_a_type_error():
    torch = pytest.importorskip("torch")
    a = good()
    t = {k: (torch.from_numpy(v).to(torch.bfloat16) if isinstance(v, np.ndarray) and v.dtype == np.float32 else
             torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in a.items()}
    before = t["y"].clone()
    with pytest.raises(TypeError, match="the CPU path supports float32 and float64, got bfloat16"):
        _C.linear_forward(**t)
    assert torch.equal(t["y"], before)


def test_torch_tensor_that_requires_grad_is_refused_clearly():
    torch = pytest.importorskip("torch")
    a = good()
    x = torch.from_numpy(a["x"]).requires_grad_()
    with pytest.raises(Exception, match="requires_grad|require grad|detach"):
        _C.linear_forward(a["y"], x, a["pool_a"], a["index_a"], a["pool_b"], a["index_b"], 0.5)


def test_workspace_too_small_is_refused():
    a = good(n=40)
    with pytest.raises(ValueError, match="workspace: holds 16 bytes, the call needs"):
        _C.linear_forward(**a, workspace=np.zeros(4, np.float32))


# ---------------------------------------------------------------- scales, sizes, thread counts, overlap

@pytest.mark.parametrize("scale", [1e39, -1e39, 3.5e38])
def test_scale_not_finite_in_float32_is_refused(scale):
    a = linear_arrays()
    y = np.full((5, 6), 2.0, f32)
    with pytest.raises(ValueError, match=r"scale = -?[0-9.e+]+ is not finite in float32"):
        _C.linear_forward(y, a["x"], a["pool_a"], a["index_a"], a["pool_b"], a["index_b"], scale)
    with pytest.raises(ValueError, match="is not finite in float32"):
        F.backward(np.ones((5, 6), f32), **a, scale=scale)
    with pytest.raises(ValueError, match="is not finite in float32"):
        F.forward(**a, scale=scale, weight=np.ones((6, 8), f32))
    assert (y == 2.0).all()


def test_a_large_scale_is_fine_in_float64():
    a = linear_arrays(dtype=np.float64)
    y = F.forward(**a, scale=1e39)
    assert np.isfinite(y).all() and np.abs(y).max() > 1e38


def test_workspace_sizes_refuse_negative_and_bad_values():
    with pytest.raises(ValueError, match=r"n_rows must be in \[0, "):
        F.workspace_bytes(-5, 8, 8, 2, 4)
    with pytest.raises(ValueError, match="itemsize must be 2, 4 or 8, got 3"):
        F.workspace_bytes(5, 8, 8, 2, 3)
    with pytest.raises(TypeError, match="d_in: expected an integer, got float"):
        F.workspace_bytes(5, 8.5, 8, 2, 4)
    with pytest.raises(ValueError, match="needs a workspace beyond 2..62 bytes"):
        F.workspace_bytes(2**30, 2**30, 2**30, 2**30, 8)
    with pytest.raises(ValueError, match=r"max_rank must be in \[1, "):
        F.batched_workspace_bytes(4, 0, 4)
    assert F.workspace_bytes(0, 8, 8, 2, 4) > 0


@pytest.mark.parametrize("n, error", [(2**32 + 1, ValueError), (0, ValueError), (-1, ValueError),
                                      (2.0, TypeError), (True, TypeError), ("2", TypeError)])
def test_set_num_threads_refuses_what_it_would_truncate(n, error):
    before = mos.build_info()["blas_threads"]
    with pytest.raises(error, match=r"^n(:| must)"):
        mos.set_num_threads(n)
    assert mos.build_info()["blas_threads"] == before


def test_two_views_of_one_buffer_with_disjoint_columns_are_refused_as_overlapping():
    # Documented: overlap is judged on byte spans, and interleaved rows share a span.
    a = linear_arrays()
    buffer = np.zeros((5, 14), f32)
    x, y = buffer[:, :8], buffer[:, 8:]
    x[...] = a["x"]
    with pytest.raises(BufferError, match="y: output memory overlaps x"):
        _C.linear_forward(y, x, a["pool_a"], a["index_a"], a["pool_b"], a["index_b"], 0.5)
    assert not y.any()


# ---------------------------------------------------------------- every functional argument is named

def _functional_calls():
    """(function name, argument name, call with that argument replaced by `bad`)."""
    a = linear_arrays()
    x, pa, ia, pb, ib = a["x"], a["pool_a"], a["index_a"], a["pool_b"], a["index_b"]
    bx, bpa, bia, bpb, bib = two_adapter_arrays()
    dy = np.ones((5, 6), f32)
    forward = dict(x=x, pool_a=pa, index_a=ia, pool_b=pb, index_b=ib, scale=0.5)
    backward = dict(dy=dy, **forward)
    batched = dict(x=bx, pool_a=bpa, index_a=bia, pool_b=bpb, index_b=bib, scales=np.ones(2),
                   adapter_ids=np.zeros(5, np.int32))
    cases = [("forward", forward, F.forward), ("backward", backward, F.backward),
             ("batched_forward", batched, F.batched_forward),
             ("assemble", dict(pool=pa, index=ia, r=4), F.assemble),
             ("scatter_add", dict(pool_grad=np.zeros_like(pa), rows=np.ones((8, 4), f32), index=ia),
              F.scatter_add)]
    for name, kwargs, function in cases:
        for arg in kwargs:
            yield name, arg, kwargs, function


CALLS = list(_functional_calls())


BAD_VALUES = {"None": None, "str": "text", "float": 1.5, "0-D": np.float32(2.0), "list": [[1.0, 2.0]],
              "1-D": np.zeros(3, f32), "3-D": np.zeros((2, 2, 2), f32)}


def _applies(arg, bad):
    """False where `bad` is a valid value for `arg`: x, dy and rows take N-D input (leading
    dimensions are rows), and a float is a valid scale."""
    if arg in ("x", "dy", "rows") and getattr(bad, "ndim", 0) == 3:
        return False
    return not (arg == "scale" and isinstance(bad, (float, np.floating)))


BAD_CALLS = [(call, label) for call in CALLS for label, bad in BAD_VALUES.items()
             if _applies(call[1], bad)]


# Arrays without columns used to crash (SIGFPE); they are covered in a child process below and
# by the fuzz.
@pytest.mark.parametrize("call,label", BAD_CALLS, ids=[f"{c[0]}-{c[1]}-{label}" for c, label in BAD_CALLS])
def test_every_functional_argument_gets_an_error_that_names_it(call, label):
    name, arg, kwargs, function = call
    bad = BAD_VALUES[label]
    kwargs = dict(kwargs, **{arg: bad})
    outputs = {k: v.copy() for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    with pytest.raises((TypeError, ValueError, BufferError), match=re.escape(arg)) as info:
        function(**kwargs)
    message = str(info.value)
    assert arg in message, f"{name}({arg}=...) raised {info.type.__name__}: {message}"
    for k, before in outputs.items():
        np.testing.assert_array_equal(kwargs[k], before, err_msg=k)


# ---------------------------------------------------------------- inputs that used to crash, each in a child

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


# A message from the C core names the problem, not the source line (that only in MOS_DEBUG=1 builds).
C_LOCATION = re.compile(r"\[\w+\.(c|cu|h|inc):\d+\]")


@pytest.mark.parametrize("call,message", [
    (lambda: mos._C.pool_shape(8, 8, 0, 4, 2, 2, 1, True), "^n_layers must be >= 1, got 0$"),
    (lambda: mos.functional.forward(np.ones((2, 9), np.float32), np.zeros((8, 4), np.float32),
                                    np.arange(4, dtype=np.int32), np.zeros((8, 4), np.float32),
                                    np.arange(4, dtype=np.int32), scale=1.0),
     "^pool_a: shard length 4 must divide x's d_in = 9$"),
])
def test_core_errors_carry_no_source_location(call, message):
    with pytest.raises(ValueError, match=message) as err:
        call()
    assert not C_LOCATION.search(str(err.value)), str(err.value)
