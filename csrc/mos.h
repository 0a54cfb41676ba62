/*
 * mos.h -- the one public header of the MoS (Mixture of Shards) core.
 *
 * Conventions (apply to every entry point below):
 *   - Outputs first, then inputs, then sizes; everything travels in a params struct.
 *   - Matrices are row-major with an explicit row stride in *elements*; the column stride is 1.
 *   - Shard pools are contiguous (n_shards, shard_len) row-major; a layer's index table is
 *     rank * shards_per_vector int32 row numbers into its pool.
 *   - Forward accumulates into y; backward accumulates into dx, dpool_a and dpool_b.
 *   - Every function returns a mos_status; on failure mos_last_error() holds a message
 *     (thread-local) and no output has been written. The one exception is a failure of the CUDA
 *     device itself: a CUDA op runs every step that can refuse its arguments before its first
 *     write to an output, and writes last (forward: h, then y; backward: dx, then the scatters
 *     into dpool_a and dpool_b). Should the device fail between two of those writes (a sticky
 *     CUDA error, after which the CUDA context is unusable), the earlier ones stay written.
 *     CUDA work is asynchronous: MOS_OK means it was enqueued on the stream.
 *   - All tensors of one call share one dtype and one device.
 *   - The core never allocates on the CUDA hot path: callers pass a workspace of at least
 *     mos_linear_workspace_bytes() bytes (CPU callers may pass NULL and let the core malloc).
 */
#ifndef MOS_H
#define MOS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes: MOS_OK or the Python exception class the binding maps the failure to. */
typedef enum {
    MOS_OK = 0,
    MOS_ERR_VALUE = 1,   /* bad sizes, indices or configuration -> ValueError */
    MOS_ERR_TYPE = 2,    /* unsupported dtype -> TypeError */
    MOS_ERR_BUFFER = 3,  /* strides, writability, device, overlap -> BufferError */
    MOS_ERR_NOMEM = 4,   /* allocation failed -> MemoryError */
    MOS_ERR_CUDA = 5,    /* CUDA or cuBLAS failure -> RuntimeError with the CUDA string */
    MOS_ERR_RUNTIME = 6  /* anything else, e.g. CUDA path not built -> RuntimeError */
} mos_status;

/* Element types; values match nothing external, the binding maps DLPack codes onto them. */
typedef enum { MOS_F32 = 0, MOS_F64 = 1, MOS_F16 = 2, MOS_BF16 = 3 } mos_dtype;

/* Where the data of a call lives. */
typedef enum { MOS_DEVICE_CPU = 0, MOS_DEVICE_CUDA = 1 } mos_device_kind;

/* Pool sides, used to derive independent index draws for A and B. */
typedef enum { MOS_SIDE_A = 0, MOS_SIDE_B = 1 } mos_side;

/* ---------------------------------------------------------------- errors */

/* The message of the last failure on the calling thread ("" if none). */
const char *mos_last_error(void);

