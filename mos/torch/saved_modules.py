"""PEFT's modules_to_save and bias options: parts of the base model trained in full with an adapter
and saved in its file.

modules_to_save: each matching module is wrapped in a ModulesToSaveWrapper (PEFT's name and
layout: `original_module` plus one trainable copy per adapter in `modules_to_save`); the active
adapter's copy runs. bias: "all" trains every bias of the base model, "lora_only" the biases of
the adapted layers; they are base parameters, shared by every adapter, so (as in PEFT) only one
adapter of a model may train biases.

In the adapter file these tensors sit beside the pools under "saved:<path in the plain model>"
(files.SAVED_PREFIX); loading checks each against the model before anything is copied.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings

import numpy as np
import torch
from torch import nn

from .call_context import current_batch
from .fall_through import FallThroughModule
from .files import SAVED_PREFIX

__all__ = ["ModulesToSaveWrapper", "SavedPlan", "plan_saved", "install_saved", "saved_tensors",
           "load_saved", "copy_saved", "with_task_heads", "remove_saved", "unload_saved",
           "set_saved_adapter", "saved_parameters", "saved_wrappers"]

# Classification heads PEFT adds to modules_to_save for task_type="SEQ_CLS" / "TOKEN_CLS".
_HEAD_NAMES = ("classifier", "score")
_HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS")


class ModulesToSaveWrapper(FallThroughModule):
    """Holds the original module and one trainable copy per adapter; runs the active adapter's
    copy (the original when adapters are disabled or the active adapter has no copy), or inside a
    mixed-adapter batch each sample's own."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter = None
        self.disable_adapters = False

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    @property
    def active_module(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        batch = current_batch()  # set by mos.torch.mixed_batch, per call
        if batch is not None and batch.serves(self):
            return self._mixed_forward(batch, *args, **kwargs)
        return self.active_module(*args, **kwargs)

    def _module_for(self, adapter_name: str) -> nn.Module:
        return self.modules_to_save[adapter_name] if adapter_name in self.modules_to_save else self.original_module

    def _mixed_forward(self, batch, *args, **kwargs):
        """Rows of x (sample-major: each sample owns x.shape[0] / len(adapter_names) consecutive
        rows, as beams are) go through their sample's module; one call per distinct module."""
        per_sample = [self._module_for(name) for name in batch.adapter_names]
        modules = list(dict.fromkeys(per_sample))  # distinct, in first-use order
        if len(modules) == 1:
            return modules[0](*args, **kwargs)
        x, *args = args or [None]
        if not isinstance(x, torch.Tensor) or x.dim() == 0 \
                or any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):
            raise ValueError(f"adapter_names=[...]: {type(self.original_module).__name__} is a module_to_save "
                             f"not called with its input as the only tensor argument; a mixed-adapter batch "
                             f"splits that input by sample, so call the model once per adapter (set_adapter) "
                             f"instead")
        rows_per_sample = batch.rows_per_sample(x.shape[0])
        which = np.repeat([modules.index(m) for m in per_sample], rows_per_sample)
        order = np.argsort(which, kind="stable")  # rows of each module together, in module order
        outputs = []
        for k, module in enumerate(modules):
            rows = torch.from_numpy(np.flatnonzero(which == k)).to(x.device)
            out = module(x.index_select(0, rows), *args, **kwargs)
            if not isinstance(out, torch.Tensor) or out.shape[:1] != rows.shape:
                raise ValueError(f"adapter_names=[...]: {type(self.original_module).__name__} is a module_to_save "
                                 f"whose output is not one tensor with a row per input row; a mixed-adapter "
                                 f"batch cannot split it by sample, so call the model once per adapter instead")
            outputs.append(out)
        inverse = torch.from_numpy(np.argsort(order)).to(x.device)
        return torch.cat(outputs).index_select(0, inverse)

    _own_attributes = ("original_module", "modules_to_save")

    def _fall_through_target(self):
        return self.active_module  # weight, out_features, ... of what runs


