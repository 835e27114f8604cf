"""The configurations the search chooses from, one set per layer.

A *configuration* of a layer is a degree per dimension of its output tensor
(n, c, h, w for images, n, c, d, h, w for volumes, n, c for features, n for
the per-sample loss); the
layer uses the product of the degrees as its number of ranks, laid row-major
(n outermost) on ranks 0..k-1 (see ``hpcnn.parallel.layout``).

The full space (every tuple of degrees whose product is at most P) grows too
fast with the rank count P to search at hundreds of ranks.  The space searched
here is restricted by rules that are stated once, applied to every layer and
keep the search exact over the space they define:

1. Only the dimensions the op declares in ``op.splittable`` may have a
   degree above 1, and no degree exceeds the size of its dimension (a tile is
   never empty).
2. The number of ranks a layer uses, k = product of its degrees, is a
   divisor of P or a power of two not above P.  For P a power of two these are
   exactly the powers of two; for P = 6 they are 1, 2, 3, 4, 6.  Layers may use
   fewer ranks than the job has (the paper's optima do).
3. Spatial tiles stay roughly square (cubic for volumes): when a layer
   splits two or three of depth, height and width, no split degree exceeds
   ``aspect`` (default 2) times another; a split of only one of them has at
   most ``strip`` (default 4) parts.  The paper's spatial optima (h=2 w=2)
   are inside.
4. A layer combines at most ``max_kinds`` (default 2) of the three kinds of
   split -- samples (n), channels (c), space (d, h, w).  The paper's optima use
   one kind per layer; two-kind hybrids (n x c, n x space, c x space) are the
   usual generalisation.  At 256 ranks this rule keeps 171 instead of 291
   configurations of a large image layer; on AlexNet, VGG-16, ResNet-101 and
   Inception-v3 at 16 and 64 ranks of the paper's cluster the optimum with
   three-kind splits allowed is the same plan cost (docs/paper-reproduction.md).

Ops that compute each output element from the same element of their single
input (ReLU and the other activations, batch normalisation, dropout:
``FOLDABLE_KINDS``) are *folded*
into their producer: they take the producer's configuration, so the edge
between them moves nothing and is not searched.  A folded group is searched as
one unit; its configurations are those every member can take.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from hpcnn.parallel.layout import DIM_NAMES, SPATIAL_DIMS

#: op kinds folded into their producer's configuration
FOLDABLE_KINDS = frozenset({"relu", "batchnorm", "dropout", "sigmoid", "leaky_relu", "clip", "hardswish",
                            "tanh"})


class ConfigSpaceError(ValueError):
    """A layer with no admissible configuration, or bad space options."""


@dataclass(frozen=True)
class SpaceOptions:
    """The restriction rules of the searched space (see the module text)."""
    aspect: float = 2.0
    strip: int = 4
    max_kinds: int = 2
    fold: bool = True

    def __post_init__(self):
        if not self.aspect >= 1:
            raise ConfigSpaceError(f"aspect must be at least 1, got {self.aspect}")
        if int(self.strip) < 1:
            raise ConfigSpaceError(f"strip must be at least 1, got {self.strip}")
        if int(self.max_kinds) not in (1, 2, 3):
            raise ConfigSpaceError(f"max_kinds must be 1, 2 or 3, got {self.max_kinds}")

    def to_dict(self) -> dict:
        return {"aspect": self.aspect, "strip": self.strip, "max_kinds": self.max_kinds,
                "fold": self.fold}


def allowed_rank_counts(ranks: int) -> tuple[int, ...]:
    """Rank counts a layer may use in a job of ``ranks`` ranks: the divisors
    of ``ranks`` and the powers of two not above it."""
    P = int(ranks)
    if P < 1:
        raise ConfigSpaceError(f"the rank count must be positive, got {ranks}")
    out = {d for d in range(1, P + 1) if P % d == 0}
    p = 1
    while p <= P:
        out.add(p)
        p *= 2
    return tuple(sorted(out))


def _divisors(k: int) -> list[int]:
    return [d for d in range(1, k + 1) if k % d == 0]


@lru_cache(maxsize=4096)
def _enumerate(shape: tuple, splittable: frozenset, ranks: int, opts: SpaceOptions) -> np.ndarray:
    names = DIM_NAMES[len(shape)]
    sizes = dict(zip(names, shape))
    free = [d for d in names if d in splittable]
    out = []
    for k in allowed_rank_counts(ranks):
        # every ordered factorisation of k over the free dimensions
        def rec(i, rest, acc):
            if i == len(free):
                if rest == 1:
                    out.append(dict(acc))
                return
            d = free[i]
            for f in _divisors(rest):
                if f > sizes[d]:
                    break
                acc[d] = f
                rec(i + 1, rest // f, acc)
            acc.pop(d, None)
        rec(0, k, {})
    rows = []
    for cfg in out:
        split = [cfg[d] for d in SPATIAL_DIMS if cfg.get(d, 1) > 1]
        if len(split) > 1:
            if max(split) > opts.aspect * min(split):
                continue
        elif split and split[0] > opts.strip:
            continue
        kinds = (cfg.get("n", 1) > 1) + (cfg.get("c", 1) > 1) + bool(split)
        if kinds > opts.max_kinds:
            continue
        rows.append(tuple(cfg.get(d, 1) for d in names))
    # most ranks first, then lexicographic: a stable, documented order
    rows.sort(key=lambda r: (-int(np.prod(r)), r))
    arr = np.array(rows, dtype=np.int64).reshape(-1, len(names))
    arr.setflags(write=False)
    return arr


def enumerate_configs(shape, splittable, ranks: int, opts: SpaceOptions | None = None) -> np.ndarray:
    """All admissible degree tuples (rows, in the tensor's dimension order)
    for an output tensor of ``shape`` whose op may split ``splittable``."""
    opts = opts or SpaceOptions()
    shape = tuple(int(s) for s in shape)
    if len(shape) not in DIM_NAMES:
        raise ConfigSpaceError(f"tensors have 1, 2, 4 or 5 dimensions, got shape {shape}")
    return _enumerate(shape, frozenset(splittable), int(ranks), opts)


def config_dict(dims, degrees) -> dict:
    """{'n': .., 'c': .., ...} from a degree row."""
    return {d: int(v) for d, v in zip(dims, degrees)}


# ---- folding -----------------------------------------------------------------
@dataclass
class LayerGroup:
    """A node and the elementwise ops folded into it (one search unit)."""
    index: int
    root: str
    members: list = field(default_factory=list)   # root first, topological order
    shape: tuple = ()
    splittable: frozenset = frozenset()

    @property
    def dims(self) -> tuple:
        return DIM_NAMES[len(self.shape)]

    @property
    def name(self) -> str:
        return self.root


def _foldable(node, producer_node, group: LayerGroup, graph) -> bool:
    if node.kind not in FOLDABLE_KINDS or len(node.inputs) != 1:
        return False
    if tuple(node.shape) != tuple(producer_node.shape):
        return False
    if not group.splittable <= frozenset(node.op.splittable):
        return False
    return True


def fold_groups(graph, fold: bool = True) -> tuple[list[LayerGroup], dict[str, int]]:
    """Partition the graph's nodes into search units.  Returns the groups in
    topological order of their roots and a map node name -> group index."""
    groups: list[LayerGroup] = []
    of: dict[str, int] = {}
    for node in graph:
        if fold and len(node.inputs) == 1 and node.inputs[0] in of:
            g = groups[of[node.inputs[0]]]
            if _foldable(node, graph[node.inputs[0]], g, graph):
                g.members.append(node.name)
                of[node.name] = g.index
                continue
        g = LayerGroup(len(groups), node.name, [node.name], tuple(node.shape),
                       frozenset(node.op.splittable))
        groups.append(g)
        of[node.name] = g.index
    return groups, of


# ---- the space of a whole graph ----------------------------------------------
class ConfigSpace:
    """Groups of a graph and the configurations of each group."""

    def __init__(self, graph, ranks: int, opts: SpaceOptions | None = None):
        self.graph = graph
        self.ranks = int(ranks)
        self.opts = opts or SpaceOptions()
        self.groups, self.group_of = fold_groups(graph, self.opts.fold)
        self.configs: list[np.ndarray] = []
        for g in self.groups:
            cf = enumerate_configs(g.shape, g.splittable, self.ranks, self.opts)
            if len(cf) == 0:   # cannot happen: the all-ones row is always admissible
                raise ConfigSpaceError(f"layer {g.root!r} has no admissible configuration")
            self.configs.append(cf)

    def __len__(self):
        return len(self.groups)

    def sizes(self) -> list[int]:
        return [len(c) for c in self.configs]

    def edges(self) -> list[tuple[int, int, str, str, int]]:
        """Data edges between groups: (src group, dst group, producer node,
        consumer node, input index).  Edges inside a group are folded away."""
        out = []
        for node in self.graph:
            gd = self.group_of[node.name]
            for i, src in enumerate(node.inputs):
                gs = self.group_of[src]
                if gs == gd:
                    continue
                out.append((gs, gd, src, node.name, i))
        return out

    def index_of(self, group: int, config: dict) -> int | None:
        """Row of ``config`` in a group's configurations, or None."""
        g = self.groups[group]
        row = tuple(int(config.get(d, 1)) for d in g.dims)
        hits = np.nonzero((self.configs[group] == np.array(row)).all(axis=1))[0]
        return int(hits[0]) if len(hits) else None

    def plan_configs(self, choice) -> dict[str, dict]:
        """Per-node configurations from one configuration row per group
        (``choice[g]`` an index into configs[g] or a degree row)."""
        out = {}
        for g in self.groups:
            c = choice[g.index]
            row = self.configs[g.index][c] if np.ndim(c) == 0 else c
            cfg = config_dict(g.dims, row)
            for m in g.members:
                out[m] = dict(cfg)
        return out


def fit_config(shape, splittable, ranks: int, want: dict) -> dict:
    """The configuration closest to ``want`` that rules 1-2 admit: each wanted
    degree is lowered, in the order the dict gives, to the largest admissible
    value.  Used by the baselines so that they are built by the same rules."""
    names = DIM_NAMES[len(shape)]
    sizes = dict(zip(names, shape))
    allowed = allowed_rank_counts(ranks)
    cfg = {d: 1 for d in names}
    for d, v in want.items():
        if d not in names or d not in splittable:
            continue
        used = int(np.prod(list(cfg.values())))
        best = 1
        for f in range(1, min(int(v), sizes[d]) + 1):
            if used * f in allowed:
                best = f
        cfg[d] = best
    return cfg
