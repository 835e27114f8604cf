"""The graph's input: a batch of images (N, C, H, W), volumes (N, C, D, H, W)
or features (N, F)."""
from __future__ import annotations

from hpcnn.ops.base import Op, register


@register
class Input(Op):
    kind = "input"
    arity = 0

    def __init__(self, name="input", shape=None):
        super().__init__(name)
        if shape is None or not isinstance(shape, (tuple, list)) or len(shape) not in (2, 4, 5):
            self.fail(f"shape must be (N, C, H, W), (N, C, D, H, W) or (N, F), got {shape!r}")
        self.shape = tuple(self._pos_int("shape", s) for s in shape)

    def attrs(self):
        return dict(shape=list(self.shape))

    def infer_shape(self, in_shapes):
        if in_shapes:
            self.fail("takes no inputs")
        return self.shape

    def forward(self, xs, params, buffers, ctx):
        raise RuntimeError("the input op has no forward: the runtime feeds its tile")

    def flops(self, in_shapes, out_shape):
        return 0
