/*
 * kernels.cu -- the CUDA back end of MoS: shard gather/scatter kernels plus cuBLAS GEMMs, behind
 * the same entry points as cpu.c (mos_cuda_* in csrc/mos.h). Built into the CUDA back end's own
 * library (mos/_mos_cuda.so), which mos._C opens when the first CUDA tensor arrives (backend.cu,
 * csrc/cuda_loader.c).
 *
 * What it computes (docs/design.md; every matrix row-major with a row stride in elements):
 *   assemble     rows[i, :] = pool[index[i], :]         rows (n_index, shard_len), stride rows_stride
 *   scatter_add  pool[index[i], :] += rows[i, :]        pool (n_shards, shard_len) contiguous
 *   forward      A = P_A[I_A] (r, d_in), B^T = P_B[I_B] (r, d_out) gathered into the workspace;
 *                h = x A^T (N, r);  y += s * h B^T (N, d_out)
 *   backward     g = s * dy B (N, r);  dx += g A;  dP_A[I_A] += g^T x;  dP_B[I_B] += s * h^T dy
 *
 * Variants and their requirements:
 *   gather_kernel<W>     copies rows as W-sized words, W in {16, 8, 4, 2, 1} bytes: the widest W
 *                        dividing both base addresses, the row length in bytes and the row stride
 *                        in bytes (16 bytes = one uint4 load/store per thread). It moves bytes, so
 *                        one kernel serves float32, float64, float16 and bfloat16.
 *   scatter_kernel<T, S, V>  pool (type T) += rows (type S), V elements per thread: V = 16 bytes
 *                        over the wider of T and S when shard_len and rows_stride are multiples of V
 *                        and both bases are aligned to V elements, else V = 1 (scalar fallback).
 *                        16-bit values are added in float32 and rounded once. Indices must be
 *                        distinct within a call (the contract), so each pool element has exactly one
 *                        writer: deterministic, no atomics.
 *   Both kernels skip an index outside [0, n_shards): a device-resident index table cannot be
 *   validated without a host sync, so an out-of-range row gathers zeros and scatters nowhere instead
 *   of touching memory outside the pool. The binding should validate index tables once, when they
 *   are created or uploaded.
 *
 * Precision: GEMMs run through cublasGemmEx with CUBLAS_COMPUTE_32F for float32/float16/bfloat16
 * (no TF32, and split-K reductions kept in float32) and CUBLAS_COMPUTE_64F for float64. The
 * assembled A, B^T and the intermediates h and g are kept in the call's dtype, because cublasGemmEx
 * needs both operands of a GEMM in one type and h, g are operands of the next GEMM (the same
 * roundings a framework's two-matmul LoRA makes). The gradients dA and dB^T are written in float32
 * (float64 for double) into the workspace's 4-byte slots and rounded to the pool dtype once, by the
 * scatter-add.
 *
 * Streams, devices, memory: everything runs on (cudaStream_t)p->stream on device p->device_id (made
 * current for the call and restored after). One cuBLAS handle per (host thread, device), taken from
 * a per-device pool on first use and given back at thread exit, never destroyed (handles.cu), and
 * rebound on every call to the stream and then (cublasSetStream resets it) to the cuBLAS slice of
 * the call's workspace (cublasSetWorkspace). The linear ops need a caller-allocated
 * device workspace of mos_linear_workspace_bytes() bytes, MOS_WORKSPACE_ALIGN-aligned (carved by
 * csrc/workspace.c); nothing is allocated and nothing waits on the host per call.
 * CUDA graphs: the first call of a thread on a device may run cublasCreate (when the pool has no
 * free handle), which allocates and so cannot be captured. A thread makes one uncaptured linear
 * call per device before it captures; after that every call is capturable.
 *
 * Build: setup.py compiles every .cu file of cuda/ with nvcc (-Werror all-warnings, symbols hidden) and
 * links them with csrc/errors.c and csrc/workspace.c into mos/_mos_cuda.so against -lcudart
 * -lcublas; backend.cu's table is the library's one exported symbol.
 *
 * Sections: kernels, launchers (kernels, cuBLAS handle and GEMM), dispatch (the mos_cuda_* entries).
 */
#include <limits.h>
#include <stdint.h>

#include "common.cuh"

