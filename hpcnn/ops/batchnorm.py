"""Batch normalisation over every dimension except channels (2-D, 4-D or
5-D input).  In training the statistics are those of the whole global batch:
the op sums its tile's partial sums through ``ctx.allreduce`` (the runtime
reduces over the ranks that split n, d, h and w), so distributed batch norm
equals sequential batch norm.  One reduction per direction: forward, the
sums of the shifted input and of its squares together; backward, the sums
of the gradient and of its product with the normalised input."""
from __future__ import annotations

import numpy as np

from hpcnn.ops.base import Op, ParamSpec, register, xp_of
from hpcnn.ops.host_threads import split
from hpcnn.ops.kernel_set import compiled_for
from hpcnn.ops.nhwc_kernels import colsum, nchw_view, nhwc, rows2d
from hpcnn.ops.volume_kernels import ncdhw_view, ndhwc


@register
class BatchNorm(Op):
    kind = "batchnorm"

    def __init__(self, name="", eps=1e-5, momentum=0.1):
        super().__init__(name)
        if not isinstance(eps, (int, float)) or not eps > 0:
            self.fail(f"eps must be a positive number, got {eps!r}")
        if not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
            self.fail(f"momentum must be in [0, 1], got {momentum!r}")
        self.eps = float(eps)
        self.momentum = float(momentum)

    def attrs(self):
        return dict(eps=self.eps, momentum=self.momentum)

    def infer_shape(self, in_shapes):
        self.check_arity(in_shapes)
        if len(in_shapes[0]) not in (2, 4, 5):
            self.fail(f"input must be (N, C), (N, C, H, W) or (N, C, D, H, W), got {tuple(in_shapes[0])}")
        return tuple(in_shapes[0])

    def param_specs(self, in_shapes):
        c = in_shapes[0][1]
        return {"weight": ParamSpec((c,), "ones"), "bias": ParamSpec((c,), "zeros")}

    def buffer_specs(self, in_shapes):
        c = in_shapes[0][1]
        return {"running_mean": ParamSpec((c,), "zeros", trainable=False),
                "running_var": ParamSpec((c,), "ones", trainable=False)}

    def tile_reductions(self, channels: int) -> dict:
        # forward: both statistics' sums at once; backward: both gradient sums at once
        return {"forward": [2 * channels], "backward": [2 * channels]}

    def _count(self, ctx):
        s = ctx.in_shapes[0]
        return int(np.prod(s)) // int(s[1])

    @staticmethod
    def _rows(x):
        """(M, C) matrix of the input, channels the unit-stride dimension:
        a view for channels-last 4-D and 5-D input and for (N, C) input."""
        if x.ndim == 2:
            return x if x.strides[1] == x.itemsize else xp_of(x).ascontiguousarray(x)
        if x.ndim == 5:
            t = ndhwc(x)
            return t.reshape(-1, t.shape[-1])
        return rows2d(nhwc(x))

    @staticmethod
    def _like_input(y2, x):
        """The (M, C) result viewed in the input's logical shape."""
        if x.ndim == 2:
            return y2
        if x.ndim == 5:
            n, c, d, h, w = x.shape
            return ncdhw_view(y2.reshape(n, d, h, w, c))
        n, c, h, w = x.shape
        return nchw_view(y2.reshape(n, h, w, c))

    def forward(self, xs, params, buffers, ctx):
        x = xs[0]
        self.check_inputs(xs, ctx, params)
        xp = xp_of(x)
        x2 = self._rows(x)
        ck = compiled_for(x2)
        if ck is not None:
            return self._forward_compiled(ck, x, x2, params, buffers, ctx)
        rows, grain = x2.shape[0], _grain(x2)
        gamma, beta = params["weight"], params["bias"]
        y2 = xp.empty(x2.shape, dtype=x2.dtype)
        if ctx.training:
            m = self._count(ctx)
            # one reduction for both statistics: the sums of x - s and of
            # its squares, shifted by s (the running mean, the same on every
            # rank) so that E[d^2] - E[d]^2 does not cancel
            s = buffers["running_mean"] if buffers else xp.zeros(x2.shape[1], dtype=x2.dtype)
            xc = xp.empty(x2.shape, dtype=x2.dtype)
            parts = {}

            def shifted(a, b):
                xa = xc[a:b]
                xp.subtract(x2[a:b], s, out=xa)
                parts[a] = xp.stack([colsum(xa), _colsumsq(xp, xa)])
            split(rows, shifted, 2 * x2.size, xp, grain)
            sums = ctx.allreduce(_ordered_sum(parts)) / m
            d = sums[0]
            mean = s + d
            var = xp.maximum(sums[1] - d * d, 0)

            def centre(a, b):
                xp.subtract(xc[a:b], d, out=xc[a:b])
            split(rows, centre, x2.size, xp, grain)
            if buffers:
                self._update_running(buffers, mean, var, m)
            inv = 1.0 / xp.sqrt(var + self.eps)
            scale, shift, src = gamma * inv, beta, xc
            saved = (True, xc, inv, x.shape)
        else:
            mean, var = buffers["running_mean"], buffers["running_var"]
            inv = 1.0 / xp.sqrt(var + self.eps)
            scale = gamma * inv
            shift, src = beta - mean * scale, x2
            saved = (False, x2, inv, mean)

        def affine(a, b):
            ya = y2[a:b]
            xp.multiply(src[a:b], scale, out=ya)
            xp.add(ya, shift, out=ya)
        split(rows, affine, 2 * x2.size, xp, grain)
        return self._like_input(y2, x), saved

    def _update_running(self, buffers, mean, var, m):
        mom = self.momentum
        unbiased = var * (m / max(m - 1, 1))
        rm, rv = buffers["running_mean"], buffers["running_var"]
        rm *= 1 - mom
        rm += mom * mean
        rv *= 1 - mom
        rv += mom * unbiased

    def _forward_compiled(self, ck, x, x2, params, buffers, ctx):
        """Forward in two passes over the tile (statistics, normalisation);
        backward keeps the input itself, not a centred copy."""
        rows, grain, dt = x2.shape[0], _grain(x2), x2.dtype
        gamma, beta = params["weight"], params["bias"]
        y2 = np.empty(x2.shape, dtype=dt)
        if ctx.training:
            m = self._count(ctx)
            s = buffers["running_mean"] if buffers else np.zeros(x2.shape[1], dtype=dt)
            s64, parts = s.astype(np.float64), {}

            def sums(a, b):
                xa = x2[a:b]
                parts[a] = ck.bn_sums(xa, s64, xa, s64, np.empty((2, x2.shape[1])))
            split(rows, sums, x2.size, np, grain)
            sums = ctx.allreduce(_ordered_sum(parts).astype(dt)) / m
            d = sums[0]
            mean = s + d
            var = np.maximum(sums[1] - d * d, 0)
            if buffers:
                self._update_running(buffers, mean, var, m)
        else:
            mean, var = buffers["running_mean"], buffers["running_var"]
        inv = 1.0 / np.sqrt(var + self.eps)
        mean = np.ascontiguousarray(mean, dtype=dt)
        scale = (gamma * inv).astype(dt)
        shift = np.ascontiguousarray(beta, dtype=dt)

        def affine(a, b):
            ck.bn_affine(x2[a:b], mean, scale, shift, y2[a:b])
        split(rows, affine, 2 * x2.size, np, grain)
        return self._like_input(y2, x), ("compiled", ctx.training, x2, inv, mean)

    def _backward_compiled(self, ck, dy, saved, params, ctx):
        _, training, x2, inv, mean = saved
        dy2 = self._rows(dy)
        rows, grain, dt = dy2.shape[0], _grain(dy2), dy2.dtype
        mean64, zero, parts = mean.astype(np.float64), np.zeros(dy2.shape[1]), {}

        def sums(a, b):
            parts[a] = ck.bn_sums(dy2[a:b], zero, x2[a:b], mean64, np.empty((2, dy2.shape[1])))
        split(rows, sums, 2 * dy2.size, np, grain)
        local = _ordered_sum(parts).astype(dt)
        dbeta, dgamma = local[0], local[1] * inv          # sum(dy), sum(dy * xhat)
        k = (params["weight"] * inv).astype(dt)
        if training:
            m = self._count(ctx)
            both = ctx.allreduce(np.stack([dbeta, dgamma]))
            # dx = k * (dy - mean(dy) - xhat * mean(dy * xhat)), means over the global batch
            coef, c0 = (k * inv * (both[1] / m)).astype(dt), (k * (both[0] / m)).astype(dt)
        else:
            coef = c0 = np.zeros_like(k)
        dx2 = np.empty(dy2.shape, dtype=dt)

        def grad(a, b):
            ck.bn_input_grad(dy2[a:b], x2[a:b], mean, k, coef, c0, dx2[a:b])
        split(rows, grad, 3 * dy2.size, np, grain)
        return [self._like_input(dx2, dy)], {"weight": dgamma, "bias": dbeta}

    def backward(self, dy, saved, params, ctx):
        """Consumes ``saved`` (the NumPy path reuses its centred input as
        scratch; the compiled path keeps the input and makes no copy)."""
        if isinstance(saved[0], str):          # "compiled"
            from hpcnn.ops import compiled_kernels
            return self._backward_compiled(compiled_kernels, dy, saved, params, ctx)
        training, a2, inv, extra = saved
        xp = xp_of(dy)
        dy2 = self._rows(dy)
        rows, grain = dy2.shape[0], _grain(dy2)
        gamma = params["weight"]
        dbeta = colsum(dy2)
        parts = {}

        def dot(a, b):
            parts[a] = _coldot(xp, dy2[a:b], a2[a:b])
        split(rows, dot, 2 * dy2.size, xp, grain)
        dx2 = xp.empty(dy2.shape, dtype=dy2.dtype)
        k = gamma * inv
        if training:
            xc = a2
            dgamma = _ordered_sum(parts) * inv                 # sum(dy * xhat)
            m = self._count(ctx)
            both = ctx.allreduce(xp.stack([dbeta, dgamma]))
            # dx = k * (dy - mean(dy) - xhat * mean(dy * xhat)), means over the global batch
            coef, c0 = k * inv * (both[1] / m), k * (both[0] / m)

            def grad(a, b):
                d, xa = dx2[a:b], xc[a:b]
                xp.multiply(dy2[a:b], k, out=d)
                xp.multiply(xa, coef, out=xa)
                xp.subtract(d, xa, out=d)
                xp.subtract(d, c0, out=d)
            split(rows, grad, 3 * dy2.size, xp, grain)
        else:
            mean = extra
            dgamma = (_ordered_sum(parts) - mean * dbeta) * inv

            def grad(a, b):
                xp.multiply(dy2[a:b], k, out=dx2[a:b])
            split(rows, grad, dy2.size, xp, grain)
        return [self._like_input(dx2, dy)], {"weight": dgamma, "bias": dbeta}

    def flops(self, in_shapes, out_shape):
        return int(4 * np.prod(out_shape))


def _grain(a2):
    """Rows per cache-sized chunk (about 256 KiB) of a (M, C) matrix."""
    return max(1, (1 << 16) // max(1, a2.shape[1]))


def _ordered_sum(parts: dict):
    """Sum of per-chunk partial sums in chunk order (reproducible whatever
    the threads' timing)."""
    keys = sorted(parts)
    total = parts[keys[0]].copy()
    for key in keys[1:]:
        total += parts[key]
    return total


def _colsumsq(xp, a):
    """Per-column sum of squares of a (M, C) matrix without a temporary."""
    return xp.einsum("ij,ij->j", a, a)


def _coldot(xp, a, b):
    """Per-column dot product of two (M, C) matrices."""
    return xp.einsum("ij,ij->j", a, b)
