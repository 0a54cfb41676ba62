"""One gradient buffer per pool per model call (pool_grads.py): a MoSModel call with autograd on
hands each pool one gradient, through one tap node, that equals the sum of the per-layer gradients
the layers return when called outside a model call; concurrent calls keep their own buffers."""
import threading

import pytest
import torch

import mos
from mos.testing.models import tiny_llama, token_batch
from mos.torch import MoSLinear
from mos.torch.pools import SharedPools


def _model(**extra):
    config = mos.MoSConfig(r=3, equivalent_rank=2, target_modules="all-linear", init_lora_weights=False,
                           lora_alpha=12.0, **extra)
    return mos.get_mos_model(tiny_llama(), config).double().train()


def _node_names(loss):
    names, stack, seen = [], [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack += [n for n, _ in node.next_functions]
    return names


def _grads(model, call, ids):
    model.zero_grad(set_to_none=True)
    loss = call(input_ids=ids, labels=ids).loss
    names = _node_names(loss)
    loss.backward()
    return names, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("route", ["fused", "separate"])
def test_one_tap_per_pool_gives_the_per_layer_gradients(route):
    # fused: ops.linear_with_adapter; separate: the base layer, then adapter_linear (dropout is on)
    model = _model(lora_dropout=0.1 if route == "separate" else 0.0)
    ids = token_batch()
    torch.manual_seed(1)
    names, grads = _grads(model, model, ids)
    torch.manual_seed(1)  # the same dropout masks
    names_alone, grads_alone = _grads(model, model.get_base_model(), ids)
    n_pools = sum(isinstance(m, SharedPools) for m in model.modules())
    assert n_pools == 7
    assert names.count("_TapBackward") == n_pools and "_TapBackward" not in names_alone
    op = "_LinearWithAdapterBackward" if route == "fused" else "_AdapterLinearBackward"
    assert op in names and op in names_alone
    assert grads.keys() == grads_alone.keys() and len(grads) == 2 * n_pools
    for name in grads:
        torch.testing.assert_close(grads[name], grads_alone[name], rtol=1e-12, atol=1e-12, msg=name)
        assert grads[name].abs().sum() > 0, name


def test_a_second_backward_through_the_graph_adds_the_gradient_again():
    model = _model()
    ids = token_batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(retain_graph=True)
    once = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, 2 * once[name], rtol=1e-12, atol=1e-12, msg=name)


def test_autograd_grad_of_some_pools_only():
    model = _model()
    ids = token_batch()
    pools = [m for m in model.modules() if isinstance(m, SharedPools)]
    wanted = [pools[0].pool_a, pools[3].pool_b]
    got = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, wanted)
    want = torch.autograd.grad(model.get_base_model()(input_ids=ids, labels=ids).loss, wanted)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_frozen_pools_open_no_tap_and_inputs_still_get_gradients():
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    embeds = model.get_input_embeddings()(token_batch()).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds).logits.square().mean()
    assert "_TapBackward" not in _node_names(loss)
    loss.backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def test_a_layer_called_on_its_own_inside_no_model_call_returns_its_own_gradient():
    model = _model()
    layer = [m for m in model.modules() if isinstance(m, MoSLinear)][0]
    y = layer(torch.randn(3, layer.in_features, dtype=torch.float64))
    assert "_TapBackward" not in _node_names(y.sum())
    y.sum().backward()
    pools = layer.slot("default").pools
    assert pools.pool_a.grad is not None and pools.pool_a.grad.abs().sum() > 0


def test_concurrent_calls_keep_their_own_buffers():
    model = _model()
    batches = [token_batch(seed=s) for s in (0, 1)]
    pools = [p for p in model.parameters() if p.requires_grad]
    want = [torch.autograd.grad(model(input_ids=ids, labels=ids).loss, pools) for ids in batches]
    barrier = threading.Barrier(2)
    got, errors = [None, None], []

    def run(i):
        try:
            ids = batches[i]
            barrier.wait()
            loss = model(input_ids=ids, labels=ids).loss  # both forwards in flight at once
            barrier.wait()
            got[i] = torch.autograd.grad(loss, pools)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i in (0, 1):
        for g, w in zip(got[i], want[i]):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_non_reentrant_checkpoint_of_the_whole_call_recomputes_the_same_tensors():
    from torch.utils.checkpoint import checkpoint

    model = _model()
    ids = token_batch()
    _, want = _grads(model, model, ids)
    model.zero_grad(set_to_none=True)
    checkpoint(lambda i: model(input_ids=i, labels=i).loss, ids, use_reentrant=False).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[name], rtol=1e-12, atol=1e-12, msg=name)
