"""Batch normalisation over every dimension except channels (2-D or 4-D
input).  In training the statistics are those of the whole global batch:
the op sums its tile's partial sums through ``ctx.allreduce`` (the runtime
reduces over the ranks that split n, h and w), so distributed batch norm
equals sequential batch norm."""
from __future__ import annotations

import numpy as np

from hpcnn.ops.base import Op, ParamSpec, register, xp_of


@register
class BatchNorm(Op):
    kind = "batchnorm"

    def __init__(self, name="", eps=1e-5, momentum=0.1):
        super().__init__(name)
        if not isinstance(eps, (int, float)) or not eps > 0:
            self.fail(f"eps must be a positive number, got {eps!r}")
        if not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
            self.fail(f"momentum must be in [0, 1], got {momentum!r}")
        self.eps = float(eps)
        self.momentum = float(momentum)

    def attrs(self):
        return dict(eps=self.eps, momentum=self.momentum)

    def infer_shape(self, in_shapes):
        self.check_arity(in_shapes)
        if len(in_shapes[0]) not in (2, 4):
            self.fail(f"input must be (N, C) or (N, C, H, W), got {tuple(in_shapes[0])}")
        return tuple(in_shapes[0])

    def param_specs(self, in_shapes):
        c = in_shapes[0][1]
        return {"weight": ParamSpec((c,), "ones"), "bias": ParamSpec((c,), "zeros")}

    def buffer_specs(self, in_shapes):
        c = in_shapes[0][1]
        return {"running_mean": ParamSpec((c,), "zeros", trainable=False),
                "running_var": ParamSpec((c,), "ones", trainable=False)}

    @staticmethod
    def _axes(x):
        return (0, 2, 3) if x.ndim == 4 else (0,)

    @staticmethod
    def _bshape(x):
        return (1, -1, 1, 1) if x.ndim == 4 else (1, -1)

    def _count(self, ctx):
        s = ctx.in_shapes[0]
        return int(np.prod(s)) // int(s[1])

    def forward(self, xs, params, buffers, ctx):
        x = xs[0]
        self.check_inputs(xs, ctx, params)
        xp = xp_of(x)
        axes, bs = self._axes(x), self._bshape(x)
        gamma, beta = params["weight"], params["bias"]
        if ctx.training:
            m = self._count(ctx)
            mean = ctx.allreduce(x.sum(axis=axes)) / m
            xc = x - mean.reshape(bs)
            var = ctx.allreduce((xc * xc).sum(axis=axes)) / m
            if buffers:
                mom = self.momentum
                unbiased = var * (m / max(m - 1, 1))
                buffers["running_mean"][...] = (1 - mom) * buffers["running_mean"] + mom * mean
                buffers["running_var"][...] = (1 - mom) * buffers["running_var"] + mom * unbiased
        else:
            mean, var = buffers["running_mean"], buffers["running_var"]
            xc = x - mean.reshape(bs)
        inv = 1.0 / xp.sqrt(var + self.eps)
        xhat = xc * inv.reshape(bs)
        y = xhat * gamma.reshape(bs) + beta.reshape(bs)
        return y, (xhat, inv)

    def backward(self, dy, saved, params, ctx):
        xhat, inv = saved
        axes, bs = self._axes(dy), self._bshape(dy)
        dbeta_loc = dy.sum(axis=axes)
        dgamma_loc = (dy * xhat).sum(axis=axes)
        gamma = params["weight"]
        if ctx.training:
            m = self._count(ctx)
            xp = xp_of(dy)
            both = ctx.allreduce(xp.stack([dbeta_loc, dgamma_loc]))
            dbeta_all, dgamma_all = both[0], both[1]
            dx = (gamma * inv).reshape(bs) * (
                dy - dbeta_all.reshape(bs) / m - xhat * (dgamma_all / m).reshape(bs))
        else:
            dx = dy * (gamma * inv).reshape(bs)
        return [dx], {"weight": dgamma_loc, "bias": dbeta_loc}

    def flops(self, in_shapes, out_shape):
        return int(4 * np.prod(out_shape))
