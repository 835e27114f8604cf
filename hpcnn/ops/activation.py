"""Elementwise activations."""
from __future__ import annotations

import numpy as np

from hpcnn.ops.base import Op, register, xp_of
from hpcnn.ops.host_threads import split
from hpcnn.ops.kernel_set import compiled_for


def sample_grain(a) -> int:
    """Samples per cache-sized chunk (about 256 KiB) of a batch array."""
    per = max(1, a.size // max(1, a.shape[0]))
    return max(1, (1 << 16) // per)


@register
class ReLU(Op):
    kind = "relu"

    def infer_shape(self, in_shapes):
        self.check_arity(in_shapes)
        return tuple(in_shapes[0])

    def forward(self, xs, params, buffers, ctx):
        x = xs[0]
        self.check_inputs(xs, ctx)
        xp = xp_of(x)
        y = xp.empty_like(x)                 # same memory layout as x

        def part(a, b):
            xp.maximum(x[a:b], 0, out=y[a:b])
        split(x.shape[0], part, x.size, xp, sample_grain(x))
        return y, y

    def backward(self, dy, y, params, ctx):
        xp = xp_of(dy)
        ck = compiled_for(dy)
        if ck is not None:                    # one pass, no temporary
            dx = np.empty_like(y)             # y: this op's own output, dense
            flat = dense_flat(dy, y, dx)
            if flat is not None:
                g, yf, d = flat

                def part(a, b):
                    ck.relu_grad(g[a:b], yf[a:b], d[a:b])
                split(g.size, part, 2 * g.size, np, 1 << 16)
                return [dx], {}
            order = sorted(range(dx.ndim), key=lambda i: -dx.strides[i])
            views = [a.transpose(order) for a in (dy, y, dx)]
            if dy.ndim == 4 and all(v.strides[3] == v.itemsize and min(v.strides) >= 0 for v in views):
                # dy a view with gaps (a padded buffer) or of another layout
                ((g, sg), (yf, sy), (d, sd)), shape = ck.runs4(views)

                def part(a, b):
                    ck.relu_grad4(g, sg, yf, sy, d, sd, shape, a, b)
                split(views[0].shape[0], part, 2 * dy.size, np)
                return [dx], {}
        dx = xp.empty_like(dy)

        def part(a, b):
            xp.multiply(dy[a:b], y[a:b] > 0, out=dx[a:b])
        split(dy.shape[0], part, 2 * dy.size, xp, sample_grain(dy))
        return [dx], {}


def dense_flat(*arrays):
    """1-D views of arrays of one shape and one dense memory layout (any
    axis order), element i of each at the same place; None when their
    layouts differ or leave gaps."""
    first = arrays[0]
    if any(a.shape != first.shape or a.strides != first.strides for a in arrays[1:]):
        return None
    order = sorted(range(first.ndim), key=lambda i: -abs(first.strides[i]))
    views = [a.transpose(order) for a in arrays]
    if not views[0].flags.c_contiguous:
        return None
    return [v.reshape(-1) for v in views]


class _Elementwise(Op):
    """An activation y = f(x) with dx = dy * f'(x), computed in cache-sized
    chunks of samples on the host threads; subclasses give ``_f`` and
    ``_df`` (on one chunk, writing into ``out``) and what backward keeps."""
    keep = "x"                        # what backward needs: "x" or "y"

    def infer_shape(self, in_shapes):
        self.check_arity(in_shapes)
        return tuple(in_shapes[0])

    def forward(self, xs, params, buffers, ctx):
        x = xs[0]
        self.check_inputs(xs, ctx)
        xp = xp_of(x)
        y = xp.empty_like(x)

        def part(a, b):
            self._f(xp, x[a:b], y[a:b])
        split(x.shape[0], part, 2 * x.size, xp, sample_grain(x))
        return y, (x if self.keep == "x" else y)

    def backward(self, dy, kept, params, ctx):
        xp = xp_of(dy)
        dx = xp.empty_like(dy)

        def part(a, b):
            self._df(xp, kept[a:b], dy[a:b], dx[a:b])
        split(dy.shape[0], part, 3 * dy.size, xp, sample_grain(dy))
        return [dx], {}


@register
class Sigmoid(_Elementwise):
    kind = "sigmoid"
    keep = "y"

    def _f(self, xp, x, out):
        xp.negative(x, out=out)
        xp.exp(out, out=out)
        out += 1
        xp.reciprocal(out, out=out)

    def _df(self, xp, y, dy, out):          # dy * y * (1 - y)
        xp.subtract(1, y, out=out)
        out *= y
        out *= dy


@register
class LeakyReLU(_Elementwise):
    kind = "leaky_relu"

    def __init__(self, name="", negative_slope=0.01):
        super().__init__(name)
        if not isinstance(negative_slope, (int, float)) or isinstance(negative_slope, bool) or negative_slope < 0:
            self.fail(f"negative_slope must be a non-negative number, got {negative_slope!r}")
        self.negative_slope = float(negative_slope)

    def attrs(self):
        return {"negative_slope": self.negative_slope}

    def _f(self, xp, x, out):
        xp.multiply(x, self.negative_slope, out=out)
        xp.maximum(out, x, out=out) if self.negative_slope <= 1 else xp.copyto(out, xp.where(x > 0, x, out))

    def _df(self, xp, x, dy, out):
        xp.copyto(out, xp.where(x > 0, dy, dy * self.negative_slope))


@register
class Clip(_Elementwise):
    """min(max(x, lo), hi) (ReLU6 is lo = 0, hi = 6); the gradient passes
    where lo < x < hi, as torch's hardtanh."""
    kind = "clip"

    def __init__(self, name="", lo=0.0, hi=6.0):
        super().__init__(name)
        for k, v in (("lo", lo), ("hi", hi)):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                self.fail(f"{k} must be a number, got {v!r}")
        if not lo < hi:
            self.fail(f"lo must be less than hi, got lo={lo}, hi={hi}")
        self.lo, self.hi = float(lo), float(hi)

    def attrs(self):
        return {"lo": self.lo, "hi": self.hi}

    def _f(self, xp, x, out):
        xp.clip(x, self.lo, self.hi, out=out)

    def _df(self, xp, x, dy, out):
        xp.multiply(dy, (x > self.lo) & (x < self.hi), out=out)


@register
class HardSwish(_Elementwise):
    """x * relu6(x + 3) / 6; the gradient as torch's: 0 below -3, 1 above 3,
    (2x + 3) / 6 between."""
    kind = "hardswish"

    def _f(self, xp, x, out):
        xp.add(x, 3.0, out=out)
        xp.clip(out, 0.0, 6.0, out=out)
        out *= x
        out *= 1.0 / 6.0

    def _df(self, xp, x, dy, out):
        g = xp.where(x < -3.0, 0.0, xp.where(x > 3.0, 1.0, (2.0 * x + 3.0) / 6.0))
        xp.multiply(dy, g, out=out)


@register
class Tanh(_Elementwise):
    """scale * tanh(x) (CosmoFlow's output layer has scale 1.2); the
    gradient scale * (1 - tanh(x)^2)."""
    kind = "tanh"
    keep = "y"

    def __init__(self, name="", scale=1.0):
        super().__init__(name)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            self.fail(f"scale must be a positive number, got {scale!r}")
        self.scale = float(scale)

    def attrs(self):
        return {"scale": self.scale} if self.scale != 1.0 else {}

    def _f(self, xp, x, out):
        xp.tanh(x, out=out)
        if self.scale != 1.0:
            out *= self.scale

    def _df(self, xp, y, dy, out):          # dy * (scale - y^2 / scale)
        xp.multiply(y, y, out=out)
        out *= -1.0 / self.scale
        out += self.scale
        out *= dy