#define MOS_CUDA_THREADS 256
#define MOS_CUDA_MAX_BLOCKS 65535   /* grid-stride loops cover the rest */

/* ================================================================ kernels */

/* rows[i, c] = pool[index[i], c] in words W; rows_stride and row_words count words. One thread per
 * word over the flattened (n_index, row_words) grid, so short shards still fill whole warps. */
template <typename W>
__global__ void __launch_bounds__(MOS_CUDA_THREADS)
    gather_kernel(W *__restrict__ rows, int64_t rows_stride, const W *__restrict__ pool,
                  const int32_t *__restrict__ index, int64_t n_index, int64_t n_shards,
                  int64_t row_words) {
    const int64_t total = n_index * row_words;
    const int64_t step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
        const int64_t i = t / row_words, c = t - i * row_words;
        const int64_t src = index[i];
        W word{}; /* an out-of-range index gathers zeros rather than reading outside the pool */
        if (src >= 0 && src < n_shards) word = pool[src * row_words + c];
        rows[i * rows_stride + c] = word;
    }
}

/* pool[index[i], c..c+V) += rows[i, c..c+V); shard_len and rows_stride count elements. */
template <typename T, typename S, int V>
__global__ void __launch_bounds__(MOS_CUDA_THREADS)
    scatter_kernel(T *__restrict__ pool, const S *__restrict__ rows, int64_t rows_stride,
                   const int32_t *__restrict__ index, int64_t n_index, int64_t n_shards,
                   int64_t shard_len) {
    typedef typename acc_of<T>::type acc;
    const int64_t row_packs = shard_len / V, total = n_index * row_packs;
    const int64_t step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
        const int64_t i = t / row_packs, c = (t - i * row_packs) * V;
        const int64_t dst = index[i];
        if (dst < 0 || dst >= n_shards) continue; /* never write outside the pool */
        pack<T, V> *out = reinterpret_cast<pack<T, V> *>(pool + dst * shard_len + c);
        const pack<S, V> in = *reinterpret_cast<const pack<S, V> *>(rows + i * rows_stride + c);
        pack<T, V> sum = *out;
#pragma unroll
        for (int k = 0; k < V; ++k) from_acc((acc)(to_acc(sum.v[k]) + to_acc(in.v[k])), &sum.v[k]);
        *out = sum;
    }
}

/* ================================================================ launchers */

static unsigned grid_for(int64_t total) {
    const int64_t blocks = (total + MOS_CUDA_THREADS - 1) / MOS_CUDA_THREADS;
    return (unsigned)(blocks < MOS_CUDA_MAX_BLOCKS ? blocks : MOS_CUDA_MAX_BLOCKS);
}

template <typename W>
static void launch_gather(void *rows, int64_t stride_bytes, const void *pool, int64_t row_bytes,
                          const int32_t *index, int64_t n_index, int64_t n_shards,
                          cudaStream_t stream) {
    const int64_t word = (int64_t)sizeof(W), row_words = row_bytes / word;
    gather_kernel<W><<<grid_for(n_index * row_words), MOS_CUDA_THREADS, 0, stream>>>(
        (W *)rows, stride_bytes / word, (const W *)pool, index, n_index, n_shards, row_words);
}

/* rows (n_index, shard_len; stride rows_stride) = pool[index], elements of `elem` bytes. */
static mos_status gather_rows(void *rows, int64_t rows_stride, const void *pool,
                              const int32_t *index, int64_t n_index, int64_t n_shards,
                              int64_t shard_len, size_t elem, cudaStream_t stream) {
    if (n_index <= 0 || shard_len <= 0) return MOS_OK;
    if (n_index == 1) rows_stride = shard_len; /* a single row's stride is never used */
    const int64_t row_bytes = shard_len * (int64_t)elem, stride_bytes = rows_stride * (int64_t)elem;
    /* The widest word dividing every address the kernel forms: both bases, pool rows
     * (row_bytes apart) and output rows (stride_bytes apart). */
    const uintptr_t bits = (uintptr_t)rows | (uintptr_t)pool | (uintptr_t)row_bytes |
                           (uintptr_t)stride_bytes;
    if (bits % 16 == 0)
        launch_gather<uint4>(rows, stride_bytes, pool, row_bytes, index, n_index, n_shards, stream);
    else if (bits % 8 == 0)
        launch_gather<uint2>(rows, stride_bytes, pool, row_bytes, index, n_index, n_shards, stream);
    else if (bits % 4 == 0)
        launch_gather<uint32_t>(rows, stride_bytes, pool, row_bytes, index, n_index, n_shards,
                                stream);
    else if (bits % 2 == 0)
        launch_gather<uint16_t>(rows, stride_bytes, pool, row_bytes, index, n_index, n_shards,
                                stream);
    else
        launch_gather<uint8_t>(rows, stride_bytes, pool, row_bytes, index, n_index, n_shards,
                               stream);
    CUDA_TRY(cudaGetLastError(), "assemble (gather) kernel launch");
    return MOS_OK;
}

