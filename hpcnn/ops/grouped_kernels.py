"""Local kernels of grouped convolution on one tile (``Conv2d`` with
``groups`` > 1).  Arrays are logical NCHW; NumPy or CuPy, whichever owns the
input.  The weights are (Cout, Cin/G, kh, kw): output channel o belongs to
group o // (Cout/G) and reads only that group's Cin/G input channels.

Depthwise convolution (Cin/G == 1, channel multiplier m = Cout/Cin) has a
direct kernel on channels-last memory: per multiple j, the outputs
(N, Ho, Wo, C) of channels c*m + j are the sum over the kh*kw window taps
of the tap's shifted slice of the padded input (N, Ho, Wo, C) times that
tap's per-channel weights (C,), one vectorised multiply-add per tap (no
unrolling, no GEMM: each output reads only kh*kw values), on chunks of
samples small enough for the passes to stay in cache.  Backward runs the
same taps: the weight gradient of a tap is the per-channel sum of the
slice times dY (a matrix-vector product), the input gradient the tap's
slice of dX plus dY times the weights.  Outputs are channels-last
views (``nchw_view``), as the other fast kernels return.

Other groups are one batched GEMM on the fast kernel set: the padded
channels-last input is unrolled by one strided copy straight into per-group
column matrices (G, N*Ho*Wo, kh*kw*Cin/G), multiplied by the weights
reordered to (G, Cout/G, kh*kw*Cin/G); backward is the batched dW = dY^T
cols and dcols = dY W, then col2im (the kh*kw shifted slices summed into
dX).  The reference kernel set loops over the groups, each an ordinary
convolution of that set, and uses the loop for depthwise convolution too,
which keeps it an independent check of both fast kernels.
"""
from __future__ import annotations

from hpcnn.backend import array_module
from hpcnn.ops.host_memory import POOL
from hpcnn.ops.host_threads import split
from hpcnn.ops.nhwc_kernels import (_as_strided, _out_size, _padded, _reordered, _tap, colsum, copy_split,
                                    nchw_view, nhwc, rows2d)


class _DepthwiseSaved:
    __slots__ = ("tp", "padded", "wt", "xshape", "oshape", "k", "stride", "pads", "dilation")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


class _GroupsSaved:
    __slots__ = ("runs", "xshape", "groups")

    def __init__(self, runs, xshape, groups):
        self.runs, self.xshape, self.groups = runs, xshape, groups


def grouped_forward(K, x, w, b, stride, pads, dilation, groups):
    """(y, saved) of a convolution with ``groups`` groups, K the kernel set
    (a module with conv2d_forward/backward)."""
    c = x.shape[1]
    if w.shape[1] * groups != c or w.shape[0] % groups:
        raise ValueError(f"grouped convolution: input channels {c} and weight {tuple(w.shape)} do not "
                         f"make {groups} groups (need Cin = G * weight.shape[1] and Cout divisible by G)")
    if getattr(K, "__name__", "").endswith("nhwc_kernels"):
        if w.shape[1] == 1:
            return depthwise_forward(x, w, b, stride, pads, dilation)
        return batched_forward(x, w, b, stride, pads, dilation, groups)
    return _loop_forward(K, x, w, b, stride, pads, dilation, groups)


def grouped_backward(K, dy, saved, w, has_bias, need_input_grad=True):
    """(dx, dw, db) of ``grouped_forward``; dx None without ``need_input_grad``."""
    if isinstance(saved, _DepthwiseSaved):
        return depthwise_backward(dy, saved, w, has_bias, need_input_grad)
    if isinstance(saved, _BatchedSaved):
        return batched_backward(dy, saved, w, has_bias, need_input_grad)
    return _loop_backward(K, dy, saved, w, has_bias, need_input_grad)


# ---- depthwise: one multiply-add per window tap ------------------------------------
_CHUNK = 1 << 16        # values of a chunk of samples the tap passes work on (256 KiB of float32)


