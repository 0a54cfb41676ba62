"""Large CPU calls on the assembled path are cut into row chunks that run on the process's OpenMP
team (torch's; csrc/cpu_team.c), and at small ranks their pool gradients stream x's and dy's rows
(gtx_rows in csrc/cpu_kernels.inc). Split calls must give the float64 reference's outputs and
gradients at every rank and stride, the same bits run after run, accumulate pool gradients like
whole calls, and stay whole when there is nothing to split onto."""
import concurrent.futures

import pytest
import torch

import mos
from mos import _C
from mos.testing.reference import reference_backward, reference_forward
from mos.torch import core_bridge, ops

D_IN, D_OUT, RANK, SHARDS = 96, 160, 8, 2


@pytest.fixture
def torch_threads():
    """Sets torch's thread count for one test, restoring it after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _case(n_rows, seed=0, dtype=torch.float32, rank=RANK, strided=False):
    """x, pools, index tables, base weight, dy; strided: x and dy are column slices of wider rows."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    shards = 2 * rank * SHARDS
    pool_a = draw(shards, D_IN // SHARDS)
    pool_b = draw(shards, D_OUT // SHARDS)
    index_a = torch.randperm(shards, generator=g)[:rank * SHARDS].to(torch.int32)
    index_b = torch.randperm(shards, generator=g)[:rank * SHARDS].to(torch.int32)
    pad = 7 if strided else 0
    x, dy = draw(n_rows, D_IN + pad)[:, pad:], draw(n_rows, D_OUT + pad)[:, :D_OUT]
    return x, pool_a, index_a, pool_b, index_b, draw(D_OUT, D_IN), dy


def _run(case):
    """y, dx, dpool_a, dpool_b of the training op (base product and adapter as one op)."""
    x, pool_a, index_a, pool_b, index_b, weight, dy = case
    x = x.detach().requires_grad_()
    pool_a, pool_b = pool_a.clone(), pool_b.clone()
    pool_a.requires_grad_()
    pool_b.requires_grad_()
    y = ops.linear_with_adapter(x, weight, None, pool_a, index_a, pool_b, index_b, 1.5)
    y.backward(dy)
    return y.detach(), x.grad, pool_a.grad, pool_b.grad


def _reference(case):
    x, pool_a, index_a, pool_b, index_b, weight, dy = (t.double() if t.is_floating_point() else t for t in case)
    y = reference_forward(x, pool_a, index_a, pool_b, index_b, 1.5, x @ weight.T)
    dx, dpool_a, dpool_b = reference_backward(dy, x, pool_a, index_a, pool_b, index_b, 1.5)
    return y, dx + dy @ weight, dpool_a, dpool_b


def _assert_near(got, want, tol):
    """Largest error against the largest magnitude: float32 sums of ~100 products of unit normals."""
    error = (got.double() - want).abs().max() / want.abs().max()
    assert error <= tol, f"relative error {float(error):.2e} over {tol:.0e}"


def test_calls_are_split_one_chunk_per_torch_thread(torch_threads):
    torch_threads(2)
    assert _C.cpu_linear_chunks(256) == 2
    assert _C.cpu_linear_chunks(63) == 1  # under two chunks of 32 rows: not worth a second thread
    torch_threads(3)
    assert _C.cpu_linear_chunks(96) == 3
    assert _C.cpu_linear_chunks(95) == 2
    torch_threads(1)
    assert _C.cpu_linear_chunks(256) == 1


def test_no_split_while_openblas_runs_threads_of_its_own(torch_threads):
    torch_threads(2)
    previous = mos.set_num_threads(2)
    try:
        assert _C.cpu_linear_chunks(256) == 1
    finally:
        mos.set_num_threads(previous)


@pytest.mark.parametrize("n_rows", [64, 97, 300])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_split_calls_match_the_float64_reference(torch_threads, n_rows, threads):
    torch_threads(threads)
    case = _case(n_rows)
    for got, want in zip(_run(case), _reference(case)):
        _assert_near(got, want, 2e-6)


@pytest.mark.parametrize("rank", [1, 3, 16, 17, 40])  # streamed up to 16, OpenBLAS beyond
@pytest.mark.parametrize("strided", [False, True])
def test_every_rank_and_row_stride_matches_the_float64_reference(torch_threads, rank, strided):
    torch_threads(2)
    case = _case(131, seed=rank, rank=rank, strided=strided)
    assert case[0].stride(0) == D_IN + (7 if strided else 0)
    for got, want in zip(_run(case), _reference(case)):
        _assert_near(got, want, 2e-6)


def test_float64_split_calls_agree_with_whole_ones_to_rounding(torch_threads):
    case = _case(200, dtype=torch.float64)
    torch_threads(1)
    whole = _run(case)
    torch_threads(2)
    split = _run(case)
    for a, b in zip(whole, split):
        _assert_near(a, b, 1e-14)


def test_a_split_call_gives_the_same_bits_every_run(torch_threads):
    torch_threads(2)
    case = _case(256, seed=3)
    first = _run(case)
    for _ in range(3):
        for a, b in zip(first, _run(case)):
            assert torch.equal(a, b)


def test_split_backward_accumulates_into_existing_pool_gradients(torch_threads):
    torch_threads(2)
    x, pool_a, index_a, pool_b, index_b, _, dy = _case(128, seed=5)
    grads = []
    for accumulate in (False, True):
        pa, pb = pool_a.clone(), pool_b.clone()
        dpool_a, dpool_b = torch.full_like(pa, 0.25), torch.full_like(pb, -0.5)
        dx = torch.zeros_like(x)
        h = torch.empty(x.shape[0], RANK)
        core_bridge.linear_forward(torch.zeros_like(dy), x, pa, index_a, pb, index_b, 1.5, h, RANK)
        core_bridge.linear_backward(dx, dpool_a, dpool_b, dy, x, pa, index_a, pb, index_b, 1.5, h, RANK)
        if accumulate:  # a second call adds the same gradients again
            core_bridge.linear_backward(dx, dpool_a, dpool_b, dy, x, pa, index_a, pb, index_b, 1.5, h, RANK)
        grads.append((dx, dpool_a, dpool_b))
    (dx1, da1, db1), (dx2, da2, db2) = grads
    torch.testing.assert_close(dx2, 2 * dx1)
    torch.testing.assert_close(da2 - 0.25, 2 * (da1 - 0.25))
    torch.testing.assert_close(db2 + 0.5, 2 * (db1 + 0.5))


def test_split_calls_from_several_threads_at_once(torch_threads):
    """Each Python thread that calls in gets its own OpenMP team (sized by its own thread count, so
    the chunks and the rounding may differ from the main thread's); calls must not mix."""
    torch_threads(2)
    cases = [_case(160, seed=s) for s in range(4)]
    want = [_run(c) for c in cases]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(_run, cases * 3))
    for i, result in enumerate(got):
        for a, b in zip(result, want[i % 4]):
            _assert_near(a, b.double(), 1e-6)


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (2**70, ValueError), (1.5, TypeError), ("64", TypeError)])
def test_the_chunk_query_names_a_bad_row_count(bad, error):
    with pytest.raises(error, match="n_rows"):
        _C.cpu_linear_chunks(bad)
