"""Adapter files: adapter_config.json + adapter_model.safetensors, written atomically, validated on load.

The safetensors file holds, per module type T, the pools and the fixed index tables:
    T.pool_a  (n_shards, d_in / l)   pool dtype        T.index_a  (n_layers, r * l)  int32
    T.pool_b  (n_shards, d_out / l)  pool dtype        T.index_b  (n_layers, r * l)  int32
and in its metadata the module paths of each type in position order, so loading into a model whose
matches differ fails loudly instead of giving layers someone else's private shards.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import MoSConfig
from .pools import torch_dtype

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "AdapterFiles", "write_adapter", "read_adapter",
           "validate_adapter", "atomic_write", "write_json"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = "1"
_TENSOR_FIELDS = ("pool_a", "pool_b", "index_a", "index_b")


# ---------------------------------------------------------------------------- writing


def atomic_write(path: str, write) -> None:
    """Calls write(tmp_path) on a temporary file next to `path`, then renames it over `path`, so
    readers see the old file or the new one, never a torn one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, data: dict) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
    atomic_write(path, write)


def write_adapter(directory: str, config: MoSConfig, pools: dict, paths: dict) -> None:
    """Writes one adapter: `pools` is {type: SharedPools}, `paths` {type: [module path by position]}."""
    os.makedirs(directory, exist_ok=True)
    tensors, layout = {}, {}
    for module_type, shared in pools.items():
        for name in _TENSOR_FIELDS:
            tensors[f"{module_type}.{name}"] = getattr(shared, name).detach().to("cpu").contiguous()
        layout[module_type] = {"d_in": shared.d_in, "d_out": shared.d_out, "modules": list(paths[module_type])}
    metadata = {"format": "pt", "mos_format": FORMAT_VERSION, "mos_layout": json.dumps(layout)}
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, metadata))
    write_json(os.path.join(directory, CONFIG_NAME), config.to_dict())


# ---------------------------------------------------------------------------- reading


@dataclass
class AdapterFiles:
    """The contents of one adapter directory, read but not yet checked against a model."""
    directory: str
    config: MoSConfig
    tensors: dict
    layout: dict | None  # {type: {"d_in", "d_out", "modules"}} from the metadata, if present


def read_adapter(directory: str) -> AdapterFiles:
    """Reads and parses both files; raises ValueError naming the file (and field) on any defect."""
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file (expected a MoS adapter directory)")
    try:
        with open(config_path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path}: not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(data).__name__}")
    if data.get("peft_type", "MOS") != "MOS":
        raise ValueError(f"{config_path}: peft_type {data.get('peft_type')!r} is not a MoS adapter")
    try:
        config = MoSConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: {err}") from None
    try:
        with safe_open(weights_path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({err})") from None
    layout = None
    if "mos_layout" in metadata:
        try:
            layout = json.loads(metadata["mos_layout"])
        except json.JSONDecodeError as err:
            raise ValueError(f"{weights_path}: metadata 'mos_layout' is not valid JSON ({err})") from None
    return AdapterFiles(directory, config, tensors, layout)


def validate_adapter(files: AdapterFiles, shard_pools: dict, layouts: dict) -> dict:
    """Checks the tensors against the pools this model needs; returns {type: (values, tables)}.

    `shard_pools` is {type: ShardPool} built from files.config and the model's matches, `layouts`
    {type: TypeLayout}. Raises ValueError naming the offending key; changes nothing."""
    where = os.path.join(files.directory, WEIGHTS_NAME)
    expected = {f"{t}.{name}" for t in shard_pools for name in _TENSOR_FIELDS}
    missing = sorted(expected - set(files.tensors))
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r} (the model's target modules need pools for "
                         f"{sorted(shard_pools)})")
    unexpected = sorted(set(files.tensors) - expected)
    if unexpected:
        raise ValueError(f"{where}: unexpected key {unexpected[0]!r}: the adapter has state for modules "
                         f"target_modules does not match in this model")
    pool_dtype = torch_dtype(files.config.pool_dtype)
    result = {}
    for module_type, sp in shard_pools.items():
        _check_layout(where, files.layout, layouts[module_type])
        values = []
        for name, shape in (("pool_a", sp.pool_a_shape), ("pool_b", sp.pool_b_shape)):
            key, t = f"{module_type}.{name}", files.tensors[f"{module_type}.{name}"]
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{where}: key {key!r} has shape {tuple(t.shape)}, the config and model "
                                 f"need {tuple(shape)}")
            if t.dtype != pool_dtype:
                raise ValueError(f"{where}: key {key!r} has dtype {t.dtype}, the config says pool_dtype="
                                 f"{files.config.pool_dtype!r}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{where}: key {key!r} holds NaN or inf values")
            values.append(t)
        tables = []
        for name in ("index_a", "index_b"):
            key, t = f"{module_type}.{name}", files.tensors[f"{module_type}.{name}"]
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise ValueError(f"{where}: key {key!r} has dtype {t.dtype}, expected int32 indices")
            tables.append(t.numpy())
        try:
            sp.set_index_tables(*tables)  # shape, range, distinctness and privatization
        except ValueError as err:  # ShardPool says "<type>.<table>: <problem>"
            key, _, problem = str(err).partition(": ")
            raise ValueError(f"{where}: key {key!r}: {problem}") from None
        result[module_type] = (values, sp.index_tables())
    return result


def _check_layout(where, saved_layout, layout):
    if saved_layout is None:
        return  # written by another tool: shapes are still checked tensor by tensor
    saved = saved_layout.get(layout.module_type)
    if saved is None:
        raise ValueError(f"{where}: metadata has no module type {layout.module_type!r}")
    if (saved.get("d_in"), saved.get("d_out")) != (layout.d_in, layout.d_out):
        raise ValueError(f"{where}: module type {layout.module_type!r} was saved for "
                         f"{saved.get('d_in')} -> {saved.get('d_out')}, this model has "
                         f"{layout.d_in} -> {layout.d_out}")
    if list(saved.get("modules", [])) != layout.paths:
        raise ValueError(f"{where}: module type {layout.module_type!r} was saved for modules "
                         f"{_short(saved.get('modules', []))}, this model's matches are {_short(layout.paths)}")


def _short(paths, n=4):
    paths = list(paths)
    return repr(paths) if len(paths) <= n else repr(paths[:n])[:-1] + f", ... ({len(paths)} in all)]"
