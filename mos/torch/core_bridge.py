"""The one door from torch tensors into mos._C: whether the core runs a tensor's device and dtype,
how a tensor is handed over, which CUDA stream a call launches on, and the workspace it works in.

Every caller that gives torch tensors to the core comes through here: the differentiable op
(ops.py), the adapter store and the mixed batch (store.py, mixed_batch.py), mos.functional for CUDA
torch tensors, and the serving benchmark. It also keeps the core's OpenBLAS single-threaded next
to torch (below).

Handing over. Capsules come straight from torch's C exporter (about 0.3 us per tensor), not from
Tensor.__dlpack__, which is Python (about 10 us) and refuses tensors on a GPU other than the current
one; the core selects the tensor's device itself. Not as NumPy views either, for tensors the caller
does not own: Tensor.numpy() marks the storage non-resizable for good, and FSDP2 frees its gathered
parameters by resizing their storage to zero. Tensors the caller owns for good (the store's packed
pools) get a reusable handle instead (handle()).

Streams. A CUDA call launches on torch's current stream of the tensors' device, where torch
allocated its inputs, outputs and workspace; on_stream() makes another launch stream current for a
block, after it waits for the work queued so far, so that every allocation and copy of the call
belongs to the stream that uses it (the caching allocator reuses a block only after its stream
reached the free)."""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from .. import _C

__all__ = ["CORE_DTYPES", "CUDA_BUILT", "Export", "add_update", "batched_forward", "capsule", "core_supports",
           "handle", "launch_stream", "linear_backward", "linear_forward", "linear_options", "on_stream",
           "refuse_capture", "workspace"]

CORE_DTYPES = {
    "cpu": frozenset({torch.float32, torch.float64}),
    "cuda": frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16}),
}
CUDA_BUILT = bool(_C.build_info()["cuda"])
_DLPACK_CUDA = 2  # DLDeviceType kDLCUDA
_LEGACY_DEFAULT_STREAM = 1  # as DLPack spells it; torch reports it as 0
_MIN_WORKSPACE = 256  # bytes: an empty tensor has no data pointer, which the core refuses

# Next to torch, torch's thread pool owns the cores. The adapter's GEMMs are thin (rank r) and
# memory-bound, while a second, busy-waiting BLAS pool fights torch's for the same cores (one
# d=1024, N=256, r=8 call: 0.5 ms single-threaded, 56 ms with 2 threads on a busy 2-core machine).
# So the core's BLAS runs single-threaded unless the user chose a count (OPENBLAS_NUM_THREADS, or
# mos.set_num_threads() after this import). Large calls still use every torch thread: the core cuts
# them into row chunks that run on torch's own OpenMP team (csrc/cpu_team.c), but only while its
# BLAS stays single-threaded.
if "OPENBLAS_NUM_THREADS" not in os.environ:
    _C.set_num_threads(1)

_to_dlpack_versioned = getattr(torch._C, "_to_dlpack_versioned", None)
_to_dlpack = getattr(torch._C, "_to_dlpack", None)


def core_supports(tensor: torch.Tensor) -> bool:
    """True when mos._C can run a call whose tensors have this device and dtype."""
    kind = tensor.device.type
    if kind == "cuda" and not CUDA_BUILT:
        return False
    return tensor.dtype in CORE_DTYPES.get(kind, ())


# ---------------------------------------------------------------------------- handing tensors over


class Export:
    """One CUDA tensor offered to mos._C over DLPack, its capsules from torch's C exporter.

    Refuses, as Tensor.__dlpack__ does, what a capsule cannot carry (autograd, the conjugate bit),
    but not a device other than the current one, and does no stream synchronisation of its own:
    the call launches on the stream its caller chose (launch_stream, on_stream)."""

    __slots__ = ("_tensor", "_device")

    def __init__(self, tensor: torch.Tensor):
        if tensor.requires_grad:
            raise BufferError("Can't export tensors that require gradient, use tensor.detach()")
        if tensor.is_conj():
            raise BufferError("Can't export tensors with the conjugate bit set")
        self._tensor = tensor
        self._device = (_DLPACK_CUDA, tensor.device.index or 0)

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        if max_version is None or max_version[0] < 1:
            return _to_dlpack(self._tensor)
        return _to_dlpack_versioned(self._tensor)

    def __dlpack_device__(self):
        return self._device


def handle(tensor):
    """A reusable handle mos._C reads a tensor through, for tensors the caller owns (the store's
    packed pools, a batch's ids): a zero-copy NumPy view on CPU, an Export on CUDA. Detached first:
    these are never differentiated."""
    if tensor is None:
        return None
    tensor = tensor.detach()
    if tensor.device.type == "cpu":
        return tensor.numpy()
    if _to_dlpack_versioned is None or _to_dlpack is None or tensor.device.type != "cuda":
        return tensor  # torch's own __dlpack__
    return Export(tensor)


def capsule(tensor):
    """A one-shot DLPack capsule of a tensor, straight from torch's C exporter. Leaves the storage
    resizable (see the module docstring). Refuses a DTensor, whose capsule would not be the whole
    tensor."""
    if tensor is None:
        return None
    if tensor.requires_grad or type(tensor) is not torch.Tensor:  # a plain tensor exports as it is
        tensor = tensor.detach()
        if type(tensor) is not torch.Tensor:
            _check_plain(tensor)
    if _to_dlpack_versioned is None:
        return handle(tensor)
    return _to_dlpack_versioned(tensor)


