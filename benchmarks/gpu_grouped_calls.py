"""A few small calls of the grouped serving kernels (group tables, shrink, expand) in every dtype,
with and without segments, each checked against the per-row strategy: what gpu_check.sh runs
under compute-sanitizer's racecheck (which serialises the kernels, so the sizes stay small).

    compute-sanitizer --tool racecheck python benchmarks/gpu_grouped_calls.py
"""
import numpy as np
import torch

import mos
from mos import functional as F


def adapters(k, d_in, d_out, rank, dtype, seed):
    """K adapters packed as batched_forward takes them, on the GPU."""
    rng = np.random.default_rng(seed)
    pools_a, pools_b, index_a, index_b = [], [], [], []
    off_a = off_b = 0
    for a in range(k):
        config = mos.MoSConfig(r=rank, equivalent_rank=8, shards_per_vector=2, private_rank=1, seed=a)
        pool = mos.ShardPool("q", d_in, d_out, 3, config)
        ia, ib = pool.indices(a % 3)
        pools_a.append(rng.standard_normal(pool.pool_a_shape))
        pools_b.append(rng.standard_normal(pool.pool_b_shape))
        index_a.append(ia + off_a)
        index_b.append(ib + off_b)
        off_a += pool.pool_a_shape[0]
        off_b += pool.pool_b_shape[0]
    put = lambda a, t=dtype: torch.from_numpy(np.ascontiguousarray(a)).to("cuda", t)  # noqa: E731
    return dict(pool_a=put(np.concatenate(pools_a)), index_a=put(np.stack(index_a), torch.int32),
                pool_b=put(np.concatenate(pools_b)), index_b=put(np.stack(index_b), torch.int32),
                scales=put(rng.uniform(0.5, 2.0, k), torch.float32))


def main():
    assert torch.cuda.is_available() and mos.build_info()["cuda"], "needs a GPU and a CUDA build of mos"
    rng = np.random.default_rng(0)
    n, d_in, d_out, k = 70, 48, 40, 4
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        args = adapters(k, d_in, d_out, 20, dtype, seed=1)  # rank 20: two 16-wide passes of shrink
        ids = np.sort(rng.integers(-1, k, n)).astype(np.int32)
        ids_t = torch.from_numpy(ids).cuda()
        x = torch.from_numpy(rng.standard_normal((n, d_in))).to("cuda", dtype)
        want = F.batched_forward(x, **args, adapter_ids=ids_t, strategy="per_row")
        for segments in (None, F.segments_of(ids), np.array([0, 30, 10, n], np.int32)):
            seg = None if segments is None else torch.from_numpy(segments).cuda()
            got = F.batched_forward(x, **args, adapter_ids=ids_t, strategy="grouped", segments=seg)
            tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)  # 16-bit: an ulp or two
            torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)
    torch.cuda.synchronize()
    print("grouped serving calls: all dtypes and segment layouts agree with the per-row strategy")


if __name__ == "__main__":
    main()
