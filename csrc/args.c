/* args.c -- argument validation for the binding: every check runs before any output is touched. */
#include "args.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

int mos_import_optional(PyObject *obj, const char *name, int ndim, mos_view *v, PyObject *stream) {
    if (obj == NULL || obj == Py_None) {
        memset(v, 0, sizeof *v);
        v->name = name;
        return 0;
    }
    return mos_view_import(obj, name, ndim, v, stream);
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

int mos_require_no_overlap(mos_view *const *outputs, int n_outputs, mos_view *const *all, int n_all) {
    for (int i = 0; i < n_outputs; ++i) {
        const mos_view *out = outputs[i];
        if (!out->data) continue;
        uintptr_t olo, ohi;
        mos_view_span(out, &olo, &ohi);
        for (int j = 0; j < n_all; ++j) {
            const mos_view *other = all[j];
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

/* ---------------------------------------------------------------- scalar arguments */

int mos_parse_int(PyObject *obj, const char *name, long long lo, long long hi, long long *out) {
    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected an integer, got %.100s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyObject *index = PyNumber_Index(obj);
    if (!index) return -1;
    int overflow = 0;
    long long value = PyLong_AsLongLongAndOverflow(index, &overflow);
    Py_DECREF(index);
    if (value == -1 && PyErr_Occurred()) return -1;
    if (overflow || value < lo || value > hi) {
        PyErr_Format(PyExc_ValueError, "%s must be in [%lld, %lld], got %R", name, lo, hi, obj);
        return -1;
    }
    *out = value;
    return 0;
}

int mos_parse_u64(PyObject *obj, const char *name, unsigned long long *out) {
    long long unused;
    if (PyBool_Check(obj) || !PyIndex_Check(obj)) return mos_parse_int(obj, name, 0, 0, &unused);
    PyObject *index = PyNumber_Index(obj);
    if (!index) return -1;
    unsigned long long value = PyLong_AsUnsignedLongLong(index);
    Py_DECREF(index);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be in [0, 2**64), got %R", name, obj);
        return -1;
    }
    *out = value;
    return 0;
}

int mos_parse_double(PyObject *obj, const char *name, double *out) {
    if (PyBool_Check(obj) || !(PyFloat_Check(obj) || PyIndex_Check(obj) ||
                               (Py_TYPE(obj)->tp_as_number && Py_TYPE(obj)->tp_as_number->nb_float))) {
        PyErr_Format(PyExc_TypeError, "%s: expected a real number, got %.100s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    *out = PyFloat_AsDouble(obj);
    if (*out == -1.0 && PyErr_Occurred()) {
        const int overflow = PyErr_ExceptionMatches(PyExc_OverflowError);
        PyErr_Clear();  /* e.g. an array of several elements: say which argument */
        PyErr_Format(overflow ? PyExc_ValueError : PyExc_TypeError,
                     overflow ? "%s must be finite, got %.100s" : "%s: expected a real number, got %.100s",
                     name, overflow ? "a value beyond float64" : Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (!isfinite(*out)) {
        PyErr_Format(PyExc_ValueError, "%s must be finite, got %R", name, obj);
        return -1;
    }
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

int mos_parse_name(PyObject *obj, const char *name, const char **out) {
    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a str, got %.100s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    Py_ssize_t size;
    *out = PyUnicode_AsUTF8AndSize(obj, &size);
    if (!*out) return -1;
    if ((size_t)size != strlen(*out)) {
        PyErr_Format(PyExc_ValueError, "%s must not contain NUL characters", name);
        return -1;
    }
    return 0;
}

PyObject *mos_raise_status(mos_status status, const char *function) {
    PyObject *type;
    switch (status) {
    case MOS_ERR_VALUE: type = PyExc_ValueError; break;
    case MOS_ERR_TYPE: type = PyExc_TypeError; break;
    case MOS_ERR_BUFFER: type = PyExc_BufferError; break;
    case MOS_ERR_NOMEM: type = PyExc_MemoryError; break;
    default: type = PyExc_RuntimeError; break;
    }
    PyErr_Format(type, "%s: %s", function, mos_last_error());
    return NULL;
}
