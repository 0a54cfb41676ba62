"""Differential fuzz of every mos.functional and mos._C entry point, one call per case.

A case is drawn through a `Draw` (hypothesis in tests/fuzz_entry_points.py, a seeded PRNG in
benchmarks/fuzz.py; both draw from this one generator). It is either valid, and then every output must
match a float64 NumPy reference, or it carries one defect, and then the call must raise a
TypeError, ValueError or BufferError whose message names the defective argument, and no array
of the call may change. `run_case` returns an Outcome: "ok", "wrong" (a wrong result, a defect
accepted, or an array written by a rejected call) or "unclear" (any other exception, or a
message that does not name the argument). A crash kills the process; callers run it in a child.
"""
from __future__ import annotations

import functools
import inspect
import random
import re
from dataclasses import dataclass, field

import numpy as np

from mos import _C
from mos import functional as F

from . import numpy_reference as ref
from .dlpack_producer import DL_CPU, DL_CUDA, Producer

try:
    import torch
except ImportError:  # the NumPy-only install: the torch variant of valid cases is skipped
    torch = None

ALLOWED = (TypeError, ValueError, BufferError)


class RandomDraw:
    """Draws from a seeded PRNG (fast: for runs of a million cases)."""

    def __init__(self, seed):
        self._random = random.Random(seed)

    def int(self, lo, hi):
        return self._random.randint(lo, hi)

    def choice(self, options):
        return options[self._random.randrange(len(options))]

    def flag(self):
        return self._random.random() < 0.5


class HypothesisDraw:
    """Draws through hypothesis's `data` object, so failing cases shrink."""

    def __init__(self, data):
        from hypothesis import strategies as st
        self._data, self._st = data, st

    def int(self, lo, hi):
        return self._data.draw(self._st.integers(lo, hi))

    def choice(self, options):
        return options[self.int(0, len(options) - 1)]

    def flag(self):
        return self.int(0, 1) == 1


@dataclass
class Case:
    entry: str                      # "_C.linear_forward", "F.forward", ...
    function: object
    kwargs: dict
    expect: object = None           # valid: callable(result, kwargs) -> None or a mismatch text
    defect: str = ""                # "" for a valid case, else "<kind> <argument>"
    names: tuple = ()               # invalid: the message must name one of these (whole words)


@dataclass
class Outcome:
    kind: str                       # "ok", "wrong" or "unclear"
    case: Case
    detail: str = ""
    error: str = field(default="")


# ---------------------------------------------------------------- the problem a case is built on

@dataclass
class Problem:
    dtype: type
    n: int            # rows of x
    l: int            # shards per vector
    sla: int          # A-pool shard length
    slb: int          # B-pool shard length
    r: int
    n_shards: int
    rng: np.random.Generator

    @property
    def d_in(self):
        return self.l * self.sla

    @property
    def d_out(self):
        return self.l * self.slb

    def normal(self, *shape, dtype=None):
        return self.rng.standard_normal(shape).astype(dtype or self.dtype)

    def index(self, length=None):
        return self.rng.permutation(self.n_shards)[:length or self.r * self.l].astype(np.int32)


def draw_problem(d):
    l, r = d.int(1, 3), d.int(1, 3)
    return Problem(dtype=d.choice([np.float32, np.float64]), n=d.choice([0, 1, 2, 3, 5, 7]), l=l,
                   sla=d.int(1, 4), slb=d.int(1, 4), r=r, n_shards=r * l + d.int(0, 4),
                   rng=np.random.default_rng(d.int(0, 2**32 - 1)))


