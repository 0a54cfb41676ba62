"""Serving many MoS adapters of one base model at once: the adapter store and mixed-adapter batches.

    model = mos.MoSModel.from_pretrained(base, "adapters/support", adapter_name="support")
    model.adapter_store.load("adapters/legal", "legal")          # at run time, others keep serving
    model.eval()
    out = model(input_ids, adapter_names=["support", "legal", "__base__"])   # one name per sample
    ids = model.generate(input_ids, adapter_names=[...], max_new_tokens=20)
    model.adapter_store.resident_bytes()                           # {name: bytes}

Layout (what the C core's batched forward takes, mos.h "serving"): per module type, the pools of
every adapter that targets it are concatenated into one A-pool and one B-pool; each adapter's own
pool parameters are then re-pointed at their slice, so the store holds one copy of every pool,
never a per-layer A or B. Adapters of one type with different shards per vector l go to separate
banks (one concatenation and one batched call per l), so loading an adapter never changes how
another one is computed. Per layer and bank, the store keeps (K, max_rank * l) index tables
already offset into the concatenated pools, every adapter's rank there (0 when the adapter is in
another bank or does not adapt that layer) and one scale per adapter: a few hundred bytes per
adapter and layer.

A forward with adapter_names runs every adapted layer once for the whole batch: the base layer,
then one batched call in which each row reads its own adapter's shards (decode, or short rows per
sample) or rows of one sample share one gathered A and B (prefill). Inference only.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .. import _C
from . import files
from .call_context import running
from .layer import MoSLinear
from .ops import _export, adapter_linear, core_supports
from .rwlock import ReadWriteLock
from .saved_modules import saved_wrappers

__all__ = ["AdapterStore", "BASE_ADAPTER", "mixed_batch"]

BASE_ADAPTER = "__base__"
# Rows per sample above which one sample's rows share one assembly (prefill); at or below it every
# row reads its shards directly (decode). Matches the C core's own cut-over.
_GROUPED_MIN_ROWS = 4


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
            self.handles = tuple(_export(t) for t in (self.pack.pool_a, self.index_a, self.pack.pool_b,
                                                      self.index_b, self.pack.scales, self.ranks))
        return self.handles


@dataclass(frozen=True)
class _Packing:
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
        self._packing = _Packing(slots={}, types={}, layers={})

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

    def _synced(self) -> _Packing:
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
        self._packing = _Packing(tuple(names), slots, types, layers, frozenset(all_layers),
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


# ---------------------------------------------------------------------------- mixed batches


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


class _MixedBatch:
    """Per-call state of a mixed-adapter forward: the store's packing it runs with, each sample's
    adapter name and slot, expanded to rows per shape. It travels in a context variable, never on
    the layers, so concurrent calls on one model each see their own."""

    def __init__(self, packing: _Packing, adapter_names: list):
        self.packing = packing
        self.adapter_names = tuple(adapter_names)
        self.sample_slots = np.asarray([packing.slot(name) for name in adapter_names], dtype=np.int32)
        self._rows = {}  # (rows, device) -> (ids, segments or None, grouped)

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
        key = (n_rows, str(device))
        cached = self._rows.get(key)
        if cached is None:
            ids, segments, grouped = plan_rows(self.sample_slots, self.rows_per_sample(n_rows), device)
            cached = (ids, segments, grouped, _export(ids), _export(segments))
            self._rows[key] = cached
        return cached

    def forward(self, layer: MoSLinear, x, *args, **kwargs):
        result = layer.base_layer(x, *args, **kwargs)
        packs = self.packing.layers.get(layer, [])
        if not packs:
            return result
        d_in = x.shape[-1]
        x2 = x.reshape(-1, d_in)
        ids, segments, grouped, ids_handle, segments_handle = self.rows(x2.shape[0], x.device)
        pool_dtype = packs[0].pack.pool_a.dtype
        if packs[0].pack.pool_a.device != x.device:
            raise ValueError(f"{layer.module_type}: the pools are on {packs[0].pack.pool_a.device} but "
                             f"the layer input is on {x.device}; mixed-adapter batches need the adapters "
                             f"on the layer's device")
        adapter_in = x2 if x2.dtype == pool_dtype else x2.to(pool_dtype)
        if not core_supports(adapter_in):
            return self._fallback(layer, x, result, ids)
        adapter_in = adapter_in if adapter_in.stride(-1) == 1 else adapter_in.contiguous()
        out2 = result.reshape(-1, result.shape[-1])
        same = out2.dtype == pool_dtype and out2.data_ptr() == result.data_ptr()
        update = out2 if same else adapter_in.new_zeros((x2.shape[0], out2.shape[1]))
        update_handle, x_handle = _export(update), _export(adapter_in)
        for layer_pack in packs:  # one bank per shards-per-vector value; usually one
            pack = layer_pack.pack
            options = {}
            if x.device.type == "cuda":
                nbytes = _C.batched_workspace_bytes(x2.shape[0], pack.max_rank,
                                                    adapter_in.element_size(), grouped)
                options["workspace"] = _export(torch.empty(max(nbytes, 256), dtype=torch.uint8,
                                                           device=x.device))
                options["stream"] = torch.cuda.current_stream(x.device).cuda_stream or 1
            pool_a, index_a, pool_b, index_b, scales, ranks = layer_pack.exported()
            _C.batched_forward(update_handle, x_handle, pool_a, index_a, pool_b, index_b, scales,
                               ids_handle, ranks=ranks, grouped=grouped, segments=segments_handle,
                               **options)
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
        state = _MixedBatch(packing, adapter_names)
        with running(state), torch.no_grad():
            yield state
