"""hpcnn.calibration, the parts that run in one process: the op tiles it
times are the ones the cost model looks up, the order and budget of timing
them, the roofline fit, and the records passed to the MPI workers.  The
workers themselves run in tests/test_cost_model.py
(test_calibrate_writes_a_machine_the_cost_model_uses)."""
import numpy as np
import pytest

from hpcnn.calibration.links import LinkMeasurement, fit_link
from hpcnn.calibration.runtime_sampler import RuntimeSpec, interleave, within_budget
from hpcnn.calibration.tiles import (TileJob, by_flops, fit_roofline, plan_tile_jobs, random_tile, run_tile,
                                     tile_jobs)
from hpcnn.models import build_model
from hpcnn.strategy.baselines import data_parallel, model_parallel
from hpcnn.parallel.layout import degrees_from_config
from hpcnn.strategy.cost_model import CostModel
from hpcnn.strategy.tile_geometry import NodeGeometry, tile_key
from hpcnn.strategy.machine import load_machine


@pytest.fixture(scope="module")
def lenet_jobs():
    return tile_jobs([("lenet5", None)], [1, 2, 4], 4, "float32")


def test_tile_jobs_are_the_tiles_the_cost_model_prices(lenet_jobs):
    g = build_model("lenet5", batch=4)
    for P in (1, 2, 4):
        cm = CostModel(g, P, load_machine("paper_p100_cluster"))
        for gi, grp in enumerate(cm.space.groups):
            for name in grp.members:
                if g[name].kind == "input":
                    continue
                for row in cm.space.configs[gi]:
                    ins, out, _ = cm.geometry(name).tile(row)
                    assert tile_key(g[name], ins, out, "float32") in lenet_jobs, (name, P, row)
    rng = np.random.default_rng(0)
    for key, job in lenet_jobs.items():
        assert isinstance(job, TileJob) and job.key == key
        assert job.key == tile_key(job.node, job.in_tiles, job.out_tile, "float32")
        assert job.out_tile == tuple(hi - lo for lo, hi in job.out_box)
        assert job.flops == float(job.node.op.flops(list(job.in_tiles), job.out_tile))
        xs, params, buffers, ctx = random_tile(job, "float32", rng)
        assert [x.shape for x in xs] == list(job.in_tiles)
        y, _ = job.node.op.forward(xs, params, buffers, ctx)
        assert y.shape == job.out_tile


def test_plan_tile_jobs_hold_every_layer_of_the_plans():
    g = build_model("lenet5", batch=4)
    plans = [data_parallel(g, 2), model_parallel(g, 2)]
    jobs = plan_tile_jobs(g, plans, "float32")
    want = set()
    for plan in plans:
        for n in g:
            if n.kind != "input":
                deg = degrees_from_config(n.shape, plan.config(n.name))
                ins, out, _ = NodeGeometry(n).tile(deg)
                want.add(tile_key(n, ins, out, "float32"))
                assert jobs[tile_key(n, ins, out, "float32")].degrees == tuple(deg)
    assert set(jobs) == want


def test_tiles_are_timed_most_flops_first_within_the_budget(lenet_jobs):
    order = by_flops(lenet_jobs)
    flops = [lenet_jobs[k].flops for k in order]
    assert flops == sorted(flops, reverse=True)
    assert within_budget(lenet_jobs, None, 3, 2, 5, {}, 2) is lenet_jobs
    # a tile not timed alone counts 1 ms, twice that with 2 ranks on 1 slot:
    # 3 rounds of max(5 runs, 20 ms) plus 2 ms each, 66 ms
    assert list(within_budget(lenet_jobs, 0.14, 3, 2, 5, {}, 1)) == order[:2]
    assert list(within_budget(lenet_jobs, 0.0, 3, 2, 5, {}, 1)) == order[:1]   # never none
    # timed alone at 10 ms: 3 x 5 x 20 ms + 6 ms each
    slow = {k: 1e-2 for k in lenet_jobs}
    assert list(within_budget(lenet_jobs, 0.14, 3, 2, 5, slow, 1)) == order[:1]
    assert list(within_budget(lenet_jobs, 0.62, 3, 2, 5, slow, 1)) == order[:2]


def test_run_tile_times_the_tile():
    g = build_model("lenet5", batch=4)
    job = next(iter(plan_tile_jobs(g, [data_parallel(g, 1)], "float32").values()))
    assert run_tile(job, "float32", 2, np.random.default_rng(0)) > 0


def test_roofline_fit_recovers_the_efficiencies_that_made_the_times():
    peak, bw, overhead = 1e10, 2e10, 1e-5
    samples = {"conv2d": [(f, 1e3, f / (peak * 0.4) + overhead) for f in (1e7, 3e7, 1e8)],
               "relu": [(0.0, b, b / (bw * 0.25) + overhead) for b in (1e6, 4e6)],
               "batchnorm": [(1e3, b, b / (bw * 0.25) + overhead) for b in (2e6, 8e6)]}
    kind_eff, mem_eff, errs = fit_roofline(samples, peak, bw, overhead)
    assert kind_eff["conv2d"] == pytest.approx(0.4)
    assert mem_eff == pytest.approx(0.25)
    assert "relu" not in kind_eff                # no flops: memory bound only
    assert len(errs) == 7 and max(errs) < 1e-9
    assert fit_roofline({}, peak, bw, overhead) == ({}, 0.5, [])


def test_interleave_spreads_both_lists_in_order():
    a, b = list(range(6)), ["x", "y"]
    out = interleave(a, b)
    assert [v for v in out if v in a] == a and [v for v in out if v in b] == b
    assert out == [0, 1, "x", 2, 3, 4, "y", 5]
    assert interleave([], b) == b and interleave(a, []) == a


def test_records_for_the_workers():
    spec = RuntimeSpec(models=("lenet5", "resnet_small@32"), batch=8, budget=5.0, rounds=1)
    assert RuntimeSpec.from_json(spec.to_json()) == spec
    times = {s: 2e-6 + s / 4e9 for s in (8, 1 << 20, 1 << 23)}
    bw, lat = fit_link(times)
    m = LinkMeasurement("inter_node", times, bw, lat)
    figs = {f["figure"]: f for f in m.figures("measured here")}
    assert set(figs) == {"links.inter_node.latency", "links.inter_node.bandwidth",
                         "links.inter_node.pingpong_one_way_s"}
    assert figs["links.inter_node.bandwidth"]["value"] == pytest.approx(4e9, rel=1e-3)
    assert not any(f["assumed"] for f in figs.values())
