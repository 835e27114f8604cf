"""ExchangePlan: who sends which box to whom so that every rank of a
consumer holds exactly the input region its output tile reads.

A plan is compiled from box intersections only: the producer's layout (the
tiles that exist) and, for every consumer rank, the box it needs (from the
consumer op's geometry, ``op.input_box``).  Needs may reach outside the
tensor (padding); the plan clips them, and padding stays the op's business.
Because the producer's tiles partition the tensor, every needed element has
exactly one owner, so every (source, destination) pair exchanges at most one
box.  A halo exchange and an all-to-all redistribution are the same plan at
different layouts; when every destination needs exactly its own tile the plan
is the identity and nothing is copied or moved.

The pieces are built axis by axis from the interval overlaps of
``hpcnn.parallel.overlap`` -- the same primitives from which
``hpcnn.parallel.exchange_counts`` computes, for many layouts at once, the
bytes and messages the cost model prices; tests hold the two equal.

Pure data: no arrays, no MPI.  ``hpcnn.parallel.comm`` executes plans
(remote bytes only are counted: a rank's copy from its own tile is free).
"""
from __future__ import annotations

from functools import lru_cache
from itertools import product
from typing import Mapping

from hpcnn.parallel.box import Box
from hpcnn.parallel.layout import Layout, LayoutError, split_bounds
from hpcnn.parallel.overlap import chunks_touching, interval_overlap

__all__ = ["ExchangePlan", "needed_boxes", "exchange_category", "HALO", "REDIST"]

HALO, REDIST = "halo", "redistribution"


def exchange_category(src: Layout, dst: Layout) -> str:
    """'halo' when producer and consumer are split the same way over the
    same ranks (only neighbouring pieces move), else 'redistribution'."""
    if src.ndim == dst.ndim and src.degrees == dst.degrees and src.ranks == dst.ranks:
        return HALO
    return REDIST


def needed_boxes(op, i: int, out_layout: Layout, in_shapes) -> dict[int, Box]:
    """For every rank of ``out_layout``: the unclipped box of input ``i``
    that its output tile reads (``op.input_box``), possibly empty."""
    in_shapes = [tuple(int(d) for d in s) for s in in_shapes]
    return {r: Box(op.input_box(i, out_layout.box(r), in_shapes)) for r in out_layout.ranks}


def _needs_key(needs: Mapping) -> tuple:
    try:
        items = sorted((int(r), Box(b)) for r, b in needs.items())
    except (TypeError, ValueError, IndexError) as exc:
        raise LayoutError(f"exchange needs must map ranks to boxes of (lo, hi) pairs, got {needs!r}: {exc}") from None
    return tuple(items)


