"""The plans of the equivalence tests, per world size, and the helpers that
build them by layer kind (so they fit any graph of the test models: the
image networks and the 3-D volume_small)."""
from __future__ import annotations

import numpy as np

from hpcnn.parallel import Layout
from hpcnn.parallel.layout import DIM_NAMES
from hpcnn.runtime.executor import REDIST, exchange_category
from hpcnn.strategy.plan import Plan

DENSE_KINDS = ("linear", "flatten", "global_avgpool")


def fits(node, cfg) -> bool:
    names = DIM_NAMES[len(node.shape)]
    for d, deg in cfg.items():
        if deg == 1:
            continue
        if d not in names or d not in node.op.splittable:
            return False
        if deg > node.shape[names.index(d)]:
            return False
    return True


def degrees(node, cfg):
    names = DIM_NAMES[len(node.shape)]
    return tuple(int(cfg.get(d, 1)) for d in names)


def make_plan(g, world, name, spatial, dense=None, loss=None, ranks=None):
    """spatial / dense / loss: the configuration of image or volume (4-D,
    5-D), 2-D and loss layers (a dict, or a callable node -> dict); ranks: callable
    (node, k) -> list of ranks or None."""
    dense = dense if dense is not None else {"n": world}
    loss = loss if loss is not None else {"n": 1}
    configs, rk = {}, {}
    for n in g:
        rule = spatial if len(n.shape) >= 4 else dense if len(n.shape) == 2 else loss
        cfg = dict(rule(n) if callable(rule) else rule)
        if not fits(n, cfg):
            raise ValueError(f"plan {name}: {cfg} does not fit layer {n.name} {n.shape}")
        configs[n.name] = cfg
        if ranks is not None:
            r = ranks(n, int(np.prod(degrees(n, cfg))))
            if r is not None:
                rk[n.name] = list(r)
    return Plan(g.name, world, g.batch, configs, rk, name=name)


def zigzag_plan(g, world, name, cycle4, cycle2):
    """A plan whose layout changes across every edge: each layer takes the
    next configuration (and a rotated rank set) that differs from all of
    its producers' layouts."""
    configs, rk, layouts = {}, {}, {}
    loss_cycle = [{"n": d} for d in range(world, 0, -1)]
    counters = {4: 0, 2: 0, 1: 0}
    for idx, n in enumerate(g):
        nd = min(len(n.shape), 4)                  # images and volumes share cycle4
        cands = {4: cycle4, 2: cycle2, 1: loss_cycle}[nd]
        chosen = None
        for attempt in range(len(cands) * world):
            cfg = cands[(counters[nd] + attempt) % len(cands)]
            if not fits(n, cfg):
                continue
            deg = degrees(n, cfg)
            k = int(np.prod(deg))
            start = (idx + attempt) % world
            r = [(start + j) % world for j in range(k)]
            L = Layout(n.shape, deg, r)
            if all(exchange_category(layouts[s], L) == REDIST for s in n.inputs):
                chosen = (cfg, r, L)
                counters[nd] += attempt + 1
                break
        if chosen is None:
            raise ValueError(f"zigzag plan {name}: no configuration changes the layout at {n.name}")
        configs[n.name], rk[n.name], layouts[n.name] = chosen
    return Plan(g.name, world, g.batch, configs, rk, name=name)


