"""hpcnn bench model: its plans, and the fit of the runtime figures
(hpcnn.strategy.runtime_fit; pure parts, no MPI; the benchmark itself is run
by hand, see docs/performance.md "Cost model accuracy")."""
import math

import numpy as np
import pytest

from hpcnn.bench.model import PLAN_NAMES, make_plans
from hpcnn.calibration.tiles import plan_tile_jobs
from hpcnn.models import build_model
from hpcnn.strategy.machine import RuntimeFigures, load_machine
from hpcnn.strategy.runtime_fit import (PARAMS, SATURATIONS, _features, _figures, _nnls, fit_samples,
                                        synthetic_networks)


@pytest.mark.parametrize("P", [2, 4])
def test_the_benchmark_has_at_least_six_different_valid_plans(P):
    g = build_model("resnet_small", batch=32, image_size=32)
    plans = make_plans(g, P, load_machine("paper_p100_cluster"))
    assert list(plans) == list(PLAN_NAMES)
    for name, plan in plans.items():
        plan.validate(g, P)
    distinct = {str(sorted(p.configs.items())) for p in plans.values()}
    assert len(distinct) >= 6
    conv = "layer1.0.conv1"
    assert plans["spatial-h"].config(conv) == {"n": 1, "h": P}
    assert plans["model-parallel"].config(conv).get("c") == P
    assert plans["data-parallel"].config(conv) == {"n": P}
    assert plans["owt"].config("fc").get("c") == P
    hw = plans["spatial-hw"].config(conv)
    assert hw.get("w", 1) > 1 and hw.get("h", 1) * hw.get("w", 1) == P


def test_nnls_keeps_coefficients_non_negative():
    rng = np.random.default_rng(0)
    A = rng.random((12, 4))
    x = np.array([1.0, 0.0, 2.0, 0.5])
    assert np.allclose(_nnls(A, A @ x), x)
    y = A @ np.array([1.0, -3.0, 2.0, 0.5])
    got = _nnls(A, y)
    assert (got >= 0).all() and got[1] == 0


def _priced_steps(P, seed, theta, sat, sat_x):
    """(machine, base figures, samples) of the calibration networks at P
    ranks whose steps are the cost model's price with figures ``theta`` and
    skew saturations ``sat``/``sat_x``, on random op tiles."""
    machine = load_machine("paper_p100_cluster")
    cases = synthetic_networks(P)
    rng = np.random.default_rng(seed)
    ops = {}
    for _, g, plan in cases:
        for k in plan_tile_jobs(g, [plan], "float32"):
            ops.setdefault(k, float(rng.uniform(2e-5, 3e-3)))
    base = RuntimeFigures(ranks=P, ops=ops, copy_bandwidth=8e9)
    steps = {}
    for name, g, plan in cases:
        c0, cols = _features(machine, base, g, plan, "float32", [sat, sat_x])
        steps[name] = [c0 + float(cols[(sat, sat_x)] @ theta)]
    return machine, base, {"ranks": P, "ops": {k: [v] for k, v in ops.items()}, "copy_bandwidth": [8e9],
                           "networks": steps}


