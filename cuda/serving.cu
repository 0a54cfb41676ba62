/*
 * serving.cu -- the CUDA back end of the batched (many-adapter) forward, mos_cuda_batched_forward
 * in csrc/mos.h. Part of the CUDA back end's library (mos/_mos_cuda.so; see kernels.cu).
 *
 * What it computes: for every row n of x with a = adapter_ids[n] in [0, K):
 *   h[n, j] = sum_k x[n, k] A_a[j, k]              j < r_a        (shrink)
 *   y[n, :] += s_a * sum_j h[n, j] B_a^T[j, :]                    (expand)
 * where A_a[j, :] is the concatenation of pool_a rows index_a[a, j*l .. j*l + l - 1] and B_a^T[j, :]
 * that of pool_b rows index_b[a, ...] (mos.h, "serving"). Rows with id -1 are not touched.
 *
 * Argument layouts: x (N, d_in) and y (N, d_out) row-major with row strides; pools (rows,
 * d_in / l) and (rows, d_out / l) contiguous; index tables (K, max_rank * l) contiguous int32;
 * scales (K,) float32 or float64; ranks (K,) int32 or NULL; adapter_ids (N,) int32; segments
 * (n_segments + 1,) int32 or NULL; every one on the device. The workspace (mos_batched_workspace_bytes)
 * holds h (N, max_rank) in the accumulation type and, for the grouped strategy, the group tables.
 *
 * Variants and their requirements:
 *   per-row (Punica BGMV-style; decode)
 *     shrink_rows_kernel<T, V>   one warp per (row, rank vector): a sharded dot product of length
 *                                d_in, reduced with shuffles. V = 16 bytes of T per load when the
 *                                A shard length, x's row stride and both bases allow it, else 1.
 *     expand_rows_kernel<T, V>   one thread per V consecutive output columns of one row (inside
 *                                one B shard): loops over the row's rank, reads h from global
 *                                memory (one broadcast address per warp). Same V rule on B and y.
 *   grouped (Punica SGMV-style; prefill)
 *     group_tables_kernel        one block: the groups (the runs of equal consecutive ids, also
 *                                cut at every offset of the caller's segments) and an exclusive
 *                                scan of their tile counts (ceil(rows / MOS_SERVE_TILE_ROWS); 0 for
 *                                id -1 or rank 0).
 *     shrink_groups_kernel<T>    one block per tile of <= 16 rows of one adapter: 16 x 16 outputs of
 *                                h per pass, x and A staged through shared memory in 64-column
 *                                chunks, so A is read once per tile instead of once per row.
 *     expand_groups_kernel<T>    one block per (tile, 256 columns): each B element read once per
 *                                tile and applied to its 16 rows.
 *     Both compute kernels launch min(N, 4 x SMs) blocks in x and loop over the tiles the table
 *     kernel counted on the device (a block finds each of its tiles by binary search), so no block
 *     is launched only to exit and the launch shapes depend only on N, the device and d_out.
 *   Accumulation is float32 for float32/float16/bfloat16 and float64 for float64; y is read,
 *   added to once and rounded once.
 *
 * Device-resident ids, indices, ranks and segments cannot be validated without a host sync: an
 * id outside [0, K) is treated as -1, an index outside the pool contributes zero and a rank is
 * clamped to [0, max_rank]; nothing outside the given tensors is ever touched. Segments only add
 * cuts between groups: offsets outside (0, N), repeated or decreasing ones cut nothing or make
 * smaller groups, so every row still belongs to exactly one group of one id, whatever they hold
 * (no two tiles share a row, no row is skipped). The binding validates CPU tensors instead.
 *
 * Streams and graphs: every kernel runs on (cudaStream_t)p->stream on device p->device_id (made
 * current for the call and restored after). No allocation, no host synchronisation and no
 * host-visible metadata: launch shapes depend on sizes only, so a decode step can be captured in a
 * CUDA graph and replayed with new ids, scales or segments written into the same device tensors.
 *
 * Sections: kernels, launchers, dispatch.
 */
#include <limits.h>
#include <stdint.h>

