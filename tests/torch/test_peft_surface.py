"""Where code expects a PeftModel: the attributes and methods behave as PEFT's do, or raise clearly."""
import dataclasses
import os
import pydoc
import shutil
from pathlib import Path

import huggingface_hub
import peft
import pytest
import torch
from safetensors.torch import load_file

import mos
from mos.torch import MoSModel, get_mos_model, get_peft_model_state_dict
from torch_helpers import llama_inputs, make_llama, mos_config, randomize_pools

ROOT = Path(__file__).resolve().parents[2]


def _model():
    model = get_mos_model(make_llama(), mos_config(target_modules=["q_proj", "v_proj"]))
    randomize_pools(model)
    return model


def test_num_parameters_counts_the_pools_as_peft_counts_lora():
    lora = peft.get_peft_model(make_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert lora.num_parameters(only_trainable=True) == lora.get_nb_trainable_parameters()[0] > 0
    model = _model()
    trainable, total = model.get_nb_trainable_parameters()
    assert model.num_parameters(only_trainable=True) == trainable == sum(
        p.numel() for p in model.mos_pools.parameters())
    assert model.num_parameters() == total
    embeddings = model.get_base_model().model.embed_tokens.weight.numel()
    assert model.num_parameters(exclude_embeddings=True) == total - embeddings


def test_base_model_model_is_the_causal_lm_as_in_peft():
    base = make_llama()
    lora = peft.get_peft_model(make_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert type(lora.base_model.model).__name__ == "LlamaForCausalLM"
    model = get_mos_model(base, mos_config(target_modules=["q_proj"]))
    assert model.base_model.model is base and model.get_base_model() is base
    assert model.config is base.config and model.model is base  # attributes fall through as in PEFT
    ids = llama_inputs()
    with torch.no_grad():
        assert torch.equal(model.base_model(ids).logits, base(ids).logits)


def test_get_peft_model_state_dict_gives_the_saved_tensors(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="Unknown PEFT type passed: MOS"):
        peft.get_peft_model_state_dict(model)  # PEFT's own function knows only its PeftTypes
    state = get_peft_model_state_dict(model)
    assert state.keys() == get_peft_model_state_dict(model, state_dict=model.state_dict()).keys()
    model.save_pretrained(tmp_path, safe_serialization=True)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], v.detach().cpu()) for k, v in state.items())
    heads = get_mos_model(make_llama(), mos_config(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    heads.save_pretrained(tmp_path / "heads")
    saved = load_file(str(tmp_path / "heads" / "adapter_model.safetensors"))
    state = get_peft_model_state_dict(heads)
    assert saved.keys() == state.keys() and any(k.startswith("saved:") for k in state)
    assert all(torch.equal(saved[k], v.detach().cpu()) for k, v in state.items())
    with pytest.raises(ValueError, match="call without state_dict"):
        get_peft_model_state_dict(heads, state_dict=heads.state_dict())
    with pytest.raises(ValueError, match="unknown adapter 'other'"):
        get_peft_model_state_dict(model, adapter_name="other")
    with pytest.raises(TypeError, match="use peft.get_peft_model_state_dict"):
        get_peft_model_state_dict(make_llama())


def test_save_pretrained_takes_peft_arguments(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "a", safe_serialization=True, save_embedding_layers="auto")
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors"]
    model.save_pretrained(tmp_path / "b", is_main_process=False)
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="safe_serialization must be True"):
        model.save_pretrained(tmp_path / "c", safe_serialization=False)
    with pytest.raises(ValueError, match="save_embedding_layers=True is not supported"):
        model.save_pretrained(tmp_path / "c", save_embedding_layers=True)
    with pytest.raises(TypeError, match=r"unsupported argument\(s\) \['convert_pissa_to_lora'\]"):
        model.save_pretrained(tmp_path / "c", convert_pissa_to_lora="x")
    assert not (tmp_path / "c").exists()


def test_push_to_hub_uploads_the_adapter_directory(tmp_path, monkeypatch):
    # Only the two network calls are replaced; they record what would be sent.
    calls = {}

    def create_repo(self, repo_id, private=None, exist_ok=False, **kw):
        calls["create"] = (repo_id, private, exist_ok)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, commit_message=None, revision=None, create_pr=False, **kw):
        calls["upload"] = (repo_id, commit_message, revision, create_pr)
        shutil.copytree(folder_path, tmp_path / "uploaded")
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = _model()
    assert model.push_to_hub.__func__ is MoSModel.push_to_hub  # never the base model's method
    assert model.push_to_hub("me/adapter", private=True, commit_message="hi") == "commit-info"
    assert calls["create"] == ("me/adapter", True, True)
    assert calls["upload"] == ("me/adapter", "hi", None, False)
    assert sorted(os.listdir(tmp_path / "uploaded")) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = MoSModel.from_pretrained(make_llama(), tmp_path / "uploaded")
    ids = llama_inputs()
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_help_documents_every_config_field_and_adapter_names():
    text = pydoc.render_doc(mos.MoSConfig, renderer=pydoc.plaintext)
    for field in dataclasses.fields(mos.MoSConfig):
        assert field.name in text and " ".join(field.metadata["help"].split()[:6]) in " ".join(text.split())
    model = _model()
    assert "adapter_names" in pydoc.render_doc(model.forward, renderer=pydoc.plaintext)
    assert "__base__" in MoSModel.forward.__doc__


def test_package_ships_py_typed():
    assert (ROOT / "mos" / "py.typed").is_file()
    assert 'mos = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()
