"""Keep freed host memory in the process between training steps: the
malloc policy (retain_freed_memory) and a pool of the kernels' large
temporaries (BufferPool, POOL).

A training step allocates and frees the same large arrays (activations,
unrolled columns, gradients) every step.  glibc's malloc returns freed
memory at the top of its heap to the OS once more than its trim threshold
is free, so each step faults the same pages back in (zeroed by the kernel):
thousands of page faults and tens of milliseconds per ResNet-18 step here.
``retain_freed_memory()`` raises the trim and mmap thresholds (mallopt) so
that freed blocks stay in the heap for the next step, as framework caching
allocators do.  Peak memory is unchanged; the process just does not shrink
after a peak.  glibc only (elsewhere a no-op); HPCNN_RETAIN_MEMORY=0 turns it
off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
import weakref

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done: bool | None = None


def retain_freed_memory(trim_bytes: int = 1 << 30, mmap_bytes: int = 1 << 25) -> bool:
    """Apply the policy once per process; returns whether it is in force."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("HPCNN_RETAIN_MEMORY", "1").strip() == "0" or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):      # not glibc
        return _done
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # mmap threshold: glibc caps it at 32 MiB on 64-bit; larger blocks are mmapped
    _done = bool(mallopt(_M_TRIM_THRESHOLD, int(trim_bytes))) and \
        bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_bytes)))
    return _done


class BufferPool:
    """Free host arrays kept for reuse, keyed by (shape, dtype).

    The kernels take their large internal temporaries here (unrolled
    columns, padded copies, col2im scratch) and give them back once the
    backward pass has used them, so that arrays larger than malloc's mmap
    ceiling (32 MiB) are not mapped, faulted in and unmapped again every
    step.  An array is either in the pool (free) or owned by exactly one
    user; arrays returned to callers are never pooled.  Arrays below
    ``min_bytes`` are left to malloc; the pool holds at most ``cap_bytes``
    (HPCNN_POOL_BYTES, default 4 GiB) and drops what does not fit.  CuPy
    arrays are never pooled (CuPy has its own memory pool)."""

    def __init__(self, cap_bytes: int | None = None, min_bytes: int = 1 << 20):
        env = os.environ.get("HPCNN_POOL_BYTES", "").strip()
        self.cap_bytes = int(env) if env.isdigit() else (cap_bytes or 4 << 30)
        self.min_bytes = min_bytes
        self._free: dict = {}
        self._lent: dict = {}          # id -> weakref of arrays handed out by take
        self.held_bytes = 0
        self._lock = threading.Lock()

    def take(self, xp, shape, dtype):
        """An uninitialised C-contiguous array (from the pool when one fits)."""
        import numpy as np
        if xp is not np:
            return xp.empty(shape, dtype=dtype)
        key = (tuple(int(s) for s in shape), np.dtype(dtype).str)
        a = None
        with self._lock:
            free = self._free.get(key)
            if free:
                a = free.pop()
                self.held_bytes -= a.nbytes
        if a is None:
            a = np.empty(key[0], dtype=dtype)
        if a.nbytes >= self.min_bytes:
            k = id(a)
            with self._lock:
                self._lent[k] = weakref.ref(a, lambda _, k=k: self._lent.pop(k, None))
        return a

    def give(self, a) -> None:
        """Return an array obtained from ``take`` (or a reshaped view of
        one) that nobody uses any more.  Anything else is ignored."""
        import numpy as np
        if type(a) is not np.ndarray:
            return
        while a.base is not None and type(a.base) is np.ndarray and a.base.nbytes == a.nbytes:
            a = a.base                 # a whole-array reshape: its owner
        with self._lock:
            ref = self._lent.get(id(a))
            if ref is None or ref() is not a:
                return                 # not ours to pool
            del self._lent[id(a)]
            if self.held_bytes + a.nbytes > self.cap_bytes:
                return
            self._free.setdefault((a.shape, a.dtype.str), []).append(a)
            self.held_bytes += a.nbytes

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self.held_bytes = 0


POOL = BufferPool()
