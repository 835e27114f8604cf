"""Flatten: (N, C, H, W) -> (N, C*H*W)."""
from __future__ import annotations

import numpy as np

from hpcnn.ops.base import Op, register, xp_of


@register
class Flatten(Op):
    kind = "flatten"
    splittable = ("n", "c")

    def infer_shape(self, in_shapes):
        self.check_arity(in_shapes)
        s = tuple(in_shapes[0])
        if len(s) < 2:
            self.fail(f"input must have at least 2 dimensions, got {s}")
        return (s[0], int(np.prod(s[1:])))

    def input_box(self, i, out_box, in_shapes):
        s = in_shapes[0]
        return (tuple(out_box[0]),) + tuple((0, int(d)) for d in s[1:])

    def forward(self, xs, params, buffers, ctx):
        x = xs[0]
        self.check_inputs(xs, ctx)
        f0, f1 = ctx.out_box[1]
        y = x.reshape(x.shape[0], -1)[:, f0:f1]
        return y, (x.shape, f0, f1)

    def backward(self, dy, saved, params, ctx):
        shape, f0, f1 = saved
        xp = xp_of(dy)
        full = int(np.prod(shape[1:]))
        if f0 == 0 and f1 == full:
            return [dy.reshape(shape)], {}
        dx = xp.zeros((shape[0], full), dtype=dy.dtype)
        dx[:, f0:f1] = dy
        return [dx.reshape(shape)], {}

    def flops(self, in_shapes, out_shape):
        return 0
