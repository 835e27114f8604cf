"""Norms of whole logical parameters from their shards, under a plan.

A layer with degrees (pn, pc, ph, pw) holds each parameter split over its
output channels into pc shards, each replicated on the pn*ph*pw ranks that
share its channel range.  The ranks that share the n, d, h, w coordinates of a
rank and differ in c (``Layout.groups(("c",))``, the layer's *c-direction
group*) hold every shard exactly once, so summing a shard's sums of squares
over that group gives the whole tensor's, with no replica counted twice.
Every c-direction group of a layer computes the same sum: replicas hold
bitwise-equal shards, and the sum is taken in the same order everywhere
(the values are gathered and added in channel order, not left to the
reduction order of an Allreduce), so replicas stay bitwise equal after a
step that uses it.

``ShardNorms.layer_sums`` reduces the vectors of all the layers that share
one group in one Allgather (each layer's values exactly once), the groups
in one global order so that overlapping groups cannot deadlock.
``ShardNorms.total`` sums one value per layer over the whole network: the
first rank of each layer's layout contributes it, every other rank adds
zero, in one Allreduce over all ranks; each rank then adds the layers up in
graph order, so the total is the same float on every rank.
"""
from __future__ import annotations

import numpy as np

from hpcnn.parallel.groups import ReplicaGroups
from hpcnn.runtime.optimizers import WholeTensors

#: the dimension a layer's parameter shards differ in
SHARD_DIMS = ("c",)


class ShardNorms:
    """The norm reducer of a DistributedModel (built collectively: it
    splits the communicators of the c-direction groups once)."""

    def __init__(self, model):
        g = model.graph
        self.cm = model.cm
        self.rank = model.rank
        self.layouts = {n: model.layouts[n] for n in g.nodes if g[n].param_specs()}
        self.layers = list(self.layouts)             # graph order
        self.groups = ReplicaGroups(self.cm, self.layouts, dims=SHARD_DIMS)

    def layer_sums(self, local: dict) -> dict:
        """{node: float64 vector of this rank's partial sums} -> {node: the
        sums over the layer's c-direction group} (the whole tensors').
        Every member of a group passes the same layers with vectors of the
        same length.  Collective over the groups."""
        out = {n: np.asarray(v, dtype=np.float64) for n, v in local.items()}
        by_group: dict = {}
        for n in out:
            grp = self.groups.group(n)
            if grp is not None and len(grp) > 1:
                by_group.setdefault(grp, []).append(n)
        for grp in self.groups.order:
            nodes = by_group.get(grp)
            if not nodes:
                continue
            comm = self.groups.comms[grp]
            send = np.ascontiguousarray(np.concatenate([out[n] for n in nodes]))
            recv = np.empty((comm.Get_size(), send.size), dtype=np.float64)
            comm.Allgather(send, recv)
            self.cm.counter.add("optimizer", send.nbytes * (comm.Get_size() - 1), nodes[0], calls=1)
            # comm ranks are in global rank order (Split by rank); add the
            # shards in channel order, the group's layout order
            by_rank = dict(zip(sorted(grp), recv))
            whole = by_rank[grp[0]].copy()
            for r in grp[1:]:
                whole += by_rank[r]
            off = 0
            for n in nodes:
                k = out[n].size
                out[n] = whole[off:off + k]
                off += k
        return out

    def total(self, values: dict) -> float:
        """The sum over every parameter layer of the network of its value
        (a float each, whole-tensor sums from ``layer_sums``), each layer
        counted once.  Collective over all ranks."""
        vec = np.zeros(len(self.layers))
        for i, n in enumerate(self.layers):
            # a layer without a value (no gradient: it does not reach the loss) adds 0
            if self.layouts[n].ranks[0] == self.rank:
                vec[i] = float(values.get(n, 0.0))
        summed = self.cm.allreduce_scalars(vec, category="optimizer")
        t = 0.0
        for v in summed:
            t += float(v)
        return t

    def free(self):
        self.groups.free()


def norms_for(model):
    """The norm reducer that fits ``model``: ShardNorms for a
    DistributedModel (collective), WholeTensors for a model of whole
    tensors."""
    if hasattr(model, "layouts") and hasattr(model, "cm"):
        return ShardNorms(model)
    return WholeTensors()
