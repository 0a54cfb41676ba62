/*
 * cuda_loader.c -- mos._C's side of the CUDA back end: finds mos/_mos_cuda.so next to _C, opens
 * it (and the CUDA runtime and cuBLAS it needs) on the first CUDA call, and forwards the mos_cuda_*
 * entry points of mos.h to its table (cuda_backend.h). Without the library, or without the
 * libraries it needs, every CUDA entry point fails with a message saying what is missing, and the
 * CPU path is untouched.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "cuda_backend.h"

#define LIBRARY_NAME "_mos_cuda.so"
#define PATH_BYTES 4096

/* Loaded once per process and never unloaded: the state below is written only under `lock`, and
 * `table` is published last, with release order. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static const mos_cuda_backend *_Atomic table;

/* The open back end's table, or NULL (acquire: what open_backend wrote before publishing it). */
static const mos_cuda_backend *opened(void) {
    return atomic_load_explicit(&table, memory_order_acquire);
}
static int tried;
static char library_path[PATH_BYTES], cudart[PATH_BYTES], cublas[PATH_BYTES];
static char failure[2 * PATH_BYTES];

static pthread_once_t located = PTHREAD_ONCE_INIT;

/* mos/_mos_cuda.so: the directory _C was loaded from, plus the library's name. */
static void locate_library(void) {
    Dl_info info;
    const char *self =
        dladdr((const void *)&mos_cuda_load, &info) && info.dli_fname ? info.dli_fname : "";
    const char *slash = strrchr(self, '/');
    const int dir = slash ? (int)(slash - self + 1) : 0;
    snprintf(library_path, sizeof library_path, "%.*s%s", dir, self, LIBRARY_NAME);
}

static const char *library(void) {
    pthread_once(&located, locate_library);
    return library_path;
}

int mos_cuda_built(void) { return access(library(), F_OK) == 0; }

/* Opens `soname` where the back end's loader will then find it: in one of dirs, by the system's
 * rules, or in the CUDA toolkit. 0, or -1 when it is nowhere. */
static int preload(const char *soname, const char *const *dirs, int n_dirs) {
    static const char *const toolkit[] = {"/usr/local/cuda/lib64", "/usr/local/cuda/lib"};
    char path[PATH_BYTES];
    for (int i = 0; i < n_dirs; ++i) {
        snprintf(path, sizeof path, "%s/%s", dirs[i], soname);
        if (dlopen(path, RTLD_LAZY | RTLD_GLOBAL)) return 0;
    }
    if (dlopen(soname, RTLD_LAZY | RTLD_GLOBAL)) return 0;
    const char *home = getenv("CUDA_HOME");
    if (home && home[0]) {
        snprintf(path, sizeof path, "%s/lib64/%s", home, soname);
        if (dlopen(path, RTLD_LAZY | RTLD_GLOBAL)) return 0;
    }
    for (size_t i = 0; i < sizeof toolkit / sizeof *toolkit; ++i) {
        snprintf(path, sizeof path, "%s/%s", toolkit[i], soname);
        if (dlopen(path, RTLD_LAZY | RTLD_GLOBAL)) return 0;
    }
    return -1;
}

/* The library a failed dlopen could not find ("libcublas.so.13: cannot open shared object file:
 * ..." in glibc's words), copied into `name`; 0 when the failure was something else. */
static int missing_library(const char *error, char *name, size_t size) {
    const char *end = strstr(error, ": cannot open shared object file");
    if (!end || end == error || (size_t)(end - error) >= size || memchr(error, '/', end - error))
        return 0;
    snprintf(name, size, "%.*s", (int)(end - error), error);
    return 1;
}

static const char *describe(const char *soname) {
    if (strncmp(soname, "libcudart", 9) == 0) return "the CUDA runtime";
    if (strncmp(soname, "libcublas", 9) == 0) return "cuBLAS";
    return "a CUDA library";
}

/* Opens the library and checks its table; `failure` says why not. Called under `lock`. The CUDA
 * runtime and cuBLAS the library needs are left to the dynamic loader first (already loaded, e.g.
 * by torch, or on the system's path); each one it cannot find is opened from dirs or the toolkit
 * by the name it asked for, and the library is tried again. */
