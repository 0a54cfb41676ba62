"""Adapter files: adapter_config.json + adapter_model.safetensors, written atomically, validated on load.

The safetensors file holds, per module type T, the pools and the fixed index tables:
    T.pool_a  (n_shards, d_in / l)   pool dtype        T.index_a  (n_layers, r * l)  int32
    T.pool_b  (n_shards, d_out / l)  pool dtype        T.index_b  (n_layers, r * l)  int32
and in its metadata the module paths of each type in position order, so loading into a model whose
matches differ fails loudly instead of giving layers someone else's private shards. The metadata
also holds the config and a save id that adapter_config.json repeats: the weights file is the one
commit point of a save, so a kill -9 at any instant leaves the old adapter or the new one.
A config whose module selection holds patterns (a regex target_modules, exclude_modules or
layer_pattern) loads onto the module list in the metadata: patterns from files are never evaluated.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import warnings
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load, save as safetensors_bytes

from ..config import MoSConfig
from .atomic import atomic_write, read_regular_file, remove_stale_temporaries, write_bytes, write_json
from .pools import torch_dtype
from .targets import ALL_LINEAR

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "AdapterFiles", "write_adapter", "read_adapter",
           "validate_adapter", "check_layouts"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = "1"
SAVE_ID = "mos_save_id"  # in both files: which save each one comes from
TENSOR_FIELDS = ("pool_a", "pool_b", "index_a", "index_b")
SAVED_PREFIX = "saved:"  # modules_to_save and trained biases, by path in the plain model (saved_modules.py)


# ---------------------------------------------------------------------------- writing


def write_adapter(directory: str, config: MoSConfig, pools: dict, paths: dict, saved=None) -> None:
    """Writes one adapter: `pools` is {type: SharedPools}, `paths` {type: [module path by position]},
    `saved` {SAVED_PREFIX + path: tensor} (modules_to_save, biases).

    The weights file is the commit point: it carries the config and a save id in its metadata, and
    the config file written after it repeats that id. A kill between the two leaves new weights
    beside an older config; read_adapter sees the ids differ and takes the weights' own config."""
    config = _config_of_pools(config, pools)
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(directory)
    tensors, layout = {}, {}
    for module_type, shared in pools.items():
        for name in TENSOR_FIELDS:
            tensors[f"{module_type}.{name}"] = getattr(shared, name).detach().to("cpu").contiguous()
        layout[module_type] = {"d_in": shared.d_in, "d_out": shared.d_out, "modules": list(paths[module_type])}
    tensors.update(saved or {})
    save_id = secrets.token_hex(16)
    config_data = config.to_dict()
    metadata = {"format": "pt", "mos_format": FORMAT_VERSION, "mos_layout": json.dumps(layout),
                "mos_config": json.dumps(config_data), SAVE_ID: save_id}
    weights = safetensors_bytes(tensors, metadata)
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda tmp: write_bytes(tmp, weights))
    write_json(os.path.join(directory, CONFIG_NAME), {**config_data, SAVE_ID: save_id})


def _config_of_pools(config: MoSConfig, pools: dict) -> MoSConfig:
    """The config to save with `pools`: pool_dtype says what the pools hold (model.to(dtype) casts
    them). Raises ValueError, before anything is written, for pools no load would accept."""
    dtypes = {t.dtype for shared in pools.values() for t in (shared.pool_a, shared.pool_b)}
    if len(dtypes) != 1:
        raise ValueError(f"the adapter's pools have mixed dtypes {sorted(map(str, dtypes))}; cast them "
                         f"to one dtype before saving")
    dtype = dtypes.pop()
    name = str(dtype).removeprefix("torch.")
    if name not in ("float32", "float64", "float16", "bfloat16"):
        raise ValueError(f"the adapter's pools are {dtype}; an adapter file holds float32, float64, "
                         f"float16 or bfloat16 pools")
    for module_type, shared in pools.items():
        for field in ("pool_a", "pool_b"):
            if not torch.isfinite(getattr(shared, field).detach()).all():
                raise ValueError(f"{module_type}.{field} holds NaN or inf values; refusing to save an "
                                 f"adapter that cannot be loaded")
    return config if config.pool_dtype == name else dataclasses.replace(config, pool_dtype=name)


# ---------------------------------------------------------------------------- reading


@dataclass
class AdapterFiles:
    """The contents of one adapter directory, read but not yet checked against a model."""
    directory: str
    config: MoSConfig
    tensors: dict
    layout: dict | None  # {type: {"d_in", "d_out", "modules"}} from the metadata, if present
    listed: bool = False  # load onto layout's modules: the config holds regexes, which files never run


