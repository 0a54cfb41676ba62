/* validate.c -- the binding's tensor checks (validate.h): run before any output is touched. */
#include "validate.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

int mos_require_float(const mos_view *v) {
    if (v->kind == MOS_KIND_FLOAT) return 0;
    PyErr_Format(PyExc_TypeError, "%s: expected a floating-point tensor, got %s", v->name,
                 mos_view_kind_name(v));
    return -1;
}

int mos_require_dtype(const mos_view *v, mos_dtype dtype, const char *reference) {
    if (v->kind != MOS_KIND_FLOAT) {
        PyErr_Format(PyExc_TypeError, "%s: expected a floating-point tensor, got %s", v->name,
                     mos_view_kind_name(v));
        return -1;
    }
    if (v->dtype != dtype) {
        PyErr_Format(PyExc_TypeError, "%s: dtype %s does not match %s's %s", v->name,
                     mos_dtype_name(v->dtype), reference, mos_dtype_name(dtype));
        return -1;
    }
    return 0;
}

int mos_require_index(mos_view *v) {
    if (v->kind != MOS_KIND_INT32) {
        PyErr_Format(PyExc_TypeError, "%s: index tables must be int32, got %s", v->name,
                     mos_view_kind_name(v));
        return -1;
    }
    /* Checked and then read without the GIL: validate and use a private copy, never the
     * caller's memory, which another Python thread could change in between. */
    return mos_require_contiguous(v) < 0 ? -1 : mos_view_pin(v);
}

int mos_require_dim(const mos_view *v, int d, int64_t expected, const char *meaning) {
    if (v->shape[d] != expected) {
        PyErr_Format(PyExc_ValueError, "%s: dimension %d is %lld, expected %lld (%s)", v->name, d,
                     (long long)v->shape[d], (long long)expected, meaning);
        return -1;
    }
    return 0;
}

int mos_require_rows(mos_view *v) {
    const int64_t rows = v->shape[0], cols = v->shape[1];
    if (rows == 0 || cols == 0) {  /* empty: strides are meaningless (NumPy reports 0) */
        v->strides[0] = cols > 0 ? cols : 1;
        v->strides[1] = 1;
        return 0;
    }
    if (cols > 1 && v->strides[1] != 1) {
        PyErr_Format(PyExc_BufferError,
                     "%s: columns must be contiguous (column stride %lld, expected 1); pass a "
                     "contiguous copy", v->name, (long long)v->strides[1]);
        return -1;
    }
    v->strides[1] = 1;
    if (rows <= 1) {
        v->strides[0] = cols > 0 ? cols : 1;
    } else if (v->strides[0] < (cols > 0 ? cols : 1)) {
        PyErr_Format(PyExc_BufferError,
                     "%s: row stride %lld is smaller than the row length %lld (overlapping, "
                     "broadcast or reversed rows are not supported)", v->name,
                     (long long)v->strides[0], (long long)cols);
        return -1;
    }
    return 0;
}

int mos_require_contiguous(const mos_view *v) {
    for (int d = 0; d < v->ndim; ++d)
        if (v->shape[d] == 0) return 0;  /* empty tensors are trivially contiguous */
    int64_t expected = 1;
    for (int d = v->ndim - 1; d >= 0; --d) {
        if (v->shape[d] > 1 && v->strides[d] != expected) {
            PyErr_Format(PyExc_BufferError, "%s: must be contiguous (row-major)", v->name);
            return -1;
        }
        expected *= v->shape[d];
    }
    return 0;
}

int mos_require_writable(const mos_view *v) {
    if (v->readonly) {
        PyErr_Format(PyExc_BufferError, "%s: output is read-only", v->name);
        return -1;
    }
    return 0;
}

int mos_require_same_device(const mos_view *v, const mos_view *ref) {
    if (v->device != ref->device || v->device_id != ref->device_id) {
        PyErr_Format(PyExc_BufferError, "%s: is on %s:%d but %s is on %s:%d", v->name,
                     v->device == MOS_DEVICE_CUDA ? "cuda" : "cpu", v->device_id, ref->name,
                     ref->device == MOS_DEVICE_CUDA ? "cuda" : "cpu", ref->device_id);
        return -1;
    }
    return 0;
}

int mos_require_blas_sizes(const mos_view *v) {
    for (int d = 0; d < v->ndim; ++d) {
        if (v->shape[d] >= INT32_MAX || v->strides[d] >= INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "%s: dimension or stride %d exceeds 2^31 - 1", v->name, d);
            return -1;
        }
    }
    return 0;
}

