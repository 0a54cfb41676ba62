"""No leaks over many calls, and thread safety with the GIL released."""
import threading

import numpy as np
import pytest

import mos
from mos import _C, functional as F

psutil = pytest.importorskip("psutil")


def problem(n_rows, seed=0):
    rng = np.random.default_rng(seed)
    config = mos.MoSConfig(r=8, equivalent_rank=4, shards_per_vector=4, private_rank=1)
    pool = mos.ShardPool("q", 64, 48, 4, config)
    ia, ib = pool.indices(3)
    return dict(x=rng.standard_normal((n_rows, 64)).astype(np.float32),
                pool_a=rng.standard_normal(pool.pool_a_shape).astype(np.float32),
                index_a=ia.copy(),
                pool_b=rng.standard_normal(pool.pool_b_shape).astype(np.float32),
                index_b=ib.copy(),
                dy=rng.standard_normal((n_rows, 48)).astype(np.float32))


def test_resident_memory_flat_over_20000_calls():
    torch = pytest.importorskip("torch")
    p = problem(9)
    t = {k: torch.from_numpy(v) for k, v in p.items()}
    y, dx = np.zeros((9, 48), np.float32), np.zeros((9, 64), np.float32)
    dpa, dpb = np.zeros_like(p["pool_a"]), np.zeros_like(p["pool_b"])
    ty = torch.zeros(9, 48)

    def calls(n):
        for i in range(n):
            _C.linear_forward(y, p["x"], p["pool_a"], p["index_a"], p["pool_b"], p["index_b"], 0.5)
            _C.linear_backward(dx, dpa, dpb, p["dy"], p["x"], p["pool_a"], p["index_a"], p["pool_b"],
                               p["index_b"], 0.5)
            # the DLPack path (capsules and deleters) and the error path
            _C.linear_forward(ty, t["x"], t["pool_a"], t["index_a"], t["pool_b"], t["index_b"], 0.5)
            try:
                _C.linear_forward(y, p["x"], p["pool_a"], p["index_b"][:3], p["pool_b"], p["index_b"], 0.5)
            except ValueError:
                pass

    process = psutil.Process()
    calls(2000)  # warm up allocator pools
    before = process.memory_info().rss
    calls(20000)
    grown = process.memory_info().rss - before
    assert grown < 4 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 20,000 calls"


@pytest.mark.parametrize("n_rows", [2, 300])
def test_four_threads_give_the_serial_results(n_rows):
    problems = [problem(n_rows, seed) for seed in range(4)]
    serial = []
    for p in problems:
        y = F.forward(p["x"], p["pool_a"], p["index_a"], p["pool_b"], p["index_b"], 0.5)
        serial.append((y,) + F.backward(p["dy"], p["x"], p["pool_a"], p["index_a"], p["pool_b"],
                                        p["index_b"], 0.5))
    results = [None] * 4
    barrier = threading.Barrier(4)

    def work(i):
        p = problems[i]
        barrier.wait()
        for _ in range(50):
            y = F.forward(p["x"], p["pool_a"], p["index_a"], p["pool_b"], p["index_b"], 0.5)
            grads = F.backward(p["dy"], p["x"], p["pool_a"], p["index_a"], p["pool_b"],
                               p["index_b"], 0.5)
        results[i] = (y,) + grads

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, serial):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def test_errors_are_per_thread():
    """A failure on one thread never leaks its message into another thread's exception."""
    p = problem(3)
    messages = []

    def fail(idx, name):
        try:
            _C.linear_forward(np.zeros((3, 48), np.float32), p["x"], p["pool_a"], idx, p["pool_b"],
                              p["index_b"], 0.5)
        except ValueError as e:
            messages.append((name, str(e)))

    threads = [threading.Thread(target=fail, args=(p["index_a"][:5].copy(), f"t{i}")) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(messages) == 4 and all("index_a: length 5" in m for _, m in messages)
