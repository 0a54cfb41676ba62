"""The inference path of an adapted layer: the adapter's update without autograd.

At decode a call moves a few kilobytes, so its cost is all per-call overhead. The training op
(ops.adapter_linear) pays for autograd, a copy of the base output and the Python around them on
every call. Without autograd none of that is needed:

  * CPU, the base output in the pools' dtype (float32/float64): one core call adds
    s (x A^T) B^T into the base layer's fresh output in place, reading each shard straight from the
    pools (core_bridge.add_update). Nothing is cached, so nothing can be stale, and no memory is
    kept. The core picks its own kernel by the row count (direct for decode rows, assembled for a
    prompt), single-threaded next to torch's pool.
  * Everything else (CUDA, other devices, a base in another dtype than the pools): each active
    adapter's A^T (d_in, r) and s B^T (r, d_out) are assembled once and cached on the layer, then a
    call is one mm and one in-place addmm.

When it runs: grad mode is off (generate, torch.no_grad, inference_mode), the adapter's dropout is
inactive, and the pools are plain tensors (not FSDP2-sharded); not while torch.compile traces.
Everything else takes the training op. Outputs equal it up to float rounding.

Staleness of the cache: an entry is keyed on the identity, storage address and version counter of
both pools and both index tables, on the layer position, the scale, and the device and dtype asked
for. Every in-place write through the tensor (an optimizer step, load_state_dict, copy_, a pool
restored in place) bumps the version counter; .to() and load_adapter make new tensors; a key that
differs rebuilds the entry. (A write through `.data` bypasses torch's version counter, as it does
for autograd's own checks; write through the tensor under torch.no_grad() instead.)

Memory: nothing on the CPU path. Otherwise one entry per (layer, active adapter):
r * (d_in + d_out) elements of the pools' dtype, what a LoRA of the same forward rank stores
(SmolLM2-135M, all linear layers, r = 8: 2.44 M elements). Entries of adapters that are no longer
active are dropped at the layer's next call and when set_adapter or delete_adapter changes the
layers' active adapters (MoSLinear.drop_decode_cache).

Threads: the CPU path shares nothing between calls. A cache entry is an immutable tuple, stored and
read with single dict operations, so threads decoding at once see a complete entry or none (two
may build the same entry; one wins).

CUDA: the entry lives on the call's device, and a call is two kernels with no host sync and no
allocation besides h; it is capturable in a CUDA graph once the entry exists (warm up first, as
the graph notes in docs/serving.md ask).
"""
from __future__ import annotations

import torch
from torch import nn

from .core_bridge import CORE_DTYPES, add_update

__all__ = ["inference_update", "entry_elements"]

_PLAIN = (nn.Parameter, torch.Tensor)
_CPU_DTYPES = CORE_DTYPES["cpu"]


def inference_update(layer, name: str, result: torch.Tensor, x: torch.Tensor):
    """result with adapter `name`'s update added, without autograd (in place when it can), or None
    when this call must take the training op. The caller checked that grad mode is off."""
    if torch.compiler.is_compiling():
        return None
    if layer.dropout_active(name):
        return None
    slot = layer._slots[name]
    pool_a, _, pool_b, _ = slot.pools.tensors()
    if type(pool_a) not in _PLAIN or type(pool_b) not in _PLAIN:
        return None
    dtype = pool_a.dtype
    if (x.is_cpu and pool_a.is_cpu and dtype in _CPU_DTYPES and x.dtype is dtype and result.dtype is dtype
            and result.is_contiguous()):
        index_a, index_b = slot.index_rows()
        add_update(result, x if x.is_contiguous() else x.contiguous(), pool_a, index_a, pool_b, index_b,
                   slot.scaling)
        return result
    return _cached_update(layer, slot, name, result, x)


def _key(slot, device, dtype):
    pools = slot.pools
    key = [slot.position, slot.scaling, device, dtype]
    for t in (pools.pool_a, pools.pool_b, pools.index_a, pools.index_b):
        key += (id(t), t.data_ptr(), t._version)
    return tuple(key)


def _build(slot, device, dtype):
    """(A^T (d_in, r), s B^T (r, d_out)) of this layer, on `device` in `dtype`."""
    pools = slot.pools
    a = pools.pool_a.detach().index_select(0, slot.index_rows()[0].long()).reshape(pools.rank, pools.d_in)
    bt = pools.pool_b.detach().index_select(0, slot.index_rows()[1].long()).reshape(pools.rank, pools.d_out)
    a_t = a.to(device=device, dtype=dtype).t().contiguous()
    bt = (bt.to(device=device, dtype=dtype) * slot.scaling).contiguous()  # the scale folded in
    return a_t, bt


def _cached_update(layer, slot, name: str, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """result + s (x A^T) B^T for adapter `name`, from the layer's cached A^T and s B^T."""
    dtype = slot.pools.pool_a.dtype
    cache = layer._decode_cache
    key = _key(slot, x.device, dtype)
    entry = cache.get(name)
    if entry is None or entry[0] != key:
        entry = (key, *_build(slot, x.device, dtype))
        cache[name] = entry
        if len(cache) > 1:  # keep only adapters that are active here
            active = layer.active_adapters
            for other in [n for n in list(cache) if n not in active and n != name]:
                cache.pop(other, None)
    _, a_t, bt = entry
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != dtype:
        x2 = x2.to(dtype)
    h = torch.mm(x2, a_t)
    if result.dtype == dtype:
        if result.is_contiguous():  # the base layer's fresh output: accumulate into it
            result.view(-1, result.shape[-1]).addmm_(h, bt)
            return result
        return torch.addmm(result.reshape(-1, result.shape[-1]), h, bt).reshape(result.shape)
    return result + torch.mm(h, bt).reshape(result.shape).to(result.dtype)


def entry_elements(layer) -> int:
    """Elements the layer's decode cache holds now (for the memory statement and its test)."""
    return sum(entry[1].numel() + entry[2].numel() for entry in list(layer._decode_cache.values()))
