/* args.c -- the binding's argument parsing: names, scalars and tensors (args.h). */
#include "args.h"

#include <limits.h>
#include <math.h>
#include <string.h>

/* ---------------------------------------------------------------- fastcall arguments */

int mos_parse_args(const char *function, PyObject *const *args, Py_ssize_t nargs,
                   PyObject *kwnames, const char *const *names, int n_names, int n_required,
                   PyObject **objs) {
    if (nargs > n_names) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", function,
                     n_names, nargs);
        return -1;
    }
    for (int i = 0; i < n_names; ++i) objs[i] = i < nargs ? args[i] : NULL;
    Py_ssize_t n_kw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < n_kw; ++k) {
        const char *key = PyUnicode_AsUTF8(PyTuple_GET_ITEM(kwnames, k));
        if (!key) return -1;
        int found = -1;
        for (int i = 0; i < n_names; ++i)
            if (strcmp(key, names[i]) == 0) found = i;
        if (found < 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%s'", function, key);
            return -1;
        }
        if (objs[found]) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", function, key);
            return -1;
        }
        objs[found] = args[nargs + k];
    }
    for (int i = 0; i < n_required; ++i) {
        if (!objs[i]) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", function, names[i]);
            return -1;
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

int mos_parse_itemsize(PyObject *obj, mos_dtype *dtype) {
    long long itemsize;
    if (mos_parse_int(obj, "itemsize", 2, 8, &itemsize) < 0) return -1;
    if (itemsize != 2 && itemsize != 4 && itemsize != 8) {
        PyErr_Format(PyExc_ValueError, "itemsize must be 2, 4 or 8, got %lld", itemsize);
        return -1;
    }
    *dtype = itemsize == 8 ? MOS_F64 : itemsize == 4 ? MOS_F32 : MOS_F16;
    return 0;
}

int mos_parse_flag(PyObject *obj, int *flag) {
    if (!obj) return 0;
    *flag = PyObject_IsTrue(obj);
    return *flag < 0 ? -1 : 0;
}

int mos_parse_stream(PyObject *obj, void **stream) {
    if (obj == NULL || obj == Py_None) { *stream = (void *)(uintptr_t)1; return 0; }
    long long value;
    if (mos_parse_int(obj, "stream", LLONG_MIN, LLONG_MAX, &value) < 0) return -1;
    if (value == 0) {
        PyErr_SetString(PyExc_ValueError, "stream=0 is invalid in DLPack; use 1 for the legacy default stream");
        return -1;
    }
    if (value < 0) {
        PyErr_Format(PyExc_ValueError, "stream=%lld is invalid: pass the stream to launch on (a "
                     "cudaStream_t, 1 for the legacy default stream) or None", value);
        return -1;
    }
    *stream = (void *)(uintptr_t)value;
    return 0;
}

int mos_parse_pool_shape(PyObject *const *objs, mos_pool_shape *s) {
    static const char *const fields[] = {"d_in", "d_out", "n_layers", "r", "equivalent_rank",
                                         "shards_per_vector", "private_rank"};
    long long v[7];
    int subset = 1;
    memset(s, 0, sizeof *s);
    for (int i = 0; i < 7; ++i)
        if (mos_parse_int(objs[i], fields[i], LLONG_MIN, LLONG_MAX, &v[i]) < 0) return -1;
    if (mos_parse_flag(objs[7], &subset) < 0) return -1;
    *s = (mos_pool_shape){.d_in = v[0], .d_out = v[1], .n_layers = v[2], .rank = v[3],
                          .equivalent_rank = v[4], .shards_per_vector = v[5], .private_rank = v[6],
                          .subset_selection = subset};
    return 0;
}

/* ---------------------------------------------------------------- tensor arguments */

int mos_import_optional(PyObject *obj, const char *name, int ndim, mos_view *v, PyObject *stream) {
    if (obj == NULL || obj == Py_None) {
        memset(v, 0, sizeof *v);
        v->name = name;
        return 0;
    }
    return mos_view_import(obj, name, ndim, v, stream);
}

int mos_import_tensors(PyObject *const *objs, const mos_tensor_arg *args, int n, mos_view *views,
                       PyObject *stream) {
    for (int i = 0; i < n; ++i) {
        const mos_tensor_arg *a = &args[i];
        PyObject *obj = objs[a->arg];
        if ((a->optional ? mos_import_optional(obj, a->name, a->ndim, &views[a->slot], stream)
                         : mos_view_import(obj, a->name, a->ndim, &views[a->slot], stream)) < 0)
            return -1;
    }
    return 0;
}