template <typename T, typename S>
static mos_status launch_scatter(void *pool, const void *rows, int64_t rows_stride,
                                 const int32_t *index, int64_t n_index, int64_t n_shards,
                                 int64_t shard_len, cudaStream_t stream) {
    constexpr int V = (int)(16 / (sizeof(T) > sizeof(S) ? sizeof(T) : sizeof(S)));
    if (n_index == 1) rows_stride = shard_len; /* a single row's stride is never used */
    /* Every pool row starts V elements apart from an aligned base iff shard_len % V == 0; the same
     * holds for input rows with rows_stride. */
    const bool vec = shard_len % V == 0 && rows_stride % V == 0 &&
                     (uintptr_t)pool % (V * sizeof(T)) == 0 &&
                     (uintptr_t)rows % (V * sizeof(S)) == 0;
    if (vec)
        scatter_kernel<T, S, V><<<grid_for(n_index * (shard_len / V)), MOS_CUDA_THREADS, 0, stream>>>(
            (T *)pool, (const S *)rows, rows_stride, index, n_index, n_shards, shard_len);
    else
        scatter_kernel<T, S, 1><<<grid_for(n_index * shard_len), MOS_CUDA_THREADS, 0, stream>>>(
            (T *)pool, (const S *)rows, rows_stride, index, n_index, n_shards, shard_len);
    CUDA_TRY(cudaGetLastError(), "scatter-add kernel launch");
    return MOS_OK;
}

/* pool (dtype, (n_shards, shard_len)) [index] += rows; rows are of the dtype, or of the scratch
 * type (float32; float64 for float64) when `scratch_rows` is set. */
static mos_status scatter_rows(mos_dtype dtype, int scratch_rows, void *pool, const void *rows,
                               int64_t rows_stride, const int32_t *index, int64_t n_index,
                               int64_t n_shards, int64_t shard_len, cudaStream_t stream) {
    if (n_index <= 0 || shard_len <= 0) return MOS_OK;
#define SCATTER(T, S) launch_scatter<T, S>(pool, rows, rows_stride, index, n_index, n_shards, \
                                           shard_len, stream)
    switch (dtype) {
    case MOS_F32: return SCATTER(float, float);
    case MOS_F64: return SCATTER(double, double);
    case MOS_F16: return scratch_rows ? SCATTER(__half, float) : SCATTER(__half, __half);
    case MOS_BF16:
        return scratch_rows ? SCATTER(__nv_bfloat16, float) : SCATTER(__nv_bfloat16, __nv_bfloat16);
    }
#undef SCATTER
    return mos_set_error(MOS_ERR_TYPE, "unknown dtype %d", (int)dtype);
}

/* The handle of (this thread, current device `device`), from the process-wide pool (handles.cu),
 * bound to `stream` and to the call's own workspace slice. cublasSetStream resets the handle to
 * cuBLAS's default workspace pool, so the slice is set after it, on every call: one handle then
 * serves any stream, and no GEMM allocates (which would break a CUDA graph capture). */
static mos_status blas_handle(int device, cudaStream_t stream, void *workspace, size_t bytes,
                              cublasHandle_t *out) {
    cublasHandle_t handle = NULL;
    MOS_TRY(mos_cuda_thread_handle(device, &handle));
    CUBLAS_TRY(cublasSetStream(handle, stream), "cublasSetStream");
    CUBLAS_TRY(cublasSetWorkspace(handle, workspace, bytes), "cublasSetWorkspace");
    *out = handle;
    return MOS_OK;
}

