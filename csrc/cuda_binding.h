/* cuda_binding.h -- the binding's side of the CUDA back end's loading (cuda_binding.c). */
#ifndef MOS_CUDA_BINDING_H
#define MOS_CUDA_BINDING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "mos.h"

/* Opens the CUDA back end (once) before a call on `device` releases the GIL, searching the
 * nvidia-* wheels' lib directories as well as the system. 0, or -1 with RuntimeError
 * "<function>: <what is missing>". No-op for CPU calls. */
int mos_cuda_ready(mos_device_kind device, const char *function);

/* What build_info reports of the CUDA back end: its library, whether it is loaded, the CUDA runtime
 * and cuBLAS it runs with and their versions, or why it could not load. With `load`, loads it first
 * and raises RuntimeError when it cannot. New reference, or NULL. */
PyObject *mos_cuda_backend_dict(int load);

/* _C.cuda_backend(): mos_cuda_backend_dict(1). _C.cuda_blas_handles(): {"created", "idle"}. */
PyObject *mos_py_cuda_backend(PyObject *module, PyObject *unused);
PyObject *mos_py_cuda_blas_handles(PyObject *module, PyObject *unused);

#endif
