/*
 * dlpack_abi.h -- the DLPack 1.x structs and codes mos consumes, written from the published
 * specification (https://dmlc.github.io/dlpack/latest/c_api.html, dlpack.h v1.0): field order
 * and enum values are the ABI; names carry an mos_ prefix to avoid clashing with other headers.
 */
#ifndef MOS_DLPACK_ABI_H
#define MOS_DLPACK_ABI_H

#include <stdint.h>

enum { MOS_DL_CPU = 1, MOS_DL_CUDA = 2, MOS_DL_CUDA_HOST = 3, MOS_DL_CUDA_MANAGED = 13 };
enum { MOS_DL_INT = 0, MOS_DL_UINT = 1, MOS_DL_FLOAT = 2, MOS_DL_BFLOAT = 4 };

#define MOS_DL_FLAG_READ_ONLY (UINT64_C(1) << 0)

typedef struct { int32_t device_type; int32_t device_id; } mos_dl_device;
typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } mos_dl_dtype;

typedef struct {
    void *data;
    mos_dl_device device;
    int32_t ndim;
    mos_dl_dtype dtype;
    int64_t *shape;
    int64_t *strides;  /* in elements; NULL means compact row-major */
    uint64_t byte_offset;
} mos_dl_tensor;

/* Legacy capsule "dltensor". */
typedef struct mos_dl_managed {
    mos_dl_tensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct mos_dl_managed *self);
} mos_dl_managed;

typedef struct { uint32_t major; uint32_t minor; } mos_dl_version;

/* Versioned capsule "dltensor_versioned" (DLPack >= 1.0). */
typedef struct mos_dl_managed_versioned {
    mos_dl_version version;
    void *manager_ctx;
    void (*deleter)(struct mos_dl_managed_versioned *self);
    uint64_t flags;
    mos_dl_tensor dl_tensor;
} mos_dl_managed_versioned;

#endif