#include "common.cuh"

#define MOS_SERVE_WARPS 8          /* warps per shrink_rows block */
#define MOS_SERVE_EXPAND_THREADS 128
#define MOS_SERVE_TILE_ROWS 16     /* rows of one grouped tile */
#define MOS_SERVE_TILE_RANKS 16    /* rank vectors of one grouped shrink pass */
#define MOS_SERVE_TILE_K 64        /* d_in columns staged per grouped shrink step */
#define MOS_SERVE_GROUP_THREADS 256
#define MOS_SERVE_TABLE_THREADS 1024
#define MOS_SERVE_GROUP_BLOCKS_PER_SM 4 /* resident grouped blocks per SM the launch aims for */

namespace {

/* ================================================================ kernels */

/* Everything the kernels of one call read, passed by value. */
template <typename T> struct serve_args {
    typedef typename acc_of<T>::type acc;
    const T *x;
    int64_t x_stride;
    T *y;
    int64_t y_stride;
    const T *pool_a, *pool_b;
    int64_t n_shards_a, n_shards_b;
    const int32_t *index_a, *index_b;
    int64_t width;          /* max_rank * l: row length of the index tables */
    const int32_t *ranks;   /* or NULL */
    int64_t max_rank;
    const void *scales;
    int scales_f64;
    const int32_t *ids;
    int64_t n_rows, n_adapters;
    int64_t l, sla, slb, d_in, d_out;
    acc *h;                 /* (N, max_rank) */
};

/* The adapter of row n, or -1 (base only, or an id outside [0, K)). */
template <typename T> __device__ __forceinline__ int64_t adapter_of(const serve_args<T> &g, int64_t n) {
    const int64_t a = g.ids[n];
    return a >= 0 && a < g.n_adapters ? a : -1;
}

template <typename T> __device__ __forceinline__ int64_t rank_of(const serve_args<T> &g, int64_t a) {
    if (g.ranks == NULL) return g.max_rank;
    const int64_t r = g.ranks[a];
    return r < 0 ? 0 : (r > g.max_rank ? g.max_rank : r);
}

template <typename T>
__device__ __forceinline__ typename serve_args<T>::acc scale_of(const serve_args<T> &g, int64_t a) {
    typedef typename serve_args<T>::acc acc;
    return g.scales_f64 ? (acc)((const double *)g.scales)[a] : (acc)((const float *)g.scales)[a];
}

/* Sum over the 32 lanes of a warp (every lane gets the total). */
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* h[n, j] = x[n] . A_a[j] for one (row, rank vector) per warp. */
template <typename T, int V>
__global__ void __launch_bounds__(MOS_SERVE_WARPS * 32) shrink_rows_kernel(serve_args<T> g) {
    typedef typename serve_args<T>::acc acc;
    const int lane = threadIdx.x & 31;
    const int64_t w = (int64_t)blockIdx.x * MOS_SERVE_WARPS + (threadIdx.x >> 5);
    const int64_t n = w / g.max_rank, j = w - n * g.max_rank;
    if (n >= g.n_rows) return; /* warp-uniform: n, j and a are the same on every lane */
    const int64_t a = adapter_of(g, n);
    if (a < 0 || j >= rank_of(g, a)) return;
    const T *xn = g.x + n * g.x_stride;
    const int32_t *ia = g.index_a + a * g.width + j * g.l;
    acc sum = 0;
    for (int64_t t = 0; t < g.l; ++t) {
        const int64_t row = ia[t];
        if (row < 0 || row >= g.n_shards_a) continue; /* an out-of-range index contributes 0 */
        const T *shard = g.pool_a + row * g.sla, *xs = xn + t * g.sla;
        for (int64_t k = (int64_t)lane * V; k < g.sla; k += 32 * V) {
            const pack<T, V> u = *reinterpret_cast<const pack<T, V> *>(xs + k);
            const pack<T, V> s = *reinterpret_cast<const pack<T, V> *>(shard + k);
#pragma unroll
            for (int e = 0; e < V; ++e) sum += (acc)to_acc(u.v[e]) * (acc)to_acc(s.v[e]);
        }
    }
    sum = warp_sum(sum);
    if (lane == 0) g.h[n * g.max_rank + j] = sum;
}

/* y[n, c .. c+V) += s_a * sum_j h[n, j] B_a^T[j, c .. c+V); grid (rows, column blocks). */
template <typename T, int V>
__global__ void __launch_bounds__(MOS_SERVE_EXPAND_THREADS) expand_rows_kernel(serve_args<T> g) {
    typedef typename serve_args<T>::acc acc;
    const int64_t n = blockIdx.x;
    const int64_t c = ((int64_t)blockIdx.y * MOS_SERVE_EXPAND_THREADS + threadIdx.x) * V;
    if (c >= g.d_out) return;
    const int64_t a = adapter_of(g, n);
    if (a < 0) return;
    const int64_t r = rank_of(g, a);
    if (r == 0) return;
    const int64_t t = c / g.slb, off = c - t * g.slb; /* V columns inside one B shard */
    const int32_t *ib = g.index_b + a * g.width + t;
    const acc *hn = g.h + n * g.max_rank;
    acc sum[V];
#pragma unroll
    for (int e = 0; e < V; ++e) sum[e] = 0;
    for (int64_t j = 0; j < r; ++j) {
        const int64_t row = ib[j * g.l];
        if (row < 0 || row >= g.n_shards_b) continue;
        const pack<T, V> b = *reinterpret_cast<const pack<T, V> *>(g.pool_b + row * g.slb + off);
        const acc hj = hn[j];
#pragma unroll
        for (int e = 0; e < V; ++e) sum[e] += hj * (acc)to_acc(b.v[e]);
    }
    const acc s = scale_of(g, a);
    pack<T, V> *out = reinterpret_cast<pack<T, V> *>(g.y + n * g.y_stride + c);
    pack<T, V> yv = *out;
#pragma unroll
    for (int e = 0; e < V; ++e) from_acc((acc)to_acc(yv.v[e]) + s * sum[e], &yv.v[e]);
    *out = yv;
}

/* Exclusive scan of one int per thread over the block (blockDim.x a multiple of 32); *total gets
 * the block's sum. Every thread of the block must call it. */
__device__ int block_exclusive_scan(int v, int *warp_sums, int *total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    int incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int u = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += u;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        int s = lane < n_warps ? warp_sums[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int u = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += u;
        }
        warp_sums[lane] = s; /* inclusive over warps */
    }
    __syncthreads();
    const int base = warp > 0 ? warp_sums[warp - 1] : 0;
    *total = warp_sums[n_warps - 1];
    __syncthreads(); /* warp_sums is reused by the next call */
    return base + incl - v;
}