static void open_backend(const char *const *dirs, int n_dirs) {
    const char *path = library();
    if (access(path, F_OK) != 0) {
        snprintf(failure, sizeof failure, "mos was built without CUDA (MOS_CUDA=0 or no nvcc)");
        return;
    }
    void *handle = NULL;
    char soname[256], previous[256] = "";
    while (!(handle = dlopen(path, RTLD_NOW | RTLD_LOCAL))) {
        const char *error = dlerror();
        if (!missing_library(error, soname, sizeof soname) || strcmp(soname, previous) == 0) {
            snprintf(failure, sizeof failure, "the CUDA back end %s could not be loaded: %s", path,
                     error);
            return;
        }
        if (preload(soname, dirs, n_dirs) < 0) {
            snprintf(failure, sizeof failure,
                     "the CUDA back end needs %s (%s), which is not loaded, not in the nvidia-* "
                     "wheels' lib directories and not on the system's library path: install a "
                     "CUDA build of torch or `pip install nvidia-cuda-runtime nvidia-cublas`, or "
                     "set LD_LIBRARY_PATH to the CUDA toolkit's lib64", describe(soname), soname);
            return;
        }
        snprintf(previous, sizeof previous, "%s", soname);  /* opened: a second miss is final */
    }
    mos_cuda_backend_table_fn get =
        (mos_cuda_backend_table_fn)dlsym(handle, MOS_CUDA_BACKEND_SYMBOL);
    const mos_cuda_backend *t = get ? get() : NULL;
    if (!t || t->abi != MOS_CUDA_BACKEND_ABI || t->gather_params_size != sizeof(mos_gather_params) ||
        t->linear_params_size != sizeof(mos_linear_params) ||
        t->batched_params_size != sizeof(mos_batched_params)) {
        snprintf(failure, sizeof failure, "the CUDA back end %s is from another build of mos "
                 "(rebuild mos)", path);
        return;  /* left open: a library may not be unloadable once it has run constructors */
    }
    snprintf(cudart, sizeof cudart, "%s", t->cudart_path());
    snprintf(cublas, sizeof cublas, "%s", t->cublas_path());
    failure[0] = 0;
    atomic_store_explicit(&table, t, memory_order_release);
}

int mos_cuda_loaded(void) { return opened() != NULL; }

mos_status mos_cuda_load(const char *const *dirs, int n_dirs) {
    if (opened()) return MOS_OK;
    pthread_mutex_lock(&lock);
    if (!opened() && !tried) {
        open_backend(dirs, n_dirs);
        tried = 1;
    }
    pthread_mutex_unlock(&lock);
    return opened() ? MOS_OK : mos_set_error(MOS_ERR_RUNTIME, "%s", failure);
}

void mos_cuda_get_backend_info(mos_cuda_backend_info *info) {
    const int built = mos_cuda_built();
    pthread_mutex_lock(&lock);
    const mos_cuda_backend *t = opened();
    *info = (mos_cuda_backend_info){
        .built = built, .loaded = t != NULL, .library = library_path,
        .cudart = cudart, .cublas = cublas, .error = failure,
        .runtime_version = t ? t->runtime_version() : 0,
        .driver_version = t ? t->driver_version() : 0};
    pthread_mutex_unlock(&lock);
}

/* ---------------------------------------------------------------- the mos_cuda_* entry points */

/* The back end's message for a failed call; when no driver is installed at all, also that. */
static mos_status failed(mos_status status) {
    const mos_cuda_backend *t = opened();
    if (status == MOS_ERR_CUDA && t->driver_version() == 0)
        return mos_set_error(status, "%s; no NVIDIA driver is installed (libcuda.so.1 was not "
                             "found)", t->last_error());
    return mos_set_error(status, "%s", t->last_error());
}

/* Runs the call on the back end's table, opening it first with the system's search alone (the
 * binding opens it beforehand with the wheels' directories too). */
#define FORWARD(name, type, member)                                      \
    mos_status name(const type *p) {                                     \
        MOS_TRY(mos_cuda_load(NULL, 0));                                 \
        const mos_status status = opened()->member(p);                   \
        return status == MOS_OK ? MOS_OK : failed(status);               \
    }
FORWARD(mos_cuda_assemble, mos_gather_params, assemble)
FORWARD(mos_cuda_scatter_add, mos_gather_params, scatter_add)
FORWARD(mos_cuda_linear_forward, mos_linear_params, linear_forward)
FORWARD(mos_cuda_linear_backward, mos_linear_params, linear_backward)
FORWARD(mos_cuda_batched_forward, mos_batched_params, batched_forward)

void mos_cuda_blas_handle_counts(int64_t *created, int64_t *idle) {
    *created = *idle = 0;
    const mos_cuda_backend *t = opened();
    if (t) t->blas_handle_counts(created, idle);
}
