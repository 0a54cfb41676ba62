"""The adapter store: every adapter of a MoSModel packed for mixed-adapter batches; long-lived.

Layout (what the C core's batched forward takes, mos.h "serving"): per module type, the pools of
every adapter that targets it are concatenated into one A-pool and one B-pool; each adapter's own
pool parameters are then re-pointed at their slice, so the store holds one copy of every pool,
never a per-layer A or B. Adapters of one type with different shards per vector l go to separate
banks (one concatenation and one batched call per l), so loading an adapter never changes how
another one is computed. Per layer and bank, the store keeps (K, max_rank * l) index tables
already offset into the concatenated pools, every adapter's rank there (0 when the adapter is in
another bank or does not adapt that layer) and one scale per adapter: a few hundred bytes per
adapter and layer.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from . import files
from .layer import MoSLinear
from .names import BASE_ADAPTER
from .core_bridge import handle
from .rwlock import ReadWriteLock
from .saved_modules import saved_wrappers

__all__ = ["AdapterStore"]


@dataclass
class _TypePack:
    """One bank: the concatenated pools of every adapter of one module type with l shards per vector."""
    module_type: str
    pool_a: torch.Tensor   # (rows, d_in / l)
    pool_b: torch.Tensor   # (rows, d_out / l)
    shards_per_vector: int  # l
    max_rank: int
    offsets: dict          # adapter name -> (first row of its A slice, of its B slice)
    scales: torch.Tensor   # (K,) one per adapter slot (0 where the adapter is absent)


@dataclass
class _LayerPack:
    """One adapted layer in one bank: the bank's pools and the layer's (K, max_rank * l) tables."""
    pack: _TypePack
    index_a: torch.Tensor
    index_b: torch.Tensor
    ranks: torch.Tensor    # (K,) int32, 0 for adapters that do not adapt this layer

    handles: tuple = None  # what mos._C receives, made on first use: pools, tables, scales, ranks

    def exported(self) -> tuple:
        if self.handles is None:
            self.handles = tuple(handle(t) for t in (self.pack.pool_a, self.index_a, self.pack.pool_b,
                                                      self.index_b, self.pack.scales, self.ranks))
        return self.handles


@dataclass(frozen=True)
class Packing:
    """One consistent state of the store; a request sees the one it started with to its end."""
    names: tuple = ()         # slot k -> adapter name
    slots: dict = None        # adapter name -> slot
    types: dict = None        # (module type, l) -> _TypePack
    layers: dict = None       # MoSLinear -> [_LayerPack, one per bank serving it]
    all_layers: frozenset = frozenset()  # every MoSLinear of the model
    wrappers: frozenset = frozenset()    # every ModulesToSaveWrapper of the model
    fingerprint: tuple = None

    def slot(self, name: str) -> int:
        if name == BASE_ADAPTER:
            return -1
        try:
            return self.slots[name]
        except KeyError:
            raise ValueError(f"unknown adapter {name!r}; loaded adapters: {sorted(self.slots)} "
                             f"(or {BASE_ADAPTER!r} for the base model alone)") from None


class AdapterStore:
    """Every adapter of a MoSModel, packed for mixed-adapter batches (see the module docstring).

    The store follows the model: adapters added, loaded or deleted on the model are picked up at the
    next mixed batch (or refresh()); load()/unload() add and remove adapters through files.

    Threads: any number of mixed batches may run at once, each on its own thread; load(), unload()
    and repacks wait for the batches in flight and hold back new ones, so a request sees one
    consistent set of adapters from its first layer to its last. Change adapters while serving
    through the store, not through the model's add_adapter/delete_adapter, which take no lock."""

    def __init__(self, model):
        self.model = model
        self._lock = ReadWriteLock()
        self._packing = Packing(slots={}, types={}, layers={})

    # The current packing's parts, for inspection.
    _names = property(lambda self: list(self._packing.names))
    _slots = property(lambda self: self._packing.slots)
    _types = property(lambda self: self._packing.types)
    _layers = property(lambda self: self._packing.layers)
    _all_layers = property(lambda self: list(self._packing.all_layers))

    # ------------------------------------------------------------------ adapters
    @property
    def adapter_names(self) -> list:
        return list(self._synced().names)

    def slot(self, name: str, sync: bool = True) -> int:
        """The id rows of adapter `name` carry in the batched call (-1 for "__base__")."""
        return (self._synced() if sync else self._packing).slot(name)

    def load(self, directory: str, adapter_name: str) -> None:
        """Loads the adapter saved in `directory` (save_pretrained) next to the others. Refuses, and
        changes nothing, when its target modules, shapes, dtype or config do not fit."""
        if adapter_name == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is reserved for rows that run the base model alone")
        saved = files.read_adapter(directory)
        with self._lock.write():
            self._sync_locked()
            for other in self._packing.names:
                # What the pools hold, not the config: model.to(dtype) casts pools, not configs.
                shared = next(iter(self.model.mos_pools[other].values()))
                other_dtype = str(shared.pool_a.dtype).removeprefix("torch.")
                if saved.config.pool_dtype != other_dtype:
                    raise ValueError(f"{os.path.join(directory, files.CONFIG_NAME)}: pool_dtype "
                                     f"{saved.config.pool_dtype!r} differs from the store's {other_dtype!r} "
                                     f"(adapter {other!r}); adapters served together share one pool dtype")
                break
            self.model.load_adapter(directory, adapter_name)
            try:
                self._repack()
            except Exception:
                self.model.delete_adapter(adapter_name)
                self._repack()
                raise

    def unload(self, adapter_name: str, save_directory: str | None = None) -> None:
        """Removes an adapter (after writing it to `save_directory` when given); the others keep
        their values and outputs."""
        with self._lock.write():
            if adapter_name not in self.model.peft_config:
                raise ValueError(f"unknown adapter {adapter_name!r}; loaded adapters: "
                                 f"{sorted(self.model.peft_config)}")
            if save_directory is not None:
                self._save(adapter_name, save_directory)
            self.model.delete_adapter(adapter_name)
            self._repack()

    def save(self, adapter_name: str, directory: str) -> None:
        """Writes one adapter to `directory` (adapter_config.json + adapter_model.safetensors)."""
        with self._lock.read():
            self._save(adapter_name, directory)

    def _save(self, adapter_name, directory):
        if adapter_name not in self.model.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; loaded adapters: "
                             f"{sorted(self.model.peft_config)}")
        paths = {t: [p for p, _ in entries] for t, entries in self.model.adapter_paths(adapter_name).items()}
        files.write_adapter(directory, self.model.peft_config[adapter_name],
                            dict(self.model.mos_pools[adapter_name].items()), paths)

    # ------------------------------------------------------------------ memory
    def resident_bytes(self) -> dict:
        """{adapter name: bytes it keeps resident}: its pools, its index tables and its rows of
        the store's per-layer tables, ranks and scales."""
        packing = self._synced()
        out = {}
        for name in packing.names:
            total = 0
            for shared in self.model.mos_pools[name].values():
                total += sum(t.numel() * t.element_size()
                             for t in (shared.pool_a, shared.pool_b, shared.index_a, shared.index_b))
            for packs in packing.layers.values():
                for layer_pack in packs:
                    total += (layer_pack.index_a.shape[1] * 2 + 1) * 4
            for pack in packing.types.values():
                total += pack.scales.element_size()
            out[name] = total
        return out

    def total_bytes(self) -> int:
        """Everything the adapters and the store keep resident, summed."""
        return sum(self.resident_bytes().values())

    def lora_bytes(self) -> dict:
        """{adapter name: bytes of the same adapter as plain LoRA at its forward rank r}: an A
        (r, d_in) and a B (d_out, r) per adapted layer, in the pool dtype."""
        out = {}
        for name in self._synced().names:
            config = self.model.peft_config[name]
            elem = torch.empty((), dtype=getattr(torch, config.pool_dtype)).element_size()
            total = 0
            for entries in self.model.adapter_paths(name).values():
                for _, layer in entries:
                    total += config.rank_for(layer.module_type) * (layer.in_features + layer.out_features) * elem
            out[name] = total
        return out

    # ------------------------------------------------------------------ packing
    def _current_fingerprint(self):
        # Layers are wrapped and unwrapped only when adapters come and go, which changes the pools
        # too; moving or casting the model changes their storage. load_state_dict writes the
        # tables in place, which bumps their version counters (pool values need no repack: the
        # adapters' pools are views of the store's).
        return tuple((id(shared), shared.pool_a.data_ptr(), shared.pool_b.data_ptr(),
                      shared.index_a.data_ptr(), shared.index_a._version,
                      shared.index_b.data_ptr(), shared.index_b._version)
                     for pools in self.model.mos_pools.values() for shared in pools.values())

    def _fresh(self) -> bool:
        return self._packing.fingerprint == self._current_fingerprint()

    def sync(self) -> None:
        """Repacks when the model's adapters, their storage, their index tables or its layers changed."""
        self._synced()

    def _synced(self) -> Packing:
        if self._lock.reading():  # inside a request of this thread: its packing stays
            return self._packing
        with self._lock.write():
            self._sync_locked()
            return self._packing

    def _sync_locked(self):
        if not self._fresh():
            self._repack()

    def refresh(self) -> None:
        """Packs every adapter of the model again (values are copied exactly, so outputs of adapters
        that stay do not change)."""
        with self._lock.write():
            self._repack()

    @contextmanager
    def request(self):
        """Holds the store still for one mixed batch; yields the packing it runs with."""
        nested = self._lock.reading()  # a batch inside a batch of this thread keeps the outer packing
        self._lock.acquire_read()
        try:
            while not nested and not self._fresh():
                self._lock.release_read()
                try:
                    self._synced()
                finally:
                    self._lock.acquire_read()
            yield self._packing
        finally:
            self._lock.release_read()

    @torch.no_grad()
    def _repack(self) -> None:
        model = self.model
        names = list(model.peft_config)
        slots = {name: k for k, name in enumerate(names)}
        banks = {}
        for name in names:
            for module_type, shared in model.mos_pools[name].items():
                key = (module_type, shared.shard_pool.shards_per_vector)
                banks.setdefault(key, []).append((name, shared))
        types = {key: self._pack_type(key, entries, slots, len(names)) for key, entries in banks.items()}
        layers = {}
        all_layers = _mos_layers(model)
        for layer in all_layers:
            packs = [self._pack_layer(layer, pack, names) for (module_type, _), pack in types.items()
                     if module_type == layer.module_type and set(pack.offsets) & set(layer.adapter_names)]
            if packs:
                layers[layer] = packs
        self._packing = Packing(tuple(names), slots, types, layers, frozenset(all_layers),
                                 frozenset(saved_wrappers(model.base_model)), self._current_fingerprint())

    def _pack_type(self, key, entries, slots, n_slots):
        module_type, l = key
        first_name, first = entries[0]
        dtype, device = first.pool_a.dtype, first.pool_a.device
        for name, shared in entries:
            if shared.pool_a.dtype != dtype or shared.pool_b.dtype != dtype:
                raise ValueError(f"adapter {name!r}: {module_type} pools are {shared.pool_a.dtype}, "
                                 f"adapter {first_name!r}'s are {dtype}; adapters served together "
                                 f"share one pool dtype")
            if shared.pool_a.device != device or shared.pool_b.device != device:
                raise ValueError(f"adapter {name!r}: {module_type} pools are on {shared.pool_a.device}, "
                                 f"adapter {first_name!r}'s on {device}; move the model to one device")
            if (shared.d_in, shared.d_out) != (first.d_in, first.d_out):
                raise ValueError(f"adapter {name!r}: {module_type} is {shared.d_in} -> {shared.d_out}, "
                                 f"adapter {first_name!r}'s is {first.d_in} -> {first.d_out}")
        pool_a = torch.empty((sum(s.pool_a.shape[0] for _, s in entries), first.pool_a.shape[1]),
                             dtype=dtype, device=device)
        pool_b = torch.empty((sum(s.pool_b.shape[0] for _, s in entries), first.pool_b.shape[1]),
                             dtype=dtype, device=device)
        offsets, row_a, row_b = {}, 0, 0
        scales = torch.zeros(n_slots, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        for name, shared in entries:
            n_a, n_b = shared.pool_a.shape[0], shared.pool_b.shape[0]
            # The adapter's own parameters become views of its slice: one copy of every pool.
            slice_a, slice_b = pool_a[row_a:row_a + n_a], pool_b[row_b:row_b + n_b]
            slice_a.copy_(shared.pool_a)
            slice_b.copy_(shared.pool_b)
            shared.pool_a.data = slice_a
            shared.pool_b.data = slice_b
            offsets[name] = (row_a, row_b)
            scales[slots[name]] = self.model.peft_config[name].scaling_for(module_type)
            row_a += n_a
            row_b += n_b
        max_rank = max(s.rank for _, s in entries)
        return _TypePack(module_type, pool_a, pool_b, l, max_rank, offsets, scales.to(device))

    def _pack_layer(self, layer, pack, names):
        width = pack.max_rank * pack.shards_per_vector
        index_a = np.zeros((len(names), width), dtype=np.int32)
        index_b = np.zeros((len(names), width), dtype=np.int32)
        ranks = np.zeros(len(names), dtype=np.int32)
        for k, name in enumerate(names):
            if name not in pack.offsets or name not in layer.adapter_names:
                continue
            slot = layer.slot(name)
            shared = slot.pools
            off_a, off_b = pack.offsets[name]
            row_a = shared.index_a[slot.position].cpu().numpy()
            row_b = shared.index_b[slot.position].cpu().numpy()
            index_a[k, :row_a.size] = row_a + off_a
            index_b[k, :row_b.size] = row_b + off_b
            ranks[k] = shared.rank
        device = pack.pool_a.device
        return _LayerPack(pack, torch.from_numpy(index_a).to(device), torch.from_numpy(index_b).to(device),
                          torch.from_numpy(ranks).to(device))

    def layer_packs(self, layer) -> list:
        """The banks serving `layer` ([] when no adapter adapts it)."""
        return self._packing.layers.get(layer, [])

    def __repr__(self):
        return f"AdapterStore(adapters={self._names}, banks={sorted(self._types)})"


def _mos_layers(model):
    return [m for m in model.base_model.modules() if isinstance(m, MoSLinear)]
