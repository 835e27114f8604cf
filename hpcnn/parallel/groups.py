"""Replica groups: the sub-communicators of ranks that share a layer's
channel slice, and the bucketed gradient allreduce over them.

A layer split with degrees (pn, pc, ph, pw) holds its parameters split along
output channels (the c degree) and replicated over n, h and w.  The ranks
that hold the same channel slice form a *replica group*: they sum their
parameter gradients, and (batch norm) their per-channel statistics, so that
the distributed step equals the sequential one.

Sub-communicators are made once, when the groups object is built: every rank
walks the same layers in the same order and calls ``Split`` collectively for
each partition that introduces groups not seen before, so identical groups
of different layers share one communicator.

The gradient allreduce (``GradientReduction``) overlaps the backward pass:
within a group, the gradients of its layers are packed, in the order the
backward pass produces them, into buckets of ``bucket_bytes`` (a larger
tensor is a bucket of its own), and each full bucket is summed by one
non-blocking Allreduce while backward goes on; the partly filled buckets
are started at the end, in one global group order, and then all are
awaited.  Every member of a group starts the same buckets in the same
order, and nothing blocks before the final wait, so collectives on
overlapping groups cannot deadlock.
"""
from __future__ import annotations

import time

from mpi4py import MPI

from hpcnn.parallel.layout import REPLICA_DIMS, Layout

__all__ = ["ReplicaGroups", "GradientReduction", "REPLICA_DIMS"]



class ReplicaGroups:
    """Replica groups of the layers in ``layouts`` (node -> Layout), on the
    ranks of ``communicator`` (an hpcnn.parallel.comm.Communicator)."""

    def __init__(self, communicator, layouts: dict, dims=REPLICA_DIMS):
        self.cm = communicator
        self.rank = communicator.rank
        self.dims = tuple(dims)
        self.node_group: dict[str, tuple | None] = {}
        self.comms: dict[tuple, object] = {}
        self.order: list[tuple] = []          # every group of size > 1, global order
        self._members: dict[tuple, list] = {}  # group -> nodes that use it
        known = set()
        for node, L in layouts.items():
            if not isinstance(L, Layout):
                raise TypeError(f"layer {node!r}: expected a Layout, got {type(L).__name__}")
            partition = L.groups(self.dims)
            mine = L.group(self.rank, self.dims) if self.rank in L else None
            self.node_group[node] = mine
            for g in partition:
                if len(g) > 1:
                    self._members.setdefault(g, []).append(node)
            new = [g for g in partition if len(g) > 1 and g not in known]
            if not new:
                continue
            color = new.index(mine) if mine in new else MPI.UNDEFINED
            sub = communicator.mpi.Split(color, key=self.rank)
            if mine in new:
                self.comms[mine] = sub
            known.update(new)
            self.order.extend(new)

    def comm(self, node):
        """This rank's replica communicator for ``node`` (None when the rank
        is alone with its slice or holds no tile of the layer)."""
        g = self.node_group.get(node)
        if g is None or len(g) == 1:
            return None
        return self.comms[g]

    def group(self, node) -> tuple | None:
        return self.node_group.get(node)

    def start_reduction(self, bucket_bytes: int = 4 << 20, category="allreduce",
                        events=None) -> "GradientReduction":
        """A gradient allreduce that overlaps the backward pass: hand it each
        layer's gradients as soon as they exist (``ready``), then
        ``finish``."""
        return GradientReduction(self, bucket_bytes, category, events)

    def free(self):
        for c in self.comms.values():
            c.Free()
        self.comms.clear()


class GradientReduction:
    """Bucketed gradient allreduce started while backward still runs.

    Each replica group fills buckets with the gradients of its layers in the
    order they become ready (``ready``, called by every member of a group
    for the same layers in the same order, as the executor's backward walk
    does); a bucket is started (one non-blocking in-place Allreduce) as soon
    as it holds ``bucket_bytes``; a larger tensor is a bucket of its own.
    ``finish`` starts the partly filled buckets (in the groups' global
    order), waits for all and writes the sums into the gradient dict.  Every
    member of a group starts the same buckets in the same order, so the
    collectives match; nothing here blocks before ``finish``."""

    def __init__(self, groups: ReplicaGroups, bucket_bytes: int, category: str, events=None):
        self.g = groups
        self.bucket_bytes = int(bucket_bytes)
        self.category = category
        self.events = events
        self._open: dict = {}        # group -> [(node, name, array)], open bucket
        self._size: dict = {}
        self._started: list = []     # (entries, handle)

    def ready(self, node, grads: dict) -> None:
        """The gradients of ``node`` ({param: shard}) are final on this rank."""
        grp = self.g.node_group.get(node)
        if grp is None or grp not in self.g.comms:
            return                   # alone with its slice, or not a holder
        cur = self._open.setdefault(grp, [])
        for name in sorted(grads):
            a = grads[name]
            if cur and self._size.get(grp, 0) + a.nbytes > self.bucket_bytes:
                self._start(grp)
                cur = self._open.setdefault(grp, [])
            cur.append((node, name, a))
            self._size[grp] = self._size.get(grp, 0) + a.nbytes
            if self._size[grp] >= self.bucket_bytes:
                self._start(grp)
                cur = self._open.setdefault(grp, [])
        self.g.cm.progress([h for _, h in self._started])

    def _start(self, grp):
        entries = self._open.pop(grp, [])
        self._size[grp] = 0
        if not entries:
            return
        t0 = time.perf_counter()
        if len(entries) == 1:
            flat = entries[0][2]
        else:
            flat = self.g.cm.backend.xp.concatenate([a.reshape(-1) for _, _, a in entries])
        self._started.append((entries, self.g.cm.iallreduce(flat, self.g.comms[grp], self.category)))
        if self.events is not None:
            self.events.append((self.category, entries[0][0], t0, time.perf_counter()))

    def finish(self, grads: dict) -> dict:
        """Start what is left, wait for every bucket and put the sums into
        ``grads[node][name]``.  Returns grads."""
        for grp in self.g.order:
            if self._open.get(grp):
                self._start(grp)
        t0 = time.perf_counter()
        sums = self.g.cm.wait_allreduce([h for _, h in self._started])
        for (entries, _), red in zip(self._started, sums):
            if len(entries) == 1:
                node, name, a = entries[0]
                grads[node][name] = red.reshape(a.shape)
                continue
            off = 0
            for node, name, a in entries:
                grads[node][name] = red[off:off + a.size].reshape(a.shape)
                off += a.size
        if self.events is not None and self._started:
            self.events.append((self.category, "(wait)", t0, time.perf_counter()))
        self._started = []
        return grads
