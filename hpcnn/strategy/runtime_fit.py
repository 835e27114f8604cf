"""The runtime figures of a machine (``hpcnn.strategy.machine.RuntimeFigures``)
fitted to measured training steps of small synthetic networks.  Pure
computation: no MPI, no timing.  The measurements come from
``hpcnn.calibration.runtime_sampler`` (``hpcnn calibrate``, ``hpcnn bench
model``); this module says which networks are measured and how the figures
follow from their steps.

The networks (``synthetic_networks``) are not the networks one predicts:
chains of tiny ReLUs; 3x3 convolutions with and without batch normalisation,
of sizes from a fraction of a millisecond per layer to tens, data parallel,
split over height and split over channels; a
chain that redistributes between sample and channel splits; a wide fully
connected layer.  Their median step times are regressed (least squares,
non-negative, weighted by 1 / sqrt(step)) on the cost model's own terms, with
the op tiles measured with every rank computing (the cost model is linear in
the fitted figures, so its columns are its own finite differences).  The
per-byte figures of exchanges and allreduces are not fitted when they were
measured directly (``runtime_sampler.measure_transfer``: samples'
"transfer"): the steps of small networks cannot identify them, and a fit
alone set them to zero, which priced every byte free:

    step - compute = a * layers + b + alpha_x * exchanges + bytes_x / beta_x
                     + alpha_ar * collectives + bytes_ar / beta_ar
                     + inflation * compute
                     + skew * sum over stretches ending in a reduction
                       of min(stretch, s)
                     + skew_x * sum over stretches ending in an exchange
                       of min(stretch, s_x)

a and b are the executor's time per layer and per step; alpha_x and beta_x
the latency and bandwidth of an exchange (one direction); alpha_ar and
beta_ar those of an allreduce over P ranks (smaller groups scale with the
number of steps, ceil(log2 group)); inflation what a layer loses inside a
step against its tile timed over and over (colder data, idler BLAS threads);
skew the share of a stretch of compute (the layers between two
synchronisations) lost waiting for the slowest rank at its end, growing with
the stretch up to s, then flat (a scheduler time slice or two); skew_x and s_x
the same where the stretch ends in an exchange that moves data (with more
ranks than cores the two waits differ: a channel-split layer's all-to-all
waits several times longer than a batch-norm reduction after the same
compute).  s and s_x are chosen from a grid by the least residual, and three
sizes of convolutions tell the skews from the latencies.  The exchange and
collective figures therefore include the waiting that synchronising costs on
this machine at this job size.
"""
from __future__ import annotations

import copy
import math
import time
from typing import NamedTuple

import numpy as np

from hpcnn.graph import Graph
from hpcnn.strategy.cost_model import CostModel
from hpcnn.strategy.plan_pricing import price_plan
from hpcnn.strategy.machine import Link, RuntimeFigures
from hpcnn.strategy.plan import Plan, uniform_plan

#: the fitted figures, in the order of the regression's columns
PARAMS = ("node_overhead_s", "step_overhead_s", "exchange_latency_s", "exchange_s_per_byte",
          "allreduce_latency_s", "allreduce_s_per_byte", "tile_inflation", "skew", "exchange_skew")

#: stretch lengths (seconds) beyond which the skew stops growing, tried in the
#: fit: a scheduler time slice or two (Linux's EEVDF slices are 0.75-3 ms).
#: Below a millisecond the skew would only repeat the latencies per
#: synchronisation; beyond a few slices a rank that lags its peers is one
#: that runs slower throughout, which the tiles timed with every rank
#: computing price already.  Longer saturations (up to none at all) fitted
#: the calibration networks' steps as well but put what the regression
#: could not place -- inter-node transfers behind the convolutions, with
#: ranks sharing a core -- into a wait proportional to every stretch: on
#: 2 nodes x 2 ranks at 1 Gbit/s that priced AlexNet's channel-split plans
#: 26-29% high (exchange skew 1.13 of every stretch, uncapped); refitted
#: from the same samples with these saturations, within 10% (median 5.8%
#: over that run's 8 plans, max 16%: docs/performance.md, "Cluster").
SATURATIONS = (1e-3, 2e-3, 4e-3)


class SyntheticNetwork(NamedTuple):
    """One calibration network: its name in the samples, graph and plan."""
    name: str
    graph: Graph
    plan: Plan


