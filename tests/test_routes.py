"""Index tables: invariants, determinism across runs and processes, validation messages."""
import json
import subprocess
import sys

import numpy as np
import pytest

import mos


def tables(config, n_layers=4, d_in=16, d_out=8, name="q_proj"):
    return mos.ShardPool(name, d_in, d_out, n_layers, config).index_tables()


@pytest.mark.parametrize("l", [1, 2, 4])
@pytest.mark.parametrize("p", [0, 1, 3])
def test_no_duplicates_and_private_rows_exclusive(l, p):
    r = 4 if p < 3 else 3  # with p = R_e = 3 there are no public rows to draw from
    config = mos.MoSConfig(r=r, equivalent_rank=3, shards_per_vector=l, private_rank=p)
    pool = mos.ShardPool("q_proj", 16, 8, 5, config)
    for table in pool.index_tables():
        assert table.shape == (5, r * l) and table.dtype == np.int32
        for k, row in enumerate(table):
            assert len(set(row.tolist())) == len(row)
            assert row.min() >= 0 and row.max() < pool.n_shards
            private = pool.private_rows(k)
            assert list(row[(r - p) * l:]) == list(private)  # the layer's whole private block, last
            public = row[:(r - p) * l]
            assert np.all(public < pool.n_public)
            for other in range(5):
                if other != k:
                    assert not set(row.tolist()) & set(pool.private_rows(other))


def test_pair_dissociation_draws_b_independently():
    config = mos.MoSConfig(r=4, equivalent_rank=2, shards_per_vector=2, private_rank=0)
    a, b = tables(config)
    assert not np.array_equal(a, b)
    a2, b2 = tables(mos.MoSConfig(r=4, equivalent_rank=2, shards_per_vector=2, private_rank=0,
                                  pair_dissociation=False))
    np.testing.assert_array_equal(a2, b2)
    np.testing.assert_array_equal(a, a2)  # the A draw does not depend on the B switch


def test_draws_differ_across_layers_types_and_seeds():
    config = mos.MoSConfig(r=4, equivalent_rank=2, shards_per_vector=2, private_rank=0)
    a, _ = tables(config)
    assert len({tuple(row) for row in a}) == len(a)
    other_type, _ = tables(config, name="k_proj")
    assert not np.array_equal(a, other_type)
    other_seed, _ = tables(mos.MoSConfig(r=4, equivalent_rank=2, shards_per_vector=2, private_rank=0, seed=1))
    assert not np.array_equal(a, other_seed)


