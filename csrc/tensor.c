/*
 * tensor.c -- imports NumPy arrays (directly, through the NumPy C API), DLPack capsules and any
 * object with __dlpack__ (versioned capsule first, legacy on TypeError) into mos_view.
 * Rules follow the DLPack spec: byte_offset is always added, NULL strides mean row-major,
 * size-0 tensors may have data == NULL, read-only tensors are flagged, and the consumed
 * capsule is renamed "used_*" so its destructor leaves the deleter to us (run exactly once).
 */
#define NO_IMPORT_ARRAY
#define PY_ARRAY_UNIQUE_SYMBOL MOS_ARRAY_API
#include "tensor.h"

#include <numpy/arrayobject.h>
#include <stdlib.h>
#include <string.h>

#include "dlpack_abi.h"

static int fail(PyObject *type, const mos_view *v, const char *what) {
    PyErr_Format(type, "%s: %s", v->name, what);
    return -1;
}

static int set_float_dtype(mos_view *v, int code, int bits) {
    if (code == MOS_DL_FLOAT && bits == 32) v->dtype = MOS_F32;
    else if (code == MOS_DL_FLOAT && bits == 64) v->dtype = MOS_F64;
    else if (code == MOS_DL_FLOAT && bits == 16) v->dtype = MOS_F16;
    else if (code == MOS_DL_BFLOAT && bits == 16) v->dtype = MOS_BF16;
    else if (code == MOS_DL_INT && bits == 32) { v->kind = MOS_KIND_INT32; v->itemsize = 4; return 0; }
    else if (code == MOS_DL_UINT && bits == 8) { v->kind = MOS_KIND_BYTES; v->itemsize = 1; return 0; }
    else {
        PyErr_Format(PyExc_TypeError,
                     "%s: unsupported dtype (DLPack code %d, %d bits); expected float32, float64, "
                     "float16, bfloat16, int32 or (workspace only) uint8", v->name, code, bits);
        return -1;
    }
    v->kind = MOS_KIND_FLOAT;
    v->itemsize = mos_dtype_size(v->dtype);
    return 0;
}

/* Most dimensions a MOS_NDIM_ROWS tensor may have (torch's own limit is 25, far beyond any use). */
#define MOS_MAX_RANK 16

/* Sets v's 2-D shape and strides (elements) from an n-D layout whose leading dimensions are
 * evenly spaced rows (MOS_NDIM_ROWS): the rows' stride is that of the innermost leading
 * dimension longer than 1, and each outer one must continue it. */
static int flatten_rows(mos_view *v, int n, const int64_t *shape, const int64_t *strides) {
    int64_t rows = 1, row_stride = shape[n - 1] * strides[n - 1], next = 0;
    int spaced = 1, seen = 0;
    for (int d = n - 2; d >= 0; --d) {
        rows *= shape[d];
        if (shape[d] == 1) continue;
        if (!seen) row_stride = strides[d];
        else spaced &= strides[d] == next;
        next = strides[d] * shape[d];
        seen = 1;
    }
    if (!spaced && rows > 0 && shape[n - 1] > 0)
        return fail(PyExc_BufferError, v, "its leading dimensions are not evenly spaced rows; pass a "
                    "contiguous copy");
    v->shape[0] = rows;
    v->shape[1] = shape[n - 1];
    v->strides[0] = row_stride;
    v->strides[1] = strides[n - 1];
    return 0;
}

/* The view's shape and strides (elements) from the tensor's n dimensions: as they are, or with the
 * leading ones flattened into rows (MOS_NDIM_ROWS). */
static int set_layout(mos_view *v, int n, const int64_t *shape, const int64_t *strides) {
    if (v->leading_rows) return flatten_rows(v, n, shape, strides);
    for (int d = 0; d < n; ++d) {
        v->shape[d] = shape[d];
        v->strides[d] = strides[d];
    }
    return 0;
}

/* Whether a tensor of `got` dimensions is what the view asks for; a ValueError otherwise. */
static int check_rank(mos_view *v, int got, const char *what) {
    if (v->leading_rows ? got >= 2 && got <= MOS_MAX_RANK : got == v->ndim) return 0;
    if (v->leading_rows)
        PyErr_Format(PyExc_ValueError, "%s: expected an %s of 2 to %d dimensions (the leading ones are "
                     "rows), got %d-D", v->name, what, MOS_MAX_RANK, got);
    else
        PyErr_Format(PyExc_ValueError, "%s: expected a %d-D %s, got %d-D", v->name, v->ndim, what, got);
    return -1;
}

