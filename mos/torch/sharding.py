"""Adapters under FSDP2 (`torch.distributed.fsdp.fully_shard`): gathering what the adapter files
hold (save_pretrained and export_lora), the sharded pools and any sharded modules_to_save copy or
trained bias, so that rank 0 writes whole tensors.

The pools live on the MoSModel, not in any decoder layer, so `fully_shard(layer)` per layer
leaves them to the root's `fully_shard(model)`: each pool is sharded once (rows split across
ranks), all-gathered with the root's group before the first layer runs and reduce-scattered once
after the backward (see docs/distributed.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .pools import assemble_layer

__all__ = ["GatheredPools", "gather_pools", "gather_tensors", "is_sharded", "is_writer", "barrier"]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_sharded(tensor) -> bool:
    """True for a DTensor (a parameter fully_shard has distributed)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def _full(tensor):
    return tensor.full_tensor() if is_sharded(tensor) else tensor


@dataclass
class GatheredPools:
    """What the adapter file writers read of a SharedPools, with every tensor whole."""
    pool_a: torch.Tensor
    pool_b: torch.Tensor
    index_a: torch.Tensor
    index_b: torch.Tensor
    d_in: int
    d_out: int
    rank: int

    def assembled(self, position: int):
        """(A, B) of the layer at `position`: (r, d_in) and (d_out, r), as SharedPools.assembled."""
        return assemble_layer(self, position)


def gather_pools(pools: dict) -> tuple[dict, bool]:
    """({type: SharedPools or GatheredPools}, whether anything was sharded). Sharded pools are
    all-gathered: a collective, so every rank of the group must call this together."""
    gathered, sharded = {}, False
    for module_type, shared in pools.items():
        if not any(is_sharded(t) for t in (shared.pool_a, shared.pool_b, shared.index_a, shared.index_b)):
            gathered[module_type] = shared
            continue
        sharded = True
        with torch.no_grad():
            gathered[module_type] = GatheredPools(_full(shared.pool_a), _full(shared.pool_b),
                                                  _full(shared.index_a), _full(shared.index_b),
                                                  shared.d_in, shared.d_out, shared.rank)
    return gathered, sharded


def gather_tensors(tensors: dict) -> tuple[dict, bool]:
    """({key: whole tensor on the CPU}, whether any was sharded). Each DTensor (a parameter of a
    module fully_shard distributed: a modules_to_save copy or a bias inside a decoder layer) is
    all-gathered where it lives, before it moves to the CPU (NCCL gathers device tensors only):
    a collective, so every rank of the group must call this together, with the same keys."""
    with torch.no_grad():
        whole = {key: _full(value).detach().to("cpu").contiguous() for key, value in tensors.items()}
    return whole, any(is_sharded(value) for value in tensors.values())


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_writer() -> bool:
    """True on the process that writes shared files: rank 0, or the only process."""
    return not _distributed() or torch.distributed.get_rank() == 0


def barrier() -> None:
    """Waits for every rank (no-op outside a process group)."""
    if _distributed():
        torch.distributed.barrier()