def _grain(a) -> int:
    """Samples per chunk of ``a`` (N, ...) for about _CHUNK values."""
    per = max(1, a.size // max(1, a.shape[0]))
    return max(1, _CHUNK // per)

def depthwise_forward(x, w, b, stride, pads, dilation):
    xp = array_module(x)
    n, c, h, wd = x.shape
    cout, _, kh, kw = w.shape
    m = cout // c
    (pt, pb), (pl, pr) = pads
    ho = _out_size(h, kh, stride[0], pt, pb, dilation[0])
    wo = _out_size(wd, kw, stride[1], pl, pr, dilation[1])
    t = nhwc(x)
    tp = _padded(xp, t, pads, 0)
    # per multiple and tap the weights of every channel: (m, kh*kw, C)
    wt = _reordered(w.reshape(c, m, kh, kw), (1, 2, 3, 0)).reshape(m, kh * kw, c)
    y = xp.empty((n, ho, wo, c, m), dtype=x.dtype)
    bias = None if b is None else b.reshape(c, m)

    def part(a, z):
        ta = tp[a:z]
        acc = y[a:z, ..., 0] if m == 1 else xp.empty((z - a, ho, wo, c), dtype=x.dtype)
        tmp = xp.empty(acc.shape, dtype=x.dtype) if kh * kw > 1 else None
        for j in range(m):             # each multiple: a depthwise convolution of its own
            for q in range(kh * kw):
                i, k = divmod(q, kw)
                v = _tap(ta, i, k, ho, wo, stride, dilation)
                if q == 0:
                    xp.multiply(v, wt[j, q], out=acc)
                else:
                    xp.multiply(v, wt[j, q], out=tmp)
                    acc += tmp
            if bias is not None:
                acc += bias[:, j]
            if m > 1:
                y[a:z, ..., j] = acc
    # samples in chunks of about _CHUNK values, so that the kh*kw passes over
    # the output stay in cache
    split(n, part, y.size * kh * kw, xp, grain=_grain(y))
    saved = _DepthwiseSaved(tp=tp, padded=tp is not t, wt=wt, xshape=(n, c, h, wd), oshape=(ho, wo),
                            k=(kh, kw), stride=tuple(stride), pads=pads, dilation=tuple(dilation))
    return nchw_view(y.reshape(n, ho, wo, cout)), saved


def depthwise_backward(dy, saved, w, has_bias, need_input_grad=True):
    """Consumes ``saved``: its padded copy of the input goes back to the pool."""
    xp = array_module(dy)
    n, c, h, wd = saved.xshape
    ho, wo = saved.oshape
    kh, kw = saved.k
    s, d, tp, wt = saved.stride, saved.dilation, saved.tp, saved.wt
    cout = w.shape[0]
    m = cout // c
    g = nhwc(dy).reshape(n, ho, wo, c, m)
    db = colsum(g.reshape(-1, cout)) if has_bias else None
    (pt, pb), (pl, pr) = saved.pads
    dtp = xp.zeros(tp.shape, dtype=dy.dtype) if need_input_grad else None
    chunks = []

    def part(a, z):
        ta = tp[a:z]
        dwa = xp.empty((m, kh * kw, c), dtype=dy.dtype)
        prod = xp.empty((z - a, ho, wo, c), dtype=dy.dtype)
        gj = None
        for j in range(m):
            if m == 1:
                gj = g[a:z, ..., 0]
            else:                      # one multiple's gradient, contiguous
                gj = xp.empty(prod.shape, dtype=dy.dtype) if gj is None else gj
                gj[...] = g[a:z, ..., j]
            for q in range(kh * kw):
                i, k = divmod(q, kw)
                v = _tap(ta, i, k, ho, wo, s, d)
                # the tap's weight gradient: per channel the sum of slice * dY
                xp.multiply(v, gj, out=prod)
                dwa[j, q] = colsum(prod.reshape(-1, c))
                if need_input_grad:
                    dst = _tap(dtp[a:z], i, k, ho, wo, s, d)
                    xp.multiply(gj, wt[j, q], out=prod)
                    xp.add(dst, prod, out=dst)
        chunks.append(dwa)
    split(n, part, g.size * kh * kw * 2, xp, grain=_grain(g))
    dwt = chunks[0]
    for extra in chunks[1:]:
        dwt = dwt + extra
    dw = _reordered(dwt.reshape(m, kh, kw, c), (3, 0, 1, 2)).reshape(cout, 1, kh, kw)
    if saved.padded:
        POOL.give(tp)
    if not need_input_grad:
        return None, dw, db
    return nchw_view(dtp[:, pt:pt + h, pl:pl + wd, :]), dw, db


# ---- any groups, fast: one batched GEMM ---------------------------------------------
class _BatchedSaved:
    __slots__ = ("cols", "wk", "xshape", "oshape", "k", "stride", "pads", "dilation", "groups")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


def batched_forward(x, w, b, stride, pads, dilation, groups):
    xp = array_module(x)
    n, c, h, wd = x.shape
    cout, cg, kh, kw = w.shape
    og = cout // groups
    (pt, pb), (pl, pr) = pads
    ho = _out_size(h, kh, stride[0], pt, pb, dilation[0])
    wo = _out_size(wd, kw, stride[1], pl, pr, dilation[1])
    m = n * ho * wo
    t = nhwc(x)
    tp = _padded(xp, t, pads, 0)
    sn, sh, sw, sc = tp.strides
    # per group, per output pixel, its kh x kw x cg window: (G, N, Ho, Wo, kh, kw, cg)
    win = _as_strided(xp, tp, (groups, n, ho, wo, kh, kw, cg),
                      (sc * cg, sn, sh * stride[0], sw * stride[1], sh * dilation[0], sw * dilation[1], sc))
    cols = copy_split(win, POOL.take(xp, win.shape, x.dtype)).reshape(groups, m, kh * kw * cg)
    if tp is not t:
        POOL.give(tp)
    wk = _reordered(w.reshape(groups, og, cg, kh, kw), (0, 1, 3, 4, 2)).reshape(groups, og, kh * kw * cg)
    y3 = xp.matmul(cols, wk.transpose(0, 2, 1))                       # (G, M, og)
    y = xp.empty((m, groups, og), dtype=x.dtype)
    y[...] = y3.transpose(1, 0, 2)
    y = y.reshape(m, cout)
    if b is not None:
        y += b
    saved = _BatchedSaved(cols=cols, wk=wk, xshape=(n, c, h, wd), oshape=(ho, wo), k=(kh, kw),
                          stride=tuple(stride), pads=pads, dilation=tuple(dilation), groups=groups)
    return nchw_view(y.reshape(n, ho, wo, cout)), saved


def batched_backward(dy, saved, w, has_bias, need_input_grad=True):
    """Consumes ``saved``: its column buffer goes back to the pool."""
    xp = array_module(dy)
    n, c, h, wd = saved.xshape
    ho, wo = saved.oshape
    kh, kw = saved.k
    groups, cols, wk = saved.groups, saved.cols, saved.wk
    cout, cg = w.shape[:2]
    og = cout // groups
    m = n * ho * wo
    dy2 = rows2d(nhwc(dy))                                             # (M, cout)
    dyg = xp.empty((groups, m, og), dtype=dy.dtype)
    dyg[...] = dy2.reshape(m, groups, og).transpose(1, 0, 2)
    dwk = xp.matmul(dyg.transpose(0, 2, 1), cols)                      # (G, og, kh kw cg)
    POOL.give(cols)
    dw = _reordered(dwk.reshape(groups, og, kh, kw, cg), (0, 1, 4, 2, 3)).reshape(cout, cg, kh, kw)
    db = colsum(dy2) if has_bias else None
    if not need_input_grad:
        return None, dw, db
    dcg = xp.matmul(dyg, wk).reshape(groups, n, ho, wo, kh, kw, cg)
    # channels-last again, (N, Ho, Wo, kh, kw, C): one copy, then contiguous slices per tap
    dcols = copy_split(dcg.transpose(1, 2, 3, 4, 5, 0, 6),
                       POOL.take(xp, (n, ho, wo, kh, kw, groups, cg), dy.dtype)).reshape(n, ho, wo, kh, kw, c)
    del dcg
    (pt, pb), (pl, pr) = saved.pads
    dtp = xp.zeros((n, h + pt + pb, wd + pl + pr, c), dtype=dy.dtype)
    s, d = saved.stride, saved.dilation

    def part(a, z):
        for i in range(kh):
            for j in range(kw):
                dst = _tap(dtp[a:z], i, j, ho, wo, s, d)
                xp.add(dst, dcols[a:z, :, :, i, j, :], out=dst)
    split(n, part, dcols.size, xp)
    POOL.give(dcols)
    return nchw_view(dtp[:, pt:pt + h, pl:pl + wd, :]), dw, db


# ---- any groups: a loop of ordinary convolutions -------------------------------------
def _loop_forward(K, x, w, b, stride, pads, dilation, groups):
    xp = array_module(x)
    n, c, h, wd = x.shape
    cout = w.shape[0]
    cg, og = c // groups, cout // groups
    y, runs = None, []
    for gi in range(groups):
        xs = x[:, gi * cg:(gi + 1) * cg]
        yg, sg = K.conv2d_forward(xs, w[gi * og:(gi + 1) * og], None if b is None else b[gi * og:(gi + 1) * og],
                                  stride, pads, dilation)
        if y is None:
            y = xp.empty((n, yg.shape[2], yg.shape[3], cout), dtype=x.dtype)
        y[..., gi * og:(gi + 1) * og] = yg.transpose(0, 2, 3, 1)
        runs.append(sg)
    return nchw_view(y), _GroupsSaved(runs, (n, c, h, wd), groups)


def _loop_backward(K, dy, saved, w, has_bias, need_input_grad):
    xp = array_module(dy)
    n, c, h, wd = saved.xshape
    groups = saved.groups
    cout = w.shape[0]
    cg, og = c // groups, cout // groups
    kh, kw = w.shape[2:]
    dx = xp.empty((n, h, wd, c), dtype=dy.dtype) if need_input_grad else None
    dw = xp.empty((cout, cg, kh, kw), dtype=dy.dtype)
    db = xp.empty(cout, dtype=dy.dtype) if has_bias else None
    for gi, sg in enumerate(saved.runs):
        o = slice(gi * og, (gi + 1) * og)
        dxg, dwg, dbg = K.conv2d_backward(dy[:, o], sg, w[o], has_bias, need_input_grad)
        dw[o] = dwg
        if has_bias:
            db[o] = dbg
        if need_input_grad:
            dx[..., gi * cg:(gi + 1) * cg] = dxg.transpose(0, 2, 3, 1)
    return (nchw_view(dx) if need_input_grad else None), dw, db
