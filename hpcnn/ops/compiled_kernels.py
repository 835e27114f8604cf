"""Numba-compiled loops for the memory-bound passes that NumPy cannot fuse:
batch norm's statistics and normalisation, ReLU's backward and max-pool's
backward.

Each NumPy expression is a pass over memory, and these ops chain several
(batch norm forward: subtract, two column sums, centre, scale, shift; ReLU
backward: a comparison into a temporary, then a product; max-pool backward:
a bit code per tap, a table lookup and ``np.add.at``).  The loops below read
each input once and write each output once.  They are the kernel set
"compiled" (``hpcnn.ops.kernel_set``), the default where Numba imports; the
NumPy code in the ops stays as the reference and the fallback, and the tests
hold the two to each other and to PyTorch.

Every function works on one chunk of rows or samples and releases the GIL,
so that the ops run them on the host threads (host_threads.split) exactly as
they run their NumPy passes; partial sums are returned per chunk and added
in chunk order, so results do not depend on the threads' timing.  Sums
accumulate in float64.  Compiled code is cached on disk (Numba's cache next
to this file, or NUMBA_CACHE_DIR), so only the first process on a machine
pays the compilation (a few seconds).
"""
from __future__ import annotations

import numpy as np
from numba import njit

_JIT = dict(nogil=True, cache=True)


@njit(**_JIT)
def bn_sums(a, b, shift, out):
    """out[0, j] = sum_i a[i, j]; out[1, j] = sum_i a[i, j] * (b[i, j] - shift[j])
    for (M, C) ``a`` and ``b``, float64 ``out`` (2, C): batch norm
    backward's sums of dy and of dy times the centred input x - mean."""
    m, c = b.shape
    for j in range(c):
        out[0, j] = 0.0
        out[1, j] = 0.0
    for i in range(m):
        for j in range(c):
            d = np.float64(b[i, j]) - shift[j]
            v = np.float64(a[i, j])
            out[0, j] += v
            out[1, j] += v * d
    return out


@njit(**_JIT)
def bn_shifted_sums(x, shift, out):
    """out[0, j] = sum_i (x[i, j] - shift[j]); out[1, j] = the sum of its
    squares: the forward statistics, shifted so that E[d^2] - E[d]^2 does
    not cancel."""
    m, c = x.shape
    for j in range(c):
        out[0, j] = 0.0
        out[1, j] = 0.0
    for i in range(m):
        for j in range(c):
            d = np.float64(x[i, j]) - shift[j]
            out[0, j] += d
            out[1, j] += d * d
    return out


@njit(**_JIT)
def bn_affine(x, mean, scale, shift, y):
    """y = (x - mean) * scale + shift per column of (M, C) matrices."""
    m, c = x.shape
    for i in range(m):
        for j in range(c):
            y[i, j] = (x[i, j] - mean[j]) * scale[j] + shift[j]


@njit(**_JIT)
def bn_input_grad(dy, x, mean, k, coef, c0, dx):
    """dx = k * dy - (x - mean) * coef - c0 per column (batch norm backward
    with the global means folded into ``coef`` and ``c0``)."""
    m, c = x.shape
    for i in range(m):
        for j in range(c):
            dx[i, j] = k[j] * dy[i, j] - (x[i, j] - mean[j]) * coef[j] - c0[j]


@njit(**_JIT)
def relu_grad(dy, y, dx):
    """dx = dy where y > 0, else 0 (1-D arrays of one layout)."""
    for i in range(dy.shape[0]):
        dx[i] = dy[i] if y[i] > 0 else 0


@njit(**_JIT)
def relu_grad4(dy, sdy, y, sy, dx, sdx, shape, lo, hi):
    """relu_grad over 4-D arrays given as flat spans (``flat_span``) with
    their element strides, for the first index in [lo, hi): the last axis
    has unit stride in all three, and only the other three differ (a
    gradient that arrives as a view into a padded buffer).  Flat spans keep
    the inner loop a unit-stride loop that the compiler vectorises, which
    Numba's arrays of arbitrary layout do not allow."""
    _, b, c, d = shape
    for i in range(lo, hi):
        for j in range(b):
            for k in range(c):
                od = i * sdy[0] + j * sdy[1] + k * sdy[2]
                oy = i * sy[0] + j * sy[1] + k * sy[2]
                ox = i * sdx[0] + j * sdx[1] + k * sdx[2]
                relu_grad(dy[od:od + d], y[oy:oy + d], dx[ox:ox + d])


def runs4(views):
    """For 4-D arrays of one shape with unit stride in the last axis:
    (flat spans, element strides, shape) where trailing axes that are
    contiguous in every array are merged into the last (their extent moved
    into it, 1 left in their place), so that relu_grad4's inner loop runs
    as long as the memory allows."""
    shape = list(views[0].shape)
    spans = [flat_span(v) for v in views]
    k = 3
    while k > 0 and all(st[k - 1] == st[k] * shape[k] for _, st in spans):
        k -= 1
    run = 1
    for i in range(k, 4):
        run *= shape[i]
    merged = shape[:k] + [1] * (3 - k) + [run]
    return spans, np.array(merged, dtype=np.int64)


def flat_span(a):
    """(1-D unit-stride view from a's first element to its last, element
    strides) of an array with non-negative strides that are multiples of
    its item size."""
    it = a.itemsize
    span = sum((n - 1) * s for n, s in zip(a.shape, a.strides)) // it + 1
    flat = np.lib.stride_tricks.as_strided(a, shape=(span,), strides=(it,))
    return flat, np.array([s // it for s in a.strides], dtype=np.int64)


@njit(**_JIT)
def maxpool_grad(tp, y, g, dtp, kh, kw, sh, sw, dh, dw):
    """Max-pool backward over channels-last (N, Hp, Wp, C) padded input
    ``tp`` and (N, Ho, Wo, C) output ``y`` and gradient ``g``: each window's
    gradient goes to the FIRST tap in row-major order equal to the window's
    maximum (PyTorch's choice), added into ``dtp`` (shaped like ``tp``; its
    contents on entry are ignored: each sample is zeroed here, while it is
    in cache).  Per window, the taps are visited last to first over a
    contiguous run of channels (a branch-free select the compiler
    vectorises), then each channel's gradient is added at its tap."""
    n, ho, wo, c = y.shape
    ntaps = kh * kw
    di = np.empty(ntaps, dtype=np.int64)
    dj = np.empty(ntaps, dtype=np.int64)
    for t in range(ntaps):
        di[t] = (t // kw) * dh
        dj[t] = (t % kw) * dw
    first = np.empty(c, dtype=np.int64)
    for s in range(n):
        dtp[s] = 0
        for oh in range(ho):
            for ow in range(wo):
                h0 = oh * sh
                w0 = ow * sw
                for ch in range(c):
                    first[ch] = -1
                for t in range(ntaps - 1, -1, -1):
                    hh = h0 + di[t]
                    ww = w0 + dj[t]
                    for ch in range(c):
                        first[ch] = t if tp[s, hh, ww, ch] == y[s, oh, ow, ch] else first[ch]
                for ch in range(c):
                    t = first[ch]
                    if t >= 0:
                        dtp[s, h0 + di[t], w0 + dj[t], ch] += g[s, oh, ow, ch]
