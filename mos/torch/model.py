"""MoSModel: injects MoS adapters into any torch model and gives it PEFT's everyday API."""
from __future__ import annotations

import copy
import functools
import inspect
import os
import tempfile
import types
from contextlib import contextmanager

import torch
from torch import nn

from ..config import MoSConfig
from ..pool import ShardPool
from ..ranks import fit_ranks
from . import files, misuse, saved_modules, sharding
from .fall_through import FallThroughModule
from .layer import MoSLinear
from .pool_grads import one_buffer_per_pool
from .pools import SharedPools
from .targets import default_target_modules, find_targets, listed_targets

__all__ = ["MoSModel", "get_mos_model", "adapter_directory"]


def adapter_directory(save_directory: str, adapter_name: str) -> str:
    """Where save_pretrained(save_directory) puts an adapter: "default" in save_directory itself,
    any other in save_directory/<name> (PEFT's layout)."""
    return save_directory if adapter_name == "default" else os.path.join(save_directory, adapter_name)


def get_mos_model(model: nn.Module, config: MoSConfig, adapter_name: str = "default") -> "MoSModel":
    """Wraps `model` with a trainable MoS adapter on the modules config.target_modules selects."""
    return MoSModel(model, config, adapter_name)


def _not_a_config(config) -> str:
    """The TypeError message for a config that is not a MoSConfig, with the conversion to use."""
    kind = type(config).__name__
    if isinstance(config, dict):
        return "config must be a MoSConfig, got a dict: wrap it, mos.MoSConfig(**config)"
    if type(config).__module__.split(".")[0] == "peft":
        return (f"config must be a MoSConfig, got peft's {kind}: MoS has its own config, which takes LoRA's "
                f"settings by the same names, e.g. mos.MoSConfig(r=8, lora_alpha=16, "
                f"target_modules=[\"q_proj\", \"v_proj\"]) (help(mos.MoSConfig) lists them)")
    return f"config must be a MoSConfig, got {kind}"


