"""One mixed-adapter forward (adapter_names=): per-call state, never shared between calls.

A forward with adapter_names runs every adapted layer once for the whole batch: the base layer,
then one batched call in which each row reads its own adapter's shards (decode, or short rows per
sample) or rows of one sample share one gathered A and B (prefill). Inference only.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from . import core_bridge
from .call_context import running
from .layer import MoSLinear
from .names import BASE_ADAPTER
from .ops import adapter_linear
from .store import Packing

__all__ = ["MixedBatch", "mixed_batch", "plan_rows"]

# Rows per sample above which one sample's rows share one assembly (prefill); at or below it every
# row reads its shards directly (decode). Matches the C core's own cut-over.
_GROUPED_MIN_ROWS = 4


def plan_rows(sample_slots, rows_per_sample: int, device):
    """(ids, segments, grouped) of a batched call over samples that hold rows_per_sample rows each.

    Grouped (one assembly per group) when samples are long (prefill: each sample's rows are one
    segment, adjacent samples of one adapter merged); on CPU also whenever an adapter has several
    rows (the core then groups rows by adapter itself); otherwise per-row (decode)."""
    device = torch.device(device)
    slots = np.asarray(sample_slots, dtype=np.int32)
    ids = slots if rows_per_sample == 1 else np.repeat(slots, rows_per_sample)
    segments, grouped = None, False
    if rows_per_sample > _GROUPED_MIN_ROWS:
        from ..functional import segments_of

        grouped = True
        segments = torch.from_numpy(segments_of(ids))
    elif device.type == "cpu":
        # Grouping by adapter keeps an adapter's shards in cache across its rows (and gives groups
        # of more than four rows one assembly and two GEMMs); it only costs when no adapter repeats.
        active = int(np.count_nonzero(slots >= 0)) * rows_per_sample
        grouped = active > 1 and (rows_per_sample > 1 or active > len(set(slots[slots >= 0].tolist())))
    ids = torch.from_numpy(ids)
    if device.type != "cpu":
        ids = ids.to(device)
        segments = None if segments is None else segments.to(device)
    return ids, segments, grouped


class MixedBatch:
    """Per-call state of a mixed-adapter forward: the store's packing it runs with, each sample's
    adapter name and slot, expanded to rows per shape. It travels in a context variable, never on
    the layers, so concurrent calls on one model each see their own."""

    def __init__(self, packing: Packing, adapter_names: list):
        self.packing = packing
        self.adapter_names = tuple(adapter_names)
        self.sample_slots = np.asarray([packing.slot(name) for name in adapter_names], dtype=np.int32)
        self._rows = {}  # (rows, device) -> what rows() returns

    def serves(self, module) -> bool:
        """Whether `module` (a MoSLinear or a ModulesToSaveWrapper) belongs to the model this batch
        runs (not, say, to a draft model)."""
        return module in self.packing.all_layers or module in self.packing.wrappers

    def rows_per_sample(self, n_rows: int) -> int:
        """How many rows each sample owns when a layer sees n_rows. HF expands beams and returned
        sequences sample by sample, keeping rows sample-major."""
        n_samples = len(self.sample_slots)
        if n_rows % n_samples:
            raise ValueError(f"adapter_names has {n_samples} entries but a layer sees {n_rows} "
                             f"rows, not a multiple: pass one adapter name per sample of the batch")
        return n_rows // n_samples

    def rows(self, n_rows: int, device):
        """(ids, grouped, handle of ids, handle of segments) of a layer that sees n_rows rows on
        `device`, planned once per call and shape."""
        key = (n_rows, str(device))
        cached = self._rows.get(key)
        if cached is None:
            ids, segments, grouped = plan_rows(self.sample_slots, self.rows_per_sample(n_rows), device)
            cached = (ids, grouped, core_bridge.handle(ids), core_bridge.handle(segments))
            self._rows[key] = cached
        return cached

    def forward(self, layer: MoSLinear, x, *args, **kwargs):
        """The base layer, then one batched core call per bank adding each row's own adapter."""
        result = layer.base_layer(x, *args, **kwargs)
        packs = self.packing.layers.get(layer, [])
        if not packs:
            return result
        d_in = x.shape[-1]
        x2 = x.reshape(-1, d_in)
        ids, grouped, ids_handle, segments_handle = self.rows(x2.shape[0], x.device)
        pool_dtype = packs[0].pack.pool_a.dtype
        if packs[0].pack.pool_a.device != x.device:
            raise ValueError(f"{layer.module_type}: the pools are on {packs[0].pack.pool_a.device} but "
                             f"the layer input is on {x.device}; mixed-adapter batches need the adapters "
                             f"on the layer's device")
        adapter_in = x2 if x2.dtype == pool_dtype else x2.to(pool_dtype)
        if not core_bridge.core_supports(adapter_in):
            return self._fallback(layer, x, result, ids)
        adapter_in = adapter_in if adapter_in.stride(-1) == 1 else adapter_in.contiguous()
        out2 = result.reshape(-1, result.shape[-1])
        same = out2.dtype == pool_dtype and out2.data_ptr() == result.data_ptr()
        update = out2 if same else adapter_in.new_zeros((x2.shape[0], out2.shape[1]))
        for layer_pack in packs:  # one bank per shards-per-vector value; usually one
            pool_a, index_a, pool_b, index_b, scales, ranks = layer_pack.exported()
            core_bridge.batched_forward(update, adapter_in, pool_a, index_a, pool_b, index_b, scales,
                                        ids_handle, ranks=ranks, grouped=grouped, segments=segments_handle,
                                        max_rank=layer_pack.pack.max_rank)
        if same:
            return result
        return result + update.reshape(result.shape).to(result.dtype)

    def _fallback(self, layer, x, result, ids):
        """Devices or dtypes the core does not run (e.g. 16-bit pools on CPU): one adapter_linear
        call per adapter present in the batch."""
        ids = ids.cpu().numpy()
        x2 = x.reshape(-1, x.shape[-1])
        out = result.reshape(-1, result.shape[-1]).clone()
        names = self.packing.names
        for slot in np.unique(ids[ids >= 0]):
            name = names[slot]
            if name not in layer.adapter_names:
                continue
            rows = torch.from_numpy(np.flatnonzero(ids == slot)).to(x.device)
            info = layer.slot(name)
            pools = info.pools
            sub = x2.index_select(0, rows).to(pools.pool_a.dtype)
            upd = adapter_linear(sub, pools.pool_a, pools.index_a[info.position], pools.pool_b,
                                 pools.index_b[info.position], info.scaling)
            out.index_add_(0, rows, upd.to(out.dtype))
        return out.reshape(result.shape)


