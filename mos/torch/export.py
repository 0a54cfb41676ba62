"""export_lora: a MoS adapter written as the plain PEFT LoRA adapter it is equivalent to.

Each adapted layer k gets its assembled A_k (r, d_in) and B_k (d_out, r) under PEFT's keys
base_model.model.<module path>.lora_{A,B}.weight, with the same r, lora_alpha and rsLoRA flag,
so peft.PeftModel.from_pretrained(base, dir) reproduces the MoS model's outputs.
"""
from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import save as safetensors_bytes

from .atomic import replace_directory, write_bytes
from .files import CONFIG_NAME, SAVED_PREFIX, WEIGHTS_NAME
from . import sharding
from .layer import MoSLinear
from .saved_modules import saved_tensors

__all__ = ["export_lora"]


def export_lora(mos_model, save_directory: str, adapter_name: str | None = None) -> None:
    """Writes `adapter_name` (default: the active adapter) of `mos_model` as a PEFT LoRA adapter.
    Under FSDP2's fully_shard, call it on every rank: what is sharded is gathered, rank 0 writes."""
    name = mos_model.active_adapter if adapter_name is None else adapter_name
    if isinstance(name, list):
        raise ValueError(f"adapters {name} are active together; export_lora writes one: pass adapter_name")
    if name not in mos_model.peft_config:
        raise ValueError(f"unknown adapter {name!r}; adapters: {sorted(mos_model.peft_config)}")
    config = mos_model.peft_config[name]
    tensors, paths, rank_pattern = {}, [], {}
    # Under FSDP2 every rank gathers the sharded pools and saved tensors (collectives); rank 0 writes.
    own = dict(mos_model.mos_pools[name].items())
    gathered, pools_sharded = sharding.gather_pools(own)
    whole = {id(shared): gathered[t] for t, shared in own.items()}
    with torch.no_grad():
        for module_type, entries in mos_model.adapter_paths(name).items():
            for path, layer in entries:
                if config.rank_for(module_type) != config.r:  # PEFT matches keys as "(.*\.)?(key)$"
                    rank_pattern[re.escape(path)] = config.rank_for(module_type)
                slot = layer.slot(name)
                a, b = whole[id(slot.pools)].assembled(slot.position)
                tensors[f"base_model.model.{path}.lora_A.weight"] = a.detach().to("cpu").contiguous()
                tensors[f"base_model.model.{path}.lora_B.weight"] = b.detach().to("cpu").contiguous()
                paths.append(path)
        plan = mos_model.saved_plan(name)
        saved, saved_sharded = sharding.gather_tensors(saved_tensors(mos_model.get_base_model(), name, plan))
        tensors.update(_peft_saved_keys(saved, set(paths)))
    sharded = pools_sharded or saved_sharded
    lora_config = {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "r": config.r,
        "rank_pattern": rank_pattern,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora,
        "target_modules": _lora_target_modules(mos_model.get_base_model(), paths),
        "bias": config.bias,
        # PEFT's flag for weights stored (d_in, d_out), as GPT-2's Conv1D (PEFT checks it per layer).
        "fan_in_fan_out": any(layer.fan_in_fan_out for entries in mos_model.adapter_paths(name).values()
                              for _, layer in entries),
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": plan.modules or None,
    }

    def fill(directory):
        write_bytes(os.path.join(directory, WEIGHTS_NAME), safetensors_bytes(tensors, {"format": "pt"}))
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(lora_config, f, indent=2, sort_keys=True)
            f.write("\n")

    # PEFT reads the two files separately, so they are switched in together: a kill -9 at any
    # instant leaves the previous export or this one.
    if not sharded or sharding.is_writer():
        replace_directory(save_directory, fill)
    if sharded:
        sharding.barrier()


def _peft_saved_keys(tensors, adapted):
    """modules_to_save and bias tensors under PEFT's keys: base_model.model.<path>, with the bias
    of an adapted layer under its base_layer (where PEFT's LoRA layer keeps it)."""
    renamed = {}
    for key, value in tensors.items():
        path = key.removeprefix(SAVED_PREFIX)
        module, _, leaf = path.rpartition(".")
        if module in adapted:
            path = f"{module}.base_layer.{leaf}"
        renamed[f"base_model.model.{path}"] = value
    return renamed


def _lora_target_modules(base_model, paths):
    """PEFT target_modules selecting exactly `paths` in the plain base model: the module names when
    they select exactly these modules (readable, PEFT's usual form), else a regex of the paths."""
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    selected = set()
    skip = []
    for path, module in base_model.named_modules():
        if skip and any(path.startswith(s) for s in skip):
            continue  # inside an MoSLinear: absent from the plain model the LoRA is loaded into
        if isinstance(module, MoSLinear):
            skip.append(path + ".")
        if path and any(path == n or path.endswith("." + n) for n in names):
            selected.add(path)
    if selected == set(paths):
        return names
    return "|".join(re.escape(p) for p in sorted(paths))
