/*
 * backend.cu -- the table mos._C calls the CUDA back end through (csrc/cuda_backend.h): the one
 * symbol this library exports, plus what it reports about the CUDA libraries it runs with.
 */
#include <dlfcn.h>

#include "common.cuh"
#include "cuda_backend.h"

extern "C" mos_status mos_cuda_assemble(const mos_gather_params *p);
extern "C" mos_status mos_cuda_scatter_add(const mos_gather_params *p);
extern "C" mos_status mos_cuda_linear_forward(const mos_linear_params *p);
extern "C" mos_status mos_cuda_linear_backward(const mos_linear_params *p);
extern "C" mos_status mos_cuda_batched_forward(const mos_batched_params *p);
extern "C" void mos_cuda_blas_handle_counts(int64_t *created, int64_t *idle);

namespace {

/* The file the dynamic loader mapped `symbol` from. */
const char *file_of(const void *symbol) {
    Dl_info info;
    return dladdr(symbol, &info) && info.dli_fname ? info.dli_fname : "";
}

const char *cudart_path() { return file_of((const void *)&cudaRuntimeGetVersion); }
const char *cublas_path() { return file_of((const void *)&cublasGetProperty); }

int runtime_version() {
    int version = 0;
    return cudaRuntimeGetVersion(&version) == cudaSuccess ? version : 0;
}

int driver_version() {
    int version = 0; /* 0 when no driver is installed */
    return cudaDriverGetVersion(&version) == cudaSuccess ? version : 0;
}

const mos_cuda_backend table = {
    MOS_CUDA_BACKEND_ABI,      sizeof(mos_gather_params),  sizeof(mos_linear_params),
    sizeof(mos_batched_params), mos_cuda_assemble,          mos_cuda_scatter_add,
    mos_cuda_linear_forward,   mos_cuda_linear_backward,   mos_cuda_batched_forward,
    mos_last_error,            mos_cuda_blas_handle_counts, cudart_path,
    cublas_path,               runtime_version,            driver_version,
};

} // namespace

extern "C" __attribute__((visibility("default"))) const mos_cuda_backend *mos_cuda_backend_table(void) {
    return &table;
}