_INPUT_KEYS = ("input_ids", "inputs_embeds", "inputs", "hidden_states", "x", "pixel_values",
               "input_values", "input_features", "decoder_input_ids")


def _batch_size(args, kwargs):
    """The batch size of a call: its input's first dimension (a known input keyword, else the first
    positional tensor, else the largest first dimension among keyword tensors of 2+ dimensions;
    one-dimensional ones such as cache_position are not per sample)."""
    for key in _INPUT_KEYS:
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    for value in args:
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    sizes = [v.shape[0] for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() >= 2]
    if not sizes:
        raise ValueError(f"adapter_names: cannot tell the batch size of this call (no input tensor among "
                         f"{sorted(kwargs)}); pass the input positionally or as one of {list(_INPUT_KEYS)}")
    return max(sizes)


@contextmanager
def mixed_batch(model, adapter_names, args=(), kwargs=None):
    """Inside the block, every MoSLinear and modules_to_save wrapper of `model` runs sample i with
    adapter adapter_names[i] ("__base__": the base model alone). Raises ValueError for training mode, merged or disabled
    adapters, unknown names and a batch whose size differs from len(adapter_names)."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(f"adapter_names must be a list with one adapter name per sample, got "
                        f"{type(adapter_names).__name__}")
    if not adapter_names:
        raise ValueError("adapter_names is empty; pass one adapter name per sample")
    for name in adapter_names:
        if not isinstance(name, str):
            raise TypeError(f"adapter_names must hold strings, got {name!r}")
    if model.training:
        raise ValueError("adapter_names (mixed-adapter batches) is inference-only; call model.eval() first")
    core_bridge.refuse_capture("a mixed-adapter batch (adapter_names=)")
    with model.adapter_store.request() as packing:
        layers = packing.all_layers
        merged = sorted({n for layer in layers for n in layer.merged_adapters})
        if merged:
            raise ValueError(f"adapter(s) {merged} are merged into the base weights, which would apply "
                             f"them to every sample; call unmerge_adapter() before passing adapter_names")
        if any(layer.disable_adapters for layer in layers):
            raise ValueError("adapter_names cannot be used inside disable_adapter(); pass "
                             f"{BASE_ADAPTER!r} for samples that should run the base model alone")
        batch = _batch_size(args, kwargs or {})
        if batch != len(adapter_names):
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {batch} "
                             f"samples; pass one adapter name per sample")
        state = MixedBatch(packing, adapter_names)
        with running(state), torch.no_grad():
            yield state
