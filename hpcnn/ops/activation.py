"""Elementwise activations."""
from __future__ import annotations

from hpcnn.ops.base import Op, register, xp_of


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
        y = xp.maximum(x, 0)
        return y, y

    def backward(self, dy, y, params, ctx):
        return [dy * (y > 0)], {}