/* tables = [G, start[0 .. G], tile[0 .. G]] with start at tables + 1 and tile at
 * tables + 1 + (max_groups + 1): group g holds rows [start[g], start[g+1]) of one adapter and its
 * tiles are [tile[g], tile[g+1]). One block. */
__global__ void __launch_bounds__(MOS_SERVE_TABLE_THREADS)
    group_tables_kernel(int32_t *tables, int64_t max_groups, const int32_t *segments,
                        int64_t n_segments, const int32_t *ids, int64_t n_rows,
                        int64_t n_adapters, const int32_t *ranks, int tile_rows) {
    __shared__ int warp_sums[32];
    int32_t *start = tables + 1, *tile = tables + 1 + (max_groups + 1);
    int32_t *cut = tile; /* per row: 1 where a segment starts; tile[] is written only later */
    const int tid = threadIdx.x, bd = blockDim.x;
    int n_groups = 0, total = 0;
    if (segments != NULL) {
        for (int64_t n = tid; n < n_rows; n += bd) cut[n] = 0;
        __syncthreads();
        for (int64_t i = tid; i <= n_segments; i += bd) {
            const int64_t s = segments[i];
            if (s > 0 && s < n_rows) cut[s] = 1; /* offsets outside (0, N) cut nothing */
        }
        __syncthreads();
    }
    /* A group starts at row 0, where the id changes, and at every segment offset: groups then
     * cover every row exactly once, each with one id, whatever the segments hold. */
    for (int64_t base = 0; base < n_rows; base += bd) {
        const int64_t n = base + tid;
        const int flag = n < n_rows && (n == 0 || ids[n] != ids[n - 1] ||
                                        (segments != NULL && cut[n] != 0));
        const int before = block_exclusive_scan(flag, warp_sums, &total);
        if (flag) start[n_groups + before] = (int32_t)n;
        n_groups += total;
    }
    if (tid == 0) start[n_groups] = (int32_t)n_rows;
    __syncthreads(); /* start[] complete, cut[] read for the last time */
    int carry = 0;
    for (int base = 0; base < n_groups; base += bd) {
        const int grp = base + tid;
        int count = 0;
        if (grp < n_groups) {
            const int s0 = start[grp], len = start[grp + 1] - s0;
            if (len > 0) {
                const int64_t a = ids[s0];
                const int64_t r = a >= 0 && a < n_adapters ? (ranks ? ranks[a] : 1) : 0;
                if (r > 0) count = (len + tile_rows - 1) / tile_rows;
            }
        }
        const int before = block_exclusive_scan(count, warp_sums, &total);
        if (grp < n_groups) tile[grp] = carry + before;
        carry += total;
    }
    if (tid == 0) {
        tile[n_groups] = carry;
        tables[0] = n_groups;
    }
}

