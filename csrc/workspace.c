/*
 * workspace.c -- the scratch every op carves from one caller-given block: sizes and carving of the
 * linear workspace (a, bt, h, g, da, dbt, cuBLAS's slice) and of the CUDA batched workspace (h and
 * the group tables). Every segment starts on a MOS_WORKSPACE_ALIGN boundary. Pure arithmetic on
 * the params: the binding sizes and checks with it, and both back ends carve with it.
 */
#include "check.h"

static size_t align_up(size_t n) {
    return (n + MOS_WORKSPACE_ALIGN - 1) / MOS_WORKSPACE_ALIGN * MOS_WORKSPACE_ALIGN;
}

static mos_status check_aligned(const void *base) {
    MOS_CHECK(((uintptr_t)base % MOS_WORKSPACE_ALIGN) == 0, MOS_ERR_VALUE,
              "workspace must be %d-byte aligned", MOS_WORKSPACE_ALIGN);
    return MOS_OK;
}

/* ---------------------------------------------------------------- linear ops */

/* Scratch elements are at least 4 bytes, so a back end may keep float32 for 16-bit inputs. */
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
    MOS_TRY(check_aligned(base));
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

/* ---------------------------------------------------------------- batched forward (CUDA) */

/* Groups of the CUDA grouped path: runs of equal ids cut further at segment offsets, so at most
 * one per row whatever the segments hold (cuda/serving.cu). */
static int64_t max_groups(const mos_batched_params *p) { return p->n_rows; }

static size_t h_bytes(const mos_batched_params *p) {
    const size_t acc = p->dtype == MOS_F64 ? 8 : 4;
    return align_up((size_t)p->n_rows * (size_t)p->max_rank * acc);
}

static size_t table_bytes(const mos_batched_params *p) {
    if (!p->grouped) return 0;
    return align_up((2 * ((size_t)max_groups(p) + 1) + 1) * sizeof(int32_t));
}

size_t mos_batched_workspace_bytes(const mos_batched_params *p) {
    return h_bytes(p) + table_bytes(p);
}

mos_status mos_batched_workspace_carve(mos_batched_workspace *w, const mos_batched_params *p) {
    const size_t need = mos_batched_workspace_bytes(p);
    MOS_CHECK(p->workspace != NULL, MOS_ERR_VALUE,
              "the CUDA path needs a caller-allocated device workspace of %zu bytes "
              "(mos_batched_workspace_bytes); got NULL", need);
    MOS_TRY(check_aligned(p->workspace));
    MOS_CHECK(p->workspace_bytes >= need, MOS_ERR_VALUE,
              "workspace holds %zu bytes, the op needs %zu", p->workspace_bytes, need);
    w->h = p->workspace;
    w->tables = p->grouped ? (int32_t *)((char *)p->workspace + h_bytes(p)) : NULL;
    w->max_groups = max_groups(p);
    return MOS_OK;
}