# Each case: (name, model, builder(g, world) -> Plan, optimiser kind, what it covers)
def cases(world):
    P = world
    out = []

    def add(name, model, fn, opt, covers):
        out.append((f"{model}-{name}", model, fn, opt, covers))

    if P == 2:
        add("n2", "lenet5", lambda g, w: make_plan(g, w, "n2", {"n": 2}, {"n": 2}, {"n": 2}),
            "momentum", "n alone, uneven batch 5/2")
        add("c2", "lenet5", lambda g, w: make_plan(
            g, w, "c2", lambda n: {"c": 2} if n.kind != "input" else {"n": 1}, {"c": 2}, {"n": 1},
            ranks=lambda n, k: [1] if n.kind in ("input", "softmax_xent") else None),
            "nesterov", "c alone; input and loss on one rank (rank 1)")
        add("h2", "resnet_small", lambda g, w: make_plan(
            g, w, "h2", {"h": 2}, {"n": 1}, {"n": 1}, ranks=lambda n, k: [0] if k == 1 else None),
            "momentum", "h alone (stride 2, residual, batch norm); dense on one rank")
        add("w2", "resnet_small", lambda g, w: make_plan(g, w, "w2", {"w": 2}, {"c": 2}, {"n": 2}),
            "decay", "w alone; dense c")
        add("w2", "inception_small", lambda g, w: make_plan(g, w, "w2", {"w": 2}, {"c": 2}, {"n": 2}),
            "nesterov", "w alone through concat, dropout")
        add("c2", "inception_small", lambda g, w: make_plan(
            g, w, "c2", lambda n: {"c": 2} if n.shape[1] >= 2 else {"n": 2}, {"n": 2}, {"n": 2}),
            "momentum", "c alone through concat (uneven 3/2 input channels)")
        add("zigzag", "inception_small", lambda g, w: zigzag_plan(
            g, w, "zigzag", [{"n": 2}, {"h": 2}, {"c": 2}, {"w": 2}, {"n": 1}],
            [{"c": 2}, {"n": 2}, {"n": 1}]), "decay", "layout change on every edge")
        add("zigzag", "lenet5", lambda g, w: zigzag_plan(
            g, w, "zigzag", [{"h": 2}, {"w": 2}, {"n": 2}, {"c": 2}, {"n": 1}],
            [{"n": 2}, {"c": 2}, {"n": 1}]), "nesterov", "layout change on every edge")
        # volumes (n, c, d, h, w): volume_small, 12 x 10 x 14 voxels
        add("d2", "volume_small", lambda g, w: make_plan(g, w, "d2", {"d": 2}, {"n": 2}, {"n": 2}),
            "momentum", "d alone (3-D halos, batch norm over d)")
        add("h2", "volume_small", lambda g, w: make_plan(
            g, w, "h2", {"h": 2}, {"n": 1}, {"n": 1}, ranks=lambda n, k: [1] if k == 1 else None),
            "nesterov", "h alone (uneven 5/2 after the pool); dense and loss on rank 1")
        add("c2", "volume_small", lambda g, w: make_plan(
            g, w, "c2", lambda n: {"c": 2} if n.kind != "input" else {"w": 2}, {"c": 2}, {"n": 2}),
            "decay", "c alone (batch norm over a channel split), input split over w")
        add("zigzag", "volume_small", lambda g, w: zigzag_plan(
            g, w, "zigzag", [{"d": 2}, {"n": 2}, {"w": 2}, {"c": 2}, {"h": 2}, {"n": 1}],
            [{"c": 2}, {"n": 2}, {"n": 1}]), "momentum", "3-D layout change on every edge")
    if P in (2, 4):
        add(f"c{P}", "mobilenet_small", lambda g, w: make_plan(
            g, w, f"c{w}", lambda n: {"c": w} if n.kind != "input" else {"n": w}, {"c": 2}, {"n": 1}),
            "momentum", "depthwise and grouped convs split over channels (no exchange into them)")
        add("h2" if P == 2 else "h2w2", "mobilenet_small", lambda g, w: make_plan(
            g, w, "h2" if w == 2 else "h2w2", {"h": 2} if w == 2 else {"h": 2, "w": 2}, {"n": w}, {"n": w}),
            "nesterov", "depthwise and grouped convs split spatially (halos, stride 2)")
        add(f"n{P}", "mobilenet_small", lambda g, w: make_plan(g, w, f"n{w}", {"n": w}, {"n": w}, {"n": w}),
            "decay", "depthwise and grouped convs split over samples")
    if P == 3:
        add("c3", "mobilenet_small", lambda g, w: make_plan(
            g, w, "c3", lambda n: {"c": 3} if n.kind != "input" else {"n": 3}, {"c": 3}, {"n": 3}),
            "decay", "channel ranges that begin and end inside groups (32/3 over groups of 8)")
        add("h3", "lenet5", lambda g, w: make_plan(g, w, "h3", {"h": 3}, {"n": 3}, {"n": 3}),
            "momentum", "degree 3 on h, interior rank, uneven 28/3, 5/3")
        add("n3", "lenet5", lambda g, w: make_plan(g, w, "n3", {"n": 3}, {"c": 3}, {"n": 1},
                                                   ranks=lambda n, k: [2] if k == 1 else None),
            "decay", "n alone degree 3 (uneven), dense c=3, loss on rank 2")
        add("w3", "resnet_small", lambda g, w: make_plan(g, w, "w3", {"w": 3}, {"c": 2}, {"n": 3},
                                                         ranks=lambda n, k: [2, 0] if k == 2 else None),
            "nesterov", "w=3 interior rank, dense on 2 of 3 ranks")
        add("c3", "resnet_small", lambda g, w: make_plan(
            g, w, "c3", lambda n: {"c": 3} if n.kind != "input" else {"n": 3}, {"c": 3}, {"n": 3}),
            "momentum", "c=3 uneven (8/3, 16/3) with batch norm")
        add("h3", "inception_small", lambda g, w: make_plan(g, w, "h3", {"h": 3}, {"n": 2}, {"n": 1},
                                                            ranks=lambda n, k: [1, 2] if k == 2 else [2] if k == 1 else None),
            "decay", "h=3 interior through concat; dense on ranks 1,2; loss on rank 2")
        add("c3", "inception_small", lambda g, w: make_plan(
            g, w, "c3", lambda n: {"c": 3} if n.shape[1] >= 3 else {"n": 3}, {"c": 3}, {"n": 3}),
            "nesterov", "c=3 over concat branches")
        add("zigzag", "lenet5", lambda g, w: zigzag_plan(
            g, w, "zigzag", [{"h": 3}, {"n": 3}, {"w": 3}, {"c": 3}, {"n": 2}, {"h": 2}],
            [{"c": 3}, {"n": 3}, {"n": 1}, {"c": 2}]), "momentum", "layout change on every edge")
        add("zigzag", "resnet_small", lambda g, w: zigzag_plan(
            g, w, "zigzag", [{"w": 3}, {"h": 3}, {"n": 3}, {"c": 2}, {"n": 1}],
            [{"n": 3}, {"c": 3}, {"n": 1}]), "decay", "layout change on every edge (residuals)")
        add("d3", "volume_small", lambda g, w: make_plan(g, w, "d3", {"d": 3}, {"c": 3}, {"n": 3}),
            "nesterov", "d=3 interior rank (12/3, 6/3, 3/3); dense c=3")
        add("w3", "volume_small", lambda g, w: make_plan(
            g, w, "w3", {"w": 3}, {"n": 3}, {"n": 1}, ranks=lambda n, k: [2] if k == 1 else None),
            "momentum", "w=3 uneven (14/3, 7/3, 4/3); loss on rank 2")
        add("n3", "volume_small", lambda g, w: make_plan(g, w, "n3", {"n": 3}, {"n": 3}, {"n": 3}),
            "decay", "samples alone, uneven 5/3")
        add("zigzag", "volume_small", lambda g, w: zigzag_plan(
            g, w, "zigzag", [{"w": 3}, {"d": 3}, {"n": 3}, {"h": 3}, {"c": 2}, {"d": 2}],
            [{"n": 3}, {"c": 3}, {"n": 1}]), "nesterov", "3-D layout change on every edge")
    elif P == 4:
        add("n2h2", "lenet5", lambda g, w: make_plan(g, w, "n2h2", {"n": 2, "h": 2}, {"n": 4}, {"n": 4}),
            "momentum", "n and h combined, uneven batch 5/4")
        add("h2w2", "lenet5", lambda g, w: make_plan(g, w, "h2w2", {"h": 2, "w": 2}, {"c": 2}, {"n": 1},
                                                     ranks=lambda n, k: [3, 2] if k == 2 else [1] if k == 1 else None),
            "nesterov", "h and w combined; dense c=2 on ranks 3,2; loss on rank 1")
        add("owt", "lenet5", lambda g, w: make_plan(g, w, "owt", {"n": 4}, {"c": 4}, {"n": 2}),
            "decay", "data parallel convolutions, channel parallel dense layers")
        add("n2c2", "resnet_small", lambda g, w: make_plan(
            g, w, "n2c2", lambda n: {"n": 2, "c": 2} if n.kind != "input" else {"n": 4}, {"n": 2, "c": 2}, {"n": 2}),
            "momentum", "n and c combined with batch norm")
        add("h4", "resnet_small", lambda g, w: make_plan(g, w, "h4", {"h": 4}, {"n": 4}, {"n": 4}),
            "nesterov", "h=4 interior ranks, uneven after stride 2 (6/4)")
        add("subset", "resnet_small", lambda g, w: make_plan(
            g, w, "subset", {"h": 3}, {"n": 1}, {"n": 1},
            ranks=lambda n, k: [1, 2, 3] if k == 3 else [0]), "decay",
            "convolutions on 3 of 4 ranks, dense and loss on rank 0")
        add("w4", "inception_small", lambda g, w: make_plan(g, w, "w4", {"w": 4}, {"n": 4}, {"n": 4}),
            "momentum", "w=4 interior ranks, uneven 10/4 and 5/4")
        add("c2h2", "inception_small", lambda g, w: make_plan(
            g, w, "c2h2", lambda n: {"c": 2, "h": 2} if n.shape[1] >= 2 else {"h": 2, "w": 2},
            {"n": 2, "c": 2}, {"n": 4}), "nesterov", "c and h combined over concat")
        add("zigzag", "resnet_small", lambda g, w: zigzag_plan(
            g, w, "zigzag", [{"n": 2, "h": 2}, {"w": 4}, {"c": 2, "w": 2}, {"h": 3}, {"n": 4}, {"c": 4}, {"n": 1}],
            [{"n": 4}, {"c": 2}, {"n": 2, "c": 2}, {"n": 1}]), "decay", "layout change on every edge")
        add("zigzag", "inception_small", lambda g, w: zigzag_plan(
            g, w, "zigzag", [{"h": 2, "w": 2}, {"c": 4}, {"n": 3}, {"w": 3}, {"n": 2, "c": 2}, {"h": 1}],
            [{"c": 4}, {"n": 3}, {"n": 1}, {"n": 2, "c": 2}]), "momentum", "layout change on every edge")
        add("h2c2", "digits_cnn", lambda g, w: make_plan(
            g, w, "h2c2", lambda n: {"h": 2, "c": 2} if n.shape[1] >= 2 else {"n": 4}, {"n": 2, "c": 2},
            {"n": 4}), "decay", "dropout on a (n, c) split, batch norm on (c, h)")
        add("d2h2", "volume_small", lambda g, w: make_plan(g, w, "d2h2", {"d": 2, "h": 2}, {"n": 4}, {"n": 4}),
            "momentum", "d and h combined (3-D corner halos)")
        add("d2h2w", "volume_small", lambda g, w: make_plan(
            g, w, "d2h2w", lambda n: {"d": 2, "w": 2} if n.shape[2] >= 6 else {"h": 2, "w": 2},
            {"c": 2}, {"n": 1}, ranks=lambda n, k: [3, 2] if k == 2 else [1] if k == 1 else None),
            "nesterov", "d x w then h x w after the pools; dense c=2 on ranks 3,2; loss on rank 1")
        add("n2d2", "volume_small", lambda g, w: make_plan(
            g, w, "n2d2", lambda n: {"n": 2, "d": 2} if n.kind != "input" else {"n": 4},
            {"n": 2, "c": 2}, {"n": 2}), "decay", "n and d combined, batch norm over both")
        add("c2w2", "volume_small", lambda g, w: make_plan(
            g, w, "c2w2", lambda n: {"c": 2, "w": 2} if n.shape[1] >= 2 else {"d": 4}, {"c": 2}, {"n": 4}),
            "momentum", "c and w combined, the input (2 channels) too")
        add("subset", "volume_small", lambda g, w: make_plan(
            g, w, "subset", lambda n: {"d": 3} if n.shape[2] >= 3 else {"n": 1}, {"n": 1}, {"n": 1},
            ranks=lambda n, k: [1, 2, 3] if k == 3 else [0]), "nesterov",
            "volumes on 3 of 4 ranks, dense and loss on rank 0")
        add("zigzag", "volume_small", lambda g, w: zigzag_plan(
            g, w, "zigzag", [{"d": 2, "h": 2}, {"w": 4}, {"c": 2, "d": 2}, {"n": 4}, {"h": 3}, {"c": 4}, {"n": 1}],
            [{"n": 4}, {"c": 2}, {"n": 2, "c": 2}, {"n": 1}]), "momentum", "3-D layout change on every edge")
    return out


OPTIMISERS = {
    "momentum": dict(lr=0.05, momentum=0.9),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "decay": dict(lr=0.05, momentum=0.5, weight_decay=1e-3),
}
