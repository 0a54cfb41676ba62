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
    ws = torch.empty(F.workspace_bytes(16, 64, 64, 4, 4), dtype=torch.uint8, device="cuda")
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
