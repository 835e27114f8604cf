"""The price of one whole plan, and the bytes its training step moves.

``price_plan`` prices any plan (inside the searched space or not, on any
ranks) layer by layer as the search does (``PlanCost.objective``) and adds
what only the whole plan determines (``PlanCost.total``):

* the runtime's gradient buckets: per replica group, the gradients of its
  layers in the order backward produces them, packed into buckets of at most
  ``bucket_bytes``, one allreduce per bucket (instead of a share of a
  latency per layer);
* with calibrated runtime figures, the waits for the slowest rank after
  every stretch of compute that ends in a synchronisation (an exchange that
  moves data, a reduction) instead of after every layer, and the executor's
  own time per layer and per step.

``rank_bytes`` gives, per rank, the bytes the runtime's byte counter
records in one step (``DistributedModel.step_bytes()`` / ``edge_bytes()``),
from the same exchange counts the cost model prices.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcnn.parallel.exchange_counts import rank_counts
from hpcnn.parallel.exchange_plan import exchange_category
from hpcnn.parallel.layout import DIM_NAMES, Layout
from hpcnn.strategy.cost_model import BACKWARD_FLOPS, CostModel, CostModelError, EdgeCost
from hpcnn.strategy.machine import parameter_server_time

__all__ = ["PlanCost", "price_plan", "rank_bytes", "gradient_sync"]


@dataclass
class PlanCost:
    """The predicted iteration of one plan, per layer and in total."""
    rows: list                 # one dict per layer
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


def _layouts(model: CostModel, plan) -> dict:
    try:
        plan.validate(model.graph, model.ranks)
        return plan.layouts(model.graph)
    except Exception as exc:
        raise CostModelError(str(exc)) from None


def _default_ranks(L: Layout) -> bool:
    return L.ranks == tuple(range(L.k))


def gradient_sync(model: CostModel, layouts: dict) -> tuple:
    """(seconds, payload bytes per rank) of the gradient allreduces of one
    step as the runtime performs them: per replica group, in the order
    layers first use the group, gradients packed into buckets of at most
    ``bucket_bytes``, one allreduce per bucket.  Seconds: the busiest rank's
    sum."""
    g, isz = model.graph, model.itemsize
    per_rank_t = np.zeros(model.ranks)
    per_rank_b = np.zeros(model.ranks)
    members, order, link_of = {}, [], {}
    for n in g:
        L = layouts[n.name]
        if not (n.param_specs() or n.buffer_specs()):
            continue
        for grp in L.replica_groups():
            if len(grp) <= 1:
                continue
            if grp not in members:
                members[grp] = []
                order.append(grp)
                link_of[grp] = model.group_link(tuple(L.degrees), DIM_NAMES[len(n.shape)])
            members[grp].append(n.name)
    for grp in order:
        sizes = []
        for name in members[grp]:
            if name not in model.live:
                continue                # no gradient reaches it
            cc = layouts[name].extent(grp[0], "c")
            for _, sp in sorted(g[name].param_specs().items()):
                if sp.trainable:
                    sizes.append(cc * int(np.prod(sp.shape[1:])) * isz)
        buckets, cur = [], 0
        for b in sizes:
            if cur and cur + b > model.bucket_bytes:
                buckets.append(cur)
                cur = 0
            cur += b
        if cur:
            buckets.append(cur)
        link, share = link_of[grp]
        if model.machine.gradient_sync == "parameter_server":
            t = sum(parameter_server_time(b, len(grp), link) for b in buckets)
        else:
            t = sum(sum(model.allreduce_parts(b, len(grp), link, share)) for b in buckets)
        for r in grp:
            per_rank_t[r] += t
            per_rank_b[r] += sum(buckets)
    return float(per_rank_t.max(initial=0.0)), per_rank_b


def stretch_waits(model: CostModel, tiles, sync_in, sync_back, reduces) -> float:
    """The waits of a whole step (calibrated runtimes): the compute between
    two synchronisations is a stretch; after each the ranks wait for the
    slowest (``RuntimeFigures.wait_after``, with the figures of an exchange
    or of a reduction by what ends the stretch).  Forward, a stretch ends
    before a layer whose input exchange moves data and inside a layer that
    reduces over its replicas; backward, after such a layer and before an
    adjoint exchange that moves data; the loss reduction ends the forward
    and the gradient reduction the backward.  A layer's tile splits into
    forward and backward by their flops."""
    rt = model.rt
    if rt is None or (rt.skew <= 0 and not rt.exchange_skew):
        return 0.0
    out = 0.0
    order = list(model.graph)
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
        if n.name not in model.live:
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


def overheads(model: CostModel) -> float:
    """Seconds per step the executor spends beyond ops, exchanges and
    synchronisation: its time per layer and per step, and the loss's
    reduction over all ranks (calibrated runtime figures; 0 without)."""
    rt = model.rt
    if rt is None:
        return 0.0
    layers = sum(1 for n in model.graph if n.kind != "input")
    t = rt.node_overhead_s * layers + rt.step_overhead_s
    if model.ranks > 1:
        m = model.machine
        link = m.inter if m.nodes_for(model.ranks) > 1 else m.intra
        t += sum(model.allreduce_parts(8, model.ranks, link))
    return float(t)


def _edge(model: CostModel, layouts, where, n, i, src, d) -> EdgeCost:
    """The cost of input ``i`` of layer ``n`` under the plan's layouts: from
    the search's cached tables when both ends are configurations of the
    searched space on their default ranks, else for this pair alone."""
    sp = model.space
    Ls, Ld = layouts[src], layouts[n.name]
    if not (_default_ranks(Ls) and _default_ranks(Ld)):
        tab = model.layout_tables(Ls, Ld, n.name, i)
        return EdgeCost(model.edge_seconds(tab, src, n.name, i, d, np.array([Ls.degrees])), tab)
    (gs, cs), (gi, ci) = where[src], where[n.name]
    if cs is not None and ci is not None and gs != gi:
        ec = model.edge_cost(src, n.name, i, sp.configs[gs], sp.configs[gi])
        return EdgeCost(ec.t_x[cs:cs + 1, ci:ci + 1], type(ec.tables)(
            *(a[cs:cs + 1, ci:ci + 1] for a in
              (ec.tables.max_rank, ec.tables.node_inter, ec.tables.messages, ec.tables.total))))
    return model.edge_cost(src, n.name, i, np.array([Ls.degrees]), d)


def price_plan(model: CostModel, plan, name: str | None = None) -> PlanCost:
    """Price ``plan`` layer by layer as the search does (``objective``) and
    as a whole (``total``); see the module text."""
    g, sp = model.graph, model.space
    layouts = _layouts(model, plan)
    deg = {n.name: np.array([layouts[n.name].degrees]) for n in g}
    # where a layer's configuration is in the searched space, read the
    # search's (cached) costs instead of pricing it again
    where = {}
    for n in g:
        gi = sp.group_of[n.name]
        hit = np.nonzero((sp.configs[gi] == deg[n.name][0]).all(axis=1))[0]
        where[n.name] = (gi, int(hit[0]) if len(hit) else None)
    rows, tc, ts, tx, memt, xbytes, abytes, red_sync = [], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    # for the waits after stretches of compute: each layer's tile and
    # where the ranks synchronise (exchanges that move data, reductions)
    tiles, sync_in, sync_back, reduces, layer_skew = {}, {}, {}, {}, 0.0
    for n in g:
        d = deg[n.name]
        gi, ci = where[n.name]
        # a member of its producer's fold group on the producer's layout:
        # the exchange between them is the identity
        folded = (len(n.inputs) == 1 and gi == sp.group_of[n.inputs[0]]
                  and layouts[n.inputs[0]] == layouts[n.name])
        if ci is not None:
            nc = model.node_cost(n.name, sp.configs[gi], with_inputs=not folded).row(ci)
        else:
            nc = model.node_cost(n.name, d, with_inputs=not folded)
        ex_t, ex_b, ex_x = 0.0, 0.0, 0.0
        for i, src in enumerate([] if folded else n.inputs):
            dirs = model.directions(src, n.name)
            ec = _edge(model, layouts, where, n, i, src, d)
            ex_t += float(ec.t_x[0, 0])
            if ec.tables.max_rank[0, 0] > 0:
                sync_in[n.name] = True
                sync_back[n.name] = sync_back.get(n.name, False) or dirs == 2
            ex_b += float(ec.tables.max_rank[0, 0]) * model.itemsize
            ex_x += float(ec.tables.node_inter[0, 0]) * model.itemsize
            xbytes += dirs * float(ec.tables.total[0, 0]) * model.itemsize
        dims = DIM_NAMES[len(n.shape)]
        dd = tuple(int(x) for x in d[0])
        pc = dd[dims.index("c")] if "c" in dims else 1
        grp = int(np.prod(dd)) // pc
        tiles[n.name] = float(nc.tile[0])
        layer_skew += float(nc.skew[0])
        channels = -(-n.shape[1] // pc) if len(n.shape) > 1 else 1
        reduces[n.name] = grp > 1 and any(n.op.tile_reductions(channels).values())
        if grp > 1:
            shard = sum(s.shard_size(pc) for s in n.param_specs().values() if s.trainable)
            moved = grp if model.machine.gradient_sync == "parameter_server" else grp - 1
            abytes += 2.0 * moved * shard * model.itemsize * pc
            red_sync += model.reductions_seconds(n, channels, grp, model.group_link(dd, dims)[0])
        row = {"node": n.name, "op": n.kind, "config": {a: int(b) for a, b in zip(dims, dd)},
               "ranks": int(np.prod(dd)), "t_c": float(nc.t_c[0]), "t_s": float(nc.t_s[0]), "t_x": ex_t,
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
    grad_sync, _ = gradient_sync(model, layouts)
    tc += stretch_waits(model, tiles, sync_in, sync_back, reduces) - layer_skew
    return PlanCost(rows, tc, grad_sync + red_sync, tx, memt, xbytes, abytes, name or plan.name,
                    t_o=overheads(model), objective=objective)


def rank_bytes(model: CostModel, plan) -> list:
    """Per rank, the bytes the runtime's counter records in one training
    step (``DistributedModel.step_bytes()`` and ``edge_bytes()``): for every
    exchange edge ``'producer->consumer[i]'`` the bytes the rank sends
    forward and, backward, sends back (what it received forward), and
    messages likewise; per category ('halo' when producer and consumer
    share a layout, else 'redistribution'), 'allreduce' (gradient buckets
    handed to MPI), 'batchnorm' (the op's own reductions,
    ``Op.tile_reductions``) and 'scalars' (the loss: one float64)."""
    g, isz, P = model.graph, model.itemsize, model.ranks
    layouts = _layouts(model, plan)
    out = [{"edges": {}, "halo": 0, "redistribution": 0, "allreduce": 0, "batchnorm": 0,
            "scalars": 8} for _ in range(P)]
    for n in g:
        Ld = layouts[n.name]
        for i, src in enumerate(n.inputs):
            Ls = layouts[src]
            rc = rank_counts(model.geometry(n.name).inputs[i], Ls, Ld, P, model.machine.ranks_per_node)
            back = model.directions(src, n.name) == 2
            cat = exchange_category(Ls, Ld)
            key = f"{src}->{n.name}[{i}]"
            for r in range(P):
                fwd = int(rc.sent[r]) * isz
                bwd = int(rc.received[r]) * isz if back else 0
                if fwd or bwd:
                    out[r]["edges"][key] = {
                        "forward": fwd, "backward": bwd,
                        "messages_forward": int(rc.messages_sent[r]),
                        "messages_backward": int(rc.messages_received[r]) if back else 0}
                    out[r][cat] += fwd + bwd
    _, grad = gradient_sync(model, layouts)
    for r in range(P):
        out[r]["allreduce"] = int(grad[r])
    for n in g:
        if n.name not in model.live:
            continue
        L = layouts[n.name]
        size = {r: len(grp) for grp in L.replica_groups() for r in grp}
        for r in L.ranks:
            if size[r] > 1:
                red = n.op.tile_reductions(L.extent(r, "c"))
                out[r]["batchnorm"] += sum(sum(calls) for calls in red.values()) * isz
    return out
