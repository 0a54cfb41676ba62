"""export_lora: the plain PEFT LoRA adapter loads with real peft and gives the MoS model's outputs."""
import json
import os

import pytest
import torch

from mos.torch import get_mos_model
from mos.testing import assert_exports_match_peft
from torch_helpers import llama_inputs, logits, make_llama, mos_config, randomize_pools

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("overrides,expected_targets", [
    (dict(), sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])),
    (dict(target_modules=["q_proj", "down_proj"], use_rslora=True), ["down_proj", "q_proj"]),
    (dict(target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj", r=2, equivalent_rank=2),
     r"model\.layers\.1\.self_attn\.q_proj|model\.layers\.1\.self_attn\.v_proj"),
    (dict(shards_per_vector=1, private_rank=0, pair_dissociation=False, subset_selection=False,
          r=6, equivalent_rank=3), None),
])
def test_exported_lora_loads_in_peft_with_equal_outputs(tmp_path, overrides, expected_targets):
    ids = llama_inputs()
    base_logits = logits(make_llama(), ids)
    model = get_mos_model(make_llama(), mos_config(**overrides))
    randomize_pools(model)
    expected = logits(model, ids)
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapter does something
    assert_exports_match_peft(model, tmp_path, ids)  # writes tmp_path/"lora", loads it with peft

    with open(tmp_path / "lora" / "adapter_config.json") as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["r"] == model.peft_config["default"].r
    assert config["lora_alpha"] == 8.0 and config["use_rslora"] == overrides.get("use_rslora", False)
    if expected_targets is not None:
        assert config["target_modules"] == expected_targets


def test_exported_matrices_are_the_assembled_ones(tmp_path):
    from safetensors.torch import load_file

    model = get_mos_model(make_llama(), mos_config(target_modules=["v_proj"]))
    randomize_pools(model)
    model.export_lora(str(tmp_path))
    tensors = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    pools = model.mos_pools["default"]["v_proj"]
    for k in range(2):
        a = tensors[f"base_model.model.model.layers.{k}.self_attn.v_proj.lora_A.weight"]
        b = tensors[f"base_model.model.model.layers.{k}.self_attn.v_proj.lora_B.weight"]
        assert a.shape == (4, 32) and b.shape == (16, 4)
        rows_a = pools.pool_a.detach()[pools.index_a[k].long()]  # r*l shards of d_in/l
        assert torch.equal(a, rows_a.reshape(4, 32))
        rows_b = pools.pool_b.detach()[pools.index_b[k].long()]
        assert torch.equal(b, rows_b.reshape(4, 16).T)
    assert len(tensors) == 4


def test_export_of_unknown_adapter_raises(tmp_path):
    model = get_mos_model(make_llama(), mos_config())
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model.export_lora(str(tmp_path), adapter_name="nope")
