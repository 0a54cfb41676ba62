"""Assertions MoS experiments need, each failing with an AssertionError that says what differs."""
from __future__ import annotations

import copy
import os

import torch

__all__ = ["assert_adapter_close", "assert_no_op_at_init", "assert_exports_match_peft",
           "assert_only_adapter_trainable"]


def _adapter_name(model, adapter_name):
    name = model.active_adapter if adapter_name is None else adapter_name
    if isinstance(name, list):
        raise ValueError(f"adapters {name} are active together; pass adapter_name= to check one")
    if name not in model.peft_config:
        raise ValueError(f"unknown adapter {name!r}; adapters: {sorted(model.peft_config)}")
    return name


def _default_inputs(model, inputs):
    if inputs is not None:
        return inputs
    from .models import token_batch

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise ValueError("pass inputs=: the model has no config.vocab_size to draw token ids from")
    return token_batch(vocab_size=vocab, device=next(model.parameters()).device)


def _outputs(model, inputs):
    """The model's output tensor (logits for transformers models) in eval mode, without grad."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    finally:
        model.train(was_training)
    return getattr(out, "logits", out)


def assert_adapter_close(model_a, model_b, adapter_name=None, rtol=1e-5, atol=1e-7):
    """The two models' adapters (the active one, or `adapter_name`) compute the same thing: the
    same adapted layers in the same positions, the same scale, equal index tables and pools
    within (rtol, atol)."""
    name_a, name_b = _adapter_name(model_a, adapter_name), _adapter_name(model_b, adapter_name)
    paths_a = {t: [p for p, _ in e] for t, e in model_a.adapter_paths(name_a).items()}
    paths_b = {t: [p for p, _ in e] for t, e in model_b.adapter_paths(name_b).items()}
    assert paths_a == paths_b, f"adapted layers differ: {paths_a} vs {paths_b}"
    scale_a, scale_b = model_a.peft_config[name_a].scaling, model_b.peft_config[name_b].scaling
    assert scale_a == scale_b, f"adapter scale differs: {scale_a} vs {scale_b}"
    for module_type in paths_a:
        pools_a, pools_b = model_a.mos_pools[name_a][module_type], model_b.mos_pools[name_b][module_type]
        for field in ("index_a", "index_b"):
            ta, tb = getattr(pools_a, field).cpu(), getattr(pools_b, field).cpu()
            assert torch.equal(ta, tb), f"{module_type}.{field}: index tables differ"
        for field in ("pool_a", "pool_b"):
            ta, tb = getattr(pools_a, field).detach().cpu(), getattr(pools_b, field).detach().cpu()
            torch.testing.assert_close(ta, tb, rtol=rtol, atol=atol, msg=lambda m: f"{module_type}.{field}: {m}")


def assert_no_op_at_init(model, inputs=None):
    """The model's outputs equal its base model's exactly (a fresh adapter is a no-op). `inputs`
    defaults to a token batch from the model's vocabulary."""
    inputs = _default_inputs(model, inputs)
    with model.disable_adapter():
        base = _outputs(model, inputs)
    adapted = _outputs(model, inputs)
    if not torch.equal(adapted, base):
        diff = (adapted.float() - base.float()).abs().max().item()
        raise AssertionError(f"the adapter changes the outputs at init (max abs difference {diff:.3g}); "
                             f"a fresh MoS adapter (init_lora_weights=True) has a zero B-pool")


def assert_exports_match_peft(model, tmp_path, inputs=None, adapter_name=None, rtol=0.0, atol=1e-5):
    """export_lora(tmp_path/"lora") loads into peft.PeftModel on a copy of the plain base model,
    adapts the same layers, and gives the MoS model's outputs within (rtol, atol)."""
    import peft

    name = _adapter_name(model, adapter_name)
    inputs = _default_inputs(model, inputs)
    directory = os.path.join(os.fspath(tmp_path), "lora")
    model.export_lora(directory, adapter_name=name)
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        expected = _outputs(model, inputs)
    finally:
        model.set_adapter(previous)
    plain = copy.deepcopy(model).unload()
    lora = peft.PeftModel.from_pretrained(plain, directory)
    n_lora = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in lora.modules())
    n_mos = sum(len(entries) for entries in model.adapter_paths(name).values())
    assert n_lora == n_mos, f"PEFT adapted {n_lora} layers, the MoS adapter {n_mos}"
    got = _outputs(lora, inputs)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"PEFT's outputs from the exported LoRA differ: {m}")


def assert_only_adapter_trainable(model, adapter_name=None):
    """Exactly the pools of the active adapter (or `adapter_name`) require grad: every base weight,
    index table and other adapter is frozen."""
    name = _adapter_name(model, adapter_name)
    pools = dict(model.mos_pools[name].named_parameters())
    assert pools, f"adapter {name!r} has no pools"
    frozen = sorted(n for n, p in pools.items() if not p.requires_grad)
    assert not frozen, f"pools of adapter {name!r} do not require grad: {frozen}"
    own = {id(p) for p in pools.values()}
    extra = sorted(n for n, p in model.named_parameters() if p.requires_grad and id(p) not in own)
    more = f" and {len(extra) - 8} more" if len(extra) > 8 else ""
    assert not extra, f"parameters other than adapter {name!r}'s pools require grad: {extra[:8]}{more}"
