"""Bad input raises a clear exception naming the problem, and no output is touched."""
import numpy as np
import pytest

import mos
from mos import _C

CONFIG = mos.MoSConfig(r=4, equivalent_rank=2, shards_per_vector=2, private_rank=1)
POOL = mos.ShardPool("q", 8, 6, 3, CONFIG)


def good(n=5, dtype=np.float32):
    rng = np.random.default_rng(0)
    ia, ib = POOL.indices(1)
    return dict(
        y=np.full((n, 6), 7.0, dtype=dtype),
        x=rng.standard_normal((n, 8)).astype(dtype),
        pool_a=rng.standard_normal(POOL.pool_a_shape).astype(dtype),
        index_a=ia.copy(),
        pool_b=rng.standard_normal(POOL.pool_b_shape).astype(dtype),
        index_b=ib.copy(),
        scale=0.5,
    )


def readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


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
