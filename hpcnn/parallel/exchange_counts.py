"""What an exchange between two layouts moves, rank by rank, for many pairs
of layouts at once: the view of ``ExchangePlan`` that the cost model prices.

An edge carries a producer's output tensor, split by the producer's layout
(the *source*), to a consumer whose output tiles, split by the consumer's
layout, each read a need box (``InputGeometry``).  Source tiles partition
the tensor, so for every rank r (self copies are free)::

    received(r) = |need_r| - |need_r & tile_r|
    sent(s)     = sum over consumer tiles t of |need_t & tile_s| - |need_s & tile_s|

and the messages are the (source, destination) pairs of different ranks
whose intersection is not empty: exactly ``ExchangePlan.pieces``.  Along
every axis a box intersection is the overlap of a source chunk with a need
interval (``hpcnn.parallel.overlap``), and a volume is the product over the
axes, so with the per-axis tables of ``AxisTables``

    |need_r & tile_s|        = prod_e ov_e[chunk_e(s), need_e(r)]
    |need_r|                 = prod_e len_e[need_e(r)]
    sum_t |need_t & tile_s|  = rep * prod_e sum_j ov_e[chunk_e(s), j]
    sources of r             = prod_e #{chunks c: ov_e[c, need_e(r)] > 0}
    destinations of s        = rep * prod_e #{j: ov_e[chunk_e(s), j] > 0}

(the last three because the source and consumer tiles each form a full
grid; ``rep`` is the number of consumer tiles along the output axes no
input axis depends on).  A node's network port carries what enters and
leaves its ranks::

    in(m)  = sum_{r in m} |need_r| - L(m),   out(m) = sum_{s in m} sent_all(s) - L(m),
    L(m)   = sum_{r in m} sum_{s in m} |need_r & tile_s|.

``exchange_tables`` evaluates these for every pair of a set of source and a
set of consumer configurations on ranks 0..k-1 (for the search), and
``rank_counts`` for one pair of layouts on any ranks (for pricing a plan and
for the runtime's byte counters).  Both run the same per-rank products
(``_Products``); tests check them against ``ExchangePlan`` and the runtime.

Pure index arithmetic with NumPy: no MPI.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcnn.parallel.input_geometry import InputGeometry
from hpcnn.parallel.layout import Layout
from hpcnn.parallel.overlap import chunk_bounds, overlap_length, summed_overlaps, touching_counts

__all__ = ["AxisTables", "ExchangeTables", "RankCounts", "exchange_tables", "rank_counts", "tables_key"]


# ---- per-axis tables -----------------------------------------------------------------
class _Axis:
    """One input axis of an edge, for a set of source degrees ``avals`` and
    consumer degrees ``bvals`` (of the output axis it depends on).

    Source chunk ids are ``soff[a] + c``, need ids ``noff[b] + j``; one id
    more at the end of each (the *sentinel*: an empty interval, zero in
    every table) stands for a rank that holds no tile.  Overlaps of a chunk
    with a need are computed from their bounds where they are used; the
    tables here are their sums, which stay small (ids x degrees):

    ss[s, b]   elements chunk s has in the needs of all b consumer chunks
    sp[s, b]   how many of those needs it meets
    cnt[a, n]  how many of the a source chunks need n meets
    len[0, n]  the length of need n
    """

    def __init__(self, geom: InputGeometry, e: int, avals, bvals):
        size = geom.shape[e]
        self.size = size
        self.avals = np.array(sorted({int(a) for a in avals}), dtype=np.int64)
        self.bvals = np.array([1] if geom.dep[e] is None else sorted({int(b) for b in bvals}), dtype=np.int64)
        self.soff, s_lo, s_hi, n = {}, [], [], 0
        for a in self.avals:
            lo, hi = chunk_bounds(size, int(a))
            self.soff[int(a)] = n
            s_lo.append(lo)
            s_hi.append(hi)
            n += int(a)
        self.noff, n_lo, n_hi, m = {}, [], [], 0
        for b in self.bvals:
            lo, hi = geom.need_bounds(e, int(b))
            self.noff[int(b)] = m
            n_lo.append(lo)
            n_hi.append(hi)
            m += int(b)
        zero = [np.zeros(1, dtype=np.int64)]
        self.s_lo, self.s_hi = np.concatenate(s_lo + zero), np.concatenate(s_hi + zero)
        self.n_lo, self.n_hi = np.concatenate(n_lo + zero), np.concatenate(n_hi + zero)
        self.s_sentinel, self.n_sentinel = n, m
        self.len = (self.n_hi - self.n_lo).astype(np.float64)[None, :]
        # message counts are small integers: float32 holds them exactly
        self.ss = np.zeros((n + 1, len(self.bvals)))
        self.sp = np.zeros((n + 1, len(self.bvals)), dtype=np.float32)
        for x, (lo, hi) in enumerate(zip(n_lo, n_hi)):
            self.ss[:n, x], self.sp[:n, x] = summed_overlaps(self.s_lo[:n], self.s_hi[:n], lo, hi)
        self.cnt = np.zeros((len(self.avals), m + 1), dtype=np.float32)
        for x, a in enumerate(self.avals):
            self.cnt[x, :m] = touching_counts(size, int(a), self.n_lo[:m], self.n_hi[:m])

    def a_index(self, a) -> np.ndarray:
        return np.searchsorted(self.avals, a)

    def b_index(self, b) -> np.ndarray:
        return np.searchsorted(self.bvals, b)


class AxisTables:
    """Per-axis tables of input ``geom`` for source degree rows ``A``
    (configs x axes of the tensor) and consumer degree rows ``B`` (configs
    x axes of the consumer's output)."""

    def __init__(self, geom: InputGeometry, A, B):
        self.geom = geom
        self.A = np.asarray(A, dtype=np.int64).reshape(-1, len(geom.shape))
        self.B = np.asarray(B, dtype=np.int64).reshape(-1, len(geom.out_shape))
        self.axes = [_Axis(geom, e, self.A[:, e], self.B[:, d] if d is not None else [1])
                     for e, d in enumerate(geom.dep)]
        # consumer tiles along output axes that no input axis depends on
        free = [d for d in range(self.B.shape[1]) if d not in geom.dep]
        self.rep = self.B[:, free].prod(axis=1).astype(np.float64) if free else np.ones(len(self.B))
        nt = len(geom.shape)
        self.groups = [tuple(range(a, min(a + 2, nt))) for a in range(0, nt, 2)]


# ---- ranks and their grid coordinates ------------------------------------------------------
def _strides(deg: np.ndarray) -> np.ndarray:
    st = np.ones_like(deg)
    for a in range(deg.shape[1] - 2, -1, -1):
        st[:, a] = st[:, a + 1] * deg[:, a + 1]
    return st


class _Side:
    """Coordinates of ranks in the grids of a set of configurations: on
    ranks 0..k-1 (row-major, n outermost), or those of explicit layouts."""

    def __init__(self, degrees: np.ndarray, layouts=None):
        self.deg = degrees
        self.k = degrees.prod(axis=1)
        self.st = _strides(degrees)
        self.layouts = layouts

    def key(self, rows, axis: int) -> list:
        """Columns that determine a configuration's coordinates along
        ``axis`` on any rank (rows with equal keys have equal coordinates)."""
        if self.layouts is not None:
            return [np.asarray(rows)]
        return [self.deg[rows, axis], self.st[rows, axis], self.k[rows]]

    def coords(self, rows, axis: int, ranks):
        """(coords, valid), each (rows, ranks): the coordinate of every rank
        of ``ranks`` (1-D) along ``axis`` in each configuration's grid, and
        whether the rank holds a tile there."""
        ranks = np.asarray(ranks, dtype=np.int64)
        if self.layouts is None:
            deg, st = self.deg[rows, axis], self.st[rows, axis]
            c = (ranks[None, :] // st[:, None]) % deg[:, None]
            return c, ranks[None, :] < self.k[rows][:, None]
        out = np.zeros((len(rows), len(ranks)), dtype=np.int64)
        valid = np.zeros((len(rows), len(ranks)), dtype=bool)
        for x, row in enumerate(rows):
            L = self.layouts[row]
            idx = np.array([L._index.get(int(r), -1) for r in ranks], dtype=np.int64)
            valid[x] = idx >= 0
            out[x] = np.unravel_index(np.maximum(idx, 0), L.degrees)[axis]
        return out, valid

    def node_spans(self, rows, axis: int, R: int, nodes: int):
        """(lo, hi, count), each (rows, nodes): the coordinate range along
        ``axis`` of the ranks of each node (R consecutive ranks) that hold a
        tile, and how many do (0: none; lo = hi = 0 then)."""
        c, valid = self.coords(rows, axis, np.arange(nodes * R))
        c, valid = c.reshape(len(rows), nodes, R), valid.reshape(len(rows), nodes, R)
        big = np.iinfo(np.int64).max
        lo = np.where(valid, c, big).min(axis=2)
        hi = np.where(valid, c, -1).max(axis=2) + 1
        count = valid.sum(axis=2)
        return np.where(count > 0, lo, 0), np.where(count > 0, hi, 0), count

    def node_boxes(self, rows, R: int, nodes: int) -> np.ndarray:
        """Per configuration: whether the ranks of every node that hold a
        tile form a box of the grid (always so for power-of-two degrees and
        nodes; then a node's tiles are one box of the tensor)."""
        size, count = None, None
        for axis in range(self.deg.shape[1]):
            lo, hi, count = self.node_spans(rows, axis, R, nodes)
            size = (hi - lo) if size is None else size * (hi - lo)
        return (size == count).all(axis=1)


class _Products:
    """Per-rank products over the axes of one edge, for a block of source
    configurations (rows) and consumer configurations (cols):

        value[row, col, x] = prod_e f_e(a_e(row, a_ranks[x]), b_e(col, b_ranks[x]))

    The source side of an axis is a source chunk (``a_kind="chunk"``), the
    box of all source chunks on the rank's node (``"node"``), the source
    degree (``"degree"``) or nothing (``"one"``); the consumer side a need
    (``b_kind="need"``) or the consumer degree (``"degree"``).  ``f`` is the
    overlap of chunk (or node box) and need (``"ov"``) or a lookup in one of
    the axis tables (``"ss"``, ``"sp"``, ``"cnt"``, ``"len"``).  Axes are
    taken in small groups; within a group the product is computed once for
    each distinct configuration of the group's axes on each side (few:
    configurations differ mostly in the other axes) and gathered."""

    def __init__(self, tabs: AxisTables, src: _Side, dst: _Side, ranks_per_node: int = 1):
        self.t, self.src, self.dst, self.R = tabs, src, dst, int(ranks_per_node)

    def _a_keys(self, rows, e, kind):
        if kind in ("chunk", "node"):
            return self.src.key(rows, e)
        if kind == "degree":
            return [self.t.A[rows, e]]
        return [np.zeros(len(rows), dtype=np.int64)]

    def _b_keys(self, cols, e, kind):
        d = self.t.geom.dep[e]
        if kind == "degree":
            return [self.t.B[cols, d] if d is not None else np.zeros(len(cols), dtype=np.int64)]
        if d is None:
            return [self.dst.k[cols]] if self.dst.layouts is None else [np.asarray(cols)]
        return self.dst.key(cols, d)

    def _a_side(self, rows, e, kind, ranks):
        """(ids, lo, hi) of the source side along axis e for every rank."""
        ax = self.t.axes[e]
        a = self.t.A[rows, e]
        if kind == "chunk":
            c, valid = self.src.coords(rows, e, ranks)
            ids = np.where(valid, np.array([ax.soff[int(v)] for v in a])[:, None] + c, ax.s_sentinel)
            return ids, ax.s_lo[ids], ax.s_hi[ids]
        if kind == "node":
            ranks = np.asarray(ranks, dtype=np.int64)
            node = ranks // self.R
            nodes = int(node.max()) + 1 if len(node) else 1
            clo, chi, count = self.src.node_spans(rows, e, self.R, nodes)
            off = np.array([ax.soff[int(v)] for v in a])[:, None]
            lo = np.where(count > 0, ax.s_lo[off + clo], 0)
            hi = np.where(count > 0, ax.s_hi[np.maximum(off + chi - 1, 0)], 0)
            return None, lo[:, node], hi[:, node]
        if kind == "degree":
            return ax.a_index(a)[:, None], None, None
        return np.zeros((len(rows), 1), dtype=np.int64), None, None

    def _b_side(self, cols, e, kind, ranks):
        """(ids, lo, hi) of the consumer side along axis e for every rank."""
        ax, d = self.t.axes[e], self.t.geom.dep[e]
        b = self.t.B[cols, d] if d is not None else np.ones(len(cols), dtype=np.int64)
        if kind == "degree":
            return ax.b_index(b)[:, None], None, None
        off = np.array([ax.noff[int(v)] for v in b])[:, None]
        if d is None:
            valid = self.dst.coords(cols, 0, ranks)[1]
            ids = np.where(valid, off, ax.n_sentinel)
        else:
            c, valid = self.dst.coords(cols, d, ranks)
            ids = np.where(valid, off + c, ax.n_sentinel)
        return ids, ax.n_lo[ids], ax.n_hi[ids]

    def __call__(self, tables, rows, cols, a_ranks, b_ranks=None, a_kind="chunk", b_kind="need"):
        """The products of each table named in ``tables`` (a name or a
        tuple of names, all indexed the same way); one array or a list."""
        names = (tables,) if isinstance(tables, str) else tuple(tables)
        rows, cols = np.asarray(rows), np.asarray(cols)
        if b_ranks is None:
            b_ranks = a_ranks
        out = [None] * len(names)
        for grp in self.t.groups:
            ua, ia = _distinct([k for e in grp for k in self._a_keys(rows, e, a_kind)])
            ub, ib = _distinct([k for e in grp for k in self._b_keys(cols, e, b_kind)])
            parts = [None] * len(names)
            for e in grp:
                a_id, a_lo, a_hi = self._a_side(rows[ua], e, a_kind, a_ranks)
                b_id, b_lo, b_hi = self._b_side(cols[ub], e, b_kind, b_ranks)
                for x, name in enumerate(names):
                    if name == "ov":
                        f = overlap_length(a_lo[:, None, :], a_hi[:, None, :],
                                           b_lo[None, :, :], b_hi[None, :, :]).astype(np.float64)
                    else:
                        f = getattr(self.t.axes[e], name)[a_id[:, None, :], b_id[None, :, :]]
                    parts[x] = f if parts[x] is None else np.multiply(parts[x], f, out=parts[x])
            for x, part in enumerate(parts):
                g = part[ia[:, None], ib[None, :]]
                out[x] = g if out[x] is None else np.multiply(out[x], g, out=out[x])
        return out[0] if isinstance(tables, str) else out


def _distinct(cols):
    """(positions of the first of each distinct row, index of each row's
    distinct row) of the integer key columns ``cols``."""
    cols = [np.asarray(c, dtype=np.int64) for c in cols]
    packed, radix = np.zeros(len(cols[0]), dtype=np.int64), 1
    for c in cols:
        base = int(c.max()) + 1
        radix *= base
        if radix >= 1 << 62:           # too wide to pack: distinct rows of the stack
            _, first, inv = np.unique(np.stack(cols, axis=1), axis=0, return_index=True,
                                      return_inverse=True)
            return first, inv.reshape(-1)
        packed = packed * base + c
    _, first, inv = np.unique(packed, return_index=True, return_inverse=True)
    return first, inv.reshape(-1)


def _node_sums(v, R):
    """Sums over consecutive groups of R along the last axis (padded)."""
    n = v.shape[-1]
    pad = (-n) % R
    if R == 1:
        return v
    if pad:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (pad,))], axis=-1)
    # R strided adds: far faster than a reduction over a short last axis
    out = v[..., 0::R].copy()
    for q in range(1, R):
        out += v[..., q::R]
    return out


