"""Stateless MoS ops over NumPy arrays and any DLPack tensor (torch tensors included).

Outputs are allocated in the input's own library (NumPy for NumPy, `x.new_zeros` for torch)
unless given; N-D inputs are flattened to rows. Every call validates before it writes.
"""
from __future__ import annotations

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


def _rows(x, name):
    """(N, d) view of x with contiguous columns: flattens leading dimensions, copies if it must."""
    if not hasattr(x, "shape") or len(x.shape) < 1:
        raise TypeError(f"{name}: expected an array with at least one dimension, got {type(x).__name__}")
    if len(x.shape) == 2:
        flat = x
    else:
        flat = x.reshape(-1, x.shape[-1])
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


def assemble(pool, index, r: int, *, stream=None):
    """The (r, l * shard_len) matrix whose row j concatenates shards index[j*l : (j+1)*l].

    Gives A for an A-pool and B^T for a B-pool (DESIGN section 1, vector sharding). CUDA calls
    run on `stream` (default: torch's current stream for torch tensors), where the output was
    allocated."""
    n_index = int(index.shape[0])
    if not isinstance(r, (int, np.integer)) or r < 1 or n_index % r:
        raise ValueError(f"r must be a positive divisor of len(index)={n_index}, got {r!r}")
    rows = _zeros_like_lib(pool, (n_index, int(pool.shape[1])))
    _C.assemble(rows, pool, index, _launch_stream(pool, stream))
    return rows.reshape(r, n_index // r * int(pool.shape[1]))


def scatter_add(pool_grad, rows, index, *, stream=None):
    """pool_grad[index[i]] += rows[i] (indices distinct); the transpose of assemble. CUDA calls
    run on `stream` (default: torch's current stream for torch tensors)."""
    _C.scatter_add(pool_grad, _rows(rows, "rows"), index, _launch_stream(pool_grad, stream))
    return pool_grad


def forward(x, pool_a, index_a, pool_b, index_b, scale, out=None, *, h=None, weight=None,
            bias=None, workspace=None, stream=None):
    """y = scale * (x A^T) B^T, added into `out` when given (shape (..., d_out)).

    With `weight` (d_out, d_in) and optional `bias`, computes the whole layer
    x W^T + bias + scale * (x A^T) B^T (CPU). `h` (N, r) receives x A^T when given."""
    x2 = _rows(x, "x")
    lead = tuple(x.shape[:-1])
    if weight is not None:
        d_out = int(weight.shape[0])
    elif out is not None:
        d_out = int(out.shape[-1])
    else:
        d_in = int(x.shape[-1])
        d_out = int(pool_b.shape[1]) * (d_in // max(int(pool_a.shape[1]), 1))
    y, y2 = _output_rows(x, lead, d_out, out)
    if weight is not None:
        _C.linear_forward_full(y2, x2, weight, bias, pool_a, index_a, pool_b, index_b, scale)
    else:
        r = int(index_a.shape[0]) * int(pool_a.shape[1]) // int(x2.shape[1])
        workspace, stream = _cuda_context(x2, workspace, stream, int(x2.shape[0]), int(x2.shape[1]),
                                          d_out, max(r, 1), False, h is not None)
        _C.linear_forward(y2, x2, pool_a, index_a, pool_b, index_b, scale, h, workspace, stream)
    return y


def backward(dy, x, pool_a, index_a, pool_b, index_b, scale, *, dx=None, dpool_a=None,
             dpool_b=None, h=None, need_dx=True, workspace=None, stream=None):
    """Returns (dx, dpool_a, dpool_b) of y = scale * (x A^T) B^T for the upstream gradient dy.

    Given arrays are accumulated into (so several layers can share one pool gradient); missing
    ones are allocated as zeros (dx only when need_dx)."""
    x2, dy2 = _rows(x, "x"), _rows(dy, "dy")
    if need_dx and dx is None:
        dx = _zeros_like_lib(x, tuple(x.shape))
    dx2 = None
    if dx is not None:
        dx2 = dx.reshape(-1, dx.shape[-1]) if len(dx.shape) != 2 else dx
        if not _shares_memory(dx2, dx):
            raise ValueError("dx: cannot be viewed as (rows, d_in) without a copy")
    if dpool_a is None:
        dpool_a = _zeros_like_lib(pool_a, tuple(pool_a.shape))
    if dpool_b is None:
        dpool_b = _zeros_like_lib(pool_b, tuple(pool_b.shape))
    r = int(index_a.shape[0]) * int(pool_a.shape[1]) // max(int(x2.shape[1]), 1)
    workspace, stream = _cuda_context(x2, workspace, stream, int(x2.shape[0]), int(x2.shape[1]),
                                      int(dy2.shape[1]), max(r, 1), True, h is not None)
    _C.linear_backward(dx2, dpool_a, dpool_b, dy2, x2, pool_a, index_a, pool_b, index_b, scale,
                       h, workspace, stream)
    return dx, dpool_a, dpool_b


def workspace_bytes(n_rows, d_in, d_out, r, itemsize, backward=False, with_h=False,
                    cuda=False) -> int:
    """Scratch bytes one linear call needs. CUDA callers must pass a workspace this large, sized
    with cuda=True (which adds the slice cuBLAS works in)."""
    return _C.linear_workspace_bytes(n_rows, d_in, d_out, r, itemsize, backward, with_h, cuda)


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
    if strategy not in ("auto", "per_row", "grouped"):
        raise ValueError(f"strategy must be 'auto', 'per_row' or 'grouped', got {strategy!r}")
    x2 = _rows(x, "x")
    lead = tuple(x.shape[:-1])
    n_rows, d_in = int(x2.shape[0]), int(x2.shape[1])
    if out is not None:
        d_out = int(out.shape[-1])
    else:
        d_out = int(pool_b.shape[1]) * (d_in // max(int(pool_a.shape[1]), 1))
    y, y2 = _output_rows(x, lead, d_out, out)
    adapter_ids = _int32_like(adapter_ids, x, "adapter_ids")
    if len(adapter_ids.shape) != 1:
        adapter_ids = adapter_ids.reshape(-1)
    if ranks is not None:
        ranks = _int32_like(ranks, x, "ranks")
    if segments is not None:
        segments = _int32_like(segments, x, "segments")
    if isinstance(scales, (list, tuple)):
        scales = _float_like(scales, x)
    grouped = strategy == "grouped" or (strategy == "auto" and _auto_grouped(x2, adapter_ids, segments))
    if workspace is None and _is_cuda(x2) and _is_torch(x2):
        import torch

        width = int(index_a.shape[1]) if len(index_a.shape) == 2 else 1
        max_rank = max(width * int(pool_a.shape[1]) // max(d_in, 1), 1)
        nbytes = batched_workspace_bytes(n_rows, max_rank, x2.element_size(), grouped)
        workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=x2.device)
    stream = _launch_stream(x2, stream)
    _C.batched_forward(y2, x2, pool_a, index_a, pool_b, index_b, scales, adapter_ids, ranks,
                       grouped, segments if grouped else None, workspace, stream)
    return y


def batched_workspace_bytes(n_rows, max_rank, itemsize, grouped=False) -> int:
    """Device scratch bytes one CUDA batched_forward call needs (segments or not)."""
    return _C.batched_workspace_bytes(n_rows, max_rank, itemsize, grouped)


def segments_of(adapter_ids):
    """Row offsets of the runs of equal consecutive ids: [0, s_1, ..., N] (int32 NumPy)."""
    ids = np.asarray(adapter_ids).reshape(-1)
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
    """values as an int32 array of ref's library and device (lists and NumPy arrays converted)."""
    if isinstance(ref, np.ndarray) or not hasattr(ref, "new_tensor"):
        arr = np.asarray(values)
        if arr.dtype != np.int32:
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise TypeError(f"{name}: expected integers, got {arr.dtype}")
            arr = arr.astype(np.int32)
        return np.ascontiguousarray(arr)
    import torch

    if isinstance(values, torch.Tensor):
        if values.dtype != torch.int32 and not values.dtype.is_floating_point:
            values = values.to(torch.int32)
        return values.to(ref.device).contiguous()
    return torch.as_tensor(np.asarray(values, dtype=np.int32), device=ref.device)


def _float_like(values, ref):
    if isinstance(ref, np.ndarray) or not hasattr(ref, "new_tensor"):
        return np.asarray(values, dtype=np.float64)
    import torch

    return torch.as_tensor(values, dtype=torch.float64 if ref.dtype == torch.float64 else torch.float32,
                           device=ref.device)


def _output_rows(x, lead, d_out, out):
    """(y, its (rows, d_out) view): `out` when given (checked), else zeros in x's library."""
    y = _zeros_like_lib(x, lead + (d_out,)) if out is None else out
    if tuple(y.shape[:-1]) != lead:
        raise ValueError(f"out: leading shape {tuple(y.shape[:-1])} does not match x's {lead}")
    y2 = y.reshape(-1, d_out) if len(y.shape) != 2 else y
    if not _shares_memory(y2, y):
        raise ValueError("out: cannot be viewed as (rows, d_out) without a copy; pass a contiguous out")
    return y, y2


def _cuda_context(x, workspace, stream, n_rows, d_in, d_out, r, backward, with_h):
    """For CUDA torch tensors: a workspace from torch's allocator and torch's current stream."""
    if not _is_cuda(x):
        return workspace, stream
    if workspace is None and _is_torch(x):
        import torch

        nbytes = workspace_bytes(n_rows, d_in, d_out, r, x.element_size(), backward, with_h, True)
        workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=x.device)
    return workspace, _launch_stream(x, stream)


def _is_torch(a):
    return type(a).__module__.startswith("torch") and hasattr(a, "data_ptr")


def _launch_stream(x, stream):
    """The stream a CUDA call runs on: the one given, else torch's current stream for a torch
    tensor (where torch allocated the outputs), else None (the legacy default stream)."""
    if stream is not None or not _is_cuda(x) or not _is_torch(x):
        return stream
    import torch

    # torch reports the legacy default stream as 0, which DLPack spells 1.
    return torch.cuda.current_stream(x.device).cuda_stream or 1


def _shares_memory(view, base):
    if view is base:
        return True
    if isinstance(view, np.ndarray):
        return np.shares_memory(view, base) or view.size == 0
    if hasattr(view, "data_ptr"):
        return view.numel() == 0 or view.data_ptr() == base.data_ptr()
    return True
