"""The paper's cost model: what one training iteration costs per layer and
per edge, for every configuration the search considers.

    t(S) = sum over layers of (t_c + t_s) + sum over edges of t_x

t_c  compute of the layer's representative tile (``tile_geometry``),
     forward and backward, on one rank: the tile's time measured while every
     rank of a job of this size computes (the machine's runtime figures,
     ``hpcnn calibrate``), else its time measured alone, else a roofline
     (flops at an efficiency of the peak rate against bytes at an efficiency
     of the memory bandwidth, plus a fixed overhead per op), the last two
     times the slow-down of sharing the node; plus the optimiser's update of
     the rank's parameter shard (memory bound).
t_s  synchronisation over the layer's replica group (``Layout``'s
     REPLICA_DIMS): an allreduce of the parameter gradients, and the sums
     the op itself asks for (``Op.tile_reductions``: batch-norm statistics).
     The runtime packs a group's gradients into buckets, so per layer the
     search charges the bandwidth term and the layer's share of a latency.
t_x  an edge's exchange, forward and (unless the producer is the input) its
     adjoint in backward: the elements of the rank that moves most over the
     intra-node bandwidth or, across nodes, those through the busiest node
     port over the inter-node bandwidth, whichever is slower, plus a latency
     per message of the rank that handles most messages.  Elements and
     messages are ``hpcnn.parallel.exchange_counts``: the same per-axis
     overlaps ``ExchangePlan`` is built from, equal to the runtime's
     counters.  With calibrated runtime figures: their latency per
     exchange and bandwidth (inside a node), plus assembling the
     consumer's region (not for a convolution that convolves its region
     part by part, ``Op.convolves_pieces``: any but a window larger than
     1x1 over split input channels); across nodes, the busiest port at the
     inter-node rate if that is slower, and the link's latency per message.
     Overlap (``CostModel.overlap``, on with runtime figures): the bytes of
     such an edge travel while the convolution computes its own part, so
     per direction t_x = fixed + max(0, transfer - hidden), hidden = the
     share of its region the rank holds itself times the tile's forward
     (or backward) time.
mem  bytes one rank holds for the layer: parameter, gradient and momentum
     shards, buffers, the output tile kept for backward, and the assembled
     input region of every input that arrives over an exchange.

Pricing a whole plan -- the runtime's gradient buckets, the waits after
stretches of compute, the executor's overheads -- is ``plan_pricing``.

Stated assumptions (the paper's, plus ours): layer times are stable and do
not depend on the data; the sum ignores overlap of communication with
compute (except a convolution's own exchanges behind its own compute, with
runtime figures) and between branches; moving s bytes costs s / bandwidth
plus a latency per message.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from hpcnn.parallel.exchange_counts import ExchangeTables, exchange_tables, rank_counts, tables_key
from hpcnn.parallel.layout import DIM_NAMES, Layout
from hpcnn.strategy.config_space import ConfigSpace, SpaceOptions
from hpcnn.strategy.machine import Machine, allreduce_time, parameter_server_time
from hpcnn.strategy.tile_geometry import NodeGeometry, NotSeparable, inputs_from_input, tile_key

ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2}

#: below this much work (pairs of configurations times ranks, summed over
#: the distinct edges) the tables are built in this process: starting
#: worker processes costs about a second
PARALLEL_WORK = 2e8

#: backward flops relative to forward (conv and fully connected layers compute
#: the input gradient and the weight gradient, each as costly as the forward)
BACKWARD_FLOPS = {"conv2d": 2.0, "conv3d": 2.0, "linear": 2.0}


#: per table of measured tiles (its id), the tiles by everything but their
#: sample count (``sample_index``); a few tables at a time
_SAMPLE_INDEX: dict = {}


def _blank_samples(key: str):
    """(the key with every tile's sample count blanked, the sample count),
    or None when the tiles do not all lead with the same sample count."""
    kind, attrs, ins, out, dtype, *rest = json.loads(key)
    if not out or any(not s or s[0] != out[0] for s in ins):
        return None
    blank = [kind, attrs, [[None] + list(s[1:]) for s in ins], [None] + list(out[1:]), dtype, *rest]
    return json.dumps(blank, sort_keys=True, separators=(",", ":")), int(out[0])


def sample_index(ops: dict) -> dict:
    """{key with the sample counts blanked: [(samples, seconds)]} of a table
    of measured tiles ({tile_key: seconds}); cached per table."""
    hit = _SAMPLE_INDEX.get(id(ops))
    if hit is not None and hit[0] is ops and hit[1] == len(ops):
        return hit[2]
    index: dict = {}
    for key, t in ops.items():
        b = _blank_samples(key)
        if b is not None and b[1] > 0:
            index.setdefault(b[0], []).append((b[1], float(t)))
    if len(_SAMPLE_INDEX) >= 16:
        _SAMPLE_INDEX.clear()
    _SAMPLE_INDEX[id(ops)] = (ops, len(ops), index)
    return index


def scaled_tile(ops: dict, key: str, overhead: float) -> float | None:
    """Seconds of the tile ``key`` from a measured tile of the same op and
    shape but another sample count n0 (the nearest; a larger one on a
    tie): its time beyond the op's fixed cost ``overhead`` scales with the
    samples, t = o + (t0 - o) n / n0 (the work of every op here is linear in
    its samples).  None when no such tile was measured."""
    if not ops:
        return None
    b = _blank_samples(key)
    if b is None:
        return None
    near = sample_index(ops).get(b[0])
    if not near:
        return None
    n = b[1]
    n0, t0 = min(near, key=lambda e: (abs(math.log(e[0] / n)), -e[0]))
    o = min(overhead, t0)
    return o + (t0 - o) * n / n0


class CostModelError(ValueError):
    """A graph, plan or machine the cost model cannot price."""


def _dtype_name(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in ITEMSIZE:
        raise CostModelError(f"dtype {name!r} is not supported; use float32 or float64")
    return name


@dataclass
class NodeCost:
    t_c: np.ndarray
    t_s: np.ndarray
    mem: np.ndarray
    measured: np.ndarray      # bool: t_c from the measured table
    tile: np.ndarray          # the op tile's time alone (in t_c)
    skew: np.ndarray          # the per-layer wait (in t_c)

    def __add__(self, other):
        return NodeCost(self.t_c + other.t_c, self.t_s + other.t_s, self.mem + other.mem,
                        self.measured & other.measured, self.tile + other.tile, self.skew + other.skew)

    def row(self, i: int) -> "NodeCost":
        return NodeCost(*(a[i:i + 1] for a in (self.t_c, self.t_s, self.mem, self.measured, self.tile,
                                                self.skew)))


@dataclass
class EdgeCost:
    t_x: np.ndarray
    tables: ExchangeTables


class CostModel:
    """Prices configurations of a graph at ``ranks`` ranks on ``machine``."""

    def __init__(self, graph, ranks: int, machine: Machine, dtype="float32",
                 opts: SpaceOptions | None = None, space: ConfigSpace | None = None,
                 bucket_bytes: float = 4 << 20, overlap: bool | None = None):
        self.graph = graph
        self.ranks = int(ranks)
        self.machine = machine
        self.dtype = _dtype_name(dtype)
        self.itemsize = ITEMSIZE[self.dtype]
        self.space = space or ConfigSpace(graph, self.ranks, opts)
        self._geom: dict = {}             # by node name and by signature (shared)
        self._edge_cache: dict = {}
        self._key_memo: dict = {}          # (signature, input, A, B) -> tables_key
        self._node_cache: dict = {}
        self._link_cache: dict = {}
        meas = machine.measured or {}
        self._measured = meas.get("ops", {}) if meas.get("dtype", self.dtype) == self.dtype else {}
        #: runtime figures calibrated for jobs of this size (None: links and roofline only)
        self.rt = machine.runtime_at(self.ranks)
        self._rt_ops = self.rt.ops if self.rt is not None else {}
        self.bucket_bytes = float(bucket_bytes)
        #: price the runtime's overlap of a convolution's exchanges with its
        #: own part's compute; default: with runtime figures (a machine
        #: calibrated for hpcnn's runtime), not on a described machine, whose
        #: model stays the paper's (which ignores overlap)
        self.overlap = (self.rt is not None) if overlap is None else bool(overlap)
        self.live = graph.reaches_loss()
        self.stats = {"edge_tables": 0, "edge_cache_hits": 0, "table_seconds": 0.0,
                      "node_seconds": 0.0}

    def directions(self, src: str, dst: str) -> int:
        """How often an edge's exchange runs per step: forward, and backward
        (its adjoint) unless the producer is the input or the consumer does
        not reach the loss."""
        return 1 + int(self.graph[src].kind != "input" and dst in self.live)

    # ---- collectives ---------------------------------------------------------
    def allreduce_parts(self, nbytes: float, group: int, link, share: float = 1.0):
        """(latency, bandwidth) seconds of one allreduce of ``nbytes`` over
        ``group`` ranks whose busiest link is ``link``: the runtime figures
        calibrated for this job size when the machine has them, else the
        link model.  Across nodes (``link`` is the inter-node one), the bytes
        go at the measured collective's bus bandwidth
        (``Machine.allreduce_across``; else the link's), and the latency is
        the runtime's when its figures were measured across nodes, else the
        collective's."""
        if group <= 1 or nbytes <= 0:
            return 0.0, 0.0
        m, rt = self.machine, self.rt
        wire = 2.0 * (group - 1) / group * nbytes
        if link is m.inter and link is not m.intra:
            coll = m.allreduce_across(group, share)
            if coll is None:
                lat, bw = 2 * math.ceil(math.log2(group)) * link.latency, link.bandwidth / share
            else:
                lat, bw = coll
            if rt is not None and rt.allreduce_latency and rt.nodes > 1:
                lat = rt.allreduce_alpha(group)
            return lat, wire / bw
        if rt is not None and rt.allreduce_latency:
            bw = rt.allreduce_bandwidth or link.bandwidth
            return rt.allreduce_alpha(group), wire * share / bw
        full = allreduce_time(nbytes, group, link, share)
        lat = 2 * math.ceil(math.log2(group)) * link.latency
        return lat, full - lat

    def reductions_seconds(self, node, channels: int, group: int, link) -> float:
        """The sums the op asks of its replica group per training step
        (``Op.tile_reductions``), each an allreduce of its own."""
        red = node.op.tile_reductions(channels)
        return float(sum(sum(self.allreduce_parts(n * self.itemsize, group, link))
                         for calls in red.values() for n in calls))

    def group_link(self, deg: tuple, dims: tuple):
        """(link, share) of the allreduce over a replica group of a layer
        with degrees ``deg``: inter-node when some group spans nodes, with
        ``share`` groups crossing one node's port at once."""
        key = (tuple(deg), tuple(dims))
        if key not in self._link_cache:
            self._link_cache[key] = self._group_link(*key)
        return self._link_cache[key]

    def _group_link(self, deg: tuple, dims: tuple):
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

    # ---- geometry ------------------------------------------------------------
    def geometry(self, name: str) -> NodeGeometry:
        """The node's geometry, shared by nodes of one signature (their need
        intervals are computed once: repeated blocks read alike)."""
        if name not in self._geom:
            node = self.graph[name]
            sig = self._signature(node)
            if sig not in self._geom:
                try:
                    self._geom[sig] = NodeGeometry(node)
                except NotSeparable as exc:
                    raise CostModelError(f"layer {name!r}: {exc}") from None
            self._geom[name] = self._geom[sig]
        return self._geom[name]

    def _signature(self, node) -> tuple:
        return (node.kind, json.dumps(node.op.attrs(), sort_keys=True),
                tuple(tuple(x) for x in node.in_shapes), tuple(node.shape))

    # ---- per-node costs ------------------------------------------------------
    def node_cost(self, name: str, configs: np.ndarray, with_inputs: bool = True) -> NodeCost:
        """t_c, t_s and memory of node ``name`` for each configuration row."""
        t0 = time.perf_counter()
        node = self.graph[name]
        configs = np.asarray(configs, dtype=np.int64).reshape(-1, len(node.shape))
        # nodes of one signature price alike, unless one reads the network's
        # input (no dX: a tile key of its own, measured apart)
        key = (self._signature(node), inputs_from_input(self.graph, node), configs.tobytes(), configs.shape,
               with_inputs)
        if key in self._node_cache:
            return self._node_cache[key]
        m, isz = self.machine, self.itemsize
        dims = DIM_NAMES[len(node.shape)]
        C = len(configs)
        pc = configs[:, dims.index("c")] if "c" in dims else np.ones(C, dtype=np.int64)
        grp = configs.prod(axis=1) // pc
        shard = np.array([sum(sp.shard_size(p) for sp in node.param_specs().values() if sp.trainable)
                          for p in pc], dtype=np.float64)
        bshard = np.array([sum(sp.shard_size(p) for sp in node.buffer_specs().values()) for p in pc],
                          dtype=np.float64)
        geom = self.geometry(name)
        out_el, in_el, shapes = geom.tile_arrays(configs)
        measured = np.zeros(C, dtype=bool)
        if node.kind == "input":
            t_c, tile, skew = np.zeros(C), np.zeros(C), np.zeros(C)
        else:
            t_c, measured = self._compute_seconds(node, geom, shapes, in_el, out_el, shard)
            tile = t_c.copy()
            skew = np.zeros(C)
            if self.rt is not None:
                # the search prices the wait after every layer; pricing a whole
                # plan, after every stretch of compute that ends in a synchronisation
                skew = np.minimum(self.rt.skew * t_c, self.rt.skew_cap_s)
                t_c = t_c + skew
            mem_eff = m.memory_bandwidth * m.memory_efficiency()
            t_c = t_c + 5.0 * shard * isz / mem_eff            # the optimiser's update
        t_s = np.zeros(C)
        for row in range(C):
            g = int(grp[row])
            if g <= 1:
                continue
            link, share = self.group_link(tuple(int(x) for x in configs[row]), dims)
            ts = 0.0
            if shard[row] and m.gradient_sync == "parameter_server":
                ts = parameter_server_time(shard[row] * isz, g, link)
            elif shard[row]:
                # gradients travel in buckets of up to bucket_bytes per
                # replica group: a layer pays its share of a latency
                lat, bw = self.allreduce_parts(shard[row] * isz, g, link, share)
                ts = bw + lat * min(1.0, shard[row] * isz / self.bucket_bytes)
            channels = -(-node.shape[1] // int(pc[row])) if len(node.shape) > 1 else 1
            t_s[row] = ts + self.reductions_seconds(node, channels, g, link)
        work = np.array([float(node.op.workspace(*geom.split_shapes(row))) for row in shapes])
        mem = (3 * shard + bshard + out_el + (in_el if with_inputs else 0) + work) * isz
        res = NodeCost(t_c, t_s, mem, measured, tile, skew)
        self._node_cache[key] = res
        self.stats["node_seconds"] += time.perf_counter() - t0
        return res

    def _compute_seconds(self, node, geom, shapes, in_el, out_el, shard):
        """(seconds, measured?) of each configuration's representative tile,
        forward + backward: measured with every rank computing, measured
        alone, or the roofline."""
        m, isz = self.machine, self.itemsize
        uniq, inv = np.unique(shapes, axis=0, return_inverse=True)
        ff = np.array([float(node.op.flops(*geom.split_shapes(row))) for row in uniq])
        flops = ff[inv.reshape(-1)] * (1.0 + BACKWARD_FLOPS.get(node.kind, 1.0))
        nbytes = 3.0 * (in_el + out_el + shard) * isz
        t_f = flops / (m.peak_flops * m.efficiency(node.kind))
        t_m = nbytes / (m.memory_bandwidth * m.memory_efficiency(node.kind))
        t_c = np.maximum(t_f, t_m) + m.op_overhead(node.kind)
        # slow-down of a tile timed alone when every rank of the job computes
        factor = self.rt.compute_factor if self.rt is not None else m.oversubscription(self.ranks)
        t_c = t_c * factor
        measured = np.zeros(len(t_c), dtype=bool)
        if self._measured or self._rt_ops:
            o = m.op_overhead(node.kind)
            for u, row in enumerate(uniq):
                tk = tile_key(node, *geom.split_shapes(row), self.dtype, inputs_from_input(self.graph, node))
                hit = inv.reshape(-1) == u
                if tk in self._rt_ops:           # timed with every rank computing
                    t_c[hit] = float(self._rt_ops[tk])
                elif tk in self._measured:       # timed alone
                    t_c[hit] = float(self._measured[tk]) * factor
                else:                            # the same tile at another sample count
                    got = scaled_tile(self._rt_ops, tk, o)
                    if got is None:
                        got = scaled_tile(self._measured, tk, o)
                        got = None if got is None else got * factor
                    if got is None:
                        continue
                    t_c[hit] = got
                measured[hit] = True
        if self.rt is not None:
            t_c = t_c * (1.0 + self.rt.tile_inflation)
        return t_c, measured

    def group_cost(self, gi: int) -> NodeCost:
        g = self.space.groups[gi]
        cf = self.space.configs[gi]
        tot = None
        for j, mname in enumerate(g.members):
            c = self.node_cost(mname, cf, with_inputs=(j == 0))
            tot = c if tot is None else tot + c
        return tot

    # ---- per-edge costs ------------------------------------------------------
    def _edge_key(self, dst: str, i: int, A: np.ndarray, B: np.ndarray) -> tuple:
        quick = (self._signature(self.graph[dst]), i, A.tobytes(), A.shape, B.tobytes(), B.shape)
        if quick not in self._key_memo:
            self._key_memo[quick] = tables_key(self.geometry(dst).inputs[i], A, B)
        return self._key_memo[quick]

    def edge_tables(self, dst: str, i: int, A: np.ndarray, B: np.ndarray) -> ExchangeTables:
        """Exchange tables of input ``i`` of ``dst`` for source
        configurations ``A`` and consumer configurations ``B`` (cached by
        what they depend on, ``tables_key``: repeated blocks, and edges
        that read alike, share their tables)."""
        A = np.asarray(A, dtype=np.int64)
        B = np.asarray(B, dtype=np.int64)
        key = self._edge_key(dst, i, A, B)
        if key in self._edge_cache:
            self.stats["edge_cache_hits"] += 1
            return self._edge_cache[key]
        t0 = time.perf_counter()
        tab = exchange_tables(self.geometry(dst).inputs[i], A, B, self.machine.ranks_per_node)
        self._edge_cache[key] = tab
        self.stats["edge_tables"] += 1
        self.stats["table_seconds"] += time.perf_counter() - t0
        return tab

    def layout_tables(self, Ls: Layout, Ld: Layout, dst: str, i: int) -> ExchangeTables:
        """1 x 1 tables of one edge between layouts on any ranks."""
        geom = self.geometry(dst).inputs[i]
        return rank_counts(geom, Ls, Ld, self.ranks, self.machine.ranks_per_node).tables()

    def exchange_seconds(self, tab: ExchangeTables, directions: int = 2, region=None) -> np.ndarray:
        """Seconds of an edge's exchanges per step, for every pair of the
        tables: ``directions`` times (forward, and the adjoint backward) the
        busiest rank's bytes over the link plus latency per message; with
        runtime figures, the calibrated latency per exchange and bandwidth,
        plus assembling the consumer's input region (``region``: its bytes
        per consumer configuration) from the pieces."""
        lat, bw = self.exchange_parts(tab, region)
        return directions * (lat + bw)

    def exchange_parts(self, tab: ExchangeTables, region=None):
        """(fixed, transfer) seconds of one direction of an edge's exchange
        per pair of the tables: the latency terms (and the region's
        assembly), which cost the ranks' own time, and the bytes over the
        link, which may travel while a rank computes."""
        m = self.machine
        b = tab.max_rank * self.itemsize
        x = tab.node_inter * self.itemsize
        rt = self.rt
        moves = tab.max_rank > 0
        if rt is not None and rt.exchange is not None:
            fixed = np.full(b.shape, float(rt.exchange.latency))
            transfer = b / rt.exchange.bandwidth
            if m.nodes_for(self.ranks) > 1:
                # across nodes: the busiest node port at the link's rate,
                # and a link latency per message
                transfer = np.maximum(transfer, x / m.inter.bandwidth)
                fixed = fixed + np.where(x > 0, tab.messages * m.inter.latency, 0.0)
            if region is not None and rt.copy_bandwidth:
                fixed = fixed + np.asarray(region, dtype=np.float64)[None, :] / rt.copy_bandwidth
            return np.where(moves, fixed, 0.0), np.where(moves, transfer, 0.0)
        lat = np.where(x > 0, m.inter.latency, m.intra.latency)
        return (np.where(moves, tab.messages * lat, 0.0),
                np.where(moves, np.maximum(b / m.intra.bandwidth, x / m.inter.bandwidth), 0.0))

    def region_bytes(self, dst: str, i: int, B: np.ndarray) -> np.ndarray:
        """Bytes of input ``i``'s region that the representative tile of
        ``dst`` reads, per consumer configuration (rows of ``B``)."""
        return self.geometry(dst).region_elements(i, B) * self.itemsize

    def edge_cost(self, src, dst, i, A, B) -> EdgeCost:
        tab = self.edge_tables(dst, i, A, B)
        return EdgeCost(self.edge_seconds(tab, src, dst, i, B, A), tab)

    def by_pieces(self, src: str, dst: str, A) -> np.ndarray:
        """Per source configuration (rows of ``A``; a column), whether the
        consumer convolves its region part by part (``Op.convolves_pieces``:
        it assembles nothing and may overlap), given whether the source
        splits the channels."""
        op = self.graph[dst].op
        if not op.takes_pieces:
            return np.zeros((1, 1), dtype=bool)
        if A is None:
            return np.ones((1, 1), dtype=bool)
        A = np.asarray(A, dtype=np.int64)
        dims = DIM_NAMES[A.shape[1]]
        split = A[:, dims.index("c")] > 1 if "c" in dims else np.zeros(len(A), dtype=bool)
        return np.array([op.convolves_pieces(bool(c)) for c in split], dtype=bool)[:, None]

    def edge_seconds(self, tab: ExchangeTables, src: str, dst: str, i: int, B, A=None) -> np.ndarray:
        """t_x of an edge per pair of configurations (``A``: the source's,
        when known).  A consumer that convolves its region as pieces
        (``by_pieces``) assembles nothing; with ``overlap`` the transfer of
        each direction is hidden behind its compute on its own part
        (``hidden_compute``), so only the latency terms and what the compute
        does not cover count: per direction, fixed + max(0, transfer -
        hidden).  Otherwise both directions in full, plus assembling the
        region (with runtime figures)."""
        pieces = self.by_pieces(src, dst, A)
        region = None
        if self.rt is not None and self.rt.copy_bandwidth and not pieces.all():
            region = self.region_bytes(dst, i, B)
        dirs = self.directions(src, dst)
        full = self.exchange_seconds(tab, dirs, region)
        if not pieces.any():
            return full
        fixed, transfer = self.exchange_parts(tab)
        if self.overlap:
            fwd, bwd = self.hidden_compute(tab, dst, i, B)
            t = fixed + np.maximum(0.0, transfer - fwd)
            if dirs == 2:
                t = t + fixed + np.maximum(0.0, transfer - bwd)
        else:
            t = dirs * (fixed + transfer)
        return np.where(pieces, t, full)

    def hidden_compute(self, tab: ExchangeTables, dst: str, i: int, B):
        """(forward, backward) seconds of the consumer's compute that runs
        while its input's pieces travel, per pair of the tables: the share
        of its region this rank holds itself (1 - elements received on the
        busiest rank / region elements) times the tile's forward and
        backward time (the tile's time split as its flops: 1 : BACKWARD_FLOPS)."""
        node = self.graph[dst]
        B = np.asarray(B, dtype=np.int64)
        tile = self.node_cost(dst, B, with_inputs=False).tile
        region = np.maximum(self.geometry(dst).region_elements(i, B).astype(np.float64), 1.0)
        own = np.clip(1.0 - tab.max_rank / region[None, :], 0.0, 1.0)
        back = BACKWARD_FLOPS.get(node.kind, 1.0)
        return own * (tile / (1.0 + back))[None, :], own * (tile * back / (1.0 + back))[None, :]

    # ---- the search problem -------------------------------------------------
    def build_tables(self, workers: int | None = None) -> int:
        """Build the exchange tables of every searched edge that is not
        cached yet, in ``workers`` processes (None: the CPUs this process
        may use, at most 8, when the work is large enough to pay for
        starting them; 1: here).  Returns the processes used."""
        sp = self.space
        todo = {}
        for gs, gd, src, dst, i in sp.edges():
            key = self._edge_key(dst, i, sp.configs[gs], sp.configs[gd])
            if key not in self._edge_cache and key not in todo:
                todo[key] = (dst, i, sp.configs[gs], sp.configs[gd])
        work = sum(len(A) * len(B) * int(max(A.prod(axis=1).max(), B.prod(axis=1).max()))
                   for _, _, A, B in todo.values())
        if workers is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            workers = min(8, cpus) if work >= PARALLEL_WORK else 1
        workers = max(1, min(int(workers), len(todo)))
        if workers == 1:
            return 1
        t0 = time.perf_counter()
        order = sorted(todo, key=lambda k: -len(todo[k][2]) * len(todo[k][3]))   # largest first
        jobs = [(self.geometry(todo[k][0]).inputs[todo[k][1]], todo[k][2], todo[k][3],
                 self.machine.ranks_per_node) for k in order]
        # forked workers share what this process has built; under MPI (rank 0
        # of a job) they are spawned instead, so that no MPI state is copied
        method = "spawn" if "mpi4py.MPI" in sys.modules else "fork"
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as ex:
                for key, tab in zip(order, ex.map(_tables_job, jobs)):
                    self._edge_cache[key] = tab
                    self.stats["edge_tables"] += 1
        except (BrokenProcessPool, OSError) as exc:
            # a program whose main module cannot be imported again cannot
            # spawn: build the rest here
            self.stats["table_workers_failed"] = f"{type(exc).__name__}: {exc}"
            workers = 1
        self.stats["table_seconds"] += time.perf_counter() - t0
        self.stats["table_workers"] = workers
        return workers

    def problem(self, workers: int | None = None):
        """Node cost vectors (t_c + t_s per group configuration), edge tables
        (t_x per configuration pair) and the per-group costs; the tables are
        built in ``workers`` processes (see ``build_tables``)."""
        sp = self.space
        self.build_tables(workers)
        groups = [self.group_cost(g.index) for g in sp.groups]
        vecs = [gc.t_c + gc.t_s for gc in groups]
        edges = []
        for gs, gd, src, dst, i in sp.edges():
            ec = self.edge_cost(src, dst, i, sp.configs[gs], sp.configs[gd])
            edges.append((gs, gd, ec.t_x))
        return vecs, edges, groups


def _tables_job(job) -> ExchangeTables:
    """One edge's tables, in a worker process."""
    geom, A, B, R = job
    return exchange_tables(geom, A, B, R)
