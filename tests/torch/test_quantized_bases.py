"""Merging into bitsandbytes 4-bit and 8-bit bases (real bitsandbytes on CPU): dequantize, add,
requantize, with a warning about the rounding; unmerge and merge_and_unload likewise."""
import warnings

import pytest
import torch
import transformers

from mos.torch import MoSLinear, get_mos_model
from mos.torch.base_layers import dense_weight
from torch_helpers import llama_inputs, logits, make_llama, mos_config, randomize_pools

bnb = pytest.importorskip("bitsandbytes")

# Sizes bitsandbytes' CPU 4-bit kernel accepts (its 64-wide blocks and 32-row tiles).
SIZES = dict(hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    make_llama(**SIZES).save_pretrained(directory)
    return directory


def _quantized_llama(directory, kind):
    options = {"load_in_4bit": True, "bnb_4bit_compute_dtype": torch.float32} if kind == "4bit" \
        else {"load_in_8bit": True}
    model = transformers.LlamaForCausalLM.from_pretrained(
        directory, quantization_config=transformers.BitsAndBytesConfig(**options), device_map="cpu",
        dtype=torch.float32)
    return model.eval()


def _round_trip(kind, dense, weight):
    """What bitsandbytes itself stores for `dense` in the format of `weight` (quantized, then
    dequantized), computed directly with bitsandbytes' functions."""
    if kind == "4bit":
        packed, state = bnb.functional.quantize_4bit(
            dense, blocksize=weight.blocksize, compress_statistics=weight.compress_statistics,
            quant_type=weight.quant_type)
        return bnb.functional.dequantize_4bit(packed, state)
    quantized, scales, _ = bnb.functional.int8_vectorwise_quant(dense.to(torch.float16))
    return bnb.functional.int8_vectorwise_dequant(quantized, scales)


def _layers(model):
    return [m for m in model.modules() if isinstance(m, MoSLinear)]


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_merge_requantizes_base_plus_update_and_warns(saved_llama, kind):
    ids = llama_inputs()
    base = _quantized_llama(saved_llama, kind)
    base_out = logits(base, ids)
    model = get_mos_model(base, mos_config())
    randomize_pools(model, scale=0.05)
    adapter_out = logits(model, ids)
    layers = _layers(model)
    assert len(layers) == 14 and all(layer.extra_repr().endswith(f"base={kind}") for layer in layers)
    expected = {layer: _round_trip(kind, dense_weight(layer.base_layer) + layer.get_delta_weight("default"),
                                   layer.base_layer.weight) for layer in layers}

    with pytest.warns(UserWarning, match=f"{kind} bitsandbytes layer quantizes the merged weight again"):
        model.merge_adapter()
    for layer in layers:  # exactly dequantize + add + requantize, layer by layer
        assert type(layer.base_layer.weight).__name__ == ("Params4bit" if kind == "4bit" else "Int8Params")
        torch.testing.assert_close(dense_weight(layer.base_layer), expected[layer], rtol=0, atol=1e-6)
    merged_out = logits(model, ids)
    # The adapter is in the merged weights: far nearer the adapter's outputs than the base's.
    assert (merged_out - adapter_out).abs().max() < 0.5 * (merged_out - base_out).abs().max()

    # (A CPU forward may have repacked 4-bit weights with bfloat16 scales: read them again.)
    expected = {layer: _round_trip(kind, dense_weight(layer.base_layer) - layer.get_delta_weight("default"),
                                   layer.base_layer.weight) for layer in layers}
    with pytest.warns(UserWarning, match="quantizes the merged weight again"):
        model.unmerge_adapter()
    assert not any(layer.merged for layer in layers)
    for layer in layers:  # unmerge = dequantize, subtract, requantize (one more rounding)
        torch.testing.assert_close(dense_weight(layer.base_layer), expected[layer], rtol=0, atol=1e-6)
    assert (logits(model, ids) - adapter_out).abs().max() < 0.5 * (adapter_out - base_out).abs().max()


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_merge_and_unload_keeps_the_adapter_in_a_quantized_model(saved_llama, kind):
    ids = llama_inputs()
    model = get_mos_model(_quantized_llama(saved_llama, kind), mos_config())
    randomize_pools(model, scale=0.05)
    with pytest.warns(UserWarning, match="quantizes the merged weight again"):
        model.merge_adapter()
    merged_out = logits(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already merged: nothing is requantized again
        plain = model.merge_and_unload()
    assert not any(isinstance(m, MoSLinear) for m in plain.modules())
    q_proj = plain.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit if kind == "4bit" else bnb.nn.Linear8bitLt)
    torch.testing.assert_close(logits(plain, ids), merged_out, rtol=0, atol=0)


def test_training_updates_pools_through_a_4bit_base(saved_llama):
    model = get_mos_model(_quantized_llama(saved_llama, "4bit"), mos_config())
    ids = llama_inputs()
    model.train()
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.mos_pools.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
