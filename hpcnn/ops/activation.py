"""Elementwise activations."""
from __future__ import annotations

from hpcnn.ops.base import Op, register, xp_of
from hpcnn.ops.host_threads import split


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
        dx = xp.empty_like(dy)

        def part(a, b):
            xp.multiply(dy[a:b], y[a:b] > 0, out=dx[a:b])
        split(dy.shape[0], part, 2 * dy.size, xp, sample_grain(dy))
        return [dx], {}
