"""How a consumer's output tiles read one of its inputs, axis by axis.

Every op's input box is *separable*: along each input axis e the interval
read depends on at most one output axis, dep(e), and only on that axis'
interval (convolution: input height on output height; a fully connected
layer: input features on nothing, it reads them all).  So when the consumer
is split by degrees B, the need of its tile at grid coordinates j is, along
input axis e, the interval ``need_bounds(e, B[dep(e)])[j[dep(e)]]``, and
the whole need is the product of those intervals.  That is what lets the
exchange counts (``exchange_counts``) be computed axis by axis for many
layouts at once.

An op whose geometry is not separable (an input axis driven by two output
axes, or one output axis driving two input axes) is refused with a message
naming it: nothing in hpcnn's op set is, and the cost model could not price
it axis by axis.
"""
from __future__ import annotations

import numpy as np

from hpcnn.parallel.layout import LayoutError, split_bounds
from hpcnn.parallel.overlap import clip_interval

__all__ = ["InputGeometry", "NotSeparable"]


class NotSeparable(LayoutError):
    """An op's input box is not a per-axis function of its output box."""


class InputGeometry:
    """Input ``i`` of ``op`` (input shapes ``in_shapes``, output shape
    ``out_shape``): ``dep[e]`` is the output axis input axis e depends on
    (None: it always reads the same interval); ``need_bounds(e, D)`` the
    clipped interval of each of the D output chunks along dep(e)."""

    def __init__(self, op, i: int, in_shapes, out_shape):
        self.op, self.i = op, int(i)
        self.in_shapes = [tuple(int(x) for x in s) for s in in_shapes]
        self.shape = self.in_shapes[self.i]          # the input tensor
        self.out_shape = tuple(int(x) for x in out_shape)
        full = tuple((0, s) for s in self.out_shape)
        self._base = tuple(tuple(b) for b in op.input_box(self.i, full, self.in_shapes))
        dep = [None] * len(self.shape)
        for d, size in enumerate(self.out_shape):
            for D in sorted({min(2, size), min(3, size)} - {0, 1}):
                for lo, hi in split_bounds(size, D):
                    box = self._read(d, lo, hi)
                    for e in range(len(self.shape)):
                        if tuple(box[e]) != self._base[e]:
                            if dep[e] not in (None, d):
                                raise NotSeparable(self._refusal(f"input axis {e} depends on output axes "
                                                                 f"{dep[e]} and {d}"))
                            dep[e] = d
        used = [d for d in dep if d is not None]
        if len(used) != len(set(used)):
            raise NotSeparable(self._refusal("one output axis drives several input axes"))
        self.dep = tuple(dep)
        self._bounds: dict = {}

    def _refusal(self, what: str) -> str:
        return (f"op {self.op.kind!r} input {self.i}: {what}; the cost model prices exchanges axis by "
                f"axis and needs each input axis to follow at most one output axis")

    def _read(self, d: int, lo: int, hi: int):
        box = [(0, s) for s in self.out_shape]
        box[d] = (lo, hi)
        return self.op.input_box(self.i, tuple(box), self.in_shapes)

    def need_bounds(self, e: int, D: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) int64 arrays: the clipped interval along input axis
        ``e`` of each of the ``D`` output chunks along dep(e) (a single
        interval when e depends on no output axis)."""
        d = self.dep[e]
        if d is None:
            lo, hi = clip_interval(*self._base[e], self.shape[e])
            return np.array([lo], dtype=np.int64), np.array([hi], dtype=np.int64)
        key = (d, int(D))
        if key not in self._bounds:
            per_axis = [([], []) for _ in self.shape]
            for lo, hi in split_bounds(self.out_shape[d], int(D)):
                box = self._read(d, lo, hi)
                for e2 in range(len(self.shape)):
                    if self.dep[e2] != d and tuple(box[e2]) != self._base[e2]:
                        raise NotSeparable(self._refusal(f"input axis {e2} changed with output axis {d}"))
                    a, b = clip_interval(box[e2][0], box[e2][1], self.shape[e2])
                    per_axis[e2][0].append(a)
                    per_axis[e2][1].append(b)
            self._bounds[key] = [(np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64))
                                 for lo, hi in per_axis]
        return self._bounds[key][e]
