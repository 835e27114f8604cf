"""Mean squared error for regression (CosmoFlow's loss).  Input: the
predictions (N, K); labels: float targets (N, K).  Output: each sample's
squared error summed over its K targets and divided by K times the GLOBAL
batch size, shape (N,): the loss of the step is the sum of the output over
all tiles, the mean over every target of the whole batch
(torch.nn.functional.mse_loss), whatever the split.  A sample's loss reads
only its own row, so the op splits over n alone, as the classification
loss does."""
from __future__ import annotations

import numpy as np

from hpcnn.ops.base import register, xp_of
from hpcnn.ops.loss import PerSampleLoss


@register
class MeanSquaredError(PerSampleLoss):
    kind = "mse"
    input_name = "predictions"

    def forward(self, xs, params, buffers, ctx):
        z = xs[0]
        self.check_inputs(xs, ctx)
        xp = xp_of(z)
        if ctx.labels is None:
            self.fail("no targets were given to the loss")
        y = xp.asarray(ctx.labels)
        if y.dtype.kind != "f":
            self.fail(f"regression targets must be floating-point, got {y.dtype} "
                      "(a classification data set needs the softmax_xent loss)")
        if tuple(y.shape) != tuple(z.shape):
            self.fail(f"targets have shape {tuple(y.shape)}, the predictions {tuple(z.shape)}: "
                      f"give {z.shape[1]} targets per sample")
        denom = float(ctx.in_shapes[0][0]) * z.shape[1]
        diff = z - y.astype(z.dtype, copy=False)
        return (diff * diff).sum(axis=1) / denom, (diff, denom)

    def backward(self, dy, saved, params, ctx):
        diff, denom = saved
        return [diff * (2.0 * dy / denom)[:, None]], {}

    def flops(self, in_shapes, out_shape):
        return int(3 * np.prod(in_shapes[0]))
