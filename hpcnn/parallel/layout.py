"""Layout: how one logical tensor is split over ranks.

A layout is the tensor's global shape, a degree per dimension and the ranks
that hold its tiles.  Tiles follow the numpy.array_split rule (the first
``size % parts`` parts get one element more) and ranks are laid row-major
over the degree grid with n outermost, so ranks that share spatial or channel
halos are neighbours.  Pure index arithmetic: no MPI.
"""
from __future__ import annotations

from functools import cached_property, lru_cache

import numpy as np

from hpcnn.parallel.box import Box

#: the logical dimensions of a tensor of each rank: per-sample values (the
#: loss), features, images (NCHW) and volumes (NCDHW: depth, height, width)
DIM_NAMES = {1: ("n",), 2: ("n", "c"), 4: ("n", "c", "h", "w"), 5: ("n", "c", "d", "h", "w")}

#: every dimension name a configuration may use
ALL_DIMS = ("n", "c", "d", "h", "w")

#: the spatial dimensions (split by space parallelism)
SPATIAL_DIMS = ("d", "h", "w")

#: a layer's parameters are split over channels and replicated over these
#: dimensions (every dimension but c): the ranks that differ only in them hold the same parameter
#: shard (its *replica group*) and sum their gradients, and normalisation
#: statistics are summed over the same ranks
REPLICA_DIMS = ("n", "d", "h", "w")


class LayoutError(ValueError):
    """Degrees or ranks that do not fit the tensor or the job."""


def split_bounds(size: int, parts: int) -> list[tuple[int, int]]:
    """Bounds of ``parts`` consecutive chunks of ``range(size)``
    (numpy.array_split rule)."""
    q, r = divmod(int(size), int(parts))
    out, lo = [], 0
    for i in range(parts):
        hi = lo + q + (1 if i < r else 0)
        out.append((lo, hi))
        lo = hi
    return out


def split_starts(size: int, parts: int, idx):
    """Vectorised lower bounds of chunk(s) ``idx`` (array_split rule)."""
    q, r = divmod(int(size), int(parts))
    idx = np.asarray(idx)
    return idx * q + np.minimum(idx, r)