@dataclasses.dataclass
class SavedPlan:
    """What an adapter saves besides its pools: module paths to wrap, and bias parameter paths
    (both as paths in the plain base model)."""
    modules: list
    biases: list


def with_task_heads(config, model: nn.Module, warn: bool = True):
    """The config with PEFT's classification heads added to modules_to_save for task_type
    SEQ_CLS / TOKEN_CLS; with `warn`, warns when a classification model's head would stay frozen."""
    heads = [name for name in _HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]
    saved = list(config.modules_to_save or [])
    if config.task_type in _HEAD_TASKS:
        added = [h for h in heads if h not in saved]
        return dataclasses.replace(config, modules_to_save=saved + added) if added else config
    if warn and heads and type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification")) \
            and not any(_selects(name, head) for name in saved for head in heads):
        warnings.warn(f"{type(model).__name__}'s head {heads[0]!r} is not trained nor saved with the adapter "
                      f"and keeps its initial values; pass modules_to_save=[{heads[0]!r}] or "
                      f"task_type='SEQ_CLS'", UserWarning, stacklevel=4)
    return config


def _selects(name, path):
    return path == name or path.endswith("." + name)


def _plain(path):
    """A path in the plain model: MoSLinear's base_layer and a wrapper's original_module hop removed."""
    return path.replace(".base_layer", "").replace(".original_module", "")


def plan_saved(model: nn.Module, config, adapted_paths, existing_biases: bool) -> SavedPlan:
    """Pure: the modules and biases `config` saves in `model`. Raises ValueError for a name in
    modules_to_save that matches nothing, or for a second adapter that trains biases."""
    modules = []
    for name in config.modules_to_save or []:
        found = [p for p, m in model.named_modules()
                 if p and _selects(name, p) and ".modules_to_save." not in p and ".original_module" not in p]
        if not found:
            raise ValueError(f"modules_to_save={config.modules_to_save!r}: {name!r} matches no module of "
                             f"{type(model).__name__}")
        modules += [p for p in found if not any(p.startswith(m + ".") for m in found if m != p)]
    if config.bias != "none" and existing_biases:
        raise ValueError(f"bias={config.bias!r}: another adapter of this model already trains biases, and "
                         f"biases are base parameters every adapter shares; use bias='none' for this one")
    biases = []
    if config.bias == "all":
        biases = [p for p, _ in model.named_parameters()
                  if p.rsplit(".", 1)[-1] == "bias" and ".modules_to_save." not in p]
    elif config.bias == "lora_only":
        adapted = set(adapted_paths)
        biases = [p for p, _ in model.named_parameters()
                  if p.endswith(".bias") and _plain(p).removesuffix(".bias") in adapted]
    saved_modules = [_plain(p) for p in modules]
    biases = [_plain(p) for p in biases]
    biases = [p for p in biases if not any(p.startswith(m + ".") for m in saved_modules)]
    return SavedPlan(sorted(set(modules)), biases)


def _bias(model, plain_path):
    """The bias parameter at `plain_path` of the plain model, wherever wrapping moved it."""
    module_path = plain_path.removesuffix(".bias")
    module = model.get_submodule(module_path) if module_path != plain_path else model
    while not isinstance(getattr(module, "bias", None), nn.Parameter) and hasattr(module, "base_layer"):
        module = module.base_layer
    return module.bias


def install_saved(model: nn.Module, adapter_name: str, plan: SavedPlan) -> None:
    """Wraps the plan's modules (once per model) and adds this adapter's copy."""
    for path in plan.modules:
        module = model.get_submodule(path)
        if not isinstance(module, ModulesToSaveWrapper):
            wrapper = ModulesToSaveWrapper(module)
            model.set_submodule(path, wrapper)
            module = wrapper
        module.add_adapter(adapter_name)


