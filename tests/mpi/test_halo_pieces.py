"""Halos as pieces, under MPI.

* No stale halo: the region a convolution reads is made of views of the
  producer's tile and of buffers fresh for each exchange, and the adjoint
  sums into the tile's gradient in place; two exchanges (and two adjoints)
  of ONE plan in flight at once, with pieces short enough to go through the
  plan's persistent pack and staging buffers, each keep their own data; a
  chain of identical convolutions (one plan for all its edges) trained on
  new data every step equals the sequential run step by step, with the
  reference kernels too (which keep views of their inputs for backward).
  A chain of 1x1 convolutions over channel pieces, which the kernels keep
  for backward without a copy, does the same.
* A halo wider than a neighbour's tile (dilated 7x7 windows over tiles of
  two or three rows) through the executor, with overlap on and off.
* transport='auto' chooses one transport per plan, the same on every rank,
  and records it in the trace."""
import numpy as np
import pytest

from hpcnn.backend import Backend
from hpcnn.graph import Graph
from hpcnn.ops import kernel_set, make_op
from hpcnn.ops.kernel_set import kernel_state, restore_kernel_state  # noqa: E402
from hpcnn.parallel import ExchangePlan, Layout, needed_boxes
from hpcnn.parallel.comm import TRANSPORTS, Communicator
from hpcnn.runtime.executor import DistributedModel
from hpcnn.runtime.sequential import SequentialModel
from hpcnn.runtime.sgd import SGD
from hpcnn.strategy.plan import Plan

from mpi_helpers import WORLD, agree, run_or_abort

pytestmark = pytest.mark.mpi

P = WORLD.Get_size()
ME = WORLD.Get_rank()