static cudaDataType_t cuda_type(mos_dtype dtype) {
    switch (dtype) {
    case MOS_F32: return CUDA_R_32F;
    case MOS_F64: return CUDA_R_64F;
    case MOS_F16: return CUDA_R_16F;
    case MOS_BF16: return CUDA_R_16BF;
    }
    return CUDA_R_32F; /* unreachable: dtypes are checked at the entry points */
}

/* What every GEMM of one call shares. */
typedef struct {
    cublasHandle_t handle;
    cudaDataType_t type;         /* A and B operands (and C unless told): the call's dtype */
    cudaDataType_t scratch;      /* dA, dB^T: float32, or float64 for float64 */
    cublasComputeType_t compute; /* CUBLAS_COMPUTE_32F, or _64F for float64 */
} gemm_ctx;

static mos_status gemm_open(gemm_ctx *g, const mos_linear_params *p, const mos_workspace_layout *w) {
    MOS_CHECK(w->blas != NULL && w->blas_bytes > 0, MOS_ERR_VALUE,
              "the CUDA workspace has no cuBLAS slice (size it for a CUDA call)");
    MOS_TRY(blas_handle(p->device_id, (cudaStream_t)p->stream, w->blas, w->blas_bytes, &g->handle));
    g->type = cuda_type(p->dtype);
    g->scratch = p->dtype == MOS_F64 ? CUDA_R_64F : CUDA_R_32F;
    g->compute = p->dtype == MOS_F64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
    return MOS_OK;
}

/* Column-major C (m, n; ldc, type ctype) = alpha op(A) op(B) + beta C; A, B of type g->type.
 * alpha/beta are host scalars of the compute type (float for 32F, double for 64F). */
static mos_status gemm(const gemm_ctx *g, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                       int k, double alpha, const void *A, int lda, const void *B, int ldb,
                       double beta, void *C, cudaDataType_t ctype, int ldc, const char *what) {
    const float alpha_f = (float)alpha, beta_f = (float)beta;
    const int f64 = g->compute == CUBLAS_COMPUTE_64F;
    CUBLAS_TRY(cublasGemmEx(g->handle, ta, tb, m, n, k, f64 ? (const void *)&alpha : &alpha_f, A,
                            g->type, lda, B, g->type, ldb, f64 ? (const void *)&beta : &beta_f, C,
                            ctype, ldc, g->compute, CUBLAS_GEMM_DEFAULT),
               what);
    return MOS_OK;
}

/* ================================================================ dispatch */

static mos_status to_int(int64_t v, const char *name, int *out) {
    MOS_CHECK(v >= 0 && v <= INT_MAX, MOS_ERR_VALUE, "%s = %lld does not fit cuBLAS's 32-bit int",
              name, (long long)v);
    *out = (int)v;
    return MOS_OK;
}

/* The cuBLAS leading dimension of a row-major (rows, cols) matrix with row stride `stride`: the
 * stride itself, which must be >= cols so rows do not overlap (a single row may have any stride). */
static mos_status leading_dim(int64_t stride, int64_t cols, int64_t rows, const char *name,
                              int *ld) {
    /* A single row's stride is never read, so replace it outright: keeping a large one (only
     * values below cols were replaced before) failed to_int below past INT_MAX for no reason. */
    if (rows <= 1) stride = cols;
    MOS_CHECK(stride >= cols, MOS_ERR_BUFFER,
              "%s has row stride %lld below its %lld columns; the CUDA path needs rows that do "
              "not overlap", name, (long long)stride, (long long)cols);
    return to_int(stride, name, ld);
}

static mos_status check_dtype(mos_dtype dtype) {
    MOS_CHECK(mos_dtype_size(dtype) != 0, MOS_ERR_TYPE, "unknown dtype %d", (int)dtype);
    return MOS_OK;
}

/* The caller's workspace, carved; the CUDA path never allocates one itself. */
static mos_status open_workspace(mos_workspace_layout *w, const mos_linear_params *p,
                                 mos_linear_op op) {
    const size_t need = mos_linear_workspace_bytes(p, op);
    MOS_CHECK(p->workspace != NULL, MOS_ERR_VALUE,
              "the CUDA path needs a caller-allocated device workspace of %zu bytes "
              "(mos_linear_workspace_bytes); got NULL", need);
    MOS_CHECK(p->workspace_bytes >= need, MOS_ERR_VALUE,
              "workspace holds %zu bytes, the op needs %zu", p->workspace_bytes, need);
    return mos_workspace_carve(w, p, op, p->workspace, p->workspace_bytes);
}

