"""Box: a half-open index range per dimension of a logical tensor.

A Box is a tuple of (lo, hi) pairs, so it is interchangeable with the plain
tuples the ops use for geometry.  Pure index arithmetic: no arrays, no MPI.
"""
from __future__ import annotations

from typing import Iterable


class Box(tuple):
    """Half-open box ``((lo0, hi0), (lo1, hi1), ...)``."""

    def __new__(cls, pairs: Iterable):
        out = []
        for p in pairs:
            lo, hi = int(p[0]), int(p[1])
            out.append((lo, hi))
        return super().__new__(cls, out)

    @classmethod
    def full(cls, shape) -> "Box":
        return cls((0, int(s)) for s in shape)

    @property
    def ndim(self) -> int:
        return len(self)

    @property
    def shape(self) -> tuple:
        return tuple(max(0, hi - lo) for lo, hi in self)

    @property
    def volume(self) -> int:
        v = 1
        for lo, hi in self:
            v *= max(0, hi - lo)
        return v

    @property
    def empty(self) -> bool:
        return any(hi <= lo for lo, hi in self)

    @property
    def lo(self) -> tuple:
        return tuple(lo for lo, _ in self)

    def intersect(self, other) -> "Box":
        return Box((max(a, c), max(max(a, c), min(b, d))) for (a, b), (c, d) in zip(self, other))

    def contains(self, other) -> bool:
        other = Box(other)
        return other.empty or all(a <= c and d <= b for (a, b), (c, d) in zip(self, other))

    def clip(self, shape) -> "Box":
        return self.intersect(Box.full(shape))

    def shift(self, origin) -> "Box":
        """Coordinates relative to ``origin`` (a tuple of lower corners)."""
        return Box((lo - o, hi - o) for (lo, hi), o in zip(self, origin))

    def slices(self, origin=None) -> tuple:
        """Slices selecting this box inside an array whose element [0, ...]
        sits at ``origin`` (default: the global origin)."""
        if origin is None:
            return tuple(slice(lo, hi) for lo, hi in self)
        return tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(self, origin))

    def __repr__(self):
        return "Box(" + ", ".join(f"{lo}:{hi}" for lo, hi in self) + ")"