static int import_numpy(PyArrayObject *arr, mos_view *v) {
    int type = PyArray_TYPE(arr);
    int code, bits;
    switch (type) {
    case NPY_FLOAT32: code = MOS_DL_FLOAT; bits = 32; break;
    case NPY_FLOAT64: code = MOS_DL_FLOAT; bits = 64; break;
    case NPY_FLOAT16: code = MOS_DL_FLOAT; bits = 16; break;
    case NPY_INT32: code = MOS_DL_INT; bits = 32; break;
    case NPY_UINT8: code = MOS_DL_UINT; bits = 8; break;
    default:
        PyErr_Format(PyExc_TypeError,
                     "%s: unsupported dtype %R; expected float32, float64, int32 (indices) or "
                     "uint8 (workspace)",
                     v->name, (PyObject *)PyArray_DESCR(arr));
        return -1;
    }
    if (set_float_dtype(v, code, bits) < 0) return -1;
    if (!PyArray_ISNOTSWAPPED(arr)) return fail(PyExc_BufferError, v, "byte-swapped arrays are not supported");
    v->data = PyArray_DATA(arr);
    const int n = PyArray_NDIM(arr);
    int64_t shape[MOS_MAX_RANK], strides[MOS_MAX_RANK];
    for (int d = 0; d < n; ++d) {
        npy_intp stride = PyArray_STRIDES(arr)[d];
        shape[d] = PyArray_DIMS(arr)[d];
        if (stride % (npy_intp)v->itemsize != 0)
            return fail(PyExc_BufferError, v, "strides must be a multiple of the item size");
        strides[d] = stride / (npy_intp)v->itemsize;
    }
    if (set_layout(v, n, shape, strides) < 0) return -1;
    v->device = MOS_DEVICE_CPU;
    v->device_id = 0;
    v->readonly = !PyArray_ISWRITEABLE(arr);
    Py_INCREF(arr);
    v->owner = (PyObject *)arr;
    return 0;
}

/* Calls obj.__dlpack__(stream=..., max_version=(1, 0)), falling back to the legacy signature. */
static PyObject *request_capsule(PyObject *obj, PyObject *stream) {
    PyObject *method = NULL, *kwargs = NULL, *empty = NULL, *capsule = NULL, *version = NULL;
    method = PyObject_GetAttrString(obj, "__dlpack__");
    if (!method) goto cleanup;
    kwargs = PyDict_New();
    empty = PyTuple_New(0);
    version = Py_BuildValue("(ii)", 1, 0);
    if (!kwargs || !empty || !version) goto cleanup;
    if (stream && stream != Py_None && PyDict_SetItemString(kwargs, "stream", stream) < 0) goto cleanup;
    if (PyDict_SetItemString(kwargs, "max_version", version) < 0) goto cleanup;
    capsule = PyObject_Call(method, empty, kwargs);
    if (!capsule && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        if (PyDict_DelItemString(kwargs, "max_version") < 0) goto cleanup;
        capsule = PyObject_Call(method, empty, kwargs);
    }
cleanup:
    Py_XDECREF(method);
    Py_XDECREF(kwargs);
    Py_XDECREF(empty);
    Py_XDECREF(version);
    return capsule;
}

/* __dlpack_device__() must give a (device_type, device_id) pair of ints (TypeError otherwise). */
static int query_device(PyObject *obj, const mos_view *v, int *device_type, int *device_id) {
    PyObject *device = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
    if (!device) return -1;
    int values[2], status = 0;
    if (!PyTuple_Check(device) || PyTuple_GET_SIZE(device) != 2) {
        PyErr_Format(PyExc_TypeError, "%s: __dlpack_device__() must return a (device_type, "
                     "device_id) tuple, got %.100s", v->name, Py_TYPE(device)->tp_name);
        status = -1;
    }
    for (int i = 0; i < 2 && status == 0; ++i) {
        PyObject *item = PyTuple_GET_ITEM(device, i);
        int overflow = 0;
        long value = PyLong_Check(item) ? PyLong_AsLongAndOverflow(item, &overflow) : 0;
        if (!PyLong_Check(item) || PyErr_Occurred()) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_TypeError, "%s: __dlpack_device__() must return two ints, got "
                             "%.100s", v->name, Py_TYPE(item)->tp_name);
            status = -1;
        } else if (overflow || value < 0 || value > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "%s: __dlpack_device__() returned an out-of-range "
                         "value %R", v->name, item);
            status = -1;
        }
        values[i] = (int)value;
    }
    Py_DECREF(device);
    *device_type = values[0];
    *device_id = values[1];
    return status;
}

