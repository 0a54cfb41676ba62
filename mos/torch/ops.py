"""The MoS adapter product as differentiable torch ops over the C core.

    y = base + scale * (x A^T) B^T,   A = pool_a[index_a] viewed (r, d_in),  B^T = pool_b[index_b] viewed (r, d_out)

Two front doors share one implementation:
  * eager mode uses a torch.autograd.Function (a custom op's dispatcher adds ~20 us per call,
    which is most of a small layer's budget);
  * torch.compile sees the custom ops ``mos::linear_forward`` / ``mos::linear_backward``, with
    fake kernels for tracing and autograd registered, so a training step compiles without
    graph breaks and the backward op lands in the compiled backward graph.

Tensors reach ``mos._C`` zero-copy through core_bridge (DLPack capsules from torch's C exporter);
CUDA work runs on the current stream. Device/dtype pairs the core was not built for (CPU
half precision, MPS, CUDA without a CUDA build) run a pure-torch gather + matmul fallback with
the same semantics, so a layer works everywhere and is fast where the core runs.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import core_bridge
from .core_bridge import core_supports
from .pool_grads import pool_grad_buffers

__all__ = ["adapter_linear", "core_supports", "linear_with_adapter", "linear_with_adapter_applies"]

_CPU_DTYPES = core_bridge.CORE_DTYPES["cpu"]
_PLAIN = (torch.nn.Parameter, torch.Tensor)


# ---------------------------------------------------------------------------- shapes


def _dims(x, pool_a, index_a, pool_b):
    """(n_rows, d_in, d_out, rank, shards_per_vector) of one call."""
    n_rows, d_in = x.shape
    shards = d_in // pool_a.shape[1]
    return n_rows, d_in, pool_b.shape[1] * shards, index_a.shape[0] // shards, shards


def _as_rows(t):
    """t itself when it is row-strided with unit column stride (what the core takes), else a copy."""
    rows, cols = t.shape
    if (cols <= 1 or t.stride(1) == 1) and (rows <= 1 or t.stride(0) >= cols):
        return t
    return t.contiguous()


def _check_inputs(x, pool_a, index_a, pool_b, index_b, base):
    dtype = x.dtype
    if (pool_a.dtype == dtype and pool_b.dtype == dtype and (base is None or base.dtype == dtype)
            and index_a.dtype == torch.int32 and index_b.dtype == torch.int32 and index_a.dim() == 1
            and index_b.dim() == 1 and pool_a.dim() == 2 and pool_b.dim() == 2 and x.shape[1]
            and pool_a.shape[1] and not x.shape[1] % pool_a.shape[1]):
        return  # the common case, checked cheaply; the core validates sizes and ranges itself
    for name, t in (("pool_a", pool_a), ("pool_b", pool_b)):
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D (shards, shard length) tensor, got shape {tuple(t.shape)}")
    if not x.shape[1]:
        raise ValueError("x: has no columns (d_in = 0); the adapter needs at least one")
    for name, t in (("pool_a", pool_a), ("pool_b", pool_b), ("base", base)):
        if t is not None and t.dtype != dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from x's {dtype}; cast x to the pools' dtype")
    for name, t in (("index_a", index_a), ("index_b", index_b)):
        if t.dtype != torch.int32 or t.dim() != 1:
            raise TypeError(f"{name}: expected a 1-D int32 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    raise ValueError(f"pool_a: shard length {pool_a.shape[1]} must divide d_in = {x.shape[1]}")


# ---------------------------------------------------------------------------- implementations


def _forward_impl(x, pool_a, index_a, pool_b, index_b, scale: float, base, save_h: bool):
    """(y, h): y = base + scale (x A^T) B^T as a new (N, d_out) tensor; h = x A^T (N, r) when
    save_h, else None."""
    n_rows, _, d_out, rank, _ = _dims(x, pool_a, index_a, pool_b)
    if not core_supports(x):
        return _fallback_forward(x, pool_a, index_a, pool_b, index_b, scale, base, save_h)
    x = _as_rows(x)
    if base is None:
        y = x.new_zeros((n_rows, d_out))
    else:
        y = base.clone(memory_format=torch.contiguous_format)
    h = x.new_empty((n_rows, rank)) if save_h else None
    core_bridge.linear_forward(y, x, pool_a.contiguous(), index_a, pool_b.contiguous(), index_b, scale, h,
                               rank)
    return y, h


def _backward_impl(dy, x, pool_a, index_a, pool_b, index_b, scale: float, h,
                   need_dx: bool, need_dpool_a: bool, need_dpool_b: bool, sink=None):
    """(dx, dpool_a, dpool_b), each None when not needed. Pool gradients are dense, pool-shaped,
    and hold the scatter-add of this layer's A/B gradients into the rows it gathered: fresh ones,
    or with a sink (pool_grads.py) the buffers the whole backward pass shares."""
    n_rows, _, _, rank, _ = _dims(x, pool_a, index_a, pool_b)
    if h is not None and h.shape[0] != n_rows:
        h = None  # forward did not keep x A^T: the core recomputes it
    if not core_supports(x):
        return _fallback_backward(dy, x, pool_a, index_a, pool_b, index_b, scale, h,
                                  need_dx, need_dpool_a, need_dpool_b, sink)
    x, dy = _as_rows(x), _as_rows(dy.to(x.dtype))
    dx = torch.zeros_like(x, memory_format=torch.contiguous_format) if need_dx else None
    dpool_a, dpool_b = pool_grad_buffers(pool_a, pool_b, need_dpool_a, need_dpool_b, sink)
    if dx is not None or dpool_a is not None or dpool_b is not None:
        core_bridge.linear_backward(dx, dpool_a, dpool_b, dy, x, pool_a.contiguous(), index_a,
                                    pool_b.contiguous(), index_b, scale, h, rank)
    return dx, dpool_a, dpool_b


def _assembled(pool_a, index_a, pool_b, index_b, rank):
    """(A, B^T) gathered from the pools: (r, d_in) and (r, d_out)."""
    return (_gathered(pool_a, index_a, rank, "index_a", "pool_a"),
            _gathered(pool_b, index_b, rank, "index_b", "pool_b"))


def _gathered(pool, index, rank, index_name, pool_name):
    """pool[index] as (rank, -1), with a ValueError naming the table for an index out of range (the
    core range-checks its tables; this torch path must too)."""
    bad = ValueError(f"{index_name}: values must be in [0, {pool.shape[0]}) (rows of {pool_name})")
    if index.is_cuda and index.numel() and not (int(index.min()) >= 0 and int(index.max()) < pool.shape[0]):
        raise bad  # checked up front: CUDA's index_select would fail with a device-side assert
    try:
        return pool.index_select(0, index.long()).reshape(rank, -1)
    except IndexError:  # CPU's index_select checks every index itself: no extra pass on the hot path
        raise bad from None


def _fallback_forward(x, pool_a, index_a, pool_b, index_b, scale, base, save_h):
    # The core checks this for the dtypes it runs; here (16-bit CPU pools, ...) a scale beyond the
    # dtype's range would silently turn every output into inf/NaN.
    if not abs(scale) <= torch.finfo(pool_a.dtype).max:
        raise ValueError(f"scale = {scale:g} is not finite in {str(pool_a.dtype).removeprefix('torch.')}, "
                         f"the pools' dtype")
    _, _, _, rank, _ = _dims(x, pool_a, index_a, pool_b)
    a, bt = _assembled(pool_a, index_a, pool_b, index_b, rank)
    h = x @ a.T
    y = torch.addmm(base, h, bt, alpha=scale) if base is not None else (h @ bt).mul_(scale)
    return y, (h if save_h else None)


def _fallback_backward(dy, x, pool_a, index_a, pool_b, index_b, scale, h, need_dx, need_dpool_a,
                       need_dpool_b, sink=None):
    _, _, _, rank, shards = _dims(x, pool_a, index_a, pool_b)
    a, bt = _assembled(pool_a, index_a, pool_b, index_b, rank)
    dy = dy.to(x.dtype)
    g = (dy @ bt.T).mul_(scale)
    dx = g @ a if need_dx else None
    dpool_a, dpool_b = pool_grad_buffers(pool_a, pool_b, need_dpool_a, need_dpool_b, sink)
    if need_dpool_a:
        dpool_a.index_add_(0, index_a.long(), (g.T @ x).reshape(rank * shards, -1))
    if need_dpool_b:
        h = x @ a.T if h is None else h
        dpool_b.index_add_(0, index_b.long(), (h.T @ dy).mul_(scale).reshape(rank * shards, -1))
    return dx, dpool_a, dpool_b


# ---------------------------------------------------------------------------- eager autograd


class _AdapterLinear(torch.autograd.Function):
    # token and sink (pool_grads.tap): with a sink, the pools' gradients go into the buffers the
    # backward pass shares, and the token's node hands them over; the pools themselves get none here.
    @staticmethod
    def forward(ctx, x, pool_a, index_a, pool_b, index_b, scale, base, save_h, token, sink):
        y, h = _forward_impl(x, pool_a, index_a, pool_b, index_b, scale, base, save_h)
        ctx.save_for_backward(x, pool_a, index_a, pool_b, index_b, h)
        ctx.scale, ctx.sink = scale, sink
        return y

    @staticmethod
    def backward(ctx, dy):
        x, pool_a, index_a, pool_b, index_b, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        sink = ctx.sink
        dx, dpool_a, dpool_b = _backward_impl(dy, x, pool_a, index_a, pool_b, index_b, ctx.scale, h,
                                              need[0], need[1], need[3], sink)
        if sink is not None:
            dpool_a = dpool_b = None
        dbase = dy if need[6] else None
        return dx, dpool_a, None, dpool_b, None, None, dbase, None, None, None


class _LinearWithAdapter(torch.autograd.Function):
    """y = x W^T (+ bias) + scale (x A^T) B^T as one op over a frozen base weight.

    Training with a frozen nn.Linear base, computing the base product here saves what the
    separate ops pay per layer: the copy of the base output the adapter op accumulates into, and in
    backward the zeroed dx buffer and autograd's sum of the base's and the adapter's dx
    (dx = dy W is computed first, and the core accumulates g A into it)."""

    @staticmethod
    def forward(ctx, x, weight, bias, pool_a, index_a, pool_b, index_b, scale, save_h, token, sink):
        x2 = _as_rows(x.reshape(-1, x.shape[-1]))
        n_rows, _, d_out, rank, _ = _dims(x2, pool_a, index_a, pool_b)
        y = torch.nn.functional.linear(x2, weight, bias)  # a fresh (N, d_out) tensor: accumulated into
        h = x2.new_empty((n_rows, rank)) if save_h else None
        core_bridge.linear_forward(y, x2, pool_a, index_a, pool_b, index_b, scale, h, rank)
        ctx.save_for_backward(x2, weight, pool_a, index_a, pool_b, index_b, h)
        ctx.scale, ctx.rank, ctx.x_shape, ctx.sink = scale, rank, x.shape, sink
        return y.view(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, pool_a, index_a, pool_b, index_b, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy2 = _as_rows(dy.reshape(-1, dy.shape[-1]).to(x2.dtype))
        dx = torch.mm(dy2, weight) if need[0] else None  # the base's dx; the core adds the adapter's
        sink = ctx.sink
        dpool_a, dpool_b = pool_grad_buffers(pool_a, pool_b, need[3], need[5], sink)
        if dx is not None or dpool_a is not None or dpool_b is not None:
            core_bridge.linear_backward(dx, dpool_a, dpool_b, dy2, x2, pool_a, index_a, pool_b, index_b,
                                        ctx.scale, h, ctx.rank)
        if sink is not None:  # handed to the pools once, by the tap (pool_grads.py)
            dpool_a = dpool_b = None
        return (dx.view(ctx.x_shape) if dx is not None else None, None, None, dpool_a, None, dpool_b, None,
                None, None, None, None)


def linear_with_adapter(x, weight, bias, pool_a, index_a, pool_b, index_b, scale, *, tap=None) -> torch.Tensor:
    """x W^T (+ bias) + scale (x A^T) B^T over the last dimension of x, differentiable in x and the
    pools (the weight and bias are frozen: the caller checked they need no gradient). Eager CPU
    calls whose tensors share the pools' dtype (linear_with_adapter_applies). tap: the (token,
    sink) of pool_grads.tap, through which the pools' gradients go, or None."""
    _check_inputs(x.reshape(-1, x.shape[-1]), pool_a, index_a, pool_b, index_b, None)
    save_h = pool_b.requires_grad
    token, sink = tap if tap is not None else (None, None)
    return _LinearWithAdapter.apply(x, weight, bias, pool_a, index_a, pool_b, index_b, float(scale), save_h,
                                    token, sink)


