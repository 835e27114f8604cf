"""How many elements an exchange between two layouts moves, for every pair of
configurations at once.

An edge carries the output tensor of a producer, split by the producer's
configuration (the *source* layout), to a consumer whose output tiles, split
by the consumer's configuration, each read an input box (``op.input_box``,
clipped to the tensor).  Rank r receives, from every other rank s, the part
of its needed box that s holds; self copies are free.  Per rank:

    received(r) = |need_r| - |need_r & box_r|
    sent(s)     = sum over consumer ranks r of |need_r & box_s|  -  |need_s & box_s|

and the load of the exchange is max over ranks of max(sent, received) -- the
ExchangePlan's ``max_rank_bytes`` divided by the item size.

Computing this from boxes costs O(k_src * k_dst) box intersections per pair
of configurations; a table has C_src * C_dst pairs, so that is far too slow at
hundreds of ranks.  The fast path here uses three facts:

* every op's input box is *separable*: input dimension e depends on at most
  one output dimension dep(e) (checked when the geometry is built; ops that
  break it go to the slow path);
* a box intersection volume is the product of per-dimension interval
  overlaps, so |need_r| and |need_r & box_r| are products of small per-dimension
  tables looked up at rank r's coordinates in each layout;
* the consumer ranks form a full grid, so the sum over them in sent(s)
  factorises into a product of per-dimension sums.

Per-dimension tables are keyed by (degree, stride) of the dimension in the
rank grid, so they stay tiny; the per-rank products are vectorised over
(configuration pairs x ranks) in cache-sized chunks.  The result equals the
box computation exactly (tests/test_cost_model.py checks it against the box
reference below and against the runtime's ExchangePlan).

On a machine with several nodes the same machinery gives, per node, the
elements that enter and leave it (for the node's network port): the source
ranks of one node form a product of coordinate intervals (always so for
power-of-two degrees and ranks per node), so the part of need_r held on r's
node is one more box intersection; layouts where that fails fall back to a
sum over the node's ranks.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from hpcnn.ops import clip_box
from hpcnn.parallel.box import Box
from hpcnn.parallel.layout import split_bounds, split_starts


class NotSeparable(Exception):
    """The op's input box is not a per-dimension function of its output box."""


