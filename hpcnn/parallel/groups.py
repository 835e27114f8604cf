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

The gradient allreduce walks the groups in one global order (the order in
which layers first use them) and, within a group, packs the gradients of its
layers into buckets of at most ``bucket_bytes`` (a larger tensor is a bucket
of its own), one Allreduce per bucket.  Since every rank follows the same
order, collectives on overlapping groups cannot deadlock.
"""
from __future__ import annotations

from mpi4py import MPI

from hpcnn.parallel.layout import Layout

__all__ = ["ReplicaGroups", "REPLICA_DIMS"]

REPLICA_DIMS = ("n", "h", "w")


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

    def allreduce(self, arr, node, category="batchnorm"):
        """Sum ``arr`` over ``node``'s replica group (a copy when alone)."""
        return self.cm.allreduce(arr, self.comm(node), category=category, key=node)

    def allreduce_gradients(self, grads: dict, bucket_bytes: int = 4 << 20,
                            category="allreduce", events=None) -> dict:
        """Sum every parameter gradient over its replica group, in place.

        grads[node][name] is this rank's gradient shard (every rank of a
        group holds the same nodes and shapes).  Returns grads."""
        import time
        xp = self.cm.backend.xp
        for g in self.order:
            if g not in self.comms:
                continue      # not a member: the members reduce among themselves
            comm = self.comms[g]
            tensors = [(node, name, a) for node in self._members[g] if self.node_group.get(node) == g
                       for name, a in sorted(grads.get(node, {}).items())]
            buckets, cur, size = [], [], 0
            for t in tensors:
                nb = t[2].nbytes
                if cur and size + nb > bucket_bytes:
                    buckets.append(cur)
                    cur, size = [], 0
                cur.append(t)
                size += nb
            if cur:
                buckets.append(cur)
            for bucket in buckets:
                t0 = time.perf_counter()
                if len(bucket) == 1:
                    node, name, a = bucket[0]
                    grads[node][name] = self.cm.allreduce(a, comm, category=category)
                else:
                    flat = xp.concatenate([a.reshape(-1) for _, _, a in bucket])
                    red = self.cm.allreduce(flat, comm, category=category)
                    off = 0
                    for node, name, a in bucket:
                        grads[node][name] = red[off:off + a.size].reshape(a.shape)
                        off += a.size
                if events is not None:
                    # one event per layer, the bucket's time shared by bytes
                    t1 = time.perf_counter()
                    total = sum(a.nbytes for _, _, a in bucket) or 1
                    per_node = {}
                    for node, _, a in bucket:
                        per_node[node] = per_node.get(node, 0) + a.nbytes
                    t = t0
                    for node, nb in per_node.items():
                        dt = (t1 - t0) * nb / total
                        events.append((category, node, t, t + dt))
                        t += dt
        return grads

    def free(self):
        for c in self.comms.values():
            c.Free()
        self.comms.clear()
