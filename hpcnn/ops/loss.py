"""Softmax cross-entropy, optionally with label smoothing.  Output is the
per-sample loss divided by the GLOBAL batch size, shape (N,): the loss of
the step is the sum of the output over all tiles (the mean over the global
batch), whatever the split.

With label smoothing eps the target of a sample of class y over K classes
is q = (1 - eps) onehot(y) + eps / K (Szegedy et al., 2016; what
torch.nn.functional.cross_entropy(label_smoothing=eps) computes): the loss
is -sum_k q_k log p_k and its gradient p - q.  Each sample's loss needs
only its own row of logits, so the geometry (split over n only, every
class of a sample on one rank) is the same with and without it."""
from __future__ import annotations

import numpy as np

from hpcnn.ops.base import Op, register, xp_of


class PerSampleLoss(Op):
    """A loss over (N, K) inputs whose output is one value per sample, read
    from that sample's row alone: split over n only, each tile reads whole
    rows."""
    splittable = ("n",)
    #: what the (N, K) input is called in errors
    input_name = "input"

    def infer_shape(self, in_shapes):
        self.check_arity(in_shapes)
        self.check_rank(in_shapes[0], 2, self.input_name)
        return (in_shapes[0][0],)

    def input_box(self, i, out_box, in_shapes):
        return (tuple(out_box[0]), (0, in_shapes[0][1]))


@register
class SoftmaxCrossEntropy(PerSampleLoss):
    kind = "softmax_xent"
    input_name = "logits"

    def __init__(self, name="", label_smoothing=0.0):
        super().__init__(name)
        self.label_smoothing = label_smoothing

    @property
    def label_smoothing(self) -> float:
        return self._smoothing

    @label_smoothing.setter
    def label_smoothing(self, eps):
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
            self.fail(f"label_smoothing must be a number in [0, 1), got {eps!r}")
        self._smoothing = float(eps)

    def attrs(self):
        # no attribute at 0, so that a plain loss keys machine files as before
        return {"label_smoothing": self._smoothing} if self._smoothing else {}

    def forward(self, xs, params, buffers, ctx):
        z = xs[0]
        self.check_inputs(xs, ctx)
        xp = xp_of(z)
        labels = ctx.labels
        if labels is None:
            self.fail("no labels were given to the loss")
        labels = xp.asarray(labels)
        if labels.dtype.kind not in "iu":
            self.fail(f"labels must be integers, got {labels.dtype}")
        labels = labels.astype(np.int64, copy=False)
        k = z.shape[1]
        if labels.shape != (z.shape[0],):
            self.fail(f"labels have shape {tuple(labels.shape)}, expected ({z.shape[0]},)")
        if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= k):
            self.fail(f"labels must lie in [0, {k}), got values in "
                      f"[{int(labels.min())}, {int(labels.max())}]")
        n_global = ctx.in_shapes[0][0]
        zmax = z.max(axis=1, keepdims=True)
        e = xp.exp(z - zmax)
        s = e.sum(axis=1, keepdims=True)
        logz = zmax + xp.log(s)
        logp_true = (xp.take_along_axis(z, labels[:, None], axis=1) - logz)[:, 0]
        eps = self._smoothing
        if eps:
            # -sum_k q_k log p_k = -(1 - eps) log p_y - eps * mean_k log p_k
            mean_logp = z.mean(axis=1) - logz[:, 0]
            loss = -((1.0 - eps) * logp_true + eps * mean_logp) / n_global
        else:
            loss = -logp_true / n_global
        return loss, (e / s, labels, n_global)

    def backward(self, dy, saved, params, ctx):
        p, labels, n_global = saved
        xp = xp_of(p)
        eps = self._smoothing
        if eps:
            g = p - eps / p.shape[1]
            g[xp.arange(g.shape[0]), labels] -= 1.0 - eps
        else:
            g = p.copy()
            g[xp.arange(g.shape[0]), labels] -= 1
        return [g * (dy / n_global)[:, None]], {}

    def flops(self, in_shapes, out_shape):
        return int(3 * np.prod(in_shapes[0]))
