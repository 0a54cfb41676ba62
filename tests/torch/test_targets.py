"""Target selection (mos/torch/targets.py): targets and per-type settings that cannot be applied raise
clear errors before anything is injected, and leave the model as it was."""
import pytest
import torch
from torch import nn

import mos
from mos.torch import MoSLinear, get_mos_model
from torch_helpers import make_llama, mos_config


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()]


def _assert_unchanged(model, snapshot):
    state, flags = snapshot
    assert not any(isinstance(m, MoSLinear) for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("overrides,message", [
    (dict(target_modules=["nothing_here"]), r"matched no module of LlamaForCausalLM \(its linear module names: "),
    (dict(target_modules=r"model\.layers\.9\..*"), "matched no module"),
    (dict(target_modules=["mlp"]), "matches 'model.layers.0.mlp', a LlamaMLP; MoS adapts linear layers only"),
    (dict(target_modules="(unclosed"), "target_modules: invalid regex"),
    (dict(target_modules=[""]), "non-empty module names"),
    (dict(target_modules=["q_proj"], shards_per_vector=3),
     r"q_proj is 32 -> 32: shards_per_vector=3 must divide both; values that work: 1, 2, 4, 8, 16, 32$"),
    (dict(target_modules=["q_proj"], rank_pattern={"q_proj": 8}),
     r"q_proj has 2 layers: with equivalent_rank=3, private_rank=1, shards_per_vector=2, r can be at most 5 "),
    (dict(target_modules=["q_proj"], subset_selection=False),
     r"q_proj has 2 layers: without subset_selection .* r must be 5 "),
    (dict(target_modules=["q_proj"], rank_pattern={"v_proj": 2}), r"rank_pattern names module type\(s\) \['v_proj'\]"),
    (dict(target_modules=["q_proj"], layer_pattern=r"\.\d+\."), "needs a group capturing the layer index"),
])
def test_bad_targets_and_configs_raise_and_change_nothing(overrides, message):
    base = make_llama()
    snapshot = _snapshot(base)
    with pytest.raises(ValueError, match=message):
        get_mos_model(base, mos_config(**overrides))
    _assert_unchanged(base, snapshot)


def test_unknown_default_targets_need_target_modules():
    base = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="target_modules is None and there is no default"):
        get_mos_model(base, mos.MoSConfig(r=1, equivalent_rank=1, private_rank=0))
