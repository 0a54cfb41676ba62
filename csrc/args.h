/* args.h -- validation helpers shared by the binding's entry points (each sets an exception). */
#ifndef MOS_ARGS_H
#define MOS_ARGS_H

#include "tensor.h"

/* Imports obj into v unless obj is NULL or None (then v is zeroed). 0 or -1. */
int mos_import_optional(PyObject *obj, const char *name, int ndim, mos_view *v, PyObject *stream);

/* Float tensor of exactly `dtype` (TypeError otherwise). */
int mos_require_dtype(const mos_view *v, mos_dtype dtype, const char *reference);

/* int32, 1-D, unit stride. */
int mos_require_index(const mos_view *v);

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

/* Every entry in [0, bound); when distinct, no repeats (CPU-resident tables only). */
int mos_require_index_range(const mos_view *v, int64_t bound, int distinct);

/* No output's memory intersects any other listed view's memory (BufferError). */
int mos_require_no_overlap(mos_view *const *outputs, int n_outputs, mos_view *const *all, int n_all);

/* Maps a failing mos_status plus mos_last_error() to a Python exception; returns NULL. */
PyObject *mos_raise_status(mos_status status, const char *function);

#endif
