/*
 * serving.c -- many adapters in one call: the batched forward's entry point (invariants,
 * dispatch) and its CPU back end (float32 / float64); its CUDA workspace is sized in workspace.c.
 *
 * For every row n of x with a = adapter_ids[n] >= 0:  y[n] += scales[a] * (x[n] A_a^T) B_a^T,
 * with A_a, B_a assembled from the concatenated pools through row a of the (K, max_rank * l) index
 * tables (mos.h, "serving"). Rows with id -1 are left untouched.
 *
 * CPU strategies (serving_kernels.inc):
 *   per-row   sharded dot products and axpys straight against the pools, row by row.
 *   grouped   the rows of each group (given segments, else every row of one adapter, found by a
 *             counting sort) share one assembled A_a, B_a^T and two OpenBLAS GEMMs; groups of at
 *             most MOS_SERVE_DIRECT_ROWS rows use the per-row kernel (a gather costs more than it
 *             saves there).
 * The CPU path allocates its own scratch (sized by the largest group); p->workspace is for CUDA.
 */
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "check.h"

/* Groups at or below this many rows skip assembly and take the per-row kernel. */
#define MOS_SERVE_DIRECT_ROWS 4

/* The per-row kernel is built twice on x86-64 with GCC >= 12 or Clang >= 14, for AVX2 + FMA and
 * for the baseline, and the loader picks one per machine (an ifunc); elsewhere once. */
#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12) || \
     (defined(__clang__) && __clang_major__ >= 14)) && !defined(__SANITIZE_ADDRESS__)
#define MOS_SERVE_SIMD __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MOS_SERVE_SIMD
#endif

/* Scratch of the grouped strategy, sized for the largest group; unused pieces are NULL. */
typedef struct {
    void *a;     /* (max_rank, d_in) */
    void *bt;    /* (max_rank, d_out) */
    void *h;     /* (max(max_group, 1), max_rank) */
    void *xg;    /* (max_group, d_in): gathered rows of a non-contiguous group */
    void *yg;    /* (max_group, d_out) */
} serve_scratch;

#define REAL float
#define SUFFIX f32
#define GEMM scipy_cblas_sgemm
#include "serving_kernels.inc"
#undef REAL
#undef SUFFIX
#undef GEMM

#define REAL double
#define SUFFIX f64
#define GEMM scipy_cblas_dgemm
#include "serving_kernels.inc"
#undef REAL
#undef SUFFIX
#undef GEMM

/* ---------------------------------------------------------------- CPU back end */

static mos_status scratch_alloc(void **out, size_t elems, size_t elem) {
    *out = NULL;
    if (elems == 0) return MOS_OK;
    *out = malloc(elems * elem);
    MOS_CHECK(*out != NULL, MOS_ERR_NOMEM, "cannot allocate %zu bytes of scratch", elems * elem);
    return MOS_OK;
}

static void scratch_free(serve_scratch *w) {
    free(w->a);
    free(w->bt);
    free(w->h);
    free(w->xg);
    free(w->yg);
    memset(w, 0, sizeof *w);
}

/* Allocates the scratch for groups of at most max_group rows (gathered ones: at most max_gathered). */
static mos_status scratch_open(serve_scratch *w, const mos_batched_params *p, int64_t max_group,
                               int64_t max_gathered) {
    const size_t e = mos_dtype_size(p->dtype), r = (size_t)p->max_rank;
    const int assembled = max_group > MOS_SERVE_DIRECT_ROWS;
    const size_t h_rows = (size_t)(max_group > 1 ? max_group : 1);
    mos_status st;
    memset(w, 0, sizeof *w);
    if ((st = scratch_alloc(&w->h, h_rows * r, e)) != MOS_OK ||
        (assembled && (st = scratch_alloc(&w->a, r * (size_t)p->d_in, e)) != MOS_OK) ||
        (assembled && (st = scratch_alloc(&w->bt, r * (size_t)p->d_out, e)) != MOS_OK) ||
        (st = scratch_alloc(&w->xg, (size_t)max_gathered * (size_t)p->d_in, e)) != MOS_OK ||
        (st = scratch_alloc(&w->yg, (size_t)max_gathered * (size_t)p->d_out, e)) != MOS_OK)
        scratch_free(w);
    return st;
}

static void run_group(const mos_batched_params *p, int64_t a, const int64_t *rows, int64_t n0,
                      int64_t count, const serve_scratch *w) {
    if (p->dtype == MOS_F32) serve_group_f32(p, a, rows, n0, count, w);
    else serve_group_f64(p, a, rows, n0, count, w);
}

/* Grouped over the caller's segments: each segment is one contiguous group. */
static mos_status grouped_segments(const mos_batched_params *p) {
    int64_t max_group = 0;
    for (int64_t s = 0; s < p->n_segments; ++s) {
        const int64_t len = p->segments[s + 1] - p->segments[s];
        if (len > max_group) max_group = len;
    }
    serve_scratch w;
    MOS_TRY(scratch_open(&w, p, max_group, 0));
    for (int64_t s = 0; s < p->n_segments; ++s) {
        const int64_t n0 = p->segments[s], count = p->segments[s + 1] - n0;
        if (count <= 0) continue;
        const int64_t a = p->adapter_ids[n0];
        if (a < 0 || a >= p->n_adapters) continue;
        run_group(p, a, NULL, n0, count, &w);
    }
    scratch_free(&w);
    return MOS_OK;
}

