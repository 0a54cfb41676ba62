"""Architectures beyond Llama: GPT-2's Conv1D layers (PEFT's fan_in_fan_out) and CLIP, whose text
and vision towers have modules of one name in different shapes."""
import pytest
import torch
import transformers

import mos
from mos.torch import MoSLinear, MoSModel, get_mos_model
from torch_helpers import plain_state, randomize_pools

peft = pytest.importorskip("peft")


def _gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def _clip(seed=0):
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                           image_size=16, patch_size=8),
        projection_dim=16)
    return transformers.CLIPModel(config).eval()


def _clip_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(input_ids=torch.randint(0, 64, (2, 6), generator=g),
                pixel_values=torch.randn(2, 3, 16, 16, generator=g))


def _clip_outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return torch.cat([out.text_embeds, out.image_embeds])


def _config(**overrides):
    return mos.MoSConfig(**{**dict(r=4, equivalent_rank=3, shards_per_vector=2, private_rank=1, lora_alpha=8.0,
                                   target_modules="all-linear"), **overrides})


def _gpt2_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_gpt2_conv1d_layers_are_adapted_like_peft_and_export_exactly(tmp_path):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    base_out = _gpt2_logits(_gpt2(), ids)
    model = get_mos_model(_gpt2(), _config())
    lora = peft.get_peft_model(_gpt2(), peft.LoraConfig(r=4, target_modules="all-linear"))
    peft_paths = {p.removeprefix("base_model.model.") for p, m in lora.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)}
    layers = {p: m for p, m in model.get_base_model().named_modules() if isinstance(m, MoSLinear)}
    assert set(layers) == peft_paths and len(layers) == 8
    assert all(m.fan_in_fan_out for m in layers.values())
    # c_proj is 32 -> 32 in attention and 128 -> 32 in the MLP: one pool per shape.
    assert sorted(model.mos_pools["default"]) == ["c_attn", "c_fc", "c_proj_128x32", "c_proj_32x32"]

    randomize_pools(model)
    adapter_out = _gpt2_logits(model, ids)
    assert (adapter_out - base_out).abs().max() > 0.1
    model.export_lora(str(tmp_path))
    base = _gpt2(seed=7)
    base.load_state_dict(plain_state(model.get_base_model()))
    exported = peft.PeftModel.from_pretrained(base, str(tmp_path))
    assert exported.peft_config["default"].fan_in_fan_out
    torch.testing.assert_close(_gpt2_logits(exported, ids), adapter_out, rtol=0, atol=1e-5)

    weights = {p: m.base_layer.weight.clone() for p, m in layers.items()}
    model.merge_adapter()
    torch.testing.assert_close(_gpt2_logits(model, ids), adapter_out, rtol=0, atol=1e-5)
    for path, layer in layers.items():  # Conv1D stores (d_in, d_out): the update is added transposed
        torch.testing.assert_close(layer.base_layer.weight, weights[path] + layer.get_delta_weight("default").T)
    model.unmerge_adapter()
    for path, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight, weights[path], rtol=0, atol=1e-6)
    merged = model.merge_and_unload()
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(_gpt2_logits(merged, ids), adapter_out, rtol=0, atol=1e-5)


def test_gpt2_trains_through_conv1d():
    model = get_mos_model(_gpt2(), _config(target_modules=["c_attn"]))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    model.train()
    model(ids, labels=ids).loss.backward()
    assert model.mos_pools["default"]["c_attn"].pool_b.grad.abs().sum() > 0


def test_clip_towers_with_one_name_in_two_shapes_save_load_and_export(tmp_path):
    inputs = _clip_inputs()
    model = get_mos_model(_clip(), _config(target_modules=["q_proj", "v_proj", "fc1"]))
    assert sorted(model.mos_pools["default"]) == ["fc1_32x64", "fc1_48x96", "q_proj_32x32", "q_proj_48x48",
                                                  "v_proj_32x32", "v_proj_48x48"]
    text_pools = model.mos_pools["default"]["q_proj_32x32"]
    assert text_pools.n_layers == 2 and model.mos_pools["default"]["q_proj_48x48"].n_layers == 3
    randomize_pools(model)
    expected = _clip_outputs(model, inputs)
    assert (expected - _clip_outputs(_clip(), inputs)).abs().max() > 1e-3
    model.save_pretrained(str(tmp_path / "mos"))

    loaded = MoSModel.from_pretrained(_clip(), str(tmp_path / "mos"))
    torch.testing.assert_close(_clip_outputs(loaded, inputs), expected, rtol=0, atol=0)
    for name, pools in model.mos_pools["default"].items():
        assert torch.equal(loaded.mos_pools["default"][name].index_a, pools.index_a)

    model.export_lora(str(tmp_path / "lora"))
    exported = peft.PeftModel.from_pretrained(_clip(), str(tmp_path / "lora"))
    torch.testing.assert_close(_clip_outputs(exported, inputs), expected, rtol=0, atol=1e-5)
