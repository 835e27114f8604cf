"""The cost model: exchange-byte tables equal the box computation (and the
runtime's ExchangePlan) exactly; node costs, memory, machines, the memory
limit, and the search over real cost tables equal brute force."""
import copy
import itertools
import json

import numpy as np
import pytest

from hpcnn.graph import Graph
from hpcnn.models import build_model
from hpcnn.parallel.layout import Layout
from hpcnn.strategy.baselines import data_parallel, model_parallel, owt
from hpcnn.strategy.config_space import SpaceOptions, enumerate_configs
from hpcnn.parallel.exchange_counts import exchange_tables, rank_counts
from hpcnn.parallel.exchange_plan import ExchangePlan, needed_boxes
from hpcnn.parallel.input_geometry import InputGeometry
from hpcnn.strategy.cost_model import CostModel, CostModelError
from hpcnn.strategy.plan_pricing import gradient_sync, price_plan, rank_bytes
from hpcnn.strategy.tile_geometry import tile_key
from hpcnn.strategy.machine import Link, Machine, MachineError, allreduce_time, load_machine
from hpcnn.strategy.plan import Plan, PlanError
from hpcnn.strategy.planner import MemoryLimitError, search_plan
from hpcnn.strategy.search import brute_force, solve


def every_op_graph(batch=8):
    """One of each op kind, with stride, padding, dilation, odd sizes,
    a channel concat, a residual add, flatten and global pooling."""
    g = Graph("every_op")
    x = g.input((batch, 3, 13, 11))
    c1 = g.conv(x, 6, 3, stride=2, padding=1)
    r1 = g.relu(c1)
    c2 = g.conv(r1, 5, (3, 1), padding=(1, 0), dilation=2)
    c3 = g.conv(r1, 4, (3, 1))
    cat = g.concat([c3, c2])
    a = g.add_([cat, cat])
    p = g.maxpool(a, 3, stride=2, padding=1)
    q = g.avgpool(a, 2)
    gp = g.global_avgpool(q)
    f = g.flatten(p)
    l1 = g.linear(f, 7)
    b = g.bn(l1)
    cat2 = g.concat([b, gp])
    l2 = g.linear(cat2, 5)
    g.loss(l2)
    return g


