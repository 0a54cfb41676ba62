"""What one adapter may do to another: per-adapter state (requires_grad, head copies) derived from
the set of adapters, wrapper internals never targets, modules_to_save that would save or train
the wrong thing refused, layer selections PEFT refuses refused alike, copies of a served model."""
import copy
import io

import pytest
import torch
import transformers

import mos
from mos.torch import MoSModel, get_mos_model
from mos.torch.layer import MoSLinear
from torch_helpers import llama_inputs, logits, make_llama, mos_config, randomize_pools


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_deleting_a_bias_adapter_freezes_the_biases_it_trained():
    base = make_llama(attention_bias=True)
    model = get_mos_model(base, mos_config(target_modules=["q_proj"], bias="all"), adapter_name="a")
    assert any(n.endswith(".bias") for n in _trainable(model))
    model.add_adapter("b", mos_config(target_modules=["v_proj"]))
    model.delete_adapter("a")
    model.set_adapter("b")
    trainable = _trainable(model)
    assert trainable and all(n.startswith("mos_pools.b.") for n in trainable), trainable
    model.add_adapter("c", mos_config(target_modules=["q_proj"]))  # deleting a non-active one too
    model.set_adapter("c")
    model.delete_adapter("b")
    assert all(n.startswith("mos_pools.c.") for n in _trainable(model))


def test_set_adapter_moves_bias_training_with_the_adapter():
    model = get_mos_model(make_llama(attention_bias=True), mos_config(target_modules=["q_proj"], bias="all"),
                          adapter_name="a")
    model.add_adapter("b", mos_config(target_modules=["v_proj"]))
    model.set_adapter("b")
    assert not any(n.endswith(".bias") for n in _trainable(model))
    model.set_adapter("a")
    assert any(n.endswith(".bias") for n in _trainable(model))


def test_modules_to_save_of_an_adapted_module_is_refused():
    model = get_mos_model(make_llama(), mos_config(target_modules=["q_proj", "lm_head"]), adapter_name="a")
    with pytest.raises(ValueError, match="'lm_head' holds 'lm_head', which another adapter of this model adapts"):
        model.add_adapter("b", mos_config(target_modules=["v_proj"], modules_to_save=["lm_head"]))
    assert sorted(model.peft_config) == ["a"]
    assert isinstance(model.get_base_model().lm_head, MoSLinear)


def test_saved_files_name_plain_paths_with_a_head_copy_beside_another_adapter(tmp_path):
    model = get_mos_model(make_llama(), mos_config(target_modules=["q_proj"], modules_to_save=["lm_head"]),
                          adapter_name="a")
    randomize_pools(model)
    model.add_adapter("b", mos_config(target_modules="all-linear", seed=5))
    for layer in model._mos_layers():
        assert "b" not in layer.adapter_names or "original_module" not in layer.module_type
    types = sorted(model.mos_pools["b"])
    assert "original_module" not in types and "a" not in types, types
    model.save_pretrained(str(tmp_path))
    for name in ("a", "b"):
        fresh = MoSModel.from_pretrained(make_llama(), str(tmp_path / name), adapter_name=name)
        model.set_adapter(name)
        torch.testing.assert_close(logits(fresh, llama_inputs()), logits(model.eval(), llama_inputs()))


def test_nested_modules_to_save_keeps_the_outer_copy_trained(tmp_path):
    model = get_mos_model(make_llama(), mos_config(target_modules=["q_proj"],
                                                   modules_to_save=["layers.1.mlp", "down_proj"]))
    assert model._saved_plans["default"].modules == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp"]
    outer = model.get_base_model().model.layers[1].mlp.modules_to_save["default"]
    with torch.no_grad():
        outer.down_proj.weight.add_(1.0)
    model.save_pretrained(str(tmp_path))
    loaded = MoSModel.from_pretrained(make_llama(), str(tmp_path))
    torch.testing.assert_close(loaded.get_base_model().model.layers[1].mlp.modules_to_save["default"]
                               .down_proj.weight, outer.down_proj.weight)
    torch.testing.assert_close(logits(loaded, llama_inputs()), logits(model.eval(), llama_inputs()))


def test_modules_to_save_never_called_is_refused():
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    t5 = transformers.T5ForConditionalGeneration(config)
    with pytest.raises(ValueError, match=r"'shared' shares its weights with \['encoder.embed_tokens', "
                                         r"'decoder.embed_tokens'\]"):
        get_mos_model(t5, mos.MoSConfig(r=2, equivalent_rank=2, target_modules=["q", "v"],
                                        modules_to_save=["shared"]))
    model = get_mos_model(t5, mos.MoSConfig(r=2, equivalent_rank=2, target_modules=["q", "v"],
                                            modules_to_save=["encoder.embed_tokens"]))
    assert model._saved_plans["default"].modules == ["encoder.embed_tokens"]


def test_gpt2_head_tied_to_the_embedding_is_still_savable():
    gpt2 = mos.testing.tiny_gpt2()
    model = get_mos_model(gpt2, mos.MoSConfig(r=2, equivalent_rank=2, target_modules=["c_attn"],
                                              modules_to_save=["lm_head"]))
    assert model._saved_plans["default"].modules == ["lm_head"]


@pytest.mark.parametrize("overrides, message", [
    (dict(target_modules="all-linear", layers_to_transform=[0]), "layers_to_transform cannot be used when target_modules is a str"),
    (dict(target_modules=r".*\.q_proj", layers_to_transform=0), "layers_to_transform cannot be used when target_modules is a str"),
    (dict(target_modules=["q_proj"], layers_pattern="layers"), "layers_pattern='layers' is specified without layers_to_transform"),
])
def test_layer_selections_peft_refuses_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        mos_config(**overrides)
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match="layers_"):
        peft.LoraConfig(**overrides)


@pytest.mark.parametrize("save", [copy.deepcopy, lambda m: torch.save(m, io.BytesIO())])
def test_a_served_model_copies_and_pickles(save):
    model = get_mos_model(make_llama(), mos_config()).eval()
    randomize_pools(model)
    ids = llama_inputs()
    before = model(ids, adapter_names=["default", "__base__"]).logits
    save(model)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(ids, adapter_names=["default", "__base__"]).logits, before)
    assert twin.adapter_store is not model.adapter_store
