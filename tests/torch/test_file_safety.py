"""Adapter files under hostile conditions: cast pools, umasks, names, regexes and tampered files."""
import os
import stat

import pytest
import torch

from mos.torch import MoSModel, get_mos_model
from torch_helpers import llama_inputs, logits, make_llama, mos_config, randomize_pools


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