def _node_local(prod, rows, cols, kl):
    """L per consumer rank r < kl: the elements of r's need held by the
    source tiles of r's node, for every (row, col) pair."""
    R = prod.R
    cons = np.arange(kl)
    nodes = -(-kl // R)
    box = prod.src.node_boxes(rows, R, nodes)
    local = np.zeros((len(rows), len(cols), kl))
    if box.any():                 # a node's tiles form one box: one overlap per rank
        local[box] = prod("ov", rows[box], cols, cons, cons, a_kind="node")
    if not box.all():             # else: every consumer with each rank of its node
        rest = rows[~box]
        peers = ((cons // R) * R)[None, :] + np.arange(R)[:, None]
        cross = prod("ov", rest, cols, peers.reshape(-1), np.tile(cons, R))
        local[~box] = cross.reshape(len(rest), len(cols), R, kl).sum(axis=2)
    return local


# ---- many pairs of configurations (the search) ---------------------------------------------------
@dataclass
class ExchangeTables:
    """Per pair (source configuration i, consumer configuration j), in
    elements: ``max_rank`` on the rank that sends or receives most,
    ``node_inter`` through the busiest node port (0 on one node);
    ``messages`` of the rank that sends and receives most messages (both
    counted); ``total`` moved by all ranks."""
    max_rank: np.ndarray
    node_inter: np.ndarray
    messages: np.ndarray
    total: np.ndarray

    @property
    def shape(self):
        return self.max_rank.shape


def tables_key(geom: InputGeometry, A, B) -> tuple:
    """What ``exchange_tables(geom, A, B, R)`` depends on, as a hashable
    key: the tensor's shape, which output axis each input axis follows,
    the need intervals for every consumer degree in ``B`` and the degree
    rows themselves.  Edges whose ops differ but read alike (1x1
    convolutions of one tensor into different channel counts, say) share
    the key, and so their tables."""
    A = np.asarray(A, dtype=np.int64).reshape(-1, len(geom.shape))
    B = np.asarray(B, dtype=np.int64).reshape(-1, len(geom.out_shape))
    needs = []
    for e, d in enumerate(geom.dep):
        for b in ([1] if d is None else sorted({int(v) for v in B[:, d]})):
            lo, hi = geom.need_bounds(e, b)
            needs.append((e, b, np.asarray(lo).tobytes(), np.asarray(hi).tobytes()))
    return (geom.shape, geom.dep, tuple(needs), A.tobytes(), A.shape, B.tobytes(), B.shape)


def exchange_tables(geom: InputGeometry, A, B, ranks_per_node: int = 1,
                    chunk_elems: int = 1 << 22) -> ExchangeTables:
    """Tables of every pair of source configurations ``A`` (rows of
    degrees of the tensor's axes) and consumer configurations ``B`` (rows
    of degrees of the consumer's output axes), each laid on ranks 0..k-1,
    ``ranks_per_node`` consecutive ranks to a node."""
    tabs = AxisTables(geom, A, B)
    A, B = tabs.A, tabs.B
    R = max(1, int(ranks_per_node))
    src, dst = _Side(A), _Side(B)
    prod = _Products(tabs, src, dst, R)
    Ci, Cj = len(A), len(B)
    kA, kB = src.k, dst.k
    P = int(max(kA.max(), kB.max()))
    out = ExchangeTables(*(np.zeros((Ci, Cj)) for _ in range(4)))
    # consumer side alone: need per rank (zero beyond k_j), and per node
    need = prod("len", np.zeros(1, dtype=np.int64), np.arange(Cj), None, np.arange(P), a_kind="one")[0]
    node_need = _node_sums(need, R)
    for rows_all in _bins(kA, R):
        for cols in _bins(kB, R):
            ka, kb = int(kA[rows_all].max()), int(kB[cols].max())
            step = max(1, chunk_elems // max(1, len(cols) * max(ka, kb)))
            for r0 in range(0, len(rows_all), step):
                _block(prod, tabs, rows_all[r0:r0 + step], cols, ka, kb, need[cols], node_need[cols], out)
    return out


def _bins(k: np.ndarray, R: int, small: int = 64) -> list:
    """Configurations grouped by the ranks they use, those on at most
    ``small`` (or R) ranks together: a block costs its largest rank count,
    and small blocks cost mostly their fixed overhead."""
    cut = max(small, R)
    out = [np.nonzero(k <= cut)[0]] if (k <= cut).any() else []
    out += [np.nonzero(k == v)[0] for v in np.unique(k[k > cut])]
    return out


def _block(prod, tabs, rows, cols, ka, kb, need, node_need, out):
    """Fill ``out`` for source configurations ``rows`` (on at most ka ranks)
    and consumer configurations ``cols`` (on at most kb ranks).  Ranks
    beyond a configuration's own count hold no tile: every product there
    is zero (the tables' sentinels), so the ranges below may be the
    block's largest.  Ranks below m = min(ka, kb) may hold both a source
    and a consumer tile; above it, only one of them."""
    R = prod.R
    m = min(ka, kb)
    blk = np.ix_(rows, cols)
    src_ranks = np.arange(ka)
    rep = tabs.rep[cols][None, :, None]
    self_ = prod("ov", rows, cols, np.arange(m))                              # (r, c, m)
    sall, dsts = prod(("ss", "sp"), rows, cols, src_ranks, src_ranks, b_kind="degree")
    sall *= rep                                                               # (r, c, ka)
    dsts *= rep.astype(np.float32)
    srcs = prod("cnt", rows, cols, None, np.arange(kb), a_kind="degree")     # (r, c, kb)
    needb = need[None, :, :kb]
    # bytes: max over ranks of max(received, sent); below m both less the self copy
    both = np.maximum(needb[:, :, :m], sall[:, :, :m])
    both -= self_
    best = both.max(axis=2)
    if ka > m:
        best = np.maximum(best, sall[:, :, m:].max(axis=2))
    if kb > m:
        best = np.maximum(best, needb[:, :, m:].max(axis=2))
    out.max_rank[blk] = best
    out.total[blk] = needb.sum(axis=2) - self_.sum(axis=2)
    # messages: destinations of each source plus sources of each destination
    msg = dsts[:, :, :m]
    msg += srcs[:, :, :m]
    np.subtract(msg, 2, out=msg, where=self_ > 0)   # the self copy is no message, either way
    msgs = msg.max(axis=2)
    if ka > m:
        msgs = np.maximum(msgs, dsts[:, :, m:].max(axis=2))
    if kb > m:
        msgs = np.maximum(msgs, srcs[:, :, m:].max(axis=2))
    out.messages[blk] = msgs
    if max(ka, kb) > R:
        # node ports: in = needs of the node's ranks, out = what its ranks
        # send, each less what stays inside the node
        kl = min(kb, -(-ka // R) * R)        # consumers on nodes that hold a source tile
        nodes = -(-max(ka, kb) // R)
        nl, na, nb = -(-kl // R), -(-ka // R), -(-kb // R)
        loc = _node_sums(_node_local(prod, rows, cols, kl), R)
        outof = _node_sums(sall, R)
        outof[:, :, :nl] -= loc
        port = outof.max(axis=2) if na == nodes else np.maximum(outof.max(axis=2), 0.0)
        into = np.broadcast_to(node_need[None, :, :nb], (len(rows), len(cols), nb)).copy()
        into[:, :, :nl] -= loc
        out.node_inter[blk] = np.maximum(port, into.max(axis=2))


# ---- one pair of layouts, rank by rank (pricing a plan, byte counters) -------------------------------
@dataclass
class RankCounts:
    """One exchange between two layouts, per rank of ranks 0..P-1 (elements
    and messages to and from OTHER ranks), and per node port."""
    sent: np.ndarray
    received: np.ndarray
    messages_sent: np.ndarray
    messages_received: np.ndarray
    node_in: np.ndarray
    node_out: np.ndarray

    @property
    def max_rank(self) -> float:
        return float(np.maximum(self.sent, self.received).max(initial=0.0))

    @property
    def total(self) -> float:
        return float(self.sent.sum())

    @property
    def messages(self) -> float:
        """Messages (sent and received) of the busiest rank."""
        return float((self.messages_sent + self.messages_received).max(initial=0.0))

    @property
    def node_inter(self) -> float:
        return float(np.maximum(self.node_in, self.node_out).max(initial=0.0))

    def tables(self) -> ExchangeTables:
        """The 1 x 1 tables of this pair."""
        one = lambda v: np.array([[float(v)]])  # noqa: E731
        port = self.node_inter if len(self.node_in) > 1 else 0.0
        return ExchangeTables(one(self.max_rank), one(port), one(self.messages), one(self.total))


def rank_counts(geom: InputGeometry, src: Layout, dst: Layout, ranks: int,
                ranks_per_node: int = 1) -> RankCounts:
    """Elements and messages of the exchange from layout ``src`` (the
    producer's, of the tensor ``geom`` reads) to the tiles of layout ``dst``
    (the consumer's output), for every rank 0..ranks-1."""
    P, R = int(ranks), max(1, int(ranks_per_node))
    tabs = AxisTables(geom, [src.degrees], [dst.degrees])
    prod = _Products(tabs, _Side(tabs.A, [src]), _Side(tabs.B, [dst]), R)
    every = np.arange(P)
    one = np.zeros(1, dtype=np.int64)
    self_ = prod("ov", one, one, every)[0, 0]
    need = prod("len", one, one, None, every, a_kind="one")[0, 0]
    sall, dsts = (v[0, 0] * tabs.rep[0] for v in prod(("ss", "sp"), one, one, every, every, b_kind="degree"))
    srcs = prod("cnt", one, one, None, every, a_kind="degree")[0, 0]
    own = (self_ > 0).astype(np.float64)
    loc = _node_sums(_node_local(prod, one, one, P)[0], R)[0]
    return RankCounts(sent=sall - self_, received=need - self_, messages_sent=dsts - own,
                      messages_received=srcs - own, node_in=_node_sums(need[None], R)[0] - loc,
                      node_out=_node_sums(sall[None], R)[0] - loc)
