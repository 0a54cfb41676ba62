"""mos.testing on real models: its fixtures, its pure-torch reference and its assertions, each
shown to pass where it should and to fail where it should."""
import pytest
import torch

import mos.testing.numpy_reference as numpy_reference
from mos.testing import (assert_adapter_close, assert_exports_match_peft, assert_no_op_at_init,
                         assert_only_adapter_trainable, reference_backward, reference_forward)
from mos.torch import adapter_linear, get_mos_model
from torch_helpers import mos_config, randomize_pools


def test_fixtures_are_seeded_real_models(tiny_llama, tiny_gpt2, token_batch, mos_device):
    from mos.testing import tiny_llama as build_llama

    assert type(tiny_llama).__name__ == "LlamaForCausalLM" and type(tiny_gpt2).__name__ == "GPT2LMHeadModel"
    again = build_llama(device=mos_device)
    for (name, a), b in zip(tiny_llama.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert token_batch.shape == (2, 8) and token_batch.device.type == mos_device
    assert tiny_gpt2(token_batch).logits.shape == (2, 8, 128)


@pytest.mark.parametrize("shape,shards,rank", [((5, 12), 3, 2), ((2, 3, 8), 1, 4), ((1, 6), 2, 1)])
def test_reference_agrees_with_the_numpy_reference_and_the_op(shape, shards, rank):
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n_shards = shape[-1], 6, 10
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    pool_a = torch.randn(n_shards, d_in // shards, generator=g, dtype=torch.float64)
    pool_b = torch.randn(n_shards, d_out // shards, generator=g, dtype=torch.float64)
    index_a = torch.randperm(n_shards, generator=g)[:rank * shards].int()
    index_b = torch.randperm(n_shards, generator=g)[:rank * shards].int()
    dy = torch.randn(*shape[:-1], d_out, generator=g, dtype=torch.float64)
    args = (pool_a, index_a, pool_b, index_b, 0.5)

    y = reference_forward(x, *args)
    grads = reference_backward(dy, x, *args)
    x2, dy2 = x.reshape(-1, d_in).numpy(), dy.reshape(-1, d_out).numpy()
    np_args = (pool_a.numpy(), index_a.numpy(), pool_b.numpy(), index_b.numpy(), 0.5, rank)
    torch.testing.assert_close(y.reshape(-1, d_out), torch.from_numpy(numpy_reference.forward(x2, *np_args)))
    for got, want in zip(grads, numpy_reference.backward(dy2, x2, *np_args)):
        torch.testing.assert_close(got.reshape(want.shape), torch.from_numpy(want))

    leaves = [t.clone().requires_grad_() for t in (x, pool_a, pool_b)]
    out = adapter_linear(leaves[0], leaves[1], index_a, leaves[2], index_b, 0.5)
    out.backward(dy)
    torch.testing.assert_close(out, y)
    for leaf, want in zip(leaves, grads):
        torch.testing.assert_close(leaf.grad, want)


def test_reference_refuses_a_shard_length_that_does_not_divide_d_in():
    with pytest.raises(ValueError, match="must divide d_in = 7"):
        reference_forward(torch.zeros(1, 7), torch.zeros(4, 2), torch.zeros(2, dtype=torch.int32),
                          torch.zeros(4, 2), torch.zeros(2, dtype=torch.int32), 1.0)


def test_no_op_and_trainable_assertions(tiny_llama, token_batch):
    model = get_mos_model(tiny_llama, mos_config())
    assert_no_op_at_init(model)
    assert_no_op_at_init(model, token_batch)
    assert_only_adapter_trainable(model)

    randomize_pools(model)
    with pytest.raises(AssertionError, match="changes the outputs at init"):
        assert_no_op_at_init(model)
    model.get_base_model().lm_head.weight.requires_grad_(True)
    with pytest.raises(AssertionError, match="lm_head.weight"):
        assert_only_adapter_trainable(model)


def test_adapter_close_sees_pools_and_index_tables(mos_device):
    from mos.testing import tiny_llama

    a = get_mos_model(tiny_llama(device=mos_device), mos_config())
    b = get_mos_model(tiny_llama(device=mos_device), mos_config())
    assert_adapter_close(a, b)
    with torch.no_grad():
        b.mos_pools["default"]["v_proj"].pool_a[0, 0] += 1e-3
    with pytest.raises(AssertionError, match="v_proj.pool_a"):
        assert_adapter_close(a, b)
    c = get_mos_model(tiny_llama(device=mos_device), mos_config(seed=1))
    with pytest.raises(AssertionError, match="index tables differ"):
        assert_adapter_close(a, c)


def test_exports_match_peft(tiny_llama, tmp_path):
    model = get_mos_model(tiny_llama, mos_config())
    randomize_pools(model)
    assert_exports_match_peft(model, tmp_path)


def test_assertions_on_the_gpt2_fixture(tiny_gpt2, tmp_path):
    model = get_mos_model(tiny_gpt2, mos_config())  # Conv1D layers, weights stored (d_in, d_out)
    assert set(model.adapter_paths("default")) >= {"c_attn", "c_fc"}
    assert_no_op_at_init(model)
    assert_only_adapter_trainable(model)
    randomize_pools(model)
    with pytest.raises(AssertionError, match="changes the outputs at init"):
        assert_no_op_at_init(model)
    assert_exports_match_peft(model, tmp_path)
