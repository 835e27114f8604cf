"""Ops that join tensors: channel concatenation and elementwise addition."""
from __future__ import annotations

from hpcnn.ops.activation import sample_grain
from hpcnn.ops.base import Op, register, xp_of
from hpcnn.ops.host_threads import split
from hpcnn.ops.nhwc_kernels import nchw_view


@register
class Concat(Op):
    """Concatenate along channels (axis 1)."""
    kind = "concat"
    arity = None

    def infer_shape(self, in_shapes):
        self.check_arity(in_shapes)
        first = tuple(in_shapes[0])
        for i, s in enumerate(in_shapes[1:], 1):
            if len(s) != len(first) or tuple(s[:1]) + tuple(s[2:]) != first[:1] + first[2:]:
                self.fail(f"input {i} has shape {tuple(s)}, which cannot be concatenated "
                          f"along channels with input 0 of shape {first}")
        return first[:1] + (sum(int(s[1]) for s in in_shapes),) + first[2:]

    def offsets(self, in_shapes):
        off, out = 0, []
        for s in in_shapes:
            out.append(off)
            off += int(s[1])
        return out

    def input_box(self, i, out_box, in_shapes):
        off = self.offsets(in_shapes)[i]
        c = int(in_shapes[i][1])
        lo = min(max(out_box[1][0] - off, 0), c)
        hi = max(min(out_box[1][1] - off, c), lo)
        return (tuple(out_box[0]), (lo, hi)) + tuple(tuple(b) for b in out_box[2:])

    def forward(self, xs, params, buffers, ctx):
        self.check_inputs(xs, ctx)
        xp = xp_of(xs[0])
        widths = [x.shape[1] for x in xs]
        if xs[0].ndim != 4:
            return xp.concatenate([x for x in xs if x.shape[1] > 0], axis=1), widths
        n, _, h, w = xs[0].shape
        out = xp.empty((n, h, w, sum(widths)), dtype=xs[0].dtype)   # channels-last
        off = 0
        for x, c in zip(xs, widths):
            out[..., off:off + c] = x.transpose(0, 2, 3, 1)
            off += c
        return nchw_view(out), widths

    def backward(self, dy, widths, params, ctx):
        out, off = [], 0
        for w in widths:
            out.append(dy[:, off:off + w])
            off += w
        return out, {}


@register
class Add(Op):
    """Elementwise sum of inputs of one shape (residual connections)."""
    kind = "add"
    arity = None

    def infer_shape(self, in_shapes):
        self.check_arity(in_shapes)
        first = tuple(in_shapes[0])
        for i, s in enumerate(in_shapes[1:], 1):
            if tuple(s) != first:
                self.fail(f"input {i} has shape {tuple(s)} but input 0 has shape {first}")
        return first

    def forward(self, xs, params, buffers, ctx):
        self.check_inputs(xs, ctx)
        xp = xp_of(xs[0])
        y = xp.empty_like(xs[0])             # same memory layout as input 0

        def part(a, b):
            ya = y[a:b]
            if len(xs) == 1:
                ya[...] = xs[0][a:b]
                return
            xp.add(xs[0][a:b], xs[1][a:b], out=ya)
            for x in xs[2:]:
                xp.add(ya, x[a:b], out=ya)
        split(y.shape[0], part, len(xs) * y.size, xp, sample_grain(y))
        return y, len(xs)

    def backward(self, dy, n, params, ctx):
        return [dy] * n, {}