/* Everything a linear op checks on the host before it touches the device: the sizes it hands to
 * cuBLAS, the leading dimensions and the carved workspace. */
typedef struct {
    int n, d_in, d_out, r;
    int64_t l, rl, sla, slb; /* shards per vector, r * l, shard lengths of A and B */
    int ldx, ldy, lddy, lddx;
    mos_workspace_layout w;
} linear_plan;

static mos_status plan_common(linear_plan *q, const mos_linear_params *p, mos_linear_op op) {
    MOS_TRY(check_dtype(p->dtype));
    MOS_TRY(to_int(p->n_rows, "n_rows", &q->n));
    MOS_TRY(to_int(p->d_in, "d_in", &q->d_in));
    MOS_TRY(to_int(p->d_out, "d_out", &q->d_out));
    MOS_TRY(to_int(p->rank, "rank", &q->r));
    q->l = p->shards_per_vector;
    MOS_CHECK(q->l > 0 && p->d_in % q->l == 0 && p->d_out % q->l == 0, MOS_ERR_VALUE,
              "shards_per_vector %lld must be positive and divide d_in and d_out", (long long)q->l);
    q->rl = p->rank * q->l;
    q->sla = p->d_in / q->l;
    q->slb = p->d_out / q->l;
    return open_workspace(&q->w, p, op);
}

/* A (r, d_in) = P_A[I_A] viewed as (r*l, d_in/l) rows; likewise B^T (r, d_out) from P_B[I_B]. */
static mos_status assemble_a(const linear_plan *q, const mos_linear_params *p) {
    return gather_rows(q->w.a, q->sla, p->pool_a, p->index_a, q->rl, p->n_shards_a, q->sla,
                       mos_dtype_size(p->dtype), (cudaStream_t)p->stream);
}

static mos_status assemble_bt(const linear_plan *q, const mos_linear_params *p) {
    return gather_rows(q->w.bt, q->slb, p->pool_b, p->index_b, q->rl, p->n_shards_b, q->slb,
                       mos_dtype_size(p->dtype), (cudaStream_t)p->stream);
}

/*
 * GEMM derivations. cuBLAS is column-major; a row-major (R, C) matrix with row stride ld is the
 * column-major (C, R) matrix, its transpose, with leading dimension ld. So a row-major product
 * C = A B is computed as the column-major C^T = B^T A^T: pass the operands swapped, and an
 * operand stored the way it is wanted (as its transpose) needs OP_N, else OP_T.
 */

/* h (N, r) = x A^T. Column-major: h^T (r x N) = A (r x d_in) . x^T (d_in x N).
 * A's buffer (row-major r x d_in, ld d_in) is column-major A^T (d_in x r): OP_T, lda = d_in.
 * x's buffer is column-major x^T (d_in x N): OP_N, ldb = ldx. h^T (r x N): ldc = r. */
static mos_status gemm_h(const gemm_ctx *g, const linear_plan *q, void *h, const void *x) {
    return gemm(g, CUBLAS_OP_T, CUBLAS_OP_N, q->r, q->n, q->d_in, 1.0, q->w.a, q->d_in, x, q->ldx,
                0.0, h, g->type, q->r, "cublasGemmEx h = x A^T");
}

static mos_status plan_forward(linear_plan *q, const mos_linear_params *p) {
    MOS_TRY(plan_common(q, p, MOS_OP_FORWARD));
    MOS_TRY(leading_dim(p->x_stride, p->d_in, p->n_rows, "x", &q->ldx));
    return leading_dim(p->y_stride, p->d_out, p->n_rows, "y", &q->ldy);
}

