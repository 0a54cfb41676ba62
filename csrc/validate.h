/* validate.h -- the binding's tensor checks: every check runs before any output is touched, and
 * each returns 0, or -1 with a Python exception that names the argument at fault. */
#ifndef MOS_VALIDATE_H
#define MOS_VALIDATE_H

#include "tensor.h"

/* A floating-point tensor (TypeError otherwise). */
int mos_require_float(const mos_view *v);

/* Float tensor of exactly `dtype` (TypeError otherwise). */
int mos_require_dtype(const mos_view *v, mos_dtype dtype, const char *reference);

/* int32 and contiguous; a CPU table is then pinned (mos_view_pin), so the range checks and the
 * compute both read one private copy. */
int mos_require_index(mos_view *v);

/* shape[d] == expected (ValueError naming the dimension and both sizes). */
int mos_require_dim(const mos_view *v, int d, int64_t expected, const char *meaning);

/* 2-D with unit column stride and row stride >= cols (normalised for <= 1 row). */
int mos_require_rows(mos_view *v);

/* Compact row-major. */
int mos_require_contiguous(const mos_view *v);

/* Not flagged read-only. */
int mos_require_writable(const mos_view *v);

/* Same device as the reference view. */
int mos_require_same_device(const mos_view *v, const mos_view *reference);

/* BLAS takes int32 sizes: every dimension and stride must stay below 2^31. */
int mos_require_blas_sizes(const mos_view *v);

/* An (rows, cols) matrix with x's dtype and device, row-strided; writable when `output`. */
int mos_require_matrix(mos_view *v, const mos_view *x, int64_t rows, int64_t cols, int output);

/* At least one column (features = 0 is refused): the shard arithmetic divides by it. */
int mos_require_features(const mos_view *v, int64_t features, const char *what);

/* out's (or dy's) d_out columns are pool_b's shard length times l. */
int mos_require_d_out(const mos_view *out, const mos_view *pool_b, int64_t d_out, int64_t l);

/* Every entry is a row of `pool`; when distinct, no repeats (CPU-resident tables only). */
int mos_require_index_range(const mos_view *v, const mos_view *pool, int distinct);

/* An int32 table on x's device, contiguous, of length rows (and row length cols when cols >= 0). */
int mos_require_int_table(mos_view *v, const mos_view *x, int64_t rows, int64_t cols,
                          const char *meaning);

/* CPU tables only: every entry of the (flattened) int32 view lies in [lo, hi). */
int mos_require_int_range(const mos_view *v, int64_t lo, int64_t hi, const char *what);

/* Row offsets of x's groups: an int32 table on x's device with at least one entry; on the CPU
 * also 0 = s_0 <= s_1 <= ... <= s_S = x's rows, and one adapter id per segment. */
int mos_require_segments(mos_view *segments, const mos_view *ids, const mos_view *x);

/* The one workspace check. A given workspace (any dtype) must be on x's device, contiguous,
 * writable, at least `need` bytes (the message then ends with size_note) and MOS_WORKSPACE_ALIGN-
 * aligned; *data and *bytes then describe it. An absent one is refused for CUDA calls (`sizer`
 * names the function that sizes one); CPU calls leave *data NULL and let the core allocate. */
int mos_require_workspace(const mos_view *ws, const mos_view *x, size_t need, const char *sizer,
                          const char *size_note, void **data, size_t *bytes);

/* No output's memory intersects any other listed view's memory (BufferError); outputs and all
 * are indices into views. The test is on byte spans, so two views of one buffer that interleave
 * (e.g. disjoint column ranges of one matrix) are refused as overlapping even when no element is
 * shared. */
int mos_require_no_overlap(mos_view *views, const int *outputs, int n_outputs, const int *all,
                           int n_all);

/* 1 when |value| fits the largest finite value of dtype (NaN does not), else 0. */
int mos_is_finite_in(double value, mos_dtype dtype);

/* |value| fits the largest finite value of dtype: a larger scale makes every output inf or NaN. */
int mos_require_finite_in(double value, mos_dtype dtype, const char *name);

/* Per-adapter scales: float32 or float64, contiguous, on x's device, n_adapters long; on the CPU
 * every entry finite, and finite in x's dtype. */
int mos_require_scales(const mos_view *scales, const mos_view *x, int64_t n_adapters);

#endif
