/*
 * cuda_backend.h -- the one door between mos._C and the CUDA back end, a shared library of its own
 * (mos/_mos_cuda.so) that _C opens with dlopen when the first CUDA tensor arrives (cuda_loader.c).
 * _C links neither the CUDA runtime nor cuBLAS: a machine without them runs the CPU path, and a
 * CUDA call there says what is missing.
 *
 * The library exports one symbol, mos_cuda_backend_table. The table carries its ABI version and
 * the sizes of the params structs it was compiled with, so a library from another build is refused
 * rather than called with a different layout. Each library keeps its own thread-local error
 * message: after a failing call, _C copies the library's last_error() into its own.
 */
#ifndef MOS_CUDA_BACKEND_H
#define MOS_CUDA_BACKEND_H

#include "mos.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOS_CUDA_BACKEND_ABI 1
#define MOS_CUDA_BACKEND_SYMBOL "mos_cuda_backend_table"

typedef struct {
    int abi;                   /* MOS_CUDA_BACKEND_ABI of the library */
    size_t gather_params_size, linear_params_size, batched_params_size;
    mos_status (*assemble)(const mos_gather_params *p);
    mos_status (*scatter_add)(const mos_gather_params *p);
    mos_status (*linear_forward)(const mos_linear_params *p);
    mos_status (*linear_backward)(const mos_linear_params *p);
    mos_status (*batched_forward)(const mos_batched_params *p);
    const char *(*last_error)(void);
    void (*blas_handle_counts)(int64_t *created, int64_t *idle);
    /* Paths of the CUDA runtime and cuBLAS libraries the back end runs with (the dynamic
     * loader's choice), and their versions (the driver's is 0 without a driver). */
    const char *(*cudart_path)(void);
    const char *(*cublas_path)(void);
    int (*runtime_version)(void);
    int (*driver_version)(void);
} mos_cuda_backend;

typedef const mos_cuda_backend *(*mos_cuda_backend_table_fn)(void);

/* ---------------------------------------------------------------- the loader (cuda_loader.c) */

/* Opens the CUDA back end once per process. The CUDA runtime and cuBLAS it needs are left to the
 * dynamic loader first: already loaded (e.g. by torch), LD_LIBRARY_PATH, the nvidia-* wheels next to
 * mos (the library's RUNPATH), the system's cache. Each one the loader cannot find is opened by the
 * name it asked for from `dirs` (the binding passes the nvidia-* wheels' lib directories, wherever
 * Python finds them), the system, $CUDA_HOME/lib64 or /usr/local/cuda/lib64, and the library is
 * tried again. Thread-safe; a failure is remembered and returned again with a message saying what
 * is missing. */
mos_status mos_cuda_load(const char *const *dirs, int n_dirs);

/* 1 once the back end is open (cheap: no lock). */
int mos_cuda_loaded(void);

/* What the loader found, for build_info: every string "" when not known. */
typedef struct {
    int built;                 /* the library file exists next to _C */
    int loaded;
    const char *library;       /* path of mos/_mos_cuda.so */
    const char *cudart, *cublas;
    int runtime_version, driver_version;
    const char *error;         /* why loading failed, "" if it did not (or was not tried) */
} mos_cuda_backend_info;

void mos_cuda_get_backend_info(mos_cuda_backend_info *info);

#ifdef __cplusplus
}
#endif

#endif
