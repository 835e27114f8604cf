"""The cost of one training iteration under a strategy, per layer and per
edge, for every configuration the search considers.

    t(S) = sum over layers of (t_c + t_s) + sum over edges of t_x

t_c  compute of the layer's largest tile, forward and backward, on one rank:
     the machine's measured table when it has this op at this tile shape
     (``hpcnn calibrate``), else a roofline (flops at an efficiency of the
     peak rate against bytes at an efficiency of the memory bandwidth, plus a
     fixed overhead per op), times the node's oversubscription (more ranks
     than compute slots); plus the optimiser's update of the rank's parameter
     shard (memory bound).
t_s  synchronisation: an allreduce of the parameter gradients over each
     parameter's replica group (the ranks that differ only in n, h, w), and
     for batch normalisation the three small allreduces of its statistics.
t_x  an edge's exchange, forward and its adjoint in backward (the same bytes
     back): the elements on the most loaded rank (exactly the ExchangePlan's
     max_rank_bytes / itemsize, see exchange_bytes.py) over the intra-node
     bandwidth, or, when the exchange crosses nodes, the elements through the
     busiest node port over the inter-node bandwidth, whichever is slower;
     plus a latency per message (the message count is an estimate from
     per-dimension peer counts).
mem  bytes one rank holds for the layer: parameter, gradient and momentum
     shards, buffers, the output tile kept for backward, and the assembled
     input region of every input that arrives over an exchange.  The per-layer
     figure is the largest over ranks, so the plan's sum is an upper bound on
     any rank's total.

Stated assumptions (the paper's, plus ours): layer times are stable and do not
depend on the data; the sum ignores overlap of communication with compute and
between branches; moving s bytes costs s / bandwidth + latency per message.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import numpy as np

from hpcnn.ops import clip_box
from hpcnn.parallel.layout import DIM_NAMES, Layout, degrees_from_config, split_bounds
from hpcnn.strategy.config_space import ConfigSpace, SpaceOptions
from hpcnn.strategy.exchange_bytes import (ExchangeTables, InputGeometry, NotSeparable,
                                           exchange_tables, reference_exchange)
from hpcnn.strategy.machine import Machine, allreduce_time, parameter_server_time

ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2}

#: backward flops relative to forward (conv and fully connected layers compute
#: the input gradient and the weight gradient, each as costly as the forward)
BACKWARD_FLOPS = {"conv2d": 2.0, "linear": 2.0}


class CostModelError(ValueError):
    """A graph, plan or machine the cost model cannot price."""


def _dtype_name(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in ITEMSIZE:
        raise CostModelError(f"dtype {name!r} is not supported; use float32 or float64")
    return name


def tile_key(node, in_tiles, out_tile, dtype: str) -> str:
    """Key of an op at one tile shape in a machine's measured table."""
    return json.dumps([node.kind, node.op.attrs(), [list(s) for s in in_tiles], list(out_tile), dtype],
                      sort_keys=True, separators=(",", ":"))


