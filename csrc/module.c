/*
 * module.c -- the CPython module mos._C: parses arguments, validates every tensor before any
 * output is touched, releases the GIL around the compute, and turns statuses into exceptions.
 * Multi-phase init; the module keeps no global mutable state.
 */
#define PY_ARRAY_UNIQUE_SYMBOL MOS_ARRAY_API
#include "args.h"

#include <limits.h>
#include <math.h>
#include <numpy/arrayobject.h>

/* ---------------------------------------------------------------- fastcall argument parsing */

/* Matches positional and keyword arguments to `names`; objs[i] is NULL when absent.
 * The first n_required names must be given. 0 or -1 with a TypeError naming `function`. */
static int parse_args(const char *function, PyObject *const *args, Py_ssize_t nargs,
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

/* The stream a CUDA call launches on: None -> legacy default (1), else the positive integer given
 * (a cudaStream_t; 1 and 2 are the legacy and per-thread default streams, as in DLPack). DLPack's
 * -1 ("no synchronization") names no stream to launch on, so it is refused like every negative. */
static int parse_stream(PyObject *obj, void **stream) {
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

/* ---------------------------------------------------------------- shared linear validation */

enum { V_X, V_POOL_A, V_INDEX_A, V_POOL_B, V_INDEX_B, V_Y, V_H, V_DY, V_DX, V_DPOOL_A, V_DPOOL_B,
       V_WEIGHT, V_BIAS, V_WORKSPACE, V_COUNT };

typedef struct { mos_view v[V_COUNT]; } linear_views;

static void release_all(linear_views *views) {
    for (int i = 0; i < V_COUNT; ++i) mos_view_release(&views->v[i]);
}

/* A matrix needs at least one column: the shard arithmetic divides by d_in / shard length. */
static int check_features(const mos_view *v, int64_t features, const char *what) {
    if (features >= 1) return 0;
    PyErr_Format(PyExc_ValueError, "%s: has no columns (%s = 0); the adapter needs at least one",
                 v->name, what);
    return -1;
}

/* The output's (or dy's) columns must be pool_b's shard length times l. */
static int check_d_out(const mos_view *out, const mos_view *pool_b, int64_t d_out, int64_t l) {
    if (d_out % l == 0 && pool_b->shape[1] == d_out / l) return 0;
    PyErr_Format(PyExc_ValueError, "%s: d_out = %lld does not match pool_b's shard length %lld "
                 "times shards_per_vector %lld (= x's d_in / pool_a's shard length)", out->name,
                 (long long)d_out, (long long)pool_b->shape[1], (long long)l);
    return -1;
}

/* Checks x, the pools and the index tables and derives the sizes into p.
 * d_out comes from the caller (the output or dy tensor). */
static int check_adapter_inputs(linear_views *views, mos_linear_params *p, int64_t d_out) {
    mos_view *x = &views->v[V_X], *pa = &views->v[V_POOL_A], *pb = &views->v[V_POOL_B];
    mos_view *ia = &views->v[V_INDEX_A], *ib = &views->v[V_INDEX_B];
    if (x->kind != MOS_KIND_FLOAT) {
        PyErr_Format(PyExc_TypeError, "x: expected a floating-point tensor, got %s",
                     mos_view_kind_name(x));
        return -1;
    }
    if (mos_require_rows(x) < 0 || mos_require_blas_sizes(x) < 0) return -1;
    if (mos_require_dtype(pa, x->dtype, "x") < 0 || mos_require_dtype(pb, x->dtype, "x") < 0) return -1;
    if (mos_require_contiguous(pa) < 0 || mos_require_contiguous(pb) < 0) return -1;
    if (mos_require_index(ia) < 0 || mos_require_index(ib) < 0) return -1;
    mos_view *all[] = {pa, ia, pb, ib};
    for (int i = 0; i < 4; ++i)
        if (mos_require_same_device(all[i], x) < 0) return -1;
    const mos_view *out = views->v[V_Y].owner ? &views->v[V_Y] : &views->v[V_DY];  /* gives d_out */
    const int64_t d_in = x->shape[1], sla = pa->shape[1], slb = pb->shape[1];
    if (check_features(x, d_in, "d_in") < 0 || check_features(out, d_out, "d_out") < 0) return -1;
    if (sla < 1 || d_in % sla != 0) {
        PyErr_Format(PyExc_ValueError,
                     "pool_a: shard length %lld must divide x's d_in = %lld", (long long)sla,
                     (long long)d_in);
        return -1;
    }
    const int64_t l = d_in / sla;
    if (check_d_out(out, pb, d_out, l) < 0) return -1;
    const int64_t rl = ia->shape[0];
    if (rl < 1 || rl % l != 0) {
        PyErr_Format(PyExc_ValueError, "index_a: length %lld must be a positive multiple of "
                     "shards_per_vector = %lld (= d_in / shard length)", (long long)rl, (long long)l);
        return -1;
    }
    if (mos_require_dim(ib, 0, rl, "index_b must have index_a's length r * shards_per_vector") < 0)
        return -1;
    if (mos_require_index_range(ia, pa, 0) < 0 || mos_require_index_range(ib, pb, 0) < 0)
        return -1;
    memset(p, 0, sizeof *p);
    p->dtype = x->dtype;
    p->device = x->device;
    p->device_id = x->device_id;
    p->n_rows = x->shape[0];
    p->d_in = d_in;
    p->d_out = d_out;
    p->rank = rl / l;
    p->shards_per_vector = l;
    p->n_shards_a = pa->shape[0];
    p->n_shards_b = pb->shape[0];
    p->x = x->data;
    p->x_stride = x->strides[0];
    p->pool_a = pa->data;
    p->pool_b = pb->data;
    p->index_a = ia->data;
    p->index_b = ib->data;
    (void)slb;
    return 0;
}

/* An (N, cols) output or gradient with x's dtype and device, row-strided. */
static int check_matrix(mos_view *v, const mos_view *x, int64_t rows, int64_t cols, int output) {
    if (mos_require_dtype(v, x->dtype, "x") < 0 || mos_require_same_device(v, x) < 0) return -1;
    if (mos_require_dim(v, 0, rows, "rows of x") < 0) return -1;
    if (mos_require_dim(v, 1, cols, "features") < 0) return -1;
    if (mos_require_rows(v) < 0 || mos_require_blas_sizes(v) < 0) return -1;
    return output ? mos_require_writable(v) : 0;
}

/* Optional h (N, r) contiguous, and optional workspace (any dtype, contiguous, writable). */
static int check_h_and_workspace(linear_views *views, mos_linear_params *p, mos_linear_op op,
                                 int h_is_output) {
    mos_view *h = &views->v[V_H], *ws = &views->v[V_WORKSPACE], *x = &views->v[V_X];
    if (h->data || h->owner) {
        if (mos_require_dtype(h, x->dtype, "x") < 0 || mos_require_same_device(h, x) < 0) return -1;
        if (mos_require_dim(h, 0, p->n_rows, "rows of x") < 0 ||
            mos_require_dim(h, 1, p->rank, "rank r") < 0 || mos_require_contiguous(h) < 0)
            return -1;
        if (h_is_output && mos_require_writable(h) < 0) return -1;
        p->h = h->data;
        if (!p->h && p->n_rows > 0) { PyErr_SetString(PyExc_BufferError, "h: no data"); return -1; }
    }
    if (ws->owner) {
        if (mos_require_same_device(ws, x) < 0 || mos_require_contiguous(ws) < 0 ||
            mos_require_writable(ws) < 0)
            return -1;
        size_t need = mos_linear_workspace_bytes(p, op);
        size_t have = (size_t)ws->shape[0] * ws->itemsize;
        if (have < need) {
            PyErr_Format(PyExc_ValueError, "workspace: holds %zu bytes, the call needs %zu", have, need);
            return -1;
        }
        if (((uintptr_t)ws->data) % 256 != 0) {
            PyErr_SetString(PyExc_ValueError, "workspace: must be 256-byte aligned");
            return -1;
        }
        p->workspace = ws->data;
        p->workspace_bytes = have;
    } else if (x->device == MOS_DEVICE_CUDA) {
        PyErr_SetString(PyExc_ValueError,
                        "workspace: CUDA calls need a caller-allocated workspace (see linear_workspace_bytes)");
        return -1;
    }
    return 0;
}

static PyObject *run_linear(mos_status (*op)(const mos_linear_params *), const mos_linear_params *p,
                            linear_views *views, const char *function) {
    mos_status status;
    Py_BEGIN_ALLOW_THREADS
    status = op(p);
    Py_END_ALLOW_THREADS
    release_all(views);
    if (status != MOS_OK) return mos_raise_status(status, function);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- linear_forward */

static PyObject *linear_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames) {
    static const char *const names[] = {"y", "x", "pool_a", "index_a", "pool_b", "index_b",
                                        "scale", "h", "workspace", "stream"};
    PyObject *o[10];
    linear_views views;
    memset(&views, 0, sizeof views);
    mos_linear_params p;
    double scale;
    void *stream;
    if (parse_args("linear_forward", args, nargs, kwnames, names, 10, 7, o) < 0) return NULL;
    if (mos_parse_double(o[6], "scale", &scale) < 0 || parse_stream(o[9], &stream) < 0) return NULL;
    mos_view *v = views.v;
    if (mos_view_import(o[1], "x", 2, &v[V_X], o[9]) < 0 ||
        mos_view_import(o[0], "y", 2, &v[V_Y], o[9]) < 0 ||
        mos_view_import(o[2], "pool_a", 2, &v[V_POOL_A], o[9]) < 0 ||
        mos_view_import(o[3], "index_a", 1, &v[V_INDEX_A], o[9]) < 0 ||
        mos_view_import(o[4], "pool_b", 2, &v[V_POOL_B], o[9]) < 0 ||
        mos_view_import(o[5], "index_b", 1, &v[V_INDEX_B], o[9]) < 0 ||
        mos_import_optional(o[7], "h", 2, &v[V_H], o[9]) < 0 ||
        mos_import_optional(o[8], "workspace", 1, &v[V_WORKSPACE], o[9]) < 0)
        goto fail;
    if (v[V_Y].kind != MOS_KIND_FLOAT) {
        PyErr_Format(PyExc_TypeError, "y: expected a floating-point tensor, got %s",
                     mos_view_kind_name(&v[V_Y]));
        goto fail;
    }
    if (check_adapter_inputs(&views, &p, v[V_Y].shape[1]) < 0) goto fail;
    if (check_matrix(&v[V_Y], &v[V_X], p.n_rows, p.d_out, 1) < 0) goto fail;
    if (check_h_and_workspace(&views, &p, MOS_OP_FORWARD, 1) < 0) goto fail;
    {
        mos_view *outs[] = {&v[V_Y], &v[V_H], &v[V_WORKSPACE]};
        mos_view *all[] = {&v[V_X], &v[V_POOL_A], &v[V_INDEX_A], &v[V_POOL_B], &v[V_INDEX_B],
                           &v[V_Y], &v[V_H], &v[V_WORKSPACE]};
        if (mos_require_no_overlap(outs, 3, all, 8) < 0) goto fail;
    }
    if (mos_require_finite_in(scale, p.dtype, "scale") < 0) goto fail;
    p.scale = scale;
    p.stream = stream;
    p.y = v[V_Y].data;
    p.y_stride = v[V_Y].strides[0];
    return run_linear(mos_linear_forward, &p, &views, "linear_forward");
fail:
    release_all(&views);
    return NULL;
}

/* ---------------------------------------------------------------- linear_forward_full */

static PyObject *linear_forward_full(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                     PyObject *kwnames) {
    static const char *const names[] = {"y", "x", "weight", "bias", "pool_a", "index_a",
                                        "pool_b", "index_b", "scale"};
    PyObject *o[9];
    linear_views views;
    memset(&views, 0, sizeof views);
    mos_linear_params p;
    double scale;
    if (parse_args("linear_forward_full", args, nargs, kwnames, names, 9, 9, o) < 0) return NULL;
    if (mos_parse_double(o[8], "scale", &scale) < 0) return NULL;
    mos_view *v = views.v;
    if (mos_view_import(o[1], "x", 2, &v[V_X], NULL) < 0 ||
        mos_view_import(o[0], "y", 2, &v[V_Y], NULL) < 0 ||
        mos_view_import(o[2], "weight", 2, &v[V_WEIGHT], NULL) < 0 ||
        mos_import_optional(o[3], "bias", 1, &v[V_BIAS], NULL) < 0 ||
        mos_view_import(o[4], "pool_a", 2, &v[V_POOL_A], NULL) < 0 ||
        mos_view_import(o[5], "index_a", 1, &v[V_INDEX_A], NULL) < 0 ||
        mos_view_import(o[6], "pool_b", 2, &v[V_POOL_B], NULL) < 0 ||
        mos_view_import(o[7], "index_b", 1, &v[V_INDEX_B], NULL) < 0)
        goto fail;
    if (v[V_Y].kind != MOS_KIND_FLOAT) {
        PyErr_Format(PyExc_TypeError, "y: expected a floating-point tensor, got %s",
                     mos_view_kind_name(&v[V_Y]));
        goto fail;
    }
    if (check_adapter_inputs(&views, &p, v[V_Y].shape[1]) < 0) goto fail;
    if (p.device != MOS_DEVICE_CPU) {
        PyErr_SetString(PyExc_BufferError, "x: linear_forward_full runs on CPU tensors only");
        goto fail;
    }
    if (check_matrix(&v[V_Y], &v[V_X], p.n_rows, p.d_out, 1) < 0) goto fail;
    if (check_matrix(&v[V_WEIGHT], &v[V_X], p.d_out, p.d_in, 0) < 0) goto fail;
    if (v[V_BIAS].owner) {
        if (mos_require_dtype(&v[V_BIAS], p.dtype, "x") < 0 ||
            mos_require_same_device(&v[V_BIAS], &v[V_X]) < 0 ||
            mos_require_dim(&v[V_BIAS], 0, p.d_out, "d_out") < 0 ||
            mos_require_contiguous(&v[V_BIAS]) < 0)
            goto fail;
    }
    {
        mos_view *outs[] = {&v[V_Y]};
        mos_view *all[] = {&v[V_X], &v[V_POOL_A], &v[V_INDEX_A], &v[V_POOL_B], &v[V_INDEX_B],
                           &v[V_Y], &v[V_WEIGHT], &v[V_BIAS]};
        if (mos_require_no_overlap(outs, 1, all, 8) < 0) goto fail;
    }
    if (mos_require_finite_in(scale, p.dtype, "scale") < 0) goto fail;
    p.scale = scale;
    p.y = v[V_Y].data;
    p.y_stride = v[V_Y].strides[0];
    p.weight = v[V_WEIGHT].data;
    p.weight_stride = v[V_WEIGHT].strides[0];
    p.bias = v[V_BIAS].data;
    return run_linear(mos_linear_forward_full, &p, &views, "linear_forward_full");
fail:
    release_all(&views);
    return NULL;
}

/* ---------------------------------------------------------------- linear_backward */

static PyObject *linear_backward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames) {
    static const char *const names[] = {"dx", "dpool_a", "dpool_b", "dy", "x", "pool_a",
                                        "index_a", "pool_b", "index_b", "scale", "h",
                                        "workspace", "stream"};
    PyObject *o[13];
    linear_views views;
    memset(&views, 0, sizeof views);
    mos_linear_params p;
    double scale;
    void *stream;
    if (parse_args("linear_backward", args, nargs, kwnames, names, 13, 10, o) < 0) return NULL;
    if (mos_parse_double(o[9], "scale", &scale) < 0 || parse_stream(o[12], &stream) < 0) return NULL;
    mos_view *v = views.v;
    if (mos_import_optional(o[0], "dx", 2, &v[V_DX], o[12]) < 0 ||
        mos_import_optional(o[1], "dpool_a", 2, &v[V_DPOOL_A], o[12]) < 0 ||
        mos_import_optional(o[2], "dpool_b", 2, &v[V_DPOOL_B], o[12]) < 0 ||
        mos_view_import(o[3], "dy", 2, &v[V_DY], o[12]) < 0 ||
        mos_view_import(o[4], "x", 2, &v[V_X], o[12]) < 0 ||
        mos_view_import(o[5], "pool_a", 2, &v[V_POOL_A], o[12]) < 0 ||
        mos_view_import(o[6], "index_a", 1, &v[V_INDEX_A], o[12]) < 0 ||
        mos_view_import(o[7], "pool_b", 2, &v[V_POOL_B], o[12]) < 0 ||
        mos_view_import(o[8], "index_b", 1, &v[V_INDEX_B], o[12]) < 0 ||
        mos_import_optional(o[10], "h", 2, &v[V_H], o[12]) < 0 ||
        mos_import_optional(o[11], "workspace", 1, &v[V_WORKSPACE], o[12]) < 0)
        goto fail;
    if (v[V_DY].kind != MOS_KIND_FLOAT) {
        PyErr_Format(PyExc_TypeError, "dy: expected a floating-point tensor, got %s",
                     mos_view_kind_name(&v[V_DY]));
        goto fail;
    }
    if (check_adapter_inputs(&views, &p, v[V_DY].shape[1]) < 0) goto fail;
    if (check_matrix(&v[V_DY], &v[V_X], p.n_rows, p.d_out, 0) < 0) goto fail;
    if (v[V_DX].owner && check_matrix(&v[V_DX], &v[V_X], p.n_rows, p.d_in, 1) < 0) goto fail;
    {
        mos_view *pools[] = {&v[V_POOL_A], &v[V_POOL_B]};
        mos_view *grads[] = {&v[V_DPOOL_A], &v[V_DPOOL_B]};
        mos_view *indices[] = {&v[V_INDEX_A], &v[V_INDEX_B]};
        for (int s = 0; s < 2; ++s) {
            if (!grads[s]->owner) continue;
            if (mos_require_dtype(grads[s], p.dtype, "x") < 0 ||
                mos_require_same_device(grads[s], &v[V_X]) < 0 ||
                mos_require_dim(grads[s], 0, pools[s]->shape[0], "pool rows") < 0 ||
                mos_require_dim(grads[s], 1, pools[s]->shape[1], "shard length") < 0 ||
                mos_require_contiguous(grads[s]) < 0 || mos_require_writable(grads[s]) < 0 ||
                mos_require_index_range(indices[s], pools[s], 1) < 0)
                goto fail;
        }
    }
    if (check_h_and_workspace(&views, &p, MOS_OP_BACKWARD, 0) < 0) goto fail;
    {
        mos_view *outs[] = {&v[V_DX], &v[V_DPOOL_A], &v[V_DPOOL_B], &v[V_WORKSPACE]};
        mos_view *all[] = {&v[V_X], &v[V_POOL_A], &v[V_INDEX_A], &v[V_POOL_B], &v[V_INDEX_B],
                           &v[V_DY], &v[V_H], &v[V_DX], &v[V_DPOOL_A], &v[V_DPOOL_B],
                           &v[V_WORKSPACE]};
        if (mos_require_no_overlap(outs, 4, all, 11) < 0) goto fail;
    }
    if (mos_require_finite_in(scale, p.dtype, "scale") < 0) goto fail;
    p.scale = scale;
    p.stream = stream;
    p.dy = v[V_DY].data;
    p.dy_stride = v[V_DY].strides[0];
    p.dx = v[V_DX].data;
    p.dx_stride = v[V_DX].owner ? v[V_DX].strides[0] : 0;
    p.dpool_a = v[V_DPOOL_A].data;
    p.dpool_b = v[V_DPOOL_B].data;
    return run_linear(mos_linear_backward, &p, &views, "linear_backward");
fail:
    release_all(&views);
    return NULL;
}

/* ---------------------------------------------------------------- assemble / scatter_add */

/* rows (n, shard_len) <-> pool (n_shards, shard_len) through index (n,). */
static PyObject *gather_op(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, int scatter) {
    const char *function = scatter ? "scatter_add" : "assemble";
    static const char *const gather_names[] = {"rows", "pool", "index", "stream"};
    static const char *const scatter_names[] = {"pool", "rows", "index", "stream"};
    PyObject *o[4];
    mos_view rows, pool, index;
    memset(&rows, 0, sizeof rows);
    memset(&pool, 0, sizeof pool);
    memset(&index, 0, sizeof index);
    void *stream;
    mos_status status;
    if (parse_args(function, args, nargs, kwnames, scatter ? scatter_names : gather_names, 4, 3, o) < 0)
        return NULL;
    PyObject *rows_obj = scatter ? o[1] : o[0], *pool_obj = scatter ? o[0] : o[1];
    if (parse_stream(o[3], &stream) < 0) return NULL;
    if (mos_view_import(rows_obj, "rows", 2, &rows, o[3]) < 0 ||
        mos_view_import(pool_obj, "pool", 2, &pool, o[3]) < 0 ||
        mos_view_import(o[2], "index", 1, &index, o[3]) < 0)
        goto fail;
    if (pool.kind != MOS_KIND_FLOAT) {
        PyErr_Format(PyExc_TypeError, "pool: expected a floating-point tensor, got %s",
                     mos_view_kind_name(&pool));
        goto fail;
    }
    if (mos_require_dtype(&rows, pool.dtype, "pool") < 0 || mos_require_contiguous(&pool) < 0 ||
        mos_require_index(&index) < 0 || mos_require_same_device(&rows, &pool) < 0 ||
        mos_require_same_device(&index, &pool) < 0 ||
        mos_require_dim(&rows, 0, index.shape[0], "one row per index") < 0 ||
        mos_require_dim(&rows, 1, pool.shape[1], "pool's shard length") < 0 || mos_require_rows(&rows) < 0 ||
        mos_require_writable(scatter ? &pool : &rows) < 0 ||
        mos_require_index_range(&index, &pool, scatter) < 0)
        goto fail;
    {
        mos_view *out = scatter ? &pool : &rows;
        mos_view *outs[] = {out};
        mos_view *all[] = {&rows, &pool, &index};
        if (mos_require_no_overlap(outs, 1, all, 3) < 0) goto fail;
    }
    mos_gather_params p = {
        .dtype = pool.dtype, .device = pool.device, .device_id = pool.device_id, .stream = stream,
        .rows = rows.data, .rows_stride = rows.strides[0], .pool = pool.data, .index = index.data,
        .n_index = index.shape[0], .n_shards = pool.shape[0], .shard_len = pool.shape[1]};
    Py_BEGIN_ALLOW_THREADS
    status = scatter ? mos_scatter_add(&p) : mos_assemble(&p);
    Py_END_ALLOW_THREADS
    mos_view_release(&rows);
    mos_view_release(&pool);
    mos_view_release(&index);
    if (status != MOS_OK) return mos_raise_status(status, function);
    Py_RETURN_NONE;
fail:
    mos_view_release(&rows);
    mos_view_release(&pool);
    mos_view_release(&index);
    return NULL;
}

static PyObject *assemble(PyObject *m, PyObject *const *a, Py_ssize_t n, PyObject *k) {
    return gather_op(a, n, k, 0);
}

static PyObject *scatter_add(PyObject *m, PyObject *const *a, Py_ssize_t n, PyObject *k) {
    return gather_op(a, n, k, 1);
}

/* ---------------------------------------------------------------- batched_forward (serving) */

enum { B_Y, B_X, B_POOL_A, B_INDEX_A, B_POOL_B, B_INDEX_B, B_SCALES, B_IDS, B_RANKS, B_SEGMENTS,
       B_WORKSPACE, B_COUNT };

static void release_views(mos_view *v, int n) {
    for (int i = 0; i < n; ++i) mos_view_release(&v[i]);
}

/* int32, contiguous, on x's device, of the given 1-D length (or 2-D shape when cols >= 0). */
static int check_int_table(mos_view *v, const mos_view *x, int64_t rows, int64_t cols,
                           const char *meaning) {
    if (mos_require_index(v) < 0 || mos_require_same_device(v, x) < 0) return -1;
    if (mos_require_dim(v, 0, rows, meaning) < 0) return -1;
    return cols >= 0 ? mos_require_dim(v, 1, cols, meaning) : 0;
}

/* CPU tables only: every entry of the (flattened) int32 view in [lo, hi). */
static int check_int_range(const mos_view *v, int64_t lo, int64_t hi, const char *what) {
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

/* CPU segments: 0 = s_0 <= s_1 <= ... <= s_S = N, and one adapter id per segment. */
static int check_segments(const mos_view *seg, const mos_view *ids, int64_t n_rows) {
    if (seg->device != MOS_DEVICE_CPU) return 0;
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

static PyObject *batched_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames) {
    static const char *const names[] = {"y", "x", "pool_a", "index_a", "pool_b", "index_b",
                                        "scales", "adapter_ids", "ranks", "grouped", "segments",
                                        "workspace", "stream"};
    enum { O_RANKS = 8, O_GROUPED = 9, O_SEGMENTS = 10, O_WORKSPACE = 11, O_STREAM = 12 };
    PyObject *o[13];
    mos_view v[B_COUNT];
    memset(v, 0, sizeof v);
    mos_batched_params p;
    memset(&p, 0, sizeof p);
    void *stream;
    int grouped = 0;
    mos_status status;
    if (parse_args("batched_forward", args, nargs, kwnames, names, 13, 8, o) < 0) return NULL;
    if (parse_stream(o[O_STREAM], &stream) < 0) return NULL;
    if (o[O_GROUPED] && (grouped = PyObject_IsTrue(o[O_GROUPED])) < 0) return NULL;
    PyObject *st = o[O_STREAM];
    if (mos_view_import(o[1], "x", 2, &v[B_X], st) < 0 ||
        mos_view_import(o[0], "y", 2, &v[B_Y], st) < 0 ||
        mos_view_import(o[2], "pool_a", 2, &v[B_POOL_A], st) < 0 ||
        mos_view_import(o[3], "index_a", 2, &v[B_INDEX_A], st) < 0 ||
        mos_view_import(o[4], "pool_b", 2, &v[B_POOL_B], st) < 0 ||
        mos_view_import(o[5], "index_b", 2, &v[B_INDEX_B], st) < 0 ||
        mos_view_import(o[6], "scales", 1, &v[B_SCALES], st) < 0 ||
        mos_view_import(o[7], "adapter_ids", 1, &v[B_IDS], st) < 0 ||
        mos_import_optional(o[O_RANKS], "ranks", 1, &v[B_RANKS], st) < 0 ||
        mos_import_optional(o[O_SEGMENTS], "segments", 1, &v[B_SEGMENTS], st) < 0 ||
        mos_import_optional(o[O_WORKSPACE], "workspace", 1, &v[B_WORKSPACE], st) < 0)
        goto fail;
    mos_view *x = &v[B_X], *y = &v[B_Y], *pa = &v[B_POOL_A], *pb = &v[B_POOL_B];
    mos_view *ia = &v[B_INDEX_A], *ib = &v[B_INDEX_B], *sc = &v[B_SCALES], *ids = &v[B_IDS];
    mos_view *ranks = &v[B_RANKS], *seg = &v[B_SEGMENTS], *ws = &v[B_WORKSPACE];
    if (x->kind != MOS_KIND_FLOAT) {
        PyErr_Format(PyExc_TypeError, "x: expected a floating-point tensor, got %s",
                     mos_view_kind_name(x));
        goto fail;
    }
    if (y->kind != MOS_KIND_FLOAT) {
        PyErr_Format(PyExc_TypeError, "y: expected a floating-point tensor, got %s",
                     mos_view_kind_name(y));
        goto fail;
    }
    if (mos_require_rows(x) < 0 || mos_require_blas_sizes(x) < 0) goto fail;
    const int64_t n_rows = x->shape[0], d_in = x->shape[1], d_out = y->shape[1];
    if (check_features(x, d_in, "d_in") < 0 || check_features(y, d_out, "d_out") < 0) goto fail;
    if (check_matrix(y, x, n_rows, d_out, 1) < 0) goto fail;
    /* Pools: x's dtype and device, contiguous; the A-pool's shard length fixes l. */
    if (mos_require_dtype(pa, x->dtype, "x") < 0 || mos_require_dtype(pb, x->dtype, "x") < 0 ||
        mos_require_contiguous(pa) < 0 || mos_require_contiguous(pb) < 0 ||
        mos_require_same_device(pa, x) < 0 || mos_require_same_device(pb, x) < 0 ||
        mos_require_blas_sizes(pa) < 0 || mos_require_blas_sizes(pb) < 0)
        goto fail;
    const int64_t sla = pa->shape[1];
    if (sla < 1 || d_in % sla != 0) {
        PyErr_Format(PyExc_ValueError, "pool_a: shard length %lld must divide x's d_in = %lld",
                     (long long)sla, (long long)d_in);
        goto fail;
    }
    const int64_t l = d_in / sla;
    if (check_d_out(y, pb, d_out, l) < 0) goto fail;
    /* Index tables (K, max_rank * l). */
    if (mos_require_index(ia) < 0 || mos_require_same_device(ia, x) < 0) goto fail;
    const int64_t n_adapters = ia->shape[0], width = ia->shape[1];
    if (width < 1 || width % l != 0) {
        PyErr_Format(PyExc_ValueError, "index_a: row length %lld must be a positive multiple of "
                     "shards_per_vector = %lld (max_rank * l)", (long long)width, (long long)l);
        goto fail;
    }
    if (check_int_table(ib, x, n_adapters, width, "index_b must have index_a's shape (K, max_rank * l)") < 0 ||
        check_int_range(ia, 0, pa->shape[0], " (rows of pool_a)") < 0 ||
        check_int_range(ib, 0, pb->shape[0], " (rows of pool_b)") < 0)
        goto fail;
    const int64_t max_rank = width / l;
    /* Per-adapter scales and ranks; per-row ids. */
    if (sc->kind != MOS_KIND_FLOAT || (sc->dtype != MOS_F32 && sc->dtype != MOS_F64)) {
        PyErr_Format(PyExc_TypeError, "scales: expected float32 or float64, got %s",
                     mos_view_kind_name(sc));
        goto fail;
    }
    if (mos_require_contiguous(sc) < 0 || mos_require_same_device(sc, x) < 0 ||
        mos_require_dim(sc, 0, n_adapters, "one scale per adapter (rows of index_a)") < 0)
        goto fail;
    if (sc->device == MOS_DEVICE_CPU) {
        for (int64_t a = 0; a < n_adapters; ++a) {
            const double s = sc->dtype == MOS_F64 ? ((const double *)sc->data)[a]
                                                  : (double)((const float *)sc->data)[a];
            if (!isfinite(s)) {
                char text[32];
                snprintf(text, sizeof text, "%g", s);
                PyErr_Format(PyExc_ValueError, "scales[%lld] = %s must be finite", (long long)a, text);
                goto fail;
            }
            if (!mos_is_finite_in(s, x->dtype)) {  /* the message is built only on failure */
                char what[40];
                snprintf(what, sizeof what, "scales[%lld]", (long long)a);
                mos_require_finite_in(s, x->dtype, what);
                goto fail;
            }
        }
    }
    if (check_int_table(ids, x, n_rows, -1, "one adapter id per row of x") < 0 ||
        check_int_range(ids, -1, n_adapters, " (-1 = base only, else a row of index_a)") < 0)
        goto fail;
    if (ranks->owner &&
        (check_int_table(ranks, x, n_adapters, -1, "one rank per adapter (rows of index_a)") < 0 ||
         check_int_range(ranks, 0, max_rank + 1, " (0 .. max_rank = index_a's row length / l)") < 0))
        goto fail;
    if (seg->owner) {
        if (!grouped) {
            PyErr_SetString(PyExc_ValueError,
                            "segments: only the grouped strategy uses segments; pass grouped=True");
            goto fail;
        }
        if (mos_require_index(seg) < 0 || mos_require_same_device(seg, x) < 0) goto fail;
        if (seg->shape[0] < 1) {
            PyErr_SetString(PyExc_ValueError, "segments: needs at least one entry (0 and N)");
            goto fail;
        }
        if (check_segments(seg, ids, n_rows) < 0) goto fail;
    }
    p.dtype = x->dtype;
    p.device = x->device;
    p.device_id = x->device_id;
    p.stream = stream;
    p.n_rows = n_rows;
    p.d_in = d_in;
    p.d_out = d_out;
    p.n_adapters = n_adapters;
    p.max_rank = max_rank;
    p.shards_per_vector = l;
    p.n_shards_a = pa->shape[0];
    p.n_shards_b = pb->shape[0];
    p.x = x->data;
    p.x_stride = x->strides[0];
    p.pool_a = pa->data;
    p.pool_b = pb->data;
    p.index_a = ia->data;
    p.index_b = ib->data;
    p.ranks = ranks->owner ? ranks->data : NULL;
    p.scales = sc->data;
    p.scales_dtype = sc->dtype;
    p.adapter_ids = ids->data;
    p.grouped = grouped;
    p.segments = seg->owner ? seg->data : NULL;
    p.n_segments = seg->owner ? seg->shape[0] - 1 : 0;
    p.y = y->data;
    p.y_stride = y->strides[0];
    if (ws->owner) {
        if (mos_require_same_device(ws, x) < 0 || mos_require_contiguous(ws) < 0 ||
            mos_require_writable(ws) < 0)
            goto fail;
        const size_t need = mos_batched_workspace_bytes(&p);
        const size_t have = (size_t)ws->shape[0] * ws->itemsize;
        if (have < need) {
            PyErr_Format(PyExc_ValueError, "workspace: holds %zu bytes, the call needs %zu "
                         "(batched_workspace_bytes)", have, need);
            goto fail;
        }
        if (((uintptr_t)ws->data) % 256 != 0) {
            PyErr_SetString(PyExc_ValueError, "workspace: must be 256-byte aligned");
            goto fail;
        }
        p.workspace = ws->data;
        p.workspace_bytes = have;
    } else if (x->device == MOS_DEVICE_CUDA) {
        PyErr_SetString(PyExc_ValueError, "workspace: CUDA calls need a caller-allocated "
                        "workspace (see batched_workspace_bytes)");
        goto fail;
    }
    {
        mos_view *outs[] = {y, ws};
        mos_view *all[] = {x, pa, ia, pb, ib, sc, ids, ranks, seg, y, ws};
        if (mos_require_no_overlap(outs, 2, all, 11) < 0) goto fail;
    }
    Py_BEGIN_ALLOW_THREADS
    status = mos_batched_forward(&p);
    Py_END_ALLOW_THREADS
    release_views(v, B_COUNT);
    if (status != MOS_OK) return mos_raise_status(status, "batched_forward");
    Py_RETURN_NONE;
fail:
    release_views(v, B_COUNT);
    return NULL;
}

/* Workspace sizes are products of these: keep every one far from size_t overflow. */
#define MOS_MAX_DIM INT32_MAX

/* itemsize of a float dtype the core knows: 2, 4 or 8 bytes. */
static int parse_itemsize(PyObject *obj, mos_dtype *dtype) {
    long long itemsize;
    if (mos_parse_int(obj, "itemsize", 2, 8, &itemsize) < 0) return -1;
    if (itemsize != 2 && itemsize != 4 && itemsize != 8) {
        PyErr_Format(PyExc_ValueError, "itemsize must be 2, 4 or 8, got %lld", itemsize);
        return -1;
    }
    *dtype = itemsize == 8 ? MOS_F64 : itemsize == 4 ? MOS_F32 : MOS_F16;
    return 0;
}

static int parse_flag(PyObject *obj, int *flag) {
    if (!obj) return 0;
    *flag = PyObject_IsTrue(obj);
    return *flag < 0 ? -1 : 0;
}

static PyObject *batched_workspace_bytes(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                         PyObject *kwnames) {
    static const char *const names[] = {"n_rows", "max_rank", "itemsize", "grouped"};
    PyObject *o[4];
    long long n, r;
    int grouped = 0;
    mos_dtype dtype;
    if (parse_args("batched_workspace_bytes", args, nargs, kwnames, names, 4, 3, o) < 0 ||
        mos_parse_int(o[0], "n_rows", 0, MOS_MAX_DIM, &n) < 0 ||
        mos_parse_int(o[1], "max_rank", 1, MOS_MAX_DIM / 64, &r) < 0 ||
        parse_itemsize(o[2], &dtype) < 0 || parse_flag(o[3], &grouped) < 0)
        return NULL;
    mos_batched_params p = {.dtype = dtype == MOS_F64 ? MOS_F64 : MOS_F32, .n_rows = n,
                            .max_rank = r, .grouped = grouped};
    return PyLong_FromSize_t(mos_batched_workspace_bytes(&p));
}

/* ---------------------------------------------------------------- pools and index tables */

/* The seven sizes of a pool (d_in ... private_rank) and subset_selection from objs[0..7];
 * the core checks their relations and names the field at fault. */
static int parse_shape(PyObject *const *objs, mos_pool_shape *s) {
    static const char *const fields[] = {"d_in", "d_out", "n_layers", "r", "equivalent_rank",
                                         "shards_per_vector", "private_rank"};
    long long v[7];
    int subset = 1;
    memset(s, 0, sizeof *s);
    for (int i = 0; i < 7; ++i)
        if (mos_parse_int(objs[i], fields[i], LLONG_MIN, LLONG_MAX, &v[i]) < 0) return -1;
    if (parse_flag(objs[7], &subset) < 0) return -1;
    *s = (mos_pool_shape){.d_in = v[0], .d_out = v[1], .n_layers = v[2], .rank = v[3],
                          .equivalent_rank = v[4], .shards_per_vector = v[5], .private_rank = v[6],
                          .subset_selection = subset};
    return 0;
}

static const char *const shape_names[] = {"d_in", "d_out", "n_layers", "r", "equivalent_rank",
                                          "shards_per_vector", "private_rank", "subset_selection",
                                          "seed", "pool_name", "layer", "side"};

static PyObject *pool_shape(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                            PyObject *kwnames) {
    PyObject *o[8];
    mos_pool_shape s;
    if (parse_args("pool_shape", args, nargs, kwnames, shape_names, 8, 7, o) < 0 ||
        parse_shape(o, &s) < 0)
        return NULL;
    mos_status status = mos_pool_shape_validate(&s);
    if (status != MOS_OK) {
        PyErr_SetString(PyExc_ValueError, mos_last_error());
        return NULL;
    }
    return Py_BuildValue("{sLsLsLsL}", "n_shards", (long long)s.n_shards, "n_public",
                         (long long)s.n_public, "shard_len_a", (long long)s.shard_len_a,
                         "shard_len_b", (long long)s.shard_len_b);
}

static PyObject *route_indices(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames) {
    PyObject *o[12];
    mos_pool_shape s;
    unsigned long long seed;
    const char *name;
    long long layer, side;
    if (parse_args("route_indices", args, nargs, kwnames, shape_names, 12, 12, o) < 0 ||
        parse_shape(o, &s) < 0 || mos_parse_u64(o[8], "seed", &seed) < 0 ||
        mos_parse_name(o[9], "pool_name", &name) < 0 ||
        mos_parse_int(o[10], "layer", LLONG_MIN, LLONG_MAX, &layer) < 0 ||
        mos_parse_int(o[11], "side", 0, 1, &side) < 0)
        return NULL;
    mos_pool_shape checked = s;
    if (mos_pool_shape_validate(&checked) != MOS_OK) {
        PyErr_SetString(PyExc_ValueError, mos_last_error());
        return NULL;
    }
    npy_intp length = (npy_intp)(s.rank * s.shards_per_vector);
    PyObject *out = PyArray_SimpleNew(1, &length, NPY_INT32);
    if (!out) return NULL;
    mos_status status = mos_route_indices(PyArray_DATA((PyArrayObject *)out), &s, seed, name,
                                          layer, (mos_side)side);
    if (status != MOS_OK) {
        Py_DECREF(out);
        return mos_raise_status(status, "route_indices");
    }
    return out;
}

static PyObject *route_key(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames) {
    static const char *const names[] = {"seed", "pool_name", "layer", "side"};
    PyObject *o[4];
    unsigned long long seed;
    const char *name;
    long long layer, side;
    if (parse_args("route_key", args, nargs, kwnames, names, 4, 4, o) < 0 ||
        mos_parse_u64(o[0], "seed", &seed) < 0 || mos_parse_name(o[1], "pool_name", &name) < 0 ||
        mos_parse_int(o[2], "layer", LLONG_MIN, LLONG_MAX, &layer) < 0 ||
        mos_parse_int(o[3], "side", INT_MIN, INT_MAX, &side) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(mos_route_key(seed, name, layer, (mos_side)side));
}

static PyObject *linear_workspace_bytes(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                        PyObject *kwnames) {
    static const char *const names[] = {"n_rows", "d_in", "d_out", "r", "itemsize", "backward",
                                        "with_h", "cuda"};
    PyObject *o[8];
    long long n, d_in, d_out, r;
    int backward = 0, with_h = 0, cuda = 0;
    mos_dtype dtype;
    if (parse_args("linear_workspace_bytes", args, nargs, kwnames, names, 8, 5, o) < 0 ||
        mos_parse_int(o[0], "n_rows", 0, MOS_MAX_DIM, &n) < 0 ||
        mos_parse_int(o[1], "d_in", 1, MOS_MAX_DIM, &d_in) < 0 ||
        mos_parse_int(o[2], "d_out", 1, MOS_MAX_DIM, &d_out) < 0 ||
        mos_parse_int(o[3], "r", 1, MOS_MAX_DIM, &r) < 0 || parse_itemsize(o[4], &dtype) < 0 ||
        parse_flag(o[5], &backward) < 0 || parse_flag(o[6], &with_h) < 0 || parse_flag(o[7], &cuda) < 0)
        return NULL;
    if ((double)r * (double)(d_in + d_out + 2 * n) * 16.0 > 0x1p62) {
        PyErr_Format(PyExc_ValueError, "r = %lld with d_in = %lld, d_out = %lld and n_rows = %lld "
                     "needs a workspace beyond 2**62 bytes", r, d_in, d_out, n);
        return NULL;
    }
    mos_linear_params p = {.dtype = dtype, .device = cuda ? MOS_DEVICE_CUDA : MOS_DEVICE_CPU,
                           .n_rows = n, .d_in = d_in, .d_out = d_out, .rank = r,
                           .h = with_h ? (void *)&p : NULL};
    return PyLong_FromSize_t(mos_linear_workspace_bytes(&p, backward ? MOS_OP_BACKWARD : MOS_OP_FORWARD));
}

static PyObject *build_info(PyObject *module, PyObject *unused) {
    return Py_BuildValue("{sOsssisi}", "cuda", mos_cuda_built() ? Py_True : Py_False, "blas",
                         "scipy-openblas32", "blas_threads", mos_cpu_get_num_threads(),
                         "sanitized",
#if defined(__SANITIZE_ADDRESS__)
                         1
#else
                         0
#endif
    );
}

static PyObject *set_num_threads(PyObject *module, PyObject *arg) {
    long long n;
    if (mos_parse_int(arg, "n", 1, INT_MAX, &n) < 0) return NULL;
    int previous = mos_cpu_get_num_threads();
    mos_cpu_set_num_threads((int)n);
    return PyLong_FromLong(previous);
}

/* ---------------------------------------------------------------- module definition */

#define FASTCALL (METH_FASTCALL | METH_KEYWORDS)

static PyMethodDef methods[] = {
    {"linear_forward", (PyCFunction)(void (*)(void))linear_forward, FASTCALL,
     "linear_forward(y, x, pool_a, index_a, pool_b, index_b, scale, h=None, workspace=None, "
     "stream=None)\n--\n\ny += scale * (x A^T) B^T with A, B gathered from the pools."},
    {"linear_forward_full", (PyCFunction)(void (*)(void))linear_forward_full, FASTCALL,
     "linear_forward_full(y, x, weight, bias, pool_a, index_a, pool_b, index_b, scale)\n--\n\n"
     "y = x W^T + bias + scale * (x A^T) B^T (CPU)."},
    {"linear_backward", (PyCFunction)(void (*)(void))linear_backward, FASTCALL,
     "linear_backward(dx, dpool_a, dpool_b, dy, x, pool_a, index_a, pool_b, index_b, scale, "
     "h=None, workspace=None, stream=None)\n--\n\nAccumulates dx and scatter-adds pool gradients."},
    {"batched_forward", (PyCFunction)(void (*)(void))batched_forward, FASTCALL,
     "batched_forward(y, x, pool_a, index_a, pool_b, index_b, scales, adapter_ids, ranks=None, "
     "grouped=False, segments=None, workspace=None, stream=None)\n--\n\n"
     "y[n] += scales[a] * (x[n] A_a^T) B_a^T with a = adapter_ids[n] (-1: row untouched); "
     "index_a/index_b are (K, max_rank * l) rows of the concatenated pools."},
    {"batched_workspace_bytes", (PyCFunction)(void (*)(void))batched_workspace_bytes, FASTCALL,
     "batched_workspace_bytes(n_rows, max_rank, itemsize, grouped=False)\n--\n\n"
     "Device workspace bytes a CUDA batched_forward call needs."},
    {"assemble", (PyCFunction)(void (*)(void))assemble, FASTCALL,
     "assemble(rows, pool, index, stream=None)\n--\n\nrows[i] = pool[index[i]]."},
    {"scatter_add", (PyCFunction)(void (*)(void))scatter_add, FASTCALL,
     "scatter_add(pool, rows, index, stream=None)\n--\n\npool[index[i]] += rows[i] (distinct indices)."},
    {"pool_shape", (PyCFunction)(void (*)(void))pool_shape, FASTCALL,
     "pool_shape(d_in, d_out, n_layers, r, equivalent_rank, shards_per_vector, private_rank, "
     "subset_selection=True)\n--\n\nValidates a pool's sizes; returns n_shards, n_public and shard lengths."},
    {"route_indices", (PyCFunction)(void (*)(void))route_indices, FASTCALL,
     "route_indices(d_in, d_out, n_layers, r, equivalent_rank, shards_per_vector, private_rank, "
     "subset_selection, seed, pool_name, layer, side)\n--\n\nThe int32 index table of one (pool, layer, side)."},
    {"route_key", (PyCFunction)(void (*)(void))route_key, FASTCALL, "route_key(seed, pool_name, layer, side)\n--\n\nThe PRNG key of one draw."},
    {"linear_workspace_bytes", (PyCFunction)(void (*)(void))linear_workspace_bytes, FASTCALL, "linear_workspace_bytes(n_rows, d_in, d_out, r, itemsize, backward=False, with_h=False, "
     "cuda=False)\n--\n\nWorkspace bytes a linear call needs (cuda=True: with cuBLAS's slice)."},
    {"build_info", build_info, METH_NOARGS, "How this extension was built."},
    {"set_num_threads", set_num_threads, METH_O, "Sets OpenBLAS's thread count; returns the old one."},
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *module) {
    if (PyArray_ImportNumPyAPI() < 0) return -1;
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, module_exec},
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, .m_name = "mos._C",
    .m_doc = "C core of mos (Mixture of Shards): pools, index tables and MoSLinear kernels.",
    .m_size = 0, .m_methods = methods, .m_slots = slots,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModuleDef_Init(&module_def); }