/* The tile of block b: rows [*r0, *r1) of adapter *a. False when b is past the last tile. */
template <typename T>
__device__ __forceinline__ bool find_tile(const serve_args<T> &g, const int32_t *tables,
                                          int64_t max_groups, int64_t b, int64_t *r0,
                                          int64_t *r1, int64_t *a) {
    const int32_t *start = tables + 1, *tile = tables + 1 + (max_groups + 1);
    const int n_groups = tables[0];
    if (n_groups <= 0 || b >= tile[n_groups]) return false;
    int lo = 0, hi = n_groups - 1; /* the last group whose first tile is <= b */
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (tile[mid] <= b) lo = mid;
        else hi = mid - 1;
    }
    *r0 = start[lo] + (b - tile[lo]) * MOS_SERVE_TILE_ROWS;
    const int64_t end = start[lo + 1], stop = *r0 + MOS_SERVE_TILE_ROWS;
    *r1 = stop < end ? stop : end;
    *a = adapter_of(g, start[lo]);
    return *a >= 0 && *r0 < *r1;
}

/* Tiles of the call: tile[n_groups] of the group tables. */
__device__ __forceinline__ int64_t tile_count(const int32_t *tables, int64_t max_groups) {
    return tables[1 + (max_groups + 1) + tables[0]];
}

/* h[rows, :r_a] = X[rows] A_a^T, one tile per step of a grid-stride loop over the tiles; thread
 * (m, jj) owns output (row m, rank j0 + jj). */
