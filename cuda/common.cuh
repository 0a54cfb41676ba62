/*
 * common.cuh -- what every CUDA file of mos shares: error macros that turn CUDA/cuBLAS failures
 * into mos_status with the library's own message, aligned vector packs, the fp32/fp64
 * accumulation types of each element type, and the device switch around a call.
 */
#ifndef MOS_CUDA_COMMON_CUH
#define MOS_CUDA_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "check.h"
#include "mos.h"

#define MOS_CUDA_MAX_DEVICES 64 /* device ordinals a per-thread cache holds */

/* Returns MOS_ERR_CUDA with the CUDA error string when `expr` fails. */
#define CUDA_TRY(expr, what)                                                                  \
    do {                                                                                      \
        cudaError_t cuda_try_err_ = (expr);                                                   \
        if (cuda_try_err_ != cudaSuccess)                                                     \
            return mos_check_fail(MOS_ERR_CUDA, __FILE__, __LINE__, "%s failed: %s (%s)",     \
                                  (what), cudaGetErrorString(cuda_try_err_),                  \
                                  cudaGetErrorName(cuda_try_err_));                           \
    } while (0)

/* Returns MOS_ERR_CUDA with the cuBLAS status string when `expr` fails. */
#define CUBLAS_TRY(expr, what)                                                                \
    do {                                                                                      \
        cublasStatus_t cublas_try_st_ = (expr);                                               \
        if (cublas_try_st_ != CUBLAS_STATUS_SUCCESS)                                          \
            return mos_check_fail(MOS_ERR_CUDA, __FILE__, __LINE__, "%s failed: %s (%s)",     \
                                  (what), cublasGetStatusString(cublas_try_st_),              \
                                  cublasGetStatusName(cublas_try_st_));                       \
    } while (0)

/* V elements of E moved as one aligned load/store. */
template <typename E, int V> struct alignas(sizeof(E) * V) pack {
    E v[V];
};

/* Accumulation type of an element: float for 16-bit and float32, double for float64. */
template <typename T> struct acc_of {
    typedef float type;
};
template <> struct acc_of<double> {
    typedef double type;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void from_acc(float a, float *out) { *out = a; }
__device__ __forceinline__ void from_acc(double a, double *out) { *out = a; }
__device__ __forceinline__ void from_acc(float a, __half *out) { *out = __float2half_rn(a); }
__device__ __forceinline__ void from_acc(float a, __nv_bfloat16 *out) {
    *out = __float2bfloat16_rn(a);
}

/* The calling thread's cuBLAS handle on `device` (handles.cu): taken from the device's pool, or
 * created, on the thread's first call there; returned to the pool when the thread exits. */
mos_status mos_cuda_thread_handle(int device, cublasHandle_t *out);

/* Makes `want` the current device, remembering the previous one in *prev. */
static inline mos_status device_enter(int want, int *prev) {
    MOS_CHECK(want >= 0 && want < MOS_CUDA_MAX_DEVICES, MOS_ERR_VALUE,
              "CUDA device ordinal %d is outside [0, %d)", want, MOS_CUDA_MAX_DEVICES);
    CUDA_TRY(cudaGetDevice(prev), "cudaGetDevice");
    if (*prev != want) CUDA_TRY(cudaSetDevice(want), "cudaSetDevice");
    return MOS_OK;
}

/* Restores the device device_enter replaced. */
static inline void device_leave(int prev, int want) {
    if (prev != want) (void)cudaSetDevice(prev);
}

#endif
