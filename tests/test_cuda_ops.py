"""CUDA-only checks: 16-bit dtypes against the float64 reference with dtype-aware tolerances, every
launch path (aligned / unaligned, shard lengths not a multiple of 8, N = 0 and 1), and streams.
Skipped (not failed) without a CUDA build and a visible GPU."""
import numpy as np
import pytest

import mos
from mos import functional as F

import reference as ref
from conftest import DEVICES

cuda_only = DEVICES[1].marks
pytestmark = list(cuda_only)


def torch_dtype(name):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def naive_same_precision(x, pa, ia, pb, ib, scale, r):
    """The obvious torch computation in the input precision: the error budget's yardstick."""
    a = pa[ia.long()].reshape(r, -1)
    bt = pb[ib.long()].reshape(r, -1)
    return scale * (x @ a.T) @ bt


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shard_len,n_rows", [(8, 0), (8, 1), (8, 33), (5, 1), (5, 33), (12, 257)])
def test_16bit_error_within_twice_the_naive_error(dtype, shard_len, n_rows):
    import torch

    rng = np.random.default_rng(shard_len * 100 + n_rows)
    l = 4
    config = mos.MoSConfig(r=8, equivalent_rank=4, shards_per_vector=l, private_rank=1)
    pool = mos.ShardPool("q", shard_len * l, (shard_len + 3) * l, 4, config)
    pa64 = rng.standard_normal(pool.pool_a_shape)
    pb64 = rng.standard_normal(pool.pool_b_shape)
    ia, ib = (t.copy() for t in pool.indices(2))
    x64 = rng.standard_normal((n_rows, pool.d_in))
    dt = torch_dtype(dtype)
    cuda = lambda a, d=dt: torch.from_numpy(a).to("cuda", d)
    pa, pb, x = cuda(pa64), cuda(pb64), cuda(x64)
    ia_t, ib_t = torch.from_numpy(ia).cuda(), torch.from_numpy(ib).cuda()
    # reference on the values the 16-bit inputs actually hold
    held = lambda t: t.double().cpu().numpy()
    want = ref.forward(held(x), held(pa), ia, held(pb), ib, 0.5, 8)
    got = F.forward(x, pa, ia_t, pb, ib_t, 0.5)
    torch.cuda.synchronize()
    naive = naive_same_precision(x, pa, ia_t, pb, ib_t, 0.5, 8)
    err = np.abs(held(got) - want).max(initial=0)
    naive_err = np.abs(held(naive) - want).max(initial=0)
    floor = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 1e-2}[dtype]
    assert err <= 2 * naive_err + floor * np.abs(want).max(initial=1.0)


@pytest.mark.parametrize("offset_elems", [0, 1, 3])
def test_unaligned_views_take_the_fallback_path(offset_elems):
    import torch

    rng = np.random.default_rng(offset_elems)
    config = mos.MoSConfig(r=4, equivalent_rank=2, shards_per_vector=2, private_rank=1)
    pool = mos.ShardPool("q", 16, 12, 3, config)
    pa = rng.standard_normal(pool.pool_a_shape)
    pb = rng.standard_normal(pool.pool_b_shape)
    ia, ib = (t.copy() for t in pool.indices(1))
    x = rng.standard_normal((7, 16))
    big = torch.zeros(7 * 16 + offset_elems + 16, dtype=torch.float32, device="cuda")
    xv = big[offset_elems:offset_elems + 7 * 16].view(7, 16)
    xv.copy_(torch.from_numpy(x))
    got = F.forward(xv, torch.from_numpy(pa).float().cuda(), torch.from_numpy(ia).cuda(),
                    torch.from_numpy(pb).float().cuda(), torch.from_numpy(ib).cuda(), 1.0)
    want = ref.forward(x, pa, ia, pb, ib, 1.0, 4)
    np.testing.assert_allclose(got.cpu().double().numpy(), want, rtol=1e-4, atol=1e-4)


def small_cuda_problem():
    """(rng, to-cuda, pool_a, index_a, pool_b, index_b) of a 64 -> 64 layer at r = 4."""
    import torch

    rng = np.random.default_rng(0)
    config = mos.MoSConfig(r=4, equivalent_rank=2, shards_per_vector=2, private_rank=1)
    pool = mos.ShardPool("q", 64, 64, 3, config)
    t = lambda a: torch.from_numpy(a).float().cuda()
    pa, pb = t(rng.standard_normal(pool.pool_a_shape)), t(rng.standard_normal(pool.pool_b_shape))
    ia, ib = (torch.from_numpy(i.copy()).cuda() for i in pool.indices(0))
    return rng, t, pa, ia, pb, ib


