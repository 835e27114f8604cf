"""Local kernels of the 3-D sliding-window ops (convolution, max and
average pooling over depth, height and width) on one tile, with explicit
per-side padding.

Arrays in and out are *logical* NCDHW with any strides.  Two sets, as for
the 2-D ops (``kernel_set``):

fast (the default)
    channels-last (NDHWC) memory.  A logical NCDHW array whose memory is
    NDHWC is ``a.transpose(0, 2, 3, 4, 1)`` without a copy, and every
    output is returned as such a view, so a chain of these ops never
    transposes.  Convolution is one GEMM: the (padded) input is unrolled
    into a column matrix (rows, kd*kh*kw*Cin), split over the host threads,
    and multiplied by the weights reordered to (Cout, kd*kh*kw*Cin).  With
    stride 1 the unrolling is one contiguous row block per tap on the
    flattened padded input (``_Shifted``); otherwise a strided gather of
    the N*Do*Ho*Wo windows.  Backward: dW = dY^T cols (one GEMM), dcols = dY W
    (one GEMM) and col2im, the kd*kh*kw shifted slices of dcols added into
    the padded input gradient.  Pooling loops over the window's taps on
    channels-last slices; max pooling keeps the first maximum of each
    window (PyTorch's choice) for the gradient.

reference
    window views and tensor contractions: short, obviously correct, slow;
    the oracle of the fast set.

NumPy or CuPy, whichever owns the input (``array_module``); no
communication.
"""
from __future__ import annotations

from itertools import product

import numpy as np

from hpcnn.backend import array_module
from hpcnn.ops.host_memory import POOL
from hpcnn.ops.host_threads import split

# the kernels (conv3d_forward/backward, maxpool3d_*, avgpool3d_*) are the
# static methods of the two kernel sets
__all__ = ["ndhwc", "ncdhw_view", "FAST", "REFERENCE", "volume_kernels"]


def _as_strided(xp, a, shape, strides):
    if xp is np:
        return np.lib.stride_tricks.as_strided(a, shape=shape, strides=strides, writeable=False)
    return xp.lib.stride_tricks.as_strided(a, shape=shape, strides=strides)


