"""An independent pure-torch MoS (docs/design.md), written shard by shard in float64.

It shares no code with mos.torch: each rank vector is the concatenation of its gathered shards,
and each shard's gradient is added into its pool row one at a time. Slow by design; use it on
small shapes to check an implementation, not to train.
"""
from __future__ import annotations

import torch

__all__ = ["reference_forward", "reference_backward"]


def _shards_per_vector(pool_a, d_in):
    shard_len = pool_a.shape[1]
    if shard_len == 0 or d_in % shard_len:
        raise ValueError(f"pool_a's shard length {shard_len} must divide d_in = {d_in}")
    return d_in // shard_len


def _assemble(pool, index, shards):
    """(r, shards * shard_len): rank vector j = pool rows index[j*l], ..., index[j*l + l - 1]."""
    rows = [pool[int(i)] for i in index]
    rank = len(rows) // shards
    return torch.stack([torch.cat(rows[j * shards:(j + 1) * shards]) for j in range(rank)])


def _prepare(x, pool_a, index_a, pool_b, index_b):
    x = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
    pool_a, pool_b = pool_a.detach().to(torch.float64).cpu(), pool_b.detach().to(torch.float64).cpu()
    index_a, index_b = index_a.detach().cpu().reshape(-1), index_b.detach().cpu().reshape(-1)
    if len(index_a) != len(index_b):
        raise ValueError(f"index_a has {len(index_a)} entries and index_b {len(index_b)}; one layer's "
                         f"tables have r * shards_per_vector entries each")
    shards = _shards_per_vector(pool_a, x.shape[1])
    a = _assemble(pool_a, index_a, shards)                      # (r, d_in)
    bt = _assemble(pool_b, index_b, shards)                     # (r, d_out): B^T
    return x.cpu(), pool_a, index_a, pool_b, index_b, a, bt, shards


def reference_forward(x, pool_a, index_a, pool_b, index_b, scale: float, base=None):
    """float64 `base + scale * (x A^T) B^T` over the last dimension of x, on the CPU.

    index_a / index_b are one layer's rows of the index tables (r * shards_per_vector entries)."""
    lead = x.shape[:-1]
    x2, _, _, _, _, a, bt, _ = _prepare(x, pool_a, index_a, pool_b, index_b)
    y = scale * (x2 @ a.T) @ bt
    y = y.reshape(*lead, bt.shape[1])
    return y if base is None else y + base.detach().to(torch.float64).cpu()


def reference_backward(dy, x, pool_a, index_a, pool_b, index_b, scale: float):
    """(dx, dpool_a, dpool_b) of reference_forward for the upstream gradient dy, float64 on the CPU.
    A pool row gathered by the layer receives the sum of its shards' gradients."""
    lead = x.shape[:-1]
    x2, pool_a, index_a, pool_b, index_b, a, bt, shards = _prepare(x, pool_a, index_a, pool_b, index_b)
    dy2 = dy.detach().to(torch.float64).cpu().reshape(-1, bt.shape[1])
    h = x2 @ a.T                                                # (N, r)
    g = scale * dy2 @ bt.T                                      # (N, r)
    da = (g.T @ x2).reshape(-1, pool_a.shape[1])                # (r * l, d_in / l), shard by shard
    dbt = (scale * h.T @ dy2).reshape(-1, pool_b.shape[1])      # (r * l, d_out / l)
    dpool_a, dpool_b = torch.zeros_like(pool_a), torch.zeros_like(pool_b)
    for i, row in enumerate(index_a.tolist()):
        dpool_a[row] += da[i]
    for i, row in enumerate(index_b.tolist()):
        dpool_b[row] += dbt[i]
    return (g @ a).reshape(*lead, a.shape[1]), dpool_a, dpool_b