/* The capsule's tensor must describe memory we can address: a shape, data unless empty, and the
 * device __dlpack_device__() announced (`announced`, or NULL for a capsule handed over directly;
 * the capsule is what we read, so its device decides and a disagreement is refused). */
static int check_dl_tensor(const mos_dl_tensor *t, mos_view *v, const int *announced) {
    if (check_rank(v, t->ndim, "tensor") < 0) return -1;
    if (t->device.device_type != MOS_DL_CPU && t->device.device_type != MOS_DL_CUDA)
        return fail(PyExc_BufferError, v, "only CPU and CUDA tensors are supported");
    if (announced && (t->device.device_type != announced[0] || t->device.device_id != announced[1])) {
        PyErr_Format(PyExc_BufferError, "%s: the DLPack capsule is on device (%d, %d) but "
                     "__dlpack_device__() said (%d, %d)", v->name, (int)t->device.device_type,
                     (int)t->device.device_id, announced[0], announced[1]);
        return -1;
    }
    if (!t->shape) return fail(PyExc_BufferError, v, "the DLPack capsule has no shape");
    int empty = 0;
    for (int d = 0; d < t->ndim; ++d) {
        if (t->shape[d] < 0) return fail(PyExc_BufferError, v, "the DLPack capsule has a negative dimension");
        empty |= t->shape[d] == 0;
    }
    if (!t->data && !empty)
        return fail(PyExc_BufferError, v, "the DLPack capsule has no data for a non-empty shape");
    return 0;
}

/* Consumes a DLPack capsule into v (v takes the reference): renames it "used_*" so its
 * destructor leaves the deleter to mos_view_release, then checks (check_dl_tensor) and reads
 * shape, strides and device. */
static int import_capsule(PyObject *capsule, mos_view *v, const int *announced) {
    mos_dl_tensor *t;
    if (PyCapsule_IsValid(capsule, "dltensor_versioned")) {
        mos_dl_managed_versioned *m = PyCapsule_GetPointer(capsule, "dltensor_versioned");
        if (m->version.major > 1) {
            Py_DECREF(capsule);
            return fail(PyExc_BufferError, v, "DLPack major version > 1 is not supported");
        }
        PyCapsule_SetName(capsule, "used_dltensor_versioned");
        v->managed = m;
        v->versioned = 1;
        v->readonly = (m->flags & MOS_DL_FLAG_READ_ONLY) != 0;
        t = &m->dl_tensor;
    } else if (PyCapsule_IsValid(capsule, "dltensor")) {
        mos_dl_managed *m = PyCapsule_GetPointer(capsule, "dltensor");
        PyCapsule_SetName(capsule, "used_dltensor");
        v->managed = m;
        v->versioned = 0;
        v->readonly = 0;
        t = &m->dl_tensor;
    } else {
        Py_DECREF(capsule);
        return fail(PyExc_TypeError, v, "expected an unconsumed DLPack capsule");
    }
    v->owner = capsule;  /* released (and the deleter run) by mos_view_release */
    if (check_dl_tensor(t, v, announced) < 0) return -1;
    const int device_type = t->device.device_type;
    if (t->dtype.lanes != 1) return fail(PyExc_TypeError, v, "vector dtypes are not supported");
    if (set_float_dtype(v, t->dtype.code, t->dtype.bits) < 0) return -1;
    v->data = t->data ? (char *)t->data + t->byte_offset : NULL;
    int64_t strides[MOS_MAX_RANK], expected = 1;
    for (int d = t->ndim - 1; d >= 0; --d) {
        strides[d] = t->strides ? t->strides[d] : expected;
        expected *= t->shape[d];
    }
    if (set_layout(v, t->ndim, t->shape, strides) < 0) return -1;
    v->device = device_type == MOS_DL_CUDA ? MOS_DEVICE_CUDA : MOS_DEVICE_CPU;
    v->device_id = device_type == MOS_DL_CUDA ? t->device.device_id : 0;
    return 0;
}

