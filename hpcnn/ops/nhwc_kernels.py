"""Channels-last kernels of the sliding-window ops (convolution, max and
average pooling) on one tile: the fast path (the reference is
conv_kernels.py).

Arrays in and out are *logical* NCHW with any strides.  Internally the
kernels work on channels-last memory (NHWC): a logical NCHW array whose
memory is NHWC is simply ``a.transpose(0, 2, 3, 1)`` with no copy, and every
output is returned as such a view (``y_nhwc.transpose(0, 3, 1, 2)``), so a
chain of these ops never transposes.  An input in any other layout is
copied to NHWC once.

Convolution is one GEMM: the input (padded once, if the tile needs
padding) is unrolled by a single strided copy into a column matrix
(N*Ho*Wo, kh*kw*Cin) whose rows hold kh runs of kw*Cin contiguous values, and
multiplied by the weights reordered to (kh*kw*Cin, Cout).  A 1x1 convolution
without padding needs no unrolling at all.  Backward: dW = cols^T dY and
dcols = dY W^T are GEMMs, and dX is the sum of the kh*kw shifted slices of
dcols (col2im).  The same code runs on NumPy and CuPy (array_module).
"""
from __future__ import annotations

import numpy as np

from hpcnn.backend import array_module


def _as_strided(xp, a, shape, strides):
    if xp is np:
        return np.lib.stride_tricks.as_strided(a, shape=shape, strides=strides, writeable=False)
    return xp.lib.stride_tricks.as_strided(a, shape=shape, strides=strides)


def nhwc(x):
    """Channels-last (N, H, W, C) view of a logical NCHW array; a copy only
    when the channels are not already the unit-stride dimension."""
    t = x.transpose(0, 2, 3, 1)
    if t.strides[3] != t.itemsize or not _rows_ok(t):
        t = array_module(x).ascontiguousarray(t)
    return t


def _rows_ok(t):
    """(h, w, c) of every sample contiguous: the layout the strided
    unrolling reads fastest."""
    n, h, w, c = t.shape
    it = t.itemsize
    return (w == 1 or t.strides[2] == c * it) and (h == 1 or t.strides[1] == w * c * it)


def nchw_view(t):
    """The logical NCHW view of a channels-last array."""
    return t.transpose(0, 3, 1, 2)


def rows2d(t):
    """(N*H*W, C) matrix of a channels-last array (a view when contiguous)."""
    return t.reshape(-1, t.shape[3])


def _out_size(size, k, s, plo, phi, d):
    return (size + plo + phi - d * (k - 1) - 1) // s + 1


def _padded(xp, t, pads, value):
    """Channels-last input with ``pads`` ((top, bottom), (left, right))
    applied (a fresh contiguous array), or ``t`` itself without padding."""
    (pt, pb), (pl, pr) = pads
    if pt == pb == pl == pr == 0:
        return t
    n, h, w, c = t.shape
    out = xp.empty((n, h + pt + pb, w + pl + pr, c), dtype=t.dtype)
    if pt:
        out[:, :pt] = value
    if pb:
        out[:, pt + h:] = value
    if pl:
        out[:, pt:pt + h, :pl] = value
    if pr:
        out[:, pt:pt + h, pl + w:] = value
    out[:, pt:pt + h, pl:pl + w] = t
    return out


def _tap(a, i, j, ho, wo, s, d):
    """Slice (N, Ho, Wo, C) of padded channels-last ``a`` read by kernel tap (i, j)."""
    return a[:, i * d[0]: i * d[0] + s[0] * (ho - 1) + 1: s[0],
             j * d[1]: j * d[1] + s[1] * (wo - 1) + 1: s[1], :]


# ------------------------------------------------------------------ conv2d
def conv2d_forward(x, w, b, stride, pads, dilation):
    xp = array_module(x)
    n, c, h, wd = x.shape
    cout, _, kh, kw = w.shape
    (pt, pb), (pl, pr) = pads
    ho = _out_size(h, kh, stride[0], pt, pb, dilation[0])
    wo = _out_size(wd, kw, stride[1], pl, pr, dilation[1])
    t = nhwc(x)
    m = n * ho * wo
    pointwise = kh == kw == 1 and pt == pb == pl == pr == 0
    if pointwise:
        src = t if stride == (1, 1) else t[:, :stride[0] * (ho - 1) + 1:stride[0],
                                              :stride[1] * (wo - 1) + 1:stride[1], :]
        cols = xp.ascontiguousarray(src).reshape(m, c)
    else:
        tp = _padded(xp, t, pads, 0)
        sn, sh, sw, sc = tp.strides
        win = _as_strided(xp, tp, (n, ho, wo, kh, kw, c),
                          (sn, sh * stride[0], sw * stride[1], sh * dilation[0], sw * dilation[1], sc))
        cols = xp.empty((n, ho, wo, kh, kw, c), dtype=x.dtype)
        cols[...] = win
        cols = cols.reshape(m, kh * kw * c)
    w2 = w.transpose(2, 3, 1, 0).reshape(kh * kw * c, cout)       # (kh kw cin, cout)
    y2 = cols @ w2
    if b is not None:
        y2 += b
    saved = (cols, w2, (n, c, h, wd), (ho, wo), (kh, kw), stride, pads, dilation, pointwise)
    return nchw_view(y2.reshape(n, ho, wo, cout)), saved


