"""Which implementation of the sliding-window kernels (convolution, max and
average pooling) the ops use.

  fast       channels-last GEMM kernels (nhwc_kernels.py): the default
  reference  window views and tensor contractions (conv_kernels.py): simple,
             obviously correct, slow; kept as the fallback and test oracle

Choose with ``kernel_set("reference")`` or HPCNN_KERNELS=reference.  Both
run on NumPy and CuPy and keep the same op contract.
"""
from __future__ import annotations

import os

_KNOWN = ("fast", "reference")
_current = None


def kernel_set(name: str | None = None) -> str:
    """Set the kernel set (when ``name`` is given) and return the one in use."""
    global _current
    if name is not None:
        if name not in _KNOWN:
            raise ValueError(f"unknown kernel set {name!r}: choose one of {', '.join(_KNOWN)}")
        _current = name
    if _current is None:
        env = os.environ.get("HPCNN_KERNELS", "fast").strip().lower() or "fast"
        if env not in _KNOWN:
            raise ValueError(f"HPCNN_KERNELS={env!r}: choose one of {', '.join(_KNOWN)}")
        _current = env
    return _current


def window_kernels():
    """The module with conv2d/maxpool2d/avgpool2d forward and backward."""
    if kernel_set() == "reference":
        from hpcnn.ops import conv_kernels
        return conv_kernels
    from hpcnn.ops import nhwc_kernels
    return nhwc_kernels
