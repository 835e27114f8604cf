"""The cost model's overlap term: an edge into a convolution (which takes
its region as pieces) costs, per direction, its fixed part (latency) plus
the transfer its own-part compute does not hide, and no region assembly;
with runtime figures only (a machine described from data sheets keeps the
paper's model, which ignores overlap); bytes and messages are untouched."""
import numpy as np

from hpcnn.graph import Graph
from hpcnn.strategy.cost_model import BACKWARD_FLOPS, CostModel
from hpcnn.strategy.machine import load_machine
from hpcnn.strategy.plan import Plan
from hpcnn.strategy.plan_pricing import price_plan


def _graph():
    g = Graph("stack")
    x = g.input((4, 16, 32, 32))
    x = g.conv(x, 16, 3, padding=1, name="c1")
    x = g.relu(x, name="r1")
    x = g.conv(x, 16, 3, padding=1, name="c2")
    x = g.maxpool(x, 3, stride=1, padding=1, name="p")
    x = g.global_avgpool(x, name="gap")
    x = g.linear(x, 4, name="fc")
    g.loss(x)
    return g


def _spatial(g, P):
    return Plan(g.name, P, g.batch, {n.name: ({"h": P} if len(n.shape) == 4 else {"n": P}) for n in g})


def test_overlap_hides_transfer_behind_the_convolutions_own_part():
    g = _graph()
    m = load_machine("local")
    on, off = CostModel(g, 2, m, overlap=True), CostModel(g, 2, m, overlap=False)
    assert on.rt is not None and CostModel(g, 2, m).overlap
    B = np.array([[1, 1, 2, 1]])
    tab = on.edge_tables("c2", 0, B, B)
    assert tab.max_rank[0, 0] > 0
    fixed, transfer = on.exchange_parts(tab)
    fwd, bwd = on.hidden_compute(tab, "c2", 0, B)
    tile = on.node_cost("c2", B, with_inputs=False).tile[0]
    region = on.geometry("c2").region_elements(0, B)[0]
    own = 1 - tab.max_rank[0, 0] / region
    back = BACKWARD_FLOPS["conv2d"]
    assert np.isclose(fwd[0, 0], own * tile / (1 + back)) and np.isclose(bwd[0, 0], own * tile * back / (1 + back))
    want = 2 * fixed + np.maximum(0, transfer - fwd) + np.maximum(0, transfer - bwd)
    assert np.allclose(on.edge_seconds(tab, "r1", "c2", 0, B), want)
    # without overlap: both directions in full, and still no region assembly for a convolution
    assert np.allclose(off.edge_seconds(tab, "r1", "c2", 0, B), 2 * (fixed + transfer))
    assert (on.edge_seconds(tab, "r1", "c2", 0, B) <= off.edge_seconds(tab, "r1", "c2", 0, B)).all()
    # an op that takes no pieces (max pooling) assembles its region and hides nothing
    tp = on.edge_tables("p", 0, B, B)
    region_p = on.region_bytes("p", 0, B)
    fp, xp = on.exchange_parts(tp, region_p)
    assert np.allclose(on.edge_seconds(tp, "c2", "p", 0, B), 2 * (fp + xp))
    assert (fp > on.exchange_parts(tp)[0]).all()


def test_overlap_changes_seconds_not_bytes():
    g = _graph()
    m = load_machine("local")
    plan = _spatial(g, 2)
    a = price_plan(CostModel(g, 2, m, overlap=True), plan)
    b = price_plan(CostModel(g, 2, m, overlap=False), plan)
    assert a.exchange_bytes == b.exchange_bytes > 0
    assert a.total <= b.total


def test_a_described_machine_keeps_the_papers_model():
    g = _graph()
    cm = CostModel(g, 4, load_machine("paper_p100_cluster"))
    assert cm.rt is None and not cm.overlap
    B = np.array([[1, 1, 4, 1]])
    tab = cm.edge_tables("c2", 0, B, B)
    assert np.allclose(cm.edge_seconds(tab, "r1", "c2", 0, B), cm.exchange_seconds(tab, 2))


def test_a_channel_split_source_is_assembled_for_a_3x3_window_not_for_1x1():
    g = Graph("chan")
    x = g.input((4, 16, 16, 16))
    x = g.conv(x, 16, 3, padding=1, name="c1")
    x = g.relu(x, name="r1")
    x3 = g.conv(x, 16, 3, padding=1, name="c3")
    x1 = g.conv(x3, 16, 1, name="c11")
    x = g.global_avgpool(x1, name="gap")
    g.loss(g.linear(x, 4, name="fc"))
    cm = CostModel(g, 2, load_machine("local"), overlap=True)
    A = np.array([[1, 2, 1, 1], [1, 1, 2, 1]])        # channels split, rows split
    B = np.array([[1, 2, 1, 1]])
    assert cm.by_pieces("r1", "c3", A)[:, 0].tolist() == [False, True]
    assert cm.by_pieces("c3", "c11", A)[:, 0].tolist() == [True, True]
    tab = cm.edge_tables("c3", 0, A, B)
    t = cm.edge_seconds(tab, "r1", "c3", 0, B, A)
    full = cm.exchange_seconds(tab, 2, cm.region_bytes("c3", 0, B))
    assert np.isclose(t[0, 0], full[0, 0])            # assembled: the region's copy, no overlap
    assert t[1, 0] <= cm.exchange_seconds(tab, 2)[1, 0]
