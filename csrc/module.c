/*
 * module.c -- the CPython module mos._C: one entry point per op, each reading as the op's
 * contract (parse, import, check every tensor before any output is touched, run without the GIL,
 * turn the status into an exception), and the method table. Argument parsing lives in args.c,
 * tensor checks in validate.c. Multi-phase init; the module keeps no global mutable state.
 */
#define PY_ARRAY_UNIQUE_SYMBOL MOS_ARRAY_API
#include "args.h"
#include "cuda_binding.h"
#include "validate.h"

#include <limits.h>
#include <numpy/arrayobject.h>

/* Maps a failing mos_status plus mos_last_error() to a Python exception; returns NULL. */
static PyObject *raise_status(mos_status status, const char *function) {
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

static void release_views(mos_view *views, int n) {
    for (int i = 0; i < n; ++i) mos_view_release(&views[i]);
}

/* ---------------------------------------------------------------- linear ops: shared checks */

enum { V_X, V_POOL_A, V_INDEX_A, V_POOL_B, V_INDEX_B, V_Y, V_H, V_DY, V_DX, V_DPOOL_A, V_DPOOL_B,
       V_WEIGHT, V_BIAS, V_WORKSPACE, V_COUNT };

/* One linear call: its tensors and the params they fill. */
typedef struct {
    mos_view v[V_COUNT];
    mos_linear_params p;
} linear_call;

/* x, the pools and the index tables; derives the sizes into c->p. `out` (y or dy) gives d_out. */
static int check_adapter_inputs(linear_call *c, const mos_view *out) {
    mos_view *x = &c->v[V_X], *pa = &c->v[V_POOL_A], *pb = &c->v[V_POOL_B];
    mos_view *ia = &c->v[V_INDEX_A], *ib = &c->v[V_INDEX_B];
    if (mos_require_float(x) < 0 || mos_require_rows(x) < 0 || mos_require_blas_sizes(x) < 0)
        return -1;
    if (mos_require_dtype(pa, x->dtype, "x") < 0 || mos_require_dtype(pb, x->dtype, "x") < 0) return -1;
    if (mos_require_contiguous(pa) < 0 || mos_require_contiguous(pb) < 0) return -1;
    if (mos_require_index(ia) < 0 || mos_require_index(ib) < 0) return -1;
    mos_view *all[] = {pa, ia, pb, ib};
    for (int i = 0; i < 4; ++i)
        if (mos_require_same_device(all[i], x) < 0) return -1;
    const int64_t d_in = x->shape[1], d_out = out->shape[1], sla = pa->shape[1];
    if (mos_require_features(x, d_in, "d_in") < 0 || mos_require_features(out, d_out, "d_out") < 0)
        return -1;
    if (sla < 1 || d_in % sla != 0) {
        PyErr_Format(PyExc_ValueError,
                     "pool_a: shard length %lld must divide x's d_in = %lld", (long long)sla,
                     (long long)d_in);
        return -1;
    }
    const int64_t l = d_in / sla;
    if (mos_require_d_out(out, pb, d_out, l) < 0) return -1;
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
    c->p = (mos_linear_params){
        .dtype = x->dtype, .device = x->device, .device_id = x->device_id, .n_rows = x->shape[0],
        .d_in = d_in, .d_out = d_out, .rank = rl / l, .shards_per_vector = l,
        .n_shards_a = pa->shape[0], .n_shards_b = pb->shape[0], .x = x->data,
        .x_stride = x->strides[0], .pool_a = pa->data, .pool_b = pb->data, .index_a = ia->data,
        .index_b = ib->data};
    return 0;
}

/* Optional h (N, r), contiguous; written by forward, read by backward. */
static int check_h(linear_call *c, int h_is_output) {
    mos_view *h = &c->v[V_H], *x = &c->v[V_X];
    if (!h->data && !h->owner) return 0;
    if (mos_require_dtype(h, x->dtype, "x") < 0 || mos_require_same_device(h, x) < 0) return -1;
    if (mos_require_dim(h, 0, c->p.n_rows, "rows of x") < 0 ||
        mos_require_dim(h, 1, c->p.rank, "rank r") < 0 || mos_require_contiguous(h) < 0)
        return -1;
    if (h_is_output && mos_require_writable(h) < 0) return -1;
    c->p.h = h->data;
    if (!c->p.h && c->p.n_rows > 0) { PyErr_SetString(PyExc_BufferError, "h: no data"); return -1; }
    return 0;
}

static int check_linear_workspace(linear_call *c, mos_linear_op op) {
    return mos_require_workspace(&c->v[V_WORKSPACE], &c->v[V_X],
                                 mos_linear_workspace_bytes(&c->p, op), "linear_workspace_bytes",
                                 "", &c->p.workspace, &c->p.workspace_bytes);
}

/* Runs the op without the GIL when every check passed (`failed` is 0); releases the views. */
static PyObject *run_linear(mos_status (*op)(const mos_linear_params *), linear_call *c,
                            int failed, const char *function) {
    mos_status status = MOS_OK;
    failed = failed || mos_cuda_ready(c->p.device, function) < 0;
    if (!failed) {
        Py_BEGIN_ALLOW_THREADS
        status = op(&c->p);
        Py_END_ALLOW_THREADS
    }
    release_views(c->v, V_COUNT);
    if (failed) return NULL;
    if (status != MOS_OK) return raise_status(status, function);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- linear ops: entry points */

/* y += scale * (x A^T) B^T; h = x A^T when given. */
static PyObject *linear_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames) {
    static const char *const names[] = {"y", "x", "pool_a", "index_a", "pool_b", "index_b",
                                        "scale", "h", "workspace", "stream"};
    static const mos_tensor_arg tensors[] = {
        {1, V_X, "x", 2, 0}, {0, V_Y, "y", 2, 0}, {2, V_POOL_A, "pool_a", 2, 0},
        {3, V_INDEX_A, "index_a", 1, 0}, {4, V_POOL_B, "pool_b", 2, 0},
        {5, V_INDEX_B, "index_b", 1, 0}, {7, V_H, "h", 2, 1}, {8, V_WORKSPACE, "workspace", 1, 1}};
    static const int outs[] = {V_Y, V_H, V_WORKSPACE};
    static const int all[] = {V_X, V_POOL_A, V_INDEX_A, V_POOL_B, V_INDEX_B, V_Y, V_H, V_WORKSPACE};
    PyObject *o[10];
    linear_call c;
    memset(&c, 0, sizeof c);
    double scale;
    void *stream;
    if (mos_parse_args("linear_forward", args, nargs, kwnames, names, 10, 7, o) < 0 ||
        mos_parse_double(o[6], "scale", &scale) < 0 || mos_parse_stream(o[9], &stream) < 0)
        return NULL;
    mos_view *v = c.v;
    const int failed =
        mos_import_tensors(o, tensors, 8, v, o[9]) < 0 || mos_require_float(&v[V_Y]) < 0 ||
        check_adapter_inputs(&c, &v[V_Y]) < 0 ||
        mos_require_matrix(&v[V_Y], &v[V_X], c.p.n_rows, c.p.d_out, 1) < 0 ||
        check_h(&c, 1) < 0 || check_linear_workspace(&c, MOS_OP_FORWARD) < 0 ||
        mos_require_no_overlap(v, outs, 3, all, 8) < 0 ||
        mos_require_finite_in(scale, c.p.dtype, "scale") < 0;
    c.p.scale = scale;
    c.p.stream = stream;
    c.p.y = v[V_Y].data;
    c.p.y_stride = v[V_Y].strides[0];
    return run_linear(mos_linear_forward, &c, failed, "linear_forward");
}

/* y += scale * (x A^T) B^T on CPU, x (..., d_in) and y (..., d_out) with their leading
 * dimensions as rows: the inference path's one call per adapted layer, so it takes the base
 * layer's output and input as they are (no reshape, no h, no workspace, no stream). */
static PyObject *add_update(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                            PyObject *kwnames) {
    static const char *const names[] = {"y", "x", "pool_a", "index_a", "pool_b", "index_b", "scale"};
    static const mos_tensor_arg tensors[] = {
        {1, V_X, "x", MOS_NDIM_ROWS, 0}, {0, V_Y, "y", MOS_NDIM_ROWS, 0},
        {2, V_POOL_A, "pool_a", 2, 0}, {3, V_INDEX_A, "index_a", 1, 0},
        {4, V_POOL_B, "pool_b", 2, 0}, {5, V_INDEX_B, "index_b", 1, 0}};
    static const int outs[] = {V_Y};
    static const int all[] = {V_X, V_POOL_A, V_INDEX_A, V_POOL_B, V_INDEX_B, V_Y};
    PyObject *o[7];
    linear_call c;
    memset(&c, 0, sizeof c);
    double scale;
    if (mos_parse_args("add_update", args, nargs, kwnames, names, 7, 7, o) < 0 ||
        mos_parse_double(o[6], "scale", &scale) < 0)
        return NULL;
    mos_view *v = c.v;
    int failed = mos_import_tensors(o, tensors, 6, v, NULL) < 0;
    if (!failed && v[V_X].device != MOS_DEVICE_CPU) {
        PyErr_SetString(PyExc_BufferError, "x: add_update runs on CPU tensors only");
        failed = 1;
    }
    failed = failed || mos_require_float(&v[V_Y]) < 0 || check_adapter_inputs(&c, &v[V_Y]) < 0 ||
             mos_require_matrix(&v[V_Y], &v[V_X], c.p.n_rows, c.p.d_out, 1) < 0 ||
             mos_require_no_overlap(v, outs, 1, all, 6) < 0 ||
             mos_require_finite_in(scale, c.p.dtype, "scale") < 0;
    c.p.scale = scale;
    c.p.y = v[V_Y].data;
    c.p.y_stride = v[V_Y].strides[0];
    return run_linear(mos_linear_forward, &c, failed, "add_update");
}

/* Weight and bias (CPU): the base layer of y = x W^T + bias + scale * (x A^T) B^T. */
static int check_base_layer(linear_call *c) {
    mos_view *x = &c->v[V_X], *bias = &c->v[V_BIAS];
    if (c->p.device != MOS_DEVICE_CPU) {
        PyErr_SetString(PyExc_BufferError, "x: linear_forward_full runs on CPU tensors only");
        return -1;
    }
    if (mos_require_matrix(&c->v[V_Y], x, c->p.n_rows, c->p.d_out, 1) < 0 ||
        mos_require_matrix(&c->v[V_WEIGHT], x, c->p.d_out, c->p.d_in, 0) < 0)
        return -1;
    if (bias->owner && (mos_require_dtype(bias, c->p.dtype, "x") < 0 ||
                        mos_require_same_device(bias, x) < 0 ||
                        mos_require_dim(bias, 0, c->p.d_out, "d_out") < 0 ||
                        mos_require_contiguous(bias) < 0))
        return -1;
    c->p.weight = c->v[V_WEIGHT].data;
    c->p.weight_stride = c->v[V_WEIGHT].strides[0];
    c->p.bias = bias->data;
    return 0;
}

/* y = x W^T + bias + scale * (x A^T) B^T (CPU). */
static PyObject *linear_forward_full(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                     PyObject *kwnames) {
    static const char *const names[] = {"y", "x", "weight", "bias", "pool_a", "index_a",
                                        "pool_b", "index_b", "scale"};
    static const mos_tensor_arg tensors[] = {
        {1, V_X, "x", 2, 0}, {0, V_Y, "y", 2, 0}, {2, V_WEIGHT, "weight", 2, 0},
        {3, V_BIAS, "bias", 1, 1}, {4, V_POOL_A, "pool_a", 2, 0}, {5, V_INDEX_A, "index_a", 1, 0},
        {6, V_POOL_B, "pool_b", 2, 0}, {7, V_INDEX_B, "index_b", 1, 0}};
    static const int outs[] = {V_Y};
    static const int all[] = {V_X, V_POOL_A, V_INDEX_A, V_POOL_B, V_INDEX_B, V_Y, V_WEIGHT, V_BIAS};
    PyObject *o[9];
    linear_call c;
    memset(&c, 0, sizeof c);
    double scale;
    if (mos_parse_args("linear_forward_full", args, nargs, kwnames, names, 9, 9, o) < 0 ||
        mos_parse_double(o[8], "scale", &scale) < 0)
        return NULL;
    mos_view *v = c.v;
    const int failed =
        mos_import_tensors(o, tensors, 8, v, NULL) < 0 || mos_require_float(&v[V_Y]) < 0 ||
        check_adapter_inputs(&c, &v[V_Y]) < 0 || check_base_layer(&c) < 0 ||
        mos_require_no_overlap(v, outs, 1, all, 8) < 0 ||
        mos_require_finite_in(scale, c.p.dtype, "scale") < 0;
    c.p.scale = scale;
    c.p.y = v[V_Y].data;
    c.p.y_stride = v[V_Y].strides[0];
    return run_linear(mos_linear_forward_full, &c, failed, "linear_forward_full");
}

/* The optional gradients: dx like x, dpool_a / dpool_b like their pools, with distinct indices. */
static int check_gradients(linear_call *c) {
    mos_view *v = c->v;
    if (v[V_DX].owner && mos_require_matrix(&v[V_DX], &v[V_X], c->p.n_rows, c->p.d_in, 1) < 0)
        return -1;
    static const int pools[] = {V_POOL_A, V_POOL_B}, grads[] = {V_DPOOL_A, V_DPOOL_B},
                     indices[] = {V_INDEX_A, V_INDEX_B};
    for (int s = 0; s < 2; ++s) {
        mos_view *grad = &v[grads[s]], *pool = &v[pools[s]];
        if (!grad->owner) continue;
        if (mos_require_dtype(grad, c->p.dtype, "x") < 0 ||
            mos_require_same_device(grad, &v[V_X]) < 0 ||
            mos_require_dim(grad, 0, pool->shape[0], "pool rows") < 0 ||
            mos_require_dim(grad, 1, pool->shape[1], "shard length") < 0 ||
            mos_require_contiguous(grad) < 0 || mos_require_writable(grad) < 0 ||
            mos_require_index_range(&v[indices[s]], pool, 1) < 0)
            return -1;
    }
    c->p.dx = v[V_DX].data;
    c->p.dx_stride = v[V_DX].owner ? v[V_DX].strides[0] : 0;
    c->p.dpool_a = v[V_DPOOL_A].data;
    c->p.dpool_b = v[V_DPOOL_B].data;
    return 0;
}

/* dx += g A;  dpool_a[I_A] += g^T x;  dpool_b[I_B] += scale * h^T dy  (g = scale * dy B). */
static PyObject *linear_backward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames) {
    static const char *const names[] = {"dx", "dpool_a", "dpool_b", "dy", "x", "pool_a",
                                        "index_a", "pool_b", "index_b", "scale", "h",
                                        "workspace", "stream"};
    static const mos_tensor_arg tensors[] = {
        {0, V_DX, "dx", 2, 1}, {1, V_DPOOL_A, "dpool_a", 2, 1}, {2, V_DPOOL_B, "dpool_b", 2, 1},
        {3, V_DY, "dy", 2, 0}, {4, V_X, "x", 2, 0}, {5, V_POOL_A, "pool_a", 2, 0},
        {6, V_INDEX_A, "index_a", 1, 0}, {7, V_POOL_B, "pool_b", 2, 0},
        {8, V_INDEX_B, "index_b", 1, 0}, {10, V_H, "h", 2, 1}, {11, V_WORKSPACE, "workspace", 1, 1}};
    static const int outs[] = {V_DX, V_DPOOL_A, V_DPOOL_B, V_WORKSPACE};
    static const int all[] = {V_X, V_POOL_A, V_INDEX_A, V_POOL_B, V_INDEX_B, V_DY, V_H, V_DX,
                              V_DPOOL_A, V_DPOOL_B, V_WORKSPACE};
    PyObject *o[13];
    linear_call c;
    memset(&c, 0, sizeof c);
    double scale;
    void *stream;
    if (mos_parse_args("linear_backward", args, nargs, kwnames, names, 13, 10, o) < 0 ||
        mos_parse_double(o[9], "scale", &scale) < 0 || mos_parse_stream(o[12], &stream) < 0)
        return NULL;
    mos_view *v = c.v;
    const int failed =
        mos_import_tensors(o, tensors, 11, v, o[12]) < 0 || mos_require_float(&v[V_DY]) < 0 ||
        check_adapter_inputs(&c, &v[V_DY]) < 0 ||
        mos_require_matrix(&v[V_DY], &v[V_X], c.p.n_rows, c.p.d_out, 0) < 0 ||
        check_gradients(&c) < 0 || check_h(&c, 0) < 0 ||
        check_linear_workspace(&c, MOS_OP_BACKWARD) < 0 ||
        mos_require_no_overlap(v, outs, 4, all, 11) < 0 ||
        mos_require_finite_in(scale, c.p.dtype, "scale") < 0;
    c.p.scale = scale;
    c.p.stream = stream;
    c.p.dy = v[V_DY].data;
    c.p.dy_stride = v[V_DY].strides[0];
    return run_linear(mos_linear_backward, &c, failed, "linear_backward");
}