# ---- the reference: straight from Layout boxes --------------------------------
def reference_exchange(src_layout, dst_layout, op, i, in_shapes, ranks_per_node=None):
    """Elements each rank sends to and receives from OTHER ranks, computed
    from the layouts' boxes and ``op.input_box`` (clip, intersect, sum).

    Returns dict(sent={rank: n}, received={rank: n}, pieces=[(src, dst, n)],
    max_rank=n, total=n, node_in={node: n}, node_out={node: n})."""
    shape = in_shapes[i]
    needs = {r: Box(clip_box(op.input_box(i, dst_layout.box(r), in_shapes), shape))
             for r in dst_layout.ranks}
    src_boxes = src_layout.boxes()
    sent, recv = defaultdict(int), defaultdict(int)
    node_in, node_out = defaultdict(int), defaultdict(int)
    pieces = []
    for r, nb in needs.items():
        if nb.empty:
            continue
        for s, sb in src_boxes.items():
            if s == r:
                continue
            v = nb.intersect(sb).volume
            if v:
                sent[s] += v
                recv[r] += v
                pieces.append((s, r, v))
                if ranks_per_node and s // ranks_per_node != r // ranks_per_node:
                    node_out[s // ranks_per_node] += v
                    node_in[r // ranks_per_node] += v
    ranks = set(sent) | set(recv)
    mx = max((max(sent[r], recv[r]) for r in ranks), default=0)
    return dict(sent=dict(sent), received=dict(recv), pieces=pieces, max_rank=mx,
                total=sum(v for _, _, v in pieces), node_in=dict(node_in), node_out=dict(node_out))


# ---- per-dimension geometry of one input of one op ---------------------------------
def _clip(lo, hi, size):
    a, b = max(lo, 0), min(hi, size)
    if b < a:
        a = b = min(max(lo, 0), size)
    return a, b


class InputGeometry:
    """Which output dimension each dimension of input ``i`` depends on, and
    the (clipped) input interval each output chunk reads, per degree."""

    def __init__(self, op, i, in_shapes, out_shape):
        self.op, self.i = op, int(i)
        self.in_shapes = [tuple(int(x) for x in s) for s in in_shapes]
        self.T = self.in_shapes[self.i]
        self.O = tuple(int(x) for x in out_shape)
        self.full = tuple((0, s) for s in self.O)
        self.base = tuple(tuple(b) for b in op.input_box(self.i, self.full, self.in_shapes))
        dep = [None] * len(self.T)
        for d, size in enumerate(self.O):
            for D in sorted({min(2, size), min(3, size)}):
                if D < 2:
                    continue
                for lo, hi in split_bounds(size, D):
                    ib = self._box(d, lo, hi)
                    for e in range(len(self.T)):
                        if tuple(ib[e]) != self.base[e]:
                            if dep[e] not in (None, d):
                                raise NotSeparable(f"{op.kind}: input dim {e} depends on output dims "
                                                   f"{dep[e]} and {d}")
                            dep[e] = d
        used = [d for d in dep if d is not None]
        if len(used) != len(set(used)):
            raise NotSeparable(f"{op.kind}: one output dimension drives several input dimensions")
        self.dep = dep
        self._need = {}

    def _box(self, d, lo, hi):
        ob = list(self.full)
        ob[d] = (lo, hi)
        return self.op.input_box(self.i, tuple(ob), self.in_shapes)

    def need(self, e: int, D: int):
        """(lo, hi) int arrays of the clipped input interval along input dim
        ``e`` for each of the D chunks of output dim dep(e) (one entry when e
        depends on no output dimension)."""
        d = self.dep[e]
        if d is None:
            lo, hi = _clip(*self.base[e], self.T[e])
            return np.array([lo]), np.array([hi])
        key = (d, int(D))
        if key not in self._need:
            los = [[] for _ in self.T]
            his = [[] for _ in self.T]
            for lo, hi in split_bounds(self.O[d], int(D)):
                ib = self._box(d, lo, hi)
                for e2 in range(len(self.T)):
                    if self.dep[e2] != d and tuple(ib[e2]) != self.base[e2]:
                        raise NotSeparable(f"{self.op.kind}: input dim {e2} changed with output dim {d}")
                    a, b = _clip(ib[e2][0], ib[e2][1], self.T[e2])
                    los[e2].append(a)
                    his[e2].append(b)
            self._need[key] = ([np.array(x) for x in los], [np.array(x) for x in his])
        los, his = self._need[key]
        return los[e], his[e]


# ---- rank-grid helpers --------------------------------------------------------------
def _strides(deg: np.ndarray) -> np.ndarray:
    """Row-major strides of a rank grid per configuration row."""
    st = np.ones_like(deg)
    for a in range(deg.shape[1] - 2, -1, -1):
        st[:, a] = st[:, a + 1] * deg[:, a + 1]
    return st


def _keys(cols):
    """Unique rows of the stacked non-negative integer columns (sorted), and
    each row's key index.  Rows are packed into one int64 (mixed radix) so
    that a 1-D unique does the work."""
    cols = [np.asarray(c, dtype=np.int64) for c in cols]
    n = len(cols[0]) if cols else 0
    if not cols:
        return np.zeros((1, 0), dtype=np.int64), np.zeros(n, dtype=np.int64)
    packed = np.zeros(n, dtype=np.int64)
    radix = 1
    for c in cols:
        base = int(c.max()) + 1 if n else 1
        if radix * base >= (1 << 62) or (n and c.min() < 0):
            arr = np.stack(cols, axis=1)
            uniq, inv = np.unique(arr, axis=0, return_inverse=True)
            return uniq, inv.reshape(-1)
        packed = packed * base + c
        radix *= base
    _, first, inv = np.unique(packed, return_index=True, return_inverse=True)
    uniq = np.stack([c[first] for c in cols], axis=1)
    return uniq, inv.reshape(-1)


def _chunk_ids(degrees, size):
    """Concatenated chunk bounds of one dimension for a set of degrees."""
    off, lo, hi = {}, [], []
    n = 0
    for D in degrees:
        off[int(D)] = n
        st = split_starts(size, D, np.arange(D + 1))
        lo.append(st[:-1])
        hi.append(st[1:])
        n += int(D)
    return off, np.concatenate(lo), np.concatenate(hi)


class ExchangeTables:
    """Per pair (source config i, consumer config j): ``max_rank`` elements on
    the most loaded rank, ``node_inter`` elements through the busiest node
    port (0 on one node), ``peers`` messages of the busiest rank (an estimate
    from per-dimension counts), and ``total`` elements moved."""

    def __init__(self, max_rank, node_inter, peers, total):
        self.max_rank, self.node_inter, self.peers, self.total = max_rank, node_inter, peers, total

    @property
    def shape(self):
        return self.max_rank.shape


def exchange_tables(geom: InputGeometry, A: np.ndarray, B: np.ndarray, ranks: int,
                    ranks_per_node: int = 1, want_total: bool = False,
                    chunk_elems: int = 1 << 19) -> ExchangeTables:
    """Tables for an edge: ``A`` (Ci x ndim of the tensor) source degrees,
    ``B`` (Cj x ndim of the consumer's output) consumer degrees, on ranks
    0..k-1 of a job of ``ranks`` ranks placed ``ranks_per_node`` to a node.
    ``want_total`` also fills ``total`` (elements moved by all ranks)."""
    A = np.asarray(A, dtype=np.int64)
    B = np.asarray(B, dtype=np.int64)
    T, dep = geom.T, geom.dep
    nt = len(T)
    Ci, Cj = len(A), len(B)
    kA, kB = A.prod(axis=1), B.prod(axis=1)
    sA, sB = _strides(A), _strides(B)
    R = max(1, int(ranks_per_node))
    P = int(max(kA.max(), kB.max(), 1))
    multi = P > R
    Pp = P                   # ranks involved: those the configurations use
    r = np.arange(Pp)

    rep = np.ones(Cj, dtype=np.float64)
    for d in range(B.shape[1]):
        if d not in dep:
            rep *= B[:, d]

    F, Tt, kiF, kjF, dI, NLrows = [], [], [], [], [], []
    peersR = np.ones((Ci, Cj))
    peersS = np.ones((Ci, Cj))
    dims = []
    for e in range(nt):
        d = dep[e]
        avals = np.unique(A[:, e])
        soff, S_lo, S_hi = _chunk_ids(avals, T[e])
        if d is None:
            Dvals = np.array([1])
            n_lo, n_hi = geom.need(e, 1)
            noff = {1: 0}
            N_lo, N_hi = n_lo, n_hi
            Dcol = np.ones(Cj, dtype=np.int64)
            Scol = np.zeros(Cj, dtype=np.int64)
        else:
            Dvals = np.unique(B[:, d])
            noff, los, his, n = {}, [], [], 0
            for D in Dvals:
                lo, hi = geom.need(e, int(D))
                noff[int(D)] = n
                los.append(lo)
                his.append(hi)
                n += int(D)
            N_lo, N_hi = np.concatenate(los), np.concatenate(his)
            Dcol, Scol = B[:, d], sB[:, d]
        OV = np.maximum(0, np.minimum(S_hi[:, None], N_hi[None, :]) - np.maximum(S_lo[:, None], N_lo[None, :]))
        NL = (N_hi - N_lo).astype(np.float64)
        # per source chunk, the sum over the D chunks of each consumer degree
        starts = np.array([noff[int(D)] for D in Dvals])
        SS = np.add.reduceat(OV, starts, axis=1).astype(np.float64)          # (nS, nD)
        Didx = np.searchsorted(Dvals, Dcol)                                  # per j
        aidx = np.searchsorted(avals, A[:, e])                               # per i

        # source keys (degree, stride); dimension 0 is outermost so r // stride
        # >= degree marks ranks beyond the layout
        ukA, kiA = _keys([A[:, e], sA[:, e]])
        coordA = r[None, :] // ukA[:, 1:2]
        validA = coordA < ukA[:, 0:1] if e == 0 else np.ones_like(coordA, dtype=bool)
        coordA = coordA % ukA[:, 0:1]
        sid = np.array([soff[int(a)] for a in ukA[:, 0]])[:, None] + coordA   # (nki, Pp)
        # consumer keys (degree, stride, k for dim 0 so that r >= k_j vanishes)
        kcol = kB if e == 0 else np.zeros(Cj, dtype=np.int64)
        ukB, kjB = _keys([Dcol, Scol, kcol])
        if d is None:
            coordB = np.zeros((len(ukB), Pp), dtype=np.int64)
        else:
            coordB = (r[None, :] // ukB[:, 1:2]) % ukB[:, 0:1]
        nid = np.array([noff[int(D)] for D in ukB[:, 0]])[:, None] + coordB  # (nkj, Pp)
        validB = (r[None, :] < ukB[:, 2:3]) if e == 0 else np.ones_like(nid, dtype=bool)

        Fe = OV[sid[:, None, :], nid[None, :, :]].astype(np.float64)
        Fe *= validA[:, None, :]
        Fe *= validB[None, :, :]
        Te = SS[sid][:, :, :].transpose(0, 2, 1) * validA[:, None, :]             # (nki, nD, Pp)
        F.append(Fe)
        Tt.append(np.ascontiguousarray(Te))
        kiF.append(kiA)
        kjF.append(kjB)
        dI.append(Didx)
        NLrows.append(NL[nid] * validB)
        dims.append(dict(avals=avals, soff=soff, S_lo=S_lo, S_hi=S_hi, N_lo=N_lo, N_hi=N_hi,
                         noff=noff, Dvals=Dvals, nid=nid, validB=validB, SS=SS, Didx=Didx))

        # message-count estimate: per dimension, the most source chunks one
        # need overlaps and the most needs one source chunk feeds
        pos = OV > 0
        MR = np.zeros((len(avals), len(Dvals)))
        MS = np.zeros((len(avals), len(Dvals)))
        for ai, a in enumerate(avals):
            rows = pos[soff[int(a)]:soff[int(a)] + int(a)]
            for di, D in enumerate(Dvals):
                blk = rows[:, noff[int(D)]:noff[int(D)] + int(D)]
                MR[ai, di] = blk.sum(axis=0).max()
                MS[ai, di] = blk.sum(axis=1).max()
        peersR *= MR[aidx][:, Didx]
        peersS *= MS[aidx][:, Didx]

    recv_total = np.ones((Cj, Pp))
    for e in range(nt):
        recv_total *= NLrows[e][kjF[e]]

    # combine dimensions in pairs ((n, c), (h, w)): fewer gathers per pair;
    # the consumer's replica count rep(j) is folded into the last pair
    groups = [tuple(range(0, min(2, nt)))] + ([tuple(range(2, nt))] if nt > 2 else [])
    G = []
    for gi, grp in enumerate(groups):
        last = gi == len(groups) - 1
        ukI, kiG = _keys([kiF[e] for e in grp])
        ukJ, kjG = _keys([kjF[e] for e in grp])
        ukD, dG = _keys([dI[e] for e in grp] + ([rep.astype(np.int64)] if last else []))
        FG, TG = None, None
        for x, e in enumerate(grp):
            f = F[e][ukI[:, x][:, None], ukJ[:, x][None, :]]
            t = Tt[e][ukI[:, x][:, None], ukD[:, x][None, :]]
            FG = f if FG is None else FG * f
            TG = t if TG is None else TG * t
        if last:
            TG = TG * ukD[:, -1].astype(np.float64)[None, :, None]
        G.append(dict(kiG=kiG, kjG=kjG, dG=dG, FG=FG, TG=TG))

    max_rank = np.zeros((Ci, Cj))
    total = np.zeros((Ci, Cj)) if want_total else None
    order = np.argsort(-kA, kind="stable")
    # blocks of consumer configurations using the same number of ranks: a
    # pair only involves ranks below max(k_i, k_j), and self copies only
    # ranks below min(k_i, k_j)
    for Kj in np.unique(kB):
        Kj = int(Kj)
        cols = np.nonzero(kB == Kj)[0]
        cj = len(cols)
        rt = recv_total[cols, :Kj]
        i0 = 0
        while i0 < Ci:
            Ki = int(kA[order[i0]])
            step = max(1, chunk_elems // max(1, cj * max(Ki, Kj)))
            rows = order[i0:i0 + step]
            i0 += len(rows)
            Pm = min(Ki, Kj)
            selfv = sent = None
            for g in G:
                f = g["FG"][:, :, :Pm][g["kiG"][rows][:, None], g["kjG"][cols][None, :]]
                t = g["TG"][:, :, :Ki][g["kiG"][rows][:, None], g["dG"][cols][None, :]]
                if selfv is None:
                    selfv, sent = f, t
                else:
                    selfv *= f
                    sent *= t
            blk = np.ix_(rows, cols)
            if want_total:
                total[blk] = rt.sum(axis=1)[None, :] - selfv.sum(axis=2)
            head = sent[:, :, :Pm]
            head -= selfv                                   # sent to others, ranks < Pm
            np.subtract(rt[None, :, :Pm], selfv, out=selfv)  # received, ranks < Pm
            np.maximum(selfv, head, out=selfv)
            m = selfv.max(axis=2)
            if Ki > Kj:
                m = np.maximum(m, sent[:, :, Pm:Ki].max(axis=2))
            elif Kj > Ki:
                m = np.maximum(m, rt[:, Pm:Kj].max(axis=1)[None, :])
            max_rank[blk] = m

    node_inter = np.zeros((Ci, Cj))
    if multi:
        node_inter = _node_inter(A, B, kA, kB, sA, sB, dims, dep, rep, R, recv_total, G, kjF,
                                 chunk_elems)
    peers = np.where(max_rank > 0, np.maximum(1.0, np.maximum(peersR, peersS) - 1.0), 0.0)
    return ExchangeTables(max_rank, node_inter, peers, total)


def _spans(D, k, st, R, nN):
    """For configurations ``D`` (C x nd) on ranks 0..k-1: per dimension,
    node and configuration, the coordinate interval [lo, hi) of the node's
    ranks (those below k), and whether they fill the product of those
    intervals (always so for power-of-two degrees and ranks per node)."""
    C, nd = D.shape
    rr = np.arange(nN * R).reshape(1, nN, R)
    valid = rr < k[:, None, None]
    cnt = valid.sum(axis=2)
    has = cnt > 0
    size = np.ones((C, nN), dtype=np.int64)
    lo = np.zeros((nd, C, nN), dtype=np.int64)
    hi = np.zeros((nd, C, nN), dtype=np.int64)
    for e in range(nd):
        a = D[:, e][:, None, None]
        c = (rr // st[:, e][:, None, None]) % a
        cmin = np.where(valid, c, a).min(axis=2)
        cmax = np.where(valid, c, -1).max(axis=2)
        lo[e] = np.where(has, cmin, 0)
        hi[e] = np.where(has, cmax + 1, 0)
        size *= hi[e] - lo[e]
    # the ranks are distinct coordinate tuples inside the product of the
    # intervals, so they fill it exactly when the counts agree
    ok = (size == cnt).all(axis=1)
    return dict(lo=lo, hi=hi, ok=ok, has=has)


def _span1(a, s, k, R, nN):
    """Coordinate interval [lo, hi) along one dimension (degree a, stride s)
    of the ranks of each node that lie below k; rows are keys."""
    rr = np.arange(nN * R).reshape(1, nN, R)
    valid = rr < k[:, None, None]
    c = (rr // s[:, None, None]) % a[:, None, None]
    has = valid.any(axis=2)
    lo = np.where(has, np.where(valid, c, a[:, None, None]).min(axis=2), 0)
    hi = np.where(has, np.where(valid, c, -1).max(axis=2) + 1, 0)
    return lo, hi


def _node_inter(A, B, kA, kB, sA, sB, dims, dep, rep, R, recv_total, G, kjF, chunk_elems):
    """Elements through the busiest node port, per configuration pair:
    max over nodes m of max(in_m, out_m) with

        in_m  = sum_{r in m} |need_r| - L_m,   out_m = sum_{s in m} sent_all(s) - L_m,
        L_m   = sum_{r in m} |need_r & union of the tiles of m's source ranks|.

    When the node's source and consumer ranks are products of coordinate
    intervals (power-of-two layouts) every sum factorises per dimension into
    prefix-sum differences over tables keyed by (degree, stride, ranks);
    other pairs are summed rank by rank."""
    Ci, Cj = len(A), len(B)
    nt = len(dims)
    P = int(max(kA.max(), kB.max()))
    nN = -(-P // R)
    ok_i = _spans(A, kA, sA, R, nN)["ok"]
    sj = _spans(B, kB, sB, R, nN)
    ok_j = sj["ok"]
    no = B.shape[1]
    mm = np.arange(nN)[None, :]
    # consumer side per (j, m): multiplicity of the out dims no input dim
    # depends on, and the total of |need_r| over the node
    mult = np.ones((Cj, nN))
    for d in range(no):
        if d not in dep:
            mult *= sj["hi"][d] - sj["lo"][d]
    RT = mult.copy()
    LOC, ST, kiL, kjL, dL = [], [], [], [], []
    for e in range(nt):
        de, d = dims[e], dep[e]
        NL = (de["N_hi"] - de["N_lo"]).astype(np.float64)
        # source keys (degree, stride, ranks) and their node intervals
        ukU, kiU = _keys([A[:, e], sA[:, e], kA])
        lo, hi = _span1(ukU[:, 0], ukU[:, 1], ukU[:, 2], R, nN)
        off = np.array([de["soff"][int(x)] for x in ukU[:, 0]])[:, None]
        u0, u1 = off + lo, off + hi                                  # chunk ids [u0, u1)
        nonempty = hi > lo
        ulo = np.where(nonempty, de["S_lo"][np.minimum(u0, len(de["S_lo"]) - 1)], 0)
        uhi = np.where(nonempty, de["S_hi"][np.maximum(u1 - 1, 0)], 0)
        ovu = np.maximum(0, np.minimum(uhi[:, :, None], de["N_hi"][None, None, :])
                         - np.maximum(ulo[:, :, None], de["N_lo"][None, None, :])).astype(np.float64)
        if d is None:
            RT *= NL[0]
            ukS, kjS = np.zeros((1, 1), dtype=np.int64), np.zeros(Cj, dtype=np.int64)
            Le = ovu[:, None, :, 0]                                  # (nkiU, 1, nN)
        else:
            ukS, kjS = _keys([B[:, d], sB[:, d], kB])
            slo, shi = _span1(ukS[:, 0], ukS[:, 1], ukS[:, 2], R, nN)
            soff = np.array([de["noff"][int(x)] for x in ukS[:, 0]])[:, None]
            i0, i1 = soff + slo, soff + shi
            CN = np.concatenate([[0.0], np.cumsum(NL)])
            RT *= (CN[i1] - CN[i0])[kjS]
            CU = np.concatenate([np.zeros(ovu.shape[:2] + (1,)), np.cumsum(ovu, axis=2)], axis=2)
            Le = CU[:, mm, i1] - CU[:, mm, i0]                        # (nkiU, nkjS, nN)
        SS = de["SS"]
        CS = np.concatenate([np.zeros((1, SS.shape[1])), np.cumsum(SS, axis=0)], axis=0)
        Se = (CS[u1] - CS[u0]).transpose(0, 2, 1)                    # (nkiU, nD, nN)
        LOC.append(Le)
        ST.append(Se)
        kiL.append(kiU)
        kjL.append(kjS)
        dL.append(de["Didx"])
    # pair the dimensions as in the per-rank tables
    groups = [tuple(range(0, min(2, nt)))] + ([tuple(range(2, nt))] if nt > 2 else [])
    NG = []
    for gi, grp in enumerate(groups):
        last = gi == len(groups) - 1
        ukI, kiG = _keys([kiL[e] for e in grp])
        ukJ, kjG = _keys([kjL[e] for e in grp])
        ukD, dG = _keys([dL[e] for e in grp] + ([rep.astype(np.int64)] if last else []))
        LG, SG = None, None
        for x, e in enumerate(grp):
            l = LOC[e][ukI[:, x][:, None], ukJ[:, x][None, :]]
            t = ST[e][ukI[:, x][:, None], ukD[:, x][None, :]]
            LG = l if LG is None else LG * l
            SG = t if SG is None else SG * t
        if last:
            SG = SG * ukD[:, -1].astype(np.float64)[None, :, None]
        NG.append((kiG, kjG, dG, LG, SG))
    out = np.zeros((Ci, Cj))
    step = max(1, chunk_elems // max(1, Cj * nN))
    for a0 in range(0, Ci, step):
        rows = np.arange(a0, min(Ci, a0 + step))
        loc = st = None
        for kiG, kjG, dG, LG, SG in NG:
            l = LG[kiG[rows][:, None], kjG[None, :]]
            t = SG[kiG[rows][:, None], dG[None, :]]
            if loc is None:
                loc, st = l, t
            else:
                loc *= l
                st *= t
        loc *= mult[None]
        st -= loc
        np.subtract(RT[None], loc, out=loc)
        np.maximum(loc, st, out=loc)
        out[rows] = loc.max(axis=2)
    if not (ok_i.all() and ok_j.all()):
        # rank-by-rank sums for pairs whose node blocks are not products
        bad_i = ~ok_i
        for rows, cols in ((np.nonzero(bad_i)[0], np.arange(Cj)),
                           (np.nonzero(ok_i)[0], np.nonzero(~ok_j)[0])):
            if len(rows) and len(cols):
                out[np.ix_(rows, cols)] = _node_inter_ranks(rows, cols, A, kA, sA, dims, R, nN,
                                                            recv_total, G, kjF)
    return out


def _node_inter_ranks(rows, cols, A, kA, sA, dims, R, nN, recv_total, G, kjF):
    """The node-port figure summed rank by rank (any layout)."""
    Pq = nN * R
    P = recv_total.shape[1]
    sent = None
    for g in G:
        t = g["TG"][g["kiG"][rows][:, None], g["dG"][cols][None, :]]
        sent = t if sent is None else sent * t
    pad = Pq - P
    if pad:
        sent = np.concatenate([sent, np.zeros(sent.shape[:2] + (pad,))], axis=2)
        rt = np.concatenate([recv_total[cols], np.zeros((len(cols), pad))], axis=1)
    else:
        rt = recv_total[cols]
    loc = np.zeros((len(rows), len(cols), Pq))
    node = np.arange(Pq) // R
    for o in range(R):
        src = node * R + o
        part = None
        for e, de in enumerate(dims):
            nid = de["nid"]
            if nid.shape[1] < Pq:
                nid = np.concatenate([nid, np.zeros((nid.shape[0], Pq - nid.shape[1]), dtype=nid.dtype)], axis=1)
                vb = np.concatenate([de["validB"], np.zeros((nid.shape[0], Pq - de["validB"].shape[1]),
                                                            dtype=bool)], axis=1)
            else:
                vb = de["validB"]
            N_lo, N_hi = de["N_lo"][nid], de["N_hi"][nid]
            a = A[rows, e][:, None]
            c = (src[None, :] // sA[rows, e][:, None]) % a
            off = np.array([de["soff"][int(x)] for x in A[rows, e]])[:, None]
            ok = src[None, :] < kA[rows][:, None]
            lo = np.where(ok, de["S_lo"][off + c], 0)
            hi = np.where(ok, de["S_hi"][off + c], 0)
            f = np.minimum(hi[:, None, :], N_hi[None]) - np.maximum(lo[:, None, :], N_lo[None])
            f = (np.maximum(f, 0) * vb[None])[:, kjF[e][cols], :].astype(np.float64)
            part = f if part is None else part * f
        loc += part
    ci, cj = len(rows), len(cols)
    locN = loc.reshape(ci, cj, nN, R).sum(axis=3)
    inN = rt.reshape(cj, nN, R).sum(axis=2)[None] - locN
    outN = sent.reshape(ci, cj, nN, R).sum(axis=3) - locN
    return np.maximum(inN, outN).max(axis=2)
