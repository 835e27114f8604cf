"""Which implementation of the kernels the ops use.

  compiled   "fast", with batch norm, ReLU's backward and max-pool's
             backward as Numba loops (compiled_kernels.py) on NumPy arrays:
             the default where Numba imports
  fast       channels-last GEMM kernels (nhwc_kernels.py) for convolution
             and pooling, NumPy passes for the rest: the default without
             Numba
  reference  window views and tensor contractions (conv_kernels.py): simple,
             obviously correct, slow; kept as the fallback and test oracle

Choose with ``kernel_set("reference")`` or HPCNN_KERNELS=reference.  All
keep the same op contract; CuPy arrays always take the NumPy-style code
("compiled" is "fast" on a GPU).
"""
from __future__ import annotations

import importlib
import os

_KNOWN = ("compiled", "fast", "reference")
_current = None
_numba_error: str | None = None


def _numba_ok() -> bool:
    """Whether the compiled kernels import (Numba installed and working
    with this NumPy); the reason is kept for the error message."""
    global _numba_error
    try:
        importlib.import_module("hpcnn.ops.compiled_kernels")
    except Exception as exc:                   # ImportError, or Numba refusing this NumPy
        _numba_error = f"{type(exc).__name__}: {exc}"
        return False
    return True


def _checked(name: str, origin: str) -> str:
    if name not in _KNOWN:
        raise ValueError(f"{origin}{name!r}: choose one of {', '.join(_KNOWN)}")
    if name == "compiled" and not _numba_ok():
        raise ValueError(f"{origin}{name!r} needs Numba ({_numba_error}); "
                         "pip install numba, or choose 'fast'")
    return name


def kernel_set(name: str | None = None) -> str:
    """Set the kernel set (when ``name`` is given) and return the one in use."""
    global _current
    if name is not None:
        _current = _checked(name, "kernel set ")
    if _current is None:
        env = os.environ.get("HPCNN_KERNELS", "").strip().lower()
        if env:
            _current = _checked(env, "HPCNN_KERNELS=")
        else:
            _current = "compiled" if _numba_ok() else "fast"
    return _current


def compiled_for(a):
    """The compiled kernels module when the kernel set is "compiled" and
    ``a`` is a NumPy array, else None (the ops then run their NumPy code)."""
    if kernel_set() != "compiled" or type(a).__module__ != "numpy":
        return None
    return importlib.import_module("hpcnn.ops.compiled_kernels")


def window_kernels():
    """The module with conv2d/maxpool2d/avgpool2d forward and backward."""
    if kernel_set() == "reference":
        from hpcnn.ops import conv_kernels
        return conv_kernels
    from hpcnn.ops import nhwc_kernels
    return nhwc_kernels
