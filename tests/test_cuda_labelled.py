"""CPU tensors offered as CUDA device 0 (the DLPack capsule relabelled) must pass every argument
check of every CUDA entry point, with the workspaces mos's own callers pass (torch uint8), and fail
only at the CUDA runtime: here no GPU is visible, so the first CUDA call refuses. A failure before
that (a dtype, stream or size check) is a bug that would stop the same call on a real GPU.

Skipped where a GPU is visible: there the host pointers would reach real kernels."""
import ctypes
import re

import numpy as np
import pytest

import mos
from mos import _C
from mos import functional as F

from mos.testing.dlpack_producer import DL_CUDA, DLDevice

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a GPU is visible: relabelled host memory must not reach it")

STREAM = 0x5EED0  # any positive value: no call gets as far as using it
if mos.build_info()["cuda"]:
    CUDA_RUNTIME_ERROR = r"(cuda|cublas)\w+ failed: "  # e.g. "cudaGetDevice failed: ..."
else:
    CUDA_RUNTIME_ERROR = "built without CUDA"

_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.restype, _capsule_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object,
                                                                       ctypes.c_char_p]


# Offset of DLTensor inside the managed struct: after version, manager_ctx, deleter and flags in
# DLManagedTensorVersioned, first in the legacy DLManagedTensor; its device follows `void *data`.
_TENSOR_OFFSET = {b"dltensor_versioned": 32, b"dltensor": 0}


def relabel_as_cuda(capsule, device_id=0):
    name = _capsule_name(capsule)
    base = _capsule_pointer(capsule, name)
    device = DLDevice.from_address(base + _TENSOR_OFFSET[name] + ctypes.sizeof(ctypes.c_void_p))
    device.device_type, device.device_id = DL_CUDA, device_id
    return capsule


class CudaLabelled:
    """A CPU torch tensor offered over DLPack as CUDA device 0. Records the streams the consumer
    asks for; carries the little of a tensor's API mos.functional uses to allocate outputs."""

    def __init__(self, tensor):
        self.tensor = tensor
        self.streams = []

    def __dlpack_device__(self):
        return (DL_CUDA, 0)

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        self.streams.append(stream)
        if max_version is None:
            return relabel_as_cuda(self.tensor.__dlpack__())
        return relabel_as_cuda(self.tensor.__dlpack__(max_version=max_version))

    @property
    def shape(self):
        return self.tensor.shape

    def new_zeros(self, shape, dtype=None):
        return CudaLabelled(self.tensor.new_zeros(shape, dtype=dtype or self.tensor.dtype))

    def reshape(self, *shape):
        return CudaLabelled(self.tensor.reshape(*shape))


def workspace(nbytes):
    """A 256-byte aligned uint8 torch tensor of nbytes, as mos's callers allocate on CUDA."""
    raw = torch.zeros(nbytes + 256, dtype=torch.uint8)
    start = -raw.data_ptr() % 256
    return raw[start:start + nbytes]


class Problem:
    """One small layer (d_in 32, d_out 24, r 4, l 2) in `dtype`, every tensor a CPU torch tensor."""

    def __init__(self, dtype, n_rows=6):
        config = mos.MoSConfig(r=4, equivalent_rank=2, shards_per_vector=2, private_rank=1)
        pool = mos.ShardPool("q", 32, 24, 3, config)
        gen = torch.Generator().manual_seed(0)
        rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        self.n, self.d_in, self.d_out, self.r = n_rows, 32, 24, 4
        self.x, self.y, self.dy = rand(n_rows, 32), rand(n_rows, 24), rand(n_rows, 24)
        self.pool_a, self.pool_b = rand(*pool.pool_a_shape), rand(*pool.pool_b_shape)
        ia, ib = pool.indices(1)
        self.index_a, self.index_b = torch.from_numpy(ia.copy()), torch.from_numpy(ib.copy())
        self.dx = torch.zeros(n_rows, 32, dtype=dtype)
        self.dpool_a, self.dpool_b = torch.zeros_like(self.pool_a), torch.zeros_like(self.pool_b)
        self.rows = rand(len(ia), pool.shard_len_a)

    def linear_workspace(self, backward):
        return workspace(F.workspace_bytes(self.n, self.d_in, self.d_out, self.r, self.itemsize,
                                           backward=backward, cuda=True))

    def batched(self, grouped, segments):
        """Arguments of a batched call: two adapters (the layer's two index rows), rows split 4/2."""
        ids = torch.tensor([0, 0, 0, 0, 1, 1], dtype=torch.int32)
        args = dict(y=self.y, x=self.x, pool_a=self.pool_a,
                    index_a=torch.stack([self.index_a, self.index_b.flip(0)]).contiguous(),
                    pool_b=self.pool_b, index_b=torch.stack([self.index_b, self.index_b]).contiguous(),
                    scales=torch.tensor([0.5, 2.0], dtype=torch.float32), adapter_ids=ids,
                    ranks=torch.tensor([4, 3], dtype=torch.int32))
        if segments:
            args["segments"] = torch.tensor([0, 4, 6], dtype=torch.int32)
        nbytes = F.batched_workspace_bytes(self.n, self.r, self.itemsize, grouped)
        args["workspace"] = workspace(nbytes)
        return args


