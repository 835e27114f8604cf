"""Which implementation of the kernels the ops use.

  compiled   "fast", with batch norm, ReLU's backward and max pooling as
             Numba loops (compiled_kernels.py) on NumPy arrays: the default
             where Numba is installed (then for tiles of at least
             COMPILED_MIN_ELEMENTS elements; asked for by name, for all)
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
import importlib.util
import os
import sys
import warnings

_KNOWN = ("compiled", "fast", "reference")
_current = None
_numba_error: str | None = None

#: by default (no set asked for), tiles smaller than this (1 MB of float32)
#: run the NumPy code: their passes take a fraction of a millisecond either
#: way, and a job of small tiles then never pays Numba's import and
#: cached-kernel load (about 1 s of CPU per process), which made
#: tests/test_train_job.py's short 4-rank jobs 1.5x slower (158 s against
#: 106 with the NumPy set).  A set asked for by name
#: (``kernel_set("compiled")``, HPCNN_KERNELS) applies to every tile.
COMPILED_MIN_ELEMENTS = 1 << 18
_min_elements = 0


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
    global _current, _min_elements
    if name is not None:
        _current = _checked(name, "kernel set ")
        _min_elements = 0
    if _current is None:
        env = os.environ.get("HPCNN_KERNELS", "").strip().lower()
        if env:
            _current = _checked(env, "HPCNN_KERNELS=")
            _min_elements = 0
        else:
            # Numba is imported only when a tile large enough needs it
            _current = "compiled" if importlib.util.find_spec("numba") is not None else "fast"
            _min_elements = COMPILED_MIN_ELEMENTS
    return _current


def kernel_state() -> tuple:
    """The choice in force, including whether it was the default (for
    ``restore_kernel_state``: code that switches sets for a while)."""
    return (_current, _min_elements)


def restore_kernel_state(state: tuple) -> None:
    global _current, _min_elements
    _current, _min_elements = state


def compiled_for(a):
    """The compiled kernels module when the kernel set is "compiled", ``a``
    is a NumPy array and (for the default set) large enough, else None (the
    ops then run their NumPy code)."""
    global _current
    if kernel_set() != "compiled" or type(a).__module__ != "numpy" or a.size < _min_elements:
        return None
    mod = sys.modules.get("hpcnn.ops.compiled_kernels")
    if mod is not None:
        return mod
    if not _numba_ok():                # installed but not importable: the default falls back
        warnings.warn(f"hpcnn: Numba does not import ({_numba_error}); running the NumPy "
                      "kernels (kernel set 'fast')", RuntimeWarning, stacklevel=2)
        _current = "fast"
        return None
    return sys.modules["hpcnn.ops.compiled_kernels"]


def window_kernels():
    """The module with conv2d/maxpool2d/avgpool2d forward and backward."""
    if kernel_set() == "reference":
        from hpcnn.ops import conv_kernels
        return conv_kernels
    from hpcnn.ops import nhwc_kernels
    return nhwc_kernels