static mos_status run_forward(const linear_plan *q, const mos_linear_params *p) {
    gemm_ctx g = {};
    MOS_TRY(gemm_open(&g, p, &q->w));
    MOS_TRY(assemble_a(q, p));
    MOS_TRY(assemble_bt(q, p));
    void *h = p->h ? p->h : q->w.h; /* caller's (N, r) buffer, or scratch; the dtype either way */
    MOS_TRY(gemm_h(&g, q, h, p->x));
    /* y (N, d_out) += s h B^T. Column-major: y^T (d_out x N) += s B (d_out x r) . h^T (r x N).
     * B^T's buffer (row-major r x d_out) is column-major B (d_out x r): OP_N, lda = d_out.
     * h's buffer is column-major h^T (r x N): OP_N, ldb = r. y^T: ldc = ldy, beta = 1. */
    return gemm(&g, CUBLAS_OP_N, CUBLAS_OP_N, q->d_out, q->n, q->r, p->scale, q->w.bt, q->d_out, h,
                q->r, 1.0, p->y, g.type, q->ldy, "cublasGemmEx y += s h B^T");
}

/* Which pieces a backward call needs, from the gradients it asks for. */
static int bw_need_g(const mos_linear_params *p) { return p->dx != NULL || p->dpool_a != NULL; }
static int bw_recompute_h(const mos_linear_params *p) { return p->dpool_b != NULL && p->h == NULL; }

static mos_status plan_backward(linear_plan *q, const mos_linear_params *p) {
    MOS_TRY(plan_common(q, p, MOS_OP_BACKWARD));
    MOS_TRY(leading_dim(p->dy_stride, p->d_out, p->n_rows, "dy", &q->lddy));
    if (p->dpool_a != NULL || bw_recompute_h(p))
        MOS_TRY(leading_dim(p->x_stride, p->d_in, p->n_rows, "x", &q->ldx));
    if (p->dx != NULL) MOS_TRY(leading_dim(p->dx_stride, p->d_in, p->n_rows, "dx", &q->lddx));
    return MOS_OK;
}

/* Every step that can fail on valid arguments runs before the first write to a caller's tensor:
 * g, dA, h and dB^T are computed into the workspace first (each GEMM type combination of the
 * writes has then already run), and only then is dx accumulated and dA, dB^T scattered into the
 * pool gradients. Those last three launches fail only when the device itself has failed (a
 * sticky CUDA error), the one case of a partial write that mos.h documents.
 * tests/test_cuda_write_order.py checks this order in the source. */
static mos_status run_backward(const linear_plan *q, const mos_linear_params *p) {
    gemm_ctx g = {};
    const cudaStream_t stream = (cudaStream_t)p->stream;
    MOS_TRY(gemm_open(&g, p, &q->w));
    if (p->dx != NULL || bw_recompute_h(p)) MOS_TRY(assemble_a(q, p));
    if (bw_need_g(p)) {
        MOS_TRY(assemble_bt(q, p));
        /* g (N, r) = s dy B = s dy (B^T)^T. Column-major: g^T (r x N) = s B^T (r x d_out) . dy^T.
         * B^T's buffer is column-major B (d_out x r): OP_T, lda = d_out.
         * dy's buffer is column-major dy^T (d_out x N): OP_N, ldb = lddy. g^T: ldc = r. */
        MOS_TRY(gemm(&g, CUBLAS_OP_T, CUBLAS_OP_N, q->r, q->n, q->d_out, p->scale, q->w.bt,
                     q->d_out, p->dy, q->lddy, 0.0, q->w.g, g.type, q->r,
                     "cublasGemmEx g = s dy B"));
    }
    if (p->dpool_a) {
        /* dA (r, d_in) = g^T x. Column-major: dA^T (d_in x r) = x^T (d_in x N) . g (N x r).
         * x's buffer is column-major x^T (d_in x N): OP_N, lda = ldx.
         * g's buffer is column-major g^T (r x N): OP_T gives g, ldb = r. dA^T: ldc = d_in,
         * written in the scratch type (float32 for 16-bit inputs). */
        MOS_TRY(gemm(&g, CUBLAS_OP_N, CUBLAS_OP_T, q->d_in, q->r, q->n, 1.0, p->x, q->ldx, q->w.g,
                     q->r, 0.0, q->w.da, g.scratch, q->d_in, "cublasGemmEx dA = g^T x"));
    }
    if (p->dpool_b) {
        void *h = p->h ? p->h : q->w.h;
        if (bw_recompute_h(p)) MOS_TRY(gemm_h(&g, q, h, p->x));
        /* dB^T (r, d_out) = s h^T dy. Column-major: dB (d_out x r) = s dy^T (d_out x N) . h (N x r).
         * dy's buffer is column-major dy^T (d_out x N): OP_N, lda = lddy.
         * h's buffer is column-major h^T (r x N): OP_T gives h, ldb = r. dB: ldc = d_out,
         * written in the scratch type. */
        MOS_TRY(gemm(&g, CUBLAS_OP_N, CUBLAS_OP_T, q->d_out, q->r, q->n, p->scale, p->dy, q->lddy,
                     h, q->r, 0.0, q->w.dbt, g.scratch, q->d_out, "cublasGemmEx dB^T = s h^T dy"));
    }
    /* The writes, last. */
    if (p->dx) {
        /* dx (N, d_in) += g A. Column-major: dx^T (d_in x N) += A^T (d_in x r) . g^T (r x N).
         * A's buffer is column-major A^T (d_in x r): OP_N, lda = d_in.
         * g's buffer is column-major g^T (r x N): OP_N, ldb = r. dx^T: ldc = lddx, beta = 1. */
        MOS_TRY(gemm(&g, CUBLAS_OP_N, CUBLAS_OP_N, q->d_in, q->n, q->r, 1.0, q->w.a, q->d_in,
                     q->w.g, q->r, 1.0, p->dx, g.type, q->lddx, "cublasGemmEx dx += g A"));
    }
    /* dA and dB^T viewed as (r*l, d/l) shard rows, added into rows I_A of dP_A and I_B of dP_B. */
    if (p->dpool_a)
        MOS_TRY(scatter_rows(p->dtype, 1, p->dpool_a, q->w.da, q->sla, p->index_a, q->rl,
                             p->n_shards_a, q->sla, stream));
    if (p->dpool_b)
        MOS_TRY(scatter_rows(p->dtype, 1, p->dpool_b, q->w.dbt, q->slb, p->index_b, q->rl,
                             p->n_shards_b, q->slb, stream));
    return MOS_OK;
}

