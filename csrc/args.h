/* args.h -- validation helpers shared by the binding's entry points (each sets an exception). */
#ifndef MOS_ARGS_H
#define MOS_ARGS_H

#include "tensor.h"

/* Imports obj into v unless obj is NULL or None (then v is zeroed). 0 or -1. */
int mos_import_optional(PyObject *obj, const char *name, int ndim, mos_view *v, PyObject *stream);

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

/* Every entry is a row of `pool`; when distinct, no repeats (CPU-resident tables only). */
int mos_require_index_range(const mos_view *v, const mos_view *pool, int distinct);

/* No output's memory intersects any other listed view's memory (BufferError). The test is on
 * byte spans, so two views of one buffer that interleave (e.g. disjoint column ranges of one
 * matrix) are refused as overlapping even when no element is shared. */
int mos_require_no_overlap(mos_view *const *outputs, int n_outputs, mos_view *const *all, int n_all);

/* ---------------------------------------------------------------- scalar arguments */

/* An integer (bools refused) in [lo, hi]: TypeError or ValueError naming `name`. 0 or -1. */
int mos_parse_int(PyObject *obj, const char *name, long long lo, long long hi, long long *out);

/* An integer in [0, 2^64) (a wider seed would be silently truncated). 0 or -1. */
int mos_parse_u64(PyObject *obj, const char *name, unsigned long long *out);

/* A finite real number. 0 or -1. */
int mos_parse_double(PyObject *obj, const char *name, double *out);

/* 1 when |value| fits the largest finite value of dtype (NaN does not), else 0. */
int mos_is_finite_in(double value, mos_dtype dtype);

/* |value| fits the largest finite value of dtype: a larger scale makes every output inf or NaN. */
int mos_require_finite_in(double value, mos_dtype dtype, const char *name);

/* A str without NUL characters; *out borrows obj's UTF-8 buffer. 0 or -1. */
int mos_parse_name(PyObject *obj, const char *name, const char **out);

/* Maps a failing mos_status plus mos_last_error() to a Python exception; returns NULL. */
PyObject *mos_raise_status(mos_status status, const char *function);

#endif
