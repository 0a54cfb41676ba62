"""SharedPools: one adapter's A- and B-pool for one module type, as torch state."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..pool import ShardPool

__all__ = ["SharedPools", "assemble_layer", "torch_dtype"]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a MoSConfig.pool_dtype string."""
    return getattr(torch, name)


class SharedPools(nn.Module):
    """The pools (trainable Parameters) and index tables (int32 buffers, never trained) that every
    layer of one module type gathers its A and B from. Registered once on the MoSModel; layers hold
    a plain reference, so the pools appear once in state_dict and once in parameters()."""

    def __init__(self, shard_pool: ShardPool, device=None, values=None, tables=None):
        """values=(pool_a, pool_b) and tables=(index_a, index_b) install saved state (already
        validated); by default the pools get the config's deterministic initial values."""
        super().__init__()
        self.shard_pool = shard_pool
        dtype = torch_dtype(shard_pool.config.pool_dtype)
        if values is None:
            # Drawn in float64 so every pool dtype rounds the same underlying values.
            values = [torch.from_numpy(v) for v in shard_pool.init_values(np.float64)]
        self.pool_a = nn.Parameter(values[0].to(device=device, dtype=dtype).contiguous())
        self.pool_b = nn.Parameter(values[1].to(device=device, dtype=dtype).contiguous())
        if tables is None:
            tables = shard_pool.index_tables()
        self.register_buffer("index_a", torch.tensor(np.asarray(tables[0]), dtype=torch.int32)
                             .to(device).contiguous())
        self.register_buffer("index_b", torch.tensor(np.asarray(tables[1]), dtype=torch.int32)
                             .to(device).contiguous())

    @property
    def rank(self) -> int:
        return self.shard_pool.rank

    @property
    def d_in(self) -> int:
        return self.shard_pool.d_in

    @property
    def d_out(self) -> int:
        return self.shard_pool.d_out

    @property
    def n_layers(self) -> int:
        return self.shard_pool.n_layers

    def tensors(self):
        """(pool_a, index_a, pool_b, index_b) as registered now, read from the module's own dicts:
        nn.Module.__getattr__ costs about 1.3 us a name, a tenth of a whole decode call."""
        params, buffers = self._parameters, self._buffers
        return params["pool_a"], buffers["index_a"], params["pool_b"], buffers["index_b"]

    def assembled(self, position: int):
        """(A, B) of the layer at `position`: (r, d_in) and (d_out, r), differentiable in the pools."""
        return assemble_layer(self, position)

    def extra_repr(self) -> str:
        c = self.shard_pool.config
        return (f"{self.shard_pool.name}: pool_a={tuple(self.pool_a.shape)}, pool_b={tuple(self.pool_b.shape)}, "
                f"n_layers={self.n_layers}, r={self.rank}, l={c.shards_per_vector}, p={c.private_rank}")


def assemble_layer(pools, position: int):
    """(A, B) of the layer at `position` of anything holding pool_a/pool_b, the index tables, rank,
    d_in and d_out (SharedPools, or its gathered copy under FSDP2): (r, d_in) and (d_out, r)."""
    a = pools.pool_a.index_select(0, pools.index_a[position].long()).reshape(pools.rank, pools.d_in)
    bt = pools.pool_b.index_select(0, pools.index_b[position].long()).reshape(pools.rank, pools.d_out)
    return a, bt.T
