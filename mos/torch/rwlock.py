"""A readers-writer lock: many mixed-batch requests at once, or one change of the adapter store."""
from __future__ import annotations

import threading
from contextlib import contextmanager

__all__ = ["ReadWriteLock"]


class ReadWriteLock:
    """Many readers or one writer. A waiting writer holds back new readers, so a stream of requests
    cannot starve a load. Reads nest within a thread; a thread that holds a read cannot write (it
    would wait for itself), and is told so."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = None          # ident of the writing thread
        self._writers_waiting = 0
        self._local = threading.local()

    def reading(self) -> bool:
        """Whether the calling thread holds a read."""
        return getattr(self._local, "reads", 0) > 0

    def acquire_read(self) -> None:
        if self.reading() or self._writer == threading.get_ident():
            self._local.reads = getattr(self._local, "reads", 0) + 1
            self._local.nested = getattr(self._local, "nested", 0) + 1
            return
        with self._cond:
            while self._writer is not None or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        self._local.reads = 1

    def release_read(self) -> None:
        self._local.reads -= 1
        if getattr(self._local, "nested", 0):
            self._local.nested -= 1
            return
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    @contextmanager
    def read(self):
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextmanager
    def write(self):
        me = threading.get_ident()
        if self.reading():
            raise RuntimeError("cannot change the adapter store from inside a mixed-adapter batch "
                               "running in the same thread")
        if self._writer == me:  # nested write in the writing thread
            yield
            return
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = me
        try:
            yield
        finally:
            with self._cond:
                self._writer = None
                self._cond.notify_all()
