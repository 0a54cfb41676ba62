/*
 * cpu.c -- MoS on the CPU: gather/scatter loops plus OpenBLAS GEMMs (scipy-openblas32's
 * prefixed symbols, so it coexists with whatever BLAS NumPy or PyTorch loaded).
 * float32 and float64; 16-bit types are refused with a TypeError-class status.
 */
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "check.h"

/* Rows at or below which the direct (no-assembly) strategy wins; see cpu_kernels.inc. */
#define MOS_DIRECT_MAX_ROWS 4
/* Largest rank the direct strategy keeps on the stack. */
#define MOS_DIRECT_MAX_RANK 512

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
    if (p->dtype == MOS_F32) forward_assembled_f32(p, &w); else forward_assembled_f64(p, &w);
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
    if (p->dtype == MOS_F32) backward_assembled_f32(p, &w); else backward_assembled_f64(p, &w);
    free(owned);
    return MOS_OK;
}

int mos_cpu_get_num_threads(void) { return scipy_openblas_get_num_threads(); }

void mos_cpu_set_num_threads(int n) { scipy_openblas_set_num_threads(n); }
