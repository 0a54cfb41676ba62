"""Adapter files under hostile conditions: cast pools, umasks, names, regexes and tampered files."""
import json
import os
import signal
import stat
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mos.torch import MoSModel, get_mos_model
from torch_helpers import llama_inputs, logits, make_llama, mos_config, randomize_pools, rewrite_config


def _model(**overrides):
    model = get_mos_model(make_llama(), mos_config(**overrides))
    randomize_pools(model)
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_cast_model_saves_pools_it_holds_and_loads_back(tmp_path, dtype):
    model = _model().to(dtype)
    model.save_pretrained(str(tmp_path))
    loaded = MoSModel.from_pretrained(make_llama().to(dtype), str(tmp_path))
    assert loaded.peft_config["default"].pool_dtype == str(dtype).removeprefix("torch.")
    for key, value in model.mos_pools.state_dict().items():
        assert torch.equal(loaded.mos_pools.state_dict()[key], value), key
    torch.testing.assert_close(logits(loaded, llama_inputs()), logits(model, llama_inputs()), rtol=0, atol=0)


def test_unloadable_pools_are_refused_before_anything_is_written(tmp_path):
    good = _model()
    good.save_pretrained(str(tmp_path))
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    broken = _model()
    with torch.no_grad():
        broken.mos_pools["default"]["q_proj"].pool_a.data = broken.mos_pools["default"]["q_proj"].pool_a.half()
    with pytest.raises(ValueError, match="mixed dtypes"):
        broken.save_pretrained(str(tmp_path))
    with torch.no_grad():
        broken.mos_pools["default"]["q_proj"].pool_a.data = broken.mos_pools["default"]["q_proj"].pool_a.float()
        broken.mos_pools["default"]["v_proj"].pool_b[0, 0] = float("nan")
    with pytest.raises(ValueError, match="v_proj.pool_b holds NaN"):
        broken.save_pretrained(str(tmp_path))
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_files_honour_the_umask(tmp_path, umask):
    model = _model()
    old = os.umask(umask)
    try:
        model.save_pretrained(str(tmp_path / "mos"))
        model.export_lora(str(tmp_path / "lora"))
    finally:
        os.umask(old)
    for directory in ("mos", "lora"):
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            mode = stat.S_IMODE(os.stat(tmp_path / directory / name).st_mode)
            assert mode == 0o666 & ~umask, f"{directory}/{name}: {oct(mode)}"
        mode = stat.S_IMODE(os.stat(tmp_path / directory).st_mode)
        assert mode == 0o777 & ~umask, f"{directory}: {oct(mode)}"


# ---------------------------------------------------------------- patterns and tampering


def _edit_metadata(directory, key, value):
    path = os.path.join(directory, "adapter_model.safetensors")
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if value is None:
        metadata.pop(key)
    else:
        metadata[key] = value
    save_file(tensors, path, metadata)


def _finishes_in_a_child(work, seconds=30.0):
    """Runs work() in a forked child; True if it returned within `seconds` (else it is killed)."""
    pid = os.fork()
    if pid == 0:
        try:
            work()
            os._exit(0)
        finally:
            os._exit(1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False


CATASTROPHIC = r"((\w|\w)+\.?)+!"  # exponential backtracking on any dotted module path


@pytest.mark.parametrize("fields", [dict(target_modules=CATASTROPHIC), dict(layer_pattern=CATASTROPHIC + r"(\d)"),
                                    dict(exclude_modules=CATASTROPHIC)])
def test_patterns_in_adapter_files_are_never_evaluated(tmp_path, fields):
    model = _model(target_modules=r".*\.(q_proj|v_proj)")
    model.save_pretrained(str(tmp_path))
    rewrite_config(str(tmp_path), **fields)
    base = make_llama()
    # The child only loads (a forked child must not enter the parent's thread pools).
    assert _finishes_in_a_child(lambda: MoSModel.from_pretrained(base, str(tmp_path))), \
        "loading evaluated the file's pattern (killed after 30 s)"
    loaded = MoSModel.from_pretrained(base, str(tmp_path))  # onto the saved module list
    torch.testing.assert_close(logits(loaded, llama_inputs()), logits(model, llama_inputs()), rtol=0, atol=0)


def test_pattern_without_a_module_list_is_refused(tmp_path):
    _model(target_modules=r".*\.(q_proj|v_proj)").save_pretrained(str(tmp_path))
    _edit_metadata(str(tmp_path), "mos_layout", None)
    with pytest.raises(ValueError, match=r"adapter_config.json: target_modules=.* is a pattern.*never evaluated"):
        MoSModel.from_pretrained(make_llama(), str(tmp_path))


def _nested(depth):
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("edit,message", [
    (lambda d: _edit_metadata(d, "mos_layout", "[1, 2]"), "metadata 'mos_layout' must be a JSON object, got list"),
    (lambda d: _edit_metadata(d, "mos_layout", '"q_proj"'), "metadata 'mos_layout' must be a JSON object, got str"),
    (lambda d: _edit_metadata(d, "mos_layout", '{"q_proj": 5}'), "metadata 'mos_layout': entry 'q_proj' must be an object"),
    (lambda d: _edit_metadata(d, "mos_layout", '{"q_proj": {"d_in": "32", "d_out": 32, "modules": []}}'),
     r"metadata 'mos_layout': q_proj.d_in must be a positive integer"),
    (lambda d: _edit_metadata(d, "mos_layout", _nested(100_000)), "metadata 'mos_layout' is not valid JSON .nested too deeply"),
    (lambda d: rewrite_config(d, layer_pattern=5), "adapter_config.json: layer_pattern must be a regex string"),
    (lambda d: rewrite_config(d, layer_pattern=["x"]), "adapter_config.json: layer_pattern must be a regex string"),
    (lambda d: rewrite_config(d, task_type=json.loads(_nested(300))), "adapter_config.json: task_type must be a string"),
    (lambda d: rewrite_config(d, target_modules=json.loads(_nested(300))), "adapter_config.json: target_modules: expected non-empty module names"),
    (lambda d: open(os.path.join(d, "adapter_config.json"), "w").write('{"r": ' + _nested(100_000) + "}"),
     "adapter_config.json: not a readable JSON file .nested too deeply"),
])
def test_tampered_files_raise_value_error_naming_file_and_key(tmp_path, edit, message):
    _model().save_pretrained(str(tmp_path))
    edit(str(tmp_path))
    base = make_llama()
    with pytest.raises(ValueError, match=message):
        MoSModel.from_pretrained(base, str(tmp_path))
    assert not any(type(m).__name__ == "MoSLinear" for m in base.modules())
