"""MoSLinear: an nn.Linear with MoS adapters whose A and B come from shared pools."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base_layers import dense_weight, features, is_adaptable, is_conv1d, quantization, write_dense_weight
from .call_context import current_batch
from .decode import inference_update
from .ops import adapter_linear, linear_with_adapter, linear_with_adapter_applies
from .pool_grads import tap
from .pools import SharedPools

__all__ = ["MoSLinear"]


@dataclass
class _AdapterSlot:
    """What one adapter needs in one layer: its type's pools, this layer's position among the
    layers sharing them (its row of the index tables, and its private segment), and the scale."""
    pools: SharedPools
    position: int
    scaling: float
    rows: tuple = ()  # cached (index_a, index_b, this layer's row of each); rebuilt when buffers change

    def index_rows(self):
        """This layer's rows of the index tables, as views cached across calls (saves two
        indexing ops per forward; rebuilt when .to() or a load replaces the table buffers)."""
        _, index_a, _, index_b = self.pools.tensors()
        if torch.compiler.is_compiling():
            return index_a[self.position], index_b[self.position]
        rows = self.rows
        if not rows or rows[0] is not index_a or rows[1] is not index_b:
            rows = self.rows = (index_a, index_b, index_a[self.position], index_b[self.position])
        return rows[2], rows[3]


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling `module` would run hooks (its own or global ones) that a fused op would skip."""
    hooks = nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or hooks._global_forward_hooks
                or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                or hooks._global_backward_pre_hooks)


