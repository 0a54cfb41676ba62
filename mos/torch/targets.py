"""Which modules an adapter adapts, grouped into module types that share pools.

Matching follows PEFT's rules so configs carry over: a list matches a module path exactly or as a
dotted suffix; a string is a regex that must match the whole path (re.fullmatch); "all-linear"
is every nn.Linear except the output head. A module's type is its attribute name (q_proj); its
layer index is the first group of config.layer_pattern searched in its path
(model.layers.3.self_attn.q_proj -> 3). Within a type, layers are ordered by layer index (ties:
order of appearance); that order is the position used for privatization and the index tables.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .layer import MoSLinear

__all__ = ["Site", "TypeLayout", "find_targets", "default_target_modules", "ALL_LINEAR"]

ALL_LINEAR = "all-linear"

# PEFT's defaults for the architectures people fine-tune most (its LoRA mapping).
_DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "olmo": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"], "bart": ["q_proj", "v_proj"], "t5": ["q", "v"], "mt5": ["q", "v"],
    "bert": ["query", "value"], "roberta": ["query", "value"],
}


@dataclass
class Site:
    """One module to adapt: its path in the model, the module (nn.Linear or an MoSLinear already
    carrying other adapters) and the layer index read from its path (None when absent)."""
    path: str
    module: nn.Module
    layer_index: int | None

    @property
    def linear(self) -> nn.Linear:
        return self.module.base_layer if isinstance(self.module, MoSLinear) else self.module


@dataclass
class TypeLayout:
    """The modules of one type, in position order (sites[k] is at position k)."""
    module_type: str
    d_in: int
    d_out: int
    sites: list = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return len(self.sites)

    @property
    def paths(self) -> list:
        return [s.path for s in self.sites]


def default_target_modules(model: nn.Module):
    """PEFT's default targets for the model's architecture, or None when unknown."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = _DEFAULT_TARGETS.get(model_type)
    return list(targets) if targets else None


def _output_head_paths(model: nn.Module) -> set:
    """Paths of the output head "all-linear" leaves alone: get_output_embeddings() and lm_head."""
    head = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
    paths = set()
    for path, module in model.named_modules():
        if (head is not None and module is head) or path.rsplit(".", 1)[-1] == "lm_head":
            paths.add(path)
    return paths


def _candidate_modules(model: nn.Module):
    """(path, module) of every module except those inside an MoSLinear (its base_layer)."""
    wrapped = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(prefix) for prefix in wrapped):
            continue
        if isinstance(module, MoSLinear):
            wrapped.append(path + ".")
        yield path, module


def _matcher(target_modules, model):
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        heads = _output_head_paths(model)
        return lambda path, module: isinstance(module, (nn.Linear, MoSLinear)) and path not in heads
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules: invalid regex {target_modules!r}: {err}") from None
        return lambda path, module: pattern.fullmatch(path) is not None
    names = list(target_modules)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"target_modules: expected non-empty module names, got {target_modules!r}")
    return lambda path, module: any(path == n or path.endswith("." + n) for n in names)


def _layer_index(path: str, layer_pattern: re.Pattern):
    match = layer_pattern.search(path)
    return None if match is None else int(match.group(1))


def find_targets(model: nn.Module, target_modules, layer_pattern: str) -> dict:
    """{module type: TypeLayout} of the modules `target_modules` selects. Pure: changes nothing.

    Raises ValueError when nothing matches, when a match is not a linear layer, or when modules of
    one type disagree on (d_in, d_out)."""
    if target_modules is None:
        raise ValueError("target_modules is None and there is no default for this model; "
                         "set it to module names (e.g. ['q_proj', 'v_proj']), a regex or 'all-linear'")
    try:
        layer_re = re.compile(layer_pattern)
    except re.error as err:
        raise ValueError(f"layer_pattern: invalid regex {layer_pattern!r}: {err}") from None
    if layer_re.groups < 1:
        raise ValueError(f"layer_pattern: {layer_pattern!r} needs a group capturing the layer index")
    matches = _matcher(target_modules, model)
    layouts = {}
    for path, module in _candidate_modules(model):
        if not matches(path, module):
            continue
        if not isinstance(module, (nn.Linear, MoSLinear)):
            raise ValueError(f"target_modules={target_modules!r} matches {path!r}, a "
                             f"{type(module).__name__}; MoS adapts nn.Linear layers only")
        site = Site(path, module, _layer_index(path, layer_re))
        module_type = path.rsplit(".", 1)[-1]
        shape = (site.linear.in_features, site.linear.out_features)
        layout = layouts.setdefault(module_type, TypeLayout(module_type, *shape))
        if shape != (layout.d_in, layout.d_out):
            first = layout.sites[0].path
            raise ValueError(f"module type {module_type!r}: {path!r} is {shape[0]} -> {shape[1]} but "
                             f"{first!r} is {layout.d_in} -> {layout.d_out}; one type shares one pool, "
                             f"so its modules must agree (target them separately with a regex)")
        layout.sites.append(site)
    if not layouts:
        linear = [p for p, m in _candidate_modules(model) if isinstance(m, (nn.Linear, MoSLinear))]
        hint = ", ".join(sorted({p.rsplit(".", 1)[-1] for p in linear})[:12]) or "none"
        raise ValueError(f"target_modules={target_modules!r} matched no module of {type(model).__name__} "
                         f"(its linear module names: {hint})")
    for layout in layouts.values():
        # Stable sort: ties (and paths without an index) keep their order of appearance.
        layout.sites.sort(key=lambda s: -1 if s.layer_index is None else s.layer_index)
    return layouts