template <typename T>
__global__ void __launch_bounds__(MOS_SERVE_GROUP_THREADS)
    shrink_groups_kernel(serve_args<T> g, const int32_t *tables, int64_t max_groups) {
    typedef typename serve_args<T>::acc acc;
    __shared__ acc xs[MOS_SERVE_TILE_ROWS][MOS_SERVE_TILE_K + 1];
    __shared__ acc as[MOS_SERVE_TILE_RANKS][MOS_SERVE_TILE_K + 1];
    const int tid = threadIdx.x;
    const int m = tid / MOS_SERVE_TILE_RANKS, jj = tid % MOS_SERVE_TILE_RANKS;
    const int64_t n_tiles = tile_count(tables, max_groups);
    for (int64_t b = blockIdx.x; b < n_tiles; b += gridDim.x) {
        int64_t r0, r1, a;
        if (!find_tile(g, tables, max_groups, b, &r0, &r1, &a)) continue; /* block-uniform */
        const int64_t r = rank_of(g, a);
        const int32_t *ia = g.index_a + a * g.width;
        for (int64_t j0 = 0; j0 < r; j0 += MOS_SERVE_TILE_RANKS) {
            acc sum = 0;
            for (int64_t k0 = 0; k0 < g.d_in; k0 += MOS_SERVE_TILE_K) {
                for (int e = tid; e < MOS_SERVE_TILE_ROWS * MOS_SERVE_TILE_K; e += MOS_SERVE_GROUP_THREADS) {
                    const int mm = e / MOS_SERVE_TILE_K, kk = e % MOS_SERVE_TILE_K;
                    const int64_t row = r0 + mm, k = k0 + kk;
                    xs[mm][kk] = row < r1 && k < g.d_in ? (acc)to_acc(g.x[row * g.x_stride + k]) : (acc)0;
                }
                for (int e = tid; e < MOS_SERVE_TILE_RANKS * MOS_SERVE_TILE_K; e += MOS_SERVE_GROUP_THREADS) {
                    const int jr = e / MOS_SERVE_TILE_K, kk = e % MOS_SERVE_TILE_K;
                    const int64_t j = j0 + jr, k = k0 + kk;
                    acc v = 0;
                    if (j < r && k < g.d_in) {
                        const int64_t t = k / g.sla, row = ia[j * g.l + t];
                        if (row >= 0 && row < g.n_shards_a) v = (acc)to_acc(g.pool_a[row * g.sla + (k - t * g.sla)]);
                    }
                    as[jr][kk] = v;
                }
                __syncthreads();
#pragma unroll 8
                for (int kk = 0; kk < MOS_SERVE_TILE_K; ++kk) sum += xs[m][kk] * as[jj][kk];
                __syncthreads();
            }
            if (r0 + m < r1 && j0 + jj < r) g.h[(r0 + m) * g.max_rank + j0 + jj] = sum;
        }
    }
}

/* y[rows, c] += s_a * sum_j h[rows, j] B_a^T[j, c]; one column per thread, 16 rows per tile, a
 * grid-stride loop over the tiles in x and 256-column blocks in y. */
template <typename T>
__global__ void __launch_bounds__(MOS_SERVE_GROUP_THREADS)
    expand_groups_kernel(serve_args<T> g, const int32_t *tables, int64_t max_groups) {
    typedef typename serve_args<T>::acc acc;
    const int64_t c = (int64_t)blockIdx.y * MOS_SERVE_GROUP_THREADS + threadIdx.x;
    if (c >= g.d_out) return; /* no barrier below: threads may leave independently */
    const int64_t t = c / g.slb, off = c - t * g.slb;
    const int64_t n_tiles = tile_count(tables, max_groups);
    for (int64_t b = blockIdx.x; b < n_tiles; b += gridDim.x) {
        int64_t r0, r1, a;
        if (!find_tile(g, tables, max_groups, b, &r0, &r1, &a)) continue;
        const int64_t r = rank_of(g, a), rows = r1 - r0;
        const int32_t *ib = g.index_b + a * g.width + t;
        const acc *h = g.h + r0 * g.max_rank;
        acc sum[MOS_SERVE_TILE_ROWS];
#pragma unroll
        for (int m = 0; m < MOS_SERVE_TILE_ROWS; ++m) sum[m] = 0;
        for (int64_t j = 0; j < r; ++j) {
            const int64_t row = ib[j * g.l];
            if (row < 0 || row >= g.n_shards_b) continue;
            const acc bv = (acc)to_acc(g.pool_b[row * g.slb + off]);
#pragma unroll
            for (int m = 0; m < MOS_SERVE_TILE_ROWS; ++m)
                if (m < rows) sum[m] += h[m * g.max_rank + j] * bv;
        }
        const acc s = scale_of(g, a);
#pragma unroll
        for (int m = 0; m < MOS_SERVE_TILE_ROWS; ++m) {
            if (m >= rows) break;
            T *out = g.y + (r0 + m) * g.y_stride + c;
            from_acc((acc)to_acc(*out) + s * sum[m], out);
        }
    }
}

/* ================================================================ launchers */