@pytest.mark.parametrize("P", [1, 2])
def test_the_fit_recovers_figures_that_made_the_steps(P):
    """Synthetic steps priced by the cost model with known figures (and a
    known saturation of the skew) are fitted back to those figures."""
    truth = {"node_overhead_s": 2e-5, "step_overhead_s": 1.5e-4, "exchange_latency_s": 3e-4,
             "exchange_s_per_byte": 1e-9, "allreduce_latency_s": 6e-4, "allreduce_s_per_byte": 2e-9,
             "tile_inflation": 0.15, "skew": 0.4, "exchange_skew": 1.3}
    if P == 1:                      # nothing to exchange, reduce or wait for
        for k in ("exchange_latency_s", "exchange_s_per_byte", "allreduce_latency_s", "allreduce_s_per_byte",
                  "skew", "exchange_skew"):
            truth[k] = 0.0
    theta = np.array([truth[k] for k in PARAMS])
    sat, sat_x = 4e-3, 1e-3
    machine, base, samples = _priced_steps(P, P, theta, sat, sat_x)
    rf, details = fit_samples(machine, samples)
    if P > 1:
        assert details["params"]["skew_saturation_s"] == sat
        assert details["params"]["exchange_skew_saturation_s"] == sat_x
    for k in PARAMS:
        assert details["params"][k] == pytest.approx(truth[k], rel=1e-6, abs=1e-12), k
    assert rf.skew_cap_s == pytest.approx(truth["skew"] * details["params"]["skew_saturation_s"])
    assert rf.exchange_skew_cap_s == pytest.approx(
        truth["exchange_skew"] * details["params"]["exchange_skew_saturation_s"])
    for net in details["networks"]:
        assert net["fitted_s"] == pytest.approx(net["measured_s"], rel=1e-9)
    # the figures a fit gives are the ones a machine file stores
    again = RuntimeFigures.from_dict(rf.to_dict())
    assert again.to_dict() == rf.to_dict()
    assert _figures(base, theta, math.inf).skew_cap_s == math.inf


def test_a_wait_proportional_to_every_stretch_is_fitted_as_one_capped_at_a_few_time_slices():
    """Steps made with an uncapped exchange skew (a wait of 0.9 x every
    stretch, however long) are fitted with a wait that stops growing within
    the saturations tried (a scheduler slice or two): a longer one would be
    a rank slower throughout, which the tiles priced with every rank
    computing hold already, and on the cluster an uncapped fit priced
    channel-split plans far too high."""
    theta = np.array([2e-5, 1.5e-4, 3e-4, 1e-9, 6e-4, 2e-9, 0.1, 0.3, 0.9])
    machine, _, samples = _priced_steps(2, 7, theta, 4e-3, math.inf)
    rf, details = fit_samples(machine, samples)
    assert details["params"]["exchange_skew_saturation_s"] in SATURATIONS
    assert max(SATURATIONS) <= 4e-3
    assert math.isfinite(rf.exchange_skew_cap_s) and math.isfinite(rf.skew_cap_s)
    assert rf.wait_after(1.0, exchange=True) <= rf.exchange_skew * max(SATURATIONS) + 1e-12


def test_runs_combine_into_medians_per_plan(tmp_path):
    from hpcnn.bench.model import combine, format_table, plot

    def run(scale):
        rows = [{"plans": ["data-parallel"], "predicted_s": 0.050 * scale, "measured_s": 0.040 * scale,
                 "predicted_file_s": 0.06, "error": 0.25, "error_file": 0.5},
                {"plans": ["owt", "searched"], "predicted_s": 0.030, "measured_s": 0.033 * scale,
                 "predicted_file_s": 0.06, "error": 0.0, "error_file": 0.0}]
        return [{"ranks": 2, "model": "m", "image_size": 8, "batch": 4, "dtype": "float32",
                 "profiled": True, "load_average": [1.0], "rows": rows}]
    runs = [run(1.0), run(1.1), run(0.5)]
    for res in runs:
        for r in res[0]["rows"]:
            r["error"] = (r["predicted_s"] - r["measured_s"]) / r["measured_s"]
    res = combine(runs)
    dp, owt = res[0]["rows"]
    assert dp["predicted_s"] == pytest.approx(0.050) and dp["measured_s"] == pytest.approx(0.040)
    assert dp["error"] == pytest.approx(0.25) and len(dp["runs_error"]) == 3
    assert owt["measured_s"] == pytest.approx(0.033) and owt["error"] == pytest.approx(0.03 / 0.033 - 1)
    errs = sorted(0.03 / (0.033 * s) - 1 for s in (1.0, 1.1, 0.5))
    assert owt["median_run_error"] == pytest.approx(errs[1])
    text = format_table(res)
    assert "owt, searched" in text and "within 15%" in text
    plot(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