class ExchangePlan:
    """The messages that bring every destination rank its needed region.

    Attributes (all immutable):
      src       : the producer's Layout
      needs     : tuple of (dst_rank, clipped Box) for every destination
      itemsize  : bytes per element
      pieces    : tuple of (src_rank, dst_rank, Box), global coordinates,
                  non-empty, ordered by (dst, src)
      identity  : every destination's clipped need equals its own source tile
    """

    __slots__ = ("src", "needs", "itemsize", "pieces", "identity",
                 "_sent", "_received", "_need", "_by_src", "_by_dst", "__weakref__")

    def __init__(self, src: Layout, needs: tuple, itemsize: int, pieces: tuple, identity: bool):
        self.src, self.needs, self.itemsize = src, needs, int(itemsize)
        self.pieces, self.identity = pieces, identity
        self._need = dict(needs)
        sent, received = {}, {}
        by_src, by_dst = {}, {}
        for s, d, b in pieces:
            by_src.setdefault(s, []).append((d, b))
            by_dst.setdefault(d, []).append((s, b))
            if s != d:
                nbytes = b.volume * self.itemsize
                sent[s] = sent.get(s, 0) + nbytes
                received[d] = received.get(d, 0) + nbytes
        self._sent, self._received = sent, received
        self._by_src = {r: tuple(v) for r, v in by_src.items()}
        self._by_dst = {r: tuple(v) for r, v in by_dst.items()}

    # ---- construction ----------------------------------------------------------
    @classmethod
    def compile(cls, src: Layout, needs: Mapping[int, Box], itemsize: int) -> "ExchangePlan":
        """The plan from the producer layout ``src`` to destinations that each
        need a (possibly unclipped, possibly empty) box.  Cached per
        (src layout, needs, itemsize)."""
        if not isinstance(src, Layout):
            raise LayoutError(f"ExchangePlan.compile needs the producer's Layout, got {type(src).__name__}")
        key = _needs_key(needs)
        for r, b in key:
            if b.ndim != src.ndim:
                raise LayoutError(f"rank {r} needs box {b} with {b.ndim} dimensions from a tensor "
                                  f"of shape {src.shape}")
        return _compile_cached(src, key, int(itemsize))

    # ---- queries ---------------------------------------------------------------
    def need(self, rank) -> Box | None:
        """The clipped box ``rank`` receives (None if it is not a destination)."""
        return self._need.get(rank)

    @property
    def destinations(self) -> tuple:
        return tuple(r for r, _ in self.needs)

    def sends(self, rank) -> tuple:
        """((dst, box), ...) that ``rank`` provides, itself included."""
        return self._by_src.get(rank, ())

    def receives(self, rank) -> tuple:
        """((src, box), ...) that make up ``rank``'s need, itself included."""
        return self._by_dst.get(rank, ())

    def local_identity(self, rank) -> bool:
        """True when ``rank`` needs exactly its own source tile and exchanges
        nothing with other ranks (its region IS its tile, in both directions)."""
        box = self.src.box(rank)
        return (box is not None and self._need.get(rank) == box
                and self._by_dst.get(rank, ()) == ((rank, box),)
                and self._by_src.get(rank, ()) == ((rank, box),))

    def bytes_sent(self, rank) -> int:
        """Bytes ``rank`` sends to OTHER ranks (forward direction)."""
        return self._sent.get(rank, 0)

    def bytes_received(self, rank) -> int:
        """Bytes ``rank`` receives from OTHER ranks (forward direction)."""
        return self._received.get(rank, 0)

    def total_bytes(self) -> int:
        """All remote bytes of the plan."""
        return sum(self._sent.values())

    def max_rank_bytes(self) -> int:
        """Max over ranks of max(bytes sent, bytes received)."""
        ranks = set(self._sent) | set(self._received)
        return max((max(self.bytes_sent(r), self.bytes_received(r)) for r in ranks), default=0)

    def num_messages(self) -> int:
        return sum(1 for s, d, _ in self.pieces if s != d)

    def messages_sent(self, rank) -> int:
        """Messages ``rank`` sends to OTHER ranks (forward direction)."""
        return sum(1 for d, _ in self.sends(rank) if d != rank)

    def messages_received(self, rank) -> int:
        """Messages ``rank`` receives from OTHER ranks (forward direction)."""
        return sum(1 for s, _ in self.receives(rank) if s != rank)

    def __repr__(self):
        return (f"ExchangePlan(src={self.src!r}, {len(self.needs)} destinations, "
                f"{self.num_messages()} messages, {self.total_bytes()} bytes"
                f"{', identity' if self.identity else ''})")


@lru_cache(maxsize=16384)
def _compile_cached(src: Layout, needs: tuple, itemsize: int) -> ExchangePlan:
    clipped = tuple((r, b.clip(src.shape)) for r, b in needs)
    bounds = [split_bounds(n, p) for n, p in zip(src.shape, src.degrees)]
    pieces = []
    for dst, need in clipped:
        if need.empty:
            continue
        # along each axis: the source chunks the need meets and the overlap with each
        axes = []
        for a, (size, parts, (lo, hi)) in enumerate(zip(src.shape, src.degrees, need)):
            axes.append([(c,) + tuple(int(v) for v in interval_overlap(*bounds[a][c], lo, hi))
                         for c in chunks_touching(size, parts, lo, hi)])
        for combo in product(*axes):
            owner = src.rank_at(tuple(c for c, _, _ in combo))
            pieces.append((owner, dst, Box((lo, hi) for _, lo, hi in combo)))
    pieces.sort(key=lambda t: (t[1], t[0]))
    identity = all(dst in src and need == src.box(dst) for dst, need in clipped)
    return ExchangePlan(src, clipped, itemsize, tuple(pieces), identity)