def linear_with_adapter_applies(x, weight, bias, pool_a, pool_b) -> bool:
    """Whether linear_with_adapter may run this call: eager, on CPU tensors of one core dtype, with
    a frozen plain weight and bias, and no autocast."""
    dtype = x.dtype
    return (x.is_cpu and dtype in _CPU_DTYPES and weight.dtype is dtype and pool_a.dtype is dtype
            and pool_b.dtype is dtype and weight.is_cpu and pool_a.is_cpu and not weight.requires_grad
            and type(weight) in _PLAIN and type(pool_a) in _PLAIN and type(pool_b) in _PLAIN
            and (bias is None or (not bias.requires_grad and bias.dtype is dtype and type(bias) in _PLAIN))
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


# ---------------------------------------------------------------------------- custom ops (compile)


@torch.library.custom_op("mos::linear_forward", mutates_args=())
def _linear_forward_op(x: torch.Tensor, pool_a: torch.Tensor, index_a: torch.Tensor,
                       pool_b: torch.Tensor, index_b: torch.Tensor, scale: float,
                       base: Optional[torch.Tensor], save_h: bool) -> tuple[torch.Tensor, torch.Tensor]:
    y, h = _forward_impl(x, pool_a, index_a, pool_b, index_b, scale, base, save_h)
    if h is None:  # custom ops return tensors: an empty (0, r) one stands for "not kept"
        h = x.new_empty((0, _dims(x, pool_a, index_a, pool_b)[3]))
    return y, h


@_linear_forward_op.register_fake
def _(x, pool_a, index_a, pool_b, index_b, scale, base, save_h):
    n_rows, _, d_out, rank, _ = _dims(x, pool_a, index_a, pool_b)
    return x.new_empty((n_rows, d_out)), x.new_empty((n_rows if save_h else 0, rank))


@torch.library.custom_op("mos::linear_backward", mutates_args=())
def _linear_backward_op(dy: torch.Tensor, x: torch.Tensor, pool_a: torch.Tensor,
                        index_a: torch.Tensor, pool_b: torch.Tensor, index_b: torch.Tensor,
                        scale: float, h: torch.Tensor, need_dx: bool, need_dpool_a: bool,
                        need_dpool_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dpool_a, dpool_b = _backward_impl(dy, x, pool_a, index_a, pool_b, index_b, scale,
                                          h if h.shape[0] else None, need_dx, need_dpool_a, need_dpool_b)
    # Custom ops cannot return None: an empty tensor stands for "not computed".
    empty = x.new_empty((0,))
    return (dx if need_dx else empty,
            dpool_a if need_dpool_a else pool_a.new_empty((0,)),
            dpool_b if need_dpool_b else pool_b.new_empty((0,)))


@_linear_backward_op.register_fake
def _(dy, x, pool_a, index_a, pool_b, index_b, scale, h, need_dx, need_dpool_a, need_dpool_b):
    return (x.new_empty(x.shape if need_dx else (0,)),
            pool_a.new_empty(pool_a.shape if need_dpool_a else (0,)),
            pool_b.new_empty(pool_b.shape if need_dpool_b else (0,)))


def _op_setup_context(ctx, inputs, output):
    x, pool_a, index_a, pool_b, index_b, scale, base, save_h = inputs
    _, h = output
    ctx.save_for_backward(x, pool_a, index_a, pool_b, index_b, h)
    ctx.scale = scale
    ctx.mark_non_differentiable(h)


def _op_backward(ctx, dy, _dh):
    x, pool_a, index_a, pool_b, index_b, h = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dpool_a, dpool_b = torch.ops.mos.linear_backward(dy, x, pool_a, index_a, pool_b, index_b,
                                                          ctx.scale, h, need[0], need[1], need[3])
    return (dx if need[0] else None, dpool_a if need[1] else None, None,
            dpool_b if need[3] else None, None, None, dy if need[6] else None, None)


_linear_forward_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ---------------------------------------------------------------------------- public entry point


def adapter_linear(x: torch.Tensor, pool_a: torch.Tensor, index_a: torch.Tensor, pool_b: torch.Tensor,
                   index_b: torch.Tensor, scale: float, base: Optional[torch.Tensor] = None, *,
                   tap=None) -> torch.Tensor:
    """base + scale * (x A^T) B^T over the last dimension of x (leading dimensions are rows).

    x, the pools and base share one dtype and device; index_a/index_b are one layer's int32
    tables. Differentiable in x, both pools and base; the index tables never get gradients.
    tap: the (token, sink) of pool_grads.tap, through which the pools' gradients go (eager only)."""
    flat = x.dim() != 2
    x2 = x.reshape(-1, x.shape[-1]) if flat else x
    base2 = base.reshape(-1, base.shape[-1]) if flat and base is not None else base
    _check_inputs(x2, pool_a, index_a, pool_b, index_b, base2)
    # x A^T is only needed again for B's gradient; keep it (N x r, small) instead of recomputing.
    save_h = torch.is_grad_enabled() and pool_b.requires_grad
    scale = float(scale)
    if torch.compiler.is_compiling():
        y, _ = torch.ops.mos.linear_forward(x2, pool_a, index_a, pool_b, index_b, scale, base2, save_h)
    else:
        token, sink = tap if tap is not None else (None, None)
        y = _AdapterLinear.apply(x2, pool_a, index_a, pool_b, index_b, scale, base2, save_h, token, sink)
    return y.reshape(*x.shape[:-1], y.shape[-1]) if flat else y