class NodeGeometry:
    """Geometry of every input of a node, and its representative tile for a
    configuration: per output dimension the chunk whose input region is the
    largest (then whose output is the largest), so that halos are counted."""

    def __init__(self, node):
        self.node = node
        self.out = tuple(node.shape)
        self.inputs = []
        for i in range(len(node.inputs)):
            try:
                self.inputs.append(InputGeometry(node.op, i, node.in_shapes, node.shape))
            except NotSeparable:
                self.inputs.append(None)
        self._chunk = {}

    @property
    def separable(self) -> bool:
        return all(g is not None for g in self.inputs)

    def chunk(self, d: int, D: int) -> int:
        key = (d, D)
        if key not in self._chunk:
            bounds = split_bounds(self.out[d], D)
            score = [[0, hi - lo] for lo, hi in bounds]
            for g in self.inputs:
                if g is None:
                    continue
                for e, dd in enumerate(g.dep):
                    if dd == d:
                        lo, hi = g.need(e, D)
                        for jj in range(D):
                            score[jj][0] += int(hi[jj] - lo[jj])
            self._chunk[key] = max(range(D), key=lambda jj: (score[jj], -jj))
        return self._chunk[key]

    def tile(self, degrees):
        """(input tile shapes, output tile shape, output box) of the
        representative tile under ``degrees``."""
        degrees = tuple(int(x) for x in degrees)
        chunks = [self.chunk(d, D) for d, D in enumerate(degrees)]
        obox = tuple(split_bounds(s, D)[c] for s, D, c in zip(self.out, degrees, chunks))
        out_tile = tuple(hi - lo for lo, hi in obox)
        in_tiles = []
        for i, g in enumerate(self.inputs):
            shape = self.node.in_shapes[i]
            if g is None:
                ib = clip_box(self.node.op.input_box(i, obox, self.node.in_shapes), shape)
                in_tiles.append(tuple(hi - lo for lo, hi in ib))
                continue
            t = []
            for e, dd in enumerate(g.dep):
                if dd is None:
                    lo, hi = g.need(e, 1)
                    t.append(int(hi[0] - lo[0]))
                else:
                    lo, hi = g.need(e, degrees[dd])
                    t.append(int(hi[chunks[dd]] - lo[chunks[dd]]))
            in_tiles.append(tuple(t))
        return in_tiles, out_tile, obox


@dataclass
class NodeCost:
    t_c: np.ndarray
    t_s: np.ndarray
    mem: np.ndarray
    measured: np.ndarray      # bool: t_c from the measured table

    def __add__(self, other):
        return NodeCost(self.t_c + other.t_c, self.t_s + other.t_s, self.mem + other.mem,
                        self.measured & other.measured)


@dataclass
class EdgeCost:
    t_x: np.ndarray
    tables: ExchangeTables


@dataclass
class PlanCost:
    """The predicted iteration of one plan, per node and in total."""
    rows: list                 # one dict per node
    t_c: float
    t_s: float
    t_x: float
    memory: float              # bytes per rank (upper bound)
    exchange_bytes: float      # all ranks together, forward + backward
    allreduce_bytes: float     # all ranks together
    name: str = ""

    @property
    def total(self) -> float:
        return self.t_c + self.t_s + self.t_x

    def to_dict(self) -> dict:
        return {"name": self.name, "total_s": self.total, "t_c_s": self.t_c, "t_s_s": self.t_s,
                "t_x_s": self.t_x, "memory_bytes": self.memory, "exchange_bytes": self.exchange_bytes,
                "allreduce_bytes": self.allreduce_bytes, "layers": self.rows}


