"""Channel scale: y[n, c, h, w] = x[n, c, h, w] * s[n, c] (the multiply of a
squeeze-and-excitation block, whose gate s comes from a global pooling)."""
from __future__ import annotations

from hpcnn.ops.base import Op, register, xp_of


@register
class ChannelScale(Op):
    kind = "channel_scale"
    arity = 2

    def infer_shape(self, in_shapes):
        self.check_arity(in_shapes)
        x, s = (tuple(v) for v in in_shapes)
        self.check_rank(x, 4, "input 0")
        if tuple(s) != x[:2]:
            self.fail(f"input 1 must be (N, C) = {x[:2]} to scale input 0 {x} per sample and channel, got {s}")
        return x

    def input_box(self, i, out_box, in_shapes):
        return tuple(out_box) if i == 0 else tuple(out_box[:2])

    def forward(self, xs, params, buffers, ctx):
        x, s = xs
        self.check_inputs(xs, ctx)
        return x * s[:, :, None, None], (x, s)

    def backward(self, dy, saved, params, ctx):
        x, s = saved
        xp = xp_of(dy)
        dx = dy * s[:, :, None, None]
        ds = xp.einsum("nchw,nchw->nc", dy, x)
        return [dx, ds], {}

    def flops(self, in_shapes, out_shape):
        n, c, h, w = out_shape
        return int(n * c * h * w)
