"""Exact minimisation of a sum of node and edge costs over one configuration
per node: the strategy search of Jia et al. (ICML 2018), generalised.

Input: a cost vector per node (``node_costs[v][c]``: t_c + t_s of node v under
configuration c) and a cost matrix per edge (``M[cu, cv]``: t_x of the edge
when its ends take cu and cv).  Output: the configuration per node that
minimises the total, and that total.  Pure functions of these arrays: no
graph of ops, no MPI.

Reductions, each preserving the optimum (the paper's Theorems 1 and 2, here on
the undirected graph, which also reduces graphs the paper's directed rules
cannot, such as the Wheatstone bridge):

* parallel edges are summed into one (edge elimination);
* a node with two neighbours u, w is replaced by an edge (u, w) with
  M'[cu, cw] = min_cv (M_uv[cu, cv] + t(v, cv) + M_vw[cv, cw]) (node
  elimination; a vectorised min-plus product);
* a node with one neighbour u is folded into u's vector
  (t'(u, cu) = t(u, cu) + min_cv (M_uv[cu, cv] + t(v, cv))), and an isolated
  node contributes its minimum.

Whatever remains has every node of degree >= 3 (the graph has a K4 minor and
is not series-parallel).  It is solved exactly by variable elimination (the
dynamic programme over an elimination order chosen greedily for small
intermediate tables), which enumerates only the joint configurations of each
eliminated node's neighbours.  Eliminations are undone in reverse to recover
every node's configuration; the minimisers of node eliminations are recomputed
at that point (O(C) each) instead of being stored.

Costs may be +inf (a configuration excluded, e.g. by a memory limit); if
every assignment is infinite the search says so.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


class SearchError(ValueError):
    """No finite assignment exists, the inputs are malformed, or the graph
    left after the reductions is too wide for exact elimination."""


@dataclass
class SearchResult:
    cost: float
    choice: list            # configuration index per node
    stats: dict = field(default_factory=dict)


def _check(node_costs, edges):
    vecs = []
    for v, c in enumerate(node_costs):
        a = np.asarray(c, dtype=np.float64)
        if a.ndim != 1 or a.size == 0:
            raise SearchError(f"node {v}: cost vector must be 1-D and non-empty, got shape {a.shape}")
        if np.isnan(a).any():
            raise SearchError(f"node {v}: cost vector contains NaN")
        vecs.append(a.copy())
    es = []
    for k, (u, v, m) in enumerate(edges):
        u, v = int(u), int(v)
        if not (0 <= u < len(vecs) and 0 <= v < len(vecs)):
            raise SearchError(f"edge {k} ({u}, {v}) names a node outside 0..{len(vecs) - 1}")
        m = np.asarray(m, dtype=np.float64)
        if m.shape != (vecs[u].size, vecs[v].size):
            raise SearchError(f"edge {k} ({u}, {v}): cost matrix has shape {m.shape}, "
                              f"expected {(vecs[u].size, vecs[v].size)}")
        if np.isnan(m).any():
            raise SearchError(f"edge {k} ({u}, {v}): cost matrix contains NaN")
        es.append((u, v, m))
    return vecs, es


def assignment_cost(node_costs, edges, choice) -> float:
    """Total cost of one assignment."""
    t = sum(float(np.asarray(c)[choice[v]]) for v, c in enumerate(node_costs))
    for u, v, m in edges:
        t += float(np.asarray(m)[choice[u], choice[v]])
    return t


def brute_force(node_costs, edges, limit: int = 10_000_000):
    """Enumerate every assignment (for tests on small graphs): the total of
    every joint configuration is built by broadcasting, then minimised."""
    vecs, es = _check(node_costs, edges)
    shape = [v.size for v in vecs]
    if np.prod(shape, dtype=np.float64) > limit:
        raise SearchError(f"brute force over {np.prod(shape, dtype=np.float64):.3g} assignments "
                          f"exceeds the limit {limit}")
    n = len(vecs)
    total = np.zeros(shape)
    for v, a in enumerate(vecs):
        sh = [1] * n
        sh[v] = a.size
        total = total + a.reshape(sh)
    for u, v, m in es:
        if u == v:
            a = np.diagonal(m)
            sh = [1] * n
            sh[u] = a.size
            total = total + a.reshape(sh)
            continue
        sh = [1] * n
        sh[u], sh[v] = m.shape
        total = total + (m if u < v else m.T).reshape(sh)
    flat = int(np.argmin(total))
    choice = [int(i) for i in np.unravel_index(flat, shape)]
    return float(total.reshape(-1)[flat]), choice


def min_plus(A, vec, B, out=None):
    """M[a, c] = min_b (A[a, b] + vec[b] + B[b, c]), float64, vectorised one
    b at a time over the whole (a, c) table (fast and cache friendly)."""
    Ca, Cb = A.shape
    Cc = B.shape[1]
    Ap = A + vec[None, :]
    if Ca * Cb * Cc <= 200_000 or Cb > 8 * Ca * Cc:
        # small tables, or few (a, c) pairs and many b: one broadcast (chunked)
        step = max(1, 2_000_000 // max(1, Cb * Cc))
        out = np.empty((Ca, Cc)) if out is None else out
        for a0 in range(0, Ca, step):
            out[a0:a0 + step] = (Ap[a0:a0 + step, :, None] + B[None, :, :]).min(axis=1)
        return out
    Bc = np.ascontiguousarray(B)
    ApT = np.ascontiguousarray(Ap.T)
    out = np.empty((Ca, Cc)) if out is None else out
    np.add(ApT[0][:, None], Bc[0][None, :], out=out)
    tmp = np.empty_like(out)
    for b in range(1, Cb):
        np.add(ApT[b][:, None], Bc[b][None, :], out=tmp)
        np.minimum(out, tmp, out=out)
    return out


class _Graph:
    """Undirected multigraph of cost tables (edges keyed (a, b) with a < b,
    matrix oriented (C_a, C_b))."""

    def __init__(self, vecs, edges):
        self.vec = vecs
        self.E: dict[tuple, np.ndarray] = {}
        self.nbr = [set() for _ in vecs]
        self.merges = 0
        for u, v, m in edges:
            self.add(u, v, m)

    def add(self, u, v, m):
        if u == v:   # a self loop only depends on the diagonal
            self.vec[u] = self.vec[u] + np.diagonal(m)
            return
        if u > v:
            u, v, m = v, u, m.T
        key = (u, v)
        if key in self.E:
            self.E[key] = self.E[key] + m           # edge elimination
            self.merges += 1
        else:
            self.E[key] = m
            self.nbr[u].add(v)
            self.nbr[v].add(u)

    def get(self, u, v):
        return self.E[(u, v)] if u < v else self.E[(v, u)].T

    def remove(self, v):
        for u in list(self.nbr[v]):
            self.E.pop((min(u, v), max(u, v)))
            self.nbr[u].discard(v)
        self.nbr[v] = set()


def solve(node_costs, edges, max_table: int = 1 << 26) -> SearchResult:
    """The minimum of sum_v node_costs[v][c_v] + sum_(u,v) M[c_u, c_v] and an
    assignment achieving it.  ``max_table`` bounds the entries of any table
    variable elimination may build for a non-series-parallel remainder."""
    t0 = time.perf_counter()
    vecs, es = _check(node_costs, edges)
    n = len(vecs)
    G = _Graph(vecs, es)
    alive = set(range(n))
    log = []
    const = 0.0
    stats = {"nodes": n, "edges": len(es), "leaf": 0, "series": 0, "isolated": 0,
             "remaining": 0, "largest_table": 0}
    while alive:
        pick, best = None, None
        for v in alive:
            d = len(G.nbr[v])
            if d <= 1:
                pick = v
                break
            if d == 2:
                u, w = G.nbr[v]
                size = G.vec[u].size * G.vec[v].size * G.vec[w].size
                if best is None or size < best:
                    pick, best = v, size
        if pick is None:
            break
        v = pick
        d = len(G.nbr[v])
        vv = G.vec[v]
        if d == 0:
            const += float(vv.min())
            log.append(("isolated", v, vv))
            stats["isolated"] += 1
        elif d == 1:
            (u,) = G.nbr[v]
            M = G.get(u, v)
            G.vec[u] = G.vec[u] + (M + vv[None, :]).min(axis=1)
            log.append(("leaf", v, u, M, vv))
            stats["leaf"] += 1
        else:
            u, w = sorted(G.nbr[v])
            A, B = G.get(u, v), G.get(v, w)
            M = min_plus(A, vv, B)
            log.append(("series", v, u, w, A, vv, B))
            stats["series"] += 1
            G.remove(v)
            G.add(u, w, M)
            alive.discard(v)
            continue
        G.remove(v)
        alive.discard(v)

    # ---- exact variable elimination on the remainder ----------------------
    stats["remaining"] = len(alive)
    if alive:
        factors = [((v,), G.vec[v]) for v in alive]
        factors += [((a, b), m) for (a, b), m in G.E.items()]
        sizes = {v: G.vec[v].size for v in alive}
        while alive:
            # greedy: the variable whose elimination builds the smallest table
            def cost(v):
                scope = set()
                for s, _ in factors:
                    if v in s:
                        scope.update(s)
                return int(np.prod([sizes[x] for x in scope], dtype=np.float64)), scope
            v, (size, scope) = min(((v, cost(v)) for v in alive), key=lambda t: (t[1][0], t[0]))
            if size > max_table:
                raise SearchError(
                    f"the graph left after series-parallel reductions has {len(alive)} nodes of "
                    f"degree >= 3; exact elimination would build a table of {size:.3g} entries "
                    f"(limit {max_table:.3g}). Reduce the configurations per layer "
                    f"(fewer ranks, SpaceOptions) or raise max_table")
            stats["largest_table"] = max(stats["largest_table"], size)
            order = tuple(sorted(scope))
            shape = [sizes[x] for x in order]
            total = np.zeros(shape)
            keep = []
            for s, f in factors:
                if v in s:
                    # broadcast f (scope s) into the joint scope
                    axes = [order.index(x) for x in s]
                    perm = np.argsort(axes)
                    fa = np.transpose(f, perm)
                    sh = [1] * len(order)
                    for x in s:
                        sh[order.index(x)] = sizes[x]
                    total = total + fa.reshape(sh)
                else:
                    keep.append((s, f))
            ax = order.index(v)
            arg = np.argmin(total, axis=ax)
            new = np.take_along_axis(total, np.expand_dims(arg, ax), axis=ax).squeeze(ax)
            rest = tuple(x for x in order if x != v)
            log.append(("ve", v, rest, arg))
            if rest:
                keep.append((rest, new))
            else:
                const += float(new)
            factors = keep
            alive.discard(v)
        for s, f in factors:     # scalars left over (cannot happen, kept for safety)
            const += float(np.sum(f))

    # ---- undo ----------------------------------------------------------------
    choice = [None] * n
    for rec in reversed(log):
        kind, v = rec[0], rec[1]
        if kind == "isolated":
            choice[v] = int(np.argmin(rec[2]))
        elif kind == "leaf":
            _, _, u, M, vv = rec
            choice[v] = int(np.argmin(M[choice[u]] + vv))
        elif kind == "series":
            _, _, u, w, A, vv, B = rec
            choice[v] = int(np.argmin(A[choice[u]] + vv + B[:, choice[w]]))
        else:
            _, _, rest, arg = rec
            choice[v] = int(arg[tuple(choice[x] for x in rest)]) if rest else int(arg)
    if not np.isfinite(const):
        raise SearchError("no assignment has a finite cost: every strategy uses a configuration "
                          "that is excluded (for example by the memory limit)")
    cost = assignment_cost(node_costs, edges, choice)
    stats["merges"] = G.merges
    stats["seconds"] = time.perf_counter() - t0
    return SearchResult(cost, choice, stats)
