/* tensor.h -- Python objects (NumPy arrays, DLPack capsules, anything with __dlpack__) -> plain C tensor views. */
#ifndef MOS_TENSOR_H
#define MOS_TENSOR_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "mos.h"

/* Element kinds a view may hold: the float dtypes of mos.h, int32 index tables, and raw bytes
 * (uint8), which only a workspace accepts. */
typedef enum { MOS_KIND_FLOAT = 0, MOS_KIND_INT32 = 1, MOS_KIND_BYTES = 2 } mos_elem_kind;

/* The ndim to ask mos_view_import for a 2-D (rows, columns) view of a tensor of any rank >= 2 whose
 * leading dimensions are flattened into rows, as torch's Linear treats its input. They must be
 * evenly spaced (as after a reshape without a copy); the last dimension is the columns. */
#define MOS_NDIM_ROWS (-2)

/* A borrowed view of a 1-D or 2-D tensor; valid until mos_view_release. */
typedef struct {
    const char *name;         /* argument name, for messages */
    PyObject *owner;          /* owned reference keeping the memory alive (array or capsule) */
    void *managed;            /* DLPack managed tensor to delete on release, or NULL */
    int versioned;            /* managed is a mos_dl_managed_versioned */
    void *data;
    void *pinned;             /* private copy of a CPU index table (data points at it), or NULL */
    const void *source;       /* the caller's memory when data was pinned (for overlap checks) */
    int ndim;
    int leading_rows;         /* imported as MOS_NDIM_ROWS: shape[0] counts every leading index */
    int64_t shape[2];
    int64_t strides[2];       /* elements */
    mos_elem_kind kind;
    mos_dtype dtype;          /* valid when kind == MOS_KIND_FLOAT */
    size_t itemsize;
    mos_device_kind device;
    int device_id;
    int readonly;
} mos_view;

/* Fills `view` from `obj` (ndim must be 1, 2 or MOS_NDIM_ROWS): a NumPy array, a DLPack capsule (consumed) or an
 * object with __dlpack__. For CUDA tensors, `stream` is passed to __dlpack__ so the producer
 * orders its work before ours; a bare capsule is taken as already ordered. Returns 0, or -1 with
 * an exception. */
int mos_view_import(PyObject *obj, const char *name, int ndim, mos_view *view, PyObject *stream);

/* What a view holds, for messages: "int32", "uint8" or the float dtype's name. */
const char *mos_view_kind_name(const mos_view *view);

/* Copies the view's elements into a private buffer and points data at it, so that no other
 * thread can change what is validated and then used (index tables are read without the GIL).
 * The view must be contiguous. 0, or -1 with MemoryError. */
int mos_view_pin(mos_view *view);

/* Drops the references, frees a pinned copy and runs the DLPack deleter exactly once, keeping
 * any pending exception (a deleter may run Python code). Safe on a zeroed view. */
void mos_view_release(mos_view *view);

/* Byte span [lo, hi) of the caller's memory the view covers (lo == hi for empty views). */
void mos_view_span(const mos_view *view, uintptr_t *lo, uintptr_t *hi);

#endif
