"""3-D convolution over volumes (N, C, D, H, W): attributes, shapes,
parameters, geometry and the tile math (the kernels live in
volume_kernels.py).

The geometry is the 2-D one on three axes: output rows ``[o0, o1)`` of a
window with kernel k, stride s, padding (p_lo, p_hi) and dilation d read the
input rows ``[o0*s - p_lo, (o1-1)*s - p_lo + d*(k-1) + 1)`` along depth,
height and width; a convolution reads every input channel, a pooling window
(pool3d.py) its own channels.
"""
from __future__ import annotations

import numpy as np

from hpcnn.ops.base import Op, ParamSpec, register
from hpcnn.ops.volume_kernels import volume_kernels

SPATIAL = "DHW"


def window_out_size(size, k, stride, pad_lo, pad_hi, dilation):
    """Output length of a sliding window along one axis."""
    return (size + pad_lo + pad_hi - dilation * (k - 1) - 1) // stride + 1


def window_rows(lo, hi, k, stride, pad_lo, dilation):
    """Input rows (unclipped, padding coordinates included) that output rows
    [lo, hi) of a sliding window read."""
    if hi <= lo:
        s = lo * stride - pad_lo
        return (s, s)
    return (lo * stride - pad_lo, (hi - 1) * stride - pad_lo + dilation * (k - 1) + 1)


class Window3d(Op):
    """Attribute handling and geometry shared by the 3-D window ops."""

    def _triple(self, attr, v, allow_zero=False) -> tuple:
        if isinstance(v, (tuple, list)):
            if len(v) != 3:
                self.fail(f"{attr} must be an int or a triple (depth, height, width), got {v!r}")
            return tuple(self._pos_int(attr, x, allow_zero) for x in v)
        x = self._pos_int(attr, v, allow_zero)
        return (x, x, x)

    def _window_attrs(self, kernel_size, stride, padding, dilation):
        self.kernel_size = self._triple("kernel_size", kernel_size)
        self.stride = self._triple("stride", stride if stride is not None else self.kernel_size)
        self.dilation = self._triple("dilation", dilation)
        # padding: int | (pd, ph, pw), each axis an int or a pair (lo, hi):
        # ((front, back), (top, bottom), (left, right))
        if isinstance(padding, (tuple, list)):
            if len(padding) != 3:
                self.fail(f"padding must be an int or one entry per axis (depth, height, width), "
                          f"got {padding!r}")
            pads = []
            for p in padding:
                if isinstance(p, (tuple, list)):
                    if len(p) != 2:
                        self.fail(f"padding of an axis must be an int or (lo, hi), got {p!r}")
                    pads.append((self._pos_int("padding", p[0], True), self._pos_int("padding", p[1], True)))
                else:
                    x = self._pos_int("padding", p, True)
                    pads.append((x, x))
            self.padding = tuple(pads)
        else:
            x = self._pos_int("padding", padding, True)
            self.padding = ((x, x),) * 3

    def _window_out(self, shape) -> tuple:
        out = []
        for a, size in enumerate(shape[2:]):
            k, s, d = self.kernel_size[a], self.stride[a], self.dilation[a]
            lo, hi = self.padding[a]
            eff = d * (k - 1) + 1
            if eff > size + lo + hi:
                self.fail(f"kernel {self.kernel_size} (extent {eff} with dilation {d}) is larger than "
                          f"the padded input {SPATIAL[a]}={size}+{lo}+{hi} of input shape {tuple(shape)}")
            out.append(window_out_size(size, k, s, lo, hi, d))
        return tuple(out)

    def _spatial_box(self, out_box) -> tuple:
        return tuple(window_rows(out_box[2 + a][0], out_box[2 + a][1], self.kernel_size[a],
                                 self.stride[a], self.padding[a][0], self.dilation[a]) for a in range(3))

    def _window_attrs_dict(self) -> dict:
        return dict(kernel_size=list(self.kernel_size), stride=list(self.stride),
                    padding=[list(p) for p in self.padding], dilation=list(self.dilation))

    def _pads(self, ctx) -> tuple:
        """The padding this tile supplies: its box's reach outside the input."""
        return tuple(ctx.pads(0)[2:])


@register
class Conv3d(Window3d):
    kind = "conv3d"

    def __init__(self, name="", out_channels=None, kernel_size=3, stride=1, padding=0,
                 dilation=1, bias=True):
        super().__init__(name)
        self.out_channels = self._required_pos_int("out_channels", out_channels)
        self._window_attrs(kernel_size, stride, padding, dilation)
        self.bias = self._flag("bias", bias)

    def attrs(self):
        return dict(out_channels=self.out_channels, bias=self.bias, **self._window_attrs_dict())

    def infer_shape(self, in_shapes):
        self.check_arity(in_shapes)
        self.check_rank(in_shapes[0], 5)
        return (in_shapes[0][0], self.out_channels) + self._window_out(in_shapes[0])

    def param_specs(self, in_shapes):
        cin = in_shapes[0][1]
        k = self.kernel_size
        specs = {"weight": ParamSpec((self.out_channels, cin) + k, "kaiming_fan_out",
                                     fan=self.out_channels * int(np.prod(k)))}
        if self.bias:
            specs["bias"] = ParamSpec((self.out_channels,), "zeros")
        return specs

    def input_box(self, i, out_box, in_shapes):
        return (tuple(out_box[0]), (0, in_shapes[0][1])) + self._spatial_box(out_box)

    def forward(self, xs, params, buffers, ctx):
        self.check_inputs(xs, ctx, params)
        K = volume_kernels()
        y, saved = K.conv3d_forward(xs[0], params["weight"], params.get("bias"), self.stride,
                                    self._pads(ctx), self.dilation)
        return y, (K, saved)

    def backward(self, dy, saved, params, ctx):
        K, saved = saved
        dx, dw, db = K.conv3d_backward(dy, saved, params["weight"], self.bias, ctx.needs_input_grad(0))
        grads = {"weight": dw}
        if self.bias:
            grads["bias"] = db
        return [dx], grads

    def workspace(self, in_tiles, out_tile):
        # the padded input and its column matrix (taps x the padded input,
        # kept for backward and reused for the column gradient), the output
        # and its gradient on the padded grid, the padded input gradient
        n, cin, *sp = in_tiles[0]
        padded = n * cin * int(np.prod([s + lo + hi for s, (lo, hi) in zip(sp, self.padding)]))
        grid = padded // cin * self.out_channels
        return int(np.prod(self.kernel_size)) * padded + 2 * padded + 2 * grid

    def flops(self, in_shapes, out_shape):
        cin = in_shapes[0][1]
        return int(2 * np.prod(out_shape) * cin * int(np.prod(self.kernel_size)))
