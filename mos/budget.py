"""Parameter, memory and adapter-file budgets of MoS and LoRA from shapes alone (no weights).

A model is described by its adapted *module types*: one `ModuleType(name, d_in, d_out, n_layers)` per
attribute name (`q_proj`, `down_proj`, ...), exactly the grouping MoS pools by. Counting goes through
`ShardPool`, so a config that MoS would reject raises the same `ValueError` here.

    >>> from mos import MoSConfig
    >>> from mos.budget import llama_module_types, mos_budget, lora_budget
    >>> types = llama_module_types(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32)
    >>> mos_budget(types, MoSConfig(r=8, equivalent_rank=2, shards_per_vector=2, private_rank=1)).trainable_params
    4997120
    >>> lora_budget(types, r=64).trainable_params
    159907840

Byte counts assume what training and saving actually store: adapter weights in `pool_dtype`
(LoRA: `dtype`), gradients of the same size, AdamW's two fp32 moments per trainable parameter, and
an adapter file holding the weights plus (MoS) the int32 index tables, two (L, r*l) tables per type.
File sizes are tensor payload only; the safetensors header and adapter_config.json add a few KB.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .config import MoSConfig
from .pool import ShardPool
from .ranks import fit_ranks

__all__ = ["ModuleType", "Budget", "llama_module_types", "module_types_from_model", "mos_budget",
           "lora_budget", "DTYPE_BYTES", "LLAMA_TARGETS"]

DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
INDEX_BYTES = 4  # index tables are int32
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModuleType:
    """All `n_layers` linear layers called `name`, each mapping d_in -> d_out."""

    name: str
    d_in: int
    d_out: int
    n_layers: int


@dataclass(frozen=True)
class Budget:
    """What one adapter costs: parameters, and bytes in training and on disk."""

    method: str
    trainable_params: int
    weight_bytes_per_param: int = 4
    index_entries: int = 0  # int32 entries saved with the adapter (MoS index tables)
    optimizer_states: int = 2  # AdamW: exp_avg and exp_avg_sq
    optimizer_state_bytes: int = 4  # fp32 moments

    @property
    def weight_bytes(self) -> int:
        """Trainable weights in memory."""
        return self.trainable_params * self.weight_bytes_per_param

    @property
    def grad_bytes(self) -> int:
        """Gradients of the trainable weights (same dtype as the weights)."""
        return self.trainable_params * self.weight_bytes_per_param

    @property
    def optimizer_bytes(self) -> int:
        """Optimizer state: `optimizer_states` moments per trainable parameter."""
        return self.trainable_params * self.optimizer_states * self.optimizer_state_bytes

    @property
    def training_bytes(self) -> int:
        """Weights + gradients + optimizer state of the adapter (activations excluded)."""
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def index_bytes(self) -> int:
        return self.index_entries * INDEX_BYTES

    @property
    def file_bytes(self) -> int:
        """Tensor payload of the saved adapter: weights plus index tables."""
        return self.weight_bytes + self.index_bytes


def llama_module_types(hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                       num_attention_heads: int | None = None, num_key_value_heads: int | None = None,
                       head_dim: int | None = None,
                       target_modules: Iterable[str] = LLAMA_TARGETS) -> list[ModuleType]:
    """The linear layers of a Llama-architecture decoder (LlamaConfig's field names).

    k_proj/v_proj output `num_key_value_heads * head_dim` (grouped-query attention); without head
    counts they output `hidden_size`, as in LLaMA-2-7B."""
    if num_attention_heads is not None:
        head_dim = head_dim or hidden_size // num_attention_heads
        q_out = num_attention_heads * head_dim
        kv_out = (num_key_value_heads or num_attention_heads) * head_dim
    else:
        q_out = kv_out = hidden_size
    shapes = {
        "q_proj": (hidden_size, q_out), "k_proj": (hidden_size, kv_out), "v_proj": (hidden_size, kv_out),
        "o_proj": (q_out, hidden_size), "gate_proj": (hidden_size, intermediate_size),
        "up_proj": (hidden_size, intermediate_size), "down_proj": (intermediate_size, hidden_size),
    }
    targets = list(target_modules)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"target_modules: unknown Llama module(s) {unknown}; known: {sorted(shapes)}")
    return [ModuleType(t, *shapes[t], num_hidden_layers) for t in targets]


def module_types_from_model(model, target_modules: Iterable[str]) -> list[ModuleType]:
    """Groups a model's linear layers (anything with `in_features`/`out_features`) whose last name
    component is in `target_modules`. Works on a meta-device model, so no weights are needed."""
    targets = set(target_modules)
    found: dict[str, list] = {}
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if leaf in targets and hasattr(module, "in_features") and hasattr(module, "out_features"):
            found.setdefault(leaf, []).append((path, int(module.in_features), int(module.out_features)))
    types = []
    for name in sorted(found):
        dims = {(d_in, d_out) for _, d_in, d_out in found[name]}
        if len(dims) != 1:
            raise ValueError(f"modules called {name!r} have different shapes {sorted(dims)}; "
                             f"MoS pools need one (d_in, d_out) per module type")
        (d_in, d_out), = dims
        types.append(ModuleType(name, d_in, d_out, len(found[name])))
    return types


def mos_budget(module_types: Iterable[ModuleType], config: MoSConfig) -> Budget:
    """MoS's cost for these module types under `config` (validated, and r lowered for types with
    too few layers, exactly as MoS would)."""
    module_types = list(module_types)
    config = fit_ranks(config, [(t.name, t.d_in, t.d_out, t.n_layers) for t in module_types])
    params = entries = 0
    for t in module_types:
        pool = ShardPool(t.name, t.d_in, t.d_out, t.n_layers, config)
        params += pool.num_parameters()
        entries += 2 * t.n_layers * pool.rank * config.shards_per_vector  # index_a and index_b
    label = (f"MoS R_e={config.equivalent_rank} r={config.r} l={config.shards_per_vector} "
             f"p={config.private_rank}")
    return Budget(label, params, DTYPE_BYTES[config.pool_dtype], entries)


def lora_budget(module_types: Iterable[ModuleType], r: int, dtype: str = "float32") -> Budget:
    """LoRA's cost at rank `r`: A (r x d_in) and B (d_out x r) per layer."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    params = sum(t.n_layers * r * (t.d_in + t.d_out) for t in module_types)
    return Budget(f"LoRA r={r}", params, DTYPE_BYTES[dtype])