bool aligned16(const void *ptr) { return (uintptr_t)ptr % 16 == 0; }

/* V-wide loads are safe when every address the kernel forms is a multiple of 16 bytes: both
 * bases, every shard start (shard_len apart) and every row start of the matrix (stride apart). */
template <typename T>
bool can_vectorize(int64_t shard_len, const void *pool, const void *matrix, int64_t stride,
                   int64_t rows) {
    constexpr int64_t V = 16 / (int64_t)sizeof(T);
    return shard_len % V == 0 && aligned16(pool) && aligned16(matrix) &&
           (rows <= 1 || (stride * (int64_t)sizeof(T)) % 16 == 0);
}

template <typename T>
mos_status launch_per_row(const serve_args<T> &g, cudaStream_t stream) {
    constexpr int V = 16 / (int)sizeof(T);
    const int64_t warps = g.n_rows * g.max_rank;
    const int64_t blocks = (warps + MOS_SERVE_WARPS - 1) / MOS_SERVE_WARPS;
    MOS_CHECK(blocks <= INT_MAX, MOS_ERR_VALUE, "rows x max_rank = %lld is too large for one launch",
              (long long)warps);
    if (can_vectorize<T>(g.sla, g.pool_a, g.x, g.x_stride, g.n_rows))
        shrink_rows_kernel<T, V><<<(unsigned)blocks, MOS_SERVE_WARPS * 32, 0, stream>>>(g);
    else
        shrink_rows_kernel<T, 1><<<(unsigned)blocks, MOS_SERVE_WARPS * 32, 0, stream>>>(g);
    CUDA_TRY(cudaGetLastError(), "batched shrink (per-row) kernel launch");
    const bool vec_b = can_vectorize<T>(g.slb, g.pool_b, g.y, g.y_stride, g.n_rows);
    const int64_t per_block = (int64_t)MOS_SERVE_EXPAND_THREADS * (vec_b ? V : 1);
    const int64_t col_blocks = (g.d_out + per_block - 1) / per_block;
    MOS_CHECK(g.n_rows <= INT_MAX && col_blocks <= 65535, MOS_ERR_VALUE,
              "%lld rows x %lld output columns exceed one launch", (long long)g.n_rows,
              (long long)g.d_out);
    const dim3 grid((unsigned)g.n_rows, (unsigned)col_blocks);
    if (vec_b)
        expand_rows_kernel<T, V><<<grid, MOS_SERVE_EXPAND_THREADS, 0, stream>>>(g);
    else
        expand_rows_kernel<T, 1><<<grid, MOS_SERVE_EXPAND_THREADS, 0, stream>>>(g);
    CUDA_TRY(cudaGetLastError(), "batched expand (per-row) kernel launch");
    return MOS_OK;
}

/* Blocks in x of the grouped compute kernels: enough to fill the device (the kernels loop over
 * the tiles), never more than the tiles can be (each holds at least one row). */
mos_status grouped_grid(int device, int64_t n_rows, unsigned *blocks) {
    int sms = 0;
    CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute(multiProcessorCount)");
    const int64_t fill = (int64_t)(sms > 0 ? sms : 1) * MOS_SERVE_GROUP_BLOCKS_PER_SM;
    *blocks = (unsigned)(n_rows < fill ? n_rows : fill);
    return MOS_OK;
}

