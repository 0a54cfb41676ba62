"""save_pretrained / from_pretrained / load_adapter: round trips and refusal of bad files."""
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import mos
from mos.torch import MoSLinear, MoSModel, get_mos_model
from torch_helpers import llama_inputs, logits, make_llama, mos_config, plain_state, randomize_pools, rewrite_config

# A C source location in a message means a core error leaked through unexplained.
C_LOCATION = re.compile(r"\[\w+\.(c|cu|h|inc):\d+\]")


@pytest.fixture
def saved(tmp_path):
    """A trained-looking adapter saved to tmp_path/adapter; returns (dir, base state, logits)."""
    model = get_mos_model(make_llama(), mos_config(lora_dropout=0.1))
    randomize_pools(model)
    ids = llama_inputs()
    directory = str(tmp_path / "adapter")
    model.save_pretrained(directory)
    return directory, plain_state(model.get_base_model()), logits(model, ids), model


def _fresh_base(state, seed=123):
    base = make_llama(seed=seed)
    base.load_state_dict(state)
    return base


def _assert_untouched(base, state):
    assert not any(isinstance(m, MoSLinear) for m in base.modules())
    for k, v in base.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.requires_grad for p in base.parameters())


def test_files_and_round_trip_after_reseeding(saved):
    directory, state, expected, model = saved
    assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(directory, "adapter_config.json")) as f:
        data = json.load(f)
    assert data.pop("mos_save_id") and data == model.peft_config["default"].to_dict()
    tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
    assert tensors["q_proj.index_a"].dtype == torch.int32 and tensors["q_proj.index_a"].shape == (2, 8)
    assert not any("lora_A" in k or "layers." in k for k in tensors)  # pools, not per-layer A/B

    torch.manual_seed(999)  # a different global seed must not matter: tables are loaded, not drawn
    loaded = MoSModel.from_pretrained(_fresh_base(state), directory)
    torch.testing.assert_close(logits(loaded, llama_inputs()), expected, rtol=0, atol=0)
    for key, value in model.mos_pools.state_dict().items():
        assert torch.equal(loaded.mos_pools.state_dict()[key], value), key
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False
    trainable = MoSModel.from_pretrained(_fresh_base(state), directory, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_loaded_tables_win_over_the_seed(saved, tmp_path):
    """Even with a config whose seed would draw other tables, the saved tables are used."""
    directory, state, expected, _ = saved
    config_path = os.path.join(directory, "adapter_config.json")
    with open(config_path) as f:
        data = json.load(f)
    data["seed"] = 77
    with open(config_path, "w") as f:
        json.dump(data, f)
    loaded = MoSModel.from_pretrained(_fresh_base(state), directory)
    torch.testing.assert_close(logits(loaded, llama_inputs()), expected, rtol=0, atol=0)


def test_save_is_atomic_and_overwrites(saved):
    directory, state, _, model = saved
    with torch.no_grad():
        model.mos_pools["default"]["q_proj"].pool_b.add_(1.0)
    model.save_pretrained(directory)
    assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files
    loaded = MoSModel.from_pretrained(_fresh_base(state), directory)
    assert torch.equal(loaded.mos_pools["default"]["q_proj"].pool_b, model.mos_pools["default"]["q_proj"].pool_b)


def test_several_adapters_save_and_load_adapter(tmp_path):
    model = get_mos_model(make_llama(), mos_config(target_modules=["q_proj"]))
    model.add_adapter("second", mos_config(target_modules=["v_proj"], seed=3))
    randomize_pools(model)
    model.save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "second" / "adapter_model.safetensors")
    state = plain_state(model.get_base_model())
    loaded = MoSModel.from_pretrained(_fresh_base(state), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "second"), "second")
    ids = llama_inputs()
    for name in ("default", "second"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="already exists"):
        loaded.load_adapter(str(tmp_path / "second"), "second")