def _wrappers(model):
    return [(p, m) for p, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def set_saved_adapter(model: nn.Module, adapter_name, disabled: bool | None = None) -> None:
    for _, wrapper in _wrappers(model):
        wrapper.active_adapter = adapter_name
        if disabled is not None:
            wrapper.disable_adapters = disabled


def saved_wrappers(model: nn.Module) -> list:
    """Every ModulesToSaveWrapper of `model`."""
    return [m for _, m in _wrappers(model)]


def saved_parameters(model: nn.Module, adapter_name: str, plan: SavedPlan) -> list:
    """The parameters the adapter trains besides its pools: its module copies and the biases."""
    params = [p for _, w in _wrappers(model) if adapter_name in w.modules_to_save
              for p in w.modules_to_save[adapter_name].parameters()]
    return params + [_bias(model, p) for p in plan.biases]


def saved_tensors(model: nn.Module, adapter_name: str, plan: SavedPlan) -> dict:
    """{"saved:<plain path>": tensor} of the adapter's module copies and biases, detached where
    they live: under FSDP2 a DTensor shard, which the file writers gather (sharding.gather_tensors)."""
    tensors = {}
    for path, wrapper in _wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            for name, value in wrapper.modules_to_save[adapter_name].state_dict().items():
                tensors[f"{SAVED_PREFIX}{_plain(path)}.{name}"] = value.detach()
    for path in plan.biases:
        tensors[f"{SAVED_PREFIX}{path}"] = _bias(model, path).detach()
    return tensors


def load_saved(where: str, tensors: dict, model: nn.Module, plan: SavedPlan) -> dict:
    """Checks the file's saved tensors against the model: {target path: tensor}, where the target
    path is a module state key (in plan.modules) or a bias parameter. Raises ValueError naming the
    key, changing nothing."""
    expected = {}
    for path in plan.modules:
        module = model.get_submodule(path)
        module = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        for name, value in module.state_dict().items():
            expected[f"{SAVED_PREFIX}{_plain(path)}.{name}"] = (f"{path}.{name}", value)
    for path in plan.biases:
        expected[f"{SAVED_PREFIX}{path}"] = (path, _bias(model, path))
    found = {k for k in tensors if k.startswith(SAVED_PREFIX)}
    for key in sorted(set(expected) - found):
        raise ValueError(f"{where}: missing key {key!r} (modules_to_save / bias of the adapter's config)")
    for key in sorted(found - set(expected)):
        raise ValueError(f"{where}: unexpected key {key!r}: not a module_to_save or bias this model has")
    values = {}
    for key, (target, current) in expected.items():
        value = tensors[key]
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(f"{where}: key {key!r} has shape {tuple(value.shape)}, the model needs "
                             f"{tuple(current.shape)}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{where}: key {key!r} holds NaN or inf values")
        values[target] = value
    return values


@torch.no_grad()
def copy_saved(model: nn.Module, adapter_name: str, plan: SavedPlan, values: dict) -> None:
    """Writes checked values (from load_saved) into the adapter's copies and the biases."""
    modules = set(plan.modules)
    for target, value in values.items():
        owner = next((m for m in modules if target.startswith(m + ".")), None)
        if owner is None:
            param = _bias(model, target)
        else:
            copy_module = model.get_submodule(owner).modules_to_save[adapter_name]
            key = target[len(owner) + 1:]
            param = copy_module.state_dict(keep_vars=True)[key]
        param.copy_(value.to(param.dtype))


def remove_saved(model: nn.Module, adapter_name: str) -> None:
    """Drops the adapter's copies; a wrapper left without copies gives its original module back."""
    for path, wrapper in _wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            del wrapper.modules_to_save[adapter_name]
        if wrapper.active_adapter == adapter_name:
            wrapper.active_adapter = None
        if not len(wrapper.modules_to_save):
            model.set_submodule(path, wrapper.original_module)


def unload_saved(model: nn.Module) -> None:
    """As PEFT's unload: every wrapper is replaced by the module that runs now (the active copy)."""
    for path, wrapper in _wrappers(model):
        model.set_submodule(path, wrapper.active_module)


