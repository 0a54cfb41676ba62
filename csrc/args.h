/* args.h -- the binding's argument parsing: fastcall arguments matched to their names, scalars
 * range-checked and converted, tensors imported into views. Each function returns 0, or -1 with a
 * Python exception naming the argument. */
#ifndef MOS_ARGS_H
#define MOS_ARGS_H

#include "tensor.h"

/* Workspace sizes are products of sizes parsed with this bound: each far from size_t overflow. */
#define MOS_MAX_DIM INT32_MAX

/* Matches positional and keyword arguments to `names`; objs[i] is NULL when absent. The first
 * n_required names must be given (TypeError naming `function` otherwise). */
int mos_parse_args(const char *function, PyObject *const *args, Py_ssize_t nargs,
                   PyObject *kwnames, const char *const *names, int n_names, int n_required,
                   PyObject **objs);

/* ---------------------------------------------------------------- scalar arguments */

/* An integer (bools refused) in [lo, hi]: TypeError or ValueError naming `name`. */
int mos_parse_int(PyObject *obj, const char *name, long long lo, long long hi, long long *out);

/* An integer in [0, 2^64) (a wider seed would be silently truncated). */
int mos_parse_u64(PyObject *obj, const char *name, unsigned long long *out);

/* A finite real number. */
int mos_parse_double(PyObject *obj, const char *name, double *out);

/* A str without NUL characters; *out borrows obj's UTF-8 buffer. */
int mos_parse_name(PyObject *obj, const char *name, const char **out);

/* obj's truth value; an absent (NULL) obj leaves *flag unchanged. */
int mos_parse_flag(PyObject *obj, int *flag);

/* itemsize of a float dtype the core knows: 2, 4 or 8 bytes (2 maps to float16). */
int mos_parse_itemsize(PyObject *obj, mos_dtype *dtype);

/* The stream a CUDA call launches on: None (or absent) -> the legacy default stream (1), else the
 * positive integer given (a cudaStream_t; 1 and 2 are the legacy and per-thread default streams,
 * as in DLPack). */
int mos_parse_stream(PyObject *obj, void **stream);

/* The seven sizes of a pool (d_in ... private_rank) and subset_selection from objs[0..7]; the core
 * checks their relations and names the field at fault. */
int mos_parse_pool_shape(PyObject *const *objs, mos_pool_shape *shape);

/* ---------------------------------------------------------------- tensor arguments */

/* Imports obj into v unless obj is NULL or None (then v is zeroed and named). */
int mos_import_optional(PyObject *obj, const char *name, int ndim, mos_view *v, PyObject *stream);

/* One tensor argument: objs[arg] is imported into views[slot] as an ndim-D tensor. */
typedef struct {
    int arg, slot;
    const char *name;
    int ndim, optional;
} mos_tensor_arg;

/* Imports each listed argument in order (stream: the CUDA producer's stream object, or NULL);
 * stops at the first failure. The caller releases every view, imported or not. */
int mos_import_tensors(PyObject *const *objs, const mos_tensor_arg *args, int n, mos_view *views,
                       PyObject *stream);

#endif
