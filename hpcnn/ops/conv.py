"""2-D convolution: attributes, shapes, parameters, geometry and the tile
math (the kernels themselves live in conv_kernels.py)."""
from __future__ import annotations

import numpy as np

from hpcnn.ops.base import Op, ParamSpec, register
from hpcnn.ops.kernel_set import window_kernels


def conv_out_size(size, k, stride, pad_lo, pad_hi, dilation):
    """Output length of a convolution/pooling window along one dimension."""
    eff = dilation * (k - 1) + 1
    return (size + pad_lo + pad_hi - eff) // stride + 1


def window_input_range(lo, hi, k, stride, pad_lo, dilation):
    """Input rows (unclipped, padding coordinates included) that output rows
    [lo, hi) of a sliding window read."""
    if hi <= lo:
        s = lo * stride - pad_lo
        return (s, s)
    return (lo * stride - pad_lo, (hi - 1) * stride - pad_lo + dilation * (k - 1) + 1)


class _Window(Op):
    """Shared attribute handling of convolution and pooling windows."""

    def _window_attrs(self, kernel_size, stride, padding, dilation):
        self.kernel_size = self._pair("kernel_size", kernel_size)
        self.stride = self._pair("stride", stride if stride is not None else self.kernel_size)
        self.dilation = self._pair("dilation", dilation)
        # padding: int | (ph, pw) | ((top, bottom), (left, right))
        if isinstance(padding, (tuple, list)) and len(padding) == 2 and all(
                isinstance(p, (tuple, list)) for p in padding):
            self.padding = (self._pair("padding", padding[0], True),
                            self._pair("padding", padding[1], True))
        else:
            ph, pw = self._pair("padding", padding, True)
            self.padding = ((ph, ph), (pw, pw))

    def _window_out(self, shape):
        n, c, h, w = shape
        out = []
        for axis, size in ((0, h), (1, w)):
            k, s, d = self.kernel_size[axis], self.stride[axis], self.dilation[axis]
            plo, phi = self.padding[axis]
            eff = d * (k - 1) + 1
            if eff > size + plo + phi:
                self.fail(f"kernel {self.kernel_size} (extent {eff} with dilation {d}) is larger "
                          f"than the padded input {'HW'[axis]}={size}+{plo}+{phi} of input shape {tuple(shape)}")
            out.append(conv_out_size(size, k, s, plo, phi, d))
        return out

    def _spatial_box(self, out_box):
        return tuple(window_input_range(out_box[2 + a][0], out_box[2 + a][1], self.kernel_size[a],
                                        self.stride[a], self.padding[a][0], self.dilation[a])
                     for a in (0, 1))

    def _window_attrs_dict(self):
        return dict(kernel_size=list(self.kernel_size), stride=list(self.stride),
                    padding=[list(p) for p in self.padding], dilation=list(self.dilation))


@register
class Conv2d(_Window):
    kind = "conv2d"

    def __init__(self, name="", out_channels=None, kernel_size=3, stride=1, padding=0,
                 dilation=1, bias=True):
        super().__init__(name)
        if out_channels is None:
            self.fail("out_channels is required")
        self.out_channels = self._pos_int("out_channels", out_channels)
        self._window_attrs(kernel_size, stride, padding, dilation)
        if not isinstance(bias, bool):
            self.fail(f"bias must be true or false, got {bias!r}")
        self.bias = bias

    def attrs(self):
        return dict(out_channels=self.out_channels, bias=self.bias, **self._window_attrs_dict())

    def infer_shape(self, in_shapes):
        self.check_arity(in_shapes)
        self.check_rank(in_shapes[0], 4)
        ho, wo = self._window_out(in_shapes[0])
        return (in_shapes[0][0], self.out_channels, ho, wo)

    def param_specs(self, in_shapes):
        cin = in_shapes[0][1]
        kh, kw = self.kernel_size
        specs = {"weight": ParamSpec((self.out_channels, cin, kh, kw), "kaiming_fan_out",
                                     fan=self.out_channels * kh * kw)}
        if self.bias:
            specs["bias"] = ParamSpec((self.out_channels,), "zeros")
        return specs

    def input_box(self, i, out_box, in_shapes):
        hbox, wbox = self._spatial_box(out_box)
        return (tuple(out_box[0]), (0, in_shapes[0][1]), hbox, wbox)

    def forward(self, xs, params, buffers, ctx):
        x = xs[0]
        self.check_inputs(xs, ctx, params)
        pads = ctx.pads(0)
        K = window_kernels()
        y, saved = K.conv2d_forward(x, params["weight"], params.get("bias"), self.stride,
                                    (pads[2], pads[3]), self.dilation)
        return y, (K, saved)

    def backward(self, dy, saved, params, ctx):
        K, saved = saved
        dx, dw, db = K.conv2d_backward(dy, saved, params["weight"], self.bias,
                                       ctx.needs_input_grad(0))
        grads = {"weight": dw}
        if self.bias:
            grads["bias"] = db
        return [dx], grads

    def flops(self, in_shapes, out_shape):
        n, cin = in_shapes[0][:2]
        kh, kw = self.kernel_size
        return int(2 * np.prod(out_shape) * cin * kh * kw)
