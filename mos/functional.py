"""Stateless MoS ops over NumPy arrays and any DLPack tensor (torch tensors included).

Outputs are allocated in the input's own library (NumPy for NumPy, `x.new_zeros` for torch)
unless given; N-D inputs are flattened to rows. Every call validates before it writes.
"""
from __future__ import annotations

import functools
import inspect
import math
import re
from contextlib import nullcontext

import numpy as np

from . import _C

__all__ = ["assemble", "forward", "backward", "scatter_add", "workspace_bytes", "batched_forward",
           "batched_workspace_bytes", "segments_of"]


def _zeros_like_lib(ref, shape, dtype=None):
    if isinstance(ref, np.ndarray):
        return np.zeros(shape, dtype=dtype or ref.dtype)
    if hasattr(ref, "new_zeros"):
        return ref.new_zeros(shape) if dtype is None else ref.new_zeros(shape, dtype=dtype)
    return np.zeros(shape, dtype=dtype or np.float32)


def _tensor(obj, name, ndim=None, optional=False):
    """obj when it is a NumPy array or DLPack tensor with `ndim` dimensions (at least 1 when None);
    a TypeError or ValueError naming `name` otherwise. None passes when optional."""
    if obj is None and optional:
        return None
    if not (isinstance(obj, np.ndarray) or hasattr(obj, "__dlpack__")) or not hasattr(obj, "shape"):
        raise TypeError(f"{name}: expected a NumPy array or a DLPack tensor, got {type(obj).__name__}")
    dims = len(obj.shape)
    if (ndim is None and dims < 1) or (ndim is not None and dims != ndim):
        wanted = f"{ndim}-D" if ndim is not None else "at least 1-D"
        raise ValueError(f"{name}: expected a {wanted} array, got {dims}-D")
    return obj


def _columns(a, name, what):
    """The last dimension of `a`, which must be at least 1 (sizes are divided by it)."""
    n = int(a.shape[-1])
    if n < 1:
        raise ValueError(f"{name}: has no columns ({what} = 0); the adapter needs at least one")
    return n


def _stream(stream):
    """A CUDA stream handle as DLPack spells it (1: the legacy default stream), or None. NumPy
    integers become Python ints, the only kind producers' __dlpack__(stream=) take."""
    if stream is not None and (isinstance(stream, bool) or not isinstance(stream, (int, np.integer))):
        raise TypeError(f"stream: expected an int or None, got {type(stream).__name__}")
    if stream is not None and stream < 1:
        raise ValueError(f"stream={stream} is invalid: pass the stream to launch on (a cudaStream_t, "
                         "1 for the legacy default stream) or None")
    return None if stream is None else int(stream)


def _on_launch_stream(function):
    """Runs an op whose first argument decides the device with its stream= validated and, for a
    CUDA torch tensor, made torch's current stream for the call (core_bridge.on_stream): what the
    op allocates or copies then belongs to the stream that uses it."""
    first_name = next(iter(inspect.signature(function).parameters))

    @functools.wraps(function)
    def run(*args, stream=None, **kwargs):
        stream = _stream(stream)
        first = args[0] if args else kwargs.get(first_name)
        scope = nullcontext()
        if stream is not None and _is_torch(first) and _is_cuda(first):
            scope = _bridge().on_stream(first.device, stream)
        with scope:
            return function(*args, stream=stream, **kwargs)
    return run


def _bridge():
    """mos.torch.core_bridge, imported on the first CUDA torch tensor (NumPy callers never need torch)."""
    from .torch import core_bridge

    return core_bridge


def _rows(x, name):
    """(N, d) view of x with contiguous columns: flattens leading dimensions, copies if it must."""
    _tensor(x, name)
    if len(x.shape) == 2:
        flat = x
    else:
        flat = x.reshape(math.prod(int(d) for d in x.shape[:-1]), int(x.shape[-1]))
    strides_ok = _column_stride(flat) in (1, None)
    if not strides_ok:
        flat = np.ascontiguousarray(flat) if isinstance(flat, np.ndarray) else flat.contiguous()
    return flat