int mos_require_index_range(const mos_view *v, const mos_view *pool, int distinct) {
    if (v->device != MOS_DEVICE_CPU) return 0;  /* device tables: checked where they are built */
    const int32_t *index = v->data;
    const int64_t n = v->shape[0], bound = pool->shape[0];
    for (int64_t i = 0; i < n; ++i) {
        if (index[i] < 0 || index[i] >= bound) {
            PyErr_Format(PyExc_ValueError, "%s[%lld] = %d is out of range [0, %lld) (rows of %s)",
                         v->name, (long long)i, (int)index[i], (long long)bound, pool->name);
            return -1;
        }
    }
    if (!distinct || n < 2) return 0;
    /* A bitmap over the pool rows: O(n + bound / 8) and no sort. */
    unsigned char *seen = calloc((size_t)(bound + 7) / 8, 1);
    if (!seen) { PyErr_NoMemory(); return -1; }
    int status = 0;
    for (int64_t i = 0; i < n; ++i) {
        unsigned char bit = (unsigned char)(1u << (index[i] & 7));
        if (seen[index[i] >> 3] & bit) {
            PyErr_Format(PyExc_ValueError, "%s[%lld] = %d repeats an earlier entry; a layer's "
                         "indices must be distinct", v->name, (long long)i, (int)index[i]);
            status = -1;
            break;
        }
        seen[index[i] >> 3] |= bit;
    }
    free(seen);
    return status;
}

int mos_require_no_overlap(mos_view *views, const int *outputs, int n_outputs, const int *all,
                           int n_all) {
    for (int i = 0; i < n_outputs; ++i) {
        const mos_view *out = &views[outputs[i]];
        if (!out->data) continue;
        uintptr_t olo, ohi;
        mos_view_span(out, &olo, &ohi);
        for (int j = 0; j < n_all; ++j) {
            const mos_view *other = &views[all[j]];
            if (other == out || !other->data || other->device != out->device) continue;
            uintptr_t lo, hi;
            mos_view_span(other, &lo, &hi);
            if (olo < hi && lo < ohi) {
                PyErr_Format(PyExc_BufferError, "%s: output memory overlaps %s", out->name,
                             other->name);
                return -1;
            }
        }
    }
    return 0;
}

int mos_require_matrix(mos_view *v, const mos_view *x, int64_t rows, int64_t cols, int output) {
    if (mos_require_dtype(v, x->dtype, "x") < 0 || mos_require_same_device(v, x) < 0) return -1;
    if (mos_require_dim(v, 0, rows, "rows of x") < 0) return -1;
    if (mos_require_dim(v, 1, cols, "features") < 0) return -1;
    if (mos_require_rows(v) < 0 || mos_require_blas_sizes(v) < 0) return -1;
    return output ? mos_require_writable(v) : 0;
}

int mos_require_features(const mos_view *v, int64_t features, const char *what) {
    if (features >= 1) return 0;
    PyErr_Format(PyExc_ValueError, "%s: has no columns (%s = 0); the adapter needs at least one",
                 v->name, what);
    return -1;
}

int mos_require_d_out(const mos_view *out, const mos_view *pool_b, int64_t d_out, int64_t l) {
    if (d_out % l == 0 && pool_b->shape[1] == d_out / l) return 0;
    PyErr_Format(PyExc_ValueError, "%s: d_out = %lld does not match pool_b's shard length %lld "
                 "times shards_per_vector %lld (= x's d_in / pool_a's shard length)", out->name,
                 (long long)d_out, (long long)pool_b->shape[1], (long long)l);
    return -1;
}

int mos_require_int_table(mos_view *v, const mos_view *x, int64_t rows, int64_t cols,
                          const char *meaning) {
    if (mos_require_index(v) < 0 || mos_require_same_device(v, x) < 0) return -1;
    if (mos_require_dim(v, 0, rows, meaning) < 0) return -1;
    return cols >= 0 ? mos_require_dim(v, 1, cols, meaning) : 0;
}

int mos_require_int_range(const mos_view *v, int64_t lo, int64_t hi, const char *what) {
    if (v->device != MOS_DEVICE_CPU || !v->data) return 0;
    const int32_t *t = v->data;
    const int64_t cols = v->ndim == 2 ? v->shape[1] : 1, n = v->shape[0] * cols;
    for (int64_t i = 0; i < n; ++i) {
        if (t[i] < lo || t[i] >= hi) {
            if (v->ndim == 2)
                PyErr_Format(PyExc_ValueError, "%s[%lld, %lld] = %d is out of range [%lld, %lld)%s",
                             v->name, (long long)(i / cols), (long long)(i % cols), (int)t[i],
                             (long long)lo, (long long)hi, what);
            else
                PyErr_Format(PyExc_ValueError, "%s[%lld] = %d is out of range [%lld, %lld)%s",
                             v->name, (long long)i, (int)t[i], (long long)lo, (long long)hi, what);
            return -1;
        }
    }
    return 0;
}