def conv2d_backward(dy, saved, w, has_bias, need_input_grad=True):
    xp = array_module(dy)
    cols, w2, (n, c, h, wd), (ho, wo), (kh, kw), stride, pads, dilation, pointwise = saved
    cout = w.shape[0]
    dy2 = rows2d(nhwc(dy))                                         # (M, cout)
    dw2 = cols.T @ dy2                                             # (kh kw cin, cout)
    dw = xp.ascontiguousarray(dw2.reshape(kh, kw, c, cout).transpose(3, 2, 0, 1))
    db = dy2.sum(axis=0) if has_bias else None
    if not need_input_grad:
        return None, dw, db
    dcols = dy2 @ w2.T                                             # (M, kh kw cin)
    if pointwise:
        if stride == (1, 1):
            return nchw_view(dcols.reshape(n, h, wd, c)), dw, db
        dt = xp.zeros((n, h, wd, c), dtype=dy.dtype)
        dt[:, :stride[0] * (ho - 1) + 1:stride[0], :stride[1] * (wo - 1) + 1:stride[1], :] = \
            dcols.reshape(n, ho, wo, c)
        return nchw_view(dt), dw, db
    (pt, pb), (pl, pr) = pads
    dtp = xp.zeros((n, h + pt + pb, wd + pl + pr, c), dtype=dy.dtype)
    d6 = dcols.reshape(n, ho, wo, kh, kw, c)
    for i in range(kh):
        for j in range(kw):
            _tap(dtp, i, j, ho, wo, stride, dilation)[...] += d6[:, :, :, i, j, :]
    dt = dtp[:, pt:pt + h, pl:pl + wd, :]
    return nchw_view(dt), dw, db


# ------------------------------------------------------------------ pooling
def maxpool2d_forward(x, k, stride, pads, dilation):
    xp = array_module(x)
    n, c, h, wd = x.shape
    (pt, pb), (pl, pr) = pads
    ho = _out_size(h, k[0], stride[0], pt, pb, dilation[0])
    wo = _out_size(wd, k[1], stride[1], pl, pr, dilation[1])
    tp = _padded(xp, nhwc(x), pads, -np.inf)
    y = None
    for i in range(k[0]):
        for j in range(k[1]):
            v = _tap(tp, i, j, ho, wo, stride, dilation)
            if y is None:
                y = xp.ascontiguousarray(v)
            else:
                xp.maximum(y, v, out=y)
    return nchw_view(y), (tp, y, (h, wd), k, stride, pads, dilation)


def maxpool2d_backward(dy, saved):
    """The gradient goes to the FIRST maximum of each window in row-major
    tap order (as PyTorch does)."""
    xp = array_module(dy)
    tp, y, (h, wd), k, stride, pads, dilation = saved
    n, ho, wo, c = y.shape
    g = nhwc(dy)
    dtp = xp.zeros(tp.shape, dtype=dy.dtype)
    free = None                       # windows whose maximum is not yet found
    for i in range(k[0]):
        for j in range(k[1]):
            hit = _tap(tp, i, j, ho, wo, stride, dilation) == y
            if free is None:
                free = ~hit
            else:
                hit &= free
                free &= ~hit
            _tap(dtp, i, j, ho, wo, stride, dilation)[...] += xp.where(hit, g, 0)
    (pt, pb), (pl, pr) = pads
    return nchw_view(dtp[:, pt:pt + h, pl:pl + wd, :])


def avgpool2d_forward(x, k, stride, pads):
    xp = array_module(x)
    n, c, h, wd = x.shape
    (pt, pb), (pl, pr) = pads
    ho = _out_size(h, k[0], stride[0], pt, pb, 1)
    wo = _out_size(wd, k[1], stride[1], pl, pr, 1)
    tp = _padded(xp, nhwc(x), pads, 0)
    y = None
    for i in range(k[0]):
        for j in range(k[1]):
            v = _tap(tp, i, j, ho, wo, stride, (1, 1))
            if y is None:
                y = xp.array(v, copy=True, order="C")
            else:
                y += v
    y *= 1.0 / (k[0] * k[1])
    return nchw_view(y), (tp.shape, (h, wd), (ho, wo), k, stride, pads)


def avgpool2d_backward(dy, saved):
    xp = array_module(dy)
    pshape, (h, wd), (ho, wo), k, stride, pads = saved
    g = nhwc(dy) * (1.0 / (k[0] * k[1]))
    dtp = xp.zeros(pshape, dtype=dy.dtype)
    for i in range(k[0]):
        for j in range(k[1]):
            _tap(dtp, i, j, ho, wo, stride, (1, 1))[...] += g
    (pt, pb), (pl, pr) = pads
    return nchw_view(dtp[:, pt:pt + h, pl:pl + wd, :])