/* Entry points: host-side checks first (so a bad call fails the same way with or without a GPU),
 * then the work on p->device_id, whose previous value is restored whatever happens. */

extern "C" mos_status mos_cuda_assemble(const mos_gather_params *p) {
    int prev = 0;
    MOS_TRY(check_dtype(p->dtype));
    if (p->n_index <= 0 || p->shard_len <= 0) return MOS_OK;
    MOS_TRY(device_enter(p->device_id, &prev));
    const mos_status st = gather_rows(p->rows, p->rows_stride, p->pool, p->index, p->n_index,
                                      p->n_shards, p->shard_len, mos_dtype_size(p->dtype),
                                      (cudaStream_t)p->stream);
    device_leave(prev, p->device_id);
    return st;
}

extern "C" mos_status mos_cuda_scatter_add(const mos_gather_params *p) {
    int prev = 0;
    MOS_TRY(check_dtype(p->dtype));
    if (p->n_index <= 0 || p->shard_len <= 0) return MOS_OK;
    MOS_TRY(device_enter(p->device_id, &prev));
    const mos_status st = scatter_rows(p->dtype, 0, p->pool, p->rows, p->rows_stride, p->index,
                                       p->n_index, p->n_shards, p->shard_len,
                                       (cudaStream_t)p->stream);
    device_leave(prev, p->device_id);
    return st;
}

extern "C" mos_status mos_cuda_linear_forward(const mos_linear_params *p) {
    linear_plan q = {};
    int prev = 0;
    if (p->n_rows == 0) return MOS_OK;
    MOS_TRY(plan_forward(&q, p));
    MOS_TRY(device_enter(p->device_id, &prev));
    const mos_status st = run_forward(&q, p);
    device_leave(prev, p->device_id);
    return st;
}

extern "C" mos_status mos_cuda_linear_backward(const mos_linear_params *p) {
    linear_plan q = {};
    int prev = 0;
    if (p->n_rows == 0) return MOS_OK;
    if (!bw_need_g(p) && p->dpool_b == NULL) return MOS_OK; /* no gradient asked for */
    MOS_TRY(plan_backward(&q, p));
    MOS_TRY(device_enter(p->device_id, &prev));
    const mos_status st = run_backward(&q, p);
    device_leave(prev, p->device_id);
    return st;
}

