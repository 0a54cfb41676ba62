/*
 * cpu.c -- MoS on the CPU: gather/scatter loops plus OpenBLAS GEMMs (scipy-openblas32's
 * prefixed symbols, so it coexists with whatever BLAS NumPy or PyTorch loaded), large calls cut
 * into row chunks that run on the process's OpenMP team (cpu_team.c).
 * float32 and float64; 16-bit types are refused with a TypeError-class status.
 */
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "check.h"
#include "cpu_team.h"

/* Rows at or below which the direct (no-assembly) strategy wins; see cpu_kernels.inc. */
#define MOS_DIRECT_MAX_ROWS 4
/* Largest rank the direct strategy keeps on the stack. */
#define MOS_DIRECT_MAX_RANK 512
/* Ranks up to which the pool gradients' product streams rows (gtx_rows) instead of OpenBLAS's
 * packed GEMM: at N = 256, d = 1536 -> 4096, 0.8x its time at r = 8, even at 16, slower beyond. */
#define MOS_STREAM_MAX_RANK 16
/* Fewest rows per chunk when an assembled call is split across threads (cpu_team.c): below it,
 * waking a second thread costs more than the chunk's work. */
#define MOS_TEAM_MIN_ROWS 32

/* Loops GCC vectorises get an AVX-512 and an AVX2 build beside the baseline one, picked at load
 * time by the CPU (an ifunc): the module's own flags stay portable. */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define MOS_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MOS_VECTOR_CLONES
#endif

#define REAL float
#define SUFFIX f32
#define GEMM scipy_cblas_sgemm
#include "cpu_kernels.inc"
#undef REAL
#undef SUFFIX
#undef GEMM

#define REAL double
#define SUFFIX f64
#define GEMM scipy_cblas_dgemm
#include "cpu_kernels.inc"
#undef REAL
#undef SUFFIX
#undef GEMM

static mos_status check_cpu_dtype(mos_dtype dtype) {
    MOS_CHECK(dtype == MOS_F32 || dtype == MOS_F64, MOS_ERR_TYPE,
              "the CPU path supports float32 and float64, got %s", mos_dtype_name(dtype));
    return MOS_OK;
}

mos_status mos_cpu_assemble(const mos_gather_params *p) {
    MOS_TRY(check_cpu_dtype(p->dtype));
    if (p->dtype == MOS_F32)
        gather_f32(p->rows, p->rows_stride, p->pool, p->index, p->n_index, p->shard_len);
    else
        gather_f64(p->rows, p->rows_stride, p->pool, p->index, p->n_index, p->shard_len);
    return MOS_OK;
}

mos_status mos_cpu_scatter_add(const mos_gather_params *p) {
    MOS_TRY(check_cpu_dtype(p->dtype));
    if (p->dtype == MOS_F32)
        scatter_f32(p->pool, p->rows, p->rows_stride, p->index, p->n_index, p->shard_len);
    else
        scatter_f64(p->pool, p->rows, p->rows_stride, p->index, p->n_index, p->shard_len);
    return MOS_OK;
}

static int use_direct(const mos_linear_params *p) {
    return p->n_rows <= MOS_DIRECT_MAX_ROWS && p->rank <= MOS_DIRECT_MAX_RANK;
}

int mos_cpu_linear_chunks(int64_t n_rows) {
    return mos_cpu_team_chunks(n_rows, MOS_TEAM_MIN_ROWS);
}

/* Carves the caller's workspace, or mallocs one (the CPU path may allocate). */
static mos_status workspace_open(mos_workspace_layout *w, void **owned, const mos_linear_params *p,
                                 mos_linear_op op) {
    void *base = p->workspace;
    size_t bytes = p->workspace_bytes;
    *owned = NULL;
    if (base == NULL) {
        bytes = mos_linear_workspace_bytes(p, op);
        base = *owned = aligned_alloc(MOS_WORKSPACE_ALIGN, bytes ? bytes : MOS_WORKSPACE_ALIGN);
        MOS_CHECK(base != NULL, MOS_ERR_NOMEM, "cannot allocate a %zu-byte workspace", bytes);
    }
    mos_status st = mos_workspace_carve(w, p, op, base, bytes);
    if (st != MOS_OK) free(*owned);
    return st;
}

/* One assembled call cut into row chunks (cpu_team.c); the fields are the call's, read-only. */
typedef struct {
    const mos_linear_params *p;
    void *a, *bt, *h, *g; /* assembled A, B^T; h and g rows (N, r) */
    void *da, *dbt;       /* chunk c's share of the pool gradients at da + c * size_a, ... */
    int64_t size_a, size_b;
    int chunks;
} chunked_call;

static int64_t chunk_start(const chunked_call *call, int c) {
    return call->p->n_rows * c / call->chunks;
}

