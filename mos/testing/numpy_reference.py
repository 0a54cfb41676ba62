"""A float64 NumPy reference of DESIGN section 1, written the most obvious way (no cleverness)."""
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


def route_table(n_layers, r, equivalent_rank, l, p, subset_selection, draw):
    """Index tables from DESIGN: `draw(k)` supplies the public sample of layer k."""
    n_public = (equivalent_rank - p) * n_layers * l
    tables = []
    for k in range(n_layers):
        public = list(draw(k)) if subset_selection else list(range(n_public))
        private = list(range(n_public + k * p * l, n_public + (k + 1) * p * l))
        tables.append(public + private)
    return np.array(tables, dtype=np.int32)