def _rewrite(directory, change):
    path = os.path.join(directory, "adapter_model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, {"format": "pt"})


@pytest.mark.parametrize("corrupt,message", [
    (lambda d: open(os.path.join(d, "adapter_model.safetensors"), "r+b").truncate(100),
     "not a readable safetensors file"),
    (lambda d: open(os.path.join(d, "adapter_config.json"), "w").write("{not json"), "not a readable JSON"),
    (lambda d: rewrite_config(d, r="four"), "r must be an integer"),
    (lambda d: rewrite_config(d, rank=4), "unknown MoSConfig fields: rank"),
    (lambda d: rewrite_config(d, peft_type="LORA"), "not a MoS adapter"),
    (lambda d: rewrite_config(d, r=2), "key 'q_proj.index_a': shape"),
    (lambda d: rewrite_config(d, target_modules=["q_proj", "lm_head"]), r"saved for module types \[.*\], target_modules matches \['lm_head', 'q_proj'\]"),
    (lambda d: rewrite_config(d, pool_dtype="float64"), r"key '\w+\.pool_a' has dtype torch.float32, the config says pool_dtype='float64'"),
    (lambda d: _rewrite(d, lambda t: t.pop("v_proj.pool_b")), "missing key 'v_proj.pool_b'"),
    (lambda d: _rewrite(d, lambda t: t.update({"extra.pool_a": torch.zeros(1)})), "unexpected key 'extra.pool_a'"),
    (lambda d: _rewrite(d, lambda t: t.update({"k_proj.pool_a": t["k_proj.pool_a"][:-1].clone()})),
     "key 'k_proj.pool_a' has shape"),
    (lambda d: _rewrite(d, lambda t: t["o_proj.pool_b"].__setitem__((0, 0), float("nan"))),
     "key 'o_proj.pool_b' holds NaN"),
    (lambda d: _rewrite(d, lambda t: t.update({"up_proj.index_b": t["up_proj.index_b"].float()})),
     "key 'up_proj.index_b' has dtype"),
    (lambda d: _rewrite(d, lambda t: t["gate_proj.index_a"].__setitem__((0, 1), int(t["gate_proj.index_a"][0, 0]))),
     "key 'gate_proj.index_a': layer 0 repeats a shard"),
    (lambda d: _rewrite(d, lambda t: t["q_proj.index_b"].__setitem__((0, -1), int(t["q_proj.index_b"][1, -1]))),
     "key 'q_proj.index_b': layer 0 selects another layer's private rows"),
    (lambda d: _rewrite(d, lambda t: t["q_proj.index_a"].__setitem__((1, 0), 10_000)), r"key 'q_proj.index_a': indices must be in \[0, 12\)"),
])
def test_bad_adapter_files_raise_naming_the_problem_and_change_nothing(saved, corrupt, message):
    directory, state, _, _ = saved
    corrupt(directory)
    base = _fresh_base(state)
    with pytest.raises(ValueError, match=message):
        MoSModel.from_pretrained(base, directory)
    _assert_untouched(base, state)


def test_adapter_for_another_model_is_refused(saved):
    directory, _, _, _ = saved
    wider = make_llama(hidden_size=64, intermediate_size=64)
    state = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError, match="was saved for 32 -> 32, this model has 64 -> 64"):
        MoSModel.from_pretrained(wider, directory)
    _assert_untouched(wider, state)
    deeper = make_llama(num_hidden_layers=3)
    with pytest.raises(ValueError, match="has shape|saved for modules"):
        MoSModel.from_pretrained(deeper, directory)


def test_failed_load_adapter_keeps_existing_adapters(saved, tmp_path):
    directory, state, expected, _ = saved
    model = MoSModel.from_pretrained(_fresh_base(state), directory)
    _rewrite(directory, lambda t: t.pop("q_proj.index_a"))
    with pytest.raises(ValueError, match="missing key 'q_proj.index_a'"):
        model.load_adapter(directory, "again")
    assert set(model.peft_config) == {"default"} and set(model.mos_pools) == {"default"}
    assert all(m.adapter_names == ["default"] for m in model.modules() if isinstance(m, MoSLinear))
    torch.testing.assert_close(logits(model, llama_inputs()), expected, rtol=0, atol=0)


def test_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        MoSModel.from_pretrained(make_llama(), str(tmp_path / "nowhere"))
    model = get_mos_model(make_llama(), mos_config())
    with pytest.raises(ValueError, match="unknown adapter"):
        model.save_pretrained(str(tmp_path), selected_adapters=["nope"])


def test_loading_onto_a_base_with_fewer_layers_names_the_modules(tmp_path):
    model = get_mos_model(make_llama(num_hidden_layers=4), mos.MoSConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"was saved for modules \['model\.layers\.0\.self_attn\.q_proj', .*"
                                         r"this model's matches are .*layers\.1\.self_attn\.q_proj'\]") as err:
        MoSModel.from_pretrained(make_llama(num_hidden_layers=2), tmp_path)
    assert not C_LOCATION.search(str(err.value))