static void forward_chunk(void *ctx, int c) {
    const chunked_call *call = ctx;
    const int64_t n0 = chunk_start(call, c), n1 = chunk_start(call, c + 1);
    if (call->p->dtype == MOS_F32)
        forward_rows_f32(call->p, call->a, call->bt, call->h, n0, n1);
    else
        forward_rows_f64(call->p, call->a, call->bt, call->h, n0, n1);
}

static void backward_chunk(void *ctx, int c) {
    const chunked_call *call = ctx;
    const int64_t n0 = chunk_start(call, c), n1 = chunk_start(call, c + 1);
    if (call->p->dtype == MOS_F32)
        backward_rows_f32(call->p, call->a, call->bt, call->g, call->h,
                          (float *)call->da + c * call->size_a, (float *)call->dbt + c * call->size_b,
                          n0, n1);
    else
        backward_rows_f64(call->p, call->a, call->bt, call->g, call->h,
                          (double *)call->da + c * call->size_a,
                          (double *)call->dbt + c * call->size_b, n0, n1);
}

mos_status mos_cpu_linear_forward(const mos_linear_params *p) {
    MOS_TRY(check_cpu_dtype(p->dtype));
    if (p->n_rows == 0) return MOS_OK;
    if (use_direct(p)) {
        if (p->dtype == MOS_F32) forward_direct_f32(p); else forward_direct_f64(p);
        return MOS_OK;
    }
    mos_workspace_layout w;
    void *owned;
    MOS_TRY(workspace_open(&w, &owned, p, MOS_OP_FORWARD));
    if (p->dtype == MOS_F32) assemble_both_f32(w.a, w.bt, p); else assemble_both_f64(w.a, w.bt, p);
    chunked_call call = {.p = p, .a = w.a, .bt = w.bt, .h = p->h ? p->h : w.h,
                         .chunks = mos_cpu_linear_chunks(p->n_rows)};
    mos_cpu_team_run(forward_chunk, &call, call.chunks);
    free(owned);
    return MOS_OK;
}

mos_status mos_cpu_linear_forward_full(const mos_linear_params *p) {
    MOS_TRY(check_cpu_dtype(p->dtype));
    if (p->n_rows == 0) return MOS_OK;
    if (p->dtype == MOS_F32) base_forward_f32(p); else base_forward_f64(p);
    return mos_cpu_linear_forward(p);
}

mos_status mos_cpu_linear_backward(const mos_linear_params *p) {
    MOS_TRY(check_cpu_dtype(p->dtype));
    if (p->n_rows == 0) return MOS_OK;
    if (use_direct(p)) {
        if (p->dtype == MOS_F32) backward_direct_f32(p); else backward_direct_f64(p);
        return MOS_OK;
    }
    mos_workspace_layout w;
    void *owned;
    MOS_TRY(workspace_open(&w, &owned, p, MOS_OP_BACKWARD));
    if (p->dtype == MOS_F32) assemble_both_f32(w.a, w.bt, p); else assemble_both_f64(w.a, w.bt, p);
    const size_t elem = mos_dtype_size(p->dtype);
    chunked_call call = {.p = p, .a = w.a, .bt = w.bt, .h = p->h ? p->h : w.h, .g = w.g,
                         .da = w.da, .dbt = w.dbt, .size_a = p->rank * p->d_in,
                         .size_b = p->rank * p->d_out, .chunks = mos_cpu_linear_chunks(p->n_rows)};
    /* Split calls give every chunk its own share of the pool gradients, summed afterwards (the
     * scatter is not atomic). Without the memory for them, the call runs whole. */
    void *shares = NULL;
    if (call.chunks > 1) {
        const size_t bytes = (size_t)call.chunks * (size_t)(call.size_a + call.size_b) * elem;
        shares = aligned_alloc(MOS_WORKSPACE_ALIGN, (bytes + MOS_WORKSPACE_ALIGN - 1) /
                                                        MOS_WORKSPACE_ALIGN * MOS_WORKSPACE_ALIGN);
        if (shares != NULL) {
            call.da = shares;
            call.dbt = (char *)shares + (size_t)call.chunks * (size_t)call.size_a * elem;
        } else {
            call.chunks = 1;
        }
    }
    mos_cpu_team_run(backward_chunk, &call, call.chunks);
    if (p->dtype == MOS_F32)
        scatter_pool_grads_f32(p, call.da, call.dbt, call.chunks);
    else
        scatter_pool_grads_f64(p, call.da, call.dbt, call.chunks);
    free(shares);
    free(owned);
    return MOS_OK;
}

int mos_cpu_get_num_threads(void) { return scipy_openblas_get_num_threads(); }

void mos_cpu_set_num_threads(int n) { scipy_openblas_set_num_threads(n); }
