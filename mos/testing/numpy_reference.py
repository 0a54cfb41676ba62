"""A float64 NumPy reference of MoS (docs/design.md), written the most obvious way (no cleverness).

The one NumPy reference of the test suite and the fuzz: `forward` / `backward` take the rank `r`;
`delta` / `grads` read it from the shapes (r = len(index_a) / (d_in / shard length)), for callers
holding only tensors. Imports NumPy alone."""
import numpy as np


def assemble(pool, index, r):
    """Rank vector j = concatenation of shards index[j*l .. j*l + l - 1]."""
    pool = np.asarray(pool, dtype=np.float64)
    l = len(index) // r
    return np.stack([np.concatenate([pool[index[j * l + t]] for t in range(l)]) for j in range(r)])


def forward(x, pool_a, index_a, pool_b, index_b, scale, r):
    a = assemble(pool_a, index_a, r)          # (r, d_in)
    b = assemble(pool_b, index_b, r).T        # (d_out, r)
    x = np.asarray(x, dtype=np.float64)
    return scale * (x @ a.T) @ b.T


def backward(dy, x, pool_a, index_a, pool_b, index_b, scale, r):
    a = assemble(pool_a, index_a, r)
    b = assemble(pool_b, index_b, r).T
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    h = x @ a.T
    g = scale * dy @ b
    dx = g @ a
    da = g.T @ x                               # (r, d_in)
    dbt = scale * h.T @ dy                     # (r, d_out)
    l = len(index_a) // r
    dpool_a = np.zeros(np.shape(pool_a))
    dpool_b = np.zeros(np.shape(pool_b))
    for i, row in enumerate(index_a):
        j, t = divmod(i, l)
        width = dpool_a.shape[1]
        dpool_a[row] += da[j, t * width:(t + 1) * width]
    for i, row in enumerate(index_b):
        j, t = divmod(i, l)
        width = dpool_b.shape[1]
        dpool_b[row] += dbt[j, t * width:(t + 1) * width]
    return dx, dpool_a, dpool_b


def index_tables(n_layers, r, equivalent_rank, l, p, subset_selection, draw):
    """The index tables of docs/design.md: `draw(k)` supplies the public sample of layer k."""
    n_public = (equivalent_rank - p) * n_layers * l
    tables = []
    for k in range(n_layers):
        public = list(draw(k)) if subset_selection else list(range(n_public))
        private = list(range(n_public + k * p * l, n_public + (k + 1) * p * l))
        tables.append(public + private)
    return np.array(tables, dtype=np.int32)


def rank_of(x, pool_a, index_a):
    """The forward rank an index table encodes: its length over the shards per vector."""
    shards = np.shape(x)[-1] // np.shape(pool_a)[1]
    return len(index_a) // shards


def delta(x, pool_a, index_a, pool_b, index_b, scale):
    """scale * (x A^T) B^T over the last dimension of x (any number of leading dimensions)."""
    return forward(x, pool_a, np.asarray(index_a), pool_b, np.asarray(index_b), scale,
                   rank_of(x, pool_a, index_a))


def grads(dy, x, pool_a, index_a, pool_b, index_b, scale):
    """(dx, dpool_a, dpool_b) of `delta` for upstream gradient dy; dx has x's rows flattened."""
    x, dy = np.asarray(x), np.asarray(dy)
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return backward(dy2, x2, pool_a, np.asarray(index_a), pool_b, np.asarray(index_b), scale,
                    rank_of(x, pool_a, index_a))