def synthetic_networks(P: int) -> list[SyntheticNetwork]:
    """The calibration networks at P ranks (the same list, in the same order,
    for the sampler that measures them and the fit that reads them)."""

    def relu_chain(L):
        g = Graph(f"relu_chain{L}")
        x = g.input((2 * P, 4))
        for _ in range(L):
            x = g.relu(x)
        g.loss(g.linear(x, 2))
        return g

    def conv_chain(L, bn, C=8, S=16, per_rank=4):
        g = Graph(f"conv{'_bn' if bn else ''}_chain{L}_{C}x{S}_b{per_rank}")
        x = g.input((per_rank * P, C, S, S))
        for _ in range(L):
            x = g.conv(x, C, 3, padding=1)
            if bn:
                x = g.bn(x)
            x = g.relu(x)
        g.loss(g.linear(g.global_avgpool(x), 4))
        return g

    def redistribution_chain(L, C=32, S=16):
        g = Graph(f"redistribution_chain{L}")
        x = g.input((4 * P, C, S, S))
        for _ in range(L):
            x = g.conv(x, C, 1)
        g.loss(g.linear(g.global_avgpool(x), 4))
        return g

    def wide_fc(F=1024):
        g = Graph(f"wide_fc{F}")
        x = g.input((2 * P, F))
        g.loss(g.linear(g.relu(g.linear(x, F)), 4))
        return g

    out = []
    for L in (2, 34):
        g = relu_chain(L)
        out.append(SyntheticNetwork(g.name, g, uniform_plan(g, P, {"n": P})))
    spatial = dict(fallback=lambda n: {"n": P} if len(n.shape) < 4 else None)
    # sizes from a fraction of a millisecond per layer to tens (64 channels
    # at 32x32, 8 samples per rank: about as long as a ResNet-18 layer at
    # 64 pixels), and, without batch norm, eight such layers in one stretch
    # (a data-parallel VGG's forward is one stretch of its 13 convolutions),
    # so that the waits after stretches of compute are measured at the
    # stretches of real networks, not extrapolated to them
    for L, bn, C, S, B in ((4, False, 8, 16, 4), (4, True, 8, 16, 4), (12, True, 8, 16, 4),
                           (4, True, 16, 32, 4), (2, True, 32, 32, 4), (2, True, 16, 32, 16),
                           (2, True, 64, 32, 8), (8, False, 64, 32, 8)):
        g = conv_chain(L, bn, C, S, B)
        out.append(SyntheticNetwork(g.name + "/n", g, uniform_plan(g, P, {"n": P})))
    if P > 1:
        for L, C, S in ((4, 8, 16), (12, 8, 16), (4, 16, 32)):
            g = conv_chain(L, False, C, S)
            out.append(SyntheticNetwork(g.name + "/h", g, uniform_plan(g, P, {"h": P}, **spatial)))
        # channels split everywhere: long layers, a redistribution after each
        for L, C, S, B in ((3, 16, 32, 4), (2, 64, 32, 8)):
            g = conv_chain(L, True, C, S, B)
            out.append(SyntheticNetwork(g.name + "/c", g, uniform_plan(
                g, P, {"c": P}, fallback=lambda n: {"n": P} if n.kind in ("input", "softmax_xent") else None)))
        g = redistribution_chain(6)
        configs = {}
        for i, n in enumerate(g):
            if n.kind == "conv2d":
                configs[n.name] = {"n": P} if i % 2 else {"c": P}
            else:
                configs[n.name] = {"n": P}
        out.append(SyntheticNetwork(g.name + "/n-c", g, Plan(g.name, P, g.batch, configs)))
        g = wide_fc()
        out.append(SyntheticNetwork(g.name + "/n", g, uniform_plan(g, P, {"n": P})))
    return out


def fit_samples(machine, samples: dict, dtype="float32", solo_ops: dict | None = None) -> tuple:
    """RuntimeFigures from pooled samples (``Sampler.samples()`` of
    hpcnn.calibration.runtime_sampler: {"ranks", "ops": {key: [s]},
    "copy_bandwidth": [B/s], "networks": {name: [step s]}, "blas_threads"}):
    every tile time, the copy bandwidth and every network's step time is the
    median of its measurements; then the fit of the module text.
    ``solo_ops``: tile times measured alone, for the slow-down factor of
    tiles that have only those.  Returns (RuntimeFigures, details)."""
    P = samples["ranks"]
    ops = {k: float(np.median(v)) for k, v in samples["ops"].items() if v}
    base = RuntimeFigures(ranks=P, ops=ops, copy_bandwidth=float(np.median(samples["copy_bandwidth"])),
                          blas_threads=samples.get("blas_threads"))
    if solo_ops:
        ratios = [ops[k] / solo_ops[k] for k in ops if k in solo_ops and solo_ops[k] > 0]
        if ratios:
            base.compute_factor = float(np.median(ratios))
    cases = synthetic_networks(P)
    measured = np.array([float(np.median(samples["networks"][c.name])) for c in cases])
    # per-byte figures measured directly (``measure_transfer``) are given,
    # not fitted: the steps cannot tell them from the latencies and waits
    fixed = {PARAMS.index(k): float(np.median(v)) for k, v in (samples.get("transfer") or {}).items()
             if k in PARAMS and v}
    if P > 1 and not fixed and samples.get("ranks_per_node") == 1:
        # one rank per node: nothing is exchanged or reduced inside a node;
        # those figures are the intra-node link's, and never decide a price
        fixed = {PARAMS.index(k): 1.0 / machine.intra.bandwidth
                 for k in ("exchange_s_per_byte", "allreduce_s_per_byte")}
    base.nodes = int(samples.get("nodes", 1))
    t0 = time.perf_counter()
    # weights between absolute and relative errors: the tiny networks
    # (ReLU chains) are the noisiest in relative terms
    w = 1.0 / np.sqrt(np.maximum(measured, 1e-6))
    feats = [_features(machine, base, c.graph, c.plan, dtype, SATURATIONS, fixed) for c in cases]
    consts = np.array([c0 for c0, _ in feats])
    best = None
    for sat in SATURATIONS:
        for sat_x in SATURATIONS:
            A = np.array([f[(sat, sat_x)] for _, f in feats])
            if P == 1:
                A[:, -2:] = 0.0         # one rank: no synchronisation to wait at
            y = measured - consts       # the fixed figures are in the constants
            theta = _nnls(A * w[:, None], y * w)
            for j, v in fixed.items():
                theta[j] = v
            resid = float(np.sum(((A @ theta - y) * w) ** 2))
            if best is None or resid < best[0] - 1e-12:
                best = (resid, (sat, sat_x), theta, A)
    _, (sat, sat_x), theta, A = best
    rf = _figures(base, theta, sat, sat_x)
    fitted = consts + A @ theta
    details = {"params": dict(zip(PARAMS, theta.tolist()), skew_saturation_s=sat,
                              exchange_skew_saturation_s=sat_x),
               "measured_directly": sorted(PARAMS[j] for j in fixed),
               "fit_seconds": time.perf_counter() - t0,
               "networks": [{"name": c.name, "measured_s": float(m), "fitted_s": float(f), "compute_s": float(c0)}
                            for c, m, f, c0 in zip(cases, measured, fitted, consts)]}
    return rf, details


