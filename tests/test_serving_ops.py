"""Many adapters in one call (batched_forward): every row equals its adapter run alone."""
import numpy as np
import pytest

import mos
from mos import _C, functional as F

import mos.testing.numpy_reference as ref
from conftest import readonly, to_device, to_numpy, two_adapter_arrays as two_adapters

D_IN, D_OUT, N_LAYERS = 16, 24, 3
TOL = {np.float64: 1e-12, np.float32: 1e-5}
MIXES = ["distinct", "uniform", "skewed", "identical"]


class Adapters:
    """K adapters of one module type, each with its own pools and index tables (layer `layer`),
    plus the concatenated layout batched_forward takes."""

    def __init__(self, k, dtype=np.float32, ranks=None, seed=0, l=2):
        rng = np.random.default_rng(seed)
        self.k, self.dtype, self.l = k, dtype, l
        self.own = []  # (pool_a, pool_b, index_a, index_b, scale, r) per adapter
        for a in range(k):
            r = 4 if ranks is None else int(ranks[a])
            config = mos.MoSConfig(r=r, equivalent_rank=3, shards_per_vector=l,
                                   private_rank=min(1, r), seed=seed * 7919 + a)
            pool = mos.ShardPool("q_proj", D_IN, D_OUT, N_LAYERS, config)
            ia, ib = pool.indices(a % N_LAYERS)
            pa = rng.standard_normal(pool.pool_a_shape).astype(dtype)
            pb = rng.standard_normal(pool.pool_b_shape).astype(dtype)
            self.own.append((pa, pb, ia.copy(), ib.copy(), float(rng.uniform(0.25, 2.0)), r))
        rows_a = [o[0].shape[0] for o in self.own]
        off_a = np.concatenate(([0], np.cumsum(rows_a)))
        off_b = np.concatenate(([0], np.cumsum([o[1].shape[0] for o in self.own])))
        self.max_rank = max([o[5] for o in self.own], default=1)
        width = self.max_rank * l
        self.pool_a = np.concatenate([o[0] for o in self.own]) if k else np.zeros((1, D_IN // l), dtype)
        self.pool_b = np.concatenate([o[1] for o in self.own]) if k else np.zeros((1, D_OUT // l), dtype)
        self.index_a = np.zeros((k, width), np.int32)
        self.index_b = np.zeros((k, width), np.int32)
        for a, (_, _, ia, ib, _, r) in enumerate(self.own):
            self.index_a[a, :r * l] = ia + off_a[a]
            self.index_b[a, :r * l] = ib + off_b[a]
        self.scales = np.array([o[4] for o in self.own], np.float64)
        self.ranks = np.array([o[5] for o in self.own], np.int32)

    def args(self, device="cpu"):
        put = lambda a: to_device(a, device)  # noqa: E731
        return dict(pool_a=put(self.pool_a), index_a=put(self.index_a), pool_b=put(self.pool_b),
                    index_b=put(self.index_b), scales=put(self.scales))

    def expected(self, x, y0, ids):
        """y0 plus, row by row, the row's adapter run alone through mos.functional.forward."""
        want = np.array(y0, dtype=np.float64)
        for a in np.unique(ids[ids >= 0]):
            rows = np.flatnonzero(ids == a)
            pa, pb, ia, ib, s, _ = self.own[a]
            want[rows] += F.forward(np.ascontiguousarray(x[rows]), pa, ia, pb, ib, s)
        return want

    def bound(self, x, y0, ids):
        """The float64 reference on absolute values: bounds each entry's rounding error."""
        bound = np.abs(np.array(y0, dtype=np.float64))
        for a in np.unique(ids[ids >= 0]):
            rows = np.flatnonzero(ids == a)
            pa, pb, ia, ib, s, r = self.own[a]
            bound[rows] += ref.forward(np.abs(x[rows]), np.abs(pa), ia, np.abs(pb), ib, abs(s), r)
        return bound


def adapter_ids(mix, k, n, rng, base_fraction=0.1):
    if mix == "distinct":
        ids = np.arange(n) % k
    elif mix == "uniform":
        ids = rng.integers(0, k, n)
    elif mix == "skewed":  # Zipf-like popularity, as in Punica's skewed workload
        p = 1.0 / np.arange(1, k + 1) ** 1.5
        ids = rng.choice(k, size=n, p=p / p.sum())
    else:
        ids = np.full(n, rng.integers(0, k))
    ids = ids.astype(np.int32)
    ids[rng.random(n) < base_fraction] = -1
    return ids


def assert_rows_close(got, want, bound, tol, what):
    got = np.asarray(got, dtype=np.float64)
    err = np.abs(got - want)
    limit = tol * (bound + 1e-30)
    assert got.shape == want.shape, what
    assert np.all(err <= limit), (f"{what}: max error {err.max(initial=0):.3g}, "
                                  f"allowed {limit.max(initial=0):.3g}")


def run(device, adapters, x, y0, ids, strategy, segments=None, ranks=None):
    y = to_device(y0.copy(), device)
    F.batched_forward(to_device(x, device), **adapters.args(device),
                      adapter_ids=to_device(ids, device), out=y, strategy=strategy,
                      segments=None if segments is None else to_device(segments, device),
                      ranks=None if ranks is None else to_device(ranks, device))
    return to_numpy(y)


def n_rows_for(k, mix):
    return k if mix == "distinct" and k > 16 else 48


@pytest.mark.parametrize("k", [1, 2, 64, 1000])
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("strategy", ["per_row", "grouped", "grouped_segments"])
def test_rows_equal_each_adapter_alone(device, k, mix, strategy):
    rng = np.random.default_rng(k * 31 + MIXES.index(mix))
    adapters = Adapters(k, seed=k)
    n = n_rows_for(k, mix)
    ids = adapter_ids(mix, k, n, rng)
    segments = None
    if strategy == "grouped_segments":  # rows sorted by adapter, one segment per run
        ids = np.sort(ids)
        segments = F.segments_of(ids)
    x = rng.standard_normal((n, D_IN)).astype(np.float32)
    y0 = rng.standard_normal((n, D_OUT)).astype(np.float32)
    got = run(device, adapters, x, y0, ids, "per_row" if strategy == "per_row" else "grouped",
              segments)
    assert_rows_close(got, adapters.expected(x, y0, ids), adapters.bound(x, y0, ids), 1e-5, "y")
    base = ids < 0
    assert np.array_equal(got[base], y0[base]), "rows with id -1 must be left untouched"


@pytest.mark.parametrize("strategy", ["per_row", "grouped"])
def test_float64_matches_reference(strategy):
    rng = np.random.default_rng(5)
    adapters = Adapters(7, dtype=np.float64, seed=3)
    ids = adapter_ids("uniform", 7, 90, rng)
    x = rng.standard_normal((90, D_IN))
    y0 = rng.standard_normal((90, D_OUT))
    got = run("cpu", adapters, x, y0, ids, strategy)
    want = np.array(y0)
    for n in np.flatnonzero(ids >= 0):
        pa, pb, ia, ib, s, r = adapters.own[ids[n]]
        want[n] += ref.forward(x[n:n + 1], pa, ia, pb, ib, s, r)[0]
    assert_rows_close(got, want, adapters.bound(x, y0, ids), TOL[np.float64], "y")


@pytest.mark.parametrize("strategy", ["per_row", "grouped"])
def test_adapters_of_different_rank(device, strategy):
    """A max-rank layout: each adapter reads the first ranks[a] * l entries of its table row."""
    rng = np.random.default_rng(11)
    ranks = [1, 4, 2, 6, 3, 6, 2]
    adapters = Adapters(len(ranks), ranks=ranks, seed=9)
    ids = adapter_ids("uniform", len(ranks), 64, rng)
    x = rng.standard_normal((64, D_IN)).astype(np.float32)
    y0 = np.zeros((64, D_OUT), np.float32)
    got = run(device, adapters, x, y0, ids, strategy, ranks=adapters.ranks)
    assert_rows_close(got, adapters.expected(x, y0, ids), adapters.bound(x, y0, ids), 1e-5, "y")
    # Rank 0 switches an adapter off in this call (e.g. a layer it does not target).
    off = adapters.ranks.copy()
    off[ids[ids >= 0][0]] = 0
    got = run(device, adapters, x, y0, ids, strategy, ranks=off)
    rows = ids == ids[ids >= 0][0]
    assert np.all(got[rows] == 0)


@pytest.mark.parametrize("strategy", ["per_row", "grouped"])
def test_strided_rows_and_3d_input(device, strategy):
    rng = np.random.default_rng(2)
    adapters = Adapters(5, seed=4)
    ids = adapter_ids("uniform", 5, 30, rng)
    wide = rng.standard_normal((30, D_IN + 5)).astype(np.float32)
    x = wide[:, 2:D_IN + 2]                      # row stride D_IN + 5
    y_big = np.zeros((30, D_OUT + 8), np.float32)
    y = y_big[:, 4:D_OUT + 4]                    # row stride D_OUT + 8
    if device == "cpu":
        F.batched_forward(x, **adapters.args(), adapter_ids=ids, out=y, strategy=strategy)
        got = y
    else:
        got = run(device, adapters, np.ascontiguousarray(x), np.zeros((30, D_OUT), np.float32), ids,
                  strategy)
    want = adapters.expected(x, np.zeros((30, D_OUT)), ids)
    assert_rows_close(got, want, adapters.bound(x, np.zeros((30, D_OUT)), ids), 1e-5, "y")
    if device == "cpu":
        assert np.all(y_big[:, :4] == 0) and np.all(y_big[:, D_OUT + 4:] == 0)
    # Leading dimensions are flattened: (2, 15, d_in) with 30 ids.
    y3 = F.batched_forward(np.ascontiguousarray(x).reshape(2, 15, D_IN), **adapters.args(),
                           adapter_ids=ids, strategy=strategy)
    assert y3.shape == (2, 15, D_OUT)
    assert_rows_close(y3.reshape(30, D_OUT), want, adapters.bound(x, np.zeros((30, D_OUT)), ids),
                      1e-5, "y3")


def test_adapters_of_coarser_shards_served_at_a_finer_granularity():
    """An adapter cut into l' shards per vector joins pools of l (l' | l) as the same memory viewed
    as finer shards, each index e becoming e * l/l' + 0 .. l/l' - 1 (mos.h)."""
    rng = np.random.default_rng(13)
    coarse, fine = Adapters(3, seed=1, l=1), Adapters(2, seed=2, l=2)
    step = 2
    refine = lambda t: (t.astype(np.int64)[..., None] * step + np.arange(step)).reshape(t.shape[0], -1)  # noqa: E731
    pool_a = np.concatenate([coarse.pool_a.reshape(-1, D_IN // 2), fine.pool_a])
    pool_b = np.concatenate([coarse.pool_b.reshape(-1, D_OUT // 2), fine.pool_b])
    off_a, off_b = coarse.pool_a.shape[0] * step, coarse.pool_b.shape[0] * step
    index_a = np.concatenate([refine(coarse.index_a), fine.index_a + off_a]).astype(np.int32)
    index_b = np.concatenate([refine(coarse.index_b), fine.index_b + off_b]).astype(np.int32)
    scales = np.concatenate([coarse.scales, fine.scales])
    ids = rng.integers(-1, 5, 40).astype(np.int32)
    x = rng.standard_normal((40, D_IN)).astype(np.float32)
    got = F.batched_forward(x, pool_a, index_a, pool_b, index_b, scales, ids)
    zeros = np.zeros((40, D_OUT))
    for a, (adapters, k) in enumerate([(coarse, 0), (coarse, 1), (coarse, 2), (fine, 0), (fine, 1)]):
        rows = ids == a
        sub = np.where(rows, k, -1).astype(np.int32)
        assert_rows_close(got[rows], adapters.expected(x, zeros, sub)[rows],
                          adapters.bound(x, zeros, sub)[rows], 1e-5, f"adapter {a}")


def test_strategies_agree_and_auto_picks_one():
    rng = np.random.default_rng(8)
    adapters = Adapters(6, seed=6)
    ids = np.repeat(np.arange(6, dtype=np.int32), 20)  # long runs: auto goes grouped
    rng.shuffle(ids[:60])                                 # and some interleaving
    x = rng.standard_normal((120, D_IN)).astype(np.float32)
    outs = [F.batched_forward(x, **adapters.args(), adapter_ids=ids, strategy=s)
            for s in ("per_row", "grouped", "auto")]
    want = adapters.expected(x, np.zeros((120, D_OUT)), ids)
    bound = adapters.bound(x, np.zeros((120, D_OUT)), ids)
    for got in outs:
        assert_rows_close(got, want, bound, 1e-5, "y")


def test_empty_batches_and_all_base_rows():
    adapters = Adapters(3)
    x = np.zeros((0, D_IN), np.float32)
    assert F.batched_forward(x, **adapters.args(), adapter_ids=np.zeros(0, np.int32)).shape == (0, D_OUT)
    x = np.ones((4, D_IN), np.float32)
    y = np.full((4, D_OUT), 3.0, np.float32)
    for strategy in ("per_row", "grouped"):
        F.batched_forward(x, **adapters.args(), adapter_ids=np.full(4, -1, np.int32), out=y,
                          strategy=strategy)
    assert np.all(y == 3.0)
    # No adapters at all: only -1 is a valid id.
    none = Adapters(0)
    F.batched_forward(x, **none.args(), adapter_ids=np.full(4, -1, np.int32), out=y)
    assert np.all(y == 3.0)


def test_torch_cpu_tensors_and_float32_scales():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    adapters = Adapters(4, seed=2)
    ids = adapter_ids("uniform", 4, 20, rng)
    x = rng.standard_normal((20, D_IN)).astype(np.float32)
    args = {k: torch.from_numpy(v) for k, v in adapters.args().items()}
    args["scales"] = args["scales"].float()
    y = F.batched_forward(torch.from_numpy(x), **args, adapter_ids=torch.from_numpy(ids))
    assert isinstance(y, torch.Tensor)
    want = adapters.expected(x, np.zeros((20, D_OUT)), ids)
    assert_rows_close(y.numpy(), want, adapters.bound(x, np.zeros((20, D_OUT)), ids), 1e-5, "y")


def test_segments_of():
    assert F.segments_of([3, 3, -1, 0, 0, 0, 3]).tolist() == [0, 2, 3, 6, 7]
    assert F.segments_of([]).tolist() == [0]


def test_workspace_bytes_grow_with_rows_and_groups():
    per_row = F.batched_workspace_bytes(64, 8, 4)
    grouped = F.batched_workspace_bytes(64, 8, 4, grouped=True)
    # the group tables hold one group per row at most: 2 * (N + 1) + 1 int32
    assert per_row >= 64 * 8 * 4 and grouped >= per_row + (2 * 65 + 1) * 4
    assert F.batched_workspace_bytes(128, 8, 4, grouped=True) > grouped
    assert F.batched_workspace_bytes(64, 8, 8) >= 64 * 8 * 8
    assert all(b % 256 == 0 for b in (per_row, grouped))


# ---------------------------------------------------------------- bad input

def good_call(n=6):
    rng = np.random.default_rng(0)
    adapters = Adapters(3, ranks=[4, 2, 3])
    return dict(y=np.full((n, D_OUT), 7.0, np.float32),
                x=rng.standard_normal((n, D_IN)).astype(np.float32),
                pool_a=adapters.pool_a, index_a=adapters.index_a, pool_b=adapters.pool_b,
                index_b=adapters.index_b, scales=adapters.scales,
                adapter_ids=np.array([0, 1, -1, 2, 1, 0][:n], np.int32), ranks=adapters.ranks)


def set_entry(key, at, value):
    def change(args):
        arr = args[key].copy()
        arr[at] = value
        args[key] = arr
    return change


BAD = [
    ("id too large", set_entry("adapter_ids", 3, 3), ValueError, r"adapter_ids\[3\] = 3 is out of range \[-1, 3\)"),
    ("id below -1", set_entry("adapter_ids", 0, -2), ValueError, r"adapter_ids\[0\] = -2 is out of range"),
    ("ids int64", lambda a: a.update(adapter_ids=a["adapter_ids"].astype(np.int64)), TypeError, "adapter_ids: unsupported dtype"),
    ("ids float", lambda a: a.update(adapter_ids=a["adapter_ids"].astype(np.float32)), TypeError, "adapter_ids: index tables must be int32"),
    ("ids length", lambda a: a.update(adapter_ids=a["adapter_ids"][:5].copy()), ValueError, r"adapter_ids: dimension 0 is 5, expected 6 \(one adapter id per row of x\)"),
    ("ids strided", lambda a: a.update(adapter_ids=np.repeat(a["adapter_ids"], 2)[::2]), BufferError, "adapter_ids: must be contiguous"),
    ("ids 2-D", lambda a: a.update(adapter_ids=a["adapter_ids"][None]), ValueError, "adapter_ids: expected a 1-D array"),
    ("index_a out of range", set_entry("index_a", (1, 0), 10**6), ValueError, r"index_a\[1, 0\] = 1000000 is out of range"),
    ("index_b negative", set_entry("index_b", (2, 3), -1), ValueError, r"index_b\[2, 3\] = -1 is out of range"),
    ("index_a 1-D", lambda a: a.update(index_a=a["index_a"][0].copy()), ValueError, "index_a: expected a 2-D array"),
    ("index_b shape", lambda a: a.update(index_b=a["index_b"][:, :6].copy()), ValueError, r"index_b: dimension 1 is 6, expected 8"),
    ("index_b adapters", lambda a: a.update(index_b=a["index_b"][:2].copy()), ValueError, r"index_b: dimension 0 is 2, expected 3"),
    ("index width", lambda a: a.update(index_a=a["index_a"][:, :7].copy(), index_b=a["index_b"][:, :7].copy()), ValueError, "index_a: row length 7 must be a positive multiple of shards_per_vector = 2"),
    ("index int64", lambda a: a.update(index_a=a["index_a"].astype(np.int64)), TypeError, "index_a: unsupported dtype"),
    ("index transposed", lambda a: a.update(index_a=np.asfortranarray(a["index_a"])), BufferError, "index_a: must be contiguous"),
    ("scales length", lambda a: a.update(scales=a["scales"][:2].copy()), ValueError, r"scales: dimension 0 is 2, expected 3"),
    ("scales int", lambda a: a.update(scales=np.ones(3, np.int32)), TypeError, "scales: expected float32 or float64, got int32"),
    ("scales float16", lambda a: a.update(scales=np.ones(3, np.float16)), TypeError, "scales: expected float32 or float64, got float16"),
    ("scales nan", set_entry("scales", 1, np.nan), ValueError, r"scales\[1\] = nan must be finite"),
    ("scales inf", set_entry("scales", 2, np.inf), ValueError, r"scales\[2\] = inf must be finite"),
    ("rank too large", set_entry("ranks", 0, 5), ValueError, r"ranks\[0\] = 5 is out of range \[0, 5\)"),
    ("rank negative", set_entry("ranks", 1, -1), ValueError, r"ranks\[1\] = -1 is out of range"),
    ("ranks length", lambda a: a.update(ranks=a["ranks"][:2].copy()), ValueError, r"ranks: dimension 0 is 2, expected 3"),
    ("x float16", lambda a: a.update(x=a["x"].astype(np.float16)), TypeError, "does not match x's float16"),
    ("x int32", lambda a: a.update(x=a["x"].astype(np.int32)), TypeError, "x: expected a floating-point tensor"),
    ("16-bit on CPU", lambda a: a.update(x=a["x"].astype(np.float16), y=a["y"].astype(np.float16), pool_a=a["pool_a"].astype(np.float16), pool_b=a["pool_b"].astype(np.float16)), TypeError, "the CPU path supports float32 and float64"),
    ("pool_a float64", lambda a: a.update(pool_a=a["pool_a"].astype(np.float64)), TypeError, "pool_a: dtype float64 does not match x's float32"),
    ("y float64", lambda a: a.update(y=a["y"].astype(np.float64)), TypeError, "y: dtype float64 does not match x's float32"),
    ("y rows", lambda a: a.update(y=a["y"][:5]), ValueError, r"y: dimension 0 is 5, expected 6"),
    ("y features", lambda a: a.update(y=np.zeros((6, 26), np.float32)), ValueError, "y: d_out = 26 does not match pool_b.s shard length 12 times shards_per_vector 2"),
    ("d_in vs shard", lambda a: a.update(x=np.zeros((6, 17), np.float32)), ValueError, "pool_a: shard length 8 must divide x's d_in = 17"),
    ("d_out vs l", lambda a: a.update(y=np.zeros((6, 25), np.float32)), ValueError, "y: d_out = 25 does not match pool_b.s shard length 12"),
    ("pool not contiguous", lambda a: a.update(pool_a=np.asfortranarray(a["pool_a"])), BufferError, "pool_a: must be contiguous"),
    ("x column-strided", lambda a: a.update(x=np.zeros((6, 2 * D_IN), np.float32)[:, ::2]), BufferError, "x: columns must be contiguous"),
    ("y read-only", lambda a: a.update(y=readonly(a["y"])), BufferError, "y: output is read-only"),
    ("y is x", lambda a: a.update(x=a["y"][:, :D_IN]), BufferError, "y: output memory overlaps x"),
    ("y overlaps pool", lambda a: a.update(y=a["pool_b"].reshape(-1)[:6 * D_OUT].reshape(6, D_OUT)), BufferError, "y: output memory overlaps pool_b"),
    ("segments without grouped", lambda a: a.update(segments=np.array([0, 6], np.int32)), ValueError, "only the grouped strategy uses segments"),
    ("workspace too small", lambda a: a.update(workspace=np.zeros(8, np.uint8)), ValueError, "workspace: holds 8 bytes"),
    ("uint8 pool", lambda a: a.update(pool_a=a["pool_a"].view(np.uint8)), TypeError, "pool_a: expected a floating-point tensor, got uint8"),
    ("uint8 ids", lambda a: a.update(adapter_ids=a["adapter_ids"].view(np.uint8)), TypeError, "adapter_ids: index tables must be int32, got uint8"),
]

BAD_GROUPED = [
    ("segments end", lambda a: a.update(segments=np.array([0, 3, 5], np.int32)), ValueError, "segments: must start at 0 and end at the row count 6"),
    ("segments start", lambda a: a.update(segments=np.array([1, 6], np.int32)), ValueError, "segments: must start at 0"),
    ("segments decrease", lambda a: a.update(segments=np.array([0, 4, 3, 6], np.int32)), ValueError, r"segments\[2\] = 3 is below segments\[1\] = 4"),
    ("segments mix adapters", lambda a: a.update(segments=np.array([0, 2, 6], np.int32)), ValueError, r"segment 0 mixes adapters \(row 1 has id 1, row 0 has id 0\)"),
    ("segments int64", lambda a: a.update(segments=np.array([0, 6], np.int64)), TypeError, "segments: unsupported dtype"),
    ("segments empty", lambda a: a.update(segments=np.zeros(0, np.int32)), ValueError, "segments: needs at least one entry"),
]


def call(args, grouped=False):
    return _C.batched_forward(args["y"], args["x"], args["pool_a"], args["index_a"], args["pool_b"],
                              args["index_b"], args["scales"], args["adapter_ids"],
                              ranks=args.get("ranks"), grouped=grouped,
                              segments=args.get("segments"), workspace=args.get("workspace"))


# "segments without grouped" is only an error for the per-row strategy.
BAD_BY_STRATEGY = [(case, grouped) for case in BAD for grouped in (False, True)
                   if not (grouped and "segments" in case[0])]


@pytest.mark.parametrize("case,grouped", BAD_BY_STRATEGY,
                         ids=[f"{c[0]}-{'grouped' if g else 'per_row'}" for c, g in BAD_BY_STRATEGY])
def test_bad_input_raises_and_writes_nothing(case, grouped):
    _, change, error, message = case
    args = good_call()
    call(dict(args, y=args["y"].copy()), grouped)  # the unchanged call is fine
    change(args)
    before = np.array(args["y"], copy=True)
    with pytest.raises(error, match=message):
        call(args, grouped)
    assert np.array_equal(np.asarray(args["y"]), before, equal_nan=True)


@pytest.mark.parametrize("case", BAD_GROUPED, ids=[c[0] for c in BAD_GROUPED])
def test_bad_segments_raise_and_write_nothing(case):
    _, change, error, message = case
    args = good_call()
    args["adapter_ids"] = np.array([0, 1, 1, 2, 2, 2], np.int32)
    call(dict(args, y=args["y"].copy(), segments=np.array([0, 1, 3, 6], np.int32)), True)
    change(args)
    before = args["y"].copy()
    with pytest.raises(error, match=message):
        call(args, True)
    assert np.array_equal(args["y"], before)


def test_bad_arguments_to_the_python_wrapper():
    args = good_call()
    common = dict(pool_a=args["pool_a"], index_a=args["index_a"], pool_b=args["pool_b"],
                  index_b=args["index_b"], scales=args["scales"])
    with pytest.raises(ValueError, match="strategy must be"):
        F.batched_forward(args["x"], **common, adapter_ids=args["adapter_ids"], strategy="fast")
    with pytest.raises(TypeError, match="adapter_ids: expected integers"):
        F.batched_forward(args["x"], **common, adapter_ids=[0.5] * 6)
    with pytest.raises(TypeError, match="missing required argument 'adapter_ids'"):
        _C.batched_forward(args["y"], args["x"], args["pool_a"], args["index_a"], args["pool_b"],
                           args["index_b"], args["scales"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'segment'"):
        _C.batched_forward(args["y"], args["x"], args["pool_a"], args["index_a"], args["pool_b"],
                           args["index_b"], args["scales"], args["adapter_ids"], segment=None)


# ---------------------------------------------------------------- CUDA only (skipped without a GPU)

def _cuda_torch():
    torch = pytest.importorskip("torch")
    if not (mos.build_info()["cuda"] and torch.cuda.is_available()):
        pytest.skip("mos built without CUDA or no GPU visible")
    return torch


@pytest.mark.parametrize("grouped", [False, True])
def test_cuda_graph_capture_replays_with_new_ids(grouped):
    """No host sync and no allocation: a captured call replays with ids written in place."""
    torch = _cuda_torch()
    rng = np.random.default_rng(21)
    adapters = Adapters(16, seed=21)
    n = 40
    args = {k: torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in adapters.args().items()}
    x_np = rng.standard_normal((n, D_IN)).astype(np.float32)
    x = torch.from_numpy(x_np).cuda()
    y = torch.zeros(n, D_OUT, device="cuda")
    ids = torch.zeros(n, dtype=torch.int32, device="cuda")
    workspace = torch.empty(F.batched_workspace_bytes(n, adapters.max_rank, 4, grouped),
                            dtype=torch.uint8, device="cuda")

    def step():
        y.zero_()
        _C.batched_forward(y, x, args["pool_a"], args["index_a"], args["pool_b"], args["index_b"],
                           args["scales"], ids, grouped=grouped, workspace=workspace,
                           stream=torch.cuda.current_stream().cuda_stream or 1)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for mix in MIXES:
        new_ids = adapter_ids(mix, 16, n, rng)
        if grouped:
            new_ids = np.sort(new_ids)
        ids.copy_(torch.from_numpy(new_ids))
        graph.replay()
        torch.cuda.synchronize()
        zeros = np.zeros((n, D_OUT))
        assert_rows_close(y.cpu().numpy(), adapters.expected(x_np, zeros, new_ids),
                          adapters.bound(x_np, zeros, new_ids), 1e-5, f"replay {mix}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("strategy", ["per_row", "grouped"])
def test_cuda_16_bit_error_within_twice_a_naive_computation(dtype, strategy):
    torch = _cuda_torch()
    tdtype = getattr(torch, dtype)
    rng = np.random.default_rng(4)
    adapters = Adapters(9, dtype=np.float64, seed=4)
    n = 70
    ids = adapter_ids("uniform", 9, n, rng)
    x = rng.standard_normal((n, D_IN))
    want = adapters.expected(x, np.zeros((n, D_OUT)), ids)
    to16 = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to("cuda", tdtype)  # noqa: E731
    got = F.batched_forward(to16(x), to16(adapters.pool_a), torch.from_numpy(adapters.index_a).cuda(),
                            to16(adapters.pool_b), torch.from_numpy(adapters.index_b).cuda(),
                            torch.from_numpy(adapters.scales).cuda(), torch.from_numpy(ids).cuda(),
                            strategy=strategy)
    naive = np.zeros((n, D_OUT))
    for a in np.unique(ids[ids >= 0]):
        rows = np.flatnonzero(ids == a)
        pa, pb, ia, ib, s, r = adapters.own[a]
        A = to16(pa)[torch.from_numpy(ia).long().cuda()].reshape(r, D_IN)
        Bt = to16(pb)[torch.from_numpy(ib).long().cuda()].reshape(r, D_OUT)
        naive[rows] = ((to16(x[rows]) @ A.T) @ Bt * s).double().cpu().numpy()
    err = np.abs(got.double().cpu().numpy() - want).max()
    err_naive = np.abs(naive - want).max()
    assert err <= 2 * err_naive + 1e-6, f"{dtype} {strategy}: {err:.3g} vs naive {err_naive:.3g}"


BAD_DEVICE_SEGMENTS = {
    "decreasing": [0, 30, 10, 40],      # clamped, these overlapped: rows 10..29 written twice
    "short": [0, 12, 20],               # ends before N: rows 20..39 were skipped
    "out of range": [-5, 7, 99],
    "mixed ids": [0, 40],               # one segment over several adapters
    "repeated": [0, 0, 13, 13, 40, 40],
}


@pytest.mark.parametrize("name", BAD_DEVICE_SEGMENTS)
def test_cuda_device_segments_never_overlap_or_skip_rows(name):
    """Device segments cannot be validated without a sync: whatever they hold, every row gets its
    own adapter's update exactly once (segments only cut groups further)."""
    torch = _cuda_torch()
    rng = np.random.default_rng(33)
    adapters = Adapters(5, seed=33)
    n = 40
    ids = np.sort(adapter_ids("uniform", 5, n, rng)).astype(np.int32)
    x = rng.standard_normal((n, D_IN)).astype(np.float32)
    y0 = rng.standard_normal((n, D_OUT)).astype(np.float32)
    args = {k: torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in adapters.args().items()}
    y = torch.from_numpy(y0.copy()).cuda()
    segments = torch.tensor(BAD_DEVICE_SEGMENTS[name], dtype=torch.int32, device="cuda")
    F.batched_forward(torch.from_numpy(x).cuda(), **args, adapter_ids=torch.from_numpy(ids).cuda(),
                      out=y, strategy="grouped", segments=segments)
    torch.cuda.synchronize()
    assert_rows_close(y.cpu().numpy(), adapters.expected(x, y0, ids), adapters.bound(x, y0, ids),
                      1e-5, name)


def test_cuda_grouped_many_tiles_and_groups():
    """More tiles than the launch has blocks (the kernels loop over the tiles) and 1-row groups."""
    torch = _cuda_torch()
    rng = np.random.default_rng(34)
    adapters = Adapters(7, seed=34)
    n = 5000
    ids = np.concatenate([np.sort(rng.integers(-1, 7, n // 2)), rng.integers(-1, 7, n - n // 2)])
    ids = ids.astype(np.int32)
    x = rng.standard_normal((n, D_IN)).astype(np.float32)
    args = {k: torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in adapters.args().items()}
    got = F.batched_forward(torch.from_numpy(x).cuda(), **args,
                            adapter_ids=torch.from_numpy(ids).cuda(), strategy="grouped")
    zeros = np.zeros((n, D_OUT))
    assert_rows_close(got.cpu().numpy(), adapters.expected(x, zeros, ids),
                      adapters.bound(x, zeros, ids), 1e-5, "many tiles")


# ---------------------------------------------------------------- int64 ids and ranks never wrap; scales beyond the pools' dtype

@pytest.mark.parametrize("ids", [np.array([0, 1, 2**32 + 1, 0, 1], np.int64),
                                 np.array([0, 1, -2**32, 0, 1], np.int64), [0, 1, 2**32 + 1, 0, 1]])
def test_batched_forward_refuses_ids_beyond_int32_instead_of_wrapping(ids):
    x, pa, ia, pb, ib = two_adapters()
    out = np.full((5, 6), 3.0, np.float32)
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


def test_batched_scales_not_finite_in_float32_are_refused():
    x, pa, ia, pb, ib = two_adapters()
    out = np.zeros((5, 6), np.float32)
    with pytest.raises(ValueError, match=r"scales\[1\] = 1e\+39 is not finite in float32"):
        F.batched_forward(x, pa, ia, pb, ib, np.array([1.0, 1e39]), [0, 1, 0, 1, 0], out=out)
    assert not out.any()


@pytest.mark.parametrize("n_rows", [5, 0])
def test_an_out_that_is_not_a_tensor_is_named(n_rows):
    x, pa, ia, pb, ib = two_adapters()
    with pytest.raises(TypeError, match="out: expected a NumPy array or a DLPack tensor, got str"):
        F.batched_forward(x[:n_rows], pa, ia, pb, ib, [1.0, 2.0], [0] * n_rows, out="str")