def _channels_last(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_two_exchanges_of_one_plan_in_flight_keep_their_own_data(transport):
    """Halo plus channel split (c=2 over a 3x3 window needs every input
    channel: pieces of 4-float runs, packed) on channels-last tiles."""
    cm = Communicator(WORLD, Backend("numpy"), transport=transport)
    problems = []

    def run():
        shape = (2, 6, 3 * P + 2, 5)
        conv = make_op("conv2d", "c", out_channels=4, kernel_size=3, padding=1)
        deg = (1, 2, max(1, P // 2), 1) if P >= 2 else (1, 1, 1, 1)
        src = Layout(shape, deg)
        dst = Layout(conv.infer_shape([shape]), deg)
        plan = ExchangePlan.compile(src, needed_boxes(conv, 0, dst, [shape]), 8)
        rng = np.random.default_rng(5)
        xa, xb = rng.standard_normal(shape), rng.standard_normal(shape)
        sb, need = src.box(ME), plan.need(ME)
        ta = _channels_last(xa[sb.slices()]) if sb is not None else None
        tb = _channels_last(xb[sb.slices()]) if sb is not None else None
        f1 = cm.start_exchange(plan, ta, np.float64, tag=1, key="a", pieces=True)
        f2 = cm.start_exchange(plan, tb, np.float64, tag=2, key="b", pieces=True)
        r2, r1 = f2.finish(), f1.finish()
        # blocking, one after the other: the first region is not overwritten
        r3 = cm.exchange(plan, ta, np.float64, tag=3, key="c", pieces=True)
        r4 = cm.exchange(plan, tb, np.float64, tag=4, key="d")
        if need is not None:
            for name, r, x in (("first in flight", r1, xa), ("second in flight", r2, xb),
                               ("blocking, then another", r3, xa)):
                got = r.assemble() if hasattr(r, "assemble") else r
                if not np.array_equal(got, x[need.slices()]):
                    problems.append(f"{name}: the region differs from the global slice {need}")
            if not np.array_equal(r4, xb[need.slices()]):
                problems.append("the assembled region differs from the global slice")
        # two adjoints of the plan in flight: each sums its own gradients
        ga = rng.standard_normal(need.shape) if need is not None else None
        gb = rng.standard_normal(need.shape) if need is not None else None
        ga_kept = None if ga is None else ga.copy()
        a1 = cm.start_adjoint(plan, ga, np.float64, tag=5, key="a")
        a2 = cm.start_adjoint(plan, gb, np.float64, tag=6, key="b")
        acc_b, acc_a = a2.finish(), a1.finish()
        if ga is not None and not np.array_equal(ga, ga_kept):
            problems.append("the adjoint wrote into the region gradient it was given")
        # the adjoint's reference: every rank's region gradients summed into a global tensor
        tot_a, tot_b = np.zeros(shape), np.zeros(shape)
        for r, (na, a, b) in enumerate(WORLD.allgather((need, ga, gb))):
            if na is not None:
                tot_a[na.slices()] += a
                tot_b[na.slices()] += b
        if sb is not None:
            for name, acc, tot in (("first", acc_a, tot_a), ("second", acc_b, tot_b)):
                if not np.allclose(acc, tot[sb.slices()], rtol=1e-13, atol=1e-13):
                    problems.append(f"{name} adjoint in flight: the tile's gradient differs")

    run_or_abort(run)
    cm.free()
    agree(problems, f"two flights of one plan over {transport}")


def _chain(batch, h, w, wide=False):
    """Identical convolutions (one exchange plan for every edge between
    them), or a dilated 7x7 window (a halo wider than a neighbour's tile)."""
    g = Graph("chain")
    x = g.input((batch, 3, h, w))
    x = g.conv(x, 4, 3, padding=1, name="conv0")
    if wide:
        x = g.relu(x, name="relu0")
        x = g.conv(x, 4, 7, padding=6, dilation=2, name="wide")
    for i in range(1, 4):
        x = g.relu(x, name=f"relu{i}")
        x = g.conv(x, 4, 3, padding=1, name=f"conv{i}")
    x = g.global_avgpool(x, name="avgpool")
    x = g.linear(x, 3, name="fc")
    g.loss(x)
    return g


def _pointwise_chain(batch, h, w):
    """1x1 convolutions over channels split across the ranks: each reads
    every channel, the other ranks' as pieces that the kernels keep (not a
    copy) for the weight gradient."""
    g = Graph("pointwise")
    x = g.input((batch, 3, h, w))
    x = g.conv(x, 4, 3, padding=1, name="conv0")
    for i in range(1, 4):
        x = g.relu(x, name=f"relu{i}")
        x = g.conv(x, 4, 1, name=f"conv{i}")
    x = g.global_avgpool(x, name="avgpool")
    x = g.linear(x, 3, name="fc")
    g.loss(x)
    return g


def _spatial_plan(g, world, dim="h"):
    cfg = {}
    for n in g:
        cfg[n.name] = {dim: world} if len(n.shape) == 4 and n.kind != "input" else {"n": 1}
    return Plan(g.name, world, g.batch, cfg, {n.name: [0] for n in g if cfg[n.name] == {"n": 1}},
                name=dim)


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(b), 1e-300))


def _train_and_compare(g, kernels, overlap, transport, fresh_data=True, steps=3, dim="h", plan=None):
    """Steps on new data every step against the sequential model (under
    ``plan``, else every 4-D layer split over ``dim``); this rank's
    problems."""
    problems = []
    before = kernel_state()
    kernel_set(kernels)
    try:
        plan = plan or _spatial_plan(g, P, dim)
        seq = SequentialModel(g, np.float64, 7, Backend("numpy"))
        dm = DistributedModel(g, plan, WORLD, dtype=np.float64, seed=7, backend=Backend("numpy"),
                              transport=transport, overlap=overlap, trace=True, setup=False)
        s_seq, s_dm = SGD(lr=0.1, momentum=0.9), SGD(lr=0.1, momentum=0.9)
        rng = np.random.default_rng(99)
        for s in range(steps):
            x = rng.standard_normal(g[g.input_name].shape)
            y = rng.integers(0, 3, size=g.batch)
            if s and not fresh_data:
                x = x0
            x0 = x
            l_seq, _ = seq.forward(x, y, training=True, step=s)
            gs = seq.backward()
            s_seq.step_nodes(seq.params, gs)
            box = dm.input_box()
            l_dm = dm.train_step(x[box.slices()] if box is not None else None, y, s_dm, step=s)
            if _rel(l_dm, l_seq) > 1e-9:
                problems.append(f"step {s}: loss {l_dm!r} vs sequential {l_seq!r}")
            for node, ps in dm.grads.items():
                for k, v in ps.items():
                    want = gs[node][k][dm.param_box(node, k).slices()]
                    if _rel(v, want) > 1e-9:
                        problems.append(f"step {s}: gradient {node}.{k} rel err {_rel(v, want):.1e}")
        if overlap and P > 1 and not any(c.endswith(" in flight") for c, *_ in dm.flights):
            problems.append("no exchange was traced in flight")
        dm.free()
    finally:
        restore_kernel_state(before)
    return problems


@pytest.mark.parametrize("kernels", ["fast", "reference"])
@pytest.mark.parametrize("overlap", [True, False])
def test_chain_of_one_plan_on_new_data_equals_sequential(kernels, overlap):
    g = _chain(2, 4 * P + 1, 5)
    problems = run_or_abort(_train_and_compare, g, kernels, overlap, "p2p")
    agree(problems, f"chain of identical convolutions ({kernels} kernels, overlap {overlap})")


@pytest.mark.parametrize("kernels", ["fast", "reference"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pointwise_chain_over_channel_pieces_equals_sequential(kernels, transport):
    g = _pointwise_chain(2, 5, 4)
    problems = run_or_abort(_train_and_compare, g, kernels, True, transport, dim="c")
    agree(problems, f"1x1 convolutions over channel pieces ({kernels} kernels, {transport})")


@pytest.mark.parametrize("overlap,transport", [(True, "p2p"), (False, "alltoallw"), (True, "neighbor")])
def test_halo_wider_than_a_neighbours_tile_through_the_executor(overlap, transport):
    g = _chain(2, 2 * P + 1, 5, wide=True)
    L = _spatial_plan(g, P).layouts(g)
    n = g["wide"]
    plan = ExchangePlan.compile(L[n.inputs[0]], needed_boxes(n.op, 0, L["wide"], n.in_shapes), 8)
    senders = {d: {s for s, d2, _ in plan.pieces if d2 == d and s != d} for d in range(P)}
    if P >= 3:
        assert max(len(v) for v in senders.values()) >= 2, f"no rank receives from two others: {senders}"
    problems = run_or_abort(_train_and_compare, g, "fast", overlap, transport)
    agree(problems, f"wide halo (overlap {overlap}, {transport})")


def _remote_region_plan(g, world):
    """conv0 split over channels on ranks 0 and 1 only; conv1 (3x3) split
    over height on every rank: ranks 2.. hold none of their region, whose
    parts split the channels (so conv1 assembles them)."""
    cfg, ranks = {}, {}
    for n in g:
        if n.name in ("conv0", "relu1"):
            cfg[n.name], ranks[n.name] = {"c": 2}, [0, 1]
        elif len(n.shape) == 4 and n.kind != "input":
            cfg[n.name] = {"h": world}
        else:
            cfg[n.name], ranks[n.name] = {"n": 1}, [0]
    return Plan(g.name, world, g.batch, cfg, ranks, name="remote-region")


@pytest.mark.parametrize("overlap", [True, False])
def test_a_rank_that_holds_none_of_its_channel_split_region_convolves_it(overlap):
    """A 3x3 convolution whose region comes wholly from other ranks, split
    over channels (assembled, not convolved part by part): it waits for the
    parts before it reads any (found on 2 emulated nodes x 2 ranks, where
    the assembling path read the first part before the wait)."""
    if P < 3:
        pytest.skip("needs a rank outside the producer's two")
    g = Graph("remote")
    x = g.input((2, 3, 2 * P + 1, 5))
    x = g.conv(x, 4, 3, padding=1, name="conv0")
    x = g.relu(x, name="relu1")
    x = g.conv(x, 4, 3, padding=1, name="conv1")
    x = g.relu(x, name="relu2")
    x = g.global_avgpool(x, name="avgpool")
    g.loss(g.linear(x, 3, name="fc"))

    plan = _remote_region_plan(g, P)
    L = plan.layouts(g)
    assert ME in L["conv1"] and (ME < 2) == (ME in L["relu1"])
    problems = run_or_abort(_train_and_compare, g, "fast", overlap, "p2p", steps=2, plan=plan)
    agree(problems, f"region wholly from other ranks (overlap {overlap})")


def test_auto_transport_is_one_choice_on_every_rank_and_traced():
    g = _chain(2, 3 * P + 1, 6)
    problems = []

    def run():
        dm = DistributedModel(g, _spatial_plan(g, P), WORLD, dtype=np.float64, seed=1,
                              backend=Backend("numpy"), transport="auto", trace=True, setup=False)
        choice = {k: v["transport"] for k, v in dm.transport_choice.items()}
        moving = {e.key for e in dm.edges.values() if e.traffic}
        if set(choice) != moving:
            problems.append(f"choices for {sorted(choice)}, moving edges {sorted(moving)}")
        if any(t not in TRANSPORTS for t in choice.values()):
            problems.append(f"unknown transports chosen: {choice}")
        if any(e.transport != choice[e.key] for e in dm.edges.values() if e.key in choice):
            problems.append("an edge runs on another transport than the one chosen")
        if len({repr(sorted(c.items())) for c in WORLD.allgather(choice)}) != 1:
            problems.append("ranks chose different transports")
        if moving and not [ev for ev in dm.events if ev[0] == "transport"]:
            problems.append("the choice is not in the trace")
        dm.free()

    run_or_abort(run)
    problems += run_or_abort(_train_and_compare, g, "fast", True, "auto", steps=2)
    agree(problems, "auto transport")
