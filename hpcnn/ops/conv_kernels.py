"""Local kernels of sliding-window ops (convolution, max and average
pooling) on one tile, with explicit per-side padding.  Arrays are logical
NCHW; NumPy or CuPy, whichever owns the input.

Reference implementation: window views and tensor contractions.  Correct
for every stride, dilation and padding; the optimised CPU path replaces it.
"""
from __future__ import annotations

import numpy as np

from hpcnn.backend import array_module


def _as_strided(xp, a, shape, strides):
    if xp is np:
        return np.lib.stride_tricks.as_strided(a, shape=shape, strides=strides, writeable=False)
    return xp.lib.stride_tricks.as_strided(a, shape=shape, strides=strides)


def _pad(xp, x, pads, value=0.0):
    (pt, pb), (pl, pr) = pads
    if pt == pb == pl == pr == 0:
        return x
    return xp.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), mode="constant", constant_values=value)


def _windows(xp, xp_pad, k, s, d):
    """View (N, C, Ho, Wo, kh, kw) of the windows of a padded input."""
    xp_pad = xp.ascontiguousarray(xp_pad)
    n, c, h, w = xp_pad.shape
    kh, kw = k
    ho = (h - d[0] * (kh - 1) - 1) // s[0] + 1
    wo = (w - d[1] * (kw - 1) - 1) // s[1] + 1
    sn, sc, sh, sw = xp_pad.strides
    return _as_strided(xp, xp_pad, (n, c, ho, wo, kh, kw),
                       (sn, sc, sh * s[0], sw * s[1], sh * d[0], sw * d[1]))


def _scatter_windows(xp, dcols, padded_shape, k, s, d):
    """Adjoint of _windows: sum window gradients (N, C, Ho, Wo, kh, kw) into
    a padded input gradient."""
    dxp = xp.zeros(padded_shape, dtype=dcols.dtype)
    ho, wo = dcols.shape[2:4]
    for i in range(k[0]):
        for j in range(k[1]):
            h0, w0 = i * d[0], j * d[1]
            dxp[:, :, h0:h0 + s[0] * (ho - 1) + 1:s[0], w0:w0 + s[1] * (wo - 1) + 1:s[1]] += dcols[:, :, :, :, i, j]
    return dxp


def _unpad(dxp, pads):
    (pt, pb), (pl, pr) = pads
    h, w = dxp.shape[2:]
    return dxp[:, :, pt:h - pb, pl:w - pr]


def conv2d_forward(x, w, b, stride, pads, dilation):
    xp = array_module(x)
    k = w.shape[2:]
    xpad = _pad(xp, x, pads)
    cols = _windows(xp, xpad, k, stride, dilation)           # N C Ho Wo kh kw
    y = xp.einsum("nchwij,ocij->nohw", cols, w, optimize=True)
    if b is not None:
        y = y + b[None, :, None, None]
    return y, (x.shape, xpad.shape, cols, stride, dilation, pads)


def conv2d_backward(dy, saved, w, has_bias, need_input_grad=True):
    xp = array_module(dy)
    xshape, pshape, cols, stride, dilation, pads = saved
    dw = xp.einsum("nohw,nchwij->ocij", dy, cols, optimize=True)
    db = dy.sum(axis=(0, 2, 3)) if has_bias else None
    if not need_input_grad:
        return None, dw, db
    dcols = xp.einsum("nohw,ocij->nchwij", dy, w, optimize=True)
    dxp = _scatter_windows(xp, dcols, pshape, w.shape[2:], stride, dilation)
    return _unpad(dxp, pads), dw, db


def maxpool2d_forward(x, k, stride, pads, dilation):
    xp = array_module(x)
    xpad = _pad(xp, x, pads, value=-np.inf)
    cols = _windows(xp, xpad, k, stride, dilation)
    n, c, ho, wo = cols.shape[:4]
    flat = cols.reshape(n, c, ho, wo, -1)
    arg = flat.argmax(axis=-1)
    y = xp.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
    return y, (xpad.shape, arg, k, stride, dilation, pads)


def maxpool2d_backward(dy, saved):
    xp = array_module(dy)
    pshape, arg, k, stride, dilation, pads = saved
    n, c, ho, wo = dy.shape
    dcols = xp.zeros((n, c, ho, wo, k[0] * k[1]), dtype=dy.dtype)
    xp.put_along_axis(dcols, arg[..., None], dy[..., None], axis=-1)
    dxp = _scatter_windows(xp, dcols.reshape(n, c, ho, wo, k[0], k[1]), pshape, k, stride, dilation)
    return _unpad(dxp, pads)


def avgpool2d_forward(x, k, stride, pads):
    xp = array_module(x)
    xpad = _pad(xp, x, pads)
    cols = _windows(xp, xpad, k, stride, (1, 1))
    y = cols.mean(axis=(4, 5))
    return y, (xpad.shape, k, stride, pads)


def avgpool2d_backward(dy, saved):
    xp = array_module(dy)
    pshape, k, stride, pads = saved
    n, c, ho, wo = dy.shape
    g = (dy / (k[0] * k[1]))[..., None, None]
    dcols = xp.broadcast_to(g, (n, c, ho, wo, k[0], k[1]))
    dxp = _scatter_windows(xp, dcols, pshape, k, stride, (1, 1))
    return _unpad(dxp, pads)
