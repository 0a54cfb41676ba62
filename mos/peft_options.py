"""PEFT LoraConfig options that MoSConfig does not take as fields, and what happens to each.

Users pass LoRA configs the way they wrote them for PEFT (`MoSConfig(use_dora=False, ...)` or
`MoSConfig(**lora_config.to_dict())`). Options that only describe the file or the run are accepted
and dropped; options that change what LoRA computes and that MoS does not implement are accepted
only at their "off" value, and raise ValueError naming the option otherwise.
"""
from __future__ import annotations

__all__ = ["IGNORED", "UNSUPPORTED", "pop_peft_options"]

# Accepted and dropped: bookkeeping, or decided by mos per module (Conv1D layers are detected, as
# PEFT itself overrides fan_in_fan_out per layer).
IGNORED = {
    "auto_mapping": "bookkeeping of PEFT's auto classes",
    "peft_version": "PEFT's version stamp",
    "revision": "hub revision of the base model",
    "inference_mode": "MoSModel.from_pretrained(..., is_trainable=...) decides it",
    "fan_in_fan_out": "mos reads each module's layout from its type (GPT-2's Conv1D is (in, out))",
    "megatron_core": "only read together with megatron_config",
    "qalora_group_size": "only read together with use_qalora",
}

# Accepted only at these values (PEFT's defaults, meaning "not used").
UNSUPPORTED = {
    "alpha_pattern": {}, "megatron_config": None, "trainable_token_indices": None,
    "loftq_config": {}, "eva_config": None, "corda_config": None, "lora_ga_config": None,
    "use_dora": False, "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False,
    "monteclora_config": None, "layer_replication": None, "runtime_config": None, "lora_bias": False,
    "target_parameters": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
    "ensure_weight_tying": False,
}


def _is_off(name, value) -> bool:
    if value is None or value is False or value == UNSUPPORTED[name]:
        return True
    if name == "runtime_config":  # LoraRuntimeConfig or its dict form; off when every flag is off
        flags = value if isinstance(value, dict) else getattr(value, "__dict__", None)
        return isinstance(flags, dict) and not any(flags.values())
    return isinstance(value, (dict, list, tuple)) and len(value) == 0


def pop_peft_options(kwargs: dict) -> None:
    """Removes PEFT-only options from `kwargs` in place; ValueError for one that is set to a value
    MoS does not implement. A PEFT `peft_type` of LORA becomes MOS (the config is now a MoS one)."""
    if str(getattr(kwargs.get("peft_type"), "value", kwargs.get("peft_type"))) == "LORA":
        kwargs.pop("peft_type")
    task_type = kwargs.get("task_type")
    if task_type is not None and hasattr(task_type, "value"):  # PEFT's TaskType enum
        kwargs["task_type"] = str(task_type.value)
    for name in [n for n in kwargs if n in IGNORED]:
        del kwargs[name]
    for name in [n for n in kwargs if n in UNSUPPORTED]:
        value = kwargs.pop(name)
        if not _is_off(name, value):
            raise ValueError(f"{name}={value!r} is not supported by MoS (a PEFT LoraConfig option MoS does "
                             f"not implement); leave it at {UNSUPPORTED[name]!r}")
