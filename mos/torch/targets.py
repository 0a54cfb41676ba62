"""Which modules an adapter adapts, grouped into module types that share pools.

Matching follows PEFT's rules so configs carry over: a list matches a module path exactly or as a
dotted suffix; a string is a regex that must match the whole path (re.fullmatch); "all-linear"
is every nn.Linear except the output head. A module's type is its attribute name (q_proj); its
layer index is the first group of config.layer_pattern searched in its path
(model.layers.3.self_attn.q_proj -> 3). Within a type, layers are ordered by layer index (ties:
order of appearance); that order is the position used for privatization and the index tables.
exclude_modules, layers_to_transform / layers_pattern and modules_to_save narrow the matches as in
PEFT. Modules that share a name but not a shape (CLIP's text and vision q_proj) form one type per
shape, named "<name>_<d_in>x<d_out>"; the name depends only on the model, so every adapter of a
model names its types alike.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .base_layers import features, is_adaptable
from .layer import MoSLinear

__all__ = ["Site", "TypeLayout", "find_targets", "listed_targets", "default_target_modules", "ALL_LINEAR"]

ALL_LINEAR = "all-linear"

# PEFT's defaults for the architectures people fine-tune most (its LoRA mapping).
_DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "olmo": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"], "bart": ["q_proj", "v_proj"], "t5": ["q", "v"], "mt5": ["q", "v"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"], "gptj": ["q_proj", "v_proj"], "gpt_neo": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"], "bloom": ["query_key_value"], "falcon": ["query_key_value"],
}


@dataclass
class Site:
    """One module to adapt: its path in the model, the module (nn.Linear or an MoSLinear already
    carrying other adapters) and the layer index read from its path (None when absent)."""
    path: str
    module: nn.Module
    layer_index: int | None

    @property
    def linear(self) -> nn.Module:
        """The wrapped layer: nn.Linear (bitsandbytes ones included) or GPT-2's Conv1D."""
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


# Classification heads "all-linear" leaves alone for task_type="SEQ_CLS" (PEFT's list).
_SEQ_CLS_HEADS = ("classifier", "score")


def _output_head_paths(model: nn.Module, task_type=None) -> set:
    """Paths of the output head "all-linear" leaves alone: get_output_embeddings(), lm_head, and
    for sequence classification the classifier head."""
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
        if task_type == "SEQ_CLS" and path in _SEQ_CLS_HEADS:
            paths.add(path)
    return paths


def _candidate_modules(model: nn.Module):
    """(path, module) of every module except wrapper internals: the base_layer inside an MoSLinear,
    and everything inside a modules_to_save wrapper (its original module and each adapter's copy)."""
    from .saved_modules import ModulesToSaveWrapper  # imports files, which imports this module

    wrapped = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(prefix) for prefix in wrapped):
            continue
        if isinstance(module, (MoSLinear, ModulesToSaveWrapper)):
            wrapped.append(path + ".")
        yield path, module


