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
from hpcnn.strategy.tile_geometry import NodeGeometry, inputs_from_input, tile_key
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
                    assert tile_key(g[name], ins, out, "float32", inputs_from_input(g, g[name])) in lenet_jobs, \
                        (name, P, row)
    rng = np.random.default_rng(0)
    for key, job in lenet_jobs.items():
        assert isinstance(job, TileJob) and job.key == key
        assert job.key == tile_key(job.node, job.in_tiles, job.out_tile, "float32", job.from_input)
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
                key = tile_key(n, ins, out, "float32", inputs_from_input(g, n))
                want.add(key)
                assert jobs[key].degrees == tuple(deg)
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


def test_roofline_fit_recovers_the_fixed_costs_and_rates_that_made_the_times():
    peak, bw, overhead = 1e10, 2e10, 1e-5
    samples = {"conv2d": [(f, 1e3, 3e-5 + f / (peak * 0.4)) for f in (1e7, 3e7, 1e8)],
               "relu": [(0.0, b, 2e-5 + b / (bw * 0.25)) for b in (1e6, 4e6)],
               "batchnorm": [(1e3, b, 5e-5 + b / (bw * 0.1)) for b in (2e6, 8e6)],
               "add": [(0.0, 1e6, 1e6 / (bw * 0.5) + overhead)]}
    roof = fit_roofline(samples, peak, bw, overhead)
    assert roof["kind_efficiency"] == {"conv2d": pytest.approx(0.4)}
    assert roof["kind_memory_efficiency"]["relu"] == pytest.approx(0.25)
    assert roof["kind_memory_efficiency"]["batchnorm"] == pytest.approx(0.1)
    assert roof["kind_overhead_s"]["conv2d"] == pytest.approx(3e-5)
    assert roof["kind_overhead_s"]["batchnorm"] == pytest.approx(5e-5)
    # one sample: the common fixed cost, the rate from the rest
    assert roof["kind_overhead_s"]["add"] == overhead
    assert roof["kind_memory_efficiency"]["add"] == pytest.approx(0.5)
    assert len(roof["errors"]) == 8 and max(roof["errors"]) < 1e-6
    empty = fit_roofline({}, peak, bw, overhead)
    assert empty["kind_efficiency"] == {} and empty["memory_efficiency"] == 0.5 and empty["errors"] == []


def test_a_large_tile_is_priced_by_the_rate_not_by_the_small_tiles_median():
    """Small tiles pay mostly their fixed cost; the fit extrapolates a tile
    100 times larger along the line (the median of the small tiles'
    efficiencies would price it 3.5 times too slow)."""
    peak, bw, overhead = 1e11, 2e10, 1e-5
    truth = (2e-4, 1.0 / (peak * 0.8))
    small = [(f, 1e4, truth[0] + f * truth[1]) for f in (1e6, 3e6, 1e7, 3e7)]
    roof = fit_roofline({"conv2d": small}, peak, bw, overhead)
    f = 3e9
    pred = roof["kind_overhead_s"]["conv2d"] + f / (peak * roof["kind_efficiency"]["conv2d"])
    assert pred == pytest.approx(truth[0] + f * truth[1], rel=1e-6)
    median_eff = float(np.median([f / (peak * (t - overhead)) for f, _, t in small]))
    assert f / (peak * median_eff) > 3 * pred


def test_tiles_are_timed_as_the_runtime_runs_them():
    """Every 4-D input of an op is channels-last, as the ops return their
    outputs and the exchanges keep them, and its gradient is asked for,
    except the network input (C order, no gradient)."""
    g = build_model("resnet_small", batch=4, image_size=16)
    jobs = plan_tile_jobs(g, [data_parallel(g, 1)], "float32")
    rng = np.random.default_rng(0)
    seen = set()
    for job in jobs.values():
        xs, _, _, ctx = random_tile(job, "float32", rng)
        assert ctx.input_grads == tuple(g[src].kind != "input" for src in job.node.inputs)
        for x, src, last in zip(xs, job.node.inputs, job.channels_last):
            if x.ndim != 4:
                assert not last
                continue
            from_input = g[src].kind == "input"
            assert last is (not from_input)
            assert x.flags.c_contiguous is from_input
            if last:
                assert x.strides[1] == x.itemsize       # channels innermost
            seen.add(from_input)
    assert seen == {True, False}


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


def test_a_first_layer_has_a_key_of_its_own():
    """The first convolution of a network (no input gradient, C-order
    input) and a later one of the same shape are timed and stored apart."""
    from hpcnn.graph import Graph
    g = Graph("same_shapes")
    x = g.input((4, 8, 16, 16))
    a = g.conv(x, 8, 3, padding=1)
    b = g.conv(g.relu(a), 8, 3, padding=1)
    g.loss(g.linear(g.global_avgpool(b), 2))
    jobs = plan_tile_jobs(g, [data_parallel(g, 1)], "float32")
    first = [j for j in jobs.values() if j.node.name == a]
    later = [j for j in jobs.values() if j.node.name == b]
    assert len(first) == len(later) == 1 and first[0].key != later[0].key
    assert first[0].in_tiles == later[0].in_tiles and first[0].input_grads == (False,)
    assert later[0].input_grads == (True,)
    cm = CostModel(g, 1, load_machine("paper_p100_cluster"))
    for name, job in ((a, first[0]), (b, later[0])):
        ins, out, _ = cm.geometry(name).tile((1, 1, 1, 1))
        assert tile_key(g[name], ins, out, "float32", inputs_from_input(g, g[name])) == job.key


def test_every_tile_of_a_volume_plan_can_be_timed():
    """Calibration times the tiles of 3-D networks too: every layer of
    volume_small under a d x h split, the mse loss with float targets."""
    g = build_model("volume_small", batch=2)
    from hpcnn.strategy.plan import uniform_plan
    plan = uniform_plan(g, 4, {"d": 2, "h": 2}, fallback=lambda n: {"n": 2} if len(n.shape) < 5 else None)
    jobs = plan_tile_jobs(g, [plan], "float32")
    kinds = {j.node.kind for j in jobs.values()}
    assert {"conv3d", "maxpool3d", "avgpool3d", "batchnorm", "mse"} <= kinds
    for job in jobs.values():
        if job.node.kind != "input":
            assert run_tile(job, "float32", 1, np.random.default_rng(0)) > 0, job.node.name
