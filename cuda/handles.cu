/*
 * handles.cu -- cuBLAS handles for the process's lifetime, pooled per device, as torch keeps them.
 *
 * cublasDestroy synchronizes the whole device: destroying a thread's handle when the thread ends
 * would stall every other stream each time a short-lived thread that ran a linear op exits, and
 * could invalidate another thread's CUDA graph capture. So a handle is never destroyed. A thread
 * takes a free handle of the device from the pool on its first linear call there (creating one
 * only when none is free) and gives it back when it exits. The number of handles is therefore the
 * largest number of threads that ran linear ops on a device at one time.
 *
 * A handle carries no call state between users: every call rebinds its stream and workspace slice
 * (kernels.cu, blas_handle), and the math mode set here is the same for all.
 */
#include <mutex>
#include <vector>

#include "common.cuh"

namespace {

/* Free handles per device, and how many were ever created. Allocated once and never destroyed,
 * so threads that exit during interpreter or process teardown can still give theirs back. */
struct handle_pool {
    std::mutex lock;
    std::vector<cublasHandle_t> idle[MOS_CUDA_MAX_DEVICES];
    int64_t created = 0;
};

handle_pool &pool() {
    static handle_pool *the_pool = new handle_pool; /* deliberately leaked: see above */
    return *the_pool;
}

/* The handles the calling thread holds, one per device; returned to the pool at thread exit. */
struct thread_handles {
    cublasHandle_t handle[MOS_CUDA_MAX_DEVICES] = {};
    ~thread_handles() {
        handle_pool &p = pool();
        std::lock_guard<std::mutex> guard(p.lock);
        for (int d = 0; d < MOS_CUDA_MAX_DEVICES; ++d)
            if (handle[d] != NULL) p.idle[d].push_back(handle[d]);
    }
};
thread_local thread_handles held;

/* A new handle on the current device: no TF32 for float32 (DEFAULT_MATH) and split-K reductions
 * in the float32 compute type rather than in a 16-bit output type. */
mos_status create_handle(cublasHandle_t *out) {
    cublasHandle_t fresh = NULL;
    CUBLAS_TRY(cublasCreate(&fresh), "cublasCreate");
    cublasStatus_t st = cublasSetMathMode(
        fresh, (cublasMath_t)(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
    if (st != CUBLAS_STATUS_SUCCESS) (void)cublasDestroy(fresh);
    CUBLAS_TRY(st, "cublasSetMathMode");
    *out = fresh;
    return MOS_OK;
}

} // namespace

mos_status mos_cuda_thread_handle(int device, cublasHandle_t *out) {
    MOS_CHECK(device >= 0 && device < MOS_CUDA_MAX_DEVICES, MOS_ERR_VALUE,
              "CUDA device ordinal %d is outside [0, %d)", device, MOS_CUDA_MAX_DEVICES);
    cublasHandle_t *slot = &held.handle[device];
    if (*slot == NULL) {
        handle_pool &p = pool();
        {
            std::lock_guard<std::mutex> guard(p.lock);
            if (!p.idle[device].empty()) {
                *slot = p.idle[device].back();
                p.idle[device].pop_back();
            }
        }
        if (*slot == NULL) {
            /* Created outside the lock: cublasCreate may take a while and other threads' handles
             * need not wait for it. */
            cublasHandle_t fresh = NULL;
            MOS_TRY(create_handle(&fresh));
            std::lock_guard<std::mutex> guard(p.lock);
            ++p.created;
            *slot = fresh;
        }
    }
    *out = *slot;
    return MOS_OK;
}

extern "C" void mos_cuda_blas_handle_counts(int64_t *created, int64_t *idle) {
    handle_pool &p = pool();
    std::lock_guard<std::mutex> guard(p.lock);
    *created = p.created;
    *idle = 0;
    for (int d = 0; d < MOS_CUDA_MAX_DEVICES; ++d) *idle += (int64_t)p.idle[d].size();
}