def aligned_workspace(nbytes, dtype=np.float32):
    """A zeroed, 256-byte aligned 1-D array of at least nbytes (the core's workspace rule)."""
    itemsize = np.dtype(dtype).itemsize
    count = max(1, -(-nbytes // itemsize))
    buffer = np.zeros(count + 256 // itemsize, dtype)
    offset = (-buffer.ctypes.data % 256) // itemsize
    return buffer[offset:offset + count]


def close(got, want, dtype):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return f"shape {got.shape} != {want.shape}"
    tol = 2e-3 if dtype == np.float32 else 1e-9
    scale = 1.0 + (np.abs(want).max() if want.size else 0.0)
    if not np.allclose(got, want, rtol=tol, atol=tol * scale):
        return f"max |diff| {np.abs(got - want).max():.3g} (tolerance {tol * scale:.3g})"
    return None


def expect_arrays(pairs_fn, dtype):
    """An `expect` checking (name, got, want) triples after the call."""
    def check(result, kwargs):
        for name, got, want in pairs_fn(result, kwargs):
            problem = close(got, want, dtype)
            if problem:
                return f"{name}: {problem}"
        return None
    return check


# ---------------------------------------------------------------- valid calls, one per entry point

def c_assemble(p, d):
    index = p.index(d.int(0, p.n_shards))
    pool = p.normal(p.n_shards, p.sla)
    rows = np.full((len(index), p.sla), 5.0, p.dtype)
    want = pool[index]
    return Case("_C.assemble", _C.assemble, dict(rows=rows, pool=pool, index=index),
                expect_arrays(lambda res, kw: [("rows", kw["rows"], want)], p.dtype))


def _scatter_inputs(p, d):
    """(pool, rows, index, the pool after pool[index] += rows in float64)."""
    index = p.index(d.int(0, p.n_shards))
    pool = p.normal(p.n_shards, p.sla)
    rows = p.normal(len(index), p.sla)
    want = pool.astype(np.float64)
    want[index] += rows
    return pool, rows, index, want


def c_scatter_add(p, d):
    pool, rows, index, want = _scatter_inputs(p, d)
    return Case("_C.scatter_add", _C.scatter_add, dict(pool=pool, rows=rows, index=index),
                expect_arrays(lambda res, kw: [("pool", kw["pool"], want)], p.dtype))


def _adapter(p):
    return dict(x=p.normal(p.n, p.d_in), pool_a=p.normal(p.n_shards, p.sla), index_a=p.index(),
                pool_b=p.normal(p.n_shards, p.slb), index_b=p.index(),
                scale=float(p.rng.uniform(-3, 3)))


def _reference_forward(a, r):
    return ref.forward(a["x"], a["pool_a"], a["index_a"], a["pool_b"], a["index_b"], a["scale"], r)


def _h_of(a, r):
    return np.asarray(a["x"], np.float64) @ ref.assemble(a["pool_a"], a["index_a"], r).T


def c_linear_forward(p, d):
    a = _adapter(p)
    y = p.normal(p.n, p.d_out)
    want = y + _reference_forward(a, p.r)
    kwargs = dict(y=y, **a)
    with_h, with_ws = d.flag(), d.flag()
    if with_h:
        kwargs["h"] = np.full((p.n, p.r), 9.0, p.dtype)
    if with_ws:
        kwargs["workspace"] = aligned_workspace(F.workspace_bytes(p.n, p.d_in, p.d_out, p.r,
                                                                  np.dtype(p.dtype).itemsize, False, with_h))

    def pairs(res, kw):
        out = [("y", kw["y"], want)]
        if with_h:
            out.append(("h", kw["h"], _h_of(a, p.r)))
        return out
    return Case("_C.linear_forward", _C.linear_forward, kwargs, expect_arrays(pairs, p.dtype))


def c_linear_forward_full(p, d):
    a = _adapter(p)
    weight = p.normal(p.d_out, p.d_in)
    bias = p.normal(p.d_out) if d.flag() else None
    base = np.asarray(a["x"], np.float64) @ weight.T + (0 if bias is None else bias)
    want = base + _reference_forward(a, p.r)
    kwargs = dict(y=np.full((p.n, p.d_out), 4.0, p.dtype), x=a["x"], weight=weight, bias=bias,
                  pool_a=a["pool_a"], index_a=a["index_a"], pool_b=a["pool_b"],
                  index_b=a["index_b"], scale=a["scale"])
    return Case("_C.linear_forward_full", _C.linear_forward_full, kwargs,
                expect_arrays(lambda res, kw: [("y", kw["y"], want)], p.dtype))


def c_linear_backward(p, d):
    a = _adapter(p)
    dy = p.normal(p.n, p.d_out)
    dx_ref, da_ref, db_ref = ref.backward(dy, a["x"], a["pool_a"], a["index_a"], a["pool_b"],
                                          a["index_b"], a["scale"], p.r)
    outs = {}
    if d.flag():
        outs["dx"] = p.normal(p.n, p.d_in)
    if d.flag():
        outs["dpool_a"] = p.normal(p.n_shards, p.sla)
    if d.flag():
        outs["dpool_b"] = p.normal(p.n_shards, p.slb)
    wants = {"dx": dx_ref, "dpool_a": da_ref, "dpool_b": db_ref}
    wants = {k: outs[k] + wants[k] for k in outs}
    kwargs = dict(dx=outs.get("dx"), dpool_a=outs.get("dpool_a"), dpool_b=outs.get("dpool_b"), dy=dy, **a)
    if d.flag():
        kwargs["h"] = _h_of(a, p.r).astype(p.dtype)
    if d.flag():
        kwargs["workspace"] = aligned_workspace(F.workspace_bytes(
            p.n, p.d_in, p.d_out, p.r, np.dtype(p.dtype).itemsize, True, "h" in kwargs))
    return Case("_C.linear_backward", _C.linear_backward, kwargs,
                expect_arrays(lambda res, kw: [(k, kw[k], w) for k, w in wants.items()], p.dtype))


def _batch(p, d):
    """Arguments of a batched call: K adapters over one concatenated pool (tables need not be
    distinct), ids in runs so that segments can describe them."""
    k, max_rank = d.int(0, 3), d.int(1, 3)
    width = max_rank * p.l
    index_a = p.rng.integers(0, p.n_shards, (k, width)).astype(np.int32)
    index_b = p.rng.integers(0, p.n_shards, (k, width)).astype(np.int32)
    ids = np.sort(p.rng.integers(-1, k, p.n)).astype(np.int32) if k else np.full(p.n, -1, np.int32)
    ranks = p.rng.integers(0, max_rank + 1, k).astype(np.int32) if d.flag() else None
    scales = p.rng.uniform(-2, 2, k).astype(d.choice([np.float32, np.float64]))
    return dict(x=p.normal(p.n, p.d_in), pool_a=p.normal(p.n_shards, p.sla), index_a=index_a,
                pool_b=p.normal(p.n_shards, p.slb), index_b=index_b, scales=scales,
                adapter_ids=ids, ranks=ranks), max_rank


def _batched_reference(b, y0, l, max_rank):
    y = np.array(y0, np.float64)
    for n, a in enumerate(b["adapter_ids"]):
        if a < 0:
            continue
        r = max_rank if b["ranks"] is None else int(b["ranks"][a])
        if r == 0:
            continue
        rows = ref.forward(b["x"][n:n + 1], b["pool_a"], b["index_a"][a, :r * l], b["pool_b"],
                           b["index_b"][a, :r * l], float(b["scales"][a]), r)
        y[n] += rows[0]
    return y


def c_batched_forward(p, d):
    b, max_rank = _batch(p, d)
    y = p.normal(p.n, p.d_out)
    want = _batched_reference(b, y, p.l, max_rank)
    grouped = d.flag()
    kwargs = dict(y=y, **b, grouped=grouped)
    if grouped and d.flag():
        kwargs["segments"] = F.segments_of(b["adapter_ids"])
    return Case("_C.batched_forward", _C.batched_forward, kwargs,
                expect_arrays(lambda res, kw: [("y", kw["y"], want)], p.dtype))


def _int_case(entry, function, kwargs, check):
    def expect(result, kw):
        return check(result)
    return Case(entry, function, kwargs, expect)


def c_linear_workspace_bytes(p, d):
    backward, with_h = d.flag(), d.flag()
    kwargs = dict(n_rows=p.n, d_in=p.d_in, d_out=p.d_out, r=p.r, itemsize=d.choice([2, 4, 8]),
                  backward=backward, with_h=with_h, cuda=d.flag())
    e = max(4, kwargs["itemsize"])
    need = p.r * (p.d_in + p.d_out) * e + (0 if with_h else p.n * p.r * e)
    return _int_case("_C.linear_workspace_bytes", _C.linear_workspace_bytes, kwargs,
                     lambda res: None if isinstance(res, int) and res >= need and res % 256 == 0
                     else f"{res!r} is not an aligned size >= {need}")


def c_batched_workspace_bytes(p, d):
    kwargs = dict(n_rows=p.n, max_rank=p.r, itemsize=d.choice([2, 4, 8]), grouped=d.flag())
    need = p.n * p.r * 4
    return _int_case("_C.batched_workspace_bytes", _C.batched_workspace_bytes, kwargs,
                     lambda res: None if isinstance(res, int) and res >= need else f"{res!r} < {need}")


def _shape_kwargs(d):
    l, n_layers, r = d.int(1, 3), d.int(1, 4), d.int(1, 4)
    equivalent_rank = d.int(max(1, (r + n_layers - 1) // n_layers), 5)
    private_rank = d.int(0, min(r, equivalent_rank) - 1) if min(r, equivalent_rank) > 1 else 0
    return dict(d_in=l * d.int(1, 4), d_out=l * d.int(1, 4), n_layers=n_layers, r=r,
                equivalent_rank=equivalent_rank, shards_per_vector=l, private_rank=private_rank,
                subset_selection=True)


def _valid_shape(kw):
    l, p = kw["shards_per_vector"], kw["private_rank"]
    return (kw["r"] - p) * l <= (kw["equivalent_rank"] - p) * kw["n_layers"] * l


def c_pool_shape(p, d):
    kw = _shape_kwargs(d)
    while not _valid_shape(kw):
        kw["equivalent_rank"] += 1

    def check(res):
        l, big = kw["shards_per_vector"], kw["equivalent_rank"] * kw["n_layers"]
        want = dict(n_shards=big * l, n_public=(kw["equivalent_rank"] - kw["private_rank"]) * kw["n_layers"] * l,
                    shard_len_a=kw["d_in"] // l, shard_len_b=kw["d_out"] // l)
        return None if res == want else f"{res} != {want}"
    return _int_case("_C.pool_shape", _C.pool_shape, kw, check)


def c_route_indices(p, d):
    kw = _shape_kwargs(d)
    while not _valid_shape(kw):
        kw["equivalent_rank"] += 1
    layer = d.int(0, kw["n_layers"] - 1)
    kw.update(seed=d.choice([0, 7, 2**64 - 1]), pool_name=d.choice(["q", "mlp.up", "é"]), layer=layer,
              side=d.int(0, 1))

    def check(res):
        l, pr = kw["shards_per_vector"], kw["private_rank"]
        n_public = (kw["equivalent_rank"] - pr) * kw["n_layers"] * l
        private = list(range(n_public + layer * pr * l, n_public + (layer + 1) * pr * l))
        table = [int(v) for v in res]
        n_pick = (kw["r"] - pr) * l
        if len(table) != kw["r"] * l or len(set(table)) != len(table):
            return f"table {table} is not {kw['r'] * l} distinct rows"
        if table[n_pick:] != private or not all(0 <= v < n_public for v in table[:n_pick]):
            return f"table {table}: public rows must be < {n_public}, then private rows {private}"
        return None
    return _int_case("_C.route_indices", _C.route_indices, kw, check)


def c_route_key(p, d):
    kw = dict(seed=d.choice([0, 1, 2**64 - 1]), pool_name=d.choice(["q", "v", ""]),
              layer=d.int(-2, 5), side=d.int(0, 2))
    again = _C.route_key(**kw)
    return _int_case("_C.route_key", _C.route_key, kw,
                     lambda res: None if res == again and 0 <= res < 2**64 else f"{res} != {again}")


def f_assemble(p, d):
    index = p.index()
    pool = p.normal(p.n_shards, p.sla)
    want = ref.assemble(pool, index, p.r)
    return Case("F.assemble", F.assemble, dict(pool=pool, index=index, r=p.r),
                expect_arrays(lambda res, kw: [("result", res, want)], p.dtype))


def f_scatter_add(p, d):
    pool, rows, index, want = _scatter_inputs(p, d)
    return Case("F.scatter_add", F.scatter_add, dict(pool_grad=pool, rows=rows, index=index),
                expect_arrays(lambda res, kw: [("pool_grad", kw["pool_grad"], want),
                                               ("result", res, want)], p.dtype))


def _lead(p, d):
    """Leading dimensions of x: (N,) or an (a, b) split of N (the functional API flattens them)."""
    return d.choice([(p.n,), (1, p.n)]) if p.n else (p.n,)


def f_forward(p, d):
    a = _adapter(p)
    lead = _lead(p, d)
    kwargs = dict(a, x=a["x"].reshape(lead + (p.d_in,)))
    want = _reference_forward(a, p.r)
    if d.flag():
        kwargs["weight"] = p.normal(p.d_out, p.d_in)
        kwargs["bias"] = p.normal(p.d_out) if d.flag() else None
        want = want + a["x"].astype(np.float64) @ kwargs["weight"].T + (
            0 if kwargs["bias"] is None else kwargs["bias"])
    elif d.flag():
        kwargs["h"] = np.zeros((p.n, p.r), p.dtype)
    if d.flag():
        out = p.normal(*lead, p.d_out)
        if "weight" not in kwargs:
            want = want + out.reshape(p.n, p.d_out)
        kwargs["out"] = out
    want = want.reshape(lead + (p.d_out,))
    return Case("F.forward", F.forward, kwargs, expect_arrays(lambda res, kw: [("result", res, want)], p.dtype))


def f_backward(p, d):
    a = _adapter(p)
    dy = p.normal(p.n, p.d_out)
    dx_ref, da_ref, db_ref = ref.backward(dy, a["x"], a["pool_a"], a["index_a"], a["pool_b"],
                                          a["index_b"], a["scale"], p.r)
    kwargs = dict(dy=dy, **a)
    given = {}
    for name, shape in (("dx", (p.n, p.d_in)), ("dpool_a", (p.n_shards, p.sla)),
                        ("dpool_b", (p.n_shards, p.slb))):
        if d.flag():
            given[name] = kwargs[name] = p.normal(*shape)
    need_dx = d.flag() or "dx" in given
    kwargs["need_dx"] = need_dx
    wants = {"dx": dx_ref, "dpool_a": da_ref, "dpool_b": db_ref}
    wants = {k: w + given[k] if k in given else w for k, w in wants.items()}

    def pairs(res, kw):
        dx, da, db = res
        out = [("dpool_a", da, wants["dpool_a"]), ("dpool_b", db, wants["dpool_b"])]
        if need_dx:
            out.append(("dx", dx, wants["dx"]))
        elif dx is not None:
            out.append(("dx", np.zeros(1), np.ones(1)))  # must be None without need_dx
        return out
    return Case("F.backward", F.backward, kwargs, expect_arrays(pairs, p.dtype))


def f_batched_forward(p, d):
    b, max_rank = _batch(p, d)
    strategy = d.choice(["auto", "per_row", "grouped"])
    kwargs = dict(b, strategy=strategy)
    kwargs["adapter_ids"] = d.choice([b["adapter_ids"], b["adapter_ids"].astype(np.int64),
                                      b["adapter_ids"].tolist()])
    if strategy != "per_row" and d.flag():
        kwargs["segments"] = F.segments_of(b["adapter_ids"])
    y0 = np.zeros((p.n, p.d_out))
    if d.flag():
        kwargs["out"] = p.normal(p.n, p.d_out)
        y0 = kwargs["out"].copy()
    want = _batched_reference(b, y0, p.l, max_rank)
    return Case("F.batched_forward", F.batched_forward, kwargs,
                expect_arrays(lambda res, kw: [("result", res, want)], p.dtype))


def f_workspace_bytes(p, d):
    case = c_linear_workspace_bytes(p, d)
    return Case("F.workspace_bytes", F.workspace_bytes, case.kwargs, case.expect)


def f_batched_workspace_bytes(p, d):
    case = c_batched_workspace_bytes(p, d)
    return Case("F.batched_workspace_bytes", F.batched_workspace_bytes, case.kwargs, case.expect)


def f_segments_of(p, d):
    ids = np.sort(p.rng.integers(-1, 3, p.n))
    starts = [0] + [i for i in range(1, p.n) if ids[i] != ids[i - 1]] + ([p.n] if p.n else [0])
    want = np.array(starts if p.n else [0])
    return Case("F.segments_of", F.segments_of, dict(adapter_ids=d.choice([ids, ids.tolist()])),
                expect_arrays(lambda res, kw: [("result", res, want)], np.float64))


BUILDERS = [c_assemble, c_scatter_add, c_linear_forward, c_linear_forward_full, c_linear_backward,
            c_batched_forward, c_linear_workspace_bytes, c_batched_workspace_bytes, c_pool_shape,
            c_route_indices, c_route_key, f_assemble, f_scatter_add, f_forward, f_backward,
            f_batched_forward, f_workspace_bytes, f_batched_workspace_bytes, f_segments_of]
ENTRY_POINTS = sorted({"_C." + b.__name__[2:] if b.__name__.startswith("c_") else "F." + b.__name__[2:]
                       for b in BUILDERS})

# ---------------------------------------------------------------- defects

# Arguments by role. Outputs are written by the call; N-D arguments may have leading dimensions
# in mos.functional (so an extra dimension is no defect there); list arguments take sequences.
OUTPUTS = {"_C.assemble": {"rows"}, "_C.scatter_add": {"pool"}, "_C.linear_forward": {"y", "h", "workspace"},
           "_C.linear_forward_full": {"y"}, "_C.linear_backward": {"dx", "dpool_a", "dpool_b", "workspace"},
           "_C.batched_forward": {"y", "workspace"}, "F.scatter_add": {"pool_grad"},
           "F.forward": {"out", "h", "workspace"}, "F.backward": {"dx", "dpool_a", "dpool_b", "workspace"},
           "F.batched_forward": {"out", "workspace"}}
INDEX = {"index", "index_a", "index_b", "adapter_ids", "ranks", "segments"}
N_D = {"F.forward": {"x", "out"}, "F.backward": {"x", "dy", "dx"}, "F.scatter_add": {"rows"},
       "F.batched_forward": {"x", "out", "adapter_ids"}, "F.segments_of": {"adapter_ids"}}
LISTS = {"F.batched_forward": {"scales", "adapter_ids", "ranks", "segments"}, "F.segments_of": {"adapter_ids"}}
# Copies made by mos.functional (contiguity and integer width are no defect there).
CONVERTED = {"F.forward": {"x"}, "F.backward": {"x", "dy"}, "F.scatter_add": {"rows"},
             "F.batched_forward": {"x", "adapter_ids", "ranks", "segments"}, "F.segments_of": {"adapter_ids"}}
# (argument, dimension) pairs whose size is pinned by the other arguments of the call: one more is a defect.
PINNED = {
    "_C.assemble": [("rows", 0), ("rows", 1), ("index", 0)],
    "_C.scatter_add": [("rows", 0), ("rows", 1), ("index", 0)],
    "_C.linear_forward": [("y", 0), ("y", 1), ("x", 0), ("x", 1), ("pool_a", 1), ("pool_b", 1),
                          ("index_a", 0), ("index_b", 0), ("h", 0), ("h", 1)],
    "_C.linear_forward_full": [("y", 0), ("y", 1), ("x", 0), ("weight", 0), ("weight", 1), ("bias", 0),
                               ("pool_b", 1), ("index_b", 0)],
    "_C.linear_backward": [("dy", 0), ("dy", 1), ("x", 1), ("dx", 0), ("dx", 1), ("dpool_a", 0),
                           ("dpool_a", 1), ("dpool_b", 0), ("dpool_b", 1), ("index_b", 0), ("h", 0), ("h", 1)],
    "_C.batched_forward": [("y", 0), ("y", 1), ("x", 0), ("x", 1), ("index_a", 0), ("index_b", 0),
                           ("index_b", 1), ("scales", 0), ("adapter_ids", 0), ("ranks", 0)],
    "F.forward": [("index_b", 0), ("h", 1), ("weight", 1), ("bias", 0)],
    "F.backward": [("dy", 1), ("dpool_a", 0), ("dpool_b", 1), ("index_b", 0), ("h", 1)],
    "F.batched_forward": [("index_b", 0), ("index_b", 1), ("scales", 0), ("ranks", 0)],
    "F.scatter_add": [("rows", 1), ("index", 0)],
    "F.assemble": [],
}
# Arguments for which None is a valid value even where the signature gives no default.
NONE_OK = {"dx", "dpool_a", "dpool_b", "bias", "h", "workspace", "ranks", "segments", "out", "weight"}
INT_ARGS = {"n_rows", "d_in", "d_out", "r", "itemsize", "max_rank", "n_layers",
            "equivalent_rank", "shards_per_vector", "private_rank", "seed", "layer", "side"}


def _is_array(v):
    return isinstance(v, np.ndarray)


def _with(case, arg, value, kind, names=None):
    kwargs = dict(case.kwargs)
    kwargs[arg] = value
    return Case(case.entry, case.function, kwargs, defect=f"{kind} {arg}", names=names or (arg,))


def _defects(case, p):
    """Every defect that applies to this valid case: (kind, build) pairs."""
    entry, kw = case.entry, case.kwargs
    out = []
    n_d, lists, converted = N_D.get(entry, set()), LISTS.get(entry, set()), CONVERTED.get(entry, set())
    required = _required(case)
    for arg, value in kw.items():
        if _is_array(value):
            out.append(("type", lambda arg=arg: _with(case, arg, "text", "type")))
            out.append(("type", lambda arg=arg: _with(case, arg, {"a": 1}, "type")))
            if arg in required and arg not in NONE_OK:
                out.append(("none", lambda arg=arg: _with(case, arg, None, "none")))
            if arg not in n_d:
                extra = value[None]
                out.append(("ndim", lambda arg=arg, extra=extra: _with(case, arg, extra, "ndim")))
            if not (arg == "adapter_ids" and entry.startswith("F.")):  # flattened there
                out.append(("ndim", lambda arg=arg, value=value: _with(case, arg, np.zeros((), value.dtype), "ndim")))
            out.extend(_dtype_defects(case, arg, value, converted))
            if arg not in converted and value.size and value.shape[-1] >= 2 and arg != "workspace":
                out.append(("strided", lambda arg=arg, value=value: _with(case, arg, _strided(value), "strided")))
            if arg in OUTPUTS.get(entry, ()):
                out.append(("readonly", lambda arg=arg, value=value: _with(case, arg, _readonly(value), "readonly")))
            for a, dim in PINNED.get(entry, []):
                if a == arg and dim < value.ndim:
                    out.append(("shape", lambda arg=arg, dim=dim, value=value: _with(
                        case, arg, _grown(value, dim), "shape", names=_array_names(kw))))
            out.extend(_value_defects(case, arg, value, p))
            if arg not in converted and arg in ("x", "pool_a", "pool_b", "index_a", "index_b", "pool",
                                                "rows", "y", "scales", "dy", "weight", "adapter_ids"):
                out.extend(_producer_defects(case, arg, value))
        elif arg == "scale":
            for bad, kind in ((float("nan"), "value"), (float("inf"), "value"), ("1", "type"), (None, "none"),
                              ([1.0], "type")):
                out.append((kind, lambda bad=bad, kind=kind: _with(case, "scale", bad, kind)))
            if p.dtype == np.float32:
                out.append(("value", lambda: _with(case, "scale", -1e39, "value")))
        elif arg in INT_ARGS:
            for bad, kind in ((2**70, "value"), (-2**70, "value"), (1.5, "type"), ("3", "type"), (True, "type"),
                              (None, "none")):
                out.append((kind, lambda arg=arg, bad=bad, kind=kind: _with(case, arg, bad, kind)))
            if arg in ("n_rows", "d_in", "d_out", "r", "max_rank", "itemsize", "n_layers", "equivalent_rank",
                       "shards_per_vector") or (arg == "side" and entry == "_C.route_indices"):
                out.append(("value", lambda arg=arg: _with(case, arg, -1, "value")))
            if arg == "itemsize":
                out.append(("value", lambda: _with(case, "itemsize", 3, "value")))
        elif arg == "pool_name":
            out.append(("type", lambda: _with(case, "pool_name", 3, "type")))
            out.append(("value", lambda: _with(case, "pool_name", "a\0b", "value")))
        elif arg == "strategy":
            out.append(("value", lambda: _with(case, "strategy", "fast", "value")))
        elif arg == "need_dx":
            out.append(("type", lambda: _with(case, "need_dx", "yes", "type")))
        elif isinstance(value, list) and arg in lists:
            out.append(("type", lambda arg=arg: _with(case, arg, ["a"] * len(value) or ["a"], "type")))
    if "x" in kw and _is_array(kw["x"]) and kw["x"].ndim == 2 and not entry.startswith("F.segments"):
        x = kw["x"]
        out.append(("columns", lambda: _with(case, "x", np.zeros((x.shape[0], 0), x.dtype), "columns")))
    if any(p.name == "stream" for p in _parameters(case.function)):  # parsed (and range-checked) on every device
        for bad, kind in (("s", "type"), (1.5, "type"), (-5, "value"), (0, "value")):
            out.append((kind, lambda bad=bad, kind=kind: _with(case, "stream", bad, kind)))
    for arg in required:
        out.append(("missing", lambda arg=arg: _without(case, arg)))
    out.append(("keyword", lambda: _with(case, "bogus", 1, "keyword", names=("bogus",))))
    out.extend(_overlap_defects(case))
    return out


@functools.lru_cache(maxsize=None)
def _parameters(function):
    return tuple(inspect.signature(function).parameters.values())


def _required(case):
    """Arguments without a default (a missing one must be named)."""
    return {p.name for p in _parameters(case.function) if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name in case.kwargs}


def _without(case, arg):
    kwargs = {k: v for k, v in case.kwargs.items() if k != arg}
    return Case(case.entry, case.function, kwargs, defect=f"missing {arg}", names=(arg,))


def _array_names(kwargs):
    names = {k for k, v in kwargs.items() if _is_array(v) or isinstance(v, list)}
    return tuple(names | {"d_in", "d_out", "shards_per_vector", "r"})


def _dtype_defects(case, arg, value, converted):
    out = []
    if value.dtype.kind == "f":
        other = np.float64 if value.dtype == np.float32 else np.float32
        partners = [k for k, v in case.kwargs.items() if k != arg and k not in ("scales", "workspace")
                    and _is_array(v) and v.dtype.kind == "f"]
        if arg != "scales" and arg != "workspace" and partners:
            names = (arg, "x") if arg != "x" else ("x", "pool_a", "pool_b", "y", "dy")
            out.append(("dtype", lambda: _with(case, arg, value.astype(other), "dtype", names=names)))
        if arg != "workspace":
            out.append(("dtype", lambda: _with(case, arg, value.astype(np.int64), "dtype")))
            out.append(("dtype", lambda: _with(case, arg, value.astype(np.complex64), "dtype")))
    elif value.dtype.kind in "iu":
        if arg not in converted:
            out.append(("dtype", lambda: _with(case, arg, value.astype(np.int64), "dtype")))
        if value.size:
            out.append(("dtype", lambda: _with(case, arg, value.astype(np.float32), "dtype")))
            out.append(("dtype", lambda: _with(case, arg, value.astype(bool), "dtype")))
    return out


def _strided(value):
    wide = np.zeros(value.shape[:-1] + (2 * value.shape[-1],), value.dtype)
    view = wide[..., ::2]
    view[...] = value
    return view


def _readonly(value):
    copy = value.copy()
    copy.flags.writeable = False
    return copy


def _grown(value, dim):
    shape = list(value.shape)
    shape[dim] += 1
    grown = np.zeros(shape, value.dtype)
    grown[tuple(slice(0, s) for s in value.shape)] = value
    return grown


def _value_defects(case, arg, value, p):
    """Out-of-range, repeated and non-finite entries."""
    out = []
    if arg in INDEX and value.size:
        entry = case.entry
        bounds = {"index": p.n_shards, "index_a": p.n_shards, "index_b": p.n_shards}
        if arg in bounds:
            for bad in (bounds[arg], -1, 2**31 - 1):
                out.append(("range", lambda bad=bad: _with(case, arg, _set_first(value, bad), "range")))
        if arg == "adapter_ids" and "index_a" in case.kwargs:
            k = case.kwargs["index_a"].shape[0]
            for bad in (k, -2) + ((2**32 + 1,) if entry.startswith("F.") else ()):
                bad_ids = _set_first(value, bad) if bad < 2**31 else np.where(
                    np.arange(value.size) == 0, bad, value.astype(np.int64))
                out.append(("range", lambda bad_ids=bad_ids: _with(case, arg, bad_ids, "range")))
        if arg == "ranks":
            width = case.kwargs["index_a"].shape[1] // p.l
            for bad in (width + 1, -1):
                out.append(("range", lambda bad=bad: _with(case, arg, _set_first(value, bad), "range")))
        if arg == "segments":
            out.append(("range", lambda: _with(case, arg, _set_first(value, 1), "range")))
        repeats = (entry.endswith("scatter_add") and arg == "index") or (
            entry.endswith("linear_backward") and (
                (arg == "index_a" and case.kwargs.get("dpool_a") is not None) or
                (arg == "index_b" and case.kwargs.get("dpool_b") is not None)))
        if repeats and value.size >= 2:
            repeated = value.copy()
            repeated[1] = repeated[0]
            out.append(("repeat", lambda: _with(case, arg, repeated, "repeat")))
    if arg == "scales" and value.size:
        out.append(("value", lambda: _with(case, arg, _set_first(value.astype(np.float64), np.nan), "value")))
        if p.dtype == np.float32:
            out.append(("value", lambda: _with(case, arg, _set_first(value.astype(np.float64), 1e39), "value")))
    if arg == "workspace" and value.size > 1:
        out.append(("size", lambda: _with(case, arg, value[:1], "size")))
    return out


def _set_first(value, bad):
    changed = value.copy()
    changed.reshape(-1)[0] = bad
    return changed


def _producer_defects(case, arg, value):
    """Hostile DLPack producers over a valid array (the fix for each is in csrc/tensor.c)."""
    out = [("dlpack", lambda: _with(case, arg, Producer(value, reported_device=[DL_CPU, 0]), "dlpack")),
           ("dlpack", lambda: _with(case, arg, Producer(value, reported_device=DL_CPU), "dlpack")),
           ("dlpack", lambda: _with(case, arg, Producer(value, data=4096, capsule_device=(DL_CUDA, 0)),
                                    "dlpack"))]
    if value.size:
        out.append(("dlpack", lambda: _with(case, arg, Producer(value, data=None), "dlpack")))
    return out


def _overlap_defects(case):
    """An output sharing a buffer with an input (interleaved rows: refused, as documented)."""
    kw = case.kwargs
    pairs = {"_C.linear_forward": ("y", "x"), "_C.batched_forward": ("y", "x"),
             "_C.linear_backward": ("dx", "dy"), "_C.assemble": ("rows", "pool"),
             "F.forward": ("out", "x")}
    if case.entry not in pairs:
        return []
    out_name, in_name = pairs[case.entry]
    a, b = kw.get(out_name), kw.get(in_name)
    # Interleaved rows need two of them: a single row of each is disjoint, and valid.
    if not (_is_array(a) and _is_array(b)) or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0] \
            or a.shape[0] < 2 or not a.size or not b.size:
        return []

    def build():
        buffer = np.zeros((a.shape[0], a.shape[1] + b.shape[1]), a.dtype)
        first, second = buffer[:, :a.shape[1]], buffer[:, a.shape[1]:]
        first[...], second[...] = a, b.astype(a.dtype)
        kwargs = dict(kw, **{out_name: first, in_name: second})
        return Case(case.entry, case.function, kwargs, defect=f"overlap {out_name}",
                    names=(out_name, in_name))
    return [("overlap", build)]


# ---------------------------------------------------------------- drawing and running a case

def draw_case(d, valid_share=0.35):
    """One case: an entry point, a valid call, then (most of the time) one defect."""
    p = draw_problem(d)
    builder = d.choice(BUILDERS)
    case = builder(p, d)
    if d.int(0, 999) < valid_share * 1000:
        return _as_torch(case) if torch is not None and d.int(0, 3) == 0 else case
    defects = _defects(case, p)
    if not defects:
        return case
    kind = d.choice(sorted({k for k, _ in defects}))
    options = [build for k, build in defects if k == kind]
    return d.choice(options)()


def _as_torch(case):
    """The valid case with every array handed over as a torch tensor sharing its memory, so the
    DLPack import of a real producer and mos.functional's torch paths are exercised too."""
    kwargs = {k: torch.from_numpy(v) if _is_array(v) else v for k, v in case.kwargs.items()}
    return Case(case.entry, case.function, kwargs, case.expect)


def _snapshot(kwargs):
    return {k: (v.copy(), v.flags.writeable) for k, v in kwargs.items() if _is_array(v)}


def _named(message, names):
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message) for n in names)


def run_case(case) -> Outcome:
    before = _snapshot(case.kwargs) if case.defect else None
    try:
        result = case.function(**case.kwargs)
    except ALLOWED as error:
        message = f"{type(error).__name__}: {error}"
        if not case.defect:
            return Outcome("wrong", case, "a valid call was refused", message)
        changed = [k for k, (v, _) in before.items() if not np.array_equal(case.kwargs[k], v, equal_nan=True)
                   or case.kwargs[k].dtype != v.dtype]
        if changed:
            return Outcome("wrong", case, f"a refused call changed {changed}", message)
        if not _named(str(error), case.names):
            return Outcome("unclear", case, f"the message names none of {case.names}", message)
        return Outcome("ok", case)
    except Exception as error:  # noqa: BLE001 -- any other class is what the fuzz looks for
        return Outcome("unclear", case, "not a TypeError, ValueError or BufferError",
                       f"{type(error).__name__}: {error}")
    if case.defect:
        return Outcome("wrong", case, f"the defect ({case.defect}) was accepted")
    problem = case.expect(result, case.kwargs)
    if problem:
        return Outcome("wrong", case, problem)
    return Outcome("ok", case)


def describe(outcome: Outcome) -> str:
    case = outcome.case
    shapes = {k: (tuple(v.shape) if hasattr(v, "shape") and hasattr(v, "dtype") else type(v).__name__)
              for k, v in case.kwargs.items()}
    return (f"{case.entry} [{case.defect or 'valid'}]: {outcome.detail}"
            f"{' -- ' + outcome.error if outcome.error else ''} | {shapes}")