def _column_stride(a):
    if a.shape[-1] <= 1:
        return None
    if isinstance(a, np.ndarray):
        return a.strides[-1] // a.itemsize if a.strides[-1] >= 0 else -1
    if hasattr(a, "stride"):
        return a.stride(-1)
    return 1


@_on_launch_stream
def assemble(pool, index, r: int, *, stream=None):
    """The (r, l * shard_len) matrix whose row j concatenates shards index[j*l : (j+1)*l].

    Gives A for an A-pool and B^T for a B-pool (DESIGN section 1, vector sharding). CUDA calls
    run on `stream` (default: torch's current stream for torch tensors, else the legacy default
    stream); for torch tensors the output is allocated on that stream."""
    _tensor(pool, "pool", 2)
    n_index = int(_tensor(index, "index", 1).shape[0])
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
        raise TypeError(f"r: expected an int, got {type(r).__name__}")
    if r < 1 or n_index % r:
        raise ValueError(f"r must be a positive divisor of len(index)={n_index}, got {r!r}")
    rows = _zeros_like_lib(pool, (n_index, int(pool.shape[1])))
    _named(_C.assemble, {"rows": "pool"}, rows, pool, index, _launch_stream(pool, stream))
    return rows.reshape(r, n_index // r * int(pool.shape[1]))


@_on_launch_stream
def scatter_add(pool_grad, rows, index, *, stream=None):
    """pool_grad[index[i]] += rows[i] (indices distinct); the transpose of assemble. CUDA calls
    run on `stream` (default: torch's current stream for torch tensors)."""
    _tensor(pool_grad, "pool_grad", 2)
    _tensor(index, "index", 1)
    rows2 = _rows(rows, "rows")
    if int(rows2.shape[1]) != int(pool_grad.shape[1]):
        raise ValueError(f"rows: has {int(rows2.shape[1])} columns, pool_grad's shard length is "
                         f"{int(pool_grad.shape[1])}")
    _named(_C.scatter_add, {"pool": "pool_grad"}, pool_grad, rows2, index,
           _launch_stream(pool_grad, stream))
    return pool_grad


@_on_launch_stream
def forward(x, pool_a, index_a, pool_b, index_b, scale, out=None, *, h=None, weight=None,
            bias=None, workspace=None, stream=None):
    """y = scale * (x A^T) B^T, added into `out` when given (shape (..., d_out)).

    With `weight` (d_out, d_in) and optional `bias`, computes the whole layer
    x W^T + bias + scale * (x A^T) B^T (CPU). `h` (N, r) receives x A^T when given."""
    d_in, shard_len_a = _adapter_inputs(x, pool_a, index_a, pool_b, index_b)
    out = _tensor(out, "out", optional=True)
    _tensor(h, "h", 2, optional=True)
    _tensor(bias, "bias", 1, optional=True)
    _tensor(workspace, "workspace", 1, optional=True)
    x2 = _rows(x, "x")
    lead = tuple(x.shape[:-1])
    if weight is not None:
        d_out = int(_tensor(weight, "weight", 2).shape[0])
    elif out is not None:
        d_out = _columns(out, "out", "d_out")
    else:
        d_out = int(pool_b.shape[1]) * (d_in // shard_len_a)
    y, y2 = _output_rows(x, lead, d_out, out)
    if weight is not None:
        _named(_C.linear_forward_full, _OUT, y2, x2, weight, bias, pool_a, index_a, pool_b, index_b, scale)
    else:
        r = int(index_a.shape[0]) * shard_len_a // d_in
        workspace, stream = _cuda_context(x2, workspace, stream, int(x2.shape[0]), d_in,
                                          d_out, max(r, 1), False, h is not None)
        _named(_C.linear_forward, _OUT, y2, x2, pool_a, index_a, pool_b, index_b, scale, h, workspace,
               stream)
    return y


@_on_launch_stream
def backward(dy, x, pool_a, index_a, pool_b, index_b, scale, *, dx=None, dpool_a=None,
             dpool_b=None, h=None, need_dx=True, workspace=None, stream=None):
    """Returns (dx, dpool_a, dpool_b) of y = scale * (x A^T) B^T for the upstream gradient dy.

    Given arrays are accumulated into (so several layers can share one pool gradient); missing
    ones are allocated as zeros (dx only when need_dx)."""
    d_in, shard_len_a = _adapter_inputs(x, pool_a, index_a, pool_b, index_b)
    _columns(_tensor(dy, "dy"), "dy", "d_out")
    for name, value, ndim in (("dx", dx, None), ("dpool_a", dpool_a, 2), ("dpool_b", dpool_b, 2),
                              ("h", h, 2), ("workspace", workspace, 1)):
        _tensor(value, name, ndim, optional=True)
    if not isinstance(need_dx, (bool, np.bool_)):
        raise TypeError(f"need_dx: expected a bool, got {type(need_dx).__name__}")
    x2, dy2 = _rows(x, "x"), _rows(dy, "dy")
    # Gradients allocated here are made like x or the pools: their errors are those arrays' errors.
    renames = {name: source for name, source, given in (("dx", "x", dx), ("dpool_a", "pool_a", dpool_a),
                                                         ("dpool_b", "pool_b", dpool_b)) if given is None}
    if need_dx and dx is None:
        dx = _zeros_like_lib(x, tuple(x.shape))
    dx2 = None
    if dx is not None:
        dx2 = _flat_view(dx, "dx", "d_in")
    if dpool_a is None:
        dpool_a = _zeros_like_lib(pool_a, tuple(pool_a.shape))
    if dpool_b is None:
        dpool_b = _zeros_like_lib(pool_b, tuple(pool_b.shape))
    r = int(index_a.shape[0]) * shard_len_a // d_in
    workspace, stream = _cuda_context(x2, workspace, stream, int(x2.shape[0]), d_in,
                                      int(dy2.shape[1]), max(r, 1), True, h is not None)
    _named(_C.linear_backward, renames, dx2, dpool_a, dpool_b, dy2, x2, pool_a, index_a, pool_b,
           index_b, scale, h, workspace, stream)
    return dx, dpool_a, dpool_b


def workspace_bytes(n_rows, d_in, d_out, r, itemsize, backward=False, with_h=False,
                    cuda=False) -> int:
    """Scratch bytes one linear call needs. CUDA callers must pass a workspace this large, sized
    with cuda=True (which adds the slice cuBLAS works in)."""
    return _C.linear_workspace_bytes(n_rows, d_in, d_out, r, itemsize, backward, with_h, cuda)


@_on_launch_stream
def batched_forward(x, pool_a, index_a, pool_b, index_b, scales, adapter_ids, out=None, *,
                    ranks=None, strategy="auto", segments=None, workspace=None, stream=None):
    """Many adapters in one call: out[n] += scales[a] * (x[n] A_a^T) B_a^T with a = adapter_ids[n].

    Rows with id -1 are left as they are (a fresh `out` is zero there). The K adapters' pools are
    concatenated into `pool_a` / `pool_b` and `index_a` / `index_b` are (K, max_rank * l) rows of
    those concatenated pools (adapter a uses the first ranks[a] * l entries; all without `ranks`);
    `scales` is (K,) float32 or float64; `adapter_ids` has one int32 id per row of x (leading
    dimensions flattened). `strategy`: "per_row" (every row reads its adapter's shards), "grouped"
    (rows of one adapter share one assembly; `segments` gives the groups as row offsets, else they
    are found from the ids) or "auto" (grouped when `segments` is given or, on CPU, when some
    adapter has several rows)."""
    if not isinstance(strategy, str) or strategy not in ("auto", "per_row", "grouped"):
        raise ValueError(f"strategy must be 'auto', 'per_row' or 'grouped', got {strategy!r}")
    if segments is not None and strategy == "per_row":
        raise ValueError("segments: only the grouped strategy uses segments; pass strategy='grouped' "
                         "or 'auto'")
    d_in, shard_len_a = _pool_sizes(x, pool_a, pool_b, index_a, index_b, 2)
    _tensor(workspace, "workspace", 1, optional=True)
    x2 = _rows(x, "x")
    lead = tuple(x.shape[:-1])
    n_rows = int(x2.shape[0])
    if out is not None:
        d_out = _columns(out, "out", "d_out")
    else:
        d_out = int(pool_b.shape[1]) * (d_in // shard_len_a)
    adapter_ids = _int32_like(adapter_ids, x, "adapter_ids")
    if len(adapter_ids.shape) != 1:
        adapter_ids = adapter_ids.reshape(-1)
    if ranks is not None:
        ranks = _int32_like(ranks, x, "ranks")
    if segments is not None:
        segments = _int32_like(segments, x, "segments")
    if isinstance(scales, (list, tuple)):
        scales = _float_like(scales, x)
    else:
        _tensor(scales, "scales", 1)
    y, y2 = _output_rows(x, lead, d_out, out)
    grouped = strategy == "grouped" or (strategy == "auto" and _auto_grouped(x2, adapter_ids, segments))
    if workspace is None and _is_cuda(x2) and _is_torch(x2):
        max_rank = max(int(index_a.shape[1]) * shard_len_a // d_in, 1)
        nbytes = batched_workspace_bytes(n_rows, max_rank, x2.element_size(), grouped)
        workspace = _bridge().workspace(nbytes, x2.device)
    stream = _launch_stream(x2, stream)
    _named(_C.batched_forward, _OUT, y2, x2, pool_a, index_a, pool_b, index_b, scales, adapter_ids,
           ranks, grouped, segments if grouped else None, workspace, stream)
    return y


def batched_workspace_bytes(n_rows, max_rank, itemsize, grouped=False) -> int:
    """Device scratch bytes one CUDA batched_forward call needs (segments or not)."""
    return _C.batched_workspace_bytes(n_rows, max_rank, itemsize, grouped)


def segments_of(adapter_ids):
    """Row offsets of the runs of equal consecutive ids: [0, s_1, ..., N] (int32 NumPy)."""
    if hasattr(adapter_ids, "cpu") and not isinstance(adapter_ids, np.ndarray):
        adapter_ids = adapter_ids.cpu()
    ids = np.asarray(adapter_ids).reshape(-1)
    if ids.size and (ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer)):
        raise TypeError(f"adapter_ids: expected integers, got {ids.dtype}")
    if ids.size == 0:
        return np.zeros(1, dtype=np.int32)
    starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
    return np.concatenate((starts, [ids.size])).astype(np.int32)


def _auto_grouped(x, adapter_ids, segments):
    if segments is not None:
        return True
    if _is_cuda(x):
        return False
    ids = np.asarray(adapter_ids if isinstance(adapter_ids, np.ndarray) else adapter_ids.cpu())
    active = ids[ids >= 0]
    return active.size > len(np.unique(active))  # some adapter has several rows


def _is_cuda(a):
    return not isinstance(a, np.ndarray) and hasattr(a, "__dlpack_device__") \
        and a.__dlpack_device__()[0] == 2


def _int32_like(values, ref, name):
    """values as an int32 array of ref's library and device (lists and NumPy arrays converted).
    Every value is range-checked before the narrowing cast, which would otherwise wrap."""
    torch = None
    if not isinstance(ref, np.ndarray) and hasattr(ref, "new_tensor"):
        import torch
    if torch is not None and isinstance(values, torch.Tensor):
        if values.dtype == torch.bool or values.dtype.is_complex:
            raise TypeError(f"{name}: expected integers, got {values.dtype}")
        if values.dtype != torch.int32 and not values.dtype.is_floating_point:
            _require_int32_range(values.min().item() if values.numel() else 0,
                                 values.max().item() if values.numel() else 0, name)
            values = values.to(torch.int32)
        return values.to(ref.device).contiguous()
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError, OverflowError, RuntimeError) as error:
        raise TypeError(f"{name}: expected a sequence of integers ({error})") from None
    if arr.dtype != np.int32:
        if arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(f"{name}: expected integers, got {arr.dtype}")
        if arr.size:
            _require_int32_range(int(arr.min()), int(arr.max()), name)
        arr = arr.astype(np.int32)
    arr = arr if arr.flags.c_contiguous else arr.copy()  # (ascontiguousarray would make 0-D 1-D)
    return arr if torch is None else torch.as_tensor(arr, device=ref.device)


def _require_int32_range(low, high, name):
    if low < -2**31 or high >= 2**31:
        bad = low if low < -2**31 else high
        raise ValueError(f"{name}: value {bad} does not fit in int32")


def _float_like(values, ref):
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"scales: expected a sequence of real numbers ({error})") from None
    if isinstance(ref, np.ndarray) or not hasattr(ref, "new_tensor"):
        return arr
    import torch

    return torch.as_tensor(arr, dtype=torch.float64 if ref.dtype == torch.float64 else torch.float32,
                           device=ref.device)


def _adapter_inputs(x, pool_a, index_a, pool_b, index_b):
    """Checks the adapter's arrays enough to size the call: (d_in, A-pool shard length)."""
    return _pool_sizes(x, pool_a, pool_b, index_a, index_b, 1)


def _pool_sizes(x, pool_a, pool_b, index_a, index_b, index_ndim):
    d_in = _columns(_tensor(x, "x"), "x", "d_in")
    shard_len_a = _columns(_tensor(pool_a, "pool_a", 2), "pool_a", "shard length")
    _columns(_tensor(pool_b, "pool_b", 2), "pool_b", "shard length")
    _tensor(index_a, "index_a", index_ndim)
    _tensor(index_b, "index_b", index_ndim)
    if d_in % shard_len_a:
        raise ValueError(f"pool_a: shard length {shard_len_a} must divide x's d_in = {d_in}")
    return d_in, shard_len_a


def _flat_view(a, name, what):
    """(rows, last) view of `a` that shares its memory (outputs are written in place)."""
    a2 = a if len(a.shape) == 2 else a.reshape(math.prod(int(d) for d in a.shape[:-1]), int(a.shape[-1]))
    if not _shares_memory(a2, a):
        raise ValueError(f"{name}: cannot be viewed as (rows, {what}) without a copy; pass a contiguous {name}")
    return a2


def _output_rows(x, lead, d_out, out):
    """(y, its (rows, d_out) view): `out` when given (checked), else zeros in x's library."""
    y = _zeros_like_lib(x, lead + (d_out,)) if out is None else out
    if tuple(y.shape[:-1]) != lead:
        raise ValueError(f"out: leading shape {tuple(y.shape[:-1])} does not match x's {lead}")
    return y, _flat_view(y, "out", "d_out")


def _cuda_context(x, workspace, stream, n_rows, d_in, d_out, r, backward, with_h):
    """For CUDA torch tensors: a workspace from torch's allocator and torch's current stream."""
    if not _is_cuda(x):
        return workspace, stream
    if workspace is None and _is_torch(x):
        nbytes = workspace_bytes(n_rows, d_in, d_out, r, x.element_size(), backward, with_h, True)
        workspace = _bridge().workspace(nbytes, x.device)
    return workspace, _launch_stream(x, stream)


def _is_torch(a):
    return type(a).__module__.startswith("torch") and hasattr(a, "data_ptr")


def _launch_stream(x, stream):
    """The stream a CUDA call runs on: the one given, else torch's current stream for a torch
    tensor (where torch allocated the outputs), else the legacy default stream (1). Always named:
    the binding passes it to every CUDA producer's __dlpack__, which orders its pending writes
    before the launch."""
    if stream is not None or not _is_cuda(x):
        return stream
    if _is_torch(x):
        return _bridge().launch_stream(x.device)
    return 1


_OUT = {"y": "out"}


def _named(function, renames, *args):
    """Calls a mos._C entry point; an error about one of its arguments is re-raised under the name
    this module's caller used (`out` for the core's `y`). CUDA torch tensors go over as
    core_bridge exports: Tensor.__dlpack__ refuses a GPU other than the current one."""
    if any(_is_torch(a) and a.is_cuda for a in args):
        export = _bridge().Export
        args = tuple(export(a) if _is_torch(a) and a.is_cuda else a for a in args)
    try:
        return function(*args)
    except (TypeError, ValueError, BufferError) as error:
        message = str(error)
        for inner, outer in renames.items():
            message = re.sub(rf"(?<![\w.]){inner}(?![\w])", outer, message)
        if message == str(error):
            raise
        raise type(error)(message) from None


def _shares_memory(view, base):
    if view is base:
        return True
    if isinstance(view, np.ndarray):
        return np.shares_memory(view, base) or view.size == 0
    if hasattr(view, "data_ptr"):
        return view.numel() == 0 or view.data_ptr() == base.data_ptr()
    return True