def _check_plain(tensor):
    from .sharding import is_sharded

    if is_sharded(tensor):
        raise TypeError("mos got a DTensor (a parameter still sharded by FSDP2): the pools must be sharded "
                        "by the root's fully_shard(model), which gathers them before the layers run, not "
                        "by a fully_shard of their own")


# ---------------------------------------------------------------------------- streams and workspace


def launch_stream(device) -> int:
    """The stream a CUDA call on `device` launches on: torch's current stream there, as DLPack
    spells it (torch reports the legacy default stream as 0, DLPack as 1)."""
    return torch.cuda.current_stream(device).cuda_stream or _LEGACY_DEFAULT_STREAM


@contextmanager
def on_stream(device, stream):
    """Inside the block, `stream` (a cudaStream_t as DLPack spells it; None: no change) is torch's
    current stream on `device`, after waiting for the work queued on the stream current before.
    So the inputs written there are ready, and what the block allocates (outputs, workspace,
    copies) belongs to the stream that uses it: the caching allocator cannot hand it to other
    work while the launch still runs."""
    device = torch.device(device)
    current = torch.cuda.current_stream(device)
    if stream is None or stream == (current.cuda_stream or _LEGACY_DEFAULT_STREAM):
        yield
        return
    if stream == _LEGACY_DEFAULT_STREAM:
        launch = torch.cuda.default_stream(device)
    else:
        launch = torch.cuda.ExternalStream(stream, device=device)
    launch.wait_stream(current)
    with torch.cuda.stream(launch):
        yield


def workspace(nbytes: int, device) -> torch.Tensor:
    """Scratch bytes for one CUDA call, from torch's caching allocator on the current stream."""
    return torch.empty(max(int(nbytes), _MIN_WORKSPACE), dtype=torch.uint8, device=device)


def linear_options(x, n_rows, d_in, d_out, rank, backward, with_h) -> dict:
    """workspace/stream keywords of one linear call: CUDA needs both, the CPU path allocates its own."""
    if x.device.type != "cuda":
        return {}
    nbytes = _C.linear_workspace_bytes(n_rows, d_in, d_out, rank, x.element_size(), backward, with_h, True)
    return {"workspace": capsule(workspace(nbytes, x.device)), "stream": launch_stream(x.device)}


def linear_forward(y, x, pool_a, index_a, pool_b, index_b, scale, h, rank):
    """y += scale (x A^T) B^T (mos._C.linear_forward); h, when given, receives x A^T. Every tensor
    is this call's torch tensor."""
    _C.linear_forward(capsule(y), capsule(x), capsule(pool_a), capsule(index_a), capsule(pool_b),
                      capsule(index_b), scale, h=capsule(h),
                      **linear_options(x, x.shape[0], x.shape[1], y.shape[1], rank, False, h is not None))


# add_update's exporter: torch's C exporter straight, capsule() where this torch has none.
_plain_export = _to_dlpack_versioned or capsule


def add_update(y, x, pool_a, index_a, pool_b, index_b, scale):
    """y += scale (x A^T) B^T in place over the last dimension, the leading ones being rows
    (mos._C.add_update), for a CPU call without autograd (decode.py). The capsules skip capsule()'s
    detach and DTensor check: nothing here is differentiated, and the caller passes plain pools."""
    export = _plain_export
    _C.add_update(export(y), export(x), export(pool_a), export(index_a), export(pool_b), export(index_b),
                  scale)


def linear_backward(dx, dpool_a, dpool_b, dy, x, pool_a, index_a, pool_b, index_b, scale, h, rank):
    """Accumulates into dx, dpool_a, dpool_b (each may be None) the gradients of
    y = scale (x A^T) B^T for the upstream dy (mos._C.linear_backward)."""
    _C.linear_backward(capsule(dx), capsule(dpool_a), capsule(dpool_b), capsule(dy), capsule(x),
                       capsule(pool_a), capsule(index_a), capsule(pool_b), capsule(index_b), scale,
                       h=capsule(h),
                       **linear_options(x, x.shape[0], x.shape[1], dy.shape[1], rank, True, h is not None))


def refuse_capture(what: str) -> None:
    """Raises RuntimeError when torch is capturing a CUDA graph on the current stream: `what`
    copies from host memory to the GPU, which a capture forbids."""
    if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{what} copies from host memory to the GPU, which a CUDA graph capture "
                           f"does not allow; capture mos._C.batched_forward with device-resident ids "
                           f"instead (docs/serving.md, CUDA graphs)")


def batched_forward(out, x, pool_a, index_a, pool_b, index_b, scales, ids, *, ranks=None, grouped=False,
                    segments=None, max_rank=1):
    """out += each row's adapter update (mos._C.batched_forward). `out` and `x` are this call's
    torch tensors; the others are handles made once (handle()) or None."""
    options = {}
    if x.device.type == "cuda":
        nbytes = _C.batched_workspace_bytes(x.shape[0], max_rank, x.element_size(), grouped)
        options = {"workspace": capsule(workspace(nbytes, x.device)), "stream": launch_stream(x.device)}
    _C.batched_forward(capsule(out), capsule(x), pool_a, index_a, pool_b, index_b, scales, ids,
                       ranks=ranks, grouped=grouped, segments=segments, **options)

