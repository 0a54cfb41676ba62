"""The special cases docs/design.md pins: LoRA, pure sharing, and each ablation alone."""
import numpy as np
import pytest

import mos
from mos import functional as F

import mos.testing.numpy_reference as ref


@pytest.mark.parametrize("l", [1, 2, 4])
def test_private_rank_equal_to_budget_and_rank_is_exactly_lora(rng, l):
    r, n_layers, d_in, d_out = 3, 4, 8, 12
    config = mos.MoSConfig(r=r, equivalent_rank=r, private_rank=r, shards_per_vector=l)
    pool = mos.ShardPool("q", d_in, d_out, n_layers, config)
    assert pool.n_public == 0
    assert pool.num_parameters() == pool.lora_parameters()
    pa, pb = rng.standard_normal(pool.pool_a_shape), rng.standard_normal(pool.pool_b_shape)
    x = rng.standard_normal((7, d_in))
    for k in range(n_layers):
        ia, ib = pool.indices(k)
        lora_a = pa[k * r * l:(k + 1) * r * l].reshape(r, d_in)      # layer k's own rows, in order
        lora_b = pb[k * r * l:(k + 1) * r * l].reshape(r, d_out).T
        y = F.forward(x, pa, ia, pb, ib, 2.0)
        np.testing.assert_allclose(y, 2.0 * x @ lora_a.T @ lora_b.T, rtol=1e-12, atol=1e-12)


def test_pure_sharing_uses_the_whole_pool_in_every_layer(rng):
    config = mos.MoSConfig(r=6, equivalent_rank=2, shards_per_vector=1, private_rank=0,
                           pair_dissociation=False, subset_selection=False)
    pool = mos.ShardPool("q", 5, 7, 3, config)   # N = 2 * 3 * 1 = 6 = r
    pa, pb = rng.standard_normal(pool.pool_a_shape), rng.standard_normal(pool.pool_b_shape)
    x = rng.standard_normal((4, 5))
    outputs = []
    for k in range(3):
        ia, ib = pool.indices(k)
        assert ia.tolist() == ib.tolist() == list(range(6))
        outputs.append(F.forward(x, pa, ia, pb, ib, 1.0))
    np.testing.assert_allclose(outputs[0], x @ pa.T @ pb, rtol=1e-12)
    np.testing.assert_array_equal(outputs[0], outputs[2])


BASE = dict(r=4, equivalent_rank=2, shards_per_vector=2, private_rank=1, seed=3)


def pool_for(**change):
    return mos.ShardPool("q", 8, 8, 4, mos.MoSConfig(**{**BASE, **change}))


def test_full_method_uses_every_strategy():
    pool = pool_for()
    a, b = pool.index_tables()
    assert not np.array_equal(a, b)                      # pair dissociation
    assert a[0, :6].tolist() != list(range(6))           # subset selection
    assert pool.shard_len_a == 4                         # sharding: shards are half vectors
    assert pool.n_public < pool.n_shards                 # privatization


def test_ablation_without_pair_dissociation():
    a, b = pool_for(pair_dissociation=False).index_tables()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, pool_for().index_tables()[0])


def test_ablation_without_privatization():
    pool = pool_for(private_rank=0)
    assert pool.n_public == pool.n_shards
    for table in pool.index_tables():
        assert table.max() < pool.n_shards and len(np.unique(table)) > table.shape[1]


def test_ablation_without_sharding():
    pool = pool_for(shards_per_vector=1)
    assert pool.shard_len_a == 8 and pool.index_tables()[0].shape == (4, 4)


def test_ablation_without_subset_selection():
    pool = mos.ShardPool("q", 8, 8, 4, mos.MoSConfig(**{**BASE, "r": 5, "subset_selection": False}))
    a, b = pool.index_tables()
    for k in range(4):
        assert a[k, :8].tolist() == list(range(8)) and b[k, :8].tolist() == list(range(8))
        assert a[k, 8:].tolist() == list(pool.private_rows(k))


def test_fresh_adapter_is_a_no_op(rng):
    pool = pool_for()
    pa, pb = pool.init_values()
    assert not pb.any()
    bound = 1 / np.sqrt(8)
    assert np.all(np.abs(pa) <= bound) and pa.std() > bound / 4
    ia, ib = pool.indices(0)
    y0 = rng.standard_normal((3, 8)).astype(np.float32)
    y = y0.copy()
    F.forward(rng.standard_normal((3, 8)).astype(np.float32), pa, ia, pb, ib, 8.0, out=y)
    np.testing.assert_array_equal(y, y0)


def test_merge_delta_is_an_ordinary_rank_r_update(rng):
    pool = pool_for()
    pa, pb = rng.standard_normal(pool.pool_a_shape), rng.standard_normal(pool.pool_b_shape)
    ia, ib = pool.indices(2)
    a, bt = F.assemble(pa, ia, 4), F.assemble(pb, ib, 4)
    delta = 0.5 * bt.T @ a
    assert np.linalg.matrix_rank(delta) <= 4
    x = rng.standard_normal((5, 8))
    np.testing.assert_allclose(x @ delta.T, F.forward(x, pa, ia, pb, ib, 0.5), rtol=1e-10)
    np.testing.assert_allclose(a, ref.assemble(pa, ia, 4))
