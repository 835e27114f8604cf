"""The strategy search is exact: on random small DAGs of every shape (chains,
branches, residuals, diamonds, the Wheatstone bridge, graphs with K4 minors
that no series-parallel reduction removes, disconnected and multi-edge
graphs) with random cost tables, its cost equals brute-force enumeration and
its assignment achieves that cost."""
import json
from pathlib import Path

import numpy as np
import pytest

from hpcnn.strategy.search import SearchError, assignment_cost, brute_force, min_plus, solve


# ---- graph shapes (edge lists over nodes 0..n-1, i < j: a DAG) -------------
def chain(n):
    return n, [(i, i + 1) for i in range(n - 1)]


def branches(k, length):
    """A fork into k chains of ``length`` nodes joined again (Inception)."""
    edges, n = [], 1
    ends = []
    for _ in range(k):
        prev = 0
        for _ in range(length):
            edges.append((prev, n))
            prev = n
            n += 1
        ends.append(prev)
    for e in ends:
        edges.append((e, n))
    return n + 1, edges


def residual(blocks, inner):
    """ResNet-like: each block is a chain of ``inner`` nodes plus a skip edge."""
    edges, cur, n = [], 0, 1
    for _ in range(blocks):
        prev = cur
        for _ in range(inner):
            edges.append((prev, n))
            prev = n
            n += 1
        edges.append((prev, n))     # into the add
        edges.append((cur, n))      # the skip
        cur = n
        n += 1
    return n, edges


def diamond():
    return 4, [(0, 1), (0, 2), (1, 3), (2, 3)]


def wheatstone():
    # s=0, a=1, b=2, t=3: the smallest two-terminal graph that is not series-parallel
    return 4, [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)]


def complete(n):
    return n, [(i, j) for i in range(n) for j in range(i + 1, n)]


def grid(r, c):
    idx = lambda i, j: i * c + j
    edges = []
    for i in range(r):
        for j in range(c):
            if i + 1 < r:
                edges.append((idx(i, j), idx(i + 1, j)))
            if j + 1 < c:
                edges.append((idx(i, j), idx(i, j + 1)))
    return r * c, edges


def wheel(k):
    """A hub joined to every node of a k-cycle (K4 minor for k >= 3)."""
    edges = [(0, i) for i in range(1, k + 1)]
    edges += [(i, i + 1) for i in range(1, k)] + [(1, k)]
    return k + 1, edges


