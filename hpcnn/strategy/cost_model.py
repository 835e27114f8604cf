"""The cost of one training iteration under a strategy, per layer and per
edge, for every configuration the search considers.

    t(S) = sum over layers of (t_c + t_s) + sum over edges of t_x

t_c  compute of the layer's largest tile, forward and backward, on one rank:
     the tile's time measured while every rank of a job of this size computes
     (the machine's runtime figures, ``hpcnn calibrate``), else its time
     measured alone, else a roofline (flops at an efficiency of the peak rate
     against bytes at an efficiency of the memory bandwidth, plus a fixed
     overhead per op), the last two times the slow-down of sharing the node
     (calibrated, or ranks per compute slot); plus the optimiser's update of
     the rank's parameter shard (memory bound).
t_s  synchronisation: an allreduce of the parameter gradients over each
     parameter's replica group (the ranks that differ only in n, h, w), and
     for batch normalisation the three small allreduces of its statistics.
     The runtime packs a group's gradients into buckets, so per layer the
     search charges the bandwidth term and the layer's share of a latency;
     pricing a whole plan (``evaluate``) follows the buckets exactly.
t_x  an edge's exchange, forward and (unless the producer is the input) its
     adjoint in backward (the same bytes back): the elements on the most
     loaded rank (exactly the ExchangePlan's max_rank_bytes / itemsize, see
     exchange_bytes.py) over the intra-node bandwidth, or, when the exchange
     crosses nodes, the elements through the busiest node port over the
     inter-node bandwidth, whichever is slower; plus a latency per message
     (the message count is an estimate from per-dimension peer counts).  With
     calibrated runtime figures (one node): their latency per exchange and
     bandwidth, plus assembling the consumer's input region from the pieces.
t_o  (whole plan, calibrated runtimes only) the executor's own time per layer
     and per step and the loss's reduction.
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
from dataclasses import dataclass

import numpy as np

from hpcnn.ops import clip_box
from hpcnn.parallel.exchange_plan import exchange_category
from hpcnn.parallel.layout import DIM_NAMES, Layout, split_bounds
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


def replica_groups(L: Layout) -> list:
    """The replica groups of a layout (``Layout.groups(('n', 'h', 'w'))``:
    ranks whose tiles differ only in n, h, w, each in the layout's rank
    order), computed at once from the grid coordinates."""
    key = np.zeros(L.k, dtype=np.int64)
    coords = np.unravel_index(np.arange(L.k), L.degrees)
    for a, name in enumerate(L.dims):
        if name not in ("n", "h", "w"):
            key = key * L.degrees[a] + coords[a]
    out = {}
    for i, kk in enumerate(key.tolist()):
        out.setdefault(kk, []).append(L.ranks[i])
    return sorted(tuple(v) for v in out.values())


def _channel_extent(L: Layout, rank: int) -> int:
    """Channels of ``rank``'s tile of layout ``L`` (1 for a 1-D tensor),
    without building every box of the layout."""
    if L.ndim < 2:
        return 1
    i = L.ranks.index(rank) if L.ranks != tuple(range(L.k)) else rank
    c = (i // int(np.prod(L.degrees[2:]))) % L.degrees[1]
    lo, hi = split_bounds(L.shape[1], L.degrees[1])[c]
    return hi - lo


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
    tile: np.ndarray | None = None    # the op tile's time alone (in t_c)
    skew: np.ndarray | None = None    # the per-layer skew (in t_c)

    def __add__(self, other):
        def add(a, b):
            return None if a is None or b is None else a + b
        return NodeCost(self.t_c + other.t_c, self.t_s + other.t_s, self.mem + other.mem,
                        self.measured & other.measured, add(self.tile, other.tile),
                        add(self.skew, other.skew))

    def row(self, i: int) -> "NodeCost":
        def cut(a):
            return None if a is None else a[i:i + 1]
        return NodeCost(self.t_c[i:i + 1], self.t_s[i:i + 1], self.mem[i:i + 1], self.measured[i:i + 1],
                        cut(self.tile), cut(self.skew))


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
    allreduce_bytes: float     # all ranks together, on the wire (ring)
    name: str = ""
    t_o: float = 0.0           # executor overheads per step (calibrated runtimes only)
    objective: float | None = None   # what the search minimises (per-layer sums)

    @property
    def total(self) -> float:
        return self.t_c + self.t_s + self.t_x + self.t_o

    def to_dict(self) -> dict:
        return {"name": self.name, "total_s": self.total, "t_c_s": self.t_c, "t_s_s": self.t_s,
                "t_x_s": self.t_x, "t_o_s": self.t_o, "objective_s": self.objective,
                "memory_bytes": self.memory, "exchange_bytes": self.exchange_bytes,
                "allreduce_bytes": self.allreduce_bytes, "layers": self.rows}


class CostModel:
    """Prices configurations of a graph at ``ranks`` ranks on ``machine``."""

    def __init__(self, graph, ranks: int, machine: Machine, dtype="float32",
                 opts: SpaceOptions | None = None, space: ConfigSpace | None = None,
                 bucket_bytes: float = 4 << 20):
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
        #: runtime figures calibrated for jobs of this size (None: links and roofline only)
        self.rt = machine.runtime_at(self.ranks)
        self._rt_ops = self.rt.ops if self.rt is not None else {}
        self.bucket_bytes = float(bucket_bytes)
        self._live = self._ancestors_of_loss()
        self.stats = {"edge_tables": 0, "edge_cache_hits": 0, "table_seconds": 0.0,
                      "node_seconds": 0.0}

    def _ancestors_of_loss(self) -> set:
        """Layers whose output reaches the loss: only their input gradients
        travel back (as in the runtime)."""
        g = self.graph
        try:
            loss = g.loss_name
        except Exception:
            return set(g.nodes)
        live, todo = set(), [loss]
        while todo:
            n = todo.pop()
            if n not in live:
                live.add(n)
                todo.extend(g[n].inputs)
        return live

    def directions(self, src: str, dst: str) -> int:
        """How often an edge's exchange runs per step: forward, and backward
        (its adjoint) unless the producer is the input or the consumer does
        not reach the loss."""
        return 1 + int(self.graph[src].kind != "input" and dst in self._live)

    # ---- collectives ---------------------------------------------------------
    def allreduce_parts(self, nbytes: float, group: int, link, share: float = 1.0):
        """(latency, bandwidth) seconds of one allreduce of ``nbytes`` over
        ``group`` ranks: the runtime figures calibrated for this job size
        when the machine has them, else the link model."""
        if group <= 1 or nbytes <= 0:
            return 0.0, 0.0
        rt = self.rt
        if rt is not None and rt.allreduce_latency:
            bw = rt.allreduce_bandwidth or link.bandwidth
            return rt.allreduce_alpha(group), 2.0 * (group - 1) / group * nbytes * share / bw
        full = allreduce_time(nbytes, group, link, share)
        lat = 2 * math.ceil(math.log2(group)) * link.latency
        return lat, full - lat

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
            tile, skew = np.zeros(C), np.zeros(C)
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
            # slow-down of a tile timed alone when every rank of the job computes
            factor = self.rt.compute_factor if self.rt is not None else m.oversubscription(self.ranks)
            t_c = t_c * factor
            if self._measured or self._rt_ops:
                nin_total = sum(nin)
                for row in range(C):
                    sh = shapes[row]
                    ins, pos = [], 0
                    for n_ in nin:
                        ins.append(tuple(int(x) for x in sh[pos:pos + n_]))
                        pos += n_
                    tk = tile_key(node, ins, tuple(int(x) for x in sh[nin_total:]), self.dtype)
                    if tk in self._rt_ops:           # timed with every rank computing
                        t_c[row] = float(self._rt_ops[tk])
                        measured[row] = True
                    elif tk in self._measured:       # timed alone
                        t_c[row] = float(self._measured[tk]) * factor
                        measured[row] = True
            if self.rt is not None:
                t_c = t_c * (1.0 + self.rt.tile_inflation)
            tile = t_c.copy()
            skew = np.zeros(C)
            if self.rt is not None:
                # the search prices the wait after every layer; evaluate()
                # after every stretch of compute that ends in a synchronisation
                skew = np.minimum(self.rt.skew * t_c, self.rt.skew_cap_s)
                t_c = t_c + skew
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
                    # gradients travel in buckets of up to bucket_bytes per
                    # replica group: a layer pays its share of a latency
                    lat, bw = self.allreduce_parts(shard[row] * isz, g, link, share)
                    ts = bw + lat * min(1.0, shard[row] * isz / self.bucket_bytes)
                if is_bn:
                    # batch-norm statistics: two allreduces forward, one backward
                    cs = -(-node.shape[1] // int(pc[row]))
                    ts += sum(self.allreduce_parts(cs * isz, g, link)) * 2 + \
                        sum(self.allreduce_parts(2 * cs * isz, g, link))
                t_s[row] = ts
        mem = (3 * shard + bshard + out_el + (in_el if with_inputs else 0)) * isz
        res = NodeCost(t_c, t_s, mem, measured, tile, skew)
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

    def exchange_seconds(self, tab: ExchangeTables, directions: int = 2,
                         region=None) -> np.ndarray:
        """Seconds of an edge's exchanges per step, for every pair of the
        tables: ``directions`` times (forward, and the adjoint backward) the
        busiest rank's bytes over the link plus latency; with runtime figures,
        the calibrated latency per exchange and bandwidth, plus assembling
        the consumer's input region (``region``: its bytes per consumer
        configuration) from the pieces."""
        m = self.machine
        b = tab.max_rank * self.itemsize
        rt = self.rt
        if rt is not None and rt.exchange is not None and m.nodes_for(self.ranks) <= 1:
            t = rt.exchange.latency + b / rt.exchange.bandwidth
            if region is not None and rt.copy_bandwidth:
                t = t + np.asarray(region, dtype=np.float64)[None, :] / rt.copy_bandwidth
            return directions * np.where(tab.max_rank > 0, t, 0.0)
        x = tab.node_inter * self.itemsize
        lat = np.where(x > 0, m.inter.latency, m.intra.latency)
        t = np.maximum(b / m.intra.bandwidth, x / m.inter.bandwidth) + tab.peers * lat
        return directions * np.where(tab.max_rank > 0, t, 0.0)

    def region_bytes(self, dst: str, i: int, B: np.ndarray) -> np.ndarray:
        """Bytes of input ``i``'s region that the representative tile of
        ``dst`` reads, per consumer configuration (rows of ``B``)."""
        node = self.graph[dst]
        B = np.asarray(B, dtype=np.int64).reshape(-1, len(node.shape))
        _, _, shapes = self._tile_arrays(dst, B)
        pos = sum(len(s) for s in node.in_shapes[:i])
        cols = shapes[:, pos:pos + len(node.in_shapes[i])]
        return np.prod(cols.astype(np.float64), axis=1) * self.itemsize

    def edge_cost(self, src, dst, i, A, B, want_total: bool = False) -> EdgeCost:
        tab = self.edge_tables(src, dst, i, A, B, want_total)
        region = None
        if self.rt is not None and self.rt.copy_bandwidth:
            region = self.region_bytes(dst, i, B)
        return EdgeCost(self.exchange_seconds(tab, self.directions(src, dst), region), tab)

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
    def _plan_layouts(self, plan) -> dict:
        return {n.name: plan.layout(self.graph, n.name) for n in self.graph}

    @staticmethod
    def _default_ranks(L: Layout) -> bool:
        return L.ranks == tuple(range(L.k))

    def _edge_exact(self, Ls: Layout, Ld: Layout, dst: str, i: int) -> ExchangeTables:
        """1 x 1 tables of one edge between layouts on any ranks, from the
        boxes (reference_exchange)."""
        node = self.graph[dst]
        R = self.machine.ranks_per_node
        ref = reference_exchange(Ls, Ld, node.op, i, node.in_shapes, R)
        nodes = set(ref["node_in"]) | set(ref["node_out"])
        ni = max((max(ref["node_in"].get(x, 0), ref["node_out"].get(x, 0)) for x in nodes), default=0)
        cnt = {}
        for s_, r_, _ in ref["pieces"]:
            cnt[s_] = cnt.get(s_, 0) + 1
            cnt[r_] = cnt.get(r_, 0) + 1
        P = self.ranks
        sent, recv = np.zeros((1, 1, P)), np.zeros((1, 1, P))
        for r_, v in ref["sent"].items():
            sent[0, 0, r_] = v
        for r_, v in ref["received"].items():
            recv[0, 0, r_] = v
        one = lambda v: np.array([[float(v)]])  # noqa: E731
        return ExchangeTables(one(ref["max_rank"]), one(ni), one(max(cnt.values(), default=0)),
                              one(ref["total"]), sent, recv)

    def gradient_sync(self, layouts: dict) -> tuple:
        """(seconds, payload bytes per rank) of the gradient allreduces of one
        step as the runtime performs them: per replica group (ranks holding
        the same channel slice of a layer), in the order layers first use the
        group, gradients packed into buckets of at most ``bucket_bytes``, one
        allreduce per bucket.  Seconds: the busiest rank's sum."""
        g, isz = self.graph, self.itemsize
        P = self.ranks
        per_rank_t = np.zeros(P)
        per_rank_b = np.zeros(P)
        members, order, link_of = {}, [], {}
        for n in g:
            L = layouts[n.name]
            if not (n.param_specs() or n.buffer_specs()):
                continue
            for grp in replica_groups(L):
                if len(grp) <= 1:
                    continue
                if grp not in members:
                    members[grp] = []
                    order.append(grp)
                    dims = DIM_NAMES[len(n.shape)]
                    link_of[grp] = self._group_link(tuple(L.degrees), dims)
                members[grp].append(n.name)
        for grp in order:
            sizes = []
            for name in members[grp]:
                n = g[name]
                if name not in self._live:
                    continue                # no gradient reaches it
                cc = _channel_extent(layouts[name], grp[0])
                for _, sp in sorted(n.param_specs().items()):
                    if sp.trainable:
                        sizes.append(cc * int(np.prod(sp.shape[1:])) * isz)
            buckets, cur = [], 0
            for b in sizes:
                if cur and cur + b > self.bucket_bytes:
                    buckets.append(cur)
                    cur = 0
                cur += b
            if cur:
                buckets.append(cur)
            link, share = link_of[grp]
            if self.machine.gradient_sync == "parameter_server":
                t = sum(parameter_server_time(b, len(grp), link) for b in buckets)
            else:
                t = sum(sum(self.allreduce_parts(b, len(grp), link, share)) for b in buckets)
            for r in grp:
                per_rank_t[r] += t
                per_rank_b[r] += sum(buckets)
        return float(per_rank_t.max(initial=0.0)), per_rank_b

    def stretch_skew(self, tiles, sync_in, sync_back, reduces) -> float:
        """The waits of a whole step (calibrated runtimes): the compute
        between two synchronisations is a stretch; after each the ranks wait
        for the slowest (``RuntimeFigures.wait_after``: min(skew * stretch,
        cap), with the figures of an exchange or of a reduction by what ends
        the stretch).  Forward, a stretch ends before a layer whose input
        exchange moves data and inside a batch norm that reduces its
        statistics; backward, after such a batch norm and before an adjoint
        exchange that moves data; the loss reduction ends the forward and
        the gradient reduction at the step's end the backward.  A layer's
        tile splits into forward and backward by their flops."""
        rt = self.rt
        if rt is None or (rt.skew <= 0 and not rt.exchange_skew):
            return 0.0
        out = 0.0
        order = [n for n in self.graph]
        fwd = {n.name: tiles.get(n.name, 0.0) / (1.0 + BACKWARD_FLOPS.get(n.kind, 1.0)) for n in order}
        seg = 0.0
        for n in order:
            if sync_in.get(n.name):
                out += rt.wait_after(seg, exchange=True)
                seg = 0.0
            seg += fwd[n.name]
            if reduces.get(n.name):
                out += rt.wait_after(seg, exchange=False)
                seg = 0.0
        out += rt.wait_after(seg, exchange=False)
        seg = 0.0
        for n in reversed(order):
            if n.name not in self._live:
                continue
            seg += tiles.get(n.name, 0.0) - fwd[n.name]
            if sync_back.get(n.name):
                out += rt.wait_after(seg, exchange=True)
                seg = 0.0
            elif reduces.get(n.name):
                out += rt.wait_after(seg, exchange=False)
                seg = 0.0
        out += rt.wait_after(seg, exchange=False)
        return float(out)

    def overheads(self) -> float:
        """Seconds per step the executor spends beyond ops, exchanges and
        synchronisation: its time per layer and per step, and the loss's
        reduction over all ranks (calibrated runtime figures; 0 without)."""
        rt = self.rt
        if rt is None:
            return 0.0
        layers = sum(1 for n in self.graph if n.kind != "input")
        t = rt.node_overhead_s * layers + rt.step_overhead_s
        if self.ranks > 1:
            t += sum(self.allreduce_parts(8, self.ranks, self.machine.intra))
        return float(t)

    def evaluate(self, plan, name: str | None = None) -> PlanCost:
        """Price any plan (inside the searched space or not, on any ranks),
        node by node.  ``rows`` and ``objective`` price every layer as the
        search does; ``total`` adds what only the whole plan determines: the
        runtime's gradient buckets (instead of a share of a latency per
        layer) and the executor's per-step overheads."""
        g = self.graph
        try:
            plan.validate(g, self.ranks)
            layouts = self._plan_layouts(plan)
        except Exception as exc:
            raise CostModelError(str(exc)) from None
        deg = {n.name: np.array([layouts[n.name].degrees]) for n in g}
        sp = self.space
        # where a layer's configuration is in the searched space, read the
        # search's (cached) tables instead of pricing it again
        where = {}
        for n in g:
            gi = sp.group_of[n.name]
            hit = np.nonzero((sp.configs[gi] == deg[n.name][0]).all(axis=1))[0]
            where[n.name] = (gi, int(hit[0]) if len(hit) else None)
        rows, tc, ts, tx, memt, xbytes, abytes = [], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
        bn_sync = 0.0
        # for the waits after stretches of compute: each layer's tile and
        # where the ranks synchronise (exchanges that move data, reductions)
        tiles, sync_in, sync_back, reduces, layer_skew = {}, {}, {}, {}, 0.0
        for n in g:
            d = deg[n.name]
            gi, ci = where[n.name]
            folded = (len(n.inputs) == 1 and gi == sp.group_of[n.inputs[0]]
                      and layouts[n.inputs[0]] == layouts[n.name])
            if ci is not None:
                full = self.node_cost(n.name, sp.configs[gi], with_inputs=not folded)
                nc = full.row(ci)
            else:
                nc = self.node_cost(n.name, d, with_inputs=not folded)
            ex_t, ex_b, ex_x = 0.0, 0.0, 0.0
            for i, src in enumerate(n.inputs):
                if folded:
                    continue            # same layout, elementwise: the identity exchange
                dirs = self.directions(src, n.name)
                if not (self._default_ranks(layouts[src]) and self._default_ranks(layouts[n.name])):
                    tab = self._edge_exact(layouts[src], layouts[n.name], n.name, i)
                    region = None
                    if self.rt is not None and self.rt.copy_bandwidth:
                        region = self.region_bytes(n.name, i, d)
                    ec = EdgeCost(self.exchange_seconds(tab, dirs, region), tab)
                    a, b = 0, 0
                else:
                    gs, cs = where[src]
                    if cs is not None and ci is not None and gs != gi:
                        ec = self.edge_cost(src, n.name, i, sp.configs[gs], sp.configs[gi], want_total=True)
                        a, b = cs, ci
                    else:
                        ec = self.edge_cost(src, n.name, i, deg[src], d, want_total=True)
                        a, b = 0, 0
                ex_t += float(ec.t_x[a, b])
                if ec.tables.max_rank[a, b] > 0:
                    sync_in[n.name] = True
                    sync_back[n.name] = sync_back.get(n.name, False) or dirs == 2
                ex_b += float(ec.tables.max_rank[a, b]) * self.itemsize
                ex_x += float(ec.tables.node_inter[a, b]) * self.itemsize
                xbytes += dirs * float(ec.tables.total[a, b]) * self.itemsize
            dims = DIM_NAMES[len(n.shape)]
            dd = tuple(int(x) for x in d[0])
            pc = dd[dims.index("c")] if "c" in dims else 1
            k = int(np.prod(dd))
            shard = sum(-(-s.shape[0] // pc) * int(np.prod(s.shape[1:]))
                        for s in n.param_specs().values() if s.trainable)
            grp = k // pc
            tiles[n.name] = float(nc.tile[0]) if nc.tile is not None else 0.0
            layer_skew += float(nc.skew[0]) if nc.skew is not None else 0.0
            reduces[n.name] = n.kind == "batchnorm" and grp > 1
            if grp > 1:
                moved = grp if self.machine.gradient_sync == "parameter_server" else grp - 1
                abytes += 2.0 * moved * shard * self.itemsize * pc
                if n.kind == "batchnorm":
                    link, _ = self._group_link(dd, dims)
                    cs = -(-n.shape[1] // pc)
                    bn_sync += 2 * sum(self.allreduce_parts(cs * self.itemsize, grp, link)) + \
                        sum(self.allreduce_parts(2 * cs * self.itemsize, grp, link))
            row = {"node": n.name, "op": n.kind, "config": {a: int(b) for a, b in zip(dims, dd)},
                   "ranks": k, "t_c": float(nc.t_c[0]), "t_s": float(nc.t_s[0]), "t_x": ex_t,
                   "memory": float(nc.mem[0]), "exchange_max_rank_bytes": ex_b,
                   "exchange_node_bytes": ex_x, "measured": bool(nc.measured[0]),
                   "folded": bool(folded)}
            if plan.ranks.get(n.name) is not None:
                row["rank_list"] = list(layouts[n.name].ranks)
            rows.append(row)
            tc += row["t_c"]
            ts += row["t_s"]
            tx += ex_t
            memt += row["memory"]
        objective = tc + ts + tx
        grad_sync, _ = self.gradient_sync(layouts)
        tc += self.stretch_skew(tiles, sync_in, sync_back, reduces) - layer_skew
        return PlanCost(rows, tc, grad_sync + bn_sync, tx, memt, xbytes, abytes, name or plan.name,
                        t_o=self.overheads(), objective=objective)

    # ---- the bytes the runtime counts ------------------------------------------------
    def rank_bytes(self, plan) -> list:
        """Per rank, the bytes the runtime's counter records in one training
        step (``DistributedModel.step_bytes()`` and ``edge_bytes()``): for
        every exchange edge ``'producer->consumer[i]'`` the bytes the rank
        sends forward and, backward, sends back (what it received forward);
        per category ('halo' when producer and consumer share a layout, else
        'redistribution'), 'allreduce' (gradient buckets handed to MPI: the
        rank's gradient shards of layers it shares with other replicas),
        'batchnorm' (statistics: two reductions forward, one of twice the
        size backward) and 'scalars' (the loss: one float64).

        Exchanges come from the fast tables (per rank, ranks 0..k-1) or, for
        layers placed on explicit ranks, from the layouts' boxes; never from
        the runtime's ExchangePlan, so that comparing the two checks both."""
        g, isz, P = self.graph, self.itemsize, self.ranks
        try:
            plan.validate(g, P)
            layouts = self._plan_layouts(plan)
        except Exception as exc:
            raise CostModelError(str(exc)) from None
        out = [{"edges": {}, "halo": 0, "redistribution": 0, "allreduce": 0, "batchnorm": 0,
                "scalars": 8} for _ in range(P)]
        for n in g:
            Ld = layouts[n.name]
            for i, src in enumerate(n.inputs):
                Ls = layouts[src]
                geom = self.geometry(n.name).inputs[i]
                if geom is not None and self._default_ranks(Ls) and self._default_ranks(Ld):
                    tab = exchange_tables(geom, np.array([Ls.degrees]), np.array([Ld.degrees]), P,
                                          self.machine.ranks_per_node, per_rank=True)
                else:
                    tab = self._edge_exact(Ls, Ld, n.name, i)
                back = self.directions(src, n.name) == 2
                cat = exchange_category(Ls, Ld)
                key = f"{src}->{n.name}[{i}]"
                for r in range(tab.sent.shape[2]):
                    fwd = int(tab.sent[0, 0, r]) * isz
                    bwd = int(tab.received[0, 0, r]) * isz if back else 0
                    if fwd or bwd:
                        out[r]["edges"][key] = {"forward": fwd, "backward": bwd}
                        out[r][cat] += fwd + bwd
        _, grad = self.gradient_sync(layouts)
        for r in range(P):
            out[r]["allreduce"] = int(grad[r])
        for n in g:
            if n.kind != "batchnorm" or n.name not in self._live:
                continue
            L = layouts[n.name]
            size = {r: len(grp) for grp in replica_groups(L) for r in grp}
            for r in L.ranks:
                if size[r] > 1:
                    box = L.box(r)
                    cc = (box[1][1] - box[1][0]) if len(box) > 1 else 1
                    out[r]["batchnorm"] += 4 * cc * isz
        return out