class Layout:
    """Split of a tensor of ``shape`` with ``degrees`` over ``ranks``.

    >>> L = Layout((8, 16, 10, 10), (2, 1, 2, 1))
    >>> L.k, L.box(3)
    (4, Box(4:8, 0:16, 5:10, 0:10))
    """

    __slots__ = ("shape", "degrees", "ranks", "_index", "__dict__")

    def __init__(self, shape, degrees=None, ranks=None, world: int | None = None):
        shape = tuple(int(s) for s in shape)
        if len(shape) not in DIM_NAMES:
            raise LayoutError(f"tensors have 1, 2, 4 or 5 dimensions, got shape {shape}")
        if degrees is None:
            degrees = (1,) * len(shape)
        if isinstance(degrees, dict):
            degrees = degrees_from_config(shape, degrees)
        degrees = tuple(int(d) for d in degrees)
        if len(degrees) != len(shape):
            raise LayoutError(f"{len(degrees)} degrees {degrees} for a tensor of shape {shape}")
        names = DIM_NAMES[len(shape)]
        for name, d, s in zip(names, degrees, shape):
            if d < 1:
                raise LayoutError(f"degree of dimension {name} must be at least 1, got {d}")
            if d > s:
                raise LayoutError(f"degree {d} of dimension {name} is larger than its size {s} "
                                  f"(tensor shape {shape}): a tile would be empty")
        k = int(np.prod(degrees))
        if ranks is None:
            ranks = tuple(range(k))
        ranks = tuple(int(r) for r in ranks)
        if len(ranks) != k:
            raise LayoutError(f"degrees {degrees} need {k} ranks, got {len(ranks)}: {ranks}")
        if len(set(ranks)) != k:
            raise LayoutError(f"ranks {ranks} repeat a rank")
        if world is not None and (k > world or max(ranks) >= world):
            raise LayoutError(f"degrees {degrees} need {k} ranks but the job has {world}")
        self.shape, self.degrees, self.ranks = shape, degrees, ranks
        self._index = {r: i for i, r in enumerate(ranks)}

    # ---- basic facts -----------------------------------------------------
    @property
    def dims(self) -> tuple:
        return DIM_NAMES[len(self.shape)]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def k(self) -> int:
        return len(self.ranks)

    def degree(self, dim: str) -> int:
        return self.degrees[self.dims.index(dim)]

    def config(self) -> dict:
        return dict(zip(self.dims, self.degrees))

    def __contains__(self, rank) -> bool:
        return rank in self._index

    def coords(self, rank) -> tuple | None:
        """Grid coordinates of ``rank`` (row-major, n outermost), or None
        when the rank holds no tile."""
        i = self._index.get(rank)
        if i is None:
            return None
        return tuple(int(c) for c in np.unravel_index(i, self.degrees))

    def rank_at(self, coords) -> int:
        return self.ranks[int(np.ravel_multi_index(tuple(coords), self.degrees))]

    @cached_property
    def _bounds(self):
        return [split_bounds(s, d) for s, d in zip(self.shape, self.degrees)]

    @cached_property
    def _boxes(self) -> dict:
        out = {}
        for i, r in enumerate(self.ranks):
            c = np.unravel_index(i, self.degrees)
            out[r] = Box(self._bounds[a][int(c[a])] for a in range(self.ndim))
        return out

    def box(self, rank) -> Box | None:
        """The box of ``rank``'s tile, or None when it holds no tile."""
        return self._boxes.get(rank)

    def boxes(self) -> dict[int, Box]:
        return {r: self.box(r) for r in self.ranks}

    def tile_shape(self, rank) -> tuple | None:
        b = self.box(rank)
        return None if b is None else b.shape

    def max_tile_volume(self) -> int:
        """Elements of the largest tile (the first one, by the split rule)."""
        v = 1
        for s, d in zip(self.shape, self.degrees):
            v *= -(-s // d)
        return v

    def group(self, rank, dims) -> tuple:
        """Ranks of this layout whose coordinates equal ``rank``'s on every
        dimension NOT in ``dims`` (e.g. dims=('n','h','w') gives the ranks
        that share rank's channel slice: the replicas of its parameters and
        its batch-norm statistics group), in layout order."""
        i = self._index.get(rank)
        if i is None:
            return ()
        groups, of = _partition(self.degrees, self.ranks, self.dims, tuple(sorted(dims)))
        return groups[of[i]]

    def groups(self, dims) -> list[tuple]:
        """All groups (see ``group``), sorted."""
        return sorted(_partition(self.degrees, self.ranks, self.dims, tuple(sorted(dims)))[0])

    def replica_groups(self) -> list[tuple]:
        """The replica groups (``groups(REPLICA_DIMS)``)."""
        return self.groups(REPLICA_DIMS)

    def extent(self, rank, dim: str) -> int:
        """Length of ``rank``'s tile along ``dim`` (1 for a dimension the
        tensor does not have, 0 when the rank holds no tile)."""
        if dim not in self.dims:
            return 1
        i = self._index.get(rank)
        if i is None:
            return 0
        a = self.dims.index(dim)
        # the coordinate along one axis, without building every tile's box
        c = (i // int(np.prod(self.degrees[a + 1:], dtype=np.int64))) % self.degrees[a]
        lo, hi = self._bounds[a][int(c)]
        return hi - lo

    # ---- identity, serialisation -------------------------------------------
    def key(self) -> tuple:
        return (self.shape, self.degrees, self.ranks)

    def __eq__(self, other):
        return isinstance(other, Layout) and self.key() == other.key()

    def __hash__(self):
        return hash(self.key())

    def to_dict(self) -> dict:
        d = {"shape": list(self.shape), "degrees": dict(zip(self.dims, self.degrees))}
        if self.ranks != tuple(range(self.k)):
            d["ranks"] = list(self.ranks)
        return d

    @classmethod
    def from_dict(cls, d) -> "Layout":
        return cls(d["shape"], d["degrees"], d.get("ranks"))

    def __repr__(self):
        deg = " ".join(f"{n}={d}" for n, d in zip(self.dims, self.degrees))
        r = "" if self.ranks == tuple(range(self.k)) else f", ranks={list(self.ranks)}"
        return f"Layout({self.shape}, {deg}{r})"


@lru_cache(maxsize=4096)
def _partition(degrees: tuple, ranks: tuple, names: tuple, dims: tuple):
    """(groups, group index of each grid index): the ranks of a layout
    grouped by their coordinates on the dimensions NOT in ``dims``, each
    group in layout order.  Depends on the degrees and ranks only (not on
    the shape), so layouts of many layers share it."""
    k = len(ranks)
    coords = np.unravel_index(np.arange(k), degrees)
    key = np.zeros(k, dtype=np.int64)
    for a, name in enumerate(names):
        if name not in dims:
            key = key * degrees[a] + coords[a]
    uniq, of = np.unique(key, return_inverse=True)
    order = np.argsort(of, kind="stable")
    bounds = np.searchsorted(of[order], np.arange(len(uniq) + 1))
    r = np.asarray(ranks)[order]
    groups = tuple(tuple(int(x) for x in r[bounds[g]:bounds[g + 1]]) for g in range(len(uniq)))
    return groups, of


def degrees_from_config(shape, config: dict) -> tuple:
    """Degrees tuple for a tensor of ``shape`` from a config such as
    {'n': 2, 'h': 2}; missing dimensions get degree 1.  A config may name
    a dimension the tensor does not have (d for an image, h and w for a
    2-D tensor) only if its degree is 1."""
    if len(shape) not in DIM_NAMES:
        raise LayoutError(f"tensors have 1, 2, 4 or 5 dimensions, got shape {tuple(shape)}")
    names = DIM_NAMES[len(shape)]
    bad = [k for k in config if k not in ALL_DIMS]
    if bad:
        raise LayoutError(f"unknown dimension(s) {bad} in configuration {config}: use n, c, d, h, w")
    for k, v in config.items():
        if k not in names and int(v) != 1:
            raise LayoutError(f"configuration {config} splits {k}, which a tensor of shape "
                              f"{tuple(shape)} does not have")
    return tuple(int(config.get(n, 1)) for n in names)
