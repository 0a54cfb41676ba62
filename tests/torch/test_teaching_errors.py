"""Mistakes a PEFT user makes first get errors that say what to write instead."""
import peft
import pytest

import mos
from mos.testing import tiny_llama


def test_a_dict_config_suggests_mosconfig_of_it():
    with pytest.raises(TypeError, match=r"got a dict: wrap it, mos\.MoSConfig\(\*\*config\)"):
        mos.get_mos_model(tiny_llama(), {"r": 4, "target_modules": ["q_proj"]})


def test_a_peft_lora_config_suggests_mosconfig():
    with pytest.raises(TypeError, match=r"got peft's LoraConfig: MoS has its own config.*mos\.MoSConfig\(r=8"):
        mos.get_mos_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))


def test_a_module_name_as_string_explains_the_regex_and_suggests_a_list():
    config = mos.MoSConfig(r=4, equivalent_rank=2, target_modules="q_proj")
    with pytest.raises(ValueError, match=r"a string is a regex matched against the whole module path \(such as "
                                         r"'model\.layers\.0\.self_attn\.q_proj'\): for the module name pass a "
                                         r"list, target_modules=\['q_proj'\]"):
        mos.get_mos_model(tiny_llama(), config)


def test_a_regex_matching_nothing_gets_no_list_hint():
    config = mos.MoSConfig(r=4, equivalent_rank=2, target_modules=r".*\.nothing_proj")
    with pytest.raises(ValueError, match=r"matched no module of LlamaForCausalLM \(its linear module names: "
                                         r"[^)]*\)$"):
        mos.get_mos_model(tiny_llama(), config)
