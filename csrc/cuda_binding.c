/*
 * cuda_binding.c -- the binding's side of opening the CUDA back end: the lib directories of the
 * nvidia-* wheels (what a CUDA build of torch installs: nvidia/cu13/lib, or nvidia/cublas/lib and
 * nvidia/cuda_runtime/lib for CUDA 12) come from the `nvidia` namespace package, so they are found
 * wherever Python finds packages; the loader (cuda_loader.c) then tries them before the system.
 */
#include "cuda_binding.h"

#include "cuda_backend.h"

#define MAX_DIRS 32

static const char *const wheel_lib_dirs[] = {"cu13/lib", "cublas/lib", "cuda_runtime/lib"};
#define N_WHEEL_LIB_DIRS (sizeof wheel_lib_dirs / sizeof *wheel_lib_dirs)

/* Fills dirs (owned strings in `owned`, a list) from nvidia.__path__; none when it is absent. */
static int wheel_dirs(PyObject *owned, const char **dirs, int *n) {
    *n = 0;
    PyObject *nvidia = PyImport_ImportModule("nvidia");
    if (!nvidia) {  /* no nvidia-* wheel installed: the system's libraries may still do */
        PyErr_Clear();
        return 0;
    }
    PyObject *paths = PyObject_GetAttrString(nvidia, "__path__");
    Py_DECREF(nvidia);
    PyObject *iter = paths ? PyObject_GetIter(paths) : NULL;
    Py_XDECREF(paths);
    if (!iter) {
        PyErr_Clear();
        return 0;
    }
    PyObject *base;
    while ((base = PyIter_Next(iter)) != NULL) {
        for (size_t i = 0; i < N_WHEEL_LIB_DIRS && *n < MAX_DIRS; ++i) {
            PyObject *dir = PyUnicode_FromFormat("%S/%s", base, wheel_lib_dirs[i]);
            if (!dir || PyList_Append(owned, dir) < 0) {
                Py_XDECREF(dir);
                Py_DECREF(base);
                Py_DECREF(iter);
                return -1;
            }
            Py_DECREF(dir);
            if (!(dirs[(*n)++] = PyUnicode_AsUTF8(dir))) {
                Py_DECREF(base);
                Py_DECREF(iter);
                return -1;
            }
        }
        Py_DECREF(base);
    }
    Py_DECREF(iter);
    if (PyErr_Occurred()) PyErr_Clear();
    return 0;
}

static mos_status load(void) {
    const char *dirs[MAX_DIRS];
    int n = 0;
    PyObject *owned = PyList_New(0);
    if (!owned) return MOS_ERR_NOMEM;
    if (wheel_dirs(owned, dirs, &n) < 0) {
        PyErr_Clear();
        n = 0;
    }
    const mos_status status = mos_cuda_load(dirs, n);
    Py_DECREF(owned);
    return status;
}

int mos_cuda_ready(mos_device_kind device, const char *function) {
    if (device != MOS_DEVICE_CUDA || mos_cuda_loaded() || load() == MOS_OK) return 0;
    PyErr_Format(PyExc_RuntimeError, "%s: %s", function, mos_last_error());
    return -1;
}

PyObject *mos_cuda_backend_dict(int load_first) {
    if (load_first && load() != MOS_OK) {
        PyErr_Format(PyExc_RuntimeError, "%s", mos_last_error());
        return NULL;
    }
    mos_cuda_backend_info info;
    mos_cuda_get_backend_info(&info);
#define OR_NONE(s) ((s)[0] ? (s) : NULL)
    return Py_BuildValue("{sOsOszszszsiszsisz}", "built", info.built ? Py_True : Py_False,
                         "loaded", info.loaded ? Py_True : Py_False, "library", info.library,
                         "cudart", OR_NONE(info.cudart), "cublas", OR_NONE(info.cublas),
                         "runtime_version", info.runtime_version,
                         "driver", info.loaded ? (info.driver_version ? "found" : "missing") : NULL,
                         "driver_version", info.driver_version, "error", OR_NONE(info.error));
#undef OR_NONE
}

PyObject *mos_py_cuda_backend(PyObject *module, PyObject *unused) {
    return mos_cuda_backend_dict(1);
}

PyObject *mos_py_cuda_blas_handles(PyObject *module, PyObject *unused) {
    int64_t created, idle;
    mos_cuda_blas_handle_counts(&created, &idle);
    return Py_BuildValue("{sLsL}", "created", (long long)created, "idle", (long long)idle);
}