def ndhwc(x):
    """Channels-last (N, D, H, W, C) C-contiguous view of a logical NCDHW
    array; a copy only when its memory is laid out otherwise."""
    t = x.transpose(0, 2, 3, 4, 1)
    if not t.flags.c_contiguous:
        xp = array_module(x)
        out = xp.empty(t.shape, dtype=t.dtype)
        D = t.shape[1]

        def part(a, b):                   # (sample, plane) pairs: threads even at batch 1
            for i in range(a, b):
                n, d = divmod(i, D)
                out[n, d] = t[n, d]
        split(t.shape[0] * D, part, t.size, xp, max(1, -(-t.shape[0] * D // 16)))
        t = out
    return t


def ncdhw_view(t):
    """The logical NCDHW view of a channels-last array."""
    return t.transpose(0, 4, 1, 2, 3)


def _out_sizes(spatial, k, s, pads, d):
    return tuple((n + lo + hi - dd * (kk - 1) - 1) // ss + 1
                 for n, kk, ss, (lo, hi), dd in zip(spatial, k, s, pads, d))


def _pad_last(xp, t, pads, value):
    """Channels-last ``t`` padded by ``pads`` ((lo, hi) per spatial axis)
    with ``value``, or ``t`` itself without padding."""
    if all(lo == hi == 0 for lo, hi in pads):
        return t
    n, D, H, W, c = t.shape
    (d0, d1), (h0, h1), (w0, w1) = pads
    out = POOL.take(xp, (n, D + d0 + d1, H + h0 + h1, W + w0 + w1, c), t.dtype)

    def part(a, b):
        o = out[a:b]
        o[:, :d0] = value
        o[:, d0 + D:] = value
        o[:, d0:d0 + D, :h0] = value
        o[:, d0:d0 + D, h0 + H:] = value
        o[:, d0:d0 + D, h0:h0 + H, :w0] = value
        o[:, d0:d0 + D, h0:h0 + H, w0 + W:] = value
        o[:, d0:d0 + D, h0:h0 + H, w0:w0 + W] = t[a:b]
    split(n, part, out.size, xp)
    return out


def _tap(a, taps, out, s, d):
    """Slice of padded channels-last ``a`` that tap ``taps`` (i, j, l) of a
    window reads for output sizes ``out``."""
    return a[(slice(None),) + tuple(slice(t * dd, t * dd + ss * (o - 1) + 1, ss)
                                    for t, o, ss, dd in zip(taps, out, s, d))]


def _unpad_last(a, pads, spatial):
    return a[(slice(None),) + tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, spatial)) + (slice(None),)]



# ---- stride 1: the shifted-rows form -------------------------------------------------
#: rows per block of the tall GEMMs (a block's operands stay in cache)
GEMM_ROWS = 32768


def _gemm_rows(xp, a, bt, out):
    """``out = a @ bt`` block by block of rows (``out`` C-contiguous)."""
    if xp is not np:
        return xp.matmul(a, bt, out=out)
    for i in range(0, a.shape[0], GEMM_ROWS):
        np.matmul(a[i:i + GEMM_ROWS], bt, out=out[i:i + GEMM_ROWS])
    return out


def _gemm_tn(xp, a, b):
    """``a.T @ b`` for tall a and b, as a sum of row blocks in block order
    (BLAS runs one tall product with a long inner dimension slowly)."""
    if xp is not np:
        return a.T @ b
    acc = None
    for i in range(0, a.shape[0], GEMM_ROWS):
        part = a[i:i + GEMM_ROWS].T @ b[i:i + GEMM_ROWS]
        if acc is None:
            acc = part
        else:
            acc += part
    return acc


def _tap_offsets(pshape, k, d) -> list[int]:
    """Row offset of each tap (i, j, l) in the padded input flattened over
    (N, Dp, Hp, Wp): tap (i, j, l) of the window at flat row p reads row
    p + offset."""
    _, Dp, Hp, Wp, _ = pshape
    return [i * d[0] * Hp * Wp + j * d[1] * Wp + l * d[2] for i, j, l in product(*(range(kk) for kk in k))]


def _rows_split(rows: int, fn, work: int, xp):
    """``fn(a, b)`` over row chunks of ``range(rows)`` on the host threads."""
    grain = max(1, -(-rows // 64))
    split(-(-rows // grain), lambda a, b: fn(a * grain, min(b * grain, rows)), work, xp)


class _Shifted:
    """A stride-1 window over a padded channels-last input, in the form
    where every tap is a contiguous block of rows.

    Flatten the padded input (N, Dp, Hp, Wp, C) to rows (N*Dp*Hp*Wp, C).
    The window whose corner sits at flat row p reads, for tap t, row
    p + off[t]; so with ``L = rows - max(off)`` the column matrix is, tap by
    tap, the row block [off[t], off[t] + L) -- one 2-D copy per tap instead
    of a strided gather.  Rows whose corner is not an output position (the
    last Wp - Wo columns, Hp - Ho rows and Dp - Do planes of every sample)
    compute values nobody reads; the output is cropped from them, and in
    backward their gradient is zero.  The large temporaries come from the
    host buffer pool (first-touch page faults cost more than the copies).
    """

    def __init__(self, pshape, k, d, out):
        self.pshape, self.k, self.out = tuple(pshape), tuple(k), tuple(out)
        n, Dp, Hp, Wp, c = pshape
        self.off = _tap_offsets(pshape, k, d)
        self.rows = n * Dp * Hp * Wp
        self.L = self.rows - max(self.off)

    def cols(self, xp, t):
        """(L, taps * C) column matrix of padded channels-last ``t``."""
        flat = t.reshape(self.rows, -1)
        c = flat.shape[1]
        out = POOL.take(xp, (self.L, len(self.off) * c), t.dtype)

        def part(a, b):
            for j, o in enumerate(self.off):
                out[a:b, j * c:(j + 1) * c] = flat[o + a:o + b]
        _rows_split(self.L, part, out.size, xp)
        return out

    def forward(self, xp, cols, w2, b):
        """The (N, Do, Ho, Wo, Cout) output: cols @ w2^T (+ b), cropped."""
        n, Dp, Hp, Wp, _ = self.pshape
        cout = w2.shape[0]
        full = POOL.take(xp, (self.rows, cout), cols.dtype)
        _gemm_rows(xp, cols, w2.T, full[:self.L])
        Do, Ho, Wo = self.out
        grid = full.reshape(n, Dp, Hp, Wp, cout)
        y = xp.empty((n, Do, Ho, Wo, cout), dtype=cols.dtype)

        def part(a, b_):
            for i in range(a, b_):
                s_, r = divmod(i, Do)
                y[s_, r] = grid[s_, r, :Ho, :Wo]
                if b is not None:
                    y[s_, r] += b
        split(n * Do, part, y.size, xp, 1)
        POOL.give(full)
        return y

    def rows_of(self, xp, g):
        """(L, C) rows of an output gradient ``g`` (N, Do, Ho, Wo, C) on the
        padded grid, zero where no output sits."""
        n, Dp, Hp, Wp, _ = self.pshape
        Do, Ho, Wo = self.out
        full = POOL.take(xp, (n, Dp, Hp, Wp, g.shape[-1]), g.dtype)

        def part(a, b):
            for i in range(a, b):
                s_, r = divmod(i, Dp)
                if r < Do:
                    full[s_, r, :Ho, :Wo] = g[s_, r]
                    full[s_, r, :Ho, Wo:] = 0
                    full[s_, r, Ho:] = 0
                else:
                    full[s_, r] = 0
        split(n * Dp, part, full.size, xp, 1)
        return full

    def col2im(self, xp, dcols, c):
        """The padded input gradient (N, Dp, Hp, Wp, C): every tap's column
        block added back at its row offset (within one tap the rows are
        disjoint, so the threads split rows)."""
        dflat = POOL.take(xp, (self.rows, c), dcols.dtype)
        dflat[...] = 0
        for j, o in enumerate(self.off):
            def part(a, b, j=j, o=o):
                dflat[o + a:o + b] += dcols[a:b, j * c:(j + 1) * c]
            _rows_split(self.L, part, 2 * self.L * c, xp)
        return dflat.reshape(self.pshape[:4] + (c,))


# ---- fast: channels-last GEMM ------------------------------------------------------
class FAST:
    """The channels-last kernel set (see the module text)."""

    @staticmethod
    def conv3d_forward(x, w, b, stride, pads, dilation):
        xp = array_module(x)
        n = x.shape[0]
        cout, cin, *k = w.shape
        k = tuple(k)
        t = _pad_last(xp, ndhwc(x), pads, 0.0)
        out = _out_sizes(x.shape[2:], k, stride, pads, dilation)
        K = int(np.prod(k)) * cin
        w2 = w.transpose(0, 2, 3, 4, 1).reshape(cout, K)          # (Cout, kd kh kw Cin)
        if tuple(stride) == (1, 1, 1) and k != (1, 1, 1):
            sh = _Shifted(t.shape, k, dilation, out)
            cols = sh.cols(xp, t)
            POOL.give(t)
            y = sh.forward(xp, cols, w2, b)
            return ncdhw_view(y), ("shifted", cols, sh, tuple(x.shape), pads)
        M = n * int(np.prod(out))
        if k == (1, 1, 1) and tuple(stride) == (1, 1, 1):
            cols = t.reshape(M, K)
        else:
            sn, sd, sh_, sw, sc = t.strides
            view = _as_strided(xp, t, (n,) + out + k + (cin,),
                               (sn, sd * stride[0], sh_ * stride[1], sw * stride[2],
                                sd * dilation[0], sh_ * dilation[1], sw * dilation[2], sc))
            cols = xp.empty((n, out[0]) + out[1:] + k + (cin,), dtype=x.dtype)
            rows = n * out[0]

            def unroll(a, b_):
                for i in range(a, b_):
                    s_, r = divmod(i, out[0])
                    cols[s_, r] = view[s_, r]
            split(rows, unroll, cols.size, xp, 1)
            cols = cols.reshape(M, K)
        y = cols @ w2.T                                            # (M, Cout)
        if b is not None:
            y += b
        y = y.reshape((n,) + out + (cout,))
        return ncdhw_view(y), ("strided", cols, t.shape, tuple(x.shape), out, stride, dilation, pads, k)

    @staticmethod
    def conv3d_backward(dy, saved, w, has_bias, need_input_grad=True):
        xp = array_module(dy)
        cout, cin = w.shape[:2]
        k = tuple(w.shape[2:])
        w2 = w.transpose(0, 2, 3, 4, 1).reshape(cout, -1)
        if saved[0] == "shifted":
            _, cols, sh, xshape, pads = saved
            g = ndhwc(dy)
            db = xp.ones(int(np.prod(g.shape[:4])), dtype=dy.dtype) @ g.reshape(-1, cout) if has_bias else None
            grid = sh.rows_of(xp, g)
            dy2 = grid.reshape(sh.rows, cout)[:sh.L]
            dw = _gemm_tn(xp, dy2, cols).reshape((cout,) + k + (cin,)).transpose(0, 4, 1, 2, 3)
            dw = xp.ascontiguousarray(dw)
            if not need_input_grad:
                POOL.give(cols)
                POOL.give(grid)
                return None, dw, db
            dcols = _gemm_rows(xp, dy2, w2, cols)          # the columns' memory, no longer needed
            POOL.give(grid)
            dxp = sh.col2im(xp, dcols, cin)
            POOL.give(cols)
            dx = xp.empty(xshape[:1] + xshape[2:] + (cin,), dtype=dy.dtype)
            src = _unpad_last(dxp, pads, xshape[2:])

            def part(a, b_):
                dx[a:b_] = src[a:b_]
            split(xshape[0], part, dx.size, xp)
            POOL.give(dxp)
            return ncdhw_view(dx), dw, db
        _, cols, pshape, xshape, out, stride, dilation, pads, k = saved
        dt = ndhwc(dy)
        M = cols.shape[0]
        dy2 = dt.reshape(M, cout)
        dw = (dy2.T @ cols).reshape((cout,) + k + (cin,)).transpose(0, 4, 1, 2, 3)
        db = xp.ones(M, dtype=dy.dtype) @ dy2 if has_bias else None
        if not need_input_grad:
            return None, xp.ascontiguousarray(dw), db
        dcols = (dy2 @ w2).reshape((xshape[0],) + out + k + (cin,))
        if k == (1, 1, 1) and tuple(stride) == (1, 1, 1) and all(p == (0, 0) for p in pads):
            return ncdhw_view(dcols.reshape(xshape[0], *out, cin)), xp.ascontiguousarray(dw), db
        dxp = xp.zeros(pshape, dtype=dy.dtype)
        rows = xshape[0] * out[0]
        for taps in product(*(range(kk) for kk in k)):
            sel = (slice(None),) * 4 + taps
            src = dcols[sel]                                        # (N, Do, Ho, Wo, Cin)
            dst = _tap(dxp, taps, out, stride, dilation)

            def add(a, b_, src=src, dst=dst):
                for i in range(a, b_):
                    s_, r = divmod(i, out[0])
                    dst[s_, r] += src[s_, r]
            split(rows, add, src.size, xp, 1)
        dx = _unpad_last(dxp, pads, xshape[2:])
        return ncdhw_view(dx), xp.ascontiguousarray(dw), db

    @staticmethod
    def maxpool3d_forward(x, k, stride, pads, dilation):
        xp = array_module(x)
        t = _pad_last(xp, ndhwc(x), pads, -np.inf)
        out = _out_sizes(x.shape[2:], k, stride, pads, dilation)
        y = arg = None
        for idx, taps in enumerate(product(*(range(kk) for kk in k))):
            v = _tap(t, taps, out, stride, dilation)
            if y is None:
                y = v.copy()
                arg = xp.zeros(y.shape, dtype=np.int16)
            else:
                better = v > y                                    # ties keep the first tap
                xp.copyto(y, v, where=better)
                arg[better] = idx
        POOL.give(t)
        return ncdhw_view(y), (arg, t.shape, tuple(x.shape), out, tuple(k), stride, dilation, pads)

    @staticmethod
    def maxpool3d_backward(dy, saved):
        xp = array_module(dy)
        arg, pshape, xshape, out, k, stride, dilation, pads = saved
        dt = ndhwc(dy)
        dxp = xp.zeros(pshape, dtype=dy.dtype)
        for idx, taps in enumerate(product(*(range(kk) for kk in k))):
            dst = _tap(dxp, taps, out, stride, dilation)
            dst += xp.where(arg == idx, dt, 0)
        return ncdhw_view(_unpad_last(dxp, pads, xshape[2:]))

    @staticmethod
    def avgpool3d_forward(x, k, stride, pads):
        xp = array_module(x)
        t = _pad_last(xp, ndhwc(x), pads, 0.0)
        out = _out_sizes(x.shape[2:], k, stride, pads, (1, 1, 1))
        y = None
        for taps in product(*(range(kk) for kk in k)):
            v = _tap(t, taps, out, stride, (1, 1, 1))
            if y is None:
                y = v.copy()
            else:
                y += v
        y *= 1.0 / int(np.prod(k))
        POOL.give(t)
        return ncdhw_view(y), (t.shape, tuple(x.shape), out, tuple(k), stride, pads)

    @staticmethod
    def avgpool3d_backward(dy, saved):
        xp = array_module(dy)
        pshape, xshape, out, k, stride, pads = saved
        g = ndhwc(dy) * (1.0 / int(np.prod(k)))
        dxp = xp.zeros(pshape, dtype=dy.dtype)
        for taps in product(*(range(kk) for kk in k)):
            dst = _tap(dxp, taps, out, stride, (1, 1, 1))
            dst += g
        return ncdhw_view(_unpad_last(dxp, pads, xshape[2:]))


# ---- reference: window views and contractions --------------------------------------
def _pad_first(xp, x, pads, value):
    if all(lo == hi == 0 for lo, hi in pads):
        return xp.ascontiguousarray(x)
    return xp.pad(x, ((0, 0), (0, 0)) + tuple(pads), mode="constant", constant_values=value)


def _windows(xp, a, k, s, d):
    """View (N, C, Do, Ho, Wo, kd, kh, kw) of the windows of padded ``a``."""
    a = xp.ascontiguousarray(a)
    out = tuple((n - dd * (kk - 1) - 1) // ss + 1 for n, kk, ss, dd in zip(a.shape[2:], k, s, d))
    sn, sc, *sp = a.strides
    return _as_strided(xp, a, a.shape[:2] + out + tuple(k),
                       (sn, sc) + tuple(x * ss for x, ss in zip(sp, s)) + tuple(x * dd for x, dd in zip(sp, d)))


def _scatter(xp, g, pshape, k, s, d):
    """Adjoint of _windows: window gradients (N, C, Do, Ho, Wo, kd, kh, kw)
    summed into a padded input gradient."""
    dxp = xp.zeros(pshape, dtype=g.dtype)
    out = g.shape[2:5]
    for taps in product(*(range(kk) for kk in k)):
        sl = (slice(None), slice(None)) + tuple(slice(t * dd, t * dd + ss * (o - 1) + 1, ss)
                                                for t, o, ss, dd in zip(taps, out, s, d))
        dxp[sl] += g[(Ellipsis,) + taps]
    return dxp


def _unpad_first(a, pads):
    return a[(slice(None), slice(None)) + tuple(slice(lo, a.shape[2 + i] - hi) for i, (lo, hi) in enumerate(pads))]


class REFERENCE:
    """The reference kernel set (see the module text)."""

    @staticmethod
    def conv3d_forward(x, w, b, stride, pads, dilation):
        xp = array_module(x)
        a = _pad_first(xp, x, pads, 0.0)
        cols = _windows(xp, a, w.shape[2:], stride, dilation)
        y = xp.einsum("ncdhwijl,ocijl->nodhw", cols, w, optimize=True)
        if b is not None:
            y = y + b[None, :, None, None, None]
        return y, (cols, a.shape, stride, dilation, pads)

    @staticmethod
    def conv3d_backward(dy, saved, w, has_bias, need_input_grad=True):
        xp = array_module(dy)
        cols, pshape, stride, dilation, pads = saved
        dw = xp.einsum("nodhw,ncdhwijl->ocijl", dy, cols, optimize=True)
        db = dy.sum(axis=(0, 2, 3, 4)) if has_bias else None
        if not need_input_grad:
            return None, dw, db
        g = xp.einsum("nodhw,ocijl->ncdhwijl", dy, w, optimize=True)
        return _unpad_first(_scatter(xp, g, pshape, w.shape[2:], stride, dilation), pads), dw, db

    @staticmethod
    def maxpool3d_forward(x, k, stride, pads, dilation):
        xp = array_module(x)
        a = _pad_first(xp, x, pads, -np.inf)
        cols = _windows(xp, a, k, stride, dilation)
        flat = cols.reshape(cols.shape[:5] + (-1,))
        arg = flat.argmax(axis=-1)
        y = xp.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
        return y, (a.shape, arg, tuple(k), stride, dilation, pads)

    @staticmethod
    def maxpool3d_backward(dy, saved):
        xp = array_module(dy)
        pshape, arg, k, stride, dilation, pads = saved
        g = xp.zeros(dy.shape + (int(np.prod(k)),), dtype=dy.dtype)
        xp.put_along_axis(g, arg[..., None], dy[..., None], axis=-1)
        return _unpad_first(_scatter(xp, g.reshape(dy.shape + k), pshape, k, stride, dilation), pads)

    @staticmethod
    def avgpool3d_forward(x, k, stride, pads):
        xp = array_module(x)
        a = _pad_first(xp, x, pads, 0.0)
        cols = _windows(xp, a, k, stride, (1, 1, 1))
        return cols.mean(axis=(5, 6, 7)), (a.shape, tuple(k), stride, pads)

    @staticmethod
    def avgpool3d_backward(dy, saved):
        xp = array_module(dy)
        pshape, k, stride, pads = saved
        g = xp.broadcast_to((dy / int(np.prod(k)))[..., None, None, None], dy.shape + k)
        return _unpad_first(_scatter(xp, g, pshape, k, stride, (1, 1, 1)), pads)


def volume_kernels():
    """The kernel set in use (``hpcnn.ops.kernel_set``)."""
    from hpcnn.ops.kernel_set import kernel_set
    return REFERENCE if kernel_set() == "reference" else FAST