/* ---------------------------------------------------------------- assemble / scatter_add */

enum { G_ROWS, G_POOL, G_INDEX, G_COUNT };

/* rows (n, shard_len) <-> pool (n_shards, shard_len) through index (n,): assemble writes rows,
 * scatter_add adds into pool (distinct indices). */
static PyObject *gather_op(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, int scatter) {
    const char *function = scatter ? "scatter_add" : "assemble";
    static const char *const gather_names[] = {"rows", "pool", "index", "stream"};
    static const char *const scatter_names[] = {"pool", "rows", "index", "stream"};
    static const mos_tensor_arg gather_tensors[] = {
        {0, G_ROWS, "rows", 2, 0}, {1, G_POOL, "pool", 2, 0}, {2, G_INDEX, "index", 1, 0}};
    static const mos_tensor_arg scatter_tensors[] = {
        {1, G_ROWS, "rows", 2, 0}, {0, G_POOL, "pool", 2, 0}, {2, G_INDEX, "index", 1, 0}};
    static const int all[] = {G_ROWS, G_POOL, G_INDEX};
    const int outs[] = {scatter ? G_POOL : G_ROWS};
    PyObject *o[4];
    mos_view v[G_COUNT];
    memset(v, 0, sizeof v);
    void *stream;
    mos_status status = MOS_OK;
    if (mos_parse_args(function, args, nargs, kwnames, scatter ? scatter_names : gather_names, 4,
                       3, o) < 0 ||
        mos_parse_stream(o[3], &stream) < 0)
        return NULL;
    mos_view *rows = &v[G_ROWS], *pool = &v[G_POOL], *index = &v[G_INDEX];
    const int failed =
        mos_import_tensors(o, scatter ? scatter_tensors : gather_tensors, 3, v, o[3]) < 0 ||
        mos_require_float(pool) < 0 || mos_require_dtype(rows, pool->dtype, "pool") < 0 ||
        mos_require_contiguous(pool) < 0 || mos_require_index(index) < 0 ||
        mos_require_same_device(rows, pool) < 0 || mos_require_same_device(index, pool) < 0 ||
        mos_require_dim(rows, 0, index->shape[0], "one row per index") < 0 ||
        mos_require_dim(rows, 1, pool->shape[1], "pool's shard length") < 0 ||
        mos_require_rows(rows) < 0 || mos_require_writable(&v[outs[0]]) < 0 ||
        mos_require_index_range(index, pool, scatter) < 0 ||
        mos_require_no_overlap(v, outs, 1, all, 3) < 0 ||
        mos_cuda_ready(pool->device, function) < 0;
    if (!failed) {
        mos_gather_params p = {
            .dtype = pool->dtype, .device = pool->device, .device_id = pool->device_id,
            .stream = stream, .rows = rows->data, .rows_stride = rows->strides[0],
            .pool = pool->data, .index = index->data, .n_index = index->shape[0],
            .n_shards = pool->shape[0], .shard_len = pool->shape[1]};
        Py_BEGIN_ALLOW_THREADS
        status = scatter ? mos_scatter_add(&p) : mos_assemble(&p);
        Py_END_ALLOW_THREADS
    }
    release_views(v, G_COUNT);
    if (failed) return NULL;
    if (status != MOS_OK) return raise_status(status, function);
    Py_RETURN_NONE;
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

/* One batched call: its tensors and the params they fill. */
typedef struct {
    mos_view v[B_COUNT];
    mos_batched_params p;
} batched_call;

/* x and y (N, d_in) / (N, d_out); the concatenated pools of x's dtype, whose A shard length
 * fixes l. Fills the sizes and matrices of c->p. */
static int check_batched_matrices(batched_call *c) {
    mos_view *x = &c->v[B_X], *y = &c->v[B_Y], *pa = &c->v[B_POOL_A], *pb = &c->v[B_POOL_B];
    if (mos_require_float(x) < 0 || mos_require_float(y) < 0) return -1;
    if (mos_require_rows(x) < 0 || mos_require_blas_sizes(x) < 0) return -1;
    const int64_t n_rows = x->shape[0], d_in = x->shape[1], d_out = y->shape[1];
    if (mos_require_features(x, d_in, "d_in") < 0 || mos_require_features(y, d_out, "d_out") < 0 ||
        mos_require_matrix(y, x, n_rows, d_out, 1) < 0)
        return -1;
    if (mos_require_dtype(pa, x->dtype, "x") < 0 || mos_require_dtype(pb, x->dtype, "x") < 0 ||
        mos_require_contiguous(pa) < 0 || mos_require_contiguous(pb) < 0 ||
        mos_require_same_device(pa, x) < 0 || mos_require_same_device(pb, x) < 0 ||
        mos_require_blas_sizes(pa) < 0 || mos_require_blas_sizes(pb) < 0)
        return -1;
    const int64_t sla = pa->shape[1];
    if (sla < 1 || d_in % sla != 0) {
        PyErr_Format(PyExc_ValueError, "pool_a: shard length %lld must divide x's d_in = %lld",
                     (long long)sla, (long long)d_in);
        return -1;
    }
    if (mos_require_d_out(y, pb, d_out, d_in / sla) < 0) return -1;
    c->p = (mos_batched_params){
        .dtype = x->dtype, .device = x->device, .device_id = x->device_id, .stream = c->p.stream,
        .n_rows = n_rows, .d_in = d_in, .d_out = d_out, .shards_per_vector = d_in / sla,
        .n_shards_a = pa->shape[0], .n_shards_b = pb->shape[0], .x = x->data,
        .x_stride = x->strides[0], .pool_a = pa->data, .pool_b = pb->data, .y = y->data,
        .y_stride = y->strides[0]};
    return 0;
}

/* Index tables (K, max_rank * l) into the pools, and K finite scales. */
static int check_batched_adapters(batched_call *c) {
    mos_view *x = &c->v[B_X], *ia = &c->v[B_INDEX_A], *ib = &c->v[B_INDEX_B], *sc = &c->v[B_SCALES];
    const int64_t l = c->p.shards_per_vector;
    if (mos_require_index(ia) < 0 || mos_require_same_device(ia, x) < 0) return -1;
    const int64_t n_adapters = ia->shape[0], width = ia->shape[1];
    if (width < 1 || width % l != 0) {
        PyErr_Format(PyExc_ValueError, "index_a: row length %lld must be a positive multiple of "
                     "shards_per_vector = %lld (max_rank * l)", (long long)width, (long long)l);
        return -1;
    }
    if (mos_require_int_table(ib, x, n_adapters, width,
                              "index_b must have index_a's shape (K, max_rank * l)") < 0 ||
        mos_require_int_range(ia, 0, c->p.n_shards_a, " (rows of pool_a)") < 0 ||
        mos_require_int_range(ib, 0, c->p.n_shards_b, " (rows of pool_b)") < 0)
        return -1;
    if (mos_require_scales(sc, x, n_adapters) < 0) return -1;
    c->p.n_adapters = n_adapters;
    c->p.max_rank = width / l;
    c->p.index_a = ia->data;
    c->p.index_b = ib->data;
    c->p.scales = sc->data;
    c->p.scales_dtype = sc->dtype;
    return 0;
}

/* Per-row adapter ids, optional per-adapter ranks and optional segments (grouped only). */
static int check_batched_rows(batched_call *c, int grouped) {
    mos_view *x = &c->v[B_X], *ids = &c->v[B_IDS], *ranks = &c->v[B_RANKS], *seg = &c->v[B_SEGMENTS];
    const int64_t n_rows = c->p.n_rows, n_adapters = c->p.n_adapters;
    if (mos_require_int_table(ids, x, n_rows, -1, "one adapter id per row of x") < 0 ||
        mos_require_int_range(ids, -1, n_adapters, " (-1 = base only, else a row of index_a)") < 0)
        return -1;
    if (ranks->owner &&
        (mos_require_int_table(ranks, x, n_adapters, -1, "one rank per adapter (rows of index_a)") < 0 ||
         mos_require_int_range(ranks, 0, c->p.max_rank + 1,
                               " (0 .. max_rank = index_a's row length / l)") < 0))
        return -1;
    if (seg->owner && !grouped) {
        PyErr_SetString(PyExc_ValueError,
                        "segments: only the grouped strategy uses segments; pass grouped=True");
        return -1;
    }
    if (seg->owner && mos_require_segments(seg, ids, x) < 0) return -1;
    c->p.adapter_ids = ids->data;
    c->p.ranks = ranks->owner ? ranks->data : NULL;
    c->p.grouped = grouped;
    c->p.segments = seg->owner ? seg->data : NULL;
    c->p.n_segments = seg->owner ? seg->shape[0] - 1 : 0;
    return 0;
}

/* y[n] += scales[a] * (x[n] A_a^T) B_a^T with a = adapter_ids[n] (-1: row untouched). */
static PyObject *batched_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames) {
    static const char *const names[] = {"y", "x", "pool_a", "index_a", "pool_b", "index_b",
                                        "scales", "adapter_ids", "ranks", "grouped", "segments",
                                        "workspace", "stream"};
    static const mos_tensor_arg tensors[] = {
        {1, B_X, "x", 2, 0}, {0, B_Y, "y", 2, 0}, {2, B_POOL_A, "pool_a", 2, 0},
        {3, B_INDEX_A, "index_a", 2, 0}, {4, B_POOL_B, "pool_b", 2, 0},
        {5, B_INDEX_B, "index_b", 2, 0}, {6, B_SCALES, "scales", 1, 0},
        {7, B_IDS, "adapter_ids", 1, 0}, {8, B_RANKS, "ranks", 1, 1},
        {10, B_SEGMENTS, "segments", 1, 1}, {11, B_WORKSPACE, "workspace", 1, 1}};
    static const int outs[] = {B_Y, B_WORKSPACE};
    static const int all[] = {B_X, B_POOL_A, B_INDEX_A, B_POOL_B, B_INDEX_B, B_SCALES, B_IDS,
                              B_RANKS, B_SEGMENTS, B_Y, B_WORKSPACE};
    PyObject *o[13];
    batched_call c;
    memset(&c, 0, sizeof c);
    void *stream;
    int grouped = 0;
    mos_status status = MOS_OK;
    if (mos_parse_args("batched_forward", args, nargs, kwnames, names, 13, 8, o) < 0 ||
        mos_parse_stream(o[12], &stream) < 0 || mos_parse_flag(o[9], &grouped) < 0)
        return NULL;
    mos_view *v = c.v;
    c.p.stream = stream;
    const int failed =
        mos_import_tensors(o, tensors, 11, v, o[12]) < 0 || check_batched_matrices(&c) < 0 ||
        check_batched_adapters(&c) < 0 || check_batched_rows(&c, grouped) < 0 ||
        mos_require_workspace(&v[B_WORKSPACE], &v[B_X], mos_batched_workspace_bytes(&c.p),
                              "batched_workspace_bytes", " (batched_workspace_bytes)",
                              &c.p.workspace, &c.p.workspace_bytes) < 0 ||
        mos_require_no_overlap(v, outs, 2, all, 11) < 0 ||
        mos_cuda_ready(c.p.device, "batched_forward") < 0;
    if (!failed) {
        Py_BEGIN_ALLOW_THREADS
        status = mos_batched_forward(&c.p);
        Py_END_ALLOW_THREADS
    }
    release_views(v, B_COUNT);
    if (failed) return NULL;
    if (status != MOS_OK) return raise_status(status, "batched_forward");
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- workspace sizes */

static PyObject *batched_workspace_bytes(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                         PyObject *kwnames) {
    static const char *const names[] = {"n_rows", "max_rank", "itemsize", "grouped"};
    PyObject *o[4];
    long long n, r;
    int grouped = 0;
    mos_dtype dtype;
    if (mos_parse_args("batched_workspace_bytes", args, nargs, kwnames, names, 4, 3, o) < 0 ||
        mos_parse_int(o[0], "n_rows", 0, MOS_MAX_DIM, &n) < 0 ||
        mos_parse_int(o[1], "max_rank", 1, MOS_MAX_DIM / 64, &r) < 0 ||
        mos_parse_itemsize(o[2], &dtype) < 0 || mos_parse_flag(o[3], &grouped) < 0)
        return NULL;
    mos_batched_params p = {.dtype = dtype == MOS_F64 ? MOS_F64 : MOS_F32, .n_rows = n,
                            .max_rank = r, .grouped = grouped};
    return PyLong_FromSize_t(mos_batched_workspace_bytes(&p));
}

/* ---------------------------------------------------------------- pools and index tables */

static const char *const shape_names[] = {"d_in", "d_out", "n_layers", "r", "equivalent_rank",
                                          "shards_per_vector", "private_rank", "subset_selection",
                                          "seed", "pool_name", "layer", "side"};

static PyObject *pool_shape(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                            PyObject *kwnames) {
    PyObject *o[8];
    mos_pool_shape s;
    if (mos_parse_args("pool_shape", args, nargs, kwnames, shape_names, 8, 7, o) < 0 ||
        mos_parse_pool_shape(o, &s) < 0)
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
    if (mos_parse_args("route_indices", args, nargs, kwnames, shape_names, 12, 12, o) < 0 ||
        mos_parse_pool_shape(o, &s) < 0 || mos_parse_u64(o[8], "seed", &seed) < 0 ||
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
        return raise_status(status, "route_indices");
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
    if (mos_parse_args("route_key", args, nargs, kwnames, names, 4, 4, o) < 0 ||
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
    if (mos_parse_args("linear_workspace_bytes", args, nargs, kwnames, names, 8, 5, o) < 0 ||
        mos_parse_int(o[0], "n_rows", 0, MOS_MAX_DIM, &n) < 0 ||
        mos_parse_int(o[1], "d_in", 1, MOS_MAX_DIM, &d_in) < 0 ||
        mos_parse_int(o[2], "d_out", 1, MOS_MAX_DIM, &d_out) < 0 ||
        mos_parse_int(o[3], "r", 1, MOS_MAX_DIM, &r) < 0 || mos_parse_itemsize(o[4], &dtype) < 0 ||
        mos_parse_flag(o[5], &backward) < 0 || mos_parse_flag(o[6], &with_h) < 0 || mos_parse_flag(o[7], &cuda) < 0)
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
    PyObject *backend = mos_cuda_backend_dict(0);
    if (!backend) return NULL;
    return Py_BuildValue("{sOsNsssisi}", "cuda", mos_cuda_built() ? Py_True : Py_False,
                         "cuda_backend", backend, "blas", "scipy-openblas32", "blas_threads",
                         mos_cpu_get_num_threads(), "sanitized",
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

static PyObject *cpu_linear_chunks(PyObject *module, PyObject *arg) {
    long long n;
    if (mos_parse_int(arg, "n_rows", 0, MOS_MAX_DIM, &n) < 0) return NULL;
    return PyLong_FromLong(mos_cpu_linear_chunks(n));
}

/* ---------------------------------------------------------------- module definition */

/* A fastcall method with keywords: {name, function, flags, docstring}. */
#define FASTCALL(name, doc) \
    {#name, (PyCFunction)(void (*)(void))name, METH_FASTCALL | METH_KEYWORDS, doc}

static PyMethodDef methods[] = {
    FASTCALL(linear_forward, "linear_forward(y, x, pool_a, index_a, pool_b, index_b, scale, "
             "h=None, workspace=None, stream=None)\n--\n\n"
             "y += scale * (x A^T) B^T with A, B gathered from the pools."),
    FASTCALL(add_update, "add_update(y, x, pool_a, index_a, pool_b, index_b, scale)\n--\n\n"
             "y += scale * (x A^T) B^T on CPU; x (..., d_in) and y (..., d_out) keep their leading "
             "dimensions, which are rows."),
    FASTCALL(linear_forward_full, "linear_forward_full(y, x, weight, bias, pool_a, index_a, "
             "pool_b, index_b, scale)\n--\n\ny = x W^T + bias + scale * (x A^T) B^T (CPU)."),
    FASTCALL(linear_backward, "linear_backward(dx, dpool_a, dpool_b, dy, x, pool_a, index_a, "
             "pool_b, index_b, scale, h=None, workspace=None, stream=None)\n--\n\n"
             "Accumulates dx and scatter-adds pool gradients."),
    FASTCALL(batched_forward, "batched_forward(y, x, pool_a, index_a, pool_b, index_b, scales, "
             "adapter_ids, ranks=None, grouped=False, segments=None, workspace=None, "
             "stream=None)\n--\n\ny[n] += scales[a] * (x[n] A_a^T) B_a^T with a = adapter_ids[n] "
             "(-1: row untouched); index_a/index_b are (K, max_rank * l) rows of the concatenated "
             "pools."),
    FASTCALL(batched_workspace_bytes, "batched_workspace_bytes(n_rows, max_rank, itemsize, "
             "grouped=False)\n--\n\nDevice workspace bytes a CUDA batched_forward call needs."),
    FASTCALL(assemble, "assemble(rows, pool, index, stream=None)\n--\n\nrows[i] = pool[index[i]]."),
    FASTCALL(scatter_add, "scatter_add(pool, rows, index, stream=None)\n--\n\n"
             "pool[index[i]] += rows[i] (distinct indices)."),
    FASTCALL(pool_shape, "pool_shape(d_in, d_out, n_layers, r, equivalent_rank, shards_per_vector, "
             "private_rank, subset_selection=True)\n--\n\n"
             "Validates a pool's sizes; returns n_shards, n_public and shard lengths."),
    FASTCALL(route_indices, "route_indices(d_in, d_out, n_layers, r, equivalent_rank, "
             "shards_per_vector, private_rank, subset_selection, seed, pool_name, layer, side)"
             "\n--\n\nThe int32 index table of one (pool, layer, side)."),
    FASTCALL(route_key, "route_key(seed, pool_name, layer, side)\n--\n\nThe PRNG key of one draw."),
    FASTCALL(linear_workspace_bytes, "linear_workspace_bytes(n_rows, d_in, d_out, r, itemsize, "
             "backward=False, with_h=False, cuda=False)\n--\n\n"
             "Workspace bytes a linear call needs (cuda=True: with cuBLAS's slice)."),
    {"build_info", build_info, METH_NOARGS, "How this extension was built."},
    {"cuda_backend", mos_py_cuda_backend, METH_NOARGS,
     "Opens the CUDA back end if it is not open yet and says what it runs with; RuntimeError "
     "naming what is missing when it cannot open."},
    {"cuda_blas_handles", mos_py_cuda_blas_handles, METH_NOARGS,
     "cuBLAS handles created so far (kept for the process's lifetime) and how many are free in "
     "the per-device pools."},
    {"set_num_threads", set_num_threads, METH_O, "Sets OpenBLAS's thread count; returns the old one."},
    {"cpu_linear_chunks", cpu_linear_chunks, METH_O,
     "How many row chunks a CPU linear call of n_rows rows runs as now: one per thread of the "
     "process's OpenMP team (torch.set_num_threads sizes it), at least 32 rows each; 1 when no "
     "OpenMP runtime is loaded or OpenBLAS runs threads of its own."},
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
