"""A bounded inference pool: how many requests may decode photos and run the model at once.

Decoding a photo and running the parser and encoder are the server's big memory users;
with one thread per request (Starlette's pool holds 40) memory grew with the number of
clients. Every such request now takes a slot first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT_WORKERS = 2
DEFAULT_QUEUE = 16
#: How long a queued request waits for a worker before it gets a 503.
DEFAULT_WAIT_S = 60.0
RETRY_AFTER_S = 2


class BusyError(RuntimeError):
    """Every worker is busy and the queue is full (or the wait ran out): a 503."""


class InferencePool:
    """At most ``workers`` requests run at once; up to ``queue`` more wait their turn in
    arrival order of the semaphore; any further one is refused at once with BusyError.

    Invariants: running <= workers; running + waiting <= workers + queue. When the last
    running request leaves, freed heap is handed back to the system (glibc malloc_trim),
    so a burst's memory does not stay held."""

    def __init__(self, workers: int = DEFAULT_WORKERS, queue: int = DEFAULT_QUEUE,
                 wait_s: float = DEFAULT_WAIT_S):
        if workers < 1 or queue < 0:
            raise ValueError(f"workers must be at least 1 and queue at least 0, got "
                             f"{workers} and {queue}")
        self.workers = workers
        self.queue = queue
        self.wait_s = wait_s
        self._admitted = threading.BoundedSemaphore(workers + queue)
        self._running = threading.BoundedSemaphore(workers)
        self._count_lock = threading.Lock()
        self._active = 0

    @property
    def places_left(self) -> int:
        """Requests that may still be admitted (to run or to wait) before a 503."""
        return self._admitted._value

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold a worker for the block; BusyError when none is free and the queue is full."""
        if not self._admitted.acquire(blocking=False):
            raise BusyError(f"the server is busy ({self.workers} requests running, "
                            f"{self.queue} waiting); retry in a moment")
        try:
            if not self._running.acquire(timeout=self.wait_s):
                raise BusyError("the server is busy (waited too long for a worker); retry "
                                "in a moment")
            self._enter()
            try:
                yield
            finally:
                self._leave()
                self._running.release()
        finally:
            self._admitted.release()

    def _enter(self) -> None:
        with self._count_lock:
            self._active += 1

    def _leave(self) -> None:
        with self._count_lock:
            self._active -= 1
            idle = self._active == 0
        if idle:
            release_free_memory()


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def release_free_memory() -> None:
    """Return the heap's free pages to the system (glibc only; a no-op elsewhere)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
