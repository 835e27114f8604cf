"""Numba-compiled loops for the memory-bound passes that NumPy cannot fuse:
batch norm's statistics and normalisation, ReLU's backward and max
pooling.

Each NumPy expression is a pass over memory, and these ops chain several
(batch norm forward: subtract, two column sums, centre, scale, shift; ReLU
backward: a comparison into a temporary, then a product; max pooling: a
maximum per tap forward, and backward a bit code per tap, a table lookup and
``np.add.at``).  The loops below read
each input once and write each output once.  They are the kernel set
"compiled" (``hpcnn.ops.kernel_set``), the default where Numba is installed; the
NumPy code in the ops stays as the reference and the fallback, and the tests
hold the two to each other and to PyTorch.  By default only tiles of
``kernel_set.COMPILED_MIN_ELEMENTS`` and more take these loops.

Every function works on one chunk of rows or samples and releases the GIL,
so that the ops run them on the host threads (host_threads.split) exactly as
they run their NumPy passes; partial sums are returned per chunk and added
in chunk order, so results do not depend on the threads' timing.  Sums
accumulate in float64.  Compiled code is cached on disk (Numba's cache next
to this file, or NUMBA_CACHE_DIR), so only the first process on a machine
pays the compilation (4.4 s for the float32 kernels here; loading them from
the cache, Numba's import included, takes about 0.7 s).
"""
from __future__ import annotations

import numpy as np
from numba import njit

_JIT = dict(nogil=True, cache=True)


@njit(**_JIT)
def bn_sums(a, sa, b, sb, out):
    """out[0, j] = sum_i (a[i, j] - sa[j]) and
    out[1, j] = sum_i (a[i, j] - sa[j]) * (b[i, j] - sb[j]) for (M, C)
    ``a`` and ``b``, accumulated in float64 ``out`` (2, C).  Forward
    (a = b = x, sa = sb = the running mean): the shifted sum and sum of
    squares, shifted so that E[d^2] - E[d]^2 does not cancel; backward
    (a = dy, sa = 0, b = x, sb = the mean): the sums of dy and of dy times
    the centred input."""
    m, c = b.shape
    for j in range(c):
        out[0, j] = 0.0
        out[1, j] = 0.0
    for i in range(m):
        for j in range(c):
            u = np.float64(a[i, j]) - sa[j]
            out[0, j] += u
            out[1, j] += u * (np.float64(b[i, j]) - sb[j])
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
def _tap_offsets(kh, kw, dh, dw):
    ntaps = kh * kw
    di = np.empty(ntaps, dtype=np.int64)
    dj = np.empty(ntaps, dtype=np.int64)
    for t in range(ntaps):
        di[t] = (t // kw) * dh
        dj[t] = (t % kw) * dw
    return di, dj


@njit(**_JIT)
def maxpool_fwd(x, y, arg, kh, kw, sh, sw, dh, dw, pt, pl):
    """Max pooling over channels-last (N, H, W, C) ``x`` into (N, Ho, Wo,
    C) ``y`` with padding ``pt`` rows above and ``pl`` columns left (taps
    outside the input are skipped: no padded copy), and ``arg`` (same shape
    as y, int32: a type as wide as float32 keeps the loop vectorised, uint8
    made it 3x slower) the row-major index of each window's FIRST maximal
    tap (PyTorch's choice for the gradient), -1 for a window without taps.
    A NaN in a window is its maximum (the first NaN), as np.maximum has it.
    Taps outside, channels inside: each pass is a select over a contiguous
    run of channels."""
    n, ho, wo, c = y.shape
    h, w = x.shape[1], x.shape[2]
    di, dj = _tap_offsets(kh, kw, dh, dw)
    for s in range(n):
        for oh in range(ho):
            for ow in range(wo):
                h0 = oh * sh - pt
                w0 = ow * sw - pl
                yr = y[s, oh, ow]
                ar = arg[s, oh, ow]
                for ch in range(c):
                    yr[ch] = -np.inf
                    ar[ch] = -1
                seen = False
                for t in range(kh * kw):
                    hh = h0 + di[t]
                    ww = w0 + dj[t]
                    if hh < 0 or hh >= h or ww < 0 or ww >= w:
                        continue
                    row = x[s, hh, ww]
                    if not seen:
                        for ch in range(c):
                            yr[ch] = row[ch]
                            ar[ch] = t
                        seen = True
                        continue
                    for ch in range(c):
                        v = row[ch]
                        cur = yr[ch]
                        take = (v > cur) | ((v != v) & (cur == cur))
                        yr[ch] = v if take else cur
                        ar[ch] = t if take else ar[ch]


@njit(**_JIT)
def maxpool_scatter(arg, g, dx, kh, kw, sh, sw, dh, dw, pt, pl):
    """Max-pool backward from ``maxpool_fwd``'s tap indices: ``dx`` (N, H,
    W, C) receives each window's gradient at its tap; its contents on entry
    are ignored (each sample is zeroed here, while in cache)."""
    n, ho, wo, c = g.shape
    di, dj = _tap_offsets(kh, kw, dh, dw)
    for s in range(n):
        dx[s] = 0
        for oh in range(ho):
            for ow in range(wo):
                h0 = oh * sh - pt
                w0 = ow * sw - pl
                for ch in range(c):
                    t = arg[s, oh, ow, ch]
                    if t >= 0:
                        dx[s, h0 + di[t], w0 + dj[t], ch] += g[s, oh, ow, ch]
