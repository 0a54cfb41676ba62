"""ShardPool's own arguments: sizes and layers must be integers, saved index tables must hold integers.
(Pool shapes and the tables' invariants: tests/test_routes.py.)"""
import numpy as np
import pytest

import mos
from conftest import SMALL_CONFIG as CONFIG, SMALL_POOL as POOL


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
