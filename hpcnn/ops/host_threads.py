"""Memory-bound NumPy work split over a few host threads.

BLAS runs matrix products on several threads, but NumPy copies and
elementwise loops run on one.  NumPy releases the GIL inside those loops, so
disjoint slices of one large copy or update can run at the same time on
different cores.  The kernels split such work along an outer axis (samples,
rows, output channels) with ``split(n, fn)``: ``fn(lo, hi)`` is called for
consecutive chunks of range(n), one chunk per thread, the first on the
calling thread.

The number of threads is ``host_threads()``: set it with
``set_host_threads(n)`` (the benchmark uses as many as BLAS) or
HPCNN_HOST_THREADS; the default is 1, so that MPI ranks sharing a node's
cores do not oversubscribe them.  Work smaller than ``MIN_ELEMENTS`` per
chunk, and all work on CuPy arrays, runs as one call.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

MIN_ELEMENTS = 1 << 16      # below this per chunk, thread hand-off costs more than it saves

_lock = threading.Lock()
_threads: int | None = None
_pool: ThreadPoolExecutor | None = None


def host_threads() -> int:
    global _threads
    if _threads is None:
        env = os.environ.get("HPCNN_HOST_THREADS", "").strip()
        _threads = max(1, int(env)) if env.isdigit() else 1
    return _threads


def set_host_threads(n: int) -> int:
    """Use ``n`` threads for memory-bound NumPy work (1: no threads)."""
    global _threads, _pool
    n = max(1, int(n))
    with _lock:
        if _pool is not None and n != _threads:
            _pool.shutdown(wait=True)
            _pool = None
        _threads = n
    return n


def _get_pool(n):
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="hpcnn-host")
        return _pool


def split(n: int, fn, work: int = 0, xp=None, grain: int | None = None) -> None:
    """Call ``fn(lo, hi)`` over chunks covering range(n), in parallel when
    there are several host threads and ``work`` (elements touched) is large
    enough; ``xp`` other than NumPy (CuPy) always runs as one call.  With
    ``grain``, each thread walks its range in chunks of at most ``grain``
    (so that a chain of passes over a chunk stays in cache)."""
    numpy_work = xp is None or xp.__name__ == "numpy"
    t = min(host_threads(), n, max(1, work // MIN_ELEMENTS)) if numpy_work else 1
    if grain is not None and numpy_work and grain < n:
        inner = fn

        def fn(lo, hi):
            for a in range(lo, hi, grain):
                inner(a, min(a + grain, hi))
    if t <= 1:
        fn(0, n)
        return
    bounds = [(n * i // t, n * (i + 1) // t) for i in range(t)]
    futures = [_get_pool(host_threads()).submit(fn, lo, hi) for lo, hi in bounds[1:]]
    try:
        fn(*bounds[0])
    finally:
        for f in futures:
            f.result()
