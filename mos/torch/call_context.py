"""Per-call context of mixed-adapter batches: which batch the current thread (or task) runs.

It lives in a context variable, never on the layers, which concurrent calls share. Compiled graphs
cannot trace a ContextVar, so layers read it only while some mixed batch is in flight anywhere: a
plain counter that torch.compile guards on (a compiled model recompiles, with a graph break, the
first time it runs beside a mixed batch)."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["current_batch", "running"]

_batch = ContextVar("mos_mixed_batch", default=None)
_in_flight = 0
_count_lock = threading.Lock()


def current_batch(module=None):
    """The mixed batch (mixed_batch.py) the calling thread runs, or None; with `module`, None also
    when the batch runs another model than the one `module` belongs to (a draft model, say)."""
    if not _in_flight:
        return None
    batch = _batch.get()
    if batch is None or module is None or batch.serves(module):
        return batch
    return None


@contextmanager
def running(batch):
    """Makes `batch` the calling thread's mixed batch inside the block."""
    global _in_flight
    token = _batch.set(batch)
    with _count_lock:
        _in_flight += 1
    try:
        yield batch
    finally:
        with _count_lock:
            _in_flight -= 1
        _batch.reset(token)
