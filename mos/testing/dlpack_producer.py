"""A DLPack producer written with ctypes that can break the protocol on purpose (hostile input).

`Producer` hands out a legacy "dltensor" capsule over a NumPy array (or over any pointer), and
can lie about its device, drop its data pointer, return a malformed `__dlpack_device__`, or run
Python code in its deleter."""
import ctypes

import numpy as np

DL_CPU, DL_CUDA = 1, 2
DL_INT, DL_FLOAT = 0, 2


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class DLManagedTensor(ctypes.Structure):
    pass


DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensor))
DLManagedTensor._fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p),
                            ("deleter", DELETER)]

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class Producer:
    """A tensor over `array`'s memory (kept alive here). Keyword arguments break the protocol:
    data=<int or None> replaces the data pointer, capsule_device / reported_device set the device
    the capsule and __dlpack_device__ claim, on_delete is Python code the deleter runs."""

    def __init__(self, array, *, data="array", capsule_device=(DL_CPU, 0), reported_device=(DL_CPU, 0),
                 on_delete=None):
        self.array = np.ascontiguousarray(array)
        self.data = self.array.ctypes.data if data == "array" else data
        self.capsule_device = capsule_device
        self.reported_device = reported_device
        self.on_delete = on_delete
        self.deleted = 0
        self._keep = []

    def __dlpack_device__(self):
        return self.reported_device

    def __dlpack__(self, stream=None, max_version=None):
        if max_version is not None:
            raise TypeError("this producer speaks legacy DLPack only")  # the consumer falls back
        a = self.array
        shape = (ctypes.c_int64 * a.ndim)(*a.shape)
        managed = DLManagedTensor()
        t = managed.dl_tensor
        t.data = self.data
        t.device = DLDevice(*self.capsule_device)
        t.ndim = a.ndim
        code = DL_FLOAT if a.dtype.kind == "f" else DL_INT
        t.dtype = DLDataType(code, a.dtype.itemsize * 8, 1)
        t.shape = shape
        t.strides = None
        if self.on_delete is not None:
            def deleter(_):
                self.deleted += 1
                self.on_delete()
            managed.deleter = DELETER(deleter)
            self._keep.append(managed.deleter)
        self._keep += [shape, managed]
        return _capsule_new(ctypes.addressof(managed), b"dltensor", None)
