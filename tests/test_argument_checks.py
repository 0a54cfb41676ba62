"""Arguments that used to be truncated, wrapped or accepted silently, or that leaked an internal
error: each now gets a TypeError or ValueError that names it, and nothing is written."""
import numpy as np
import pytest

import mos
from mos import _C
from mos import functional as F

f32 = np.float32
CONFIG = mos.MoSConfig(r=4, equivalent_rank=2, shards_per_vector=2, private_rank=1)
POOL = mos.ShardPool("q", 8, 6, 3, CONFIG)


def adapter(dtype=f32):
    rng = np.random.default_rng(0)
    ia, ib = POOL.indices(1)
    return dict(x=rng.standard_normal((5, 8)).astype(dtype),
                pool_a=rng.standard_normal(POOL.pool_a_shape).astype(dtype), index_a=ia.copy(),
                pool_b=rng.standard_normal(POOL.pool_b_shape).astype(dtype), index_b=ib.copy())


def two_adapters():
    a = adapter()
    tables = np.stack([a["index_a"], a["index_b"]])
    return a["x"], a["pool_a"], tables, a["pool_b"], tables[::-1].copy()


# ---------------------------------------------------------------- int64 ids and ranks never wrap

@pytest.mark.parametrize("ids", [np.array([0, 1, 2**32 + 1, 0, 1], np.int64),
                                 np.array([0, 1, -2**32, 0, 1], np.int64), [0, 1, 2**32 + 1, 0, 1]])
def test_batched_forward_refuses_ids_beyond_int32_instead_of_wrapping(ids):
    x, pa, ia, pb, ib = two_adapters()
    out = np.full((5, 6), 3.0, f32)
    with pytest.raises(ValueError, match="adapter_ids: value -?4294967(297|296) does not fit in int32"):
        F.batched_forward(x, pa, ia, pb, ib, [1.0, 2.0], ids, out=out)
    assert (out == 3.0).all()


def test_batched_forward_refuses_ranks_and_segments_beyond_int32():
    x, pa, ia, pb, ib = two_adapters()
    with pytest.raises(ValueError, match="ranks: value 4294967298 does not fit in int32"):
        F.batched_forward(x, pa, ia, pb, ib, [1.0, 2.0], [0] * 5, ranks=np.array([2**32 + 2, 1]))
    with pytest.raises(ValueError, match="segments: value 4294967301 does not fit in int32"):
        F.batched_forward(x, pa, ia, pb, ib, [1.0, 2.0], [0] * 5, segments=np.array([0, 2**32 + 5]),
                          strategy="grouped")


def test_batched_forward_torch_int64_ids_are_range_checked():
    torch = pytest.importorskip("torch")
    x, pa, ia, pb, ib = (torch.from_numpy(a) for a in two_adapters())
    with pytest.raises(ValueError, match="adapter_ids: value 4294967297 does not fit in int32"):
        F.batched_forward(x, pa, ia, pb, ib, [1.0, 2.0], torch.tensor([0, 1, 2**32 + 1, 0, 1]))
    with pytest.raises(TypeError, match="adapter_ids: expected integers, got torch.bool"):
        F.batched_forward(x, pa, ia, pb, ib, [1.0, 2.0], torch.ones(5, dtype=torch.bool))


def test_int64_ids_in_range_still_work():
    x, pa, ia, pb, ib = two_adapters()
    ids = np.array([0, 1, -1, 1, 0], np.int64)
    y = F.batched_forward(x, pa, ia, pb, ib, [1.0, 2.0], ids)
    np.testing.assert_array_equal(y, F.batched_forward(x, pa, ia, pb, ib, [1.0, 2.0], ids.astype(np.int32)))


def test_segments_with_the_per_row_strategy_are_refused_not_dropped():
    x, pa, ia, pb, ib = two_adapters()
    with pytest.raises(ValueError, match="segments: only the grouped strategy uses segments"):
        F.batched_forward(x, pa, ia, pb, ib, [1.0, 2.0], [0] * 5, segments=[0, 5], strategy="per_row")


# ---------------------------------------------------------------- scales beyond the pools' dtype

@pytest.mark.parametrize("scale", [1e39, -1e39, 3.5e38])
def test_scale_not_finite_in_float32_is_refused(scale):
    a = adapter()
    y = np.full((5, 6), 2.0, f32)
    with pytest.raises(ValueError, match=r"scale = -?[0-9.e+]+ is not finite in float32"):
        _C.linear_forward(y, a["x"], a["pool_a"], a["index_a"], a["pool_b"], a["index_b"], scale)
    with pytest.raises(ValueError, match="is not finite in float32"):
        F.backward(np.ones((5, 6), f32), **a, scale=scale)
    with pytest.raises(ValueError, match="is not finite in float32"):
        F.forward(**a, scale=scale, weight=np.ones((6, 8), f32))
    assert (y == 2.0).all()


def test_a_large_scale_is_fine_in_float64():
    a = adapter(np.float64)
    y = F.forward(**a, scale=1e39)
    assert np.isfinite(y).all() and np.abs(y).max() > 1e38