class MoSLinear(nn.Module):
    """y = base_layer(x) + s * (dropout(x) A_k^T) B_k^T for each active adapter.

    The base layer is an nn.Linear, GPT-2's Conv1D (weight stored (d_in, d_out): fan_in_fan_out)
    or a bitsandbytes Linear4bit / Linear8bitLt; merge writes through base_layers, which
    transposes or dequantizes and requantizes as the layout needs.

    The wrapped layer stays as `base_layer`. Pools belong to the MoSModel; this layer keeps plain
    references (never registered here), so shared pools are stored once. Pools may be float32
    while the base is bf16/fp16: the adapter input is cast to the pools' dtype and the adapter's
    output back to the base output's dtype."""

    def __init__(self, base_layer: nn.Module, module_type: str):
        super().__init__()
        if not is_adaptable(base_layer):
            raise TypeError(f"MoSLinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.module_type = module_type
        self.lora_dropout = nn.ModuleDict()
        self._active_adapter = None
        self.disable_adapters = False
        self.merged_adapters = []
        self._slots = {}  # adapter name -> _AdapterSlot; a plain dict so nothing is registered twice
        self._decode_cache = {}  # adapter name -> (key, A^T, s B^T) of active adapters (decode.py)

    # ------------------------------------------------------------------ passthrough
    @property
    def in_features(self) -> int:
        return features(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return features(self.base_layer)[1]

    @property
    def fan_in_fan_out(self) -> bool:
        """True when the base weight is stored (d_in, d_out), as GPT-2's Conv1D (PEFT's flag)."""
        return is_conv1d(self.base_layer)

    @property
    def active_adapter(self):
        return self._active_adapter

    @active_adapter.setter
    def active_adapter(self, value):
        self._active_adapter = value
        self.drop_decode_cache(keep=self.active_adapters)

    def drop_decode_cache(self, keep=()):
        """Drops the inference path's assembled A/B of every adapter not in `keep`."""
        cache = getattr(self, "_decode_cache", None)
        if cache:
            for name in [n for n in list(cache) if n not in keep]:
                cache.pop(name, None)

    @property
    def active_adapters(self) -> list:
        """The adapters that run: active_adapter is None, one name, or a list of names."""
        active = self.active_adapter
        return [] if active is None else [active] if isinstance(active, str) else list(active)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapter_names(self) -> list:
        return list(self._slots)

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, pools: SharedPools, position: int, scaling: float, dropout: float):
        if (pools.d_in, pools.d_out) != (self.in_features, self.out_features):
            raise ValueError(f"{name}: pools are for ({pools.d_in} -> {pools.d_out}), the layer is "
                             f"({self.in_features} -> {self.out_features})")
        self._slots[name] = _AdapterSlot(pools, int(position), float(scaling))
        self.drop_decode_cache(keep=[n for n in self.active_adapters if n != name])
        dropout_module = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.lora_dropout[name] = dropout_module.train(self.training)  # follow the model's mode

    def remove_adapter(self, name: str):
        if name in self.merged_adapters:
            self.unmerge(adapter_names=[name])
        self._slots.pop(name, None)
        self.drop_decode_cache(keep=[n for n in self.active_adapters if n != name])
        if name in self.lora_dropout:
            del self.lora_dropout[name]
        if name in self.active_adapters:
            remaining = [n for n in self.active_adapters if n != name]
            self.active_adapter = remaining[0] if len(remaining) == 1 else (remaining or None)

    def slot(self, name: str) -> _AdapterSlot:
        return self._slots[name]

    def lora_weights(self, name: str):
        """(A_k, B_k) of adapter `name` in this layer: (r, d_in) and (d_out, r)."""
        slot = self._slots[name]
        return slot.pools.assembled(slot.position)

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """s * B_k A_k, (d_out, d_in), in float32 (float64 for float64 pools)."""
        a, b = self.lora_weights(name)
        acc = torch.promote_types(a.dtype, torch.float32)
        return (b.to(acc) @ a.to(acc)) * self._slots[name].scaling

    # ------------------------------------------------------------------ forward
    def forward(self, x, *args, adapter_names=None, **kwargs):
        # Decision table:
        #   adapters disabled               -> base layer only (unmerging first if merged)
        #   training, one active adapter    -> base product and update as one op (ops.linear_with_adapter)
        #     over a frozen nn.Linear on CPU     when nothing would change by it (_with_base)
        #   otherwise                       -> base layer + the update of each active adapter that is
        #                                      neither merged (already in the weight) nor absent here;
        #                                      without autograd through decode.py
        #   inside a mixed-adapter batch    -> base layer + each sample's own adapter (mixed_batch.py)
        # A mixed batch: MoSModel.forward/generate(adapter_names=[...]) enters mixed_batch.mixed_batch(),
        # which puts a MixedBatch for this call in call_context; it runs this layer for every sample.
        batch = current_batch(self)
        if batch is not None:
            return batch.forward(self, x, *args, **kwargs)
        if adapter_names is not None:
            raise NotImplementedError("a single MoSLinear does not take adapter_names; pass them to the "
                                      "MoSModel (model(..., adapter_names=[...]) or model.generate(...)), "
                                      "which runs every adapted layer for the whole batch")
        if self.disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if torch.is_grad_enabled() and not (args or kwargs):
            result = self._with_base(x)
            if result is not None:
                return result
        # self.base_layer, read from the module dict: nn.Module.__getattr__ costs ~1.5 us, which
        # counts at decode, where the whole adapter's part of a call is ~20 us.
        result = self._modules["base_layer"](x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self._slots and name not in self.merged_adapters:
                result = self._add_update(result, x, name)
        return result

    def _with_base(self, x):
        """Training: a frozen nn.Linear base and the one active adapter as one op
        (ops.linear_with_adapter), or None when this call takes the base layer and the separate op."""
        active = self.active_adapters
        if len(active) != 1 or self.merged_adapters:
            return None
        name = active[0]
        slot = self._slots.get(name)
        base = self._modules["base_layer"]
        if slot is None or type(base) is not nn.Linear or _has_hooks(base):
            return None
        if self.dropout_active(name):  # the adapter's input is not x
            return None
        pool_a, _, pool_b, _ = slot.pools.tensors()
        weight, bias = base._parameters["weight"], base._parameters["bias"]
        if not linear_with_adapter_applies(x, weight, bias, pool_a, pool_b):
            return None
        index_a, index_b = slot.index_rows()
        return linear_with_adapter(x, weight, bias, pool_a, index_a, pool_b, index_b, slot.scaling,
                                   tap=tap(slot.pools, pool_a, pool_b, x.device))

    def dropout_active(self, name: str) -> bool:
        """Whether adapter `name`'s dropout changes its input on this call. Read from the module
        dicts (self.lora_dropout[name]): nn.Module.__getattr__ costs ~1.5 us a name on the hot path."""
        dropout = self._modules["lora_dropout"]._modules[name]
        return dropout.training and type(dropout) is not nn.Identity

    def _add_update(self, result, x, name):
        if not torch.is_grad_enabled():  # no autograd: the inference path (decode.py)
            updated = inference_update(self, name, result, x)
            if updated is not None:
                return updated
        slot = self._slots[name]
        pools = slot.pools
        pool_a, pool_b = pools.pool_a, pools.pool_b
        index_a, index_b = slot.index_rows()
        # One gradient buffer per pool for the model call (pool_grads.py); not for pools on another
        # device, nor while torch.compile traces (it cannot trace the context variable).
        pool_tap = None if torch.compiler.is_compiling() else tap(pools, pool_a, pool_b, x.device)
        if pool_a.device != x.device:  # layers spread over devices by a device map share one pool
            pool_a, pool_b = pool_a.to(x.device), pool_b.to(x.device)
            index_a, index_b = index_a.to(x.device), index_b.to(x.device)
        adapter_in = self.lora_dropout[name](x)
        if adapter_in.dtype != pool_a.dtype:
            adapter_in = adapter_in.to(pool_a.dtype)
        if result.dtype == pool_a.dtype:
            # Same dtype: the op accumulates into a copy of the base output, saving one pass.
            return adapter_linear(adapter_in, pool_a, index_a, pool_b, index_b, slot.scaling, base=result,
                                  tap=pool_tap)
        update = adapter_linear(adapter_in, pool_a, index_a, pool_b, index_b, slot.scaling, tap=pool_tap)
        return result + update.to(result.dtype)

    # ------------------------------------------------------------------ merge
    def _merge_names(self, adapter_names):
        if adapter_names is None:
            adapter_names = self.active_adapters
        return [n for n in adapter_names if n in self._slots]

    @torch.no_grad()
    def merged_weight(self, names) -> torch.Tensor:
        """W0 + sum of the adapters' s B A as (d_out, d_in), computed in float32 (or wider);
        W0 is dequantized first for a bitsandbytes base."""
        merged = dense_weight(self.base_layer)
        for name in names:
            merged += self.get_delta_weight(name).to(device=merged.device, dtype=merged.dtype)
        return merged

    @torch.no_grad()
    def check_merge(self, adapter_names=None):
        """Raises ValueError when merging would put NaN/inf into the weight (nothing is written)."""
        names = [n for n in self._merge_names(adapter_names) if n not in self.merged_adapters]
        if names and not torch.isfinite(self.merged_weight(names)).all():
            raise ValueError(f"merging adapter(s) {names} into {self.module_type} gives NaN/inf weights; "
                             f"the adapter is broken")

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names=None):
        """Adds s * B_k A_k of each adapter into base_layer.weight (the active one by default)."""
        names = [n for n in self._merge_names(adapter_names) if n not in self.merged_adapters]
        if not names:
            return
        merged = self.merged_weight(names)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"merging adapter(s) {names} into {self.module_type} gives NaN/inf weights; "
                             f"the adapter is broken")
        write_dense_weight(self.base_layer, merged)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self, adapter_names=None):
        """Subtracts merged adapters again (all of them by default), last merged first."""
        names = list(self.merged_adapters) if adapter_names is None else \
            [n for n in self.merged_adapters if n in adapter_names]
        if not names:
            return
        restored = dense_weight(self.base_layer)
        for name in reversed(names):
            restored -= self.get_delta_weight(name).to(device=restored.device, dtype=restored.dtype)
            self.merged_adapters.remove(name)
        write_dense_weight(self.base_layer, restored)  # once, so a quantized base rounds once

    def extra_repr(self) -> str:
        quantized = quantization(self.base_layer)
        return (f"module_type={self.module_type!r}, adapters={self.adapter_names}, active={self.active_adapter!r}"
                + (f", base={quantized}" if quantized else ""))
