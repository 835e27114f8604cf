"""Dropout whose mask is a pure function of (seed, step, layer, global
element index): reproducible, and the same whatever the tiling."""
from __future__ import annotations

import zlib

import numpy as np

from hpcnn.ops.base import Op, register, xp_of

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(xp, z):
    z = z + _GOLD
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def uniform_at(xp, key: int, box, shape):
    """Uniform [0, 1) numbers for the elements of ``box`` of a tensor of
    ``shape``, a function of (key, global linear index) only."""
    idx = xp.zeros((1,) * len(box), dtype=np.uint64)
    stride = 1
    for ax in range(len(box) - 1, -1, -1):
        lo, hi = box[ax]
        r = xp.arange(lo, hi, dtype=np.uint64) * np.uint64(stride)
        sh = [1] * len(box)
        sh[ax] = hi - lo
        idx = idx + r.reshape(sh)
        stride *= int(shape[ax])
    with np.errstate(over="ignore"):
        z = _splitmix64(xp, idx ^ np.uint64(key & 0xFFFFFFFFFFFFFFFF))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@register
class Dropout(Op):
    kind = "dropout"

    def __init__(self, name="", p=0.5):
        super().__init__(name)
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p < 1:
            self.fail(f"p must be a probability in [0, 1), got {p!r}")
        self.p = float(p)

    def attrs(self):
        return dict(p=self.p)

    def infer_shape(self, in_shapes):
        self.check_arity(in_shapes)
        return tuple(in_shapes[0])

    def forward(self, xs, params, buffers, ctx):
        x = xs[0]
        self.check_inputs(xs, ctx)
        if not ctx.training or self.p == 0:
            return x, None
        xp = xp_of(x)
        key = (int(ctx.seed) * 1_000_003 + int(ctx.step)) * 2_654_435_761 + zlib.crc32(self.name.encode())
        keep = uniform_at(xp, key, ctx.out_box, ctx.out_shape) >= self.p
        scale = (keep / (1.0 - self.p)).astype(x.dtype)
        return x * scale, scale

    def backward(self, dy, scale, params, ctx):
        if scale is None:
            return [dy], {}
        return [dy * scale], {}
