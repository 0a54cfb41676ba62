"""MoSConfig: the settings of one MoS adapter, with LoRA's names where the meaning is LoRA's."""
from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import wraps
from typing import Optional, Union

from .peft_options import pop_peft_options


def _accepting_peft_options(init):
    """Wraps the dataclass __init__ so PEFT LoraConfig options are dropped or refused by name
    (ValueError) instead of failing as unexpected keywords."""
    @wraps(init)
    def __init__(self, *args, **kwargs):
        pop_peft_options(kwargs)
        init(self, *args, **kwargs)
    return __init__


def _help(text, default=MISSING, default_factory=MISSING):
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class MoSConfig:
    """Configuration of a MoS adapter (Wang et al., ICLR 2025, arXiv 2410.00938)."""

    r: int = _help("Forward rank of every adapted layer (LoRA's r); a module type with too few layers for it "
                   "gets the largest rank its pools allow, with a warning (see docs/choosing_parameters.md).", 8)
    equivalent_rank: int = _help(
        "Parameter budget in LoRA-rank units: the pools hold as many parameters as LoRA at this rank.", 2)
    shards_per_vector: int = _help("l: shards each rank vector is cut into (vector sharding).", 2)
    private_rank: int = _help("p: rank vectors each layer owns privately (shard privatization).", 1)
    lora_alpha: float = _help("Scaling numerator: scale = lora_alpha / r (or / sqrt(r) with rsLoRA).", 16.0)
    lora_dropout: float = _help("Dropout probability on the adapter's input.", 0.0)
    use_rslora: bool = _help("Use lora_alpha / sqrt(r) as the scale (rank-stabilised LoRA).", False)
    pair_dissociation: bool = _help("Draw the B-side indices independently of the A-side ones.", True)
    subset_selection: bool = _help(
        "Each layer draws a random subset of public shards; False means every layer takes all of them.", True)
    target_modules: Optional[Union[list, str]] = _help(
        "Module names to adapt (list of suffixes), a regex (str) or 'all-linear'.", None)
    rank_pattern: dict = _help(
        "Forward rank per module type ({'lm_head': 2}), overriding r (PEFT's rank_pattern, keyed by module "
        "type). Ranks lowered for types with too few layers are recorded here, so a saved adapter "
        "loads exactly.", default_factory=dict)
    exclude_modules: Optional[Union[list, str]] = _help(
        "Modules never adapted, with target_modules' rules: list of names/suffixes, or a regex (str).", None)
    layers_to_transform: Optional[Union[list, int]] = _help(
        "Adapt only these layer indices (int or list); with a list target_modules, as in PEFT.", None)
    layers_pattern: Optional[Union[list, str]] = _help(
        "Name(s) of the module list holding the layers (e.g. 'layers', 'h'), read with layers_to_transform.",
        None)
    modules_to_save: Optional[list] = _help(
        "Modules (names/suffixes) trained in full and saved with the adapter, e.g. a classifier head.", None)
    bias: str = _help("'none', 'all' (train every bias) or 'lora_only' (biases of adapted layers); "
                      "trained biases are saved with the adapter.", "none")
    seed: int = _help("Seed of the index tables and of the initial pool values.", 0)
    init_lora_weights: Union[bool, str] = _help(
        "True: A-pool Kaiming-uniform, B-pool zero (a fresh adapter is a no-op); 'gaussian': A-pool "
        "N(0, 1/r), B-pool zero; False: both pools random (not a no-op).", True)
    pool_dtype: str = _help("dtype of the pools (float32 keeps training stable with 16-bit bases).", "float32")
    layer_pattern: str = _help(
        "Regex whose first group is the layer index in a module path (for privatization).", r"\.(\d+)\.")
    base_model_name_or_path: Optional[str] = _help("Recorded in adapter_config.json for reference.", None)
    task_type: Optional[str] = _help("Recorded in adapter_config.json (PEFT's field).", None)
    peft_type: str = _help("Adapter family tag written to adapter_config.json.", "MOS")

    def __post_init__(self):
        for name in ("r", "equivalent_rank", "shards_per_vector"):
            _require_int(self, name, minimum=1)
        _require_int(self, "private_rank", minimum=0)
        _require_int(self, "seed", minimum=0)
        if self.private_rank > self.equivalent_rank:
            raise ValueError(f"private_rank={self.private_rank} must be <= equivalent_rank={self.equivalent_rank}")
        if self.private_rank > self.r:
            raise ValueError(f"private_rank={self.private_rank} must be <= r={self.r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not _finite(self.lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {self.lora_alpha!r}")
        if self.seed >= 2**64:
            raise ValueError(f"seed must be below 2**64, got {self.seed}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        for name in ("use_rslora", "pair_dissociation", "subset_selection"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _check_init(self.init_lora_weights)
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        for name in ("exclude_modules", "layers_pattern"):
            setattr(self, name, _names(name, getattr(self, name), regex_allowed=True))
        self.modules_to_save = _names("modules_to_save", self.modules_to_save, regex_allowed=False)
        self.layers_to_transform = _layer_indices(self.layers_to_transform)
        if self.pool_dtype not in ("float32", "float64", "float16", "bfloat16"):
            raise ValueError(f"pool_dtype must be float32, float64, float16 or bfloat16, got {self.pool_dtype!r}")
        if abs(self.scaling) > _LARGEST_FINITE[self.pool_dtype]:
            raise ValueError(f"lora_alpha={self.lora_alpha!r} gives scale {self.scaling:g}, which is not "
                             f"finite in pool_dtype {self.pool_dtype}")
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list, tuple, set)):
            raise ValueError(f"target_modules must be a list of names, a regex string or 'all-linear', "
                             f"got {type(self.target_modules).__name__}")
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_modules, list) and not all(isinstance(n, str) and n for n in self.target_modules):
            raise ValueError(f"target_modules: expected non-empty module names, got {self.target_modules!r}")
        # PEFT's LoraConfig refuses these two; accepting them would adapt every layer.
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ValueError(f"layers_to_transform cannot be used when target_modules is a str "
                             f"({self.target_modules!r}, a regex or 'all-linear'); list the module names, "
                             f"or put the layer indices into the regex")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError(f"layers_pattern={self.layers_pattern!r} is specified without "
                             f"layers_to_transform; give the layer indices too")
        if not isinstance(self.layer_pattern, str):
            raise ValueError(f"layer_pattern must be a regex string, got {type(self.layer_pattern).__name__}")
        for name in ("base_model_name_or_path", "task_type"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string or None, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.rank_pattern, dict):
            raise ValueError(f"rank_pattern must be a dict of module type -> r, got {type(self.rank_pattern).__name__}")
        for name, rank in self.rank_pattern.items():
            if not isinstance(name, str) or isinstance(rank, bool) or not isinstance(rank, int) \
                    or not self.private_rank <= rank or rank < 1:
                raise ValueError(f"rank_pattern[{name!r}] = {rank!r}: expected a module type name and an "
                                 f"integer r >= max(1, private_rank={self.private_rank})")
            # A lowered rank raises the type's scale: check it here so the error comes when the model is
            # built, not at its first forward.
            if abs(self.scaling_for(name)) > _LARGEST_FINITE[self.pool_dtype]:
                raise ValueError(f"lora_alpha={self.lora_alpha!r} gives {name} (r={rank}) the scale "
                                 f"{self.scaling_for(name):g}, which is not finite in pool_dtype {self.pool_dtype}")

    def rank_for(self, module_type: str) -> int:
        """The forward rank of `module_type`: rank_pattern's entry, else r."""
        return self.rank_pattern.get(module_type, self.r)

    def scaling_for(self, module_type: str) -> float:
        """The scale of `module_type`, from its own rank (as PEFT does with rank_pattern)."""
        rank = self.rank_for(module_type)
        return self.lora_alpha / (math.sqrt(rank) if self.use_rslora else rank)

    @property
    def scaling(self) -> float:
        """s = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (types in rank_pattern: scaling_for)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def is_prompt_learning(self) -> bool:
        """False: MoS is not a prompt-learning method (PEFT's PeftConfig attribute, read by PEFT and
        transformers code that inspects a model's peft_config)."""
        return False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MoSConfig":
        data = dict(data)
        pop_peft_options(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MoSConfig fields: {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _document_fields(cls):
    """Appends every field, its default and its help text to the class docstring, so that
    help(MoSConfig) explains each setting (the help texts are the one source)."""
    lines = []
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        lines.append(f"    {f.name} (default {default!r})\n        {f.metadata.get('help', '')}")
    cls.__doc__ = f"{cls.__doc__}\n\n    Fields:\n\n" + "\n".join(lines) + "\n"


_document_fields(MoSConfig)


# init_lora_weights values of PEFT that set each layer's A and B from that layer's own weights or
# data (SVD, quantization error, activations): shared pools hold no per-layer factors to set.
_PER_LAYER_INITS = ("pissa", "olora", "loftq", "eva", "corda", "orthogonal", "lora_ga")


def _check_init(value):
    if isinstance(value, bool) or value == "gaussian":
        return
    if isinstance(value, str) and value.lower().split("_niter_")[0] in _PER_LAYER_INITS:
        raise ValueError(f"init_lora_weights={value!r} is not supported by MoS: it derives each layer's A "
                         f"and B from that layer, but MoS layers gather them from shared pools; "
                         f"use True, False or 'gaussian'")
    raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {value!r}")


def _names(name, value, regex_allowed):
    """None, a list of non-empty module names, or (when allowed) one regex string."""
    if value is None or (regex_allowed and isinstance(value, str)):
        return value
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) and v for v in value):
        return sorted(value) if isinstance(value, set) else list(value)
    raise ValueError(f"{name} must be a list of module names{' or a regex string' if regex_allowed else ''}, "
                     f"got {value!r}")


def _layer_indices(value):
    if value is None:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise ValueError(f"layers_to_transform must be a layer index or a list of them, got {value!r}")
    return value if isinstance(value, int) else list(items)


# Largest finite value of each pool dtype: a larger scale turns every adapter output into inf/NaN.
_LARGEST_FINITE = {"float32": 3.4028234663852886e38, "float64": 1.7976931348623157e308,
                   "float16": 65504.0, "bfloat16": 3.3895313892515355e38}


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        return False


def _require_int(config, name, minimum):
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


MoSConfig.__init__ = _accepting_peft_options(MoSConfig.__init__)