def test_batched_scales_not_finite_in_float32_are_refused():
    x, pa, ia, pb, ib = two_adapters()
    out = np.zeros((5, 6), f32)
    with pytest.raises(ValueError, match=r"scales\[1\] = 1e\+39 is not finite in float32"):
        F.batched_forward(x, pa, ia, pb, ib, np.array([1.0, 1e39]), [0, 1, 0, 1, 0], out=out)
    assert not out.any()


@pytest.mark.parametrize("change", [dict(lora_alpha=1e40), dict(lora_alpha=10**400),
                                    dict(lora_alpha=70000.0, pool_dtype="float16", r=1)])
def test_config_refuses_a_scale_beyond_its_pool_dtype(change):
    with pytest.raises(ValueError, match="lora_alpha"):
        mos.MoSConfig(**change)


def test_config_keeps_a_large_finite_scale_in_float64():
    assert mos.MoSConfig(lora_alpha=1e40, pool_dtype="float64").scaling == 1e40 / 8


# ---------------------------------------------------------------- small validation gaps

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


def test_seed_beyond_64_bits_is_refused_not_truncated():
    with pytest.raises(ValueError, match="seed must be below 2..64"):
        mos.MoSConfig(seed=2**64 + 7)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        _C.route_key(2**64 + 7, "q", 0, 0)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        _C.route_indices(8, 6, 3, 4, 2, 2, 1, True, -1, "q", 0, 0)
    assert _C.route_key(2**64 - 1, "q", 0, 0) != _C.route_key(2**63 - 1, "q", 0, 0)


@pytest.mark.parametrize("field", ["d_in", "d_out", "n_layers"])
@pytest.mark.parametrize("value", [8.9, 8.0, True, "8", None])
def test_shard_pool_sizes_must_be_integers(field, value):
    sizes = dict(d_in=8, d_out=6, n_layers=3)
    sizes[field] = value
    with pytest.raises(TypeError, match=f"{field} must be an integer"):
        mos.ShardPool("q", config=CONFIG, **sizes)


def test_shard_pool_accepts_numpy_integers():
    assert mos.ShardPool("q", np.int64(8), np.int32(6), np.uint8(3), CONFIG).d_in == 8


@pytest.mark.parametrize("layer", [True, False, 1.0, None])
def test_indices_refuses_a_bool_or_non_integer_layer(layer):
    with pytest.raises(ValueError, match="layer must be in"):
        POOL.indices(layer)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.bool_])
def test_set_index_tables_refuses_non_integer_tables(dtype):
    pool = mos.ShardPool("q", 8, 6, 3, CONFIG)
    a, b = pool.index_tables()
    with pytest.raises(TypeError, match=r"q.index_a: index tables must hold integers"):
        pool.set_index_tables(a.astype(dtype) + 0.25 if dtype != np.bool_ else a.astype(dtype), b)
    np.testing.assert_array_equal(pool.index_tables()[0], a)


def test_set_index_tables_accepts_any_integer_dtype():
    pool = mos.ShardPool("q", 8, 6, 3, CONFIG)
    a, b = pool.index_tables()
    pool.set_index_tables(a.astype(np.int64), b.astype(np.uint16))
    np.testing.assert_array_equal(pool.index_tables()[1], b)


def test_two_views_of_one_buffer_with_disjoint_columns_are_refused_as_overlapping():
    # Documented: overlap is judged on byte spans, and interleaved rows share a span.
    a = adapter()
    buffer = np.zeros((5, 14), f32)
    x, y = buffer[:, :8], buffer[:, 8:]
    x[...] = a["x"]
    with pytest.raises(BufferError, match="y: output memory overlaps x"):
        _C.linear_forward(y, x, a["pool_a"], a["index_a"], a["pool_b"], a["index_b"], 0.5)
    assert not y.any()


# ---------------------------------------------------------------- every functional argument is named

def _functional_calls():
    """(function name, argument name, call with that argument replaced by `bad`)."""
    a = adapter()
    x, pa, ia, pb, ib = a["x"], a["pool_a"], a["index_a"], a["pool_b"], a["index_b"]
    bx, bpa, bia, bpb, bib = two_adapters()
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


# Arrays without columns used to crash (SIGFPE); they are covered in a child process by
# test_crash_inputs.py and by the fuzz.
@pytest.mark.parametrize("call,label", BAD_CALLS, ids=[f"{c[0]}-{c[1]}-{label}" for c, label in BAD_CALLS])
def test_every_functional_argument_gets_an_error_that_names_it(call, label):
    name, arg, kwargs, function = call
    bad = BAD_VALUES[label]
    kwargs = dict(kwargs, **{arg: bad})
    outputs = {k: v.copy() for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    with pytest.raises((TypeError, ValueError, BufferError)) as info:
        function(**kwargs)
    message = str(info.value)
    assert arg in message, f"{name}({arg}=...) raised {info.type.__name__}: {message}"
    for k, before in outputs.items():
        np.testing.assert_array_equal(kwargs[k], before, err_msg=k)
