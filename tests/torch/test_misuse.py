"""mos/torch/misuse.py: misuse the model API used to accept and get silently wrong (unsafe or reserved
adapter names, a base wrapped twice, modules at two paths, merges into tied weights or naming no
adapter): each is refused, naming the problem."""
import os

import pytest
import torch

from mos.torch import MoSModel, get_mos_model
from torch_helpers import llama_inputs, logits, make_llama, mos_config, randomize_pools


def test_second_mos_model_on_one_base_is_refused(tmp_path):
    base = make_llama()
    first = get_mos_model(base, mos_config())
    randomize_pools(first)
    ids = llama_inputs()
    before = logits(first, ids)
    with pytest.raises(ValueError, match="base of another MoSModel.*add_adapter"):
        get_mos_model(base, mos_config(seed=5))
    first.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="base of another MoSModel"):
        MoSModel.from_pretrained(base, str(tmp_path))
    # The first model's layers still use its own pools.
    for module in base.modules():
        if type(module).__name__ == "MoSLinear":
            assert module.slot("default").pools is first.mos_pools["default"][module.module_type]
    torch.testing.assert_close(logits(first, ids), before, rtol=0, atol=0)


def test_merge_into_tied_lm_head_is_refused():
    model = get_mos_model(make_llama(tie_word_embeddings=True), mos_config(r=3, target_modules=["q_proj", "lm_head"]))
    randomize_pools(model)
    embeddings = model.base_model.get_input_embeddings().weight.clone()
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match=r"lm_head.weight is shared with .*embed_tokens.weight.*tied"):
            merge()
    assert torch.equal(model.base_model.get_input_embeddings().weight, embeddings)
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_linear_reachable_at_two_paths_is_refused():
    base = make_llama()
    base.model.layers[1].self_attn.q_proj = base.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' is also reachable at "
                                         r"\['model.layers.1.self_attn.q_proj'\]"):
        get_mos_model(base, mos_config(target_modules=["q_proj"]))
    assert not any(type(m).__name__ == "MoSLinear" for m in base.modules())


@pytest.mark.parametrize("name", ["__base__", "/abs/path", "a/b", "..", "../up", "", "a.b", "x y", None])
def test_unsafe_or_reserved_adapter_names_are_refused(tmp_path, name):
    model = get_mos_model(make_llama(), mos_config())
    with pytest.raises(ValueError, match="adapter name"):
        model.add_adapter(name, mos_config(seed=2))
    model.save_pretrained(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="adapter name"):
        model.load_adapter(str(tmp_path / "saved"), name)
    assert list(model.peft_config) == ["default"]
    model.peft_config[name] = model.peft_config["default"]  # even smuggled in, it is never a path
    with pytest.raises(ValueError, match="adapter name"):
        model.save_pretrained(str(tmp_path / "again"), selected_adapters=[name])
    assert not os.path.exists(tmp_path / "again")


def test_merge_adapter_names_are_checked():
    base = make_llama()
    model = get_mos_model(base, mos_config())
    randomize_pools(model)
    ids = llama_inputs()
    expected = logits(model, ids)
    q_proj = base.model.layers[0].self_attn.q_proj.base_layer
    weight = q_proj.weight.clone()
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['typo'\]"):
        model.merge_adapter(["typo"])
    assert torch.equal(q_proj.weight, weight)
    model.merge_adapter("default")  # one name as a string merges that adapter
    assert not torch.equal(q_proj.weight, weight)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["", "a.b", "train", 3])
def test_bad_adapter_names(name):
    model = get_mos_model(make_llama(), mos_config(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="adapter name"):
        model.add_adapter(name, mos_config(target_modules=["q_proj"]))
    assert set(model.peft_config) == {"default"}
