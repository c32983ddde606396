"""A bounded inference pool: how many requests may decode photos and run the model at once.

Decoding a photo and running the parser and encoder are the server's big memory users.
Run on Starlette's request threads (40 of them), every concurrent request touched its own
malloc arena and each arena kept its peak: memory grew with the number of clients and
stayed. Such work now runs on the pool's own ``workers`` threads, at most ``queue`` more
requests wait for one, and the rest are refused at once (503 with Retry-After).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

#: Requests decoding photos or running models at once: two keep the cores busy while each
#: holds a decoded photo, bounding peak memory (README: under 1.5 GB with lite0 models).
DEFAULT_WORKERS = 2
#: Requests that may wait for a worker before the rest get a 503 at once.
DEFAULT_QUEUE = 16
#: Seconds a refused client is told to wait (``Retry-After``): about one busy search.
RETRY_AFTER_S = 2
#: Allocations at least this big are mapped and unmapped on their own (glibc), so a
#: decoded photo's memory goes back to the system when it is freed.
MMAP_THRESHOLD = 1 << 20

T = TypeVar("T")


class BusyError(RuntimeError):
    """Every worker is busy and the queue is full: a 503."""


class InferencePool:
    """Runs work on ``workers`` threads of its own; up to ``queue`` more jobs wait, in
    order; any further one is refused at once with BusyError.

    Invariants: at most ``workers`` jobs run, at most ``workers + queue`` are admitted;
    when the last running job ends, freed heap is handed back to the system (glibc
    ``malloc_trim``), so a burst's memory does not stay held."""

    def __init__(self, workers: int = DEFAULT_WORKERS, queue: int = DEFAULT_QUEUE):
        if workers < 1 or queue < 0:
            raise ValueError(f"workers must be at least 1 and queue at least 0, got "
                             f"{workers} and {queue}")
        self.workers = workers
        self.queue = queue
        self._admitted = threading.BoundedSemaphore(workers + queue)
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="vestis-inference")
        self._count_lock = threading.Lock()
        self._active = 0
        tune_malloc()

    @property
    def places_left(self) -> int:
        """Jobs that may still be admitted (to run or to wait) before a 503."""
        return self._admitted._value

    def run(self, work: Callable[[], T]) -> T:
        """``work()`` on a worker thread, its result or exception passed back; BusyError at
        once when ``workers + queue`` jobs are already admitted."""
        if not self._admitted.acquire(blocking=False):
            raise BusyError(f"the server is busy ({self.workers} requests running, "
                            f"{self.queue} waiting); retry in a moment")
        try:
            return self._executor.submit(self._tracked, work).result()
        finally:
            self._admitted.release()

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def _tracked(self, work: Callable[[], T]) -> T:
        with self._count_lock:
            self._active += 1
        try:
            return work()
        finally:
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
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> None:
    """Big allocations (decoded pixels, tensors) are mmapped and returned on free (glibc
    only; a no-op elsewhere). Without it glibc raises its threshold after the first big
    free and keeps later ones in the heap."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def release_free_memory() -> None:
    """Return the heap's free pages to the system (glibc only; a no-op elsewhere)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