template <typename T>
mos_status launch_grouped(const serve_args<T> &g, const mos_batched_params *p,
                          const mos_batched_workspace *w, cudaStream_t stream) {
    const int64_t col_blocks = (g.d_out + MOS_SERVE_GROUP_THREADS - 1) / MOS_SERVE_GROUP_THREADS;
    MOS_CHECK(col_blocks <= 65535, MOS_ERR_VALUE, "%lld output columns exceed one launch",
              (long long)g.d_out);
    unsigned tiles = 0;
    MOS_TRY(grouped_grid(p->device_id, g.n_rows, &tiles));
    group_tables_kernel<<<1, MOS_SERVE_TABLE_THREADS, 0, stream>>>(
        w->tables, w->max_groups, p->segments, p->n_segments, g.ids, g.n_rows, g.n_adapters,
        g.ranks, MOS_SERVE_TILE_ROWS);
    CUDA_TRY(cudaGetLastError(), "batched group tables kernel launch");
    shrink_groups_kernel<T><<<tiles, MOS_SERVE_GROUP_THREADS, 0, stream>>>(
        g, w->tables, w->max_groups);
    CUDA_TRY(cudaGetLastError(), "batched shrink (grouped) kernel launch");
    const dim3 grid(tiles, (unsigned)col_blocks);
    expand_groups_kernel<T><<<grid, MOS_SERVE_GROUP_THREADS, 0, stream>>>(g, w->tables,
                                                                          w->max_groups);
    CUDA_TRY(cudaGetLastError(), "batched expand (grouped) kernel launch");
    return MOS_OK;
}

template <typename T>
mos_status run(const mos_batched_params *p, const mos_batched_workspace *w) {
    serve_args<T> g;
    g.x = (const T *)p->x;
    g.x_stride = p->x_stride;
    g.y = (T *)p->y;
    g.y_stride = p->y_stride;
    g.pool_a = (const T *)p->pool_a;
    g.pool_b = (const T *)p->pool_b;
    g.n_shards_a = p->n_shards_a;
    g.n_shards_b = p->n_shards_b;
    g.index_a = p->index_a;
    g.index_b = p->index_b;
    g.width = p->max_rank * p->shards_per_vector;
    g.ranks = p->ranks;
    g.max_rank = p->max_rank;
    g.scales = p->scales;
    g.scales_f64 = p->scales_dtype == MOS_F64;
    g.ids = p->adapter_ids;
    g.n_rows = p->n_rows;
    g.n_adapters = p->n_adapters;
    g.l = p->shards_per_vector;
    g.sla = p->d_in / p->shards_per_vector;
    g.slb = p->d_out / p->shards_per_vector;
    g.d_in = p->d_in;
    g.d_out = p->d_out;
    g.h = (typename serve_args<T>::acc *)w->h;
    const cudaStream_t stream = (cudaStream_t)p->stream;
    return p->grouped ? launch_grouped(g, p, w, stream) : launch_per_row(g, stream);
}

/* ================================================================ dispatch */

mos_status dispatch(const mos_batched_params *p, const mos_batched_workspace *w) {
    switch (p->dtype) {
    case MOS_F32: return run<float>(p, w);
    case MOS_F64: return run<double>(p, w);
    case MOS_F16: return run<__half>(p, w);
    case MOS_BF16: return run<__nv_bfloat16>(p, w);
    }
    return mos_set_error(MOS_ERR_TYPE, "unknown dtype %d", (int)p->dtype);
}

} // namespace

/* Host-side checks first (so a bad call fails the same way with or without a GPU), then the
 * launches on p->device_id, whose previous value is restored whatever happens. */
extern "C" mos_status mos_cuda_batched_forward(const mos_batched_params *p) {
    mos_batched_workspace w = {};
    int prev = 0;
    MOS_CHECK(mos_dtype_size(p->dtype) != 0, MOS_ERR_TYPE, "unknown dtype %d", (int)p->dtype);
    if (p->n_rows == 0 || p->n_adapters == 0) return MOS_OK;
    MOS_CHECK(p->n_rows <= INT_MAX && p->d_in <= INT_MAX && p->d_out <= INT_MAX, MOS_ERR_VALUE,
              "sizes above 2^31 - 1 are not supported (rows %lld, d_in %lld, d_out %lld)",
              (long long)p->n_rows, (long long)p->d_in, (long long)p->d_out);
    MOS_CHECK(!p->grouped || p->segments == NULL || p->n_segments < INT_MAX, MOS_ERR_VALUE,
              "%lld segments exceed 2^31 - 2", (long long)p->n_segments);
    MOS_TRY(mos_batched_workspace_carve(&w, p));
    MOS_TRY(device_enter(p->device_id, &prev));
    const mos_status st = dispatch(p, &w);
    device_leave(prev, p->device_id);
    return st;
}