class MoSModel(FallThroughModule):
    """A model whose target nn.Linear layers are MoSLinear, plus the pools they share.

    `base_model.model` (also get_base_model()) is the model passed in, modified in place, as in
    PEFT; `mos_pools[adapter][type]` holds each adapter's pools once; base parameters are frozen
    and only the active adapter's pools train.
    Unknown attributes fall through to the base model (config, generate, device, ...)."""

    def __init__(self, model: nn.Module, config: MoSConfig, adapter_name: str = "default"):
        super().__init__()
        self._init_empty(model)
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    def _init_empty(self, model):
        if isinstance(model, MoSModel):
            raise TypeError("model is already a MoSModel; use add_adapter() for another adapter")
        misuse.check_not_wrapped(model)
        self.base_model = TunedModel(model)
        self.mos_pools = nn.ModuleDict()
        self.peft_config = {}
        self.active_adapter = None
        self._inference_adapters = set()
        self._saved_plans = {}  # adapter -> saved_modules.SavedPlan (modules_to_save, biases)
        self._expose_forward_signature()

    def __getstate__(self):
        # The adapter store (a lock, packed views of this model's pools) belongs to this instance:
        # a copy or an unpickled model makes its own on first use.
        state = dict(super().__getstate__())
        state.pop("_adapter_store", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._expose_forward_signature()  # pickling keeps only the class's forward

    def _expose_forward_signature(self):
        """Gives this instance's forward the base model's parameters (plus adapter_names) as its
        signature. transformers.Trainer keeps only the dataset columns that
        inspect.signature(model.forward) names (remove_unused_columns=True); `*args, **kwargs`
        would make it drop every column."""
        try:
            base = inspect.signature(self.get_base_model().forward)
        except (TypeError, ValueError):
            return
        params = [p for p in base.parameters.values() if p.name not in ("self", "adapter_names")]
        at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
        params.insert(at, inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None))
        params.insert(0, inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY))
        try:
            signature = base.replace(parameters=params)
        except ValueError:
            return

        def forward(self, *args, **kwargs):
            return MoSModel.forward(self, *args, **kwargs)

        functools.update_wrapper(forward, MoSModel.forward)
        forward.__signature__ = signature
        self.forward = types.MethodType(forward, self)

    _own_attributes = ("base_model", "mos_pools")

    def _fall_through_target(self):
        return self._modules["base_model"]

    # ------------------------------------------------------------------ running
    def forward(self, *args, adapter_names=None, labels=None, **kwargs):
        """Runs the base model with the active adapter; arguments are the base model's forward's.

        adapter_names: None (every sample uses the active adapter) or a list with one adapter
        name per sample of the batch, "__base__" for a sample that should run on the base model
        alone (PEFT's mixed-batch API; inference only, see docs/serving.md).
        labels: passed on to the base model. It is named here because transformers.Trainer reads
        label names from the class's forward signature, and computes evaluation losses only then."""
        if labels is not None:
            kwargs["labels"] = labels
        if adapter_names is not None:  # one adapter per sample, "__base__" for none (mixed_batch.py)
            from .mixed_batch import mixed_batch
            with mixed_batch(self, adapter_names, args, kwargs):
                return self.get_base_model()(*args, **kwargs)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            with one_buffer_per_pool():  # each pool's gradient in one buffer, not one per layer
                return self.get_base_model()(*args, **kwargs)
        return self.get_base_model()(*args, **kwargs)

    def generate(self, *args, adapter_names=None, **kwargs):
        if adapter_names is not None:
            from .mixed_batch import mixed_batch
            with mixed_batch(self, adapter_names, args, kwargs):
                return self.get_base_model().generate(*args, **kwargs)
        return self.get_base_model().generate(*args, **kwargs)

    @property
    def adapter_store(self):
        """The AdapterStore that packs this model's adapters for mixed batches (made on first use)."""
        store = self.__dict__.get("_adapter_store")
        if store is None:
            from .store import AdapterStore
            store = self.__dict__["_adapter_store"] = AdapterStore(self)
        return store

    def get_base_model(self) -> nn.Module:
        """The model passed in (with its target layers wrapped), as PEFT's get_base_model()."""
        return self.base_model.model

    @property
    def active_adapters(self) -> list:
        active = self.active_adapter
        return [] if active is None else [active] if isinstance(active, str) else list(active)

    def saved_plan(self, adapter_name: str):
        """What adapter `adapter_name` trains besides its pools (saved_modules.SavedPlan:
        modules_to_save, biases)."""
        return self._saved_plans[adapter_name]

    def _saving_adapter(self):
        """The adapter whose modules_to_save copies run: the active one (set_adapter refuses
        several active adapters when one has modules_to_save)."""
        return (self.active_adapters or [None])[0]

    def _mos_layers(self):
        return [m for m in self.base_model.modules() if isinstance(m, MoSLinear)]

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str, config: MoSConfig) -> None:
        """Injects a new adapter (inactive and frozen until set_adapter)."""
        self._add(adapter_name, config, state=None)

    def load_adapter(self, directory: str, adapter_name: str, is_trainable: bool = False) -> None:
        """Adds the adapter saved in `directory` under `adapter_name`; nothing changes if it is invalid."""
        self._add(adapter_name, None, state=files.read_adapter(directory), is_trainable=is_trainable)
        if not is_trainable:
            self.eval()  # as PEFT: dropout off unless the adapter is loaded for training

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str, adapter_name: str = "default",
                        is_trainable: bool = False) -> "MoSModel":
        """Wraps `base_model` with the adapter saved in `directory` (index tables loaded, never
        redrawn). Invalid files raise ValueError naming the key and leave base_model untouched.
        As PEFT, the model comes back in eval mode with frozen pools; is_trainable=True keeps the
        base model's mode and makes the pools trainable."""
        state = files.read_adapter(directory)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init_empty(base_model)
        self._add(adapter_name, None, state=state, is_trainable=is_trainable)
        self.set_adapter(adapter_name)
        if not is_trainable:
            self.eval()  # as PEFT: dropout off; is_trainable=True keeps the base model's mode
        return self

    def _add(self, adapter_name, config, state, is_trainable=True):
        misuse.check_adapter_name(adapter_name, self.peft_config)
        config = copy.deepcopy(state.config if state is not None else config)
        if not isinstance(config, MoSConfig):
            raise TypeError(_not_a_config(config))
        if config.target_modules is None:
            config.target_modules = default_target_modules(self.get_base_model())
        config = saved_modules.with_task_heads(config, self.get_base_model(), warn=state is None)
        # Plan and validate everything before touching the model, so a failure changes nothing.
        # A new adapter may lower r for types with too few layers; a saved one keeps its ranks.
        config, layouts, shard_pools = _plan(self.get_base_model(), config, state)
        saved = files.validate_adapter(state, shard_pools, layouts) if state is not None else {}
        saved_plan = saved_modules.plan_saved(
            self.get_base_model(), config, [site.path for layout in layouts.values() for site in layout.sites],
            existing_biases=any(c.bias != "none" for c in self.peft_config.values()))
        saved_values = {} if state is None else saved_modules.load_saved(
            os.path.join(state.directory, files.WEIGHTS_NAME), state.tensors, self.get_base_model(), saved_plan)
        pools = nn.ModuleDict()
        for module_type, layout in layouts.items():
            values, tables = saved.get(module_type, (None, None))
            pools[module_type] = SharedPools(shard_pools[module_type], device=layout.sites[0].linear.weight.device,
                                             values=values, tables=tables)
        # From here on nothing can fail.
        for layout in layouts.values():
            for position, site in enumerate(layout.sites):
                layer = site.module if isinstance(site.module, MoSLinear) else \
                    self._wrap(site.path, site.module, layout.module_type)
                layer.add_adapter(adapter_name, pools[layout.module_type], position,
                                  config.scaling_for(layout.module_type), config.lora_dropout)
        saved_modules.install_saved(self.get_base_model(), adapter_name, saved_plan)
        saved_modules.copy_saved(self.get_base_model(), adapter_name, saved_plan, saved_values)
        saved_modules.set_saved_adapter(self.get_base_model(), self._saving_adapter())
        self._saved_plans[adapter_name] = saved_plan
        self.mos_pools[adapter_name] = pools
        self.peft_config[adapter_name] = config
        if not is_trainable:
            self._inference_adapters.add(adapter_name)
        self._sync_requires_grad()

    def _wrap(self, path, linear, module_type):
        layer = MoSLinear(linear, module_type)
        layer.active_adapter = self.active_adapter
        layer.train(linear.training)
        _set_submodule(self.get_base_model(), path, layer)
        return layer

    def set_adapter(self, adapter_name) -> None:
        """Makes `adapter_name` the one that runs and trains; other adapters' pools are frozen.
        A list of names makes them all active, as PEFT's LoRA tuner does: their updates add up in
        every layer, and each of them trains."""
        names = _active_names(adapter_name, self.peft_config, self._saved_plans)
        if any(layer.merged for layer in self._mos_layers()):
            self.unmerge_adapter()  # a merged weight would silently keep the old adapter
        active = names[0] if len(names) == 1 else names
        for layer in self._mos_layers():
            layer.active_adapter = active
        saved_modules.set_saved_adapter(self.get_base_model(), names[0])
        self.active_adapter = active
        self._sync_requires_grad()

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes an adapter (unmerging it first); layers left without adapters become plain nn.Linear."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        for path, layer in self._named_mos_layers():
            layer.remove_adapter(adapter_name)
            if not layer.adapter_names:
                _set_submodule(self.get_base_model(), path, layer.base_layer)
        saved_modules.remove_saved(self.get_base_model(), adapter_name)
        del self._saved_plans[adapter_name]
        del self.mos_pools[adapter_name]
        del self.peft_config[adapter_name]
        self._inference_adapters.discard(adapter_name)
        if adapter_name in self.active_adapters:
            still_active = [n for n in self.active_adapters if n != adapter_name]
            remaining = still_active or list(self.peft_config)[:1]
            self.active_adapter = None
            if remaining:
                self.set_adapter(remaining)
        self._sync_requires_grad()

    def _sync_requires_grad(self):
        """Derives every parameter's requires_grad from the set of adapters (on each add, delete and
        set_adapter): the pools, module copies and biases of the active trainable adapters train;
        everything else, the base model and what a deleted adapter trained included, is frozen."""
        trainable = set()
        for name in self.active_adapters:
            if name in self.peft_config and name not in self._inference_adapters:
                trainable.update(map(id, self.mos_pools[name].parameters()))
                trainable.update(map(id, saved_modules.saved_parameters(self.get_base_model(), name,
                                                                        self._saved_plans[name])))
        for param in self.parameters():
            param.requires_grad_(id(param) in trainable)

    def _named_mos_layers(self):
        return [(p, m) for p, m in self.get_base_model().named_modules() if isinstance(m, MoSLinear)]

    def adapter_paths(self, adapter_name: str) -> dict:
        """{module type: [(path, layer) in position order]} of one adapter."""
        by_type = {}
        for path, layer in self._named_mos_layers():
            if adapter_name in layer.adapter_names:
                slot = layer.slot(adapter_name)
                by_type.setdefault(slot.pools.shard_pool.name, []).append((slot.position, path, layer))
        return {t: [(p, l) for _, p, l in sorted(entries, key=lambda e: e[0])] for t, entries in by_type.items()}

    # ------------------------------------------------------------------ merge / unload
    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        """Adds s * B_k A_k into every adapted weight (the active adapter by default). With safe_merge
        every layer is checked for NaN/inf first, and nothing is merged if one fails."""
        names = misuse.merge_names(self, adapter_names)
        misuse.check_merge_targets(self, names)
        layers = self._mos_layers()
        if safe_merge:
            for layer in layers:
                layer.check_merge(names)
        for layer in layers:
            layer.merge(adapter_names=names)

    def unmerge_adapter(self) -> None:
        for layer in self._mos_layers():
            layer.unmerge()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """Merges the adapter into the weights and returns the base model with plain nn.Linear layers."""
        self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        return self._unload()

    def unload(self) -> nn.Module:
        """Returns the base model with the adapters removed (unmerged first, so its weights are the
        original ones)."""
        self.unmerge_adapter()
        return self._unload()

    def _unload(self):
        for path, layer in self._named_mos_layers():
            _set_submodule(self.get_base_model(), path, layer.base_layer)
        saved_modules.unload_saved(self.get_base_model())  # as PEFT: the active adapter's copies stay
        self._saved_plans = {}
        self.mos_pools = nn.ModuleDict()
        self.peft_config = {}
        self.active_adapter = None
        return self.get_base_model()

    @contextmanager
    def disable_adapter(self):
        """Runs the base model alone inside the block; merged adapters are unmerged for it and
        merged back on exit."""
        layers = self._mos_layers()
        merged = {layer: list(layer.merged_adapters) for layer in layers}
        for layer in layers:
            layer.unmerge()
            layer.disable_adapters = True
        saved_modules.set_saved_adapter(self.get_base_model(), self._saving_adapter(), disabled=True)
        try:
            yield
        finally:
            saved_modules.set_saved_adapter(self.get_base_model(), self._saving_adapter(), disabled=False)
            for layer in layers:
                layer.disable_adapters = False
                if merged[layer]:
                    layer.merge(adapter_names=merged[layer])

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple:
        """(trainable parameters, all parameters), each shared pool counted once."""
        trainable = total = 0
        for param in self.parameters():
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        return trainable, total

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters of the whole model, each shared pool counted once (transformers' method,
        answered here because the pools live outside the base model)."""
        skip = set()
        if exclude_embeddings:
            skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return sum(p.numel() for p in self.parameters()
                   if (p.requires_grad or not only_trainable) and id(p) not in skip)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ state dict
    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """nn.Module's state dict with each tied parameter once, under its first name (GPT-2's
        lm_head.weight is transformer.wte.weight): safetensors refuses tensors that share memory,
        and transformers.Trainer writes a model it does not know with safetensors. Loading fills
        the tied names back in, so load_state_dict(state_dict()) stays strict."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if args:  # torch's deprecated positional (destination, prefix, keep_vars): left as torch makes it
            return state
        for alias in self._tied_aliases():
            state.pop(prefix + alias, None)
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for alias, name in self._tied_aliases().items():  # torch calls this before any child loads
            if prefix + alias not in state_dict and prefix + name in state_dict:
                state_dict[prefix + alias] = state_dict[prefix + name]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _tied_aliases(self) -> dict:
        """{later name: first name} of every parameter reachable under two names."""
        first, aliases = {}, {}
        for name, param in self.named_parameters(remove_duplicate=False):
            if id(param) in first:
                aliases[name] = first[id(param)]
            else:
                first[id(param)] = name
        return aliases

    # ------------------------------------------------------------------ files
    def save_pretrained(self, save_directory: str, safe_serialization: bool = True, selected_adapters=None,
                        save_embedding_layers="auto", is_main_process: bool = True, **unsupported) -> None:
        """Writes each adapter as adapter_config.json + adapter_model.safetensors: "default" into
        save_directory, others into save_directory/<name> (PEFT's layout and arguments). Under
        FSDP2's fully_shard, call it on every rank: the pools, modules_to_save copies and trained
        biases are gathered and rank 0 writes. is_main_process=False writes nothing (after
        taking part in any gather)."""
        _check_save_options(safe_serialization, save_embedding_layers, unsupported)
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"unknown adapter {name!r}; adapters: {sorted(self.peft_config)}")
            misuse.check_adapter_name(name)  # it names a directory: never one outside save_directory
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory}: is a file, expected a directory")
        for name in names:
            self.save_adapter(name, adapter_directory(save_directory, name), is_main_process=is_main_process)

    def save_adapter(self, adapter_name: str, directory: str, is_main_process: bool = True) -> None:
        """Writes one adapter into `directory`: its pools, index tables, modules_to_save copies and
        trained biases (what save_pretrained writes for it; every writer of adapter files comes
        here). Under FSDP2 call it on every rank: whatever is sharded is gathered, rank 0 writes,
        and no rank returns before the files exist."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        paths = {t: [p for p, _ in entries] for t, entries in self.adapter_paths(adapter_name).items()}
        pools, pools_sharded = sharding.gather_pools(dict(self.mos_pools[adapter_name].items()))
        saved, saved_sharded = sharding.gather_tensors(
            saved_modules.saved_tensors(self.get_base_model(), adapter_name, self._saved_plans[adapter_name]))
        sharded = pools_sharded or saved_sharded
        if is_main_process and (not sharded or sharding.is_writer()):
            files.write_adapter(directory, self.peft_config[adapter_name], pools, paths, saved)
        if sharded:
            sharding.barrier()

    def push_to_hub(self, repo_id: str, commit_message: str = "Upload MoS adapter", private=None, token=None,
                    revision=None, create_pr: bool = False, selected_adapters=None, safe_serialization: bool = True):
        """Uploads what save_pretrained writes (the adapter files, never the base model) to the
        Hugging Face Hub repository `repo_id`, creating it if needed; returns the commit info."""
        from huggingface_hub import HfApi

        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, selected_adapters=selected_adapters)
            api = HfApi(token=token)
            repo = api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(repo_id=repo.repo_id, folder_path=folder, commit_message=commit_message,
                                     revision=revision, create_pr=create_pr)

    def export_lora(self, save_directory: str, adapter_name: str | None = None) -> None:
        """Writes the adapter as a plain PEFT LoRA adapter (rank r, per-layer A_k and B_k)."""
        from .export import export_lora
        export_lora(self, save_directory, adapter_name)


def _plan(model, config, state=None):
    """(config, {type: TypeLayout}, {type: ShardPool}) for config on model; raises ValueError and
    changes nothing. The config returned records ranks lowered for types with too few layers
    (only for a new adapter: a saved one, `state`, must fit as saved)."""
    with _config_errors(state):
        if state is not None and state.listed:  # its module list, never its regexes
            layouts = listed_targets(model, state.layout)
        else:
            layouts = find_targets(model, config)
        misuse.check_single_paths(model, layouts)
    if state is not None:
        files.check_layouts(state, layouts)
    with _config_errors(state):
        config = fit_ranks(config, [(t, lay.d_in, lay.d_out, lay.n_layers) for t, lay in layouts.items()],
                           lower=state is None)
        shard_pools = {t: ShardPool(t, lay.d_in, lay.d_out, lay.n_layers, config) for t, lay in layouts.items()}
    return config, layouts, shard_pools


@contextmanager
def _config_errors(state):
    """Prefixes a ValueError with the adapter_config.json it comes from, when loading a saved adapter."""
    try:
        yield
    except ValueError as err:
        if state is None:
            raise
        raise ValueError(f"{os.path.join(state.directory, files.CONFIG_NAME)}: {err}") from None


def _check_save_options(safe_serialization, save_embedding_layers, unsupported):
    if unsupported:
        raise TypeError(f"save_pretrained() got unsupported argument(s) {sorted(unsupported)}; MoS adapters "
                        f"take safe_serialization, selected_adapters, save_embedding_layers, is_main_process")
    if safe_serialization is not True:
        raise ValueError("safe_serialization must be True: MoS adapters are written as safetensors only")
    if save_embedding_layers not in ("auto", False):
        raise ValueError(f"save_embedding_layers={save_embedding_layers!r} is not supported: MoS adapts "
                         f"linear layers only, so there are no embedding layers to save")


class TunedModel(FallThroughModule):
    """PEFT's `base_model` level (where LoraModel sits): `model` is the model passed in, and calls
    and unknown attributes go to it, so `mos_model.base_model.model` is the model, as in PEFT."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    _own_attributes = ("model",)

    def _fall_through_target(self):
        return self._modules["model"]


def _active_names(adapter_name, configs, saved_plans) -> list:
    """The names set_adapter activates: one name or a non-empty list of distinct known ones."""
    names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names) \
            or len(set(names)) != len(names):
        raise ValueError(f"set_adapter takes an adapter name or a list of distinct names, got {adapter_name!r}")
    for name in names:
        if name not in configs:
            raise ValueError(f"unknown adapter {name!r}; adapters: {sorted(configs)}")
    saving = [n for n in names if saved_plans[n].modules]
    if len(names) > 1 and saving:
        raise ValueError(f"adapters {list(names)} cannot be active together: {saving[0]!r} has modules_to_save, "
                         f"and only one adapter's copy of a module can run (as in PEFT)")
    return list(names)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)
