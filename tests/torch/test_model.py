"""get_mos_model / MoSModel on a real transformers Llama: PEFT's tuner checklist."""
import pytest
import torch
from torch import nn

import mos
from mos.testing import assert_no_op_at_init, assert_only_adapter_trainable
from mos.torch import MoSLinear, MoSModel, get_mos_model
from torch_helpers import llama_inputs, logits, make_llama, mos_config, randomize_pools

LLAMA_TYPES = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
               "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}


def _train(model, ids, steps=3, lr=0.05):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_lazy_reexports_from_mos():
    assert mos.get_mos_model is get_mos_model and mos.MoSModel is MoSModel


def test_fresh_adapter_is_an_exact_no_op(device):
    base = make_llama().to(device)
    ids = llama_inputs().to(device)
    expected = logits(base, ids)
    model = get_mos_model(base, mos_config())
    assert sum(isinstance(m, MoSLinear) for m in model.modules()) == 14
    assert torch.equal(logits(model, ids), expected)
    assert_no_op_at_init(model, ids)


def test_only_adapter_parameters_change_when_training(device):
    model = get_mos_model(make_llama().to(device), mos_config())
    ids = llama_inputs().to(device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert_only_adapter_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"mos_pools.default.{t}.{side}" for t in LLAMA_TYPES for side in ("pool_a", "pool_b")}
    _train(model, ids)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable  # every pool moved; base weights and index tables did not


def test_print_trainable_parameters_uses_peft_format(capsys):
    model = get_mos_model(make_llama(), mos_config())
    model.print_trainable_parameters()
    out = capsys.readouterr().out.strip()
    expected_trainable = sum(2 * 3 * (d_in + d_out) for d_in, d_out in LLAMA_TYPES.values())  # L * R_e * (in + out)
    total = sum(p.numel() for p in make_llama().parameters()) + expected_trainable
    assert model.get_nb_trainable_parameters() == (expected_trainable, total)
    assert out == (f"trainable params: {expected_trainable:,d} || all params: {total:,d} || "
                   f"trainable%: {100 * expected_trainable / total:.4f}")


def test_pools_are_stored_once_per_adapter_and_type():
    model = get_mos_model(make_llama(), mos_config())
    keys = list(model.state_dict())
    assert len(keys) == len(set(keys))
    pool_keys = [k for k in keys if "pool_" in k or "index_" in k]
    assert sorted(pool_keys) == sorted(f"mos_pools.default.{t}.{f}" for t in LLAMA_TYPES
                                       for f in ("pool_a", "pool_b", "index_a", "index_b"))
    layer = model.get_base_model().model.layers[1].self_attn.q_proj
    assert [n for n, _ in layer.named_parameters()] == ["base_layer.weight"]
    assert model.mos_pools["default"]["q_proj"].index_a.dtype == torch.int32


