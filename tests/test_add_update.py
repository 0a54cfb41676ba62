"""mos._C.add_update, the inference path's one call per adapted layer: linear_forward's product and
checks on CPU, with x (..., d_in) and y (..., d_out) keeping their leading dimensions as rows."""
import math

import numpy as np
import pytest

from mos import _C
from mos.testing.dlpack_producer import Producer
from conftest import linear_arrays

D_OUT = 6
DL_CUDA = 2


def _arrays(lead):
    n = math.prod(lead)
    a = linear_arrays(n)
    x = a.pop("x").reshape(*lead, 8)
    y = np.random.default_rng(3).standard_normal((*lead, D_OUT)).astype(np.float32)
    return y, x, a


def _want(y, x, a, scale):
    flat_y = y.reshape(-1, D_OUT).copy()
    _C.linear_forward(flat_y, np.ascontiguousarray(x.reshape(-1, 8)), a["pool_a"], a["index_a"],
                      a["pool_b"], a["index_b"], scale)
    return flat_y.reshape(y.shape)


@pytest.mark.parametrize("lead", [(5,), (1, 5), (5, 1), (2, 3), (2, 1, 3), (1, 1, 1), (0, 4), (3, 0)])
def test_leading_dimensions_are_rows(lead):
    y, x, a = _arrays(lead)
    want = _want(y, x, a, 0.5)
    _C.add_update(y, x, a["pool_a"], a["index_a"], a["pool_b"], a["index_b"], 0.5)
    np.testing.assert_array_equal(y, want)


def test_evenly_spaced_rows_need_not_be_contiguous():
    y, x, a = _arrays((2, 3))
    wide = np.zeros((2, 3, 16), np.float32)
    wide[..., :8] = x
    strided = wide[..., :8]  # rows 16 apart, the outer dimension 48: evenly spaced
    want = _want(y, x, a, 2.0)
    _C.add_update(y, strided, a["pool_a"], a["index_a"], a["pool_b"], a["index_b"], 2.0)
    np.testing.assert_array_equal(y, want)


def _bad(change):
    y, x, a = _arrays((2, 3))
    args = dict(y=y, x=x, **a, scale=0.5)
    change(args)
    return args


CASES = [
    ("uneven rows", lambda a: a.update(x=np.zeros((2, 4, 8), np.float32)[:, :3]), BufferError,
     "x: its leading dimensions are not evenly spaced rows; pass a contiguous copy"),
    ("x 1-D", lambda a: a.update(x=np.zeros(8, np.float32)), ValueError,
     r"x: expected an array of 2 to 16 dimensions \(the leading ones are rows\), got 1-D"),
    ("x 17-D", lambda a: a.update(x=np.zeros((1,) * 16 + (8,), np.float32)), ValueError, "x: expected an array of 2 to 16"),
    ("y rows", lambda a: a.update(y=a["y"][:1]), ValueError, r"y: dimension 0 is 3, expected 6 \(rows of x\)"),
    ("y features", lambda a: a.update(y=np.zeros((2, 3, 5), np.float32)), ValueError, "y: d_out = 5 does not match"),
    ("index out of range", lambda a: a["index_a"].__setitem__(0, 99), ValueError, r"index_a\[0\] = 99 is out of range"),
    ("scale nan", lambda a: a.update(scale=float("nan")), ValueError, "scale must be finite"),
    ("y overlaps x", lambda a: a.update(y=a["x"][..., :D_OUT]), BufferError, "y: output memory overlaps x"),
    ("x on a GPU", lambda a: a.update(x=Producer(a["x"], capsule_device=(DL_CUDA, 0), reported_device=(DL_CUDA, 0))),
     BufferError, "x: add_update runs on CPU tensors only"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_y_untouched(case):
    _, change, exc, message = case
    args = _bad(change)
    y = args["y"]
    before = y.copy()
    with pytest.raises(exc, match=message):
        _C.add_update(**args)
    np.testing.assert_array_equal(y, before)
