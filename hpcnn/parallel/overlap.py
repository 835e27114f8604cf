"""Per-axis interval overlaps: the one piece of index math that every
exchange is built from.

A tensor split by a layout is, along each axis, a row of consecutive chunks
(the numpy.array_split rule); a consumer's needed region is, along each
axis, one interval.  The part of a source tile inside a need is, axis by
axis, the overlap of a chunk with an interval, and a box's volume is the
product of its per-axis lengths.  ``ExchangePlan`` (which boxes move) and
the exchange counts the cost model prices (``hpcnn.parallel.exchange_counts``:
bytes and messages per rank, per node port, for many layouts at once) both
come from the functions here and nothing else.

Pure index arithmetic on integers and NumPy arrays: no MPI.
"""
from __future__ import annotations

import numpy as np

__all__ = ["chunk_bounds", "interval_overlap", "overlap_length", "chunks_touching", "clip_interval",
           "chunk_of", "touching_counts", "summed_overlaps"]


def chunk_bounds(size: int, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) int64 arrays of the ``parts`` chunks of ``range(size)``:
    the first ``size % parts`` chunks get one element more."""
    q, r = divmod(int(size), int(parts))
    idx = np.arange(int(parts) + 1, dtype=np.int64)
    starts = idx * q + np.minimum(idx, r)
    return starts[:-1], starts[1:]


def interval_overlap(a_lo, a_hi, b_lo, b_hi):
    """The intersection [lo, hi) of the half-open intervals [a_lo, a_hi)
    and [b_lo, b_hi), elementwise with broadcasting; an empty intersection
    has hi == lo."""
    lo = np.maximum(a_lo, b_lo)
    hi = np.maximum(lo, np.minimum(a_hi, b_hi))
    return lo, hi


def overlap_length(a_lo, a_hi, b_lo, b_hi):
    """Length of the intersection of [a_lo, a_hi) and [b_lo, b_hi)
    (broadcasting)."""
    lo, hi = interval_overlap(a_lo, a_hi, b_lo, b_hi)
    return hi - lo


def clip_interval(lo: int, hi: int, size: int) -> tuple[int, int]:
    """The part of [lo, hi) inside [0, size) (an empty part sits at the
    nearest end of the tensor)."""
    a, b = max(int(lo), 0), min(int(hi), int(size))
    if b < a:
        a = b = min(max(int(lo), 0), int(size))
    return a, b


def chunk_of(size: int, parts: int, x):
    """Index of the chunk of ``range(size)`` over ``parts`` that holds
    position ``x`` (an int or an int array, inside ``[0, size)``)."""
    q, r = divmod(int(size), int(parts))
    big = r * (q + 1)  # the first r chunks have q + 1 elements
    x = np.asarray(x, dtype=np.int64)
    out = np.where(x < big, x // (q + 1), r + (x - big) // max(q, 1))
    return int(out) if out.ndim == 0 else out


def chunks_touching(size: int, parts: int, lo: int, hi: int) -> range:
    """Indices of the chunks of ``range(size)`` over ``parts`` that
    intersect ``[lo, hi)`` (assumed inside ``[0, size]``)."""
    if hi <= lo:
        return range(0)
    return range(chunk_of(size, parts, lo), chunk_of(size, parts, hi - 1) + 1)


def touching_counts(size: int, parts: int, lo, hi) -> np.ndarray:
    """Vectorised ``len(chunks_touching(size, parts, lo, hi))``."""
    lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
    ok = hi > lo
    first = chunk_of(size, parts, np.where(ok, lo, 0))
    last = chunk_of(size, parts, np.where(ok, hi - 1, 0))
    return np.where(ok, last - first + 1, 0)


def summed_overlaps(a_lo, a_hi, b_lo, b_hi) -> tuple[np.ndarray, np.ndarray]:
    """For every interval [a_lo[i], a_hi[i]): the summed overlap with the
    intervals [b_lo[j], b_hi[j]) and how many of them it meets, in
    O((len(a) + len(b)) log len(b)).  The b intervals must be sorted: both
    ends non-decreasing in j (the needs of consecutive output chunks)."""
    a_lo, a_hi = np.asarray(a_lo, dtype=np.int64), np.asarray(a_hi, dtype=np.int64)
    b_lo, b_hi = np.asarray(b_lo, dtype=np.int64), np.asarray(b_hi, dtype=np.int64)
    if np.any(np.diff(b_lo) < 0) or np.any(np.diff(b_hi) < 0):
        raise ValueError("summed_overlaps needs intervals sorted by both ends")
    nonempty = b_hi > b_lo
    # the b intervals that meet [lo, hi): non-empty, b_hi > lo and b_lo < hi
    # (an empty b interval never meets anything; keep the order by ranking
    # only the non-empty ones)
    b_lo, b_hi = b_lo[nonempty], b_hi[nonempty]
    c_lo = np.concatenate([[0], np.cumsum(b_lo)])
    c_hi = np.concatenate([[0], np.cumsum(b_hi)])
    j0 = np.searchsorted(b_hi, a_lo, side="right")      # first j with b_hi > lo
    j1 = np.searchsorted(b_lo, a_hi, side="left")       # first j with b_lo >= hi
    j1 = np.maximum(j0, j1)
    # inside [j0, j1): min(hi, b_hi) is b_hi before p1, then hi; max(lo,
    # b_lo) is lo before p2, then b_lo
    p1 = np.clip(np.searchsorted(b_hi, a_hi, side="right"), j0, j1)
    p2 = np.clip(np.searchsorted(b_lo, a_lo, side="left"), j0, j1)
    upper = (c_hi[p1] - c_hi[j0]) + a_hi * (j1 - p1)
    lower = a_lo * (p2 - j0) + (c_lo[j1] - c_lo[p2])
    empty = a_hi <= a_lo
    return np.where(empty, 0, upper - lower), np.where(empty, 0, j1 - j0)
