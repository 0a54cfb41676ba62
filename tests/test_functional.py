"""mos.functional over the C path (and CUDA when present) against the float64 reference on random shapes."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mos
from mos import functional as F

import mos.testing.numpy_reference as ref
from conftest import to_device, to_numpy

TOL = {np.float64: 1e-12, np.float32: 1e-5}


@st.composite
def problems(draw):
    l = draw(st.sampled_from([1, 2, 4, 8]))
    d_in = l * draw(st.integers(1, 13))
    d_out = l * draw(st.integers(1, 13))
    n_layers = draw(st.integers(1, 4))
    equivalent_rank = draw(st.integers(1, 3))
    p = draw(st.sampled_from(sorted({0, 1, equivalent_rank})))
    max_r = p + (equivalent_rank - p) * n_layers
    r = draw(st.integers(max(p, 1), max(max_r, 1)))
    config = mos.MoSConfig(r=r, equivalent_rank=equivalent_rank, shards_per_vector=l,
                           private_rank=p, pair_dissociation=draw(st.booleans()),
                           seed=draw(st.integers(0, 2**31)))
    pool = mos.ShardPool("w", d_in, d_out, n_layers, config)
    layer = draw(st.integers(0, n_layers - 1))
    n_rows = draw(st.sampled_from([0, 1, 2, 3, 5, 17, 300]))
    layout = draw(st.sampled_from(["contiguous", "wide_rows", "every_other_row", "3d"]))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    scale = draw(st.floats(-4, 4, allow_nan=False).filter(lambda s: abs(s) > 1e-3))
    return pool, layer, n_rows, layout, dtype, scale


def make_x(rng, n_rows, d_in, layout, dtype):
    if layout == "wide_rows":      # row stride > d_in
        return rng.standard_normal((n_rows, d_in + 3)).astype(dtype)[:, 1:d_in + 1]
    if layout == "every_other_row":
        return rng.standard_normal((2 * n_rows, d_in)).astype(dtype)[::2]
    if layout == "3d" and n_rows % 1 == 0:
        return rng.standard_normal((1, n_rows, d_in)).astype(dtype)
    return rng.standard_normal((n_rows, d_in)).astype(dtype)


def abs_bound(fn, *arrays):
    """The reference evaluated on absolute values: bounds the rounding error of every entry."""
    return fn(*[np.abs(a) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in arrays])


def assert_close(got, want, bound, tol, what):
    got = np.asarray(got, dtype=np.float64)
    err = np.abs(got - want)
    limit = tol * (bound + 1e-30)
    assert got.shape == want.shape, what
    assert np.all(err <= limit), f"{what}: max error {err.max(initial=0):.3g}, allowed {limit.max(initial=0):.3g}"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_forward_and_backward_match_reference(problem):
    pool, layer, n_rows, layout, dtype, scale = problem
    rng = np.random.default_rng(n_rows * 7 + layer)
    pool_a = rng.standard_normal(pool.pool_a_shape).astype(dtype)
    pool_b = rng.standard_normal(pool.pool_b_shape).astype(dtype)
    ia, ib = pool.indices(layer)
    x = make_x(rng, n_rows, pool.d_in, layout, dtype)
    dy = rng.standard_normal(x.shape[:-1] + (pool.d_out,)).astype(dtype)
    r, tol = pool.rank, TOL[dtype]
    x2, dy2 = x.reshape(-1, pool.d_in), dy.reshape(-1, pool.d_out)

    y = F.forward(x, pool_a, ia, pool_b, ib, scale)
    want = ref.forward(x2, pool_a, ia, pool_b, ib, scale, r)
    bound = abs_bound(lambda *a: ref.forward(*a, abs(scale), r), x2, pool_a, ia, pool_b, ib)
    assert y.dtype == dtype and y.shape == x.shape[:-1] + (pool.d_out,)
    assert_close(y.reshape(-1, pool.d_out), want, bound, tol, "y")

    dx, dpa, dpb = F.backward(dy, x, pool_a, ia, pool_b, ib, scale)
    wants = ref.backward(dy2, x2, pool_a, ia, pool_b, ib, scale, r)
    bounds = ref.backward(np.abs(dy2), np.abs(x2), np.abs(pool_a), ia, np.abs(pool_b), ib, abs(scale), r)
    for name, got, w, b in zip(("dx", "dpool_a", "dpool_b"), (dx.reshape(-1, pool.d_in), dpa, dpb), wants, bounds):
        assert_close(got, w, b, tol, name)


@pytest.mark.parametrize("n_rows", [0, 1, 4, 5, 64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_launch_path_on_device(device, n_rows, dtype, rng):
    """Direct (N <= 4) and assembled (N > 4) strategies, on each device."""
    config = mos.MoSConfig(r=6, equivalent_rank=3, shards_per_vector=4, private_rank=1)
    pool = mos.ShardPool("q", 24, 20, 3, config)
    pool_a = rng.standard_normal(pool.pool_a_shape).astype(dtype)
    pool_b = rng.standard_normal(pool.pool_b_shape).astype(dtype)
    ia, ib = pool.indices(2)
    x = rng.standard_normal((n_rows, 24)).astype(dtype)
    dy = rng.standard_normal((n_rows, 20)).astype(dtype)
    d = lambda a: to_device(a, device)
    y0 = rng.standard_normal((n_rows, 20)).astype(dtype)
    y = d(y0.copy())
    F.forward(d(x), d(pool_a), d(ia), d(pool_b), d(ib), 0.75, out=y)
    want = y0 + ref.forward(x, pool_a, ia, pool_b, ib, 0.75, 6)
    np.testing.assert_allclose(to_numpy(y), want, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
    dx, dpa, dpb = F.backward(d(dy), d(x), d(pool_a), d(ia), d(pool_b), d(ib), 0.75)
    for got, want in zip((dx, dpa, dpb), ref.backward(dy, x, pool_a, ia, pool_b, ib, 0.75, 6)):
        np.testing.assert_allclose(to_numpy(got), want, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)


def test_h_is_stored_and_reused(rng):
    config = mos.MoSConfig(r=4, equivalent_rank=2, shards_per_vector=2, private_rank=1)
    pool = mos.ShardPool("q", 8, 6, 3, config)
    pa, pb = rng.standard_normal(pool.pool_a_shape), rng.standard_normal(pool.pool_b_shape)
    ia, ib = pool.indices(1)
    for n in (3, 40):  # direct and assembled
        x, dy = rng.standard_normal((n, 8)), rng.standard_normal((n, 6))
        h = np.zeros((n, 4))
        F.forward(x, pa, ia, pb, ib, 2.0, h=h)
        np.testing.assert_allclose(h, x @ ref.assemble(pa, ia, 4).T, rtol=1e-12)
        with_h = F.backward(dy, x, pa, ia, pb, ib, 2.0, h=h)
        without = F.backward(dy, x, pa, ia, pb, ib, 2.0)
        for a, b in zip(with_h, without):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_backward_accumulates_into_given_gradients(rng):
    config = mos.MoSConfig(r=2, equivalent_rank=2, shards_per_vector=1, private_rank=0)
    pool = mos.ShardPool("q", 5, 3, 2, config)
    pa, pb = rng.standard_normal(pool.pool_a_shape), rng.standard_normal(pool.pool_b_shape)
    x, dy = rng.standard_normal((7, 5)), rng.standard_normal((7, 3))
    dpa, dpb = np.ones(pool.pool_a_shape), np.ones(pool.pool_b_shape)
    want_a, want_b = dpa.copy(), dpb.copy()
    for layer in range(2):  # two layers sharing the pool: gradients add up
        ia, ib = pool.indices(layer)
        F.backward(dy, x, pa, ia, pb, ib, 1.5, dpool_a=dpa, dpool_b=dpb, need_dx=False)
        _, ga, gb = ref.backward(dy, x, pa, ia, pb, ib, 1.5, 2)
        want_a += ga
        want_b += gb
    np.testing.assert_allclose(dpa, want_a, rtol=1e-12)
    np.testing.assert_allclose(dpb, want_b, rtol=1e-12)


def test_assemble_and_scatter_are_transposes(rng, device):
    pool = rng.standard_normal((10, 3))
    index = np.array([4, 0, 9, 7, 2, 5], dtype=np.int32)
    a = F.assemble(to_device(pool, device), to_device(index, device), 3)
    np.testing.assert_array_equal(to_numpy(a), ref.assemble(pool, index, 3))
    grad = np.zeros_like(pool)
    rows = rng.standard_normal((6, 3))
    F.scatter_add(grad, rows, index)
    want = np.zeros_like(pool)
    want[index] += rows
    np.testing.assert_array_equal(grad, want)


def test_forward_full_computes_the_whole_layer(rng):
    config = mos.MoSConfig(r=3, equivalent_rank=2, shards_per_vector=1, private_rank=1)
    pool = mos.ShardPool("q", 6, 4, 3, config)
    pa, pb = rng.standard_normal(pool.pool_a_shape), rng.standard_normal(pool.pool_b_shape)
    ia, ib = pool.indices(0)
    w, b = rng.standard_normal((4, 6)), rng.standard_normal(4)
    for n in (0, 2, 33):
        x = rng.standard_normal((n, 6))
        y = F.forward(x, pa, ia, pb, ib, 0.5, weight=w, bias=b)
        want = x @ w.T + b + ref.forward(x, pa, ia, pb, ib, 0.5, 3)
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
        y = F.forward(x, pa, ia, pb, ib, 0.5, weight=w, bias=None)
        np.testing.assert_allclose(y, want - b, rtol=1e-12, atol=1e-12)


def test_torch_cpu_tensors_through_dlpack(rng):
    torch = pytest.importorskip("torch")
    config = mos.MoSConfig(r=4, equivalent_rank=2, shards_per_vector=2, private_rank=1)
    pool = mos.ShardPool("q", 8, 6, 3, config)
    pa, pb = rng.standard_normal(pool.pool_a_shape), rng.standard_normal(pool.pool_b_shape)
    ia, ib = pool.indices(0)
    x = rng.standard_normal((9, 8))
    t = torch.from_numpy
    ia, ib = ia.copy(), ib.copy()  # torch warns on read-only arrays
    y = F.forward(t(x), t(pa), t(ia), t(pb), t(ib), 0.5)
    assert isinstance(y, torch.Tensor)
    np.testing.assert_allclose(y.numpy(), ref.forward(x, pa, ia, pb, ib, 0.5, 4), rtol=1e-12)
    # a transposed (column-strided) torch view is copied by functional, not misread
    xt = t(np.ascontiguousarray(x.T)).T
    y2 = F.forward(xt, t(pa), t(ia), t(pb), t(ib), 0.5)
    np.testing.assert_allclose(y2.numpy(), y.numpy(), rtol=1e-12)
