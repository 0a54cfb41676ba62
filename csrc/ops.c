/*
 * ops.c -- the device-independent entry points: workspace sizing and carving, then dispatch to
 * the CPU or CUDA back end. Arguments were validated by the caller (the binding); the checks here
 * only guard the core's own invariants.
 */
#include "check.h"

#define WORKSPACE_ALIGN 256

static size_t align_up(size_t n) { return (n + WORKSPACE_ALIGN - 1) / WORKSPACE_ALIGN * WORKSPACE_ALIGN; }

static size_t scratch_elem(mos_dtype dtype) {
    size_t size = mos_dtype_size(dtype);
    return size < 4 ? 4 : size;
}

/* Segment sizes in bytes, in carve order: a, bt, h, g, da, dbt, then cuBLAS's slice (CUDA). */
static void segment_bytes(size_t out[MOS_WORKSPACE_SEGMENTS], const mos_linear_params *p,
                          mos_linear_op op) {
    const size_t e = scratch_elem(p->dtype);
    const size_t r = (size_t)p->rank, n = (size_t)p->n_rows;
    out[0] = align_up(r * (size_t)p->d_in * e);
    out[1] = align_up(r * (size_t)p->d_out * e);
    out[2] = p->h ? 0 : align_up(n * r * e);
    out[3] = op == MOS_OP_BACKWARD ? align_up(n * r * e) : 0;
    out[4] = op == MOS_OP_BACKWARD ? out[0] : 0;
    out[5] = op == MOS_OP_BACKWARD ? out[1] : 0;
    out[6] = p->device == MOS_DEVICE_CUDA ? MOS_CUBLAS_WORKSPACE_BYTES : 0;
}

size_t mos_linear_workspace_bytes(const mos_linear_params *p, mos_linear_op op) {
    size_t seg[MOS_WORKSPACE_SEGMENTS], total = 0;
    segment_bytes(seg, p, op);
    for (int i = 0; i < MOS_WORKSPACE_SEGMENTS; ++i) total += seg[i];
    return total;
}

mos_status mos_workspace_carve(mos_workspace_layout *w, const mos_linear_params *p,
                               mos_linear_op op, void *base, size_t bytes) {
    size_t seg[MOS_WORKSPACE_SEGMENTS], offset = 0;
    void **slots[MOS_WORKSPACE_SEGMENTS] = {&w->a, &w->bt, &w->h, &w->g, &w->da, &w->dbt, &w->blas};
    MOS_CHECK(((uintptr_t)base % WORKSPACE_ALIGN) == 0, MOS_ERR_VALUE,
              "workspace must be %d-byte aligned", WORKSPACE_ALIGN);
    segment_bytes(seg, p, op);
    for (int i = 0; i < MOS_WORKSPACE_SEGMENTS; ++i) {
        *slots[i] = seg[i] ? (char *)base + offset : NULL;
        offset += seg[i];
    }
    w->blas_bytes = seg[MOS_WORKSPACE_SEGMENTS - 1];
    MOS_CHECK(offset <= bytes, MOS_ERR_VALUE, "workspace holds %zu bytes, the op needs %zu", bytes,
              offset);
    return MOS_OK;
}

#ifndef MOS_WITH_CUDA
/* CPU-only builds: the CUDA entry points exist and say why they cannot run. */
#define NO_CUDA(name, type)                                                                   \
    mos_status name(const type *p) {                                                          \
        (void)p;                                                                              \
        return mos_set_error(MOS_ERR_RUNTIME, "mos was built without CUDA (MOS_CUDA=0 or no nvcc)"); \
    }
NO_CUDA(mos_cuda_assemble, mos_gather_params)
NO_CUDA(mos_cuda_scatter_add, mos_gather_params)
NO_CUDA(mos_cuda_linear_forward, mos_linear_params)
NO_CUDA(mos_cuda_linear_backward, mos_linear_params)
NO_CUDA(mos_cuda_batched_forward, mos_batched_params)
int mos_cuda_built(void) { return 0; }
#endif

static mos_status check_linear(const mos_linear_params *p) {
    MOS_CHECK(p->n_rows >= 0 && p->d_in > 0 && p->d_out > 0 && p->rank > 0 &&
                  p->shards_per_vector > 0,
              MOS_ERR_VALUE, "sizes must be positive (N may be 0)");
    MOS_CHECK(p->d_in % p->shards_per_vector == 0 && p->d_out % p->shards_per_vector == 0,
              MOS_ERR_VALUE, "shards_per_vector must divide d_in and d_out");
    MOS_CHECK(mos_dtype_size(p->dtype) != 0, MOS_ERR_TYPE, "unknown dtype %d", (int)p->dtype);
    return MOS_OK;
}

mos_status mos_assemble(const mos_gather_params *p) {
    MOS_CHECK(mos_dtype_size(p->dtype) != 0, MOS_ERR_TYPE, "unknown dtype %d", (int)p->dtype);
    return p->device == MOS_DEVICE_CUDA ? mos_cuda_assemble(p) : mos_cpu_assemble(p);
}

mos_status mos_scatter_add(const mos_gather_params *p) {
    MOS_CHECK(mos_dtype_size(p->dtype) != 0, MOS_ERR_TYPE, "unknown dtype %d", (int)p->dtype);
    return p->device == MOS_DEVICE_CUDA ? mos_cuda_scatter_add(p) : mos_cpu_scatter_add(p);
}

mos_status mos_linear_forward(const mos_linear_params *p) {
    MOS_TRY(check_linear(p));
    return p->device == MOS_DEVICE_CUDA ? mos_cuda_linear_forward(p) : mos_cpu_linear_forward(p);
}

mos_status mos_linear_forward_full(const mos_linear_params *p) {
    MOS_TRY(check_linear(p));
    MOS_CHECK(p->device == MOS_DEVICE_CPU, MOS_ERR_RUNTIME,
              "forward_full runs on the CPU; frameworks compute the base layer themselves on GPU");
    return mos_cpu_linear_forward_full(p);
}

mos_status mos_linear_backward(const mos_linear_params *p) {
    MOS_TRY(check_linear(p));
    return p->device == MOS_DEVICE_CUDA ? mos_cuda_linear_backward(p) : mos_cpu_linear_backward(p);
}

