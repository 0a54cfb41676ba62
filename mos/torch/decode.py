"""The inference path of an adapted layer: a few decode rows go straight to the core, more rows use
each active adapter's A and B assembled once, then two GEMMs per call.

At decode a call moves a few kilobytes, so its cost is all per-call overhead. The training op
(ops.adapter_linear) pays for autograd, a copy of the base output, six DLPack handles and the
core's argument checks on every call (about 79 us per layer call on SmolLM2-135M against PEFT
LoRA's 58 us). Without autograd, the same product is `base + x @ A^T @ (s B^T)` over A (r, d_in)
and s B^T (r, d_out) gathered from the pools: one mm and one in-place addmm, fewer torch ops than
PEFT's LoRA (two Linear modules, a scale and an add).

Up to 4 rows on CPU (decode), the core's direct kernel is cheaper still: it reads each shard
straight from the pools and adds into the base output in place (core_bridge.linear_forward, no
clone, no autograd), so nothing is cached and nothing can be stale. More rows, other devices and
dtype mixes take the cached assembly below.

When it runs: grad mode is off (generate, torch.no_grad, inference_mode), the adapter's dropout is
inactive, and the pools are plain tensors (not FSDP2-sharded); not while torch.compile traces.
Everything else takes the training op. Outputs equal it up to float rounding.

Staleness: an entry is keyed on the identity, storage address and version counter of both pools
and both index tables, on the layer position, the scale, and the device and dtype asked for.
Every in-place write through the tensor (an optimizer step, load_state_dict, copy_, a pool
restored in place) bumps the version counter; .to() and load_adapter make new tensors; a key that
differs rebuilds the entry. (A write through `.data` bypasses torch's version counter, as it does
for autograd's own checks; write through the tensor under torch.no_grad() instead.)

Memory: nothing for the direct core calls (decode on CPU). Otherwise (prefill, batches over 4
rows, CUDA) one entry per (layer, active adapter): r * (d_in + d_out) elements of the pools' dtype,
what a LoRA of the same forward rank stores (SmolLM2-135M, all linear layers, r = 8: 2.44 M
floats, 9.3 MiB). Entries of adapters that are no longer active are dropped at the layer's next
call and when set_adapter or delete_adapter changes the layers' active adapters
(MoSLinear.drop_decode_cache).

Threads: an entry is an immutable tuple, stored and read with single dict operations, so
threads decoding at once see a complete entry or none (two may build the same entry; one wins).

CUDA: the entry lives on the call's device, and a call is two kernels with no host sync and no
allocation besides h; it is capturable in a CUDA graph once the entry exists (warm up first, as
the graph notes in docs/serving.md ask).
"""
from __future__ import annotations

import torch
from torch import nn

from .core_bridge import core_supports, linear_forward

__all__ = ["decode_applies", "add_decode_update", "entry_elements", "DIRECT_ROWS"]

DIRECT_ROWS = 4  # the core's direct (no-assembly) path: MOS_DIRECT_MAX_ROWS in csrc

_PLAIN = (nn.Parameter, torch.Tensor)


def decode_applies(layer, name: str, x: torch.Tensor) -> bool:
    """True when this call may take the inference path (see the module notes)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    dropout = layer.lora_dropout[name]
    if dropout.training and not isinstance(dropout, nn.Identity):
        return False
    pools = layer._slots[name].pools
    return type(pools.pool_a) in _PLAIN and type(pools.pool_b) in _PLAIN


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


def add_decode_update(layer, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """result + s (x A^T) B^T for adapter `name`, from the layer's cached A^T and s B^T."""
    slot = layer._slots[name]
    pools = slot.pools
    dtype = pools.pool_a.dtype
    if (x.device.type == "cpu" and x.dtype == dtype and result.dtype == dtype and result.is_contiguous()
            and x.numel() <= DIRECT_ROWS * x.shape[-1] and core_supports(x)):
        x2 = x.reshape(-1, x.shape[-1])
        index_a, index_b = slot.index_rows()
        linear_forward(result.view(-1, result.shape[-1]), x2 if x2.is_contiguous() else x2.contiguous(),
                       pools.pool_a, index_a, pools.pool_b, index_b, slot.scaling, None, pools.rank)
        return result
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