def read_adapter(directory: str) -> AdapterFiles:
    """Reads and parses both files; raises ValueError naming the file (and field) on any defect.

    The config comes from adapter_config.json when it carries the weights' save id or the weights
    carry no config (written by another tool); otherwise from the weights' metadata."""
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    # Each file is read once, through one open file: a save renaming new files into place meanwhile
    # gives this read one save's weights whole, and the save ids below pair them with their config.
    weights = read_regular_file(weights_path)
    if weights is None:
        missing = weights_path if os.path.isfile(config_path) else config_path
        hint = ""
        if os.path.isfile(os.path.join(directory, "model.safetensors")):
            hint = ("; this directory holds a whole model.safetensors, as transformers.Trainer writes "
                    "for a model it does not know as an adapter: train with mos.torch.MoSTrainer")
        raise FileNotFoundError(f"{missing}: no such file (expected a MoS adapter directory){hint}")
    metadata, tensors = _parse_safetensors(weights_path, weights)
    layout = _metadata_json(weights_path, metadata, "mos_layout")
    if layout is not None:
        _check_layout_shape(weights_path, layout)
    embedded = _metadata_json(weights_path, metadata, "mos_config")
    if embedded is not None and not isinstance(embedded, dict):
        raise ValueError(f"{weights_path}: metadata 'mos_config' must be a JSON object, got "
                         f"{type(embedded).__name__}")
    data, source = _read_json_object(config_path), config_path
    if embedded is not None and (data is None or data.get(SAVE_ID) != metadata.get(SAVE_ID)):
        warnings.warn(f"{config_path} does not belong to the save that wrote {weights_path} (an "
                      f"interrupted save); using the config stored with the weights", stacklevel=3)
        data, source = embedded, f"{weights_path}: metadata 'mos_config'"
    elif data is None:
        raise FileNotFoundError(f"{config_path}: no such file (expected a MoS adapter directory)")
    data = {k: v for k, v in data.items() if k != SAVE_ID}
    if data.get("peft_type", "MOS") != "MOS":
        raise ValueError(f"{source}: peft_type {data.get('peft_type')!r} is not a MoS adapter")
    try:
        config = MoSConfig.from_dict(data)
    except (TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"{source}: {err}") from None
    regexes = _regex_fields(config)
    if regexes and layout is None:
        key, value = regexes[0]
        raise ValueError(f"{source}: {key}={value!r} is a pattern, and the weights carry no module list "
                         f"(metadata 'mos_layout') to load from; patterns from adapter files are never "
                         f"evaluated (an adversarial regex can run for hours)")
    return AdapterFiles(directory, config, tensors, layout, listed=bool(regexes))


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+")
_DEFAULT_LAYER_PATTERN = MoSConfig.__dataclass_fields__["layer_pattern"].default


def _regex_fields(config: MoSConfig) -> list:
    """[(key, value)] of the config's fields that would be evaluated as regular expressions."""
    found = []
    if isinstance(config.target_modules, str) and config.target_modules.lower() != ALL_LINEAR:
        found.append(("target_modules", config.target_modules))
    if isinstance(config.exclude_modules, str):
        found.append(("exclude_modules", config.exclude_modules))
    if config.layers_pattern is not None:
        names = [config.layers_pattern] if isinstance(config.layers_pattern, str) else config.layers_pattern
        if not all(_PLAIN_NAME.fullmatch(n) for n in names):  # spliced into a regex unescaped
            found.append(("layers_pattern", config.layers_pattern))
    if config.layer_pattern != _DEFAULT_LAYER_PATTERN:
        found.append(("layer_pattern", config.layer_pattern))
    return found


def _parse_safetensors(path: str, data: bytes) -> tuple:
    """(metadata, {key: tensor}) of a safetensors file's bytes; raises ValueError naming the file."""
    try:
        tensors = safetensors_load(data)
        header_size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_size])
    except (SafetensorError, ValueError, RuntimeError, RecursionError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({_reason(err)})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return (metadata if isinstance(metadata, dict) else {}), tensors


def _read_json_object(path: str) -> dict | None:
    """The JSON object in `path`, None when there is no such file."""
    try:
        raw = read_regular_file(path)
        data = None if raw is None else json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({_reason(err)})") from None
    if raw is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _metadata_json(path: str, metadata: dict, key: str):
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: metadata {key!r} is not valid JSON ({_reason(err)})") from None


def _reason(err: Exception) -> str:
    return "nested too deeply" if isinstance(err, RecursionError) else str(err)


def _check_layout_shape(path: str, layout) -> None:
    """mos_layout is {type: {"d_in": int, "d_out": int, "modules": [str, ...]}}."""
    where = f"{path}: metadata 'mos_layout'"
    if not isinstance(layout, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(layout).__name__}")
    for module_type, entry in layout.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: entry {module_type!r} must be an object, got {type(entry).__name__}")
        for key in ("d_in", "d_out"):
            value = entry.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: {module_type}.{key} must be a positive integer, got {value!r}")
        modules = entry.get("modules")
        if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
            raise ValueError(f"{where}: {module_type}.modules must be a list of module paths")


def check_layouts(files: AdapterFiles, layouts: dict) -> None:
    """Raises ValueError when the model's matches ({type: TypeLayout}) are not the modules the
    adapter was saved for (checked before pools are sized, so the error names the modules)."""
    if files.layout is None:
        return
    where = os.path.join(files.directory, WEIGHTS_NAME)
    if sorted(files.layout) != sorted(layouts):
        raise ValueError(f"{where}: the adapter was saved for module types {sorted(files.layout)}, "
                         f"target_modules matches {sorted(layouts)} in this model")
    for layout in layouts.values():
        _check_layout(where, files.layout, layout)


def validate_adapter(files: AdapterFiles, shard_pools: dict, layouts: dict) -> dict:
    """Checks the tensors against the pools this model needs; returns {type: (values, tables)}.

    `shard_pools` is {type: ShardPool} built from files.config and the model's matches, `layouts`
    {type: TypeLayout}. Raises ValueError naming the offending key; changes nothing."""
    where = os.path.join(files.directory, WEIGHTS_NAME)
    expected = {f"{t}.{name}" for t in shard_pools for name in TENSOR_FIELDS}
    missing = sorted(expected - set(files.tensors))
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r} (the model's target modules need pools for "
                         f"{sorted(shard_pools)})")
    unexpected = sorted(k for k in set(files.tensors) - expected if not k.startswith(SAVED_PREFIX))
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
