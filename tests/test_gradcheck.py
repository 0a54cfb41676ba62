"""Finite differences in float64 confirm the analytic backward of the C path."""
import numpy as np
import pytest

import mos
from mos import functional as F


@pytest.mark.parametrize("n_rows", [1, 9])  # direct and assembled strategies
def test_central_differences_match_backward(n_rows):
    rng = np.random.default_rng(n_rows)
    config = mos.MoSConfig(r=3, equivalent_rank=2, shards_per_vector=2, private_rank=1)
    pool = mos.ShardPool("q", 6, 4, 3, config)
    pa, pb = rng.standard_normal(pool.pool_a_shape), rng.standard_normal(pool.pool_b_shape)
    ia, ib = pool.indices(1)
    x, w = rng.standard_normal((n_rows, 6)), rng.standard_normal((n_rows, 4))
    scale = 0.7

    def loss(x_, pa_, pb_):
        return float(np.sum(w * F.forward(x_, pa_, ia, pb_, ib, scale)))

    dx, dpa, dpb = F.backward(w, x, pa, ia, pb, ib, scale)
    eps = 1e-6
    for value, grad, name in ((x, dx, "x"), (pa, dpa, "pool_a"), (pb, dpb, "pool_b")):
        numeric = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            saved = value[i]
            value[i] = saved + eps
            up = loss(x, pa, pb)
            value[i] = saved - eps
            down = loss(x, pa, pb)
            value[i] = saved
            numeric[i] = (up - down) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8, err_msg=name)
    # rows no layer selects get exactly zero gradient
    unused = sorted(set(range(pool.n_shards)) - set(ia.tolist()))
    assert unused and not dpa[unused].any()