def random_dag(rng, n, p):
    return n, [(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < p]


def random_tables(rng, n, edges, cmax, inf_frac=0.0, max_states=200_000):
    while True:
        sizes = [int(rng.integers(1, cmax + 1)) for _ in range(n)]
        if np.prod(sizes, dtype=np.float64) <= max_states:
            break
    costs = []
    for s in sizes:
        v = rng.random(s) * rng.choice([0.1, 1.0, 10.0])
        if inf_frac:
            v[rng.random(s) < inf_frac] = np.inf
        costs.append(v)
    es = []
    for u, v in edges:
        m = rng.random((sizes[u], sizes[v])) * rng.choice([0.1, 1.0, 10.0])
        if rng.random() < 0.3:   # integer-valued tables make ties common
            m = np.floor(m * 3)
        es.append((u, v, m))
    return costs, es


def shapes(rng):
    """A stream of (label, n, edges) covering every family."""
    fams = [
        lambda: ("chain", *chain(int(rng.integers(1, 9)))),
        lambda: ("branches", *branches(int(rng.integers(2, 4)), int(rng.integers(1, 3)))),
        lambda: ("residual", *residual(int(rng.integers(1, 3)), int(rng.integers(1, 3)))),
        lambda: ("diamond", *diamond()),
        lambda: ("wheatstone", *wheatstone()),
        lambda: ("complete", *complete(int(rng.integers(4, 7)))),
        lambda: ("grid", *grid(int(rng.integers(2, 4)), 3)),
        lambda: ("wheel", *wheel(int(rng.integers(3, 6)))),
        lambda: ("random", *random_dag(rng, int(rng.integers(2, 9)), float(rng.uniform(0.2, 0.8)))),
    ]
    while True:
        for f in fams:
            yield f()


def _cases(count, seed):
    rng = np.random.default_rng(seed)
    gen = shapes(rng)
    out = []
    for k in range(count):
        label, n, edges = next(gen)
        cmax = 5 if n <= 5 else 3
        costs, es = random_tables(rng, n, edges, cmax)
        out.append((f"{k}-{label}", costs, es))
    return out


CASES = _cases(270, seed=1234)


@pytest.mark.parametrize("label,costs,edges", CASES, ids=[c[0] for c in CASES])
def test_search_equals_brute_force(label, costs, edges):
    best, _ = brute_force(costs, edges)
    res = solve(costs, edges)
    assert res.cost == pytest.approx(best, rel=1e-12, abs=1e-12)
    # the assignment is valid and achieves the reported cost
    assert len(res.choice) == len(costs)
    for v, c in enumerate(res.choice):
        assert 0 <= c < len(costs[v])
    assert assignment_cost(costs, edges, res.choice) == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_families_reach_the_fallback_and_the_reductions():
    """The case list really contains graphs that need variable elimination
    (K4 minors) and graphs that the reductions finish alone."""
    remaining = [solve(c, e).stats["remaining"] for _, c, e in CASES]
    assert sum(r > 0 for r in remaining) >= 20
    assert sum(r == 0 for r in remaining) >= 100


def test_wheatstone_bridge_reduces_without_fallback():
    rng = np.random.default_rng(0)
    n, edges = wheatstone()
    costs, es = random_tables(rng, n, edges, 4)
    assert solve(costs, es).stats["remaining"] == 0


def test_k4_needs_the_exact_fallback():
    rng = np.random.default_rng(1)
    n, edges = complete(4)
    costs, es = random_tables(rng, n, edges, 4)
    res = solve(costs, es)
    assert res.stats["remaining"] == 4
    assert res.cost == pytest.approx(brute_force(costs, es)[0])


def test_parallel_edges_and_disconnected_parts():
    rng = np.random.default_rng(2)
    for _ in range(20):
        edges = [(0, 1), (0, 1), (1, 2), (3, 4), (4, 3)]
        costs, es = random_tables(rng, 6, edges, 4)   # node 5 is isolated
        best, _ = brute_force(costs, es)
        assert solve(costs, es).cost == pytest.approx(best)


def test_infinite_costs_are_avoided_or_reported():
    rng = np.random.default_rng(3)
    for _ in range(30):
        n, edges = residual(2, 2)
        costs, es = random_tables(rng, n, edges, 4, inf_frac=0.4)
        best, _ = brute_force(costs, es)
        if np.isfinite(best):
            assert solve(costs, es).cost == pytest.approx(best)
        else:
            with pytest.raises(SearchError, match="no assignment has a finite cost"):
                solve(costs, es)


def test_min_plus_matches_definition():
    rng = np.random.default_rng(4)
    for ca, cb, cc in [(1, 1, 1), (3, 7, 2), (40, 50, 30), (5, 300, 4), (120, 90, 130)]:
        A, v, B = rng.random((ca, cb)), rng.random(cb), rng.random((cb, cc))
        ref = (A[:, :, None] + v[None, :, None] + B[None, :, :]).min(axis=1)
        assert np.array_equal(min_plus(A, v, B), ref)


def test_bad_inputs_are_named():
    with pytest.raises(SearchError, match="edge 0 .* shape"):
        solve([np.zeros(2), np.zeros(3)], [(0, 1, np.zeros((3, 2)))])
    with pytest.raises(SearchError, match="outside"):
        solve([np.zeros(2)], [(0, 5, np.zeros((2, 2)))])
    with pytest.raises(SearchError, match="NaN"):
        solve([np.array([np.nan])], [])


def test_too_wide_remainder_is_a_clear_error():
    n, edges = complete(6)
    costs = [np.zeros(10) for _ in range(n)]
    es = [(u, v, np.zeros((10, 10))) for u, v in edges]
    with pytest.raises(SearchError, match="table of"):
        solve(costs, es, max_table=1000)


PINS = Path(__file__).parent / "data" / "zoo_search_pins.json"


def _pin_cases():
    pins = json.loads(PINS.read_text())["pins"]
    return [(k.split("/")[0], int(k.split("/")[1]), v) for k, v in sorted(pins.items())]


@pytest.mark.slow
@pytest.mark.parametrize("model,ranks,pin", _pin_cases(), ids=[f"{m}-{p}" for m, p, _ in _pin_cases()])
def test_the_zoo_searches_to_the_pinned_plans(model, ranks, pin):
    """The search's plan and its cost for the zoo at 4-256 ranks of the
    paper's cluster stay what they were when pinned (see the file's note)."""
    from hpcnn.models import build_model
    from hpcnn.strategy.planner import search_plan
    g = build_model(model, batch=32 * ranks)
    plan, rep = search_plan(g, ranks, "paper_p100_cluster", with_baselines=False)
    assert rep["predicted"]["objective_s"] == pytest.approx(pin["objective_s"], rel=1e-9)
    assert plan.configs == pin["configs"]
