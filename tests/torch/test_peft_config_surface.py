"""The LoRA config surface PEFT users pass: their option names and meanings, checked against real PEFT."""
import dataclasses

import pytest
import torch

import mos
from mos.peft_options import IGNORED, UNSUPPORTED
from mos.torch import MoSLinear, get_mos_model
from torch_helpers import llama_inputs, logits, make_llama, mos_config

peft = pytest.importorskip("peft")


def _mos_paths(model):
    return {p for p, m in model.get_base_model().named_modules() if isinstance(m, MoSLinear)}


def _peft_paths(**options):
    """Paths PEFT adapts for these options (empty when PEFT finds nothing to adapt)."""
    try:
        lora = peft.get_peft_model(make_llama(), peft.LoraConfig(r=4, **options))
    except ValueError as err:
        assert "not found in the base model" in str(err)
        return set()
    return {p.removeprefix("base_model.model.") for p, m in lora.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def test_every_lora_config_option_is_a_field_or_handled_by_name():
    lora_fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    mos_fields = {f.name for f in dataclasses.fields(mos.MoSConfig)}
    assert lora_fields - mos_fields - set(IGNORED) - set(UNSUPPORTED) == set()


@pytest.mark.parametrize("option,value", [
    ("use_dora", True), ("alpha_pattern", {"q_proj": 4}),
    ("alora_invocation_tokens", [5, 6]), ("layer_replication", [[0, 1]]), ("lora_bias", True),
    ("target_parameters", ["experts.weight"]), ("trainable_token_indices", [1, 2]),
])
def test_unsupported_lora_option_is_a_value_error_naming_it(option, value):
    with pytest.raises(ValueError, match=rf"^{option}=.* is not supported by MoS"):
        mos.MoSConfig(**{option: value})
    lora_dict = peft.LoraConfig(**{option: value}).to_dict()
    with pytest.raises(ValueError, match=rf"^{option}=.* is not supported by MoS"):
        mos.MoSConfig(**lora_dict)


def test_a_lora_config_dict_becomes_the_mos_config_with_the_same_meanings():
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                           exclude_modules=["model.layers.0.self_attn.v_proj"], use_rslora=True,
                           layers_to_transform=[0, 1], layers_pattern="layers", bias="lora_only",
                           modules_to_save=["lm_head"], task_type="CAUSAL_LM", init_lora_weights="gaussian",
                           fan_in_fan_out=False, inference_mode=True)
    config = mos.MoSConfig(**lora.to_dict(), equivalent_rank=3)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora) == (4, 8, 0.1, True)
    assert sorted(config.target_modules) == ["q_proj", "v_proj"] and config.task_type == "CAUSAL_LM"
    assert config.exclude_modules == ["model.layers.0.self_attn.v_proj"] and config.bias == "lora_only"
    assert (config.layers_to_transform, config.layers_pattern) == ([0, 1], "layers")
    assert config.modules_to_save == ["lm_head"] and config.init_lora_weights == "gaussian"
    assert config.peft_type == "MOS" and mos.MoSConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("value,no_op", [(True, True), ("gaussian", True), (False, False)])
def test_init_lora_weights(value, no_op):
    ids = llama_inputs()
    expected = logits(make_llama(), ids)
    model = get_mos_model(make_llama(), mos_config(init_lora_weights=value))
    assert torch.equal(logits(model, ids), expected) == no_op
    pools = model.mos_pools["default"]["q_proj"]
    if value == "gaussian":  # PEFT's gaussian: A ~ N(0, 1/r)
        assert abs(pools.pool_a.std().item() - 1 / 4) < 0.03
    else:
        assert pools.pool_a.abs().max() <= 1 / 32 ** 0.5
    assert (pools.pool_b.abs().sum() == 0) == no_op


@pytest.mark.parametrize("options", [
    dict(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.v_proj"]),
    dict(target_modules="all-linear", exclude_modules=r".*mlp\..*"),
    dict(target_modules=["q_proj", "k_proj", "down_proj"], layers_to_transform=1),
    dict(target_modules=["q_proj", "k_proj"], layers_to_transform=[0], layers_pattern="layers"),
    dict(target_modules=["q_proj", "k_proj"], layers_to_transform=[0], layers_pattern=["blocks"]),
    dict(target_modules="all-linear", modules_to_save=["o_proj"]),
])
def test_module_selection_matches_peft(options):
    expected = _peft_paths(**options)
    if not expected:
        with pytest.raises(ValueError, match="matched no module"):
            get_mos_model(make_llama(), mos_config(**options))
        return
    model = get_mos_model(make_llama(), mos_config(**options, r=2, equivalent_rank=2))
    assert _mos_paths(model) == expected
