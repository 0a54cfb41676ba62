"""The adapter store meets files and other adapters: what it saves is what save_pretrained writes,
adapters that would change every row are refused, and batches or adapter sets it cannot serve
raise a clear ValueError before any work."""
import pytest
import torch
import transformers
from safetensors.torch import load_file

import mos
from mos.torch import MoSModel, get_mos_model
from torch_helpers import llama_inputs, logits, make_llama, mos_config, randomize_pools


def _with_head_and_biases():
    model = get_mos_model(make_llama(attention_bias=True),
                          mos_config(target_modules=["q_proj"], modules_to_save=["lm_head"], bias="all"),
                          adapter_name="a")
    randomize_pools(model)
    with torch.no_grad():
        model.get_base_model().lm_head.modules_to_save["a"].weight.add_(0.5)
        model.get_base_model().model.layers[0].self_attn.k_proj.bias.add_(0.25)
    return model.eval()


@pytest.mark.parametrize("how", ["save", "unload"])
def test_store_writes_what_save_pretrained_writes(tmp_path, how):
    model = _with_head_and_biases()
    ids = llama_inputs()
    expected = logits(model, ids)
    model.save_pretrained(str(tmp_path / "reference"), selected_adapters=["a"])
    store = model.adapter_store
    if how == "save":
        store.save("a", str(tmp_path / "out"))
    else:
        store.unload("a", save_directory=str(tmp_path / "out"))
    reference = load_file(str(tmp_path / "reference" / "a" / "adapter_model.safetensors"))
    written = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert sorted(written) == sorted(reference)
    assert any(k.startswith("saved:") for k in written)
    for key in reference:
        assert torch.equal(written[key], reference[key]), key
    base = make_llama(attention_bias=True)
    loaded = MoSModel.from_pretrained(base, str(tmp_path / "out"), adapter_name="a")
    torch.testing.assert_close(logits(loaded, ids), expected)


def test_store_refuses_an_adapter_that_trains_biases(tmp_path):
    trained = _with_head_and_biases()
    trained.save_pretrained(str(tmp_path), selected_adapters=["a"])
    server = get_mos_model(make_llama(attention_bias=True), mos_config(target_modules=["v_proj"]),
                           adapter_name="other").eval()
    randomize_pools(server)
    ids = llama_inputs()
    before = server(ids, adapter_names=["other", "__base__"]).logits
    with pytest.raises(ValueError, match="bias='all': the adapter's trained biases are base parameters"):
        server.adapter_store.load(str(tmp_path / "a"), "a")
    assert sorted(server.peft_config) == ["other"]
    torch.testing.assert_close(server(ids, adapter_names=["other", "__base__"]).logits, before)


def _clip():
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=16, patch_size=8),
        projection_dim=16)
    return transformers.CLIPModel(config).eval()


def test_mixed_batch_refuses_inputs_of_other_batch_sizes():
    config = mos.MoSConfig(r=2, equivalent_rank=2, target_modules=["q_proj", "v_proj"])
    model = get_mos_model(_clip(), config, adapter_name="a")
    model.add_adapter("b", mos.MoSConfig(r=2, equivalent_rank=2, target_modules=["q_proj", "v_proj"], seed=3))
    model.eval()
    g = torch.Generator().manual_seed(1)
    ids, pixels = torch.randint(0, 64, (2, 6), generator=g), torch.randn(4, 3, 16, 16, generator=g)
    with pytest.raises(ValueError, match=r"2 entries for a batch of 4 samples \(pixel_values, input_ids has 2\)"):
        model(input_ids=ids, pixel_values=pixels, adapter_names=["a", "b"])
    out = model(input_ids=ids, pixel_values=pixels[:2], adapter_names=["a", "b"])  # agreeing sizes run
    assert out.text_embeds.shape[0] == 2


@pytest.mark.parametrize("order", [("f32", "f64"), ("f64", "f32")])
def test_adapters_of_one_type_in_two_dtypes_are_refused_in_either_order(order):
    configs = {"f32": mos_config(target_modules=["q_proj"]),
               "f64": mos_config(target_modules=["q_proj"], pool_dtype="float64", shards_per_vector=4,
                                 r=2, equivalent_rank=2, private_rank=0, seed=7)}
    model = get_mos_model(make_llama(), configs[order[0]], adapter_name=order[0])
    model.add_adapter(order[1], configs[order[1]])
    model.eval()
    with pytest.raises(ValueError, match=r"adapters 'f32' and 'f64': q_proj pools are torch.float32 and "
                                         r"torch.float64; adapters served together share one pool dtype"):
        model(llama_inputs(), adapter_names=["f32", "f64"])