int mos_require_segments(mos_view *seg, const mos_view *ids, const mos_view *x) {
    if (mos_require_index(seg) < 0 || mos_require_same_device(seg, x) < 0) return -1;
    if (seg->shape[0] < 1) {
        PyErr_SetString(PyExc_ValueError, "segments: needs at least one entry (0 and N)");
        return -1;
    }
    if (seg->device != MOS_DEVICE_CPU) return 0;
    const int64_t n_rows = x->shape[0];
    const int32_t *s = seg->data, *id = ids->data;
    const int64_t n = seg->shape[0];
    if (n < 1 || s[0] != 0 || s[n - 1] != n_rows) {
        PyErr_Format(PyExc_ValueError, "segments: must start at 0 and end at the row count %lld "
                     "(got %lld entries, first %d, last %d)", (long long)n_rows, (long long)n,
                     n ? (int)s[0] : 0, n ? (int)s[n - 1] : 0);
        return -1;
    }
    for (int64_t i = 0; i + 1 < n; ++i) {
        if (s[i + 1] < s[i]) {
            PyErr_Format(PyExc_ValueError, "segments[%lld] = %d is below segments[%lld] = %d; "
                         "offsets must not decrease", (long long)(i + 1), (int)s[i + 1],
                         (long long)i, (int)s[i]);
            return -1;
        }
    }
    for (int64_t i = 0; i + 1 < n; ++i) {
        for (int64_t row = s[i] + 1; row < s[i + 1]; ++row) {
            if (id[row] != id[s[i]]) {
                PyErr_Format(PyExc_ValueError, "segments: segment %lld mixes adapters (row %lld "
                             "has id %d, row %d has id %d); every row of a segment must have one "
                             "adapter id", (long long)i, (long long)row, (int)id[row], (int)s[i],
                             (int)id[s[i]]);
                return -1;
            }
        }
    }
    return 0;
}

int mos_require_workspace(const mos_view *ws, const mos_view *x, size_t need, const char *sizer,
                          const char *size_note, void **data, size_t *bytes) {
    *data = NULL;
    *bytes = 0;
    if (!ws->owner) {
        if (x->device != MOS_DEVICE_CUDA) return 0;
        PyErr_Format(PyExc_ValueError, "workspace: CUDA calls need a caller-allocated workspace "
                     "(see %s)", sizer);
        return -1;
    }
    if (mos_require_same_device(ws, x) < 0 || mos_require_contiguous(ws) < 0 ||
        mos_require_writable(ws) < 0)
        return -1;
    const size_t have = (size_t)ws->shape[0] * ws->itemsize;
    if (have < need) {
        PyErr_Format(PyExc_ValueError, "workspace: holds %zu bytes, the call needs %zu%s", have,
                     need, size_note);
        return -1;
    }
    if (((uintptr_t)ws->data) % MOS_WORKSPACE_ALIGN != 0) {
        PyErr_Format(PyExc_ValueError, "workspace: must be %d-byte aligned", MOS_WORKSPACE_ALIGN);
        return -1;
    }
    *data = ws->data;
    *bytes = have;
    return 0;
}

static double largest_finite(mos_dtype dtype) {
    switch (dtype) {
    case MOS_F32: return FLT_MAX;
    case MOS_F16: return 65504.0;
    case MOS_BF16: return 3.3895313892515355e38;
    case MOS_F64: break;
    }
    return DBL_MAX;
}

int mos_is_finite_in(double value, mos_dtype dtype) {
    return fabs(value) <= largest_finite(dtype);
}

int mos_require_finite_in(double value, mos_dtype dtype, const char *name) {
    if (mos_is_finite_in(value, dtype)) return 0;
    char text[32];
    snprintf(text, sizeof text, "%g", value);
    PyErr_Format(PyExc_ValueError, "%s = %s is not finite in %s, the pools' dtype", name, text,
                 mos_dtype_name(dtype));
    return -1;
}

int mos_require_scales(const mos_view *sc, const mos_view *x, int64_t n_adapters) {
    if (sc->kind != MOS_KIND_FLOAT || (sc->dtype != MOS_F32 && sc->dtype != MOS_F64)) {
        PyErr_Format(PyExc_TypeError, "scales: expected float32 or float64, got %s",
                     mos_view_kind_name(sc));
        return -1;
    }
    if (mos_require_contiguous(sc) < 0 || mos_require_same_device(sc, x) < 0 ||
        mos_require_dim(sc, 0, n_adapters, "one scale per adapter (rows of index_a)") < 0)
        return -1;
    if (sc->device != MOS_DEVICE_CPU) return 0;
    const mos_dtype dtype = x->dtype;
    for (int64_t a = 0; a < sc->shape[0]; ++a) {
        const double s = sc->dtype == MOS_F64 ? ((const double *)sc->data)[a]
                                              : (double)((const float *)sc->data)[a];
        if (!isfinite(s)) {
            char text[32];
            snprintf(text, sizeof text, "%g", s);
            PyErr_Format(PyExc_ValueError, "scales[%lld] = %s must be finite", (long long)a, text);
            return -1;
        }
        if (!mos_is_finite_in(s, dtype)) {  /* the message is built only on failure */
            char what[40];
            snprintf(what, sizeof what, "scales[%lld]", (long long)a);
            return mos_require_finite_in(s, dtype, what);
        }
    }
    return 0;
}