class CostModel:
    """Prices configurations of a graph at ``ranks`` ranks on ``machine``."""

    def __init__(self, graph, ranks: int, machine: Machine, dtype="float32",
                 opts: SpaceOptions | None = None, space: ConfigSpace | None = None):
        self.graph = graph
        self.ranks = int(ranks)
        self.machine = machine
        self.dtype = _dtype_name(dtype)
        self.itemsize = ITEMSIZE[self.dtype]
        self.space = space or ConfigSpace(graph, self.ranks, opts)
        self._geom: dict[str, NodeGeometry] = {}
        self._edge_cache: dict = {}
        self._node_cache: dict = {}
        self._link_cache: dict = {}
        meas = machine.measured or {}
        self._measured = meas.get("ops", {}) if meas.get("dtype", self.dtype) == self.dtype else {}
        self.stats = {"edge_tables": 0, "edge_cache_hits": 0, "table_seconds": 0.0,
                      "node_seconds": 0.0}

    # ---- geometry ------------------------------------------------------------
    def geometry(self, name: str) -> NodeGeometry:
        if name not in self._geom:
            self._geom[name] = NodeGeometry(self.graph[name])
        return self._geom[name]

    # ---- per-node costs ------------------------------------------------------
    def _link_for_group(self, deg: tuple, dims: tuple):
        """(link, share) of the allreduce over a replica group (ranks that
        differ only in n, h, w): inter-node when some group spans nodes."""
        m = self.machine
        R = m.ranks_per_node
        k = int(np.prod(deg))
        if k <= R:
            return m.intra, 1.0
        if "c" not in dims:
            return m.inter, 1.0
        ci = dims.index("c")
        pc = deg[ci]
        inner = int(np.prod(deg[ci + 1:]))
        spans = False
        for ic in range(pc):
            coords_max = [D - 1 for D in deg]
            coords_max[ci] = ic
            hi = int(np.ravel_multi_index(coords_max, deg))
            lo = ic * inner
            if lo // R != hi // R:
                spans = True
                break
        if not spans:
            return m.intra, 1.0
        share = min(pc, -(-min(R, k) // inner))
        return m.inter, float(max(1, share))

    def _signature(self, node) -> tuple:
        return (node.kind, json.dumps(node.op.attrs(), sort_keys=True),
                tuple(tuple(x) for x in node.in_shapes), tuple(node.shape))

    def _tile_arrays(self, name: str, configs: np.ndarray):
        """Per configuration: output tile elements, input tile elements (all
        inputs), and the tile shapes (as an int matrix, one row each)."""
        node = self.graph[name]
        geom = self.geometry(name)
        C, nd = configs.shape
        if not geom.separable:
            tiles = [geom.tile(row) for row in configs]
            out_el = np.array([math.prod(t[1]) for t in tiles], dtype=np.float64)
            in_el = np.array([sum(math.prod(s) for s in t[0]) for t in tiles], dtype=np.float64)
            shapes = np.array([sum((list(s) for s in t[0]), []) + list(t[1]) for t in tiles],
                              dtype=np.int64).reshape(C, -1)
            return out_el, in_el, shapes
        cols_out, cols_in = [], [[None] * len(g.T) for g in geom.inputs]
        for d in range(nd):
            Dv, inv = np.unique(configs[:, d], return_inverse=True)
            outlen = np.zeros(len(Dv), dtype=np.int64)
            inlen = {(i, e): np.zeros(len(Dv), dtype=np.int64)
                     for i, g in enumerate(geom.inputs) for e, dd in enumerate(g.dep) if dd == d}
            for x, D in enumerate(Dv):
                jj = geom.chunk(d, int(D))
                lo, hi = split_bounds(node.shape[d], int(D))[jj]
                outlen[x] = hi - lo
                for (i, e) in inlen:
                    nlo, nhi = geom.inputs[i].need(e, int(D))
                    inlen[(i, e)][x] = nhi[jj] - nlo[jj]
            cols_out.append(outlen[inv])
            for (i, e), v in inlen.items():
                cols_in[i][e] = v[inv]
        for i, g in enumerate(geom.inputs):
            for e, dd in enumerate(g.dep):
                if dd is None:
                    lo, hi = g.need(e, 1)
                    cols_in[i][e] = np.full(C, int(hi[0] - lo[0]), dtype=np.int64)
        out_el = np.prod(np.stack(cols_out, axis=1), axis=1).astype(np.float64)
        in_el = np.zeros(C)
        flat = []
        for i in range(len(geom.inputs)):
            arr = np.stack(cols_in[i], axis=1)
            in_el += np.prod(arr.astype(np.float64), axis=1)
            flat.append(arr)
        shapes = np.concatenate(flat + [np.stack(cols_out, axis=1)], axis=1)
        return out_el, in_el, shapes

    def _group_link(self, deg: tuple, dims: tuple):
        key = (deg, dims)
        if key not in self._link_cache:
            self._link_cache[key] = self._link_for_group(deg, dims)
        return self._link_cache[key]

    def node_cost(self, name: str, configs: np.ndarray, with_inputs: bool = True) -> NodeCost:
        """t_c, t_s and memory of node ``name`` for each configuration row."""
        t0 = time.perf_counter()
        node = self.graph[name]
        configs = np.asarray(configs, dtype=np.int64).reshape(-1, len(node.shape))
        key = (self._signature(node), configs.tobytes(), configs.shape, with_inputs)
        if key in self._node_cache:
            return self._node_cache[key]
        m, isz = self.machine, self.itemsize
        dims = DIM_NAMES[len(node.shape)]
        specs = node.param_specs()
        bufs = node.buffer_specs()
        C = len(configs)
        pc = configs[:, dims.index("c")] if "c" in dims else np.ones(C, dtype=np.int64)
        k = configs.prod(axis=1)
        grp = k // pc
        shard = np.zeros(C)
        bshard = np.zeros(C)
        for sp in specs.values():
            rows = -(-sp.shape[0] // pc) * int(np.prod(sp.shape[1:]))
            if sp.trainable:
                shard += rows
        for sp in bufs.values():
            bshard += -(-sp.shape[0] // pc) * int(np.prod(sp.shape[1:]))
        out_el, in_el, shapes = self._tile_arrays(name, configs)
        measured = np.zeros(C, dtype=bool)
        if node.kind == "input":
            t_c = np.zeros(C)
        else:
            # flops of each distinct tile (the op's own formula)
            uniq, inv = np.unique(shapes, axis=0, return_inverse=True)
            nin = [len(s) for s in node.in_shapes]
            ff = np.zeros(len(uniq))
            for u, row in enumerate(uniq):
                ins, pos = [], 0
                for n_ in nin:
                    ins.append(tuple(int(x) for x in row[pos:pos + n_]))
                    pos += n_
                ff[u] = float(node.op.flops(ins, tuple(int(x) for x in row[pos:])))
            flops = ff[inv.reshape(-1)] * (1.0 + BACKWARD_FLOPS.get(node.kind, 1.0))
            nbytes = 3.0 * (in_el + out_el + shard) * isz
            eff = m.efficiency(node.kind)
            t_f = flops / (m.peak_flops * eff)
            t_m = nbytes / (m.memory_bandwidth * float(m.device.get("memory_efficiency", 1.0)))
            t_c = np.maximum(t_f, t_m) + float(m.device.get("op_overhead_s", 0.0))
            if self._measured:
                nin_total = sum(nin)
                for row in range(C):
                    sh = shapes[row]
                    ins, pos = [], 0
                    for n_ in nin:
                        ins.append(tuple(int(x) for x in sh[pos:pos + n_]))
                        pos += n_
                    tk = tile_key(node, ins, tuple(int(x) for x in sh[nin_total:]), self.dtype)
                    if tk in self._measured:
                        t_c[row] = float(self._measured[tk])
                        measured[row] = True
            t_c = t_c * m.oversubscription(self.ranks)
            mem_eff = m.memory_bandwidth * float(m.device.get("memory_efficiency", 1.0))
            t_c = t_c + 5.0 * shard * isz / mem_eff
        t_s = np.zeros(C)
        is_bn = node.kind == "batchnorm"
        if shard.any() or is_bn:
            for row in range(C):
                g = int(grp[row])
                if g <= 1:
                    continue
                link, share = self._group_link(tuple(int(x) for x in configs[row]), dims)
                if not shard[row]:
                    ts = 0.0
                elif m.gradient_sync == "parameter_server":
                    ts = parameter_server_time(shard[row] * isz, g, link)
                else:
                    ts = allreduce_time(shard[row] * isz, g, link, share)
                if is_bn:
                    cs = -(-node.shape[1] // int(pc[row]))
                    ts += 2 * allreduce_time(cs * isz, g, link) + allreduce_time(2 * cs * isz, g, link)
                t_s[row] = ts
        mem = (3 * shard + bshard + out_el + (in_el if with_inputs else 0)) * isz
        res = NodeCost(t_c, t_s, mem, measured)
        self._node_cache[key] = res
        self.stats["node_seconds"] += time.perf_counter() - t0
        return res

    def group_cost(self, gi: int) -> NodeCost:
        g = self.space.groups[gi]
        cf = self.space.configs[gi]
        tot = None
        for j, mname in enumerate(g.members):
            c = self.node_cost(mname, cf, with_inputs=(j == 0))
            tot = c if tot is None else tot + c
        return tot

    # ---- per-edge costs ------------------------------------------------------
    def edge_tables(self, src: str, dst: str, i: int, A: np.ndarray, B: np.ndarray,
                    want_total: bool = False) -> ExchangeTables:
        node = self.graph[dst]
        A = np.asarray(A, dtype=np.int64)
        B = np.asarray(B, dtype=np.int64)
        key = (self._signature(node), i, A.tobytes(), A.shape, B.tobytes(), B.shape, want_total)
        if key in self._edge_cache:
            self.stats["edge_cache_hits"] += 1
            return self._edge_cache[key]
        t0 = time.perf_counter()
        geom = self.geometry(dst).inputs[i]
        if geom is not None:
            tab = exchange_tables(geom, A, B, self.ranks, self.machine.ranks_per_node,
                                  want_total=want_total)
        else:
            tab = self._slow_tables(src, dst, i, A, B)
        self._edge_cache[key] = tab
        self.stats["edge_tables"] += 1
        self.stats["table_seconds"] += time.perf_counter() - t0
        return tab

    def _slow_tables(self, src, dst, i, A, B) -> ExchangeTables:
        """Box-by-box tables for ops whose geometry is not separable."""
        node = self.graph[dst]
        T = node.in_shapes[i]
        R = self.machine.ranks_per_node
        Ci, Cj = len(A), len(B)
        mr, ni, tot = np.zeros((Ci, Cj)), np.zeros((Ci, Cj)), np.zeros((Ci, Cj))
        peers = np.zeros((Ci, Cj))
        for a in range(Ci):
            for b in range(Cj):
                ref = reference_exchange(Layout(T, A[a]), Layout(node.shape, B[b]), node.op, i,
                                         node.in_shapes, R)
                mr[a, b] = ref["max_rank"]
                tot[a, b] = ref["total"]
                nodes = set(ref["node_in"]) | set(ref["node_out"])
                ni[a, b] = max((max(ref["node_in"].get(x, 0), ref["node_out"].get(x, 0)) for x in nodes),
                               default=0)
                cnt = {}
                for s, r, _ in ref["pieces"]:
                    cnt[s] = cnt.get(s, 0) + 1
                    cnt[r] = cnt.get(r, 0) + 1
                peers[a, b] = max(cnt.values(), default=0)
        return ExchangeTables(mr, ni, peers, tot)

    def exchange_seconds(self, tab: ExchangeTables) -> np.ndarray:
        m = self.machine
        b = tab.max_rank * self.itemsize
        x = tab.node_inter * self.itemsize
        lat = np.where(x > 0, m.inter.latency, m.intra.latency)
        t = np.maximum(b / m.intra.bandwidth, x / m.inter.bandwidth) + tab.peers * lat
        return 2.0 * np.where(tab.max_rank > 0, t, 0.0)

    def edge_cost(self, src, dst, i, A, B, want_total: bool = False) -> EdgeCost:
        tab = self.edge_tables(src, dst, i, A, B, want_total)
        return EdgeCost(self.exchange_seconds(tab), tab)

    # ---- the search problem -------------------------------------------------
    def problem(self):
        """Node cost vectors (t_c + t_s per group configuration), edge tables
        (t_x per configuration pair) and the per-group costs."""
        sp = self.space
        groups = [self.group_cost(g.index) for g in sp.groups]
        vecs = [gc.t_c + gc.t_s for gc in groups]
        edges = []
        for gs, gd, src, dst, i in sp.edges():
            ec = self.edge_cost(src, dst, i, sp.configs[gs], sp.configs[gd], want_total=True)
            edges.append((gs, gd, ec.t_x))
        return vecs, edges, groups

    # ---- pricing a plan ------------------------------------------------------
    def evaluate(self, plan, name: str | None = None) -> PlanCost:
        """Price any plan (inside the searched space or not), node by node."""
        g = self.graph
        try:
            plan.validate(g, self.ranks)
        except Exception as exc:
            raise CostModelError(str(exc)) from None
        deg = {n.name: np.array([degrees_from_config(n.shape, plan.config(n.name))]) for n in g}
        sp = self.space
        # where a layer's configuration is in the searched space, read the
        # search's (cached) tables instead of pricing it again
        where = {}
        for n in g:
            gi = sp.group_of[n.name]
            hit = np.nonzero((sp.configs[gi] == deg[n.name][0]).all(axis=1))[0]
            where[n.name] = (gi, int(hit[0]) if len(hit) else None)
        rows, tc, ts, tx, memt, xbytes, abytes = [], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
        for n in g:
            d = deg[n.name]
            gi, ci = where[n.name]
            folded = (len(n.inputs) == 1 and gi == sp.group_of[n.inputs[0]]
                      and np.array_equal(deg[n.inputs[0]], d))
            if ci is not None:
                full = self.node_cost(n.name, sp.configs[gi], with_inputs=not folded)
                nc = NodeCost(full.t_c[ci:ci + 1], full.t_s[ci:ci + 1], full.mem[ci:ci + 1],
                              full.measured[ci:ci + 1])
            else:
                nc = self.node_cost(n.name, d, with_inputs=not folded)
            ex_t, ex_b, ex_x = 0.0, 0.0, 0.0
            for i, src in enumerate(n.inputs):
                if folded:
                    continue            # same layout, elementwise: the identity exchange
                gs, cs = where[src]
                if cs is not None and ci is not None and gs != gi:
                    ec = self.edge_cost(src, n.name, i, sp.configs[gs], sp.configs[gi], want_total=True)
                    a, b = cs, ci
                else:
                    ec = self.edge_cost(src, n.name, i, deg[src], d, want_total=True)
                    a, b = 0, 0
                ex_t += float(ec.t_x[a, b])
                ex_b += float(ec.tables.max_rank[a, b]) * self.itemsize
                ex_x += float(ec.tables.node_inter[a, b]) * self.itemsize
                xbytes += 2.0 * float(ec.tables.total[a, b]) * self.itemsize
            dims = DIM_NAMES[len(n.shape)]
            dd = tuple(int(x) for x in d[0])
            pc = dd[dims.index("c")] if "c" in dims else 1
            k = int(np.prod(dd))
            shard = sum(-(-s.shape[0] // pc) * int(np.prod(s.shape[1:]))
                        for s in n.param_specs().values() if s.trainable)
            grp = k // pc
            if grp > 1:
                moved = grp if self.machine.gradient_sync == "parameter_server" else grp - 1
                abytes += 2.0 * moved * shard * self.itemsize * pc
            row = {"node": n.name, "op": n.kind, "config": {a: int(b) for a, b in zip(dims, dd)},
                   "ranks": k, "t_c": float(nc.t_c[0]), "t_s": float(nc.t_s[0]), "t_x": ex_t,
                   "memory": float(nc.mem[0]), "exchange_max_rank_bytes": ex_b,
                   "exchange_node_bytes": ex_x, "measured": bool(nc.measured[0]),
                   "folded": bool(folded)}
            rows.append(row)
            tc += row["t_c"]
            ts += row["t_s"]
            tx += ex_t
            memt += row["memory"]
        return PlanCost(rows, tc, ts, tx, memt, xbytes, abytes, name or plan.name)
