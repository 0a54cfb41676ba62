"""One gradient buffer per pool for a whole backward pass, instead of one per layer.

Without it every layer's backward returns a dense, zero-filled, pool-sized gradient holding its
scatter, and autograd sums the thirty-odd of them per pool: a fill and an add of the whole pool per
layer, whatever the batch (benchmarks/bench_pool_grads.py: 451 ms against 55 ms a step on
LLaMA2-7B's shapes).

Inside one model call with autograd on (`one_buffer_per_pool`, entered by MoSModel.forward), the
first layer to gather from a SharedPools opens a tap: an autograd node over (pool_a, pool_b) whose
output, a 0-dim token, every layer of the call takes as an extra input. The layers' backward
accumulate into the tap's PoolSink (zero-filled on first use) and return no gradient for the pools;
the tap's backward runs after all of theirs (the token orders it) and hands each pool its buffer,
once, to accumulate into .grad as any gradient would.

The taps live in a context variable for the duration of the call, so concurrent calls through the
same layers never share one. A layer run outside such a call (called on its own, recomputed by
activation checkpointing during backward, or traced by torch.compile) returns its own dense
gradient, summed by autograd as before. Both routes save the same tensors, so a checkpoint's
recomputation matches the forward whichever route each took."""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch

__all__ = ["PoolSink", "one_buffer_per_pool", "pool_grad_buffers", "tap"]

_taps = ContextVar("mos_pool_taps", default=None)


class PoolSink:
    """The gradient buffers one call's layers accumulate one SharedPools' gradients into. A backward
    pass runs a device's nodes on one thread, and taps are only opened for layers on the pools'
    device, so no lock is needed."""

    __slots__ = ("grad_a", "grad_b")

    def __init__(self):
        self.grad_a = self.grad_b = None

    def buffers(self, pool_a, pool_b, need_a: bool, need_b: bool):
        """(dpool_a, dpool_b) to accumulate into, each None when not needed; zero-filled once."""
        if need_a and self.grad_a is None:
            self.grad_a = torch.zeros_like(pool_a, memory_format=torch.contiguous_format)
        if need_b and self.grad_b is None:
            self.grad_b = torch.zeros_like(pool_b, memory_format=torch.contiguous_format)
        return (self.grad_a if need_a else None), (self.grad_b if need_b else None)

    def take(self):
        """The accumulated (dpool_a, dpool_b), handed over once: a second backward through the same
        graph (retain_graph=True) accumulates into fresh buffers."""
        grads = self.grad_a, self.grad_b
        self.grad_a = self.grad_b = None
        return grads


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pool_a, pool_b, sink):
        ctx.sink = sink
        return pool_a.new_zeros(())

    @staticmethod
    def backward(ctx, _token_grad):
        grad_a, grad_b = ctx.sink.take()
        need = ctx.needs_input_grad
        return (grad_a if need[0] else None), (grad_b if need[1] else None), None


@contextmanager
def one_buffer_per_pool():
    """Layers called inside the block accumulate each pool's gradient into one buffer per pool."""
    token = _taps.set({})
    try:
        yield
    finally:
        _taps.reset(token)


def tap(pools, pool_a, pool_b, device):
    """(token, sink) through which a layer on `device` passes its gradients of `pools`' tensors
    pool_a and pool_b; None outside a model call, for pools that need no gradient or live on
    another device."""
    taps = _taps.get()
    if taps is None or not (pool_a.requires_grad or pool_b.requires_grad) or pool_a.device != device:
        return None
    entry = taps.get(id(pools))
    if entry is None or entry[2] is not pool_a or entry[3] is not pool_b:  # new, or the tensors changed
        sink = PoolSink()
        entry = taps[id(pools)] = (_Tap.apply(pool_a, pool_b, sink), sink, pool_a, pool_b, pools)
    return entry[0], entry[1]


def pool_grad_buffers(pool_a, pool_b, need_a: bool, need_b: bool, sink):
    """(dpool_a, dpool_b) a layer's backward accumulates into: the call's shared buffers when it
    has a sink, else fresh zero-filled ones of its own."""
    if sink is not None:
        return sink.buffers(pool_a, pool_b, need_a, need_b)
    return ((torch.zeros_like(pool_a, memory_format=torch.contiguous_format) if need_a else None),
            (torch.zeros_like(pool_b, memory_format=torch.contiguous_format) if need_b else None))