static int import_dlpack(PyObject *obj, mos_view *v, PyObject *stream) {
    int announced[2];
    if (query_device(obj, v, &announced[0], &announced[1]) < 0) return -1;
    if (announced[0] != MOS_DL_CPU && announced[0] != MOS_DL_CUDA)
        return fail(PyExc_BufferError, v, "only CPU and CUDA tensors are supported");

    /* A CUDA producer is always told the launch stream, so that its pending writes are ordered
     * before the launch; with stream=None the core launches on the legacy default stream (1). */
    PyObject *legacy = NULL;
    if (announced[0] == MOS_DL_CUDA && (stream == NULL || stream == Py_None)) {
        legacy = PyLong_FromLong(1);
        if (!legacy) return -1;
        stream = legacy;
    }
    PyObject *capsule = request_capsule(obj, announced[0] == MOS_DL_CUDA ? stream : NULL);
    Py_XDECREF(legacy);
    if (!capsule) return -1;
    if (!PyCapsule_CheckExact(capsule)) {
        Py_DECREF(capsule);
        return fail(PyExc_TypeError, v, "__dlpack__ did not return a DLPack capsule");
    }
    return import_capsule(capsule, v, announced);
}

int mos_view_import(PyObject *obj, const char *name, int ndim, mos_view *v, PyObject *stream) {
    memset(v, 0, sizeof *v);
    v->name = name;
    v->leading_rows = ndim == MOS_NDIM_ROWS;
    v->ndim = v->leading_rows ? 2 : ndim;
    if (PyArray_Check(obj)) {
        if (check_rank(v, PyArray_NDIM((PyArrayObject *)obj), "array") < 0) return -1;
        return import_numpy((PyArrayObject *)obj, v);
    }
    if (PyCapsule_CheckExact(obj)) {  /* a producer's capsule handed over directly (no stream sync) */
        Py_INCREF(obj);
        return import_capsule(obj, v, NULL);
    }
    if (!PyObject_HasAttrString(obj, "__dlpack__")) {
        PyErr_Format(PyExc_TypeError,
                     "%s: expected a NumPy array, a DLPack capsule or an object with __dlpack__, got %.100s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    return import_dlpack(obj, v, stream);
}

const char *mos_view_kind_name(const mos_view *v) {
    switch (v->kind) {
    case MOS_KIND_INT32: return "int32";
    case MOS_KIND_BYTES: return "uint8";
    default: return mos_dtype_name(v->dtype);
    }
}

int mos_view_pin(mos_view *v) {
    if (v->device != MOS_DEVICE_CPU || v->pinned || !v->data) return 0;
    size_t bytes = v->itemsize;
    for (int d = 0; d < v->ndim; ++d) bytes *= (size_t)v->shape[d];
    if (bytes == 0) return 0;
    void *copy = malloc(bytes);
    if (!copy) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(copy, v->data, bytes);
    v->source = v->data;
    v->data = v->pinned = copy;
    return 0;
}

/* A deleter or destructor that raised has nowhere to report to: report it as unraisable. */
static void report_unraisable(PyObject *context) {
    if (PyErr_Occurred()) PyErr_WriteUnraisable(context);
}

void mos_view_release(mos_view *v) {
    if (!v->managed && !v->owner && !v->pinned) return;
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *pending = PyErr_GetRaisedException();
#else
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
#endif
    if (v->managed) {
        if (v->versioned) {
            mos_dl_managed_versioned *m = v->managed;
            if (m->deleter) m->deleter(m);
        } else {
            mos_dl_managed *m = v->managed;
            if (m->deleter) m->deleter(m);
        }
        v->managed = NULL;
        report_unraisable(v->owner);
    }
    free(v->pinned);
    v->pinned = NULL;
    Py_CLEAR(v->owner);
    report_unraisable(NULL);
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(pending);
#else
    PyErr_Restore(type, value, traceback);
#endif
}

void mos_view_span(const mos_view *v, uintptr_t *lo, uintptr_t *hi) {
    const uintptr_t base = (uintptr_t)(v->source ? v->source : v->data);
    intptr_t low = 0, high = 0;
    for (int d = 0; d < v->ndim; ++d) {
        if (v->shape[d] == 0) { *lo = *hi = base; return; }
        intptr_t extent = (intptr_t)(v->shape[d] - 1) * (intptr_t)v->strides[d] * (intptr_t)v->itemsize;
        if (extent < 0) low += extent; else high += extent;
    }
    *lo = base + (uintptr_t)low;
    *hi = base + (uintptr_t)high + v->itemsize;
}