@pytest.mark.parametrize("targets,expected", [
    (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
    (r"model\.layers\.1\.mlp\.(up|down)_proj", {"up_proj", "down_proj"}),
    ("all-linear", set(LLAMA_TYPES)),
    ("ALL-LINEAR", set(LLAMA_TYPES)),
    (None, {"q_proj", "v_proj"}),  # PEFT's default for llama
])
def test_target_modules_forms(targets, expected):
    model = get_mos_model(make_llama(), mos_config(target_modules=targets, r=2, equivalent_rank=2, private_rank=1))
    layers = {p: m for p, m in model.get_base_model().named_modules() if isinstance(m, MoSLinear)}
    assert {m.module_type for m in layers.values()} == expected
    assert set(model.mos_pools["default"]) == expected
    assert not any("lm_head" in p for p in layers)
    if isinstance(targets, str) and "layers" in targets:
        assert all(p.startswith("model.layers.1.") for p in layers)
        assert model.mos_pools["default"]["up_proj"].n_layers == 1


def test_layer_position_follows_the_layer_index_in_the_path():
    """Positions (index-table rows, private segments) come from the path's layer index, not from
    the order modules were registered in."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return torch.relu(self.fc(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleDict({"2": Block(), "0": Block(), "1": Block()})

        def forward(self, x):
            for key in ("0", "1", "2"):
                x = self.blocks[key](x)
            return x

    cfg = mos.MoSConfig(r=2, equivalent_rank=2, shards_per_vector=2, private_rank=1, target_modules=["fc"])
    model = get_mos_model(Net(), cfg)
    pools = model.mos_pools["default"]["fc"]
    for k in range(3):
        layer = model.get_base_model().blocks[str(k)].fc
        assert layer.slot("default").position == k
        private = set(pools.shard_pool.private_rows(k))
        assert private <= set(pools.index_a[k].tolist()) and private <= set(pools.index_b[k].tolist())
    assert model.adapter_paths("default")["fc"][0][0] == "blocks.0.fc"


def test_several_adapters_requires_grad_bookkeeping():
    base = make_llama()
    ids = llama_inputs()
    model = get_mos_model(base, mos_config(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("other", mos_config(target_modules=["o_proj"], seed=5, init_lora_weights=False))

    def trainable():
        return {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}

    assert model.active_adapter == "default" and trainable() == {"default"}
    out_default = logits(model, ids)
    model.set_adapter("other")
    assert model.active_adapter == "other" and trainable() == {"other"}
    out_other = logits(model, ids)
    assert not torch.allclose(out_default, out_other, atol=1e-4)
    _train(model, ids, steps=1)
    model.set_adapter("default")
    assert torch.equal(logits(model, ids), out_default)  # training "other" left "default" alone
    model.set_adapter("other")
    model.delete_adapter("other")
    assert model.active_adapter == "default" and set(model.peft_config) == {"default"}
    assert trainable() == {"default"}
    assert isinstance(model.get_base_model().model.layers[0].self_attn.o_proj, nn.Linear)  # restored, not MoSLinear
    assert not isinstance(model.get_base_model().model.layers[0].self_attn.o_proj, MoSLinear)
    torch.testing.assert_close(logits(model, ids), out_default)


def test_disable_adapter_restores_base_outputs_even_when_merged():
    base = make_llama()
    ids = llama_inputs()
    expected_base = logits(base, ids)
    model = get_mos_model(base, mos_config())
    randomize_pools(model)
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, expected_base, atol=1e-3)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), expected_base)
    torch.testing.assert_close(logits(model, ids), adapted)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), expected_base, rtol=1e-5, atol=1e-5)
    assert all(m.merged for m in model.modules() if isinstance(m, MoSLinear))
    torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-5, atol=1e-5)


def test_merge_unmerge_and_unload_equal_the_unmerged_model():
    base = make_llama()
    ids = llama_inputs()
    expected_base = logits(base, ids)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_mos_model(base, mos_config())
    randomize_pools(model)
    adapted = logits(model, ids)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-5, atol=1e-5)
    model.merge_adapter()  # idempotent
    torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-5, atol=1e-5)
    for path, layer in model.get_base_model().named_modules():
        if isinstance(layer, MoSLinear):
            torch.testing.assert_close(layer.base_layer.weight, original[path + ".weight"], rtol=0, atol=1e-6)
    merged = model.merge_and_unload()
    assert merged is base and not any(isinstance(m, MoSLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), adapted, rtol=1e-5, atol=1e-5)

    model = get_mos_model(make_llama(), mos_config())
    randomize_pools(model)
    model.merge_adapter()
    plain = model.unload()
    assert not any(isinstance(m, MoSLinear) for m in plain.modules())
    torch.testing.assert_close(logits(plain, ids), expected_base, rtol=1e-5, atol=1e-5)


def test_safe_merge_refuses_nan_and_merges_nothing():
    model = get_mos_model(make_llama(), mos_config())
    randomize_pools(model)
    with torch.no_grad():
        model.mos_pools["default"]["down_proj"].pool_b.fill_(float("inf"))
    weights = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    with pytest.raises(ValueError, match="NaN/inf"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.equal(v, weights[k]) for k, v in model.get_base_model().state_dict().items())
    assert not any(m.merged for m in model.modules() if isinstance(m, MoSLinear))


def test_generate_and_attribute_pass_through():
    base = make_llama()
    ids = llama_inputs(batch=1, seq=4)
    base_out = base.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    model = get_mos_model(base, mos_config())
    randomize_pools(model, scale=0.5)
    assert model.get_base_model() is base and model.config is base.config
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    merged = model.merge_and_unload()
    assert torch.equal(out, merged.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))
    assert out.shape == (1, 8) and not torch.equal(out, base_out)


def test_deepcopy_keeps_pools_shared_between_layers_and_model():
    import copy

    model = get_mos_model(make_llama(), mos_config(target_modules=["q_proj"]))
    randomize_pools(model)
    clone = copy.deepcopy(model)
    pools = clone.mos_pools["default"]["q_proj"]
    assert pools is not model.mos_pools["default"]["q_proj"]
    for block in clone.get_base_model().model.layers:
        assert block.self_attn.q_proj.slot("default").pools is pools
    ids = llama_inputs()
    torch.testing.assert_close(logits(clone, ids), logits(model, ids), rtol=0, atol=0)
    with torch.no_grad():
        pools.pool_b.zero_()
    torch.testing.assert_close(logits(clone, ids), logits(make_llama(), ids), rtol=0, atol=0)


def test_adapter_bookkeeping_errors():
    model = get_mos_model(make_llama(), mos_config(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", mos_config(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="unknown adapter 'x'"):
        model.set_adapter("x")
    with pytest.raises(ValueError, match="unknown adapter 'x'"):
        model.delete_adapter("x")
    with pytest.raises(TypeError, match="already a MoSModel"):
        get_mos_model(model, mos_config())
    with pytest.raises(TypeError, match="config must be a MoSConfig"):
        model.add_adapter("other", {"r": 4})
    failing = mos_config(target_modules=["nothing"])
    with pytest.raises(ValueError, match="matched no module"):
        model.add_adapter("other", failing)
    assert set(model.peft_config) == {"default"} and set(model.mos_pools) == {"default"}