def _name_matcher(option, names):
    """PEFT's rule: a list matches a path exactly or as a dotted suffix; a string is a full regex."""
    if isinstance(names, str):
        try:
            pattern = re.compile(names)
        except re.error as err:
            raise ValueError(f"{option}: invalid regex {names!r}: {err}") from None
        return lambda path: pattern.fullmatch(path) is not None
    names = list(names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{option}: expected non-empty module names, got {names!r}")
    return lambda path: any(path == n or path.endswith("." + n) for n in names)


def _matcher(config, model):
    target_modules = config.target_modules
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        heads = _output_head_paths(model, config.task_type)
        matches = lambda path, module: is_adaptable(_unwrapped(module)) and path not in heads  # noqa: E731
    else:
        by_name = _name_matcher("target_modules", target_modules)
        matches = lambda path, module: by_name(path)  # noqa: E731
        if not isinstance(target_modules, str) and config.layers_to_transform is not None:
            in_layers = _layer_filter(config.layers_to_transform, config.layers_pattern)
            matches = lambda path, module: by_name(path) and in_layers(path)  # noqa: E731
    excluded = [_name_matcher("exclude_modules", config.exclude_modules)] if config.exclude_modules else []
    if config.modules_to_save:  # PEFT never adapts inside a module it saves whole
        saved = [re.compile(rf"(^|.*\.){re.escape(m)}($|\..*)") for m in config.modules_to_save]
        excluded.append(lambda path: any(p.match(path) for p in saved))
    return lambda path, module: matches(path, module) and not any(e(path) for e in excluded)


def _layer_filter(layers_to_transform, layers_pattern):
    """Path -> whether its layer index (PEFT's rule: the first numbered segment, or the one after
    layers_pattern) is in layers_to_transform."""
    wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
    if not layers_pattern:
        patterns = [re.compile(r".*?\.[^.]*\.(\d+)\.")]
    else:
        names = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        patterns = [re.compile(rf"(?:^|.*?\.){name}\.(\d+)\.") for name in names]

    def in_layers(path):
        for pattern in patterns:
            match = pattern.match(path)
            if match is not None:
                return int(match.group(1)) in wanted
        return False
    return in_layers


def _unwrapped(module):
    return module.base_layer if isinstance(module, MoSLinear) else module


def _layer_index(path: str, layer_pattern: re.Pattern):
    match = layer_pattern.search(path)
    return None if match is None else int(match.group(1))


def find_targets(model: nn.Module, config) -> dict:
    """{module type: TypeLayout} of the modules config selects (target_modules, exclude_modules,
    layers_to_transform, layers_pattern, modules_to_save, layer_pattern). Pure: changes nothing.

    Raises ValueError when nothing matches or when a match is not a linear layer."""
    target_modules = config.target_modules
    if target_modules is None:
        raise ValueError("target_modules is None and there is no default for this model; "
                         "set it to module names (e.g. ['q_proj', 'v_proj']), a regex or 'all-linear'")
    try:
        layer_re = re.compile(config.layer_pattern)
    except re.error as err:
        raise ValueError(f"layer_pattern: invalid regex {config.layer_pattern!r}: {err}") from None
    if layer_re.groups < 1:
        raise ValueError(f"layer_pattern: {config.layer_pattern!r} needs a group capturing the layer index")
    matches = _matcher(config, model)
    candidates = list(_candidate_modules(model))
    type_names = _type_names(candidates)
    layouts = {}
    for path, module in candidates:
        if not matches(path, module):
            continue
        if not is_adaptable(_unwrapped(module)):
            raise ValueError(f"target_modules={target_modules!r} matches {path!r}, a "
                             f"{type(module).__name__}; MoS adapts linear layers only (nn.Linear, "
                             f"GPT-2's Conv1D, bitsandbytes Linear4bit/Linear8bitLt)")
        site = Site(path, module, _layer_index(path, layer_re))
        shape = features(site.linear)
        module_type = type_names[(path.rsplit(".", 1)[-1], shape)]
        layouts.setdefault(module_type, TypeLayout(module_type, *shape)).sites.append(site)
    if not layouts:
        linear = [p for p, m in candidates if is_adaptable(_unwrapped(m))]
        hint = ", ".join(sorted({p.rsplit(".", 1)[-1] for p in linear})[:12]) or "none"
        names = {p.rsplit(".", 1)[-1] for p in linear}
        regex_note = (f"; a string is a regex matched against the whole module path (such as "
                      f"{next(p for p in linear if p.endswith(target_modules))!r}): for the module name "
                      f"pass a list, target_modules=[{target_modules!r}]"
                      if isinstance(target_modules, str) and target_modules in names else "")
        raise ValueError(f"target_modules={target_modules!r} matched no module of {type(model).__name__} "
                         f"(its linear module names: {hint}; exclude_modules={config.exclude_modules!r}, "
                         f"layers_to_transform={config.layers_to_transform!r}){regex_note}")
    for layout in layouts.values():
        # Stable sort: ties (and paths without an index) keep their order of appearance.
        layout.sites.sort(key=lambda s: -1 if s.layer_index is None else s.layer_index)
    return layouts


def listed_targets(model: nn.Module, listed: dict) -> dict:
    """{module type: TypeLayout} of exactly the modules `listed` names, as an adapter file stores
    them ({type: {"d_in", "d_out", "modules": [path by position]}}). No pattern is evaluated, so a
    file's regexes never run. Raises ValueError when a path is absent, not linear, inside an
    adapted layer, listed twice or of another shape than its type's."""
    seen, layouts = set(), {}
    for module_type, entry in listed.items():
        layout = layouts[module_type] = TypeLayout(module_type, entry["d_in"], entry["d_out"])
        for path in entry["modules"]:
            if path in seen:
                raise ValueError(f"module {path!r} is listed twice")
            seen.add(path)
            parts = path.split(".")
            try:
                parents = [model.get_submodule(".".join(parts[:k])) for k in range(1, len(parts))]
                module = model.get_submodule(path)
            except AttributeError:
                raise ValueError(f"module type {module_type!r}: this model has no module {path!r}") from None
            if any(isinstance(p, MoSLinear) for p in parents) or not is_adaptable(_unwrapped(module)):
                raise ValueError(f"module type {module_type!r}: {path!r} is a {type(module).__name__} "
                                 f"inside {type(parents[-1]).__name__ if parents else 'the model'}, not a "
                                 f"linear layer MoS can adapt")
            shape = features(_unwrapped(module))
            if shape != (layout.d_in, layout.d_out):
                raise ValueError(f"module type {module_type!r} was saved for {layout.d_in} -> {layout.d_out}, "
                                 f"this model's {path!r} is {shape[0]} -> {shape[1]}")
            layout.sites.append(Site(path, module, None))
    return layouts


def _type_names(candidates) -> dict:
    """{(attribute name, (d_in, d_out)): type name} over every linear-like module of the model: the
    attribute name, or "<name>_<d_in>x<d_out>" when the model has that name in several shapes."""
    shapes = {}
    for path, module in candidates:
        if is_adaptable(_unwrapped(module)):
            shapes.setdefault(path.rsplit(".", 1)[-1], set()).add(features(_unwrapped(module)))
    return {(name, shape): name if len(found) == 1 else f"{name}_{shape[0]}x{shape[1]}"
            for name, found in shapes.items() for shape in found}