/* Grouped by adapter: a stable counting sort of the rows by id, then one group per adapter. */
static mos_status grouped_by_adapter(const mos_batched_params *p) {
    const int64_t K = p->n_adapters, N = p->n_rows;
    int64_t *start = calloc((size_t)K + 1, sizeof *start);
    int64_t *order = malloc((size_t)(N > 0 ? N : 1) * sizeof *order);
    mos_status st = MOS_OK;
    serve_scratch w;
    memset(&w, 0, sizeof w);
    if (!start || !order) {
        st = mos_set_error(MOS_ERR_NOMEM, "cannot allocate the row order of %lld rows", (long long)N);
        goto done;
    }
    for (int64_t n = 0; n < N; ++n) {
        const int64_t a = p->adapter_ids[n];
        if (a >= 0 && a < K) ++start[a + 1];
    }
    int64_t max_group = 0, max_gathered = 0;
    for (int64_t a = 0; a < K; ++a) {
        const int64_t count = start[a + 1];
        if (count > max_group) max_group = count;
        start[a + 1] += start[a];
    }
    {
        int64_t *fill = malloc((size_t)(K > 0 ? K : 1) * sizeof *fill);
        if (!fill) {
            st = mos_set_error(MOS_ERR_NOMEM, "cannot allocate %lld counters", (long long)K);
            goto done;
        }
        memcpy(fill, start, (size_t)K * sizeof *fill);
        for (int64_t n = 0; n < N; ++n) {
            const int64_t a = p->adapter_ids[n];
            if (a >= 0 && a < K) order[fill[a]++] = n;
        }
        free(fill);
    }
    /* Rows of a group are ascending, so they are contiguous iff last - first == count - 1. */
    for (int64_t a = 0; a < K; ++a) {
        const int64_t count = start[a + 1] - start[a];
        const int64_t *rows = order + start[a];
        if (count > MOS_SERVE_DIRECT_ROWS && rows[count - 1] - rows[0] != count - 1 &&
            count > max_gathered)
            max_gathered = count;
    }
    if ((st = scratch_open(&w, p, max_group, max_gathered)) != MOS_OK) goto done;
    for (int64_t a = 0; a < K; ++a) {
        const int64_t count = start[a + 1] - start[a];
        if (count == 0) continue;
        const int64_t *rows = order + start[a];
        const int contiguous = rows[count - 1] - rows[0] == count - 1;
        run_group(p, a, contiguous ? NULL : rows, rows[0], count, &w);
    }
done:
    scratch_free(&w);
    free(start);
    free(order);
    return st;
}

mos_status mos_cpu_batched_forward(const mos_batched_params *p) {
    MOS_CHECK(p->dtype == MOS_F32 || p->dtype == MOS_F64, MOS_ERR_TYPE,
              "the CPU path supports float32 and float64, got %s", mos_dtype_name(p->dtype));
    if (p->n_rows == 0 || p->n_adapters == 0) return MOS_OK;
    if (p->grouped) return p->segments ? grouped_segments(p) : grouped_by_adapter(p);
    serve_scratch w;
    MOS_TRY(scratch_open(&w, p, 1, 0));
    if (p->dtype == MOS_F32) serve_rows_f32(p, NULL, 0, p->n_rows, w.h);
    else serve_rows_f64(p, NULL, 0, p->n_rows, w.h);
    scratch_free(&w);
    return MOS_OK;
}

/* ---------------------------------------------------------------- entry point */

static mos_status check_batched(const mos_batched_params *p) {
    MOS_CHECK(mos_dtype_size(p->dtype) != 0, MOS_ERR_TYPE, "unknown dtype %d", (int)p->dtype);
    MOS_CHECK(p->scales_dtype == MOS_F32 || p->scales_dtype == MOS_F64, MOS_ERR_TYPE,
              "scales must be float32 or float64, got %s", mos_dtype_name(p->scales_dtype));
    MOS_CHECK(p->n_rows >= 0 && p->n_adapters >= 0 && p->d_in > 0 && p->d_out > 0 &&
                  p->max_rank > 0 && p->shards_per_vector > 0,
              MOS_ERR_VALUE, "sizes must be positive (N and K may be 0)");
    MOS_CHECK(p->d_in % p->shards_per_vector == 0 && p->d_out % p->shards_per_vector == 0,
              MOS_ERR_VALUE, "shards_per_vector must divide d_in and d_out");
    MOS_CHECK(p->segments == NULL || (p->grouped && p->n_segments >= 0), MOS_ERR_VALUE,
              "segments are only used by the grouped strategy");
    MOS_CHECK(p->n_rows == 0 || p->adapter_ids != NULL, MOS_ERR_VALUE, "adapter_ids is NULL");
    return MOS_OK;
}

mos_status mos_batched_forward(const mos_batched_params *p) {
    MOS_TRY(check_batched(p));
    return p->device == MOS_DEVICE_CUDA ? mos_cuda_batched_forward(p) : mos_cpu_batched_forward(p);
}
