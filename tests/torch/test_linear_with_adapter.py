"""Training with a frozen nn.Linear base: the layer runs the base product and its one active adapter
as one op (ops.linear_with_adapter). It must give the separate ops' outputs and gradients (float64
reference), and step aside whenever it would change what runs: hooks, dropout, several adapters,
a trainable base weight, autocast, other dtypes."""
import pytest
import torch
from torch import nn

import mos
from mos.testing.models import tiny_llama, token_batch
from mos.testing.reference import reference_backward, reference_forward
from mos.torch import MoSLinear

FUSED = "_LinearWithAdapterBackward"


def _model(**extra):
    config = mos.MoSConfig(r=3, equivalent_rank=2, target_modules="all-linear", init_lora_weights=False,
                           lora_alpha=12.0, **extra)
    return mos.get_mos_model(tiny_llama(), config)


def _layer(model, i=2):
    return [m for m in model.modules() if isinstance(m, MoSLinear)][i]


def _grad_fn(y):
    return type(y.grad_fn).__name__


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(5,), (2, 3), (1, 1)])
def test_outputs_and_gradients_match_the_float64_reference(bias, lead):
    model = _model()
    layer = _layer(model)
    if bias:
        layer.base_layer.bias = nn.Parameter(torch.randn(layer.out_features), requires_grad=False)
    slot = layer.slot("default")
    pools = slot.pools
    index_a, index_b = slot.index_rows()
    x = torch.randn(*lead, layer.in_features, requires_grad=True)
    y = layer(x)
    assert _grad_fn(y) == FUSED
    dy = torch.randn_like(y)
    y.backward(dy)
    base = x.detach().double() @ layer.weight.double().T + (layer.bias.double() if bias else 0)
    want = reference_forward(x.detach().double(), pools.pool_a.detach().double(), index_a,
                             pools.pool_b.detach().double(), index_b, slot.scaling, base)
    torch.testing.assert_close(y.detach().double(), want, rtol=1e-5, atol=1e-6)
    dx, dpool_a, dpool_b = reference_backward(dy.double(), x.detach().double(), pools.pool_a.detach().double(),
                                              index_a, pools.pool_b.detach().double(), index_b, slot.scaling)
    dx = dx + dy.double() @ layer.weight.double()  # the base's share
    torch.testing.assert_close(x.grad.double(), dx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pools.pool_a.grad.double(), dpool_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pools.pool_b.grad.double(), dpool_b, rtol=1e-5, atol=1e-6)


def _grads(model, ids, force_separate):
    model.zero_grad(set_to_none=True)
    hooks = [layer.base_layer.register_forward_hook(lambda *a: None)
             for layer in model.modules() if isinstance(layer, MoSLinear)] if force_separate else []
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_training_step_equals_the_separate_ops():
    model = _model().train()
    ids = token_batch()
    loss, grads = _grads(model, ids, force_separate=False)
    loss_separate, grads_separate = _grads(model, ids, force_separate=True)
    torch.testing.assert_close(loss, loss_separate, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_separate.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_separate[name], rtol=1e-5, atol=1e-6, msg=name)


def test_hooks_on_the_base_layer_still_run():
    model = _model()
    layer = _layer(model)
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    y = layer(torch.randn(4, layer.in_features))
    handle.remove()
    assert seen == [(4, layer.out_features)] and _grad_fn(y) != FUSED


@pytest.mark.parametrize("case", ["dropout", "two adapters", "trainable base", "merged", "float64 pools",
                                  "autocast", "no grad"])
def test_the_separate_ops_run_where_one_op_would_change_the_result(case):
    model = _model(lora_dropout=0.5, pool_dtype="float32") if case == "dropout" else \
        _model(pool_dtype="float64") if case == "float64 pools" else _model()
    layer = _layer(model)
    x = torch.randn(4, layer.in_features)
    if case == "dropout":
        model.train()
    elif case == "two adapters":
        model.add_adapter("other", mos.MoSConfig(r=3, equivalent_rank=2, target_modules="all-linear"))
        layer.active_adapter = ["default", "other"]
    elif case == "trainable base":
        layer.base_layer.weight.requires_grad_(True)
    elif case == "merged":
        layer.merge()
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
    elif case == "no grad":
        with torch.no_grad():
            y = layer(x)
    else:
        y = layer(x)
    assert y.grad_fn is None or _grad_fn(y) != FUSED
    if case == "trainable base":
        y.sum().backward()
        assert layer.base_layer.weight.grad is not None