def call_entry(entry, p, stream=STREAM):
    """Runs one entry point on CUDA-labelled tensors; returns the tensors it may write."""
    lab = CudaLabelled
    if entry == "forward":
        _C.linear_forward(lab(p.y), lab(p.x), lab(p.pool_a), lab(p.index_a), lab(p.pool_b),
                          lab(p.index_b), 0.5, workspace=lab(p.linear_workspace(False)),
                          stream=stream)
    elif entry == "backward":
        _C.linear_backward(lab(p.dx), lab(p.dpool_a), lab(p.dpool_b), lab(p.dy), lab(p.x),
                           lab(p.pool_a), lab(p.index_a), lab(p.pool_b), lab(p.index_b), 0.5,
                           workspace=lab(p.linear_workspace(True)), stream=stream)
    elif entry == "assemble":
        _C.assemble(lab(p.rows), lab(p.pool_a), lab(p.index_a), stream=stream)
    elif entry == "scatter_add":
        _C.scatter_add(lab(p.dpool_a), lab(p.rows), lab(p.index_a), stream=stream)
    else:
        grouped = entry.startswith("batched_grouped")
        args = p.batched(grouped, segments=entry.endswith("segments"))
        _C.batched_forward(**{k: lab(v) for k, v in args.items()}, grouped=grouped, stream=stream)


ENTRIES = ["forward", "backward", "assemble", "scatter_add", "batched_per_row", "batched_grouped",
           "batched_grouped_segments"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("entry", ENTRIES)
def test_cuda_labelled_call_fails_only_at_the_cuda_runtime(entry, dtype):
    p = Problem(DTYPES[dtype])
    outputs = (p.y, p.dx, p.dpool_a, p.dpool_b, p.rows)
    before = [t.clone() for t in outputs]
    with pytest.raises(RuntimeError, match=CUDA_RUNTIME_ERROR):
        call_entry(entry, p)
    for got, want in zip(outputs, before):  # host memory labelled as device is never touched
        assert torch.equal(got, want)


def test_uint8_is_refused_everywhere_but_the_workspace():
    p = Problem(torch.float32)
    lab = CudaLabelled
    as_bytes = lab(p.pool_a.view(torch.uint8))
    with pytest.raises(TypeError, match="pool_a: expected a floating-point tensor, got uint8"):
        _C.linear_forward(lab(p.y), lab(p.x), as_bytes, lab(p.index_a), lab(p.pool_b),
                          lab(p.index_b), 0.5, workspace=lab(p.linear_workspace(False)))
    with pytest.raises(TypeError, match="index: index tables must be int32, got uint8"):
        _C.assemble(lab(p.rows), lab(p.pool_a), lab(p.index_a.view(torch.uint8)))
    with pytest.raises(TypeError, match="x: expected a floating-point tensor, got uint8"):
        _C.linear_forward(p.y.numpy(), p.x.view(torch.uint8).numpy(), p.pool_a.numpy(),
                          p.index_a.numpy(), p.pool_b.numpy(), p.index_b.numpy(), 0.5)


def test_cuda_workspace_must_include_the_cublas_slice():
    p = Problem(torch.float32)
    cpu_sized = F.workspace_bytes(p.n, p.d_in, p.d_out, p.r, p.itemsize)
    cuda_sized = F.workspace_bytes(p.n, p.d_in, p.d_out, p.r, p.itemsize, cuda=True)
    assert cuda_sized >= cpu_sized + (32 << 20)
    lab = CudaLabelled
    with pytest.raises(ValueError, match=f"workspace: holds {cpu_sized} bytes, the call needs {cuda_sized}"):
        _C.linear_forward(lab(p.y), lab(p.x), lab(p.pool_a), lab(p.index_a), lab(p.pool_b),
                          lab(p.index_b), 0.5, workspace=lab(workspace(cpu_sized)))


@pytest.mark.parametrize("stream", [-1, -2, -(2 ** 40)])
@pytest.mark.parametrize("entry", ["forward", "assemble", "batched_per_row"])
def test_negative_streams_are_refused(entry, stream):
    p = Problem(torch.float32)
    with pytest.raises(ValueError, match=re.escape(f"stream={stream} is invalid")):
        call_entry(entry, p, stream=stream)


@pytest.mark.parametrize("op", ["assemble", "scatter_add"])
def test_functional_gather_ops_launch_on_the_given_stream(op):
    """The stream reaches the producer's __dlpack__ (the binding passes its launch stream there)."""
    p = Problem(torch.float32)
    pool, index = CudaLabelled(p.pool_a), CudaLabelled(p.index_a)
    with pytest.raises(RuntimeError, match=CUDA_RUNTIME_ERROR):
        if op == "assemble":
            F.assemble(pool, index, p.r, stream=STREAM)
        else:
            F.scatter_add(pool, CudaLabelled(p.rows), index, stream=STREAM)
    assert pool.streams == [STREAM] and index.streams == [STREAM]


def test_uint8_workspace_serves_the_cpu_path_too():
    """The same raw-bytes workspace on CPU gives the numbers the core's own scratch gives."""
    p = Problem(torch.float32)
    args = [t.numpy() for t in (p.x, p.pool_a, p.index_a, p.pool_b, p.index_b)]
    want, got = np.zeros((p.n, p.d_out), np.float32), np.zeros((p.n, p.d_out), np.float32)
    _C.linear_forward(want, *args, 0.5)
    ws = workspace(F.workspace_bytes(p.n, p.d_in, p.d_out, p.r, 4)).numpy()
    _C.linear_forward(got, *args, 0.5, workspace=ws)
    np.testing.assert_array_equal(got, want)
    assert np.any(ws != 0)  # the core worked in it