def test_identical_across_runs_and_processes():
    config = mos.MoSConfig(r=5, equivalent_rank=3, shards_per_vector=2, private_rank=1, seed=77)
    here = [t.tolist() for t in tables(config)]
    assert here == [t.tolist() for t in tables(config)]
    code = ("import json, mos; c = mos.MoSConfig(r=5, equivalent_rank=3, shards_per_vector=2, "
            "private_rank=1, seed=77); print(json.dumps([t.tolist() for t in "
            "mos.ShardPool('q_proj', 16, 8, 4, c).index_tables()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == here


def test_prng_is_the_documented_splitmix_fold():
    """Re-derives route_key from the spec in routes.c, so other languages can reproduce tables."""
    mask = (1 << 64) - 1
    golden = 0x9E3779B97F4A7C15

    def mix(z):
        z ^= z >> 30
        z = (z * 0xBF58476D1CE4E5B9) & mask
        z ^= z >> 27
        z = (z * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    def fnv(text):
        h = 0xCBF29CE484222325
        for c in text.encode():
            h = ((h ^ c) * 0x100000001B3) & mask
        return h

    def key(seed, name, layer, side):
        s = seed
        for v in (fnv(name), layer, side):
            s = mix((s + golden) & mask) ^ v
        return mix((s + golden) & mask)

    for args in [(0, "q_proj", 0, 0), (123, "down_proj", 31, 1), (2**40, "", 7, 0)]:
        assert mos._C.route_key(*args) == key(*args)

    # and the sample: partial Fisher-Yates with rejection sampling
    config = mos.MoSConfig(r=3, equivalent_rank=2, shards_per_vector=1, private_rank=0, seed=9)
    pool = mos.ShardPool("v_proj", 4, 4, 3, config)
    state = key(9, "v_proj", 2, 0)
    perm = list(range(pool.n_public))
    picked = []
    for i in range(3):
        n = pool.n_public - i
        threshold = ((1 << 64) - n) % n
        while True:
            state = (state + golden) & mask
            u = mix(state)
            if u >= threshold:
                break
        j = i + u % n
        perm[i], perm[j] = perm[j], perm[i]
        picked.append(perm[i])
    assert pool.indices(2)[0].tolist() == picked


def test_without_subset_selection_every_layer_takes_all_public_rows():
    config = mos.MoSConfig(r=3, equivalent_rank=2, shards_per_vector=2, private_rank=1,
                           subset_selection=False)
    pool = mos.ShardPool("q", 4, 4, 2, config)   # N_pub / l + p = (1*2*2)/2 + 1 = 3
    a, b = pool.index_tables()
    assert a[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert a[1].tolist() == [0, 1, 2, 3, 6, 7]
    with pytest.raises(ValueError, match="q has 2 layers: without subset_selection .* r must be 3 "):
        mos.ShardPool("q", 4, 4, 2, mos.MoSConfig(r=4, equivalent_rank=2, shards_per_vector=2,
                                                   private_rank=1, subset_selection=False))


@pytest.mark.parametrize("kwargs, shape, message", [
    (dict(shards_per_vector=3), (8, 9, 2), "q is 8 -> 9: shards_per_vector=3 must divide both; values that work: 1$"),
    (dict(shards_per_vector=3), (12, 8, 2), "q is 12 -> 8: shards_per_vector=3 .* values that work: 1, 2, 4$"),
    (dict(r=40, equivalent_rank=2, private_rank=0, shards_per_vector=1), (8, 8, 2),
     r"q has 2 layers: with equivalent_rank=2, private_rank=0, shards_per_vector=1, r can be at most 4 "),
    (dict(), (8, 8, 0), "n_layers must be >= 1, got 0"),
])
def test_invalid_pool_shapes_name_the_field_and_bound(kwargs, shape, message):
    with pytest.raises(ValueError, match=message):
        config = mos.MoSConfig(**kwargs)
        mos.ShardPool("q", *shape, config)


def test_saved_tables_are_validated():
    config = mos.MoSConfig(r=4, equivalent_rank=2, shards_per_vector=1, private_rank=1)
    pool = mos.ShardPool("q", 8, 8, 3, config)
    a, b = pool.index_tables()
    bad = a.copy()
    bad[0, 0] = bad[0, 1]
    with pytest.raises(ValueError, match="layer 0 repeats a shard"):
        pool.set_index_tables(bad, b)
    bad = a.copy()
    bad[0, -1] = pool.private_rows(1)[0]
    with pytest.raises(ValueError, match="another layer's private rows"):
        pool.set_index_tables(bad, b)
    with pytest.raises(ValueError, match=r"shape \(2, 4\), expected \(3, 4\)"):
        pool.set_index_tables(a[:2], b)
    with pytest.raises(ValueError, match=r"in \[0, 6\)"):
        pool.set_index_tables(np.where(a == a.max(), 99, a), b)
    np.testing.assert_array_equal(pool.index_tables()[0], a)  # unchanged after every refusal
    pool.load_state_dict(pool.state_dict())


def test_parameter_counts_equal_lora_at_equivalent_rank():
    config = mos.MoSConfig(r=8, equivalent_rank=2, shards_per_vector=4, private_rank=1)
    pool = mos.ShardPool("q_proj", 4096, 4096, 32, config)
    assert pool.num_parameters() == 32 * 2 * (4096 + 4096)
    assert pool.lora_parameters() == 32 * 8 * (4096 + 4096)
    assert pool.compression_vs_lora() == 4.0
