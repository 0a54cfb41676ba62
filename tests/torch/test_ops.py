"""adapter_linear (the autograd op over the C core) against the float64 reference of docs/design.md."""
import numpy as np
import pytest
import torch

import mos
from mos.torch import ops
from mos.torch.ops import adapter_linear
from mos.testing.numpy_reference import delta as reference_delta, grads as reference_grads
from torch_helpers import to_numpy

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _layer(d_in, d_out, n_layers, layer, device, dtype, **kw):
    cfg = mos.MoSConfig(**{"r": 4, "equivalent_rank": 3, "shards_per_vector": 2, "private_rank": 1, **kw})
    pool = mos.ShardPool("t", d_in, d_out, n_layers, cfg)
    g = torch.Generator().manual_seed(7)
    pool_a = torch.randn(pool.pool_a_shape, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    pool_b = torch.randn(pool.pool_b_shape, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    index_a, index_b = (torch.from_numpy(t.copy()).to(device) for t in pool.indices(layer))
    return pool_a, index_a, pool_b, index_b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,d_in,d_out", [((5,), 16, 24), ((1,), 8, 8), ((2, 3), 16, 12), ((0,), 8, 8)])
@pytest.mark.parametrize("with_base", [False, True])
def test_forward_and_backward_match_float64_reference(device, dtype, shape, d_in, d_out, with_base):
    pool_a, index_a, pool_b, index_b = _layer(d_in, d_out, 3, 1, device, dtype)
    x = torch.randn(*shape, d_in, dtype=torch.float64).to(device, dtype).requires_grad_()
    base = torch.randn(*shape, d_out, dtype=torch.float64).to(device, dtype).requires_grad_() if with_base else None
    y = adapter_linear(x, pool_a, index_a, pool_b, index_b, 1.75, base=base)
    expected = reference_delta(to_numpy(x), to_numpy(pool_a), index_a.cpu().numpy(), to_numpy(pool_b),
                               index_b.cpu().numpy(), 1.75)
    if with_base:
        expected = expected + to_numpy(base)
    assert y.shape == (*shape, d_out) and y.dtype == dtype
    np.testing.assert_allclose(to_numpy(y), expected, rtol=TOL[dtype], atol=TOL[dtype])

    dy = torch.randn_like(y)
    y.backward(dy)
    dx, dpool_a, dpool_b = reference_grads(to_numpy(dy), to_numpy(x), to_numpy(pool_a), index_a.cpu().numpy(),
                                           to_numpy(pool_b), index_b.cpu().numpy(), 1.75)
    np.testing.assert_allclose(to_numpy(x.grad).reshape(dx.shape), dx, rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_allclose(to_numpy(pool_a.grad), dpool_a, rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_allclose(to_numpy(pool_b.grad), dpool_b, rtol=TOL[dtype], atol=TOL[dtype])
    if with_base:
        np.testing.assert_array_equal(to_numpy(base.grad), to_numpy(dy))


def test_non_contiguous_input_and_upstream_gradient(device):
    pool_a, index_a, pool_b, index_b = _layer(16, 24, 3, 2, device, torch.float32)
    wide = torch.randn(6, 40, device=device)
    x = wide[:, 3:19].requires_grad_()  # row stride 40, unit column stride
    xt = torch.randn(16, 6, device=device).T.requires_grad_()  # column stride 6: copied
    for inp in (x, xt):
        y = adapter_linear(inp, pool_a, index_a, pool_b, index_b, 0.5)
        expected = reference_delta(to_numpy(inp), to_numpy(pool_a), index_a.cpu().numpy(), to_numpy(pool_b),
                                   index_b.cpu().numpy(), 0.5)
        np.testing.assert_allclose(to_numpy(y), expected, rtol=2e-5, atol=2e-5)
        y.sum().backward()  # dy is an expanded (stride 0) tensor
        dx, _, _ = reference_grads(np.ones(y.shape), to_numpy(inp), to_numpy(pool_a), index_a.cpu().numpy(),
                                   to_numpy(pool_b), index_b.cpu().numpy(), 0.5)
        np.testing.assert_allclose(to_numpy(inp.grad), dx, rtol=2e-5, atol=2e-5)


def test_pool_gradient_sums_over_layers_and_skips_unselected_rows(device):
    """Two layers share public shards: the pool gradient is the sum of both scatters, rows nobody
    selected get exactly zero, and the index tables get no gradient at all."""
    cfg = mos.MoSConfig(r=3, equivalent_rank=2, shards_per_vector=2, private_rank=1)
    pool = mos.ShardPool("t", 8, 8, 3, cfg)
    pool_a = torch.randn(pool.pool_a_shape, device=device, dtype=torch.float64, requires_grad=True)
    pool_b = torch.randn(pool.pool_b_shape, device=device, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 8, device=device, dtype=torch.float64)
    total, grads = 0, []
    for layer in (0, 2):
        ia, ib = (torch.from_numpy(t.copy()).to(device) for t in pool.indices(layer))
        total = total + adapter_linear(x, pool_a, ia, pool_b, ib, 2.0).sum()
        grads.append(reference_grads(np.ones((4, 8)), to_numpy(x), to_numpy(pool_a), ia.cpu().numpy(),
                                     to_numpy(pool_b), ib.cpu().numpy(), 2.0))
        assert not ia.requires_grad and ia.grad is None
    total.backward()
    np.testing.assert_allclose(to_numpy(pool_a.grad), grads[0][1] + grads[1][1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(pool_b.grad), grads[0][2] + grads[1][2], rtol=1e-10, atol=1e-12)
    used = set(pool.indices(0)[0]) | set(pool.indices(2)[0])
    unused = [k for k in range(pool.n_shards) if k not in used]
    assert unused, "the test needs rows no layer selected"
    assert torch.all(pool_a.grad[unused] == 0)
    assert torch.all(pool_a.grad[sorted(pool.private_rows(1))] == 0)  # layer 1's private rows


@pytest.mark.parametrize("needs", [(True, True, True), (False, True, True), (True, False, True),
                                   (True, True, False), (False, False, True)])
def test_only_requested_gradients_are_computed(needs):
    pool_a, index_a, pool_b, index_b = _layer(16, 8, 3, 0, "cpu", torch.float64)
    x = torch.randn(5, 16, dtype=torch.float64)
    for t, need in zip((x, pool_a, pool_b), needs):
        t.requires_grad_(need)
    adapter_linear(x, pool_a, index_a, pool_b, index_b, 1.0).square().sum().backward()
    dy = 2 * reference_delta(to_numpy(x), to_numpy(pool_a), index_a.numpy(), to_numpy(pool_b), index_b.numpy(), 1.0)
    expected = reference_grads(dy, to_numpy(x), to_numpy(pool_a), index_a.numpy(), to_numpy(pool_b),
                               index_b.numpy(), 1.0)
    for t, need, ref in zip((x, pool_a, pool_b), needs, expected):
        if need:
            np.testing.assert_allclose(to_numpy(t.grad), ref, rtol=1e-10, atol=1e-12)
        else:
            assert t.grad is None


def test_gradcheck_float64():
    pool_a, index_a, pool_b, index_b = _layer(8, 12, 3, 1, "cpu", torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    base = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, a, b, base: adapter_linear(x, a, index_a, b, index_b, 1.3, base=base), (x, pool_a, pool_b, base))


@pytest.mark.parametrize("save_h", [True, False])
def test_custom_ops_pass_opcheck(save_h):
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of the compile-time ops."""
    pool_a, index_a, pool_b, index_b = _layer(8, 12, 3, 1, "cpu", torch.float32)
    x = torch.randn(5, 8, requires_grad=True)
    base = torch.randn(5, 12, requires_grad=True)
    torch.library.opcheck(torch.ops.mos.linear_forward.default, (x, pool_a, index_a, pool_b, index_b, 0.7, base, save_h))
    torch.library.opcheck(torch.ops.mos.linear_forward.default, (x, pool_a, index_a, pool_b, index_b, 0.7, None, save_h))
    dy = torch.randn(5, 12)
    h = (x @ pool_a[index_a.long()].reshape(4, 8).T).detach() if save_h else x.new_empty((0, 4))
    torch.library.opcheck(torch.ops.mos.linear_backward.default,
                          (dy, x.detach(), pool_a.detach(), index_a, pool_b.detach(), index_b, 0.7, h, True, True, False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtypes_the_core_lacks_run_the_torch_fallback(dtype):
    """CPU half precision is not in the C core: the op falls back to torch and stays correct."""
    assert not ops.core_supports(torch.empty(0, dtype=dtype))
    pool_a, index_a, pool_b, index_b = _layer(16, 8, 3, 2, "cpu", dtype)
    x = torch.randn(4, 16).to(dtype).requires_grad_()
    y = adapter_linear(x, pool_a, index_a, pool_b, index_b, 0.5)
    expected = reference_delta(to_numpy(x), to_numpy(pool_a), index_a.numpy(), to_numpy(pool_b), index_b.numpy(), 0.5)
    tol = 0.05 * np.abs(expected).max()
    np.testing.assert_allclose(to_numpy(y), expected, atol=tol)
    y.backward(torch.ones_like(y))
    _, dpool_a, _ = reference_grads(np.ones(y.shape), to_numpy(x), to_numpy(pool_a), index_a.numpy(),
                                    to_numpy(pool_b), index_b.numpy(), 0.5)
    np.testing.assert_allclose(to_numpy(pool_a.grad), dpool_a, atol=0.05 * np.abs(dpool_a).max())


def test_bad_inputs_raise_clear_errors():
    pool_a, index_a, pool_b, index_b = _layer(16, 8, 3, 0, "cpu", torch.float32)
    x = torch.randn(4, 16)
    with pytest.raises(TypeError, match="pool_a: dtype"):
        adapter_linear(x.double(), pool_a, index_a, pool_b, index_b, 1.0)
    with pytest.raises(TypeError, match="index_a: expected a 1-D int32"):
        adapter_linear(x, pool_a, index_a.long(), pool_b, index_b, 1.0)
    with pytest.raises(ValueError, match="shard length"):
        adapter_linear(torch.randn(4, 15), pool_a, index_a, pool_b, index_b, 1.0)
    bad = index_a.clone()
    bad[0] = pool_a.shape[0]  # out of range: the core refuses before writing
    with pytest.raises(ValueError, match=r"index_a\[0\] = \d+ is out of range"):
        adapter_linear(x, pool_a, bad, pool_b, index_b, 1.0)
    with pytest.raises(ValueError, match="finite"):
        adapter_linear(x, pool_a, index_a, pool_b, index_b, float("nan"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the core, and the torch fallback
def test_malformed_inputs_get_errors_naming_them_on_every_path(dtype):
    pool_a, index_a, pool_b, index_b = _layer(16, 8, 3, 0, "cpu", dtype)
    x = torch.randn(4, 16).to(dtype)
    with pytest.raises(ValueError, match="x: has no columns"):
        adapter_linear(x[:, :0], pool_a, index_a, pool_b, index_b, 1.0)
    with pytest.raises(ValueError, match="pool_a: expected a 2-D"):
        adapter_linear(x, pool_a.detach().reshape(-1), index_a, pool_b, index_b, 1.0)
    with pytest.raises(ValueError, match="pool_b: expected a 2-D"):
        adapter_linear(x, pool_a, index_a, pool_b.detach().reshape(-1), index_b, 1.0)
    for name in ("index_a", "index_b"):
        tables = {"index_a": index_a.clone(), "index_b": index_b.clone()}
        tables[name][-1] = 10**6
        with pytest.raises(ValueError, match=f"{name}.*out of range|{name}: values must be in"):
            adapter_linear(x, pool_a, tables["index_a"], pool_b, tables["index_b"], 1.0)
    with pytest.raises(ValueError, match="scale = 1e\\+39 is not finite"):
        adapter_linear(x, pool_a, index_a, pool_b, index_b, 1e39)
