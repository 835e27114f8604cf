"""Max and average pooling over depth, height and width of volumes
(N, C, D, H, W); the window geometry is conv3d's (``Window3d``), reading
the tile's own channels."""
from __future__ import annotations

import numpy as np

from hpcnn.ops.base import register
from hpcnn.ops.conv3d import SPATIAL, Window3d
from hpcnn.ops.pool import Undilated
from hpcnn.ops.volume_kernels import volume_kernels


class _Pool3d(Window3d):
    def __init__(self, name="", kernel_size=2, stride=None, padding=0, dilation=1):
        super().__init__(name)
        self._window_attrs(kernel_size, stride, padding, dilation)
        for a in range(3):
            k = self.kernel_size[a]
            if max(self.padding[a]) > k // 2:
                self.fail(f"padding {self.padding[a]} along {SPATIAL[a]} must be at most half the "
                          f"kernel size {k}")

    def attrs(self):
        return self._window_attrs_dict()

    def infer_shape(self, in_shapes):
        self.check_arity(in_shapes)
        self.check_rank(in_shapes[0], 5)
        return tuple(in_shapes[0][:2]) + self._window_out(in_shapes[0])

    def input_box(self, i, out_box, in_shapes):
        return (tuple(out_box[0]), tuple(out_box[1])) + self._spatial_box(out_box)

    def workspace(self, in_tiles, out_tile):
        # the padded input copy and the padded input gradient
        return 2 * int(np.prod(in_tiles[0]))

    def flops(self, in_shapes, out_shape):
        return int(np.prod(out_shape) * int(np.prod(self.kernel_size)))


@register
class MaxPool3d(_Pool3d):
    kind = "maxpool3d"

    def forward(self, xs, params, buffers, ctx):
        self.check_inputs(xs, ctx)
        K = volume_kernels()
        y, saved = K.maxpool3d_forward(xs[0], self.kernel_size, self.stride, self._pads(ctx),
                                       self.dilation)
        return y, (K, saved)

    def backward(self, dy, saved, params, ctx):
        K, saved = saved
        return [K.maxpool3d_backward(dy, saved)], {}


@register
class AvgPool3d(Undilated, _Pool3d):
    """Average pooling over depth, height and width; padded positions count
    as zeros in the average (PyTorch's count_include_pad=True)."""
    kind = "avgpool3d"

    def forward(self, xs, params, buffers, ctx):
        self.check_inputs(xs, ctx)
        K = volume_kernels()
        y, saved = K.avgpool3d_forward(xs[0], self.kernel_size, self.stride, self._pads(ctx))
        return y, (K, saved)

    def backward(self, dy, saved, params, ctx):
        K, saved = saved
        return [K.avgpool3d_backward(dy, saved)], {}
