"""MoSLinear on its own: forward decision table, dropout placement, merge/unmerge."""
import numpy as np
import pytest
import torch
from torch import nn

import mos
from mos.torch import MoSLinear, SharedPools
from mos.testing.numpy_reference import delta as reference_delta
from torch_helpers import to_numpy


def _layer(device, dropout=0.0, position=1, init_b=True, dtype=torch.float32):
    cfg = mos.MoSConfig(r=4, equivalent_rank=3, shards_per_vector=2, private_rank=1, lora_dropout=dropout,
                        init_lora_weights=init_b)
    pools = SharedPools(mos.ShardPool("fc", 16, 24, 3, cfg), device=device)
    if not init_b:
        with torch.no_grad():
            pools.pool_b.normal_(0, 0.3)
    base = nn.Linear(16, 24).to(device, dtype)
    layer = MoSLinear(base, "fc")
    layer.add_adapter("default", pools, position, cfg.scaling, dropout)
    layer.active_adapter = "default"
    return layer, pools, cfg


def _expected(layer, pools, cfg, x, position=1):
    ia, ib = pools.index_a[position].cpu().numpy(), pools.index_b[position].cpu().numpy()
    base = to_numpy(layer.base_layer(x))
    return base + reference_delta(to_numpy(x), to_numpy(pools.pool_a), ia, to_numpy(pools.pool_b), ib, cfg.scaling)


def test_fresh_adapter_is_an_exact_no_op(device):
    layer, _, _ = _layer(device)
    x = torch.randn(3, 5, 16, device=device)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_forward_matches_reference_and_uses_the_layers_own_row(device):
    layer, pools, cfg = _layer(device, init_b=False)
    x = torch.randn(7, 16, device=device)
    np.testing.assert_allclose(to_numpy(layer(x)), _expected(layer, pools, cfg, x), rtol=1e-5, atol=1e-5)
    other = _expected(layer, pools, cfg, x, position=0)
    assert np.abs(to_numpy(layer(x)) - other).max() > 1e-3  # position 0's tables give another answer


def test_dropout_applies_to_the_adapter_input_only():
    layer, pools, cfg = _layer("cpu", dropout=0.5, init_b=False)
    layer.train()
    x = torch.randn(6, 16)
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    ia, ib = pools.index_a[1].numpy(), pools.index_b[1].numpy()
    expected = to_numpy(layer.base_layer(x)) + reference_delta(
        to_numpy(dropped), to_numpy(pools.pool_a), ia, to_numpy(pools.pool_b), ib, cfg.scaling)
    np.testing.assert_allclose(to_numpy(y), expected, rtol=1e-5, atol=1e-5)
    layer.eval()
    np.testing.assert_allclose(to_numpy(layer(x)), _expected(layer, pools, cfg, x), rtol=1e-5, atol=1e-5)


def test_decision_table_disabled_merged_and_no_active_adapter(device):
    layer, pools, cfg = _layer(device, init_b=False)
    x = torch.randn(4, 16, device=device)
    base_out = layer.base_layer(x).detach()
    adapted = layer(x).detach()
    layer.disable_adapters = True
    assert torch.equal(layer(x), base_out)
    layer.disable_adapters = False
    layer.merge()
    assert layer.merged and torch.allclose(layer(x), adapted, atol=1e-5)
    layer.merge()  # idempotent: merging a merged adapter adds nothing
    assert torch.allclose(layer(x), adapted, atol=1e-5)
    layer.disable_adapters = True  # disabling a merged layer unmerges it (PEFT's behaviour)
    assert torch.allclose(layer(x), base_out, atol=1e-6) and not layer.merged
    layer.disable_adapters = False
    layer.active_adapter = None
    assert torch.equal(layer(x), layer.base_layer(x))


def test_unmerge_restores_the_weight():
    layer, _, _ = _layer("cpu", init_b=False)
    before = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert not torch.allclose(layer.base_layer.weight, before)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, before, rtol=0, atol=1e-6)
    assert layer.merged_adapters == []


def test_safe_merge_refuses_nan_and_writes_nothing():
    layer, pools, _ = _layer("cpu", init_b=False)
    with torch.no_grad():
        pools.pool_b[pools.index_b[1][0]] = float("nan")
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN/inf"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged


def test_merge_in_half_precision_base():
    layer, pools, cfg = _layer("cpu", init_b=False, dtype=torch.bfloat16)
    x = torch.randn(4, 16).bfloat16()
    unmerged = layer(x).float()
    assert layer(x).dtype == torch.bfloat16 and pools.pool_a.dtype == torch.float32
    layer.merge()
    assert layer.base_layer.weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x).float(), unmerged, rtol=0.03, atol=0.03)


def test_adapter_names_hook_is_reserved():
    layer, _, _ = _layer("cpu")
    with pytest.raises(NotImplementedError, match="adapter_names"):
        layer(torch.randn(2, 16), adapter_names=["default", "default"])


def test_wraps_only_linear_and_checks_pool_shape():
    with pytest.raises(TypeError, match="nn.Linear"):
        MoSLinear(nn.Conv1d(3, 3, 1), "conv")
    layer, pools, cfg = _layer("cpu")
    with pytest.raises(ValueError, match="pools are for"):
        MoSLinear(nn.Linear(8, 8), "fc").add_adapter("x", pools, 0, 1.0, 0.0)
