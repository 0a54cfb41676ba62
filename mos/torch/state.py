"""An adapter's state as tensors: PEFT's get_peft_model_state_dict for a MoSModel.

PEFT's own `peft.get_peft_model_state_dict` refuses a MoSModel with "Unknown PEFT type passed: MOS"
(MoS is not one of PEFT's PeftTypes); this function takes its place with the same arguments.
"""
from __future__ import annotations

from . import saved_modules
from .files import TENSOR_FIELDS
from .model import MoSModel

__all__ = ["get_peft_model_state_dict"]


def get_peft_model_state_dict(model: MoSModel, state_dict: dict | None = None, adapter_name: str = "default") -> dict:
    """{"<type>.pool_a" | "pool_b" | "index_a" | "index_b": tensor, plus any modules_to_save and
    bias tensors} of one adapter: the keys and tensors of its adapter_model.safetensors. The pools
    come from `state_dict` (a MoSModel.state_dict(), e.g. gathered by a distributed wrapper) when
    given, else from the model's own tensors."""
    if not isinstance(model, MoSModel):
        raise TypeError(f"model must be a MoSModel, got {type(model).__name__}; for a peft.PeftModel "
                        f"use peft.get_peft_model_state_dict")
    if adapter_name not in model.peft_config:
        raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {sorted(model.peft_config)}")
    plan = model.saved_plan(adapter_name)
    if state_dict is None:
        out = {f"{module_type}.{name}": getattr(pools, name)
               for module_type, pools in model.mos_pools[adapter_name].items() for name in TENSOR_FIELDS}
        out.update(saved_modules.saved_tensors(model.get_base_model(), adapter_name, plan))
        return out
    if plan.modules or plan.biases:
        raise ValueError(f"adapter {adapter_name!r} saves modules_to_save or biases besides its pools; "
                         f"state_dict= gives only pools: call without state_dict for the whole adapter")
    prefix = f"mos_pools.{adapter_name}."
    out = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if not out:
        raise ValueError(f"state_dict holds no key starting with {prefix!r}; pass MoSModel.state_dict()")
    return out