def _plan_counts(plan, P, R):
    """What an ExchangePlan moves, rank by rank: elements and messages sent
    and received (to and from OTHER ranks), and the busiest node port."""
    sent, recv, msent, mrecv = (np.zeros(P) for _ in range(4))
    node_in, node_out = {}, {}
    for s, d, box in plan.pieces:
        if s == d:
            continue
        sent[s] += box.volume
        recv[d] += box.volume
        msent[s] += 1
        mrecv[d] += 1
        if s // R != d // R:
            node_out[s // R] = node_out.get(s // R, 0) + box.volume
            node_in[d // R] = node_in.get(d // R, 0) + box.volume
    port = max([max(node_in.get(m, 0), node_out.get(m, 0)) for m in set(node_in) | set(node_out)], default=0)
    return sent, recv, msent, mrecv, port


def _random_ranks(rng, k, P):
    return [int(r) for r in rng.permutation(P)[:k]]


def _check_edges(g, P, R, pairs_per_edge, seed, explicit=False):
    """Every edge of ``g``: the tables of all configuration pairs, sampled
    pairs checked rank by rank against the ExchangePlan the runtime
    compiles (and, with ``explicit``, layouts on random explicit ranks)."""
    rng = np.random.default_rng(seed)
    checked = 0
    for node in g:
        for i, src in enumerate(node.inputs):
            T = g[src].shape
            A = enumerate_configs(T, g[src].op.splittable, P, SpaceOptions(max_kinds=3))
            B = enumerate_configs(node.shape, node.op.splittable, P, SpaceOptions(max_kinds=3))
            geom = InputGeometry(node.op, i, node.in_shapes, node.shape)
            tab = exchange_tables(geom, A, B, R)
            pairs = list(itertools.product(range(len(A)), range(len(B))))
            if pairs_per_edge is not None and len(pairs) > pairs_per_edge:
                pairs = [pairs[k] for k in rng.choice(len(pairs), pairs_per_edge, replace=False)]
            for a, b in pairs:
                Ls, Ld = Layout(T, A[a]), Layout(node.shape, B[b])
                if explicit:
                    Ls = Layout(T, A[a], _random_ranks(rng, Ls.k, P))
                    Ld = Layout(node.shape, B[b], _random_ranks(rng, Ld.k, P))
                xp = ExchangePlan.compile(Ls, needed_boxes(node.op, i, Ld, node.in_shapes), 1)
                sent, recv, msent, mrecv, port = _plan_counts(xp, P, R)
                rc = rank_counts(geom, Ls, Ld, P, R)
                where = f"{node.name} input {i}: {Ls} -> {Ld} at P={P} R={R}"
                assert np.array_equal(rc.sent, sent), where
                assert np.array_equal(rc.received, recv), where
                assert np.array_equal(rc.messages_sent, msent), where
                assert np.array_equal(rc.messages_received, mrecv), where
                assert rc.node_inter == (port if P > R else rc.node_inter), where
                if not explicit:
                    assert tab.max_rank[a, b] == np.maximum(sent, recv).max() == xp.max_rank_bytes(), where
                    assert tab.total[a, b] == sent.sum() == xp.total_bytes(), where
                    assert tab.messages[a, b] == (msent + mrecv).max(), where
                    assert tab.node_inter[a, b] == (port if max(Ls.k, Ld.k) > R else 0), where
                checked += 1
    return checked


@pytest.mark.parametrize("P,R", [(4, 2), (8, 4), (6, 4), (12, 4), (3, 1)])
def test_exchange_counts_equal_the_exchange_plan(P, R):
    """Sampled pairs on every edge of a graph with every op kind, for
    power-of-two and other rank counts (node blocks that are not boxes of
    the grid take the rank-by-rank path): bytes and messages per rank, the
    busiest rank, the total and the busiest node port, from the tables of
    all pairs and from one pair, equal the runtime's ExchangePlan."""
    assert _check_edges(every_op_graph(), P, R, pairs_per_edge=25, seed=P * 10 + R) > 300


def test_exchange_counts_equal_the_exchange_plan_on_every_pair():
    assert _check_edges(every_op_graph(batch=6), 6, 4, pairs_per_edge=None, seed=0) > 5000


@pytest.mark.parametrize("P,R", [(4, 2), (6, 4), (8, 3)])
def test_exchange_counts_on_explicit_ranks_equal_the_exchange_plan(P, R):
    assert _check_edges(every_op_graph(), P, R, pairs_per_edge=12, seed=P + R, explicit=True) > 150


def every_volume_op_graph(batch=4):
    """The 3-D ops on odd volumes: conv3d with stride, dilation and
    asymmetric padding, max and average pooling, batch norm, global
    pooling, flatten and the regression loss."""
    g = Graph("every_volume_op")
    x = g.input((batch, 2, 9, 7, 11))
    c1 = g.conv3d(x, 4, 3, stride=2, padding=1)
    b = g.bn(c1)
    c2 = g.conv3d(b, 3, (3, 2, 2), padding=((1, 0), (0, 1), (2, 1)), dilation=(1, 2, 1))
    p = g.maxpool3d(c2, 2, stride=1)
    q = g.avgpool3d(c1, 3, stride=2, padding=1)
    gp = g.global_avgpool(q)
    f = g.flatten(p)
    cat = g.concat([g.linear(f, 5), gp])
    g.mse_loss(g.linear(cat, 3))
    return g


@pytest.mark.parametrize("P,R", [(4, 2), (6, 4), (8, 4)])
def test_exchange_counts_equal_the_exchange_plan_on_volumes(P, R):
    """The same on 5-D tensors: halos in three spatial dimensions and
    redistributions between any volume layouts."""
    assert _check_edges(every_volume_op_graph(), P, R, pairs_per_edge=25, seed=P + 7 * R) > 200
    assert _check_edges(every_volume_op_graph(), P, R, pairs_per_edge=6, seed=P, explicit=True) > 40
def grouped_graph(batch=6):
    """Grouped convolutions whose channel ranges need only their groups'
    input channels: depthwise (multiplier 1 and 2, stride 2) and 3 groups,
    after channel-split producers of odd widths."""
    g = Graph("grouped")
    x = g.input((batch, 3, 11, 9))
    c = g.conv(x, 6, 3, padding=1)
    d = g.conv(c, 6, 3, padding=1, groups=6)
    m = g.conv(d, 12, 3, stride=2, padding=((1, 0), (0, 1)), groups=6)
    q = g.conv(m, 9, 3, dilation=2, padding=2, groups=3)
    f = g.flatten(g.global_avgpool(q))
    g.loss(g.linear(f, 4))
    return g


@pytest.mark.parametrize("P,R", [(4, 2), (6, 4)])
def test_exchange_counts_of_grouped_convs_equal_the_exchange_plan(P, R):
    assert _check_edges(grouped_graph(), P, R, pairs_per_edge=40, seed=P, explicit=False) > 100
    assert _check_edges(grouped_graph(), P, R, pairs_per_edge=10, seed=P + 1, explicit=True) > 30


def test_edges_that_read_alike_share_their_tables_and_no_others_do():
    """tables_key: two 1x1 convolutions of one tensor into different channel
    counts read alike (same key, and their tables, each built on its own,
    are equal); a 3x3 convolution, a strided one and another consumer
    configuration set do not share the key.  The cost model builds one
    table per key and hands it to every edge with that key."""
    from hpcnn.parallel.exchange_counts import tables_key
    g = Graph("alike")
    x = g.input((8, 6, 12, 12))
    a = g.conv(x, 4, 1)
    b = g.conv(x, 10, 1)
    c = g.conv(x, 4, 3, padding=1)
    d = g.conv(x, 4, 1, stride=2)
    g.loss(g.linear(g.concat([g.flatten(g.concat([a, b, c])), g.flatten(d)]), 3))
    P = 8
    A = enumerate_configs(g[x].shape, g[x].op.splittable, P, SpaceOptions(max_kinds=3))
    geoms = {n: InputGeometry(g[n].op, 0, g[n].in_shapes, g[n].shape) for n in (a, b, c, d)}
    B = enumerate_configs(g[a].shape, g[a].op.splittable, P, SpaceOptions(max_kinds=3))
    ka, kb = tables_key(geoms[a], A, B), tables_key(geoms[b], A, B)
    assert ka == kb
    ta, tb = exchange_tables(geoms[a], A, B, 2), exchange_tables(geoms[b], A, B, 2)
    for f in ("max_rank", "node_inter", "messages", "total"):
        assert np.array_equal(getattr(ta, f), getattr(tb, f)), f
    assert tables_key(geoms[c], A, B) != ka                  # a halo
    assert tables_key(geoms[d], A, B) != ka                  # a stride
    assert tables_key(geoms[a], A, B[:-1]) != ka             # other consumer configurations
    assert tables_key(geoms[a], A[:-1], B) != ka             # other source configurations
    model = CostModel(g, P, load_machine("paper_p100_cluster"))
    model.edge_tables(a, 0, A, B)
    hits = model.stats["edge_cache_hits"]
    assert model.edge_tables(b, 0, A, B) is model.edge_tables(a, 0, A, B)
    assert model.stats["edge_tables"] == 1 and model.stats["edge_cache_hits"] == hits + 2


def test_a_channel_split_depthwise_conv_after_a_channel_split_needs_no_exchange():
    """Depthwise: output channels [c0, c1) read input channels [c0, c1) only."""
    g = grouped_graph()
    geom = InputGeometry(g["conv2d_2"].op, 0, g["conv2d_2"].in_shapes, g["conv2d_2"].shape)
    assert geom.dep == (0, 1, 2, 3)
    c = np.array([[1, 3, 1, 1]])
    tab = exchange_tables(geom, c, c)
    assert tab.total[0, 0] == 0 and tab.messages[0, 0] == 0
    # multiplier 2 with 3 chunks of 12 output channels: chunk j reads input channels [2j, 2j+2)
    geom = InputGeometry(g["conv2d_3"].op, 0, g["conv2d_3"].in_shapes, g["conv2d_3"].shape)
    lo, hi = geom.need_bounds(1, 3)
    assert lo.tolist() == [0, 2, 4] and hi.tolist() == [2, 4, 6]
    # 3 groups (4 input and 3 output channels each), 9 outputs cut into chunks of 5 and 4:
    # output 5 lies inside group 1, so both chunks read group 1's input channels 4..7
    geom = InputGeometry(g["conv2d_4"].op, 0, g["conv2d_4"].in_shapes, g["conv2d_4"].shape)
    lo, hi = geom.need_bounds(1, 2)
    assert lo.tolist() == [0, 4] and hi.tolist() == [8, 12]


def test_messages_count_every_pair_of_ranks_that_exchange():
    """A 3x3 convolution with padding 1 split four ways over height: the
    inner ranks send two halos and receive two (4 messages), the outer ones
    one and one; a 2x2 (n, c) to (h, w) redistribution: every rank sends to
    and receives from all three others."""
    g = Graph("halo")
    x = g.input((4, 4, 16, 16))
    c = g.conv(x, 4, 3, padding=1)
    y = g.conv(c, 4, 3, padding=1)
    g.loss(g.linear(g.global_avgpool(y), 2))
    geom = InputGeometry(g[y].op, 0, g[y].in_shapes, g[y].shape)
    h4 = np.array([[1, 1, 4, 1]])
    tab = exchange_tables(geom, h4, h4)
    rc = rank_counts(geom, Layout(g[c].shape, h4[0]), Layout(g[y].shape, h4[0]), 4)
    assert list(rc.messages_sent) == [1, 2, 2, 1] and list(rc.messages_received) == [1, 2, 2, 1]
    assert tab.messages[0, 0] == 4
    tab = exchange_tables(InputGeometry(g[c].op, 0, g[c].in_shapes, g[c].shape),
                          np.array([[2, 2, 1, 1]]), np.array([[1, 1, 2, 2]]))
    assert tab.messages[0, 0] == 6


def test_identity_edges_move_nothing_and_redistributions_do():
    g = every_op_graph()
    m = CostModel(g, 4, load_machine("paper_p100_cluster"))
    cf = np.array([[2, 1, 2, 1]])
    same = m.edge_cost("conv2d_1", "relu_1", 0, cf, cf)
    assert same.t_x[0, 0] == 0 and same.tables.max_rank[0, 0] == 0
    other = m.edge_cost("conv2d_1", "relu_1", 0, cf, np.array([[1, 2, 1, 2]]))
    assert other.t_x[0, 0] > 0


def test_node_costs_behave():
    g = every_op_graph(batch=16)
    mach = load_machine("paper_p100_cluster")
    m = CostModel(g, 4, mach)
    cf = np.array([[1, 1, 1, 1], [2, 1, 1, 1], [4, 1, 1, 1], [1, 2, 1, 1], [1, 1, 2, 2]])
    c = m.node_cost("conv2d_1", cf)
    # smaller tiles compute faster; one rank and channel splits never allreduce
    assert c.t_c[0] > c.t_c[1] > c.t_c[2]
    assert c.t_s[0] == 0 and c.t_s[3] == 0 and c.t_s[1] > 0 and c.t_s[4] > 0
    # memory: a channel split shards the parameters, a sample split does not
    w = g["conv2d_1"].param_specs()
    params = sum(s.size for s in w.values())
    assert c.mem[0] >= 3 * params * 4
    assert c.mem[3] < c.mem[0]
    assert all(c.mem > 0)


def test_allreduce_model():
    link = Link(10e9, 1e-6)
    assert allreduce_time(1e6, 1, link) == 0
    t2, t4 = allreduce_time(1e6, 2, link), allreduce_time(1e6, 4, link)
    assert t2 == pytest.approx(1e6 / 10e9 + 2e-6)
    assert t4 == pytest.approx(1.5e6 / 10e9 + 4e-6)


def test_inter_node_exchange_uses_the_slower_port():
    g = every_op_graph(batch=16)
    mach = load_machine("paper_p100_cluster")          # 4 ranks per node
    m = CostModel(g, 8, mach)
    n8 = np.array([[8, 1, 1, 1]])
    c8 = np.array([[1, 2, 1, 4]])
    tab = m.edge_tables("relu_1", 0, n8, c8)
    assert tab.node_inter[0, 0] > 0
    inside = m.edge_tables("relu_1", 0, np.array([[2, 1, 2, 1]]), np.array([[2, 1, 1, 2]]))
    assert inside.node_inter[0, 0] == 0 and inside.max_rank[0, 0] > 0


def test_measured_table_is_preferred():
    g = every_op_graph(batch=16)
    mach = copy.deepcopy(load_machine("paper_p100_cluster"))
    m0 = CostModel(g, 2, mach)
    cf = np.array([[2, 1, 1, 1]])
    geom = m0.geometry("conv2d_1")
    ins, out, _ = geom.tile(cf[0])
    mach.measured = {"dtype": "float32", "ops": {tile_key(g["conv2d_1"], ins, out, "float32", (True,)): 0.125}}
    m1 = CostModel(g, 2, mach)
    c0, c1 = m0.node_cost("conv2d_1", cf), m1.node_cost("conv2d_1", cf)
    assert c1.measured[0] and not c0.measured[0]
    # measured compute, plus the same optimiser update as the roofline case
    w = g["conv2d_1"].param_specs()
    update = 5.0 * sum(s.size for s in w.values()) * 4 / (mach.memory_bandwidth * 0.7)
    assert c1.t_c[0] == pytest.approx(0.125 + update)


@pytest.mark.parametrize("model,P", [("lenet5", 2), ("resnet_small", 2), ("inception_small", 2)])
def test_search_on_real_tables_equals_brute_force(model, P):
    g = build_model(model, batch=8)
    m = CostModel(g, P, load_machine("paper_p100_cluster"), opts=SpaceOptions(max_kinds=1))
    vecs, edges, _ = m.problem()
    res = solve(vecs, edges)
    sizes = [len(v) for v in vecs]
    if np.prod(sizes, dtype=float) <= 2e6:
        best, _ = brute_force(vecs, edges)
        assert res.cost == pytest.approx(best, rel=1e-12)
    plan = Plan(g.name, P, g.batch, m.space.plan_configs(res.choice))
    plan.validate(g, P)
    assert price_plan(m, plan).total == pytest.approx(res.cost, rel=1e-12)


def test_search_plan_report_and_baselines():
    g = build_model("alexnet", batch=64)
    plan, rep = search_plan(g, 4, "paper_p100_cluster")
    plan.validate(g, 4)
    assert rep["status"] == "exact" and rep.layers and rep.layers[0]["node"] == "input"
    t = rep["predicted"]["total_s"]
    for name in ("data-parallel", "model-parallel", "owt"):
        assert t <= rep["baselines"][name]["total_s"] * (1 + 1e-12)
    json.dumps(rep)                        # the report is JSON-able
    assert plan.meta["predicted_s"] == pytest.approx(t)


def test_memory_limit_excludes_binds_and_reports():
    g = build_model("alexnet", batch=64)
    mach = load_machine("paper_p100_cluster")
    free, rep = search_plan(g, 4, mach, with_baselines=False)
    used = rep["predicted"]["memory_bytes"] / 2 ** 30
    # a limit above the plan's memory changes nothing
    same, rep2 = search_plan(g, 4, mach, memory=used * 1.01, with_baselines=False)
    assert same.configs == free.configs and "optimal" in rep2["memory"]["status"]
    # a binding limit yields a plan that fits, with a stated lower bound
    least = rep2["memory"]["least_bytes"] / 2 ** 30
    binding = 0
    for frac in (0.3, 0.5, 0.9):
        lim = least + frac * (used - least)
        tight, rep3 = search_plan(g, 4, mach, memory=lim, with_baselines=False)
        assert rep3["predicted"]["memory_bytes"] <= lim * 2 ** 30
        assert rep3["predicted"]["total_s"] >= rep["predicted"]["total_s"]
        if "lower_bound_s" in rep3["memory"]:
            binding += 1
            assert rep3["memory"]["lower_bound_s"] <= rep3["predicted"]["total_s"] + 1e-12
            assert rep3["memory"]["lower_bound_s"] >= rep["predicted"]["total_s"] - 1e-12
    assert binding >= 1
    # below the least possible memory: a clear error
    with pytest.raises(MemoryLimitError, match="no plan fits"):
        search_plan(g, 4, mach, memory=least * 0.5, with_baselines=False)
    with pytest.raises(PlanError, match="positive"):
        search_plan(g, 4, mach, memory=-1)


def test_price_plan_prices_any_plan_and_rejects_bad_ones():
    g = build_model("lenet5", batch=8)
    m = CostModel(g, 2, load_machine("paper_p100_cluster"))
    for plan in (data_parallel(g, 2), model_parallel(g, 2), owt(g, 2)):
        pc = price_plan(m, plan)
        assert pc.total > 0 and len(pc.rows) == len(g)
    with pytest.raises(CostModelError, match="ranks"):
        price_plan(m, data_parallel(g, 4))


def test_machine_files_state_their_figures():
    m = load_machine("paper_p100_cluster")
    assert m.ranks_per_node == 4 and m.peak_flops == 10.6e12
    named = {f["figure"] for f in m.figures}
    for fig in ("device.peak_flops", "device.memory_bandwidth", "links.intra_node.bandwidth",
                "links.inter_node.bandwidth", "links.intra_node.latency", "links.inter_node.latency",
                "device.compute_efficiency", "device.memory_efficiency", "ranks_per_node"):
        assert fig in named
    assert all(f["source"] for f in m.figures)


def test_machine_errors_are_named(tmp_path):
    with pytest.raises(MachineError, match="neither a file nor a known machine"):
        load_machine("no_such_machine")
    bad = tmp_path / "m.json"
    bad.write_text("{")
    with pytest.raises(MachineError, match="not valid JSON"):
        load_machine(bad)
    d = load_machine("paper_p100_cluster").to_dict()
    del d["links"]
    bad.write_text(json.dumps(d))
    with pytest.raises(MachineError, match="missing the key 'links'"):
        load_machine(bad)
    d = load_machine("paper_p100_cluster").to_dict()
    d["device"]["peak_flops"] = 0
    bad.write_text(json.dumps(d))
    with pytest.raises(MachineError, match="peak_flops"):
        load_machine(bad)
    ok = tmp_path / "ok.json"
    load_machine("paper_p100_cluster").save(ok)
    assert load_machine(ok).to_dict()["device"] == load_machine("paper_p100_cluster").device


@pytest.mark.slow
def test_calibrate_writes_a_machine_the_cost_model_uses(tmp_path, capsys):
    from hpcnn.cli import main
    from hpcnn.calibration.links import fit_link
    out = tmp_path / "local.json"
    rc = main(["calibrate", "--model", "lenet5", "--ranks", "1", "2", "--batch", "4", "--repeats", "1",
               "--budget", "20", "--runtime-ranks", "2", "--runtime-rounds", "1", "--runtime-budget", "5",
               "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    m = load_machine(out)
    assert m.measured["ops"] and m.measured["batch"] == 4 and m.slots_per_node >= 1
    assert m.intra.bandwidth > 0 and m.intra.latency > 0          # from the MPI ping-pong
    assert any("NOT MEASURED" in f["source"] for f in m.figures)  # inter-node figures are flagged
    # runtime figures for jobs of 2 ranks: tiles timed with both ranks
    # computing, exchange and allreduce figures fitted to synthetic networks
    rf = m.runtime_at(2)
    assert rf is not None and rf.ops and rf.exchange is not None and rf.allreduce_latency
    assert m.runtime_at(1) is None
    # a search on that machine prices every measured tile from the table
    g = build_model("lenet5", batch=4)
    plan, rep = search_plan(g, 2, m, with_baselines=False)
    rows = [r for r in rep.layers if r["op"] != "input"]
    assert rows and all(r["measured"] for r in rows)
    # the latency/bandwidth fit on exact data
    times = {s: 1e-6 + s / 5e9 for s in (8, 1 << 20, 1 << 22)}
    bw, lat = fit_link(times)
    assert bw == pytest.approx(5e9, rel=1e-3) and lat == pytest.approx(1e-6 + 8 / 5e9)


def test_rank_bytes_equal_the_runtime_exchange_plans():
    """In one process: for every plan of the runtime's equivalence tests (at
    2, 3 and 4 ranks, some layers on explicit ranks), the bytes the cost
    model predicts per rank and edge equal the ExchangePlan the runtime
    compiles for that edge (forward: bytes sent; backward: bytes received,
    sent back, except from the input).  tests/mpi/test_model_bytes.py checks
    the same against the bytes the runtime counts while training."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent / "mpi"))
    try:
        from plan_cases import cases
    finally:
        sys.path.pop(0)
    from hpcnn.parallel.exchange_plan import exchange_category
    machine = load_machine("paper_p100_cluster")
    checked = 0
    for P in (2, 3, 4):
        for name, model, build, _, _ in cases(P):
            g = build_model(model, batch=5)
            plan = build(g, P)
            cm = CostModel(g, P, machine)
            pred = rank_bytes(cm, plan)
            L = plan.layouts(g)
            for n in g:
                for i, src in enumerate(n.inputs):
                    xp = ExchangePlan.compile(L[src], needed_boxes(n.op, i, L[n.name], n.in_shapes), 4)
                    key = f"{src}->{n.name}[{i}]"
                    back = g[src].kind != "input"
                    for r in range(P):
                        want = {"forward": xp.bytes_sent(r), "backward": xp.bytes_received(r) if back else 0,
                                "messages_forward": xp.messages_sent(r),
                                "messages_backward": xp.messages_received(r) if back else 0}
                        none = {"forward": 0, "backward": 0, "messages_forward": 0, "messages_backward": 0}
                        got = pred[r]["edges"].get(key, none)
                        if want["forward"] == want["backward"] == 0:
                            want = none
                        assert got == want, f"{name} at {P} ranks, rank {r}, edge {key}"
                        checked += 1
            for r in range(P):
                cats = {c: sum(v["forward"] + v["backward"] for k, v in pred[r]["edges"].items()
                               if exchange_category(L[k.split("->")[0]], L[k.split("->")[1].split("[")[0]]) == c)
                        for c in ("halo", "redistribution")}
                assert cats == {c: pred[r][c] for c in cats}, f"{name} at {P} ranks, rank {r}"
    assert checked > 500


def _machine_with_runtime(P=2, **fig):
    from hpcnn.strategy.machine import RuntimeFigures
    m = copy.deepcopy(load_machine("paper_p100_cluster"))
    rf = RuntimeFigures(ranks=P, exchange=Link(1e9, 2e-4), copy_bandwidth=5e9,
                        allreduce_latency={P: 1e-3}, allreduce_bandwidth=2e9, node_overhead_s=1e-5,
                        step_overhead_s=3e-4, **fig)
    m.runtime = {P: rf}
    return m, rf


def test_runtime_figures_round_trip_and_price_a_job_of_their_size(tmp_path):
    """A machine's runtime figures for P ranks: saved and loaded unchanged;
    a tile they time is priced at that time plus the capped skew; other job
    sizes keep the links and the roofline; the executor's overheads are in
    the total."""
    g = build_model("lenet5", batch=8)
    m, rf = _machine_with_runtime(2, skew=0.5, skew_cap_s=2e-4)
    cm0 = CostModel(g, 2, m)
    node = g["conv1"]
    ins, out, _ = cm0.geometry("conv1").tile((2, 1, 1, 1))
    rf.ops[tile_key(node, ins, out, "float32", (True,))] = 3e-3
    m.save(tmp_path / "m.json")
    back = Machine.load(tmp_path / "m.json")
    assert back.runtime_at(2).to_dict() == rf.to_dict()
    assert back.runtime_at(4) is None and back.runtime_at(1) is None
    cm = CostModel(g, 2, back)
    nc = cm.node_cost("conv1", np.array([[2, 1, 1, 1]]))
    assert nc.measured[0]
    update = nc.t_c[0] - (3e-3 + min(0.5 * 3e-3, 2e-4))      # the optimiser's shard update
    assert 0 <= update < 1e-4
    # the whole plan: executor overheads per layer and step, and the loss reduction
    pc = price_plan(cm, data_parallel(g, 2))
    layers = sum(1 for n in g if n.kind != "input")
    assert pc.t_o == pytest.approx(layers * 1e-5 + 3e-4 + 1e-3 + 2 * 8 / 2 / 2e9)
    assert pc.total == pytest.approx(pc.t_c + pc.t_s + pc.t_x + pc.t_o)
    # exchanges: latency and bandwidth of the figures, plus the region copy
    cf, other = np.array([[2, 1, 1, 1]]), np.array([[1, 2, 1, 1]])
    ec = cm.edge_cost("conv1", "conv1.relu", 0, cf, other)
    b = ec.tables.max_rank[0, 0] * 4
    region = cm.region_bytes("conv1.relu", 0, other)[0]
    assert ec.t_x[0, 0] == pytest.approx(2 * (2e-4 + b / 1e9 + region / 5e9))
    # allreduce latency of other group sizes: scaled by the steps of the reduction
    assert rf.allreduce_alpha(2) == 1e-3 and rf.allreduce_alpha(8) == pytest.approx(3e-3)


def test_gradient_sync_follows_the_runtime_buckets():
    """price_plan prices the gradient allreduce per replica group and
    bucket, as hpcnn.parallel.groups packs them; the payload per rank is
    the rank's gradient shards."""
    g = build_model("lenet5", batch=8)
    m, rf = _machine_with_runtime(2)
    plan = data_parallel(g, 2)
    shards = sum(int(np.prod(sp.shape)) * 4 for n in g for sp in n.param_specs().values() if sp.trainable)
    for bucket in (1 << 30, 64 << 10):
        cm = CostModel(g, 2, m, bucket_bytes=bucket)
        t, payload = gradient_sync(cm, plan.layouts(g))
        assert list(payload) == [shards, shards]
        sizes = [int(np.prod(sp.shape)) * 4 for n in g for _, sp in sorted(n.param_specs().items())
                 if sp.trainable]
        buckets, cur = [], 0
        for b in sizes:
            if cur and cur + b > bucket:
                buckets.append(cur)
                cur = 0
            cur += b
        buckets.append(cur)
        want = sum(1e-3 + 2 * (2 - 1) / 2 * b / 2e9 for b in buckets)
        assert t == pytest.approx(want)
        assert (len(buckets) == 1) == (bucket == 1 << 30)


def test_waits_follow_the_stretches_between_synchronisations():
    """price_plan charges min(skew * stretch, cap) after every stretch of
    compute that ends in a synchronisation: data parallel LeNet-5 (no batch
    norm, no exchange that moves data) has two stretches, forward and
    backward; splitting the first convolution over height adds the exchanges
    into and out of it."""
    g = build_model("lenet5", batch=8)
    cap = 1e-9
    m, rf = _machine_with_runtime(2, skew=1.0, skew_cap_s=cap)
    cm = CostModel(g, 2, m)
    no_wait = copy.deepcopy(m)
    no_wait.runtime[2].skew = 0.0
    cm0 = CostModel(g, 2, no_wait)
    dp = data_parallel(g, 2)
    assert price_plan(cm, dp).t_c - price_plan(cm0, dp).t_c == pytest.approx(2 * cap, rel=1e-6)
    configs = {n: dict(c) for n, c in dp.configs.items()}
    configs["conv1"] = {"n": 1, "h": 2}
    mixed = Plan(g.name, 2, g.batch, configs)
    # forward: conv1 -> relu moves data and ends conv1's stretch (input ->
    # conv1 moves data too, but no compute precedes it: nothing to wait for);
    # backward: the adjoint of conv1 -> relu ends a stretch (none into the input)
    assert price_plan(cm, mixed).t_c - price_plan(cm0, mixed).t_c == pytest.approx(4 * cap, rel=1e-6)


def test_waits_after_exchanges_use_their_own_figures():
    """With an exchange skew in the machine file, a stretch that ends in an
    exchange that moves data waits by that figure and a stretch that ends
    in a reduction by the other; without one (older machine files), both
    wait alike."""
    g = build_model("lenet5", batch=8)
    cap_r, cap_x = 1e-9, 5e-9
    m, rf = _machine_with_runtime(2, skew=1.0, skew_cap_s=cap_r)
    rf.exchange_skew, rf.exchange_skew_cap_s = 1.0, cap_x
    no_wait = copy.deepcopy(m)
    no_wait.runtime[2].skew, no_wait.runtime[2].exchange_skew = 0.0, 0.0
    cm, cm0 = CostModel(g, 2, m), CostModel(g, 2, no_wait)
    dp = data_parallel(g, 2)
    # data parallel: the forward ends in the loss reduction, the backward in
    # the gradients' -- no exchange that moves data
    assert price_plan(cm, dp).t_c - price_plan(cm0, dp).t_c == pytest.approx(2 * cap_r, rel=1e-6)
    configs = {n: dict(c) for n, c in dp.configs.items()}
    configs["conv1"] = {"n": 1, "h": 2}
    mixed = Plan(g.name, 2, g.batch, configs)
    # conv1 -> relu ends a stretch by an exchange, forward and backward
    want = 2 * cap_x + 2 * cap_r
    assert price_plan(cm, mixed).t_c - price_plan(cm0, mixed).t_c == pytest.approx(want, rel=1e-6)
    from hpcnn.strategy.machine import RuntimeFigures
    again = RuntimeFigures.from_dict(rf.to_dict())
    assert (again.exchange_skew, again.exchange_skew_cap_s) == (1.0, cap_x)
    rf.exchange_skew = None                  # an older file: one skew for both
    assert price_plan(CostModel(g, 2, m), mixed).t_c - price_plan(cm0, mixed).t_c == pytest.approx(4 * cap_r, rel=1e-6)


def test_ops_state_their_reductions_and_the_model_prices_them():
    """Batch norm states its sums (one of twice the tile's channels each
    way: both statistics forward, both gradient sums backward); the cost
    model's t_s and the byte counts are exactly those, and an op that
    states none is charged none."""
    from hpcnn.ops import REGISTRY
    bn = REGISTRY["batchnorm"]()
    assert bn.tile_reductions(6) == {"forward": [12], "backward": [12]}
    assert REGISTRY["relu"]().tile_reductions(6) == {"forward": [], "backward": []}
    g = Graph("bn")
    x = g.input((8, 6, 4, 4))
    b = g.bn(g.conv(x, 6, 1, bias=False))
    g.loss(g.linear(g.global_avgpool(b), 2))
    m = CostModel(g, 4, load_machine("paper_p100_cluster"))
    cf = np.array([[2, 2, 1, 1]])
    link = m.group_link((2, 2, 1, 1), ("n", "c", "h", "w"))[0]
    want = 2 * sum(m.allreduce_parts(6 * 4, 2, link))
    lat, bw = m.allreduce_parts(2 * 3 * 4, 2, link)          # its gradients: weight and bias, 3 channels
    want += bw + lat * 2 * 3 * 4 / m.bucket_bytes
    assert m.node_cost(b, cf).t_s[0] == pytest.approx(want)
    plan = Plan(g.name, 4, 8, {n.name: ({"n": 2, "c": 2} if n.name == b else {"n": 4}) for n in g})
    per_rank = rank_bytes(m, plan)
    assert [r["batchnorm"] for r in per_rank] == [12 * 4] * 4


def test_tables_built_by_worker_processes_equal_those_built_here():
    g = build_model("resnet_small", batch=8)
    mach = load_machine("paper_p100_cluster")
    here, there = CostModel(g, 8, mach), CostModel(g, 8, mach)
    assert there.build_tables(workers=2) == 2 and there.stats["table_workers"] == 2
    v1, e1, _ = here.problem(workers=1)
    v2, e2, _ = there.problem(workers=2)
    assert len(e1) == len(e2)
    for (a1, b1, m1), (a2, b2, m2) in zip(e1, e2):
        assert (a1, b1) == (a2, b2) and np.array_equal(m1, m2)


def test_a_tile_measured_at_another_sample_count_is_scaled_by_its_samples():
    """A tile missing from the measured table is priced from the same op's
    tile at another sample count: its time beyond the op's fixed cost
    scales with the samples (the nearest count measured)."""
    from hpcnn.strategy.cost_model import scaled_tile
    g8, g16 = build_model("lenet5", batch=8), build_model("lenet5", batch=16)
    mach = copy.deepcopy(load_machine("paper_p100_cluster"))
    mach.device["kind_overhead_s"] = {"conv2d": 1e-4}
    key = {}
    for b, g in ((8, g8), (16, g16)):
        cm = CostModel(g, 1, mach)
        ins, out, _ = cm.geometry("conv1").tile((1, 1, 1, 1))
        key[b] = tile_key(g["conv1"], ins, out, "float32", (True,))
    mach.measured = {"dtype": "float32", "ops": {key[8]: 2.1e-3}}
    assert scaled_tile(mach.measured["ops"], key[16], 1e-4) == pytest.approx(1e-4 + 2e-3 * 2)
    assert scaled_tile(mach.measured["ops"], key[8], 1e-4) == pytest.approx(2.1e-3)
    # another op shape is not scaled
    other = build_model("lenet5", batch=16, image_size=36)
    ins, out, _ = CostModel(other, 1, mach).geometry("conv1").tile((1, 1, 1, 1))
    assert scaled_tile(mach.measured["ops"], tile_key(other["conv1"], ins, out, "float32", (True,)), 1e-4) is None
    cf = np.array([[1, 1, 1, 1]])
    priced = CostModel(g16, 1, mach).node_cost("conv1", cf, with_inputs=True)
    roof = CostModel(g16, 1, load_machine("paper_p100_cluster")).node_cost("conv1", cf)
    assert priced.measured[0] and not roof.measured[0]
    assert priced.tile[0] == pytest.approx(1e-4 + 4e-3)
    # the nearest sample count wins: 16 is measured too
    mach.measured["ops"][key[16]] = 5e-3
    assert scaled_tile(mach.measured["ops"], key[16], 1e-4) == 5e-3


def _two_node_machine(collectives=True):
    """paper_p100_cluster (4 ranks per node) with measured collectives."""
    m = copy.deepcopy(load_machine("paper_p100_cluster"))
    if collectives:
        m.collectives = {"allreduce.inter_node": {"group": 4, "latency": 1e-4, "bandwidth": 5e8,
                                                  "bus_bandwidth": 7.5e8},
                         "allreduce.all_ranks": {"group": 16, "latency": 3e-4, "bandwidth": 6e8,
                                                 "bus_bandwidth": 1.1e9}}
    return m


def test_allreduces_across_nodes_are_priced_by_the_measured_collectives():
    g = build_model("lenet5", batch=64)
    inter = _two_node_machine()
    cm = CostModel(g, 8, inter)
    nbytes = 4e6
    # a group of 8 ranks on 2 nodes: the inter-node collective, its latency
    # scaled by the steps (3 for 8 ranks against 2 for its 4)
    lat, bw = cm.allreduce_parts(nbytes, 8, inter.inter, share=2.0)
    assert lat == pytest.approx(1e-4 * 3 / 2)
    assert bw == pytest.approx(2 * 7 / 8 * nbytes / (7.5e8 / 2))
    # all 16 ranks: the collective measured over all of them
    lat, bw = CostModel(g, 16, inter).allreduce_parts(nbytes, 16, inter.inter)
    assert (lat, bw) == (pytest.approx(3e-4), pytest.approx(2 * 15 / 16 * nbytes / 1.1e9))
    # inside a node, and without the measurement: the link model as before
    plain = _two_node_machine(collectives=False)
    lat, bw = CostModel(g, 8, plain).allreduce_parts(nbytes, 8, plain.inter, share=2.0)
    assert lat + bw == pytest.approx(allreduce_time(nbytes, 8, plain.inter, 2.0))
    lat, bw = cm.allreduce_parts(nbytes, 4, inter.intra)
    assert lat + bw == pytest.approx(allreduce_time(nbytes, 4, inter.intra))
    # runtime figures measured on one node keep their bandwidth inside it
    # only; measured across nodes, their latency holds for both
    from hpcnn.strategy.machine import RuntimeFigures
    for nodes, want_lat in ((1, 1e-4 * 3 / 2), (2, 5e-3 * 3 / 3)):
        rt = RuntimeFigures(ranks=8, exchange=Link(1e9, 2e-4), allreduce_latency={8: 5e-3},
                            allreduce_bandwidth=2e9, nodes=nodes)
        m = copy.deepcopy(inter)
        m.runtime = {8: rt}
        c = CostModel(g, 8, m)
        lat, bw = c.allreduce_parts(nbytes, 8, m.inter, share=2.0)
        assert lat == pytest.approx(want_lat) and bw == pytest.approx(2 * 7 / 8 * nbytes / (7.5e8 / 2))
        lat, bw = c.allreduce_parts(nbytes, 4, m.intra)
        assert bw == pytest.approx(2 * 3 / 4 * nbytes / 2e9)


def test_exchanges_across_nodes_with_runtime_figures_take_the_slower_port():
    """With runtime figures on a job across nodes, an exchange costs their
    latency, the busiest rank's bytes at their bandwidth or the busiest
    node port's at the inter-node link's, whichever is slower, a link
    latency per message across nodes, and the region copy."""
    from hpcnn.strategy.machine import RuntimeFigures
    g = every_op_graph(batch=16)
    m = _two_node_machine()
    m.runtime = {8: RuntimeFigures(ranks=8, exchange=Link(50e9, 2e-4), copy_bandwidth=5e9, nodes=2)}
    assert m.runtime_at(8) is m.runtime[8] and m.runtime_at(4) is None
    cm = CostModel(g, 8, m)
    A, B = np.array([[8, 1, 1, 1]]), np.array([[1, 2, 1, 4]])
    tab = cm.edge_tables("relu_1", 0, A, B)
    assert tab.node_inter[0, 0] > 0
    region = cm.region_bytes("relu_1", 0, B)[0]
    b, x = tab.max_rank[0, 0] * 4, tab.node_inter[0, 0] * 4
    want = 2e-4 + max(b / 50e9, x / m.inter.bandwidth) + tab.messages[0, 0] * m.inter.latency + region / 5e9
    assert cm.exchange_seconds(tab, 1, region=[region])[0, 0] == pytest.approx(want)
    assert x / m.inter.bandwidth > b / 50e9            # the port decides here


def test_grouped_conv_flops_parameters_and_tiles_divide_by_groups():
    """A depthwise conv costs kh*kw multiply-adds per output, a grouped one
    Cin/G*kh*kw; their weights hold Cin/G input channels; and a tile's
    flops count the whole groups it computes (its input tile's channels)."""
    from hpcnn.strategy.tile_geometry import NodeGeometry
    g = grouped_graph()
    dw, m2, g3 = g["conv2d_2"], g["conv2d_3"], g["conv2d_4"]
    n, c, h, w = dw.shape
    assert dw.flops() == 2 * n * c * h * w * 9
    assert m2.flops() == 2 * int(np.prod(m2.shape)) * 9
    assert g3.flops() == 2 * int(np.prod(g3.shape)) * 4 * 9
    assert dw.param_specs()["weight"].shape == (6, 1, 3, 3)
    assert g3.param_specs()["weight"].shape == (9, 4, 3, 3)
    assert g3.param_specs()["weight"].shard_size(2) == 5 * 4 * 9
    # g3 split 2 ways over channels: the first tile has outputs 0..4 (groups 0 and 1) and reads
    # 8 input channels; it computes both groups whole (6 outputs of 4 inputs each)
    ins, out, _ = NodeGeometry(g3).tile((1, 2, 1, 1))
    assert ins[0][1] == 8 and out[1] == 5
    assert g3.op.flops(ins, out) == 2 * out[0] * out[2] * out[3] * 6 * 4 * 9


def test_representative_tile_reads_most_then_is_largest_then_first():
    """NodeGeometry.chunk, the tile the cost model prices, against the rule
    written out chunk by chunk: the output chunk whose inputs' needs are
    longest, among those the longest chunk, among those the first."""
    from hpcnn.parallel.layout import split_bounds
    from hpcnn.strategy.tile_geometry import NodeGeometry
    g = every_op_graph(batch=7)
    checked = 0
    for node in g:
        try:
            geo = NodeGeometry(node)
        except Exception:
            continue
        for d, size in enumerate(node.shape):
            for D in sorted({1, 2, 3, 4, min(size, 5), size}):
                score = []
                for jj, (lo, hi) in enumerate(split_bounds(size, D)):
                    need = sum(int(gi.need_bounds(e, D)[1][jj] - gi.need_bounds(e, D)[0][jj])
                               for gi in geo.inputs for e, dd in enumerate(gi.dep) if dd == d)
                    score.append((need, hi - lo, -jj))
                assert geo.chunk(d, D) == -max(score)[2], (node.name, d, D)
                checked += 1
    assert checked > 100


def test_layer_reading_the_input_prices_apart_from_its_twins():
    """A first convolution (no dX) and a later one of the same op and shapes
    have tile keys of their own; each is priced by its own measured time,
    whichever the model prices first (they once shared one cache entry, so
    every later twin took the first's time: a synthetic calibration network
    of eight such convolutions was priced at 0.7x its compute, and the fit
    read the difference as waiting)."""
    g = Graph("twins")
    x = g.input((8, 16, 8, 8))
    a = g.conv(x, 16, 3, padding=1)
    b = g.conv(g.relu(a), 16, 3, padding=1)
    g.loss(g.linear(g.global_avgpool(b), 2))
    mach = copy.deepcopy(load_machine("paper_p100_cluster"))
    cf = np.array([[2, 1, 1, 1]])
    ins, out, _ = CostModel(g, 2, mach).geometry(a).tile(cf[0])
    assert ins == [tuple(s) for s in CostModel(g, 2, mach).geometry(b).tile(cf[0])[0]]
    mach.measured = {"dtype": "float32",
                     "ops": {tile_key(g[a], ins, out, "float32", (True,)): 0.010,
                             tile_key(g[b], ins, out, "float32", (False,)): 0.030}}
    for first, second in ((a, b), (b, a)):
        m = CostModel(g, 2, mach)
        t1, t2 = m.node_cost(first, cf).tile[0], m.node_cost(second, cf).tile[0]
        got = {first: t1, second: t2}
        assert got[a] == pytest.approx(0.010) and got[b] == pytest.approx(0.030)
