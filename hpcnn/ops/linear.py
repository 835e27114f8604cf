"""Fully connected layer: (N, F) -> (N, out_features)."""
from __future__ import annotations

import numpy as np

from hpcnn.ops.base import Op, ParamSpec, register


@register
class Linear(Op):
    kind = "linear"
    splittable = ("n", "c")

    def __init__(self, name="", out_features=None, bias=True):
        super().__init__(name)
        self.out_features = self._required_pos_int("out_features", out_features)
        self.bias = self._flag("bias", bias)

    def attrs(self):
        return dict(out_features=self.out_features, bias=self.bias)

    def infer_shape(self, in_shapes):
        self.check_arity(in_shapes)
        self.check_rank(in_shapes[0], 2, "input (flatten it first)")
        return (in_shapes[0][0], self.out_features)

    def param_specs(self, in_shapes):
        fin = in_shapes[0][1]
        specs = {"weight": ParamSpec((self.out_features, fin), "uniform_fan_in", fan=fin)}
        if self.bias:
            specs["bias"] = ParamSpec((self.out_features,), "uniform_fan_in", fan=fin)
        return specs

    def input_box(self, i, out_box, in_shapes):
        return (tuple(out_box[0]), (0, in_shapes[0][1]))

    def forward(self, xs, params, buffers, ctx):
        x = xs[0]
        self.check_inputs(xs, ctx, params)
        y = x @ params["weight"].T
        if self.bias:
            y += params["bias"]
        return y, x

    def backward(self, dy, x, params, ctx):
        grads = {"weight": dy.T @ x}
        if self.bias:
            grads["bias"] = dy.sum(axis=0)
        return [dy @ params["weight"]], grads

    def flops(self, in_shapes, out_shape):
        return int(2 * np.prod(out_shape) * in_shapes[0][1])
