/*
 * ops.c -- the device-independent entry points: the core's own invariants, then dispatch to the
 * CPU or CUDA back end. Arguments were validated by the caller (the binding); the checks here only
 * guard the core's own invariants. Workspace sizing and carving live in workspace.c.
 */
#include "check.h"

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