def _figures(base, theta, saturation=math.inf, exchange_saturation=math.inf) -> RuntimeFigures:
    """A copy of RuntimeFigures ``base`` with the fitted figures ``theta``;
    the skew after a reduction saturates for stretches longer than
    ``saturation`` seconds, the one after an exchange for stretches longer
    than ``exchange_saturation``."""
    rf = copy.copy(base)
    a, b, ax, sx, aar, sar, infl, skew, xskew = (float(v) for v in theta)
    rf.node_overhead_s, rf.step_overhead_s = a, b
    rf.tile_inflation, rf.skew, rf.exchange_skew = infl, skew, xskew
    rf.skew_cap_s = skew * saturation if math.isfinite(saturation) else math.inf
    rf.exchange_skew_cap_s = xskew * exchange_saturation if math.isfinite(exchange_saturation) else math.inf
    if base.ranks > 1:
        rf.exchange = Link(1.0 / sx if sx > 0 else 1e30, ax)
        rf.allreduce_latency = {base.ranks: aar}
        rf.allreduce_bandwidth = 1.0 / sar if sar > 0 else 1e30
    else:                           # one rank: nothing to exchange or reduce
        rf.exchange, rf.allreduce_latency, rf.allreduce_bandwidth = None, {}, None
    return rf


def _features(machine, base, g, plan, dtype, saturations, fixed=None):
    """(cost without the fitted figures, {(saturation, exchange saturation):
    d cost / d figure}) of one network: for given saturations of the two
    skews the cost model is linear in the fitted figures.  ``fixed``
    ({index in PARAMS: value}): figures given, in the cost and not fitted
    (their columns are zero)."""
    P = base.ranks
    fixed = fixed or {}

    def total(theta, sat=math.inf, sat_x=math.inf):
        theta = np.array(theta, dtype=float)
        for j, v in fixed.items():
            theta[j] = v
        m = copy.copy(machine)
        m.runtime = dict(machine.runtime)
        m.runtime[P] = _figures(base, theta, sat, sat_x)
        return price_plan(CostModel(g, P, m, dtype=np.dtype(dtype).name), plan).total

    zero = np.zeros(len(PARAMS))
    c0 = total(zero)
    cols = []
    for j in range(len(PARAMS) - 2):
        if j in fixed:
            cols.append(0.0)
            continue
        e = zero.copy()
        e[j] = 1.0
        cols.append(total(e) - c0)
    skew, xskew = zero.copy(), zero.copy()
    skew[-2] = 1.0                                # the skews, last
    xskew[-1] = 1.0
    by_sat = {sat: total(skew, sat=sat) - c0 for sat in saturations}
    by_sat_x = {sat: total(xskew, sat_x=sat) - c0 for sat in saturations}
    return c0, {(a, b): np.array(cols + [by_sat[a], by_sat_x[b]]) for a in saturations for b in saturations}


def _nnls(A, y):
    """Least squares with non-negative coefficients (active set by
    elimination: refit without the most negative coefficient until none is
    negative).  Columns that are all zero get 0."""
    n = A.shape[1]
    free = [j for j in range(n) if np.any(A[:, j] != 0)]
    while True:
        x = np.zeros(n)
        if free:
            sol, *_ = np.linalg.lstsq(A[:, free], y, rcond=None)
            x[free] = sol
        neg = [j for j in free if x[j] < 0]
        if not neg:
            return x
        free.remove(min(neg, key=lambda j: x[j]))
