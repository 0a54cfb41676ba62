"""Refusals of misuse the model API would otherwise accept and get silently wrong: unsafe adapter
names, a base model wrapped twice, modules reachable at two paths, merges into shared weights and
merge calls that name no adapter."""
from __future__ import annotations

import re

from torch import nn

from .layer import MoSLinear
from .names import BASE_ADAPTER

__all__ = ["check_adapter_name", "check_not_wrapped", "check_single_paths", "merge_names",
           "check_merge_targets"]

_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_adapter_name(name, existing=()) -> None:
    """An adapter name is a directory name under save_pretrained's directory and a key of
    nn.ModuleDict: letters, digits, '_' and '-' only (no '/', no '..', no '.'), and none of the
    names that already mean something."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"adapter name must be letters, digits, '_' or '-' (it names a directory and "
                         f"a module key), got {name!r}")
    if name == BASE_ADAPTER:
        raise ValueError(f"adapter name {BASE_ADAPTER!r} is reserved for rows of a mixed batch that "
                         f"run the base model alone")
    if hasattr(nn.ModuleDict(), name):
        raise ValueError(f"adapter name {name!r} is an nn.Module attribute; pick another name")
    if name in existing:
        raise ValueError(f"adapter {name!r} already exists; delete_adapter() it first or pick another name")


def check_not_wrapped(model: nn.Module) -> None:
    """Refuses a base model that already carries MoS layers: a second MoSModel would re-point the
    first one's layers at its own pools, while the first would still save its old ones."""
    for path, module in model.named_modules():
        if isinstance(module, MoSLinear):
            raise ValueError(f"the model already has MoS adapters ({path!r} is an MoSLinear): it is the "
                             f"base of another MoSModel. Add adapters to that MoSModel with add_adapter(), "
                             f"or wrap a copy (copy.deepcopy(base_model))")


def check_single_paths(model: nn.Module, layouts: dict) -> None:
    """Refuses to adapt a module reachable at two paths: wrapping it at one path would leave calls
    through the other unadapted."""
    paths = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    for layout in layouts.values():
        for site in layout.sites:
            found = paths.get(id(site.module), [])
            if len(found) > 1:
                raise ValueError(f"module {site.path!r} is also reachable at {[p for p in found if p != site.path]}; "
                                 f"adapting it at one path would leave calls through the other unadapted")


def merge_names(model, adapter_names) -> list:
    """The adapters a merge means: the active one by default, one name as a string, or a list of
    known names. Raises ValueError for unknown names and when there is nothing to merge."""
    if adapter_names is None:
        if model.active_adapter is None:
            raise ValueError("no active adapter to merge; set_adapter() first or pass adapter_names")
        return list(model.active_adapters)  # several after set_adapter([...])
    names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
    if not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"adapter_names must be an adapter name or a non-empty list of them, got "
                         f"{adapter_names!r}")
    unknown = [n for n in names if n not in model.peft_config]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; adapters: {sorted(model.peft_config)}")
    return list(names)


def check_merge_targets(model, names) -> None:
    """Refuses to merge into a weight another module shares (a tied lm_head and input embedding):
    the merge would change that module too."""
    owners = {}
    for path, param in model.get_base_model().named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(path)
    for path, module in model.get_base_model().named_modules():
        if not isinstance(module, MoSLinear) or not set(names) & set(module.adapter_names):
            continue
        shared = [p for p in owners.get(id(module.base_layer.weight), []) if p != f"{path}.base_layer.weight"]
        if shared:
            raise ValueError(f"{path}.weight is shared with {shared} (tied weights); merging would change "
                             f"those too. Keep the adapter unmerged, or untie the weights first")
