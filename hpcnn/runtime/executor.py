"""The distributed executor: Graph + Plan + communicator -> this rank's
program and its training step.

Every rank walks the graph in the same (topological) order.  For each layer
it first takes part in the exchange of each input (sending the pieces of its
producer tile that others need, receiving the region its own output tile
reads, halo and all), then, when it holds a tile of the layer, computes it
with the op's local forward.  An op that takes pieces (convolution) gets
its region as parts, the own tile uncopied; with ``overlap`` it gets them
while the other ranks' pieces are still in flight, computes what its own
tile determines, and waits inside the op.  Backward walks the layers in
reverse: local backward, then the adjoint exchange that sends region
gradients back to their owners, where they are summed in place (an op over
pieces starts the other ranks' gradients home before it computes its own
part's).  Each exchange runs on the transport chosen for its plan at set-up
(``transport='auto'``: measured, the same choice on every rank).  Parameter gradients are summed over each
layer's replica group in buckets started while backward goes on (awaited at
its end), and the optimiser updates this rank's shards.  Ranks outside a
layer's layout skip its computation (but still send what they own).

The parallel program computes the same function as SequentialModel: same
initial parameters (the whole tensor from the seed, then this rank's channel
slice), global batch-norm statistics, global-batch mean loss.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from hpcnn.backend import get_backend, to_host
from hpcnn.ops import PartGrads, TileContext
from hpcnn.ops.host_memory import retain_freed_memory
from hpcnn.parallel.box import Box
from hpcnn.parallel.comm import TRANSPORTS, Communicator
from hpcnn.parallel.exchange_plan import HALO, REDIST, ExchangePlan, exchange_category, needed_boxes
from hpcnn.parallel.groups import ReplicaGroups
from hpcnn.strategy.plan import Plan

__all__ = ["DistributedModel", "Edge", "exchange_category", "HALO", "REDIST", "AUTO"]

AUTO = "auto"
#: timed repetitions (after one untimed) of each transport per plan at set-up
TRANSPORT_REPS = 3



@dataclass
class Edge:
    """The exchange feeding input ``index`` of ``consumer`` from ``producer``."""
    producer: str
    consumer: str
    index: int
    plan: ExchangePlan
    category: str
    tag: int
    transport: str = "p2p"
    #: whether any rank moves data in this exchange
    traffic: bool = True

    def __post_init__(self):
        self.traffic = self.plan.total_bytes() > 0

    @property
    def key(self) -> str:
        return f"{self.producer}->{self.consumer}[{self.index}]"


class DistributedModel:
    """One rank's share of a network under a Plan.

    graph, plan : the network and its per-layer configuration
    comm        : an hpcnn Communicator, an mpi4py communicator or None (world)
    dtype, seed : as SequentialModel (same seed -> same network under every plan)
    backend     : hpcnn.backend.Backend (default: the process backend)
    transport   : 'auto' (each plan's fastest, measured at set-up; the
                  default) or one of hpcnn.parallel.comm.TRANSPORTS for
                  every exchange; HPCNN_TRANSPORT overrides the default
    overlap     : ops that take pieces compute their own tile's part while
                  the halo is in flight (default True; HPCNN_OVERLAP=0 off)
    bucket_bytes: largest gradient-allreduce bucket
    trace       : record (category, node, start, end) events in ``events``
                  (the time of this rank's thread, one thing at a time) and
                  the exchanges in flight in ``flights``
    """

    def __init__(self, graph, plan: Plan, comm=None, dtype=np.float32, seed=0, backend=None,
                 transport=None, bucket_bytes=4 << 20, trace=False, setup=True, overlap=None):
        from mpi4py import MPI
        self.backend = backend or get_backend()
        self._owns_comm = not isinstance(comm, Communicator)
        base = comm.mpi if isinstance(comm, Communicator) else (comm or MPI.COMM_WORLD)
        # the same verdict on every rank, before any collective
        plan.validate(graph, base.Get_size())
        self.node_info = None
        if setup:
            # BLAS threads, the GPU of this node-local rank and the CUDA-aware
            # probe come first: the communicator stages by the probe's answer
            from hpcnn.runtime.node_setup import setup_node
            self.node_info = setup_node(base, self.backend, verbose=True)
        if transport is None:
            transport = os.environ.get("HPCNN_TRANSPORT", "").strip() or AUTO
        if transport != AUTO and transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}: choose {AUTO!r} or one of "
                             f"{', '.join(TRANSPORTS)}")
        if overlap is None:
            overlap = os.environ.get("HPCNN_OVERLAP", "1").strip() != "0"
        self.overlap = bool(overlap)
        if isinstance(comm, Communicator):
            self.cm = comm
        else:
            self.cm = Communicator(base, self.backend, transport="p2p" if transport == AUTO else transport)
        self.rank, self.world = self.cm.rank, self.cm.size
        self.graph, self.plan = graph, plan
        self.dtype = np.dtype(dtype)
        self.seed = seed
        self.bucket_bytes = int(bucket_bytes)
        self.trace = bool(trace)
        self.events: list = []
        self.flights: list = []
        self.layouts = plan.layouts(graph)
        self._build_edges()
        self._choose_transports(transport)
        self._build_params()
        param_layouts = {n: self.layouts[n] for n in self.graph.nodes
                         if self.graph[n].param_specs() or self.graph[n].buffer_specs()}
        self.groups = ReplicaGroups(self.cm, param_layouts)
        self._live = graph.reaches_loss()
        # the network's input needs no gradient: ops may skip computing it
        self._input_grads = {n.name: tuple(graph[src].kind != "input" for src in n.inputs) for n in graph}
        if not self.backend.is_gpu:
            retain_freed_memory()      # steps reuse the same large host blocks
        self._saved, self._ctx, self._ran = {}, {}, []
        self._sources: dict = {}
        self._loss_region = self._loss_tile = None
        self.grads: dict = {}

    # ---- set-up -------------------------------------------------------------------
    def _build_edges(self):
        g = self.graph
        self.edges: dict[tuple, Edge] = {}
        tag = 0
        for node in g:
            L = self.layouts[node.name]
            for i, src in enumerate(node.inputs):
                needs = needed_boxes(node.op, i, L, node.in_shapes)
                xplan = ExchangePlan.compile(self.layouts[src], needs, self.dtype.itemsize)
                self.edges[(node.name, i)] = Edge(src, node.name, i, xplan,
                                                  exchange_category(self.layouts[src], L), tag)
                tag += 1
        # when a producer's tile may be dropped in forward (after its last reader)
        self._last_reader = {}
        for (consumer, i), e in self.edges.items():
            self._last_reader[e.producer] = (consumer, i)

    def _choose_transports(self, transport):
        """The transport of every edge: ``transport`` itself, or with
        'auto' each distinct plan's fastest, one forward and adjoint of it
        timed on every transport (``Communicator.measure_transports``: the
        slowest rank's median, so every rank makes the same choice), once
        per plan and process.  Recorded in ``transport_choice`` and, as
        'transport' events, in the trace."""
        self.transport_choice: dict = {}
        if transport != AUTO:
            for e in self.edges.values():
                e.transport = transport
            return
        moving = [e for e in self.edges.values() if e.traffic]
        keys = [_plan_key(e.plan) for e in moving]
        # what this process has not measured yet, agreed by all ranks
        missing = np.array([k not in _CHOSEN for k in keys], dtype=np.int32)
        if len(missing):
            from mpi4py import MPI
            agreed = np.empty_like(missing)
            self.cm.mpi.Allreduce(missing, agreed, op=MPI.MAX)
        else:
            agreed = missing
        done = set()
        for e, k, m in zip(moving, keys, agreed):
            if m and k not in done:
                t0 = time.perf_counter()
                secs = self.cm.measure_transports(e.plan, self.dtype, pieces=self._takes_pieces(e),
                                                  reps=TRANSPORT_REPS)
                best = min(TRANSPORTS, key=lambda t: (secs[t], TRANSPORTS.index(t)))
                _CHOSEN[k] = (best, secs)
                done.add(k)
                self.events.append(("transport", f"{e.key}: {best} ("
                                    + ", ".join(f"{t} {v * 1e3:.3f} ms" for t, v in secs.items()) + ")",
                                    t0, time.perf_counter()))
            best, secs = _CHOSEN[k]
            e.transport = best
            self.transport_choice[e.key] = {"transport": best, "seconds": dict(secs),
                                            "measured": k in done}

    def _takes_pieces(self, e: "Edge") -> bool:
        return self.rank in self.layouts[e.consumer] and self.graph[e.consumer].op.takes_pieces

    def _build_params(self):
        self.params, self.buffers = {}, {}
        for node in self.graph:
            L = self.layouts[node.name]
            if self.rank not in L:
                continue
            c0, c1 = self._c_range(node.name)
            for store, specs in ((self.params, node.param_specs()), (self.buffers, node.buffer_specs())):
                if not specs:
                    continue
                d = store.setdefault(node.name, {})
                for k, spec in specs.items():
                    full = self.graph.initial_tensor(node.name, k, self.seed, self.dtype)
                    d[k] = self.backend.to_device(np.ascontiguousarray(full[c0:c1]))

    def _c_range(self, node) -> tuple:
        box = self.layouts[node].box(self.rank)
        return tuple(box[1]) if len(box) > 1 else (0, 1)

    # ---- queries ----------------------------------------------------------------
    def input_box(self) -> Box | None:
        """The box of the input batch this rank must feed (None: feed None)."""
        return self.layouts[self.graph.input_name].box(self.rank)

    def label_range(self) -> tuple | None:
        """(lo, hi): the samples whose labels this rank's loss tile needs."""
        b = self.layouts[self.graph.loss_name].box(self.rank)
        return None if b is None else tuple(b[0])

    def param_box(self, node, name) -> Box:
        """The box of this rank's shard of parameter (or buffer) ``name`` of
        ``node`` in the logical tensor."""
        n = self.graph[node]
        spec = n.param_specs().get(name) or n.buffer_specs().get(name)
        if spec is None:
            raise KeyError(f"layer {node!r} has no parameter or buffer {name!r}")
        if self.rank not in self.layouts[node]:
            raise KeyError(f"rank {self.rank} holds no tile of layer {node!r}")
        c0, c1 = self._c_range(node)
        return Box(((c0, c1),) + tuple((0, int(s)) for s in spec.shape[1:]))

    def flat_params(self) -> dict:
        """{'node.param': local shard} of every parameter this rank holds."""
        return {f"{n}.{k}": v for n, ps in self.params.items() for k, v in ps.items()}

    def step_bytes(self) -> dict:
        """Bytes this rank sent to other ranks in the last step, by category:
        halo, redistribution, allreduce (parameters), batchnorm, scalars."""
        return dict(self.cm.counter.step)

    def edge_bytes(self) -> dict:
        """Cumulative bytes sent per exchange edge key: {'forward', 'backward'}."""
        return {k: dict(v) for k, v in self.cm.counter.per_plan.items() if "->" in k}

    def comm_seconds(self) -> dict:
        return dict(self.cm.counter.seconds)

    # ---- forward ---------------------------------------------------------------------
    def _event(self, cat, node, t0, t1=None):
        if self.trace:
            self.events.append((cat, node, t0, time.perf_counter() if t1 is None else t1))

    def _flight_event(self, cat, node, fl, t1):
        if self.trace:
            self.flights.append((cat + " in flight", node, fl.started_at, t1))

    def forward(self, x_tile, labels=None, training=True, step=0):
        """Run the network on this rank's input tile (``x[input_box().slices()]``,
        or None).  ``labels``: the WHOLE batch's labels (every rank passes
        them, or every rank passes None for inference).  Returns (the global
        loss, the same float on every rank, or None; this rank's logits tile
        or None)."""
        g, me = self.graph, self.rank
        self.cm.counter.reset_step()
        acts = {}
        inp = g.input_name
        ib = self.input_box()
        if ib is not None:
            if x_tile is None or tuple(x_tile.shape) != ib.shape:
                raise ValueError(f"rank {me} must feed the input box {ib} (shape {ib.shape}) "
                                 f"of the batch, got {None if x_tile is None else tuple(x_tile.shape)}")
            acts[inp] = self.backend.to_device(x_tile, self.dtype)
        loss_name = g.loss_name
        self._saved, self._ctx, self._ran, self._sources = {}, {}, [], {}
        self._loss_region = None
        for node in g:
            if node.kind == "input" or (node.name == loss_name and labels is None):
                continue
            L = self.layouts[node.name]
            holds = me in L
            regions, pending = [], []
            clock = [0.0]          # where the op's own time starts (moved by waits inside it)
            for i, src in enumerate(node.inputs):
                e = self.edges[(node.name, i)]
                if not e.traffic:
                    # nothing moves anywhere: the region is (part of) the tile
                    regions.append(self.cm.local_region(e.plan, acts.get(src), self.dtype, key=e.key))
                    if self._last_reader.get(src) == (node.name, i) and src != g.logits_name:
                        acts.pop(src, None)
                    continue
                pieces = holds and node.op.takes_pieces
                t0 = time.perf_counter()
                fl = self.cm.start_exchange(e.plan, acts.get(src), self.dtype, tag=e.tag, key=e.key,
                                            category=e.category, pieces=pieces, transport=e.transport)
                if pieces and self.overlap and fl.region_parts is not None and fl.reqs:
                    self.cm.background(fl)
                    regions.append(self.cm.region(fl, self._waiter(fl, e, node.name, clock)))
                    pending.append(fl)
                    self._event(e.category, node.name, t0)
                else:
                    regions.append(fl.finish())
                    t1 = time.perf_counter()
                    self._event(e.category, node.name, t0, t1)
                    if fl.reqs:
                        self._flight_event(e.category, node.name, fl, t1)
                if fl.part_sources is not None:
                    self._sources[(node.name, i)] = fl.part_sources
                if self._last_reader.get(src) == (node.name, i) and src != g.logits_name:
                    acts.pop(src, None)
            self._ran.append(node.name)
            if not holds:
                continue
            out_box = L.box(me)
            ctx = TileContext(out_box=tuple(out_box),
                              in_boxes=[tuple(self._unclipped(node, i, out_box)) for i in range(len(node.inputs))],
                              in_shapes=list(node.in_shapes), out_shape=node.shape,
                              training=training, seed=self.seed, step=step,
                              allreduce=self._bn_allreduce(node.name),
                              input_grads=self._input_grads[node.name])
            if node.name == loss_name:
                lo, hi = out_box[0]
                ctx.labels = self.backend.to_device(np.asarray(labels)[lo:hi])
                self._loss_region = (regions[0], ctx.labels)
            clock[0] = time.perf_counter()
            y, saved = node.op.forward(regions, self.params.get(node.name, {}),
                                       self.buffers.get(node.name, {}), ctx)
            for fl in pending:          # an op that never waited: complete its exchanges now
                if not fl.done:
                    fl.finish()
            self._event("forward", node.name, clock[0])
            acts[node.name] = y
            self._saved[node.name] = saved
            self._ctx[node.name] = ctx
        self._acts_logits = acts.get(g.logits_name)
        self._loss_tile = acts.get(loss_name) if labels is not None else None
        loss = None
        if labels is not None:
            local = float(to_host(acts[loss_name].sum())) if loss_name in acts else 0.0
            loss = float(self.cm.allreduce_scalars([local], category="scalars")[0])
        return loss, self._acts_logits

    def _waiter(self, fl, e, node, clock):
        """The ``wait`` of a region handed over in flight: completes the
        exchange inside the op, tracing the op's time before it, the wait,
        and the exchange's time in flight."""
        def wait():
            tw0 = time.perf_counter()
            fl.finish()
            tw1 = time.perf_counter()
            self._event("forward", node, clock[0], tw0)
            self._event(e.category, node, tw0, tw1)
            self._flight_event(e.category, node, fl, tw1)
            clock[0] = tw1
        return wait

    def _unclipped(self, node, i, out_box):
        return node.op.input_box(i, tuple(out_box), node.in_shapes)

    def _bn_allreduce(self, node):
        comm = self.groups.comm(node) if node in self.groups.node_group else None
        if comm is None:
            return lambda a: a

        def reduce(a):
            t0 = time.perf_counter()
            r = self.cm.allreduce(a, comm, category="batchnorm", key=node)
            self._event("batchnorm", node, t0)
            return r
        return reduce

    # ---- backward ----------------------------------------------------------------------
    def backward(self):
        """Gradients of the loss of the last forward, summed over replicas:
        {node: {param: this rank's gradient shard}}."""
        g, me, xp = self.graph, self.rank, self.backend.xp
        if g.loss_name not in self._ran:
            raise RuntimeError("backward needs a forward with labels first")
        grads_act = {}
        loss_box = self.layouts[g.loss_name].box(me)
        if loss_box is not None:
            grads_act[g.loss_name] = xp.ones(loss_box.shape, dtype=self.dtype)
        pgrads = {}
        # gradients lent without a copy: the tensors whose gradient array is
        # an op's output, never written (ops may return one array for several
        # inputs); a second contribution goes into a fresh array we own
        borrowed = set()
        # parameter gradients are summed over their replicas while the
        # backward pass goes on (bucketed non-blocking allreduce)
        reduction = self.groups.start_reduction(self.bucket_bytes, category="allreduce",
                                                events=self.events if self.trace else None)
        for name in reversed(self._ran):
            if name not in self._live:
                continue
            node = g[name]
            dxs = None
            early: dict = {}
            if me in self.layouts[name]:
                dy = grads_act.pop(name, None)
                if dy is None:
                    dy = xp.zeros(self.layouts[name].box(me).shape, dtype=self.dtype)
                ctx = self._ctx[name]
                clock = [time.perf_counter()]
                ctx.halo_grads_ready = [self._early_adjoint(name, i, early, clock)
                                        if self.overlap and (name, i) in self._sources else None
                                        for i in range(len(node.inputs))]
                dxs, dps = node.op.backward(dy, self._saved.pop(name), self.params.get(name, {}), ctx)
                self._event("backward", name, clock[0])
                if dps:
                    pgrads[name] = dps
                    reduction.ready(name, dps)
            for i, src in enumerate(node.inputs):
                if g[src].kind == "input":
                    continue
                e = self.edges[(name, i)]
                dx = None if dxs is None else dxs[i]
                fresh = isinstance(dx, PartGrads)
                if fresh:
                    dx = dict(zip(self._sources[(name, i)], dx))
                acc = grads_act.get(src)
                if (dx is not None and not fresh and dx.dtype == self.dtype and not early
                        and (e.transport == "p2p" or not e.traffic) and e.plan.local_identity(me)):
                    # the region is this rank's tile and nothing moves: sum
                    # here, in the memory layout the op chose (a collective
                    # transport must be entered by every rank)
                    if acc is None:
                        grads_act[src] = dx
                        borrowed.add(src)
                    elif src in borrowed:
                        grads_act[src] = acc + dx
                        borrowed.discard(src)
                    else:
                        xp.add(acc, dx, out=acc)
                    continue
                if acc is not None and src in borrowed:
                    acc = acc.copy(order="K")
                    borrowed.discard(src)
                t0 = time.perf_counter()
                fl = early.get(i)
                if fl is None:
                    fl = self.cm.start_adjoint(e.plan, dx, self.dtype, tag=e.tag, key=e.key,
                                               category=e.category, transport=e.transport)
                    acc = fl.finish(acc, borrow=fresh)
                else:
                    acc = fl.finish(acc, local=dx, borrow=True)
                t1 = time.perf_counter()
                self._event(e.category, name, t0, t1)
                if fl.reqs:
                    self._flight_event(e.category, name, fl, t1)
                if acc is not None:
                    grads_act[src] = acc
        self._saved, self._ctx, self._sources = {}, {}, {}
        reduction.finish(pgrads)
        self.grads = pgrads
        return pgrads

    def _early_adjoint(self, name, i, early, clock):
        """The ``ctx.halo_grads_ready[i]`` of a layer whose input ``i`` came
        as pieces: starts the adjoint of the other ranks' parts while the op
        goes on."""
        e = self.edges[(name, i)]
        sources = self._sources[(name, i)]

        def ready(by_part: dict):
            t0 = time.perf_counter()
            self._event("backward", name, clock[0], t0)
            grads = {sources[k]: v for k, v in by_part.items()}
            early[i] = self.cm.start_adjoint(e.plan, grads, self.dtype, tag=e.tag, key=e.key,
                                             category=e.category, transport=e.transport)
            self.cm.background(early[i])
            clock[0] = time.perf_counter()
            self._event(e.category, name, t0, clock[0])
        return ready

    # ---- steps ---------------------------------------------------------------------------
    def train_step(self, x_tile, labels, optimizer, lr=None, step=0) -> float:
        """Forward, backward, gradient allreduce and an optimiser update of
        this rank's shards; returns the global loss."""
        loss, _ = self.forward(x_tile, labels, training=True, step=step)
        optimizer.step_nodes(self.params, self.backward(), lr)
        return loss

    def count_correct(self, x_tile, labels, valid=None) -> tuple:
        """(correct predictions, samples) of the batch in inference mode,
        summed over all ranks.  ``valid``: optional boolean mask over the
        whole batch; samples where it is False (padding) are not counted."""
        correct, count, _ = self.evaluate_batch(x_tile, labels, valid)
        return correct, count

    def evaluate_batch(self, x_tile, labels, valid=None) -> tuple:
        """(correct predictions, samples, summed cross-entropy) of the batch
        in inference mode, summed over all ranks.  The cross-entropy is the
        plain one of the logits (no label smoothing), in float64.
        ``valid``: optional boolean mask over the whole batch; samples where
        it is False (padding) are not counted."""
        self.forward(x_tile, labels, training=False)
        correct = count = 0
        nll = 0.0
        if self._loss_region is not None:
            z, lab = self._loss_region
            z, lab = to_host(z).astype(np.float64), to_host(lab).astype(np.int64)
            hit = np.argmax(z, axis=1) == lab
            if valid is None:
                keep = np.ones(hit.shape, dtype=bool)
            else:
                lo, hi = self.label_range()
                keep = np.asarray(valid, dtype=bool)[lo:hi]
            top = z.max(axis=1)
            lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
            nll = float((lse - z[np.arange(len(lab)), lab])[keep].sum())
            correct = int((hit & keep).sum())
            count = int(keep.sum())
        self._saved, self._ctx, self._loss_region = {}, {}, None
        tot = self.cm.allreduce_scalars([correct, count, nll], category="scalars")
        return int(round(tot[0])), int(round(tot[1])), float(tot[2])

    def mean_loss(self, x_tile, labels, valid=None) -> tuple:
        """(summed loss, samples) of the batch in inference mode, summed over
        all ranks: the mean of the valid samples' losses (a regression's mean
        squared error per target) is their ratio.  ``valid``: as in
        count_correct."""
        self.forward(x_tile, labels, training=False)
        total = count = 0.0
        if self._loss_tile is not None:
            per = to_host(self._loss_tile).astype(np.float64) * self.graph.batch
            lo, hi = self.label_range()
            keep = np.ones(hi - lo, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)[lo:hi]
            total, count = float(per[keep].sum()), float(keep.sum())
        self._saved, self._ctx, self._loss_tile = {}, {}, None
        tot = self.cm.allreduce_scalars([total, count], category="scalars")
        return float(tot[0]), int(tot[1])

    def free(self):
        """Release the communicators this model made (collective)."""
        self.groups.free()
        if self._owns_comm:
            self.cm.free()

    def predict(self, x_tile):
        """This rank's logits tile in inference mode (None if it holds none)."""
        _, logits = self.forward(x_tile, None, training=False)
        self._saved, self._ctx = {}, {}
        return logits


#: transports chosen per plan in this process: {plan key: (transport, seconds)}
_CHOSEN: dict = {}


def _plan_key(plan) -> tuple:
    """A key of a plan's content, equal on every rank (not its identity)."""
    return (plan.src, plan.needs, plan.itemsize)