/* Records a printf-style message for the calling thread and returns `status`. */
mos_status mos_set_error(mos_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Size in bytes of one element of `dtype` (0 for an unknown dtype). */
size_t mos_dtype_size(mos_dtype dtype);

/* Short name of `dtype` ("float32", ...), for messages. */
const char *mos_dtype_name(mos_dtype dtype);

/* ---------------------------------------------------------------- index tables (routes.c) */

/* Shape of one shard pool (one module type) and the adapter settings that size it. */
typedef struct {
    int64_t d_in;              /* input features of every layer of this type */
    int64_t d_out;             /* output features */
    int64_t n_layers;          /* L: layers sharing the pool */
    int64_t rank;              /* r: forward rank of every layer */
    int64_t equivalent_rank;   /* R_e: parameter budget in LoRA-rank units */
    int64_t shards_per_vector; /* l */
    int64_t private_rank;      /* p */
    int subset_selection;      /* 0: every layer takes all public rows in order */
    /* Derived by mos_pool_shape_validate: */
    int64_t n_shards;          /* N = R_e * L * l rows per pool */
    int64_t n_public;          /* N_pub = (R_e - p) * L * l */
    int64_t shard_len_a;       /* d_in / l */
    int64_t shard_len_b;       /* d_out / l */
} mos_pool_shape;

/* Checks the bounds of docs/design.md and fills the derived fields; the message names the field. */
mos_status mos_pool_shape_validate(mos_pool_shape *shape);

/* Writes the rank * l indices of (layer, side) into out: a portable draw of (r - p) * l public rows
 * without replacement (or all public rows in order when subset_selection is 0), then the layer's
 * p * l private rows. A pure function of (seed, pool_name, layer, side) and the shape. */
mos_status mos_route_indices(int32_t *out, const mos_pool_shape *shape, uint64_t seed,
                             const char *pool_name, int64_t layer, mos_side side);

/* The 64-bit key every draw of (seed, pool_name, layer, side) starts from (documented in routes.c). */
uint64_t mos_route_key(uint64_t seed, const char *pool_name, int64_t layer, mos_side side);

/* ---------------------------------------------------------------- ops (ops.c -> cpu.c / cuda/) */

/* One gather or scatter between a pool and a block of rows. assemble writes `rows`,
 * scatter_add writes `pool`; the other side is read. */
typedef struct {
    mos_dtype dtype;
    mos_device_kind device;
    int device_id;             /* CUDA ordinal of every tensor of the call (0 on CPU) */
    void *stream;              /* cudaStream_t for CUDA calls, ignored on CPU */
    void *rows;                /* (n_index, shard_len), row stride rows_stride elements */
    int64_t rows_stride;
    void *pool;                /* (n_shards, shard_len) contiguous */
    const int32_t *index;      /* (n_index,) rows of pool, each in [0, n_shards) */
    int64_t n_index;
    int64_t n_shards;
    int64_t shard_len;
} mos_gather_params;

/* rows[i, :] = pool[index[i], :]  (vector sharding: r*l shards viewed as r rows of l*shard_len). */
mos_status mos_assemble(const mos_gather_params *p);

/* pool[index[i], :] += rows[i, :]  (the transpose of assemble; indices must be distinct). */
mos_status mos_scatter_add(const mos_gather_params *p);

/* Everything one MoSLinear call needs. Unused pointers are NULL. */
typedef struct {
    mos_dtype dtype;
    mos_device_kind device;
    int device_id;             /* CUDA ordinal of every tensor of the call (0 on CPU) */
    void *stream;              /* cudaStream_t for CUDA calls, ignored on CPU */
    int64_t n_rows;            /* N: rows of x (may be 0) */
    int64_t d_in, d_out;
    int64_t rank;              /* r */
    int64_t shards_per_vector; /* l */
    int64_t n_shards_a;        /* rows of pool_a */
    int64_t n_shards_b;        /* rows of pool_b */
    double scale;              /* s = lora_alpha / r (or / sqrt(r)) */

    const void *x;             /* (N, d_in), row stride x_stride: the adapter's input */
    int64_t x_stride;
    const void *pool_a;        /* (n_shards_a, d_in / l) contiguous */
    const void *pool_b;        /* (n_shards_b, d_out / l) contiguous */
    const int32_t *index_a;    /* (r * l,) distinct rows of pool_a */
    const int32_t *index_b;    /* (r * l,) distinct rows of pool_b */

    /* Optional base layer (mos_linear_forward_full only). */
    const void *weight;        /* W0: (d_out, d_in), row stride weight_stride */
    int64_t weight_stride;
    const void *bias;          /* (d_out,) contiguous, or NULL */

    /* Forward output. */
    void *y;                   /* (N, d_out), row stride y_stride; forward adds into it */
    int64_t y_stride;
    void *h;                   /* optional (N, r) contiguous: forward stores x A^T, backward reads it */

    /* Backward inputs/outputs. */
    const void *dy;            /* (N, d_out), row stride dy_stride */
    int64_t dy_stride;
    void *dx;                  /* (N, d_in), row stride dx_stride, accumulated; NULL to skip */
    int64_t dx_stride;
    void *dpool_a;             /* like pool_a, accumulated; NULL to skip */
    void *dpool_b;             /* like pool_b, accumulated; NULL to skip */

    void *workspace;           /* >= mos_linear_workspace_bytes(); NULL lets the CPU path malloc */
    size_t workspace_bytes;
} mos_linear_params;

/* Which op a workspace is sized for. */
typedef enum { MOS_OP_FORWARD = 0, MOS_OP_BACKWARD = 1 } mos_linear_op;

/* Bytes of the workspace slice a CUDA linear call hands to cuBLAS (cublasSetWorkspace): NVIDIA's
 * recommended size for Hopper (32 MiB; 4 MiB before it). cublasSetStream resets a handle to
 * cuBLAS's own pool, which may allocate; with this slice no GEMM allocates, so calls can be
 * captured in CUDA graphs and one handle can serve several streams. */
#define MOS_CUBLAS_WORKSPACE_BYTES ((size_t)32 << 20)

/* Every workspace, and every segment carved from it, starts on this many bytes (workspace.c). */
#define MOS_WORKSPACE_ALIGN 256

/* Segments of a linear workspace: a, bt, h, g, da, dbt and the cuBLAS slice. */
#define MOS_WORKSPACE_SEGMENTS 7

/* Bytes of scratch the op needs for these sizes (A, B^T, h and gradients of A, B^T) on
 * p->device (CUDA adds MOS_CUBLAS_WORKSPACE_BYTES for cuBLAS). */
size_t mos_linear_workspace_bytes(const mos_linear_params *p, mos_linear_op op);

/* The workspace cut into its segments; each holds max(4, dtype size)-byte elements so a
 * back end may keep float32 intermediates for 16-bit inputs. Unused segments are NULL. */
typedef struct {
    void *a;    /* (r, d_in): assembled A */
    void *bt;   /* (r, d_out): assembled B^T */
    void *h;    /* (N, r): x A^T, when the caller gives no h */
    void *g;    /* (N, r): scale * dy B (backward) */
    void *da;   /* (r, d_in): gradient of A before the scatter (backward) */
    void *dbt;  /* (r, d_out): gradient of B^T before the scatter (backward) */
    void *blas; /* CUDA only: cuBLAS's workspace, blas_bytes long (aligned like every segment) */
    size_t blas_bytes;
} mos_workspace_layout;

/* Cuts `base` (bytes long, MOS_WORKSPACE_ALIGN-aligned) into the segments `op` needs. */
mos_status mos_workspace_carve(mos_workspace_layout *w, const mos_linear_params *p,
                               mos_linear_op op, void *base, size_t bytes);

/* y += scale * (x A^T) B^T; also stores h = x A^T when p->h is set. */
mos_status mos_linear_forward(const mos_linear_params *p);

/* y = x W0^T + bias + scale * (x A^T) B^T, for callers without a framework (CPU). */
mos_status mos_linear_forward_full(const mos_linear_params *p);

/* With g = scale * dy B:  dx += g A;  dpool_a[I_A] += g^T x;  dpool_b[I_B] += scale * h^T dy
 * (h read from p->h when set, else recomputed). */
mos_status mos_linear_backward(const mos_linear_params *p);

/* ---------------------------------------------------------------- serving (serving.c / cuda/serving.cu) */

/* Many adapters of one module type and one layer in one call (serving):
 *   for every row n with a = adapter_ids[n] >= 0:  y[n] += scales[a] * (x[n] A_a^T) B_a^T
 * Layout: the K adapters' pools are concatenated into one A-pool and one B-pool of one shard
 * length, d / l (adapters with other l go to another call, or are re-expressed at granularity l
 * when l' divides l: an (N, d/l') pool is the (N l/l', d/l) pool, each index e becomes
 * e l/l' + 0 .. l/l' - 1).
 * index_a / index_b are (K, max_rank * l) row-major, already offset into the concatenated pools;
 * adapter a uses the first ranks[a] * l entries of its row (all max_rank * l when ranks is NULL).
 * Strategies (same numbers, different cost):
 *   per-row (grouped = 0): every row reads its adapter's shards directly (Punica BGMV; decode).
 *   grouped (grouped = 1): rows are processed in groups of one adapter whose shards are gathered
 *     once per group (Punica SGMV; prefill). On CPU the groups are the given segments (row
 *     offsets; every row of a segment has the same id), else all rows of each adapter (counting
 *     sort). On CUDA they are the runs of equal consecutive ids, found on the device and cut
 *     further at every given segment offset (device segments need no validation). */
typedef struct {
    mos_dtype dtype;
    mos_device_kind device;
    int device_id;             /* CUDA ordinal of every tensor of the call (0 on CPU) */
    void *stream;              /* cudaStream_t for CUDA calls, ignored on CPU */
    int64_t n_rows;            /* N: rows of x (may be 0) */
    int64_t d_in, d_out;
    int64_t n_adapters;        /* K (may be 0 when every id is -1) */
    int64_t max_rank;          /* r_max: index tables hold max_rank * l entries per adapter */
    int64_t shards_per_vector; /* l: common shard granularity of the concatenated pools */
    int64_t n_shards_a;        /* rows of pool_a */
    int64_t n_shards_b;        /* rows of pool_b */

    const void *x;             /* (N, d_in), row stride x_stride */
    int64_t x_stride;
    const void *pool_a;        /* (n_shards_a, d_in / l) contiguous: every adapter's A-pool */
    const void *pool_b;        /* (n_shards_b, d_out / l) contiguous: every adapter's B-pool */
    const int32_t *index_a;    /* (K, max_rank * l) contiguous rows of pool_a */
    const int32_t *index_b;    /* (K, max_rank * l) contiguous rows of pool_b */
    const int32_t *ranks;      /* (K,) ranks in [0, max_rank], or NULL: all max_rank */
    const void *scales;        /* (K,) contiguous, of scales_dtype: s_a per adapter */
    mos_dtype scales_dtype;    /* MOS_F32 or MOS_F64 */
    const int32_t *adapter_ids; /* (N,) in [-1, K); -1 = base only (row untouched) */

    int grouped;               /* 0: per-row strategy, 1: grouped strategy */
    const int32_t *segments;   /* (n_segments + 1,) row offsets 0 = s_0 <= ... = N, or NULL */
    int64_t n_segments;

    void *y;                   /* (N, d_out), row stride y_stride; accumulated */
    int64_t y_stride;

    void *workspace;           /* CUDA: >= mos_batched_workspace_bytes(), MOS_WORKSPACE_ALIGN-aligned;
                                  CPU: ignored (the CPU path allocates what the groups need) */
    size_t workspace_bytes;
} mos_batched_params;

/* Device workspace bytes a CUDA batched call needs: h (N, max_rank) in the accumulation type,
 * plus, when grouped, the group and tile tables (sized by N). */
size_t mos_batched_workspace_bytes(const mos_batched_params *p);

/* The CUDA batched workspace cut into its segments. */
typedef struct {
    void *h;                /* (N, max_rank) float32 (float64 for float64): x A_a^T per row */
    int32_t *tables;        /* grouped only, else NULL: [n_groups, group_start (max_groups + 1),
                               tile_start (max_groups + 1)] */
    int64_t max_groups;     /* N: at most one group per row */
} mos_batched_workspace;

/* Cuts p->workspace into the segments of mos_batched_workspace_bytes(). */
mos_status mos_batched_workspace_carve(mos_batched_workspace *w, const mos_batched_params *p);

/* Checks the core's invariants and dispatches to the CPU or CUDA back end. */
mos_status mos_batched_forward(const mos_batched_params *p);

/* ---------------------------------------------------------------- CPU and CUDA back ends */

/* CPU implementations (cpu.c); arguments already validated by the caller. */
mos_status mos_cpu_assemble(const mos_gather_params *p);
mos_status mos_cpu_scatter_add(const mos_gather_params *p);
mos_status mos_cpu_linear_forward(const mos_linear_params *p);
mos_status mos_cpu_linear_forward_full(const mos_linear_params *p);
mos_status mos_cpu_linear_backward(const mos_linear_params *p);
mos_status mos_cpu_batched_forward(const mos_batched_params *p);

/* CUDA implementations (the .cu files under cuda/, built into mos/_mos_cuda.so); in mos._C these
 * forward to that library, opened on the first call (cuda_loader.c, cuda_backend.h). */
mos_status mos_cuda_assemble(const mos_gather_params *p);
mos_status mos_cuda_scatter_add(const mos_gather_params *p);
mos_status mos_cuda_linear_forward(const mos_linear_params *p);
mos_status mos_cuda_linear_backward(const mos_linear_params *p);
mos_status mos_cuda_batched_forward(const mos_batched_params *p);

/* 1 when the CUDA back end was built (its library lies next to mos._C); says nothing of whether
 * the CUDA runtime, cuBLAS and a driver are there to run it. */
int mos_cuda_built(void);

/* cuBLAS handles the CUDA back end has created (they live as long as the process) and how many of
 * them are free in the per-device pools, not held by a live thread. 0 and 0 without CUDA. */
void mos_cuda_blas_handle_counts(int64_t *created, int64_t *idle);

/* Number of CPU BLAS threads (OpenBLAS's own pool); set_ returns the previous value. */
int mos_cpu_get_num_threads(void);
void mos_cpu_set_num_threads(int n);

/* How many row chunks a CPU linear call of n_rows rows on the assembled path runs as, each on a
 * thread of the OpenMP team the process already runs (PyTorch's); 1 without one (cpu_team.c). */
int mos_cpu_linear_chunks(int64_t n_rows);

#ifdef __cplusplus
}
#endif

#endif /* MOS_H */
