"""The distributed executor: Graph + Plan + communicator -> this rank's
program and its training step.

Every rank walks the graph in the same (topological) order.  For each layer
it first takes part in the exchange of each input (sending the pieces of its
producer tile that others need, receiving the region its own output tile
reads, halo and all), then, when it holds a tile of the layer, computes it
with the op's local forward.  Backward walks the layers in reverse: local
backward, then the adjoint exchange that sends region gradients back to their
owners, where they are summed.  Parameter gradients are summed over each
layer's replica group in buckets started while backward goes on (awaited at
its end), and the optimiser updates this rank's shards.  Ranks outside a
layer's layout skip its computation (but still send what they own).

The parallel program computes the same function as SequentialModel: same
initial parameters (the whole tensor from the seed, then this rank's channel
slice), global batch-norm statistics, global-batch mean loss.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from hpcnn.backend import get_backend, to_host
from hpcnn.ops import TileContext
from hpcnn.ops.host_memory import retain_freed_memory
from hpcnn.parallel.box import Box
from hpcnn.parallel.comm import Communicator
from hpcnn.parallel.exchange_plan import HALO, REDIST, ExchangePlan, exchange_category, needed_boxes
from hpcnn.parallel.groups import ReplicaGroups
from hpcnn.strategy.plan import Plan

__all__ = ["DistributedModel", "Edge", "exchange_category", "HALO", "REDIST"]



@dataclass
class Edge:
    """The exchange feeding input ``index`` of ``consumer`` from ``producer``."""
    producer: str
    consumer: str
    index: int
    plan: ExchangePlan
    category: str
    tag: int

    @property
    def key(self) -> str:
        return f"{self.producer}->{self.consumer}[{self.index}]"


class DistributedModel:
    """One rank's share of a network under a Plan.

    graph, plan : the network and its per-layer configuration
    comm        : an hpcnn Communicator, an mpi4py communicator or None (world)
    dtype, seed : as SequentialModel (same seed -> same network under every plan)
    backend     : hpcnn.backend.Backend (default: the process backend)
    transport   : 'p2p' or 'neighbor' when comm is not a Communicator
    bucket_bytes: largest gradient-allreduce bucket
    trace       : record (category, node, start, end) events in ``events``
    """

    def __init__(self, graph, plan: Plan, comm=None, dtype=np.float32, seed=0, backend=None,
                 transport="p2p", bucket_bytes=4 << 20, trace=False, setup=True):
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
        if isinstance(comm, Communicator):
            self.cm = comm
        else:
            self.cm = Communicator(base, self.backend, transport=transport)
        self.rank, self.world = self.cm.rank, self.cm.size
        self.graph, self.plan = graph, plan
        self.dtype = np.dtype(dtype)
        self.seed = seed
        self.bucket_bytes = int(bucket_bytes)
        self.trace = bool(trace)
        self.events: list = []
        self.layouts = plan.layouts(graph)
        self._build_edges()
        self._build_params()
        param_layouts = {n: self.layouts[n] for n in self.graph.nodes
                         if self.graph[n].param_specs() or self.graph[n].buffer_specs()}
        self.groups = ReplicaGroups(self.cm, param_layouts)
        self._live = graph.reaches_loss()
        self._local = self.cm.transport == "p2p"
        # the network's input needs no gradient: ops may skip computing it
        self._input_grads = {n.name: tuple(graph[src].kind != "input" for src in n.inputs) for n in graph}
        if not self.backend.is_gpu:
            retain_freed_memory()      # steps reuse the same large host blocks
        self._saved, self._ctx, self._ran = {}, {}, []
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
    def _event(self, cat, node, t0):
        if self.trace:
            self.events.append((cat, node, t0, time.perf_counter()))

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
        self._saved, self._ctx, self._ran = {}, {}, []
        self._loss_region = None
        for node in g:
            if node.kind == "input" or (node.name == loss_name and labels is None):
                continue
            L = self.layouts[node.name]
            regions = []
            for i, src in enumerate(node.inputs):
                e = self.edges[(node.name, i)]
                t0 = time.perf_counter()
                regions.append(self.cm.exchange(e.plan, acts.get(src), self.dtype, tag=e.tag,
                                                key=e.key, category=e.category))
                self._event(e.category, node.name, t0)
                if self._last_reader.get(src) == (node.name, i) and src != g.logits_name:
                    acts.pop(src, None)
            self._ran.append(node.name)
            if me not in L:
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
            t0 = time.perf_counter()
            y, saved = node.op.forward(regions, self.params.get(node.name, {}),
                                       self.buffers.get(node.name, {}), ctx)
            self._event("forward", node.name, t0)
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
            if me in self.layouts[name]:
                dy = grads_act.pop(name, None)
                if dy is None:
                    dy = xp.zeros(self.layouts[name].box(me).shape, dtype=self.dtype)
                t0 = time.perf_counter()
                dxs, dps = node.op.backward(dy, self._saved.pop(name), self.params.get(name, {}),
                                            self._ctx[name])
                self._event("backward", name, t0)
                if dps:
                    pgrads[name] = dps
                    reduction.ready(name, dps)
            for i, src in enumerate(node.inputs):
                if g[src].kind == "input":
                    continue
                e = self.edges[(name, i)]
                dx = None if dxs is None else dxs[i]
                acc = grads_act.get(src)
                if dx is not None and dx.dtype == self.dtype and self._local and e.plan.local_identity(me):
                    # the region is this rank's tile and nothing moves: sum
                    # here, in the memory layout the op chose (a
                    # neighbourhood collective must be entered by every rank)
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
                acc = self.cm.exchange_adjoint(e.plan, dx, acc, self.dtype, tag=e.tag,
                                               key=e.key, category=e.category)
                self._event(e.category, name, t0)
                if acc is not None:
                    grads_act[src] = acc
        self._saved, self._ctx = {}, {}
        reduction.finish(pgrads)
        self.grads = pgrads
        return pgrads

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
        self.forward(x_tile, labels, training=False)
        correct = count = 0
        if self._loss_region is not None:
            z, lab = self._loss_region
            hit = to_host(self.backend.xp.argmax(z, axis=1) == lab)
            if valid is None:
                keep = np.ones(hit.shape, dtype=bool)
            else:
                lo, hi = self.label_range()
                keep = np.asarray(valid, dtype=bool)[lo:hi]
            correct = int((hit & keep).sum())
            count = int(keep.sum())
        self._saved, self._ctx, self._loss_region = {}, {}, None
        tot = self.cm.allreduce_scalars([correct, count], category="scalars")
        return int(tot[0]), int(tot[1])

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
