"""Max and average pooling (sliding windows) and global average pooling."""
from __future__ import annotations

import numpy as np

from hpcnn.ops.base import Op, register, xp_of
from hpcnn.ops.conv import _Window
from hpcnn.ops.kernel_set import window_kernels
from hpcnn.ops.nhwc_kernels import nchw_view, nhwc
from hpcnn.ops.volume_kernels import ncdhw_view, ndhwc


class _Pool2d(_Window):
    def __init__(self, name="", kernel_size=2, stride=None, padding=0, dilation=1):
        super().__init__(name)
        self._window_attrs(kernel_size, stride, padding, dilation)
        for a in (0, 1):
            k = self.kernel_size[a]
            if max(self.padding[a]) > k // 2:
                self.fail(f"padding {self.padding[a]} must be at most half the kernel size {k}")

    def attrs(self):
        return self._window_attrs_dict()

    def infer_shape(self, in_shapes):
        self.check_arity(in_shapes)
        self.check_rank(in_shapes[0], 4)
        n, c = in_shapes[0][:2]
        ho, wo = self._window_out(in_shapes[0])
        return (n, c, ho, wo)

    def input_box(self, i, out_box, in_shapes):
        hbox, wbox = self._spatial_box(out_box)
        return (tuple(out_box[0]), tuple(out_box[1]), hbox, wbox)

    def flops(self, in_shapes, out_shape):
        return int(np.prod(out_shape) * self.kernel_size[0] * self.kernel_size[1])


@register
class MaxPool2d(_Pool2d):
    kind = "maxpool2d"

    def forward(self, xs, params, buffers, ctx):
        self.check_inputs(xs, ctx)
        p = ctx.pads(0)
        K = window_kernels()
        y, saved = K.maxpool2d_forward(xs[0], self.kernel_size, self.stride, (p[2], p[3]),
                                       self.dilation)
        return y, (K, saved)

    def backward(self, dy, saved, params, ctx):
        K, saved = saved
        return [K.maxpool2d_backward(dy, saved)], {}


class Undilated:
    """A window op without dilation (average pools, 2-D and 3-D): no such
    argument, none among its attributes."""

    def __init__(self, name="", kernel_size=2, stride=None, padding=0):
        super().__init__(name, kernel_size, stride, padding, 1)

    def attrs(self):
        a = self._window_attrs_dict()
        a.pop("dilation")
        return a


@register
class AvgPool2d(Undilated, _Pool2d):
    """Average pooling; padded positions count as zeros in the average
    (PyTorch's count_include_pad=True)."""
    kind = "avgpool2d"

    def forward(self, xs, params, buffers, ctx):
        self.check_inputs(xs, ctx)
        p = ctx.pads(0)
        K = window_kernels()
        y, saved = K.avgpool2d_forward(xs[0], self.kernel_size, self.stride, (p[2], p[3]))
        return y, (K, saved)

    def backward(self, dy, saved, params, ctx):
        K, saved = saved
        return [K.avgpool2d_backward(dy, saved)], {}


@register
class GlobalAvgPool(Op):
    """Mean over the spatial dimensions: (N, C, H, W) or (N, C, D, H, W)
    -> (N, C)."""
    kind = "global_avgpool"
    splittable = ("n", "c")

    def infer_shape(self, in_shapes):
        self.check_arity(in_shapes)
        if len(in_shapes[0]) not in (4, 5):
            self.fail(f"input must be (N, C, H, W) or (N, C, D, H, W), got {tuple(in_shapes[0])}")
        self.check_rank(in_shapes[0], len(in_shapes[0]))
        return tuple(in_shapes[0][:2])

    def input_box(self, i, out_box, in_shapes):
        return (tuple(out_box[0]), tuple(out_box[1])) + tuple((0, int(s)) for s in in_shapes[0][2:])

    def forward(self, xs, params, buffers, ctx):
        x = xs[0]
        self.check_inputs(xs, ctx)
        n, c = x.shape[:2]
        t = nhwc(x) if x.ndim == 4 else ndhwc(x)
        return t.reshape(n, -1, c).mean(axis=1), x.shape

    def backward(self, dy, saved, params, ctx):
        shape = saved
        n, c, sp = shape[0], shape[1], tuple(shape[2:])
        xp = xp_of(dy)
        dt = xp.empty((n,) + sp + (c,), dtype=dy.dtype)        # channels-last
        dt[...] = (dy * (1.0 / int(np.prod(sp)))).reshape((n,) + (1,) * len(sp) + (c,))
        return [nchw_view(dt) if len(sp) == 2 else ncdhw_view(dt)], {}

    def flops(self, in_shapes, out_shape):
        return int(np.prod(in_shapes[0]))
