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
multiplied by the weights reordered per output channel to (Cout, kh*kw*Cin)
(read transposed by BLAS).  A 1x1 convolution without padding needs no
unrolling at all.  Backward: dW = dY^T cols is one GEMM; dX is either the
transposed convolution (for stride 1 when the activations outweigh the
weights: dY padded and unrolled, one GEMM with the flipped weights writes dX
directly) or dcols = dY W followed by col2im (the kh*kw shifted slices of
dcols summed into dX).  Max pooling keeps the first maximum of each window
for the gradient (PyTorch's choice) through a per-window bit code of the
taps that attain it and one scatter-add; in the kernel set "compiled" the
forward is one Numba loop that also records each window's first maximal
tap, and backward scatters the gradient to those taps (compiled_kernels.py).

Memory-bound copies and loops are split over host threads (host_threads.py)
on NumPy.  The same code runs on NumPy and CuPy (array_module); the only
module-specific call (scatter-add) has a CuPy branch.
"""
from __future__ import annotations

import numpy as np

from hpcnn.backend import array_module
from hpcnn.ops.host_memory import POOL
from hpcnn.ops.host_threads import split
from hpcnn.ops.kernel_set import compiled_for


def _as_strided(xp, a, shape, strides):
    if xp is np:
        return np.lib.stride_tricks.as_strided(a, shape=shape, strides=strides, writeable=False)
    return xp.lib.stride_tricks.as_strided(a, shape=shape, strides=strides)


def nhwc(x):
    """Channels-last (N, H, W, C) view of a logical NCHW array; a copy only
    when the channels are not already the unit-stride dimension."""
    t = x.transpose(0, 2, 3, 1)
    if t.strides[3] != t.itemsize or not _rows_ok(t):
        t = copy_split(t)
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


def copy_split(src, out=None):
    """A C-contiguous copy of ``src`` (into ``out`` when given), split over
    the host threads along axis 0."""
    xp = array_module(src)
    if out is None:
        out = xp.empty(src.shape, dtype=src.dtype)

    def part(a, b):
        out[a:b] = src[a:b]
    split(src.shape[0], part, src.size, xp)
    return out


def colsum(a):
    """Column sums of a (M, C) matrix as one matrix-vector product (BLAS):
    several times faster than ``a.sum(axis=0)``, which adds row by row."""
    xp = array_module(a)
    return xp.ones(a.shape[0], dtype=a.dtype) @ a


def _out_size(size, k, s, plo, phi, d):
    return (size + plo + phi - d * (k - 1) - 1) // s + 1


def _padded(xp, t, pads, value):
    """Channels-last input with ``pads`` ((top, bottom), (left, right))
    applied (a fresh contiguous array), or ``t`` itself without padding."""
    (pt, pb), (pl, pr) = pads
    if pt == pb == pl == pr == 0:
        return t
    n, h, w, c = t.shape
    out = POOL.take(xp, (n, h + pt + pb, w + pl + pr, c), t.dtype)

    def part(a, b):
        o = out[a:b]
        if pt:
            o[:, :pt] = value
        if pb:
            o[:, pt + h:] = value
        if pl:
            o[:, pt:pt + h, :pl] = value
        if pr:
            o[:, pt:pt + h, pl + w:] = value
        o[:, pt:pt + h, pl:pl + w] = t[a:b]
    split(n, part, out.size, xp)
    return out


def _tap(a, i, j, ho, wo, s, d):
    """Slice (N, Ho, Wo, C) of padded channels-last ``a`` read by kernel tap (i, j)."""
    return a[:, i * d[0]: i * d[0] + s[0] * (ho - 1) + 1: s[0],
             j * d[1]: j * d[1] + s[1] * (wo - 1) + 1: s[1], :]


def _add_into(xp, dst, src):
    """dst += src for a view dst (``a[idx] += b`` would also copy the
    region back onto itself)."""
    xp.add(dst, src, out=dst)


def _unroll(xp, tp, ho, wo, k, s, d):
    """Column matrix (N*Ho*Wo, kh*kw*C) of padded channels-last ``tp``: one
    strided copy whose rows hold, per output pixel, its kh x kw x C window."""
    n, _, _, c = tp.shape
    sn, sh, sw, sc = tp.strides
    win = _as_strided(xp, tp, (n, ho, wo, k[0], k[1], c),
                      (sn, sh * s[0], sw * s[1], sh * d[0], sw * d[1], sc))
    cols = copy_split(win, POOL.take(xp, win.shape, tp.dtype))
    return cols.reshape(n * ho * wo, k[0] * k[1] * c)


def _reordered(w, perm, split_axis=0):
    """C-contiguous ``w.transpose(perm)``, split over the host threads
    along output axis ``split_axis``."""
    xp = array_module(w)
    src = w.transpose(perm)
    out = xp.empty(src.shape, dtype=w.dtype)
    before = (slice(None),) * split_axis

    def part(a, b):                    # runs on several threads: no shared state
        idx = before + (slice(a, b),)
        out[idx] = src[idx]
    split(out.shape[split_axis], part, out.size, xp)
    return out


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
        cols = (src if src.flags.c_contiguous else
                copy_split(src, POOL.take(xp, src.shape, x.dtype))).reshape(m, c)
    else:
        tp = _padded(xp, t, pads, 0)
        cols = _unroll(xp, tp, ho, wo, (kh, kw), stride, dilation)
        if tp is not t:
            POOL.give(tp)
    # weights as (cout, kh kw cin): a per-output-channel reorder (cheap, unlike
    # a full transpose to (kh kw cin, cout)); the GEMM reads it transposed
    wk = w.reshape(cout, c) if kh == kw == 1 else _reordered(w, (0, 2, 3, 1)).reshape(cout, -1)
    y2 = cols @ wk.T
    if b is not None:
        y2 += b
    saved = (cols, wk, (n, c, h, wd), (ho, wo), (kh, kw), stride, pads, dilation, pointwise)
    return nchw_view(y2.reshape(n, ho, wo, cout)), saved


def conv2d_backward(dy, saved, w, has_bias, need_input_grad=True):
    """Consumes ``saved``: its column buffer goes back to the pool."""
    xp = array_module(dy)
    cols, wk, (n, c, h, wd), (ho, wo), (kh, kw), stride, pads, dilation, pointwise = saved
    cout = w.shape[0]
    dy2 = rows2d(nhwc(dy))                                         # (M, cout)
    dwk = dy2.T @ cols                                             # (cout, kh kw cin)
    POOL.give(cols)        # only ever pools the kernels' own buffers, never an input view
    dw = dwk.reshape(cout, c, 1, 1) if kh == kw == 1 else \
        _reordered(dwk.reshape(cout, kh, kw, c), (0, 3, 1, 2))
    db = colsum(dy2) if has_bias else None
    if not need_input_grad:
        return None, dw, db
    if pointwise:
        dcols = dy2 @ wk                                           # (M, cin)
        if stride == (1, 1):
            return nchw_view(dcols.reshape(n, h, wd, c)), dw, db
        dt = xp.zeros((n, h, wd, c), dtype=dy.dtype)
        dt[:, :stride[0] * (ho - 1) + 1:stride[0], :stride[1] * (wo - 1) + 1:stride[1], :] = \
            dcols.reshape(n, ho, wo, c)
        return nchw_view(dt), dw, db
    (pt, pb), (pl, pr) = pads
    eh, ew = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
    m = n * ho * wo
    if stride == (1, 1) and eh >= max(pt, pb) and ew >= max(pl, pr) and m >= 4 * cout:
        # dX is the full correlation of dY with the flipped kernel: unroll
        # dY padded by (extent - padding) and one GEMM writes dX directly.
        # Worth it when the activations outweigh the weights (the flipped
        # weights cost a reorder; col2im costs kh*kw passes over dX)
        gp = _padded(xp, dy2.reshape(n, ho, wo, cout), ((eh - pt, eh - pb), (ew - pl, ew - pr)), 0)
        gcols = _unroll(xp, gp, h, wd, (kh, kw), (1, 1), dilation)   # (N H W, kh kw cout)
        POOL.give(gp)
        wf = _reordered(wk.reshape(cout, kh, kw, c)[:, ::-1, ::-1, :], (1, 2, 0, 3), 2)
        dx2 = gcols @ wf.reshape(kh * kw * cout, c)
        POOL.give(gcols)
        return nchw_view(dx2.reshape(n, h, wd, c)), dw, db
    # otherwise col2im: the kh*kw shifted slices of dcols summed into dX
    dcols = xp.matmul(dy2, wk, out=POOL.take(xp, (n * ho * wo, kh * kw * c), dy.dtype))
    dtp = xp.zeros((n, h + pt + pb, wd + pl + pr, c), dtype=dy.dtype)
    d6 = dcols.reshape(n, ho, wo, kh, kw, c)

    def part(a, b):
        for i in range(kh):
            for j in range(kw):
                _add_into(xp, _tap(dtp[a:b], i, j, ho, wo, stride, dilation), d6[a:b, :, :, i, j, :])
    split(n, part, dcols.size, xp)
    POOL.give(dcols)
    return nchw_view(dtp[:, pt:pt + h, pl:pl + wd, :]), dw, db


# ------------------------------------------------------------------ pooling
def maxpool2d_forward(x, k, stride, pads, dilation):
    xp = array_module(x)
    n, c, h, wd = x.shape
    (pt, pb), (pl, pr) = pads
    ho = _out_size(h, k[0], stride[0], pt, pb, dilation[0])
    wo = _out_size(wd, k[1], stride[1], pl, pr, dilation[1])
    ck = compiled_for(x)
    if ck is not None:                 # one pass, no padded copy; backward keeps the taps
        t = nhwc(x)
        y = np.empty((n, ho, wo, c), dtype=x.dtype)
        arg = np.empty(y.shape, dtype=np.int32)

        def part(a, b):
            ck.maxpool_fwd(t[a:b], y[a:b], arg[a:b], k[0], k[1], stride[0], stride[1],
                           dilation[0], dilation[1], pt, pl)
        split(n, part, y.size * k[0] * k[1], xp)
        return nchw_view(y), ("taps", arg, (h, wd), k, stride, pads, dilation)
    tp = _padded(xp, nhwc(x), pads, -np.inf)
    y = xp.empty((n, ho, wo, c), dtype=x.dtype)

    def part(a, b):
        ya, ta = y[a:b], tp[a:b]
        for i in range(k[0]):
            for j in range(k[1]):
                v = _tap(ta, i, j, ho, wo, stride, dilation)
                if i == j == 0:
                    ya[...] = v
                else:
                    xp.maximum(ya, v, out=ya)
    split(n, part, y.size * k[0] * k[1], xp)
    return nchw_view(y), (tp, y, (h, wd), k, stride, pads, dilation)


def _scatter_add(xp, target, index, values):
    """target[index] += values with repeated indices accumulated (1-D)."""
    try:
        xp.add.at(target, index, values)            # NumPy; CuPy 13 and later
    except (AttributeError, NotImplementedError):
        import cupyx                                # older CuPy
        cupyx.scatter_add(target, index, values)


_OFFSETS: dict = {}


def _window_offsets(xp, pshape, oshape, k, stride, dilation):
    """Flat-index helpers of max-pool windows over a contiguous padded
    channels-last array of shape ``pshape``, for output shape ``oshape``:
    (table, corner) where table[code] is the offset inside the window of
    the first tap whose bit is set in ``code``, and corner[n, ho, wo, c] is
    the flat index of the window's first tap.  Cached per geometry."""
    key = (xp.__name__, tuple(pshape), tuple(oshape), tuple(k), tuple(stride), tuple(dilation))
    hit = _OFFSETS.get(key)
    if hit is not None:
        return hit
    _, hp, wp, c = pshape
    n, ho, wo, _ = oshape
    ntaps = k[0] * k[1]
    taps = np.array([(i * dilation[0] * wp + j * dilation[1]) * c
                     for i in range(k[0]) for j in range(k[1])], dtype=np.int64)
    codes = np.arange(1 << ntaps)
    low = codes & -codes
    first = np.zeros(1 << ntaps, dtype=np.int64)
    first[1:] = np.log2(low[1:]).round().astype(np.int64)
    corner = ((np.arange(n, dtype=np.int64) * (hp * wp * c))[:, None, None, None]
              + (np.arange(ho, dtype=np.int64) * (stride[0] * wp * c))[None, :, None, None]
              + (np.arange(wo, dtype=np.int64) * (stride[1] * c))[None, None, :, None]
              + np.arange(c, dtype=np.int64))
    if len(_OFFSETS) >= 16:
        _OFFSETS.clear()
    _OFFSETS[key] = (xp.asarray(taps[first]), xp.asarray(corner))
    return _OFFSETS[key]


def maxpool2d_backward(dy, saved):
    """The gradient goes to the FIRST maximum of each window in row-major
    tap order (as PyTorch does).  Consumes ``saved`` (its padded copy goes
    back to the pool)."""
    xp = array_module(dy)
    if isinstance(saved[0], str):      # "taps": the compiled forward's first maximal taps
        _, arg, (h, wd), k, stride, pads, dilation = saved
        (pt, _), (pl, _) = pads
        g = nhwc(dy)
        dx = np.empty((g.shape[0], h, wd, g.shape[3]), dtype=dy.dtype)
        from hpcnn.ops import compiled_kernels as ck     # what the forward chose, whatever dy's size

        def part(a, b):
            ck.maxpool_scatter(arg[a:b], g[a:b], dx[a:b], k[0], k[1], stride[0], stride[1],
                               dilation[0], dilation[1], pt, pl)
        split(g.shape[0], part, g.size * 2, np)
        return nchw_view(dx)
    tp, y, (h, wd), k, stride, pads, dilation = saved
    n, ho, wo, c = y.shape
    g = nhwc(dy)
    (pt, pb), (pl, pr) = pads
    ntaps = k[0] * k[1]
    dtp = xp.zeros(tp.shape, dtype=dy.dtype)
    if ntaps <= 16:
        # bit t of each window's code: tap t attains the maximum; the first
        # such tap takes the gradient, scattered by flat index
        table, corner = _window_offsets(xp, tp.shape, y.shape, k, stride, dilation)
        flat = dtp.reshape(-1)

        def part(a, b):
            ya, ta = y[a:b], tp[a:b]
            code = xp.zeros(ya.shape, dtype=np.uint16)
            bit = xp.empty(ya.shape, dtype=np.uint16)
            for t in range(ntaps):
                i, j = divmod(t, k[1])
                bit[...] = _tap(ta, i, j, ho, wo, stride, dilation) == ya
                if t:
                    xp.left_shift(bit, np.uint16(t), out=bit)
                xp.bitwise_or(code, bit, out=code)
            first = xp.take(table, code)
            first += corner[a:b]
            _scatter_add(xp, flat, first.reshape(-1), g[a:b].reshape(-1))
        split(n, part, y.size * ntaps, xp)
        POOL.give(tp)      # the padded copy; an unpadded input view is not pooled
        return nchw_view(dtp[:, pt:pt + h, pl:pl + wd, :])
    free = None                       # windows whose maximum is not yet found
    for i in range(k[0]):
        for j in range(k[1]):
            hit = _tap(tp, i, j, ho, wo, stride, dilation) == y
            if free is None:
                free = ~hit
            else:
                hit &= free
                free &= ~hit
            _add_into(xp, _tap(dtp, i, j, ho, wo, stride, dilation), xp.where(hit, g, 0))
    POOL.give(tp)
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
    POOL.give(tp)
    return nchw_view(y), (tp.shape, (h, wd), (ho, wo), k, stride, pads)


def avgpool2d_backward(dy, saved):
    xp = array_module(dy)
    pshape, (h, wd), (ho, wo), k, stride, pads = saved
    g = nhwc(dy) * (1.0 / (k[0] * k[1]))
    dtp = xp.zeros(pshape, dtype=dy.dtype)
    for i in range(k[0]):
        for j in range(k[1]):
            _add_into(xp, _tap(dtp, i, j, ho, wo, stride, (1, 1)), g)
    (pt, pb), (pl, pr) = pads
    return nchw_view(dtp[:, pt:pt + h, pl:pl + wd, :])