def test_runs_on_the_callers_stream():
    import torch

    rng, t, pa, ia, pb, ib = small_cuda_problem()
    x = t(rng.standard_normal((512, 64)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = F.forward(x, pa, ia, pb, ib, 1.0)
    side.synchronize()
    base = F.forward(x, pa, ia, pb, ib, 1.0)
    torch.cuda.synchronize()
    torch.testing.assert_close(y, base)


def test_forward_is_capturable_in_a_cuda_graph():
    import torch

    rng, t, pa, ia, pb, ib = small_cuda_problem()
    x = t(rng.standard_normal((16, 64)))
    y = torch.zeros(16, 64, device="cuda")
    ws = torch.empty(F.workspace_bytes(16, 64, 64, 4, 4, cuda=True), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up creates the cuBLAS handle outside the capture
        F.forward(x, pa, ia, pb, ib, 1.0, out=y, workspace=ws)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.zero_()
        F.forward(x, pa, ia, pb, ib, 1.0, out=y, workspace=ws)
    x.copy_(t(rng.standard_normal((16, 64))))
    graph.replay()
    torch.cuda.synchronize()
    want = ref.forward(x.double().cpu().numpy(), pa.double().cpu().numpy(), ia.cpu().numpy(),
                       pb.double().cpu().numpy(), ib.cpu().numpy(), 1.0, 4)
    np.testing.assert_allclose(y.double().cpu().numpy(), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- backward and scatter-add, every dtype

ERR_FLOOR = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 1e-2}


def within_twice_naive(got, naive, want, dtype):
    """The kernel's error against float64 stays within 2x a naive same-precision computation's."""
    err = np.abs(got - want).max(initial=0)
    naive_err = np.abs(naive - want).max(initial=0)
    assert err <= 2 * naive_err + ERR_FLOOR[dtype] * np.abs(want).max(initial=1.0), (err, naive_err)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shard_len,n_rows,with_h", [(8, 1, False), (8, 33, True), (5, 33, False),
                                                     (12, 257, True)])
def test_backward_matches_the_float64_reference(dtype, shard_len, n_rows, with_h):
    """16-bit inputs run GemmEx with float32 outputs for dA, dB^T and the 16-bit scatters."""
    import torch

    rng = np.random.default_rng(shard_len * 1000 + n_rows)
    r, l, scale = 8, 4, 0.75
    config = mos.MoSConfig(r=r, equivalent_rank=4, shards_per_vector=l, private_rank=1)
    pool = mos.ShardPool("q", shard_len * l, (shard_len + 3) * l, 4, config)
    ia, ib = (t.copy() for t in pool.indices(2))
    dt = torch_dtype(dtype)
    cuda = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to("cuda", dt)  # noqa: E731
    held = lambda t: t.double().cpu().numpy()  # noqa: E731
    x, dy = cuda(rng.standard_normal((n_rows, pool.d_in))), cuda(rng.standard_normal((n_rows, pool.d_out)))
    pa, pb = cuda(rng.standard_normal(pool.pool_a_shape)), cuda(rng.standard_normal(pool.pool_b_shape))
    ia_t, ib_t = torch.from_numpy(ia).cuda(), torch.from_numpy(ib).cuda()
    h = None
    if with_h:
        h = torch.empty(n_rows, r, dtype=dt, device="cuda")
        F.forward(x, pa, ia_t, pb, ib_t, scale, h=h)
    dx, dpa, dpb = F.backward(dy, x, pa, ia_t, pb, ib_t, scale, h=h)
    torch.cuda.synchronize()
    want = ref.backward(held(dy), held(x), held(pa), ia, held(pb), ib, scale, r)
    # the naive computation: torch's own autograd through gather + matmul, in the input dtype
    pa_n, pb_n, x_n = (t.clone().requires_grad_() for t in (pa, pb, x))
    a = pa_n[ia_t.long()].reshape(r, -1)
    bt = pb_n[ib_t.long()].reshape(r, -1)
    (scale * (x_n @ a.T) @ bt).backward(dy)
    for got, naive, expect in zip((dx, dpa, dpb), (x_n.grad, pa_n.grad, pb_n.grad), want):
        within_twice_naive(held(got), held(naive), expect, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("shard_len,offset", [(8, 0), (5, 0), (16, 1), (64, 0)])
def test_scatter_add_matches_the_float64_reference(dtype, shard_len, offset):
    """The CUDA scatter_add entry point: vector path (aligned, shard_len % V == 0) and scalar path."""
    import torch

    rng = np.random.default_rng(shard_len + offset)
    n_shards, n_index = 40, 24
    index = rng.permutation(n_shards)[:n_index].astype(np.int32)
    dt = torch.float64 if dtype == "float64" else torch_dtype(dtype)
    pool0 = torch.from_numpy(rng.standard_normal((n_shards, shard_len))).to("cuda", dt)
    flat = torch.zeros(n_index * shard_len + offset, dtype=dt, device="cuda")
    rows = flat[offset:].view(n_index, shard_len)  # offset 1 misaligns the rows: scalar fallback
    rows.copy_(torch.from_numpy(rng.standard_normal((n_index, shard_len))))
    pool = pool0.clone()
    F.scatter_add(pool, rows, torch.from_numpy(index).cuda())
    naive = pool0.clone()
    naive[torch.from_numpy(index).long().cuda()] += rows
    torch.cuda.synchronize()
    held = lambda t: t.double().cpu().numpy()  # noqa: E731
    want = held(pool0)
    want[index] += held(rows)
    if dtype == "float64":
        np.testing.assert_allclose(held(pool), want, rtol=1e-15, atol=0)
    else:
        within_twice_naive(held(pool), held(naive), want, dtype)
    untouched = np.setdiff1d(np.arange(n_shards), index)
    assert torch.equal(pool[untouched], pool0[untouched])


# ---------------------------------------------------------------- streams and graphs

def test_assemble_and_scatter_add_graph_capture_on_torchs_current_stream():
    """Captured on a side stream, a launch on the legacy default stream would break the capture."""
    import torch

    rng, t, pa, ia, pb, ib = small_cuda_problem()
    grad = torch.zeros_like(pa)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        F.assemble(pa, ia, 4)  # outside the capture first
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        a = F.assemble(pa, ia, 4)
        F.scatter_add(grad, a.reshape(len(ia), -1), ia)
    graph.replay()
    torch.cuda.synchronize()
    want_a = ref.assemble(pa.double().cpu().numpy(), ia.cpu().numpy(), 4)
    np.testing.assert_array_equal(a.double().cpu().numpy(), want_a)
    want_grad = np.zeros(tuple(pa.shape))
    want_grad[ia.cpu().numpy()] = want_a.reshape(len(ia), -1)
    np.testing.assert_array_equal(grad.double().cpu().numpy(), want_grad)


def test_forward_and_backward_graph_capture_on_a_fresh_stream():
    """cuBLAS works in the call's workspace slice: a capture on a stream cuBLAS never saw must not
    allocate (one uncaptured call on this thread created the handle)."""
    import torch

    rng, t, pa, ia, pb, ib = small_cuda_problem()
    x, dy = t(rng.standard_normal((32, 64))), t(rng.standard_normal((32, 64)))
    F.forward(x, pa, ia, pb, ib, 1.0)  # creates this thread's cuBLAS handle, uncaptured
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = F.forward(x, pa, ia, pb, ib, 1.0)
        dx, dpa, dpb = F.backward(dy, x, pa, ia, pb, ib, 1.0)
    graph.replay()
    torch.cuda.synchronize()
    held = lambda a: a.double().cpu().numpy()  # noqa: E731
    args = (held(pa), ia.cpu().numpy(), held(pb), ib.cpu().numpy(), 1.0, 4)
    np.testing.assert_allclose(held(y), ref.forward(held(x), *args), rtol=1e-4, atol=1e-4)
    for got, want in zip((dx, dpa, dpb), ref.backward(held(dy), held(x), *args)):
        np.testing.assert_allclose(held(got), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- launch streams and devices

def test_an_explicit_stream_that_is_not_current_owns_the_calls_copies():
    """stream= names a busy side stream that is not torch's current one. The call's temporaries
    (here the contiguous copy of a column-strided x) must belong to that stream: were they the
    current stream's, the allocations below would reuse and overwrite them before the side stream
    read them."""
    import torch

    rng, t, pa, ia, pb, ib = small_cuda_problem()
    x = t(rng.standard_normal((512, 128)))[:, ::2]  # column stride 2: mos.functional copies it
    want = F.forward(x.contiguous(), pa, ia, pb, ib, 1.0)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # still busy when the call below returns
    y = F.forward(x, pa, ia, pb, ib, 1.0, stream=side.cuda_stream)
    clobber = [torch.full((512, 64), float("nan"), device="cuda") for _ in range(16)]
    side.synchronize()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, want)
    assert all(torch.isnan(c).all() for c in clobber)


def test_tensors_on_a_gpu_that_is_not_the_current_one():
    """Tensor.__dlpack__ refuses them; mos.functional hands them over through torch's C exporter."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    rng, _, pa, ia, pb, ib = small_cuda_problem()
    x = torch.from_numpy(rng.standard_normal((32, 64))).float()
    on = lambda d: [a.to(f"cuda:{d}") for a in (x, pa, ia, pb, ib)]  # noqa: E731
    with torch.cuda.device(1):
        want = F.forward(*on(1), 1.0).cpu()
    with torch.cuda.device(0):
        got = F.forward(*on(1), 1.0)
        torch.cuda.synchronize(1)
    assert got.device == torch.device("cuda:1")
    torch.testing.assert_close(got.cpu(), want)


def test_mixed_batch_refuses_graph_capture_clearly():
    """model(..., adapter_names=...) copies its row plan from host memory, which a capture forbids:
    it says so instead of failing inside torch or the driver (docs/serving.md, CUDA graphs)."""
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 32)

        def forward(self, x):
            return self.proj(x)

    config = mos.MoSConfig(r=2, equivalent_rank=2, private_rank=1, target_modules=["proj"])
    model = mos.get_mos_model(Tiny(), config, adapter_name="a").cuda().eval()
    x = torch.randn(2, 3, 32, device="cuda")
    with torch.no_grad():
        uncaptured = model(x, adapter_names=["a", "__base__"])  # creates the cuBLAS handle too
    torch.cuda.synchronize()
    assert uncaptured.shape == (2, 3, 32)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="a CUDA graph capture does not allow"):
        with torch.no_grad(), torch.cuda.graph(graph):
            model(x, adapter_names=["a", "__base__"])
