"""Measure hpcnn's runtime on this machine with P ranks running at once:
the figures the cost model uses for jobs of P ranks on one node
(``hpcnn.strategy.machine.RuntimeFigures``).

Everything here is collective over an mpi4py communicator of P ranks, and
every rank works at the same moment, so that what is measured is what a
training step of P ranks sees.  On a node with fewer cores than ranks (or
cores shared with other work) that differs a lot from one rank alone: ranks
share the cores, a rank waiting in MPI keeps polling, and every collective
or exchange costs scheduling time -- milliseconds rather than microseconds
-- because the ranks it waits for may not be running.

1. ``profile_tiles``: op tiles, forward + backward through the op API, every
   rank running the same tile back to back at the same time (at least ~20 ms
   in all); the figure is the mean over ranks of the mean time per run: the
   compute a rank gets when all ranks compute.
2. ``measure_copy``: bytes per second of copying a tile into a region.
3. ``fit_samples``: the rest is fitted to training steps of small synthetic
   networks (not the networks one predicts) run by hpcnn's own executor:
   chains of tiny ReLUs; 3x3 convolutions with and without batch
   normalisation, of three sizes, data parallel, split over height and split
   over channels; a chain that redistributes between sample and channel
   splits; a wide fully connected layer.  Their median step times are
   regressed (least squares, non-negative, weighted by 1 / sqrt(step)) on
   the cost model's own terms, with the tiles of step 1 (the cost model is
   linear in the fitted figures, so its columns are its own finite
   differences):

       step - compute = a * layers + b + alpha_x * exchanges + bytes_x / beta_x
                        + alpha_ar * collectives + bytes_ar / beta_ar
                        + inflation * compute
                        + skew * sum over stretches ending in a reduction
                          of min(stretch, s)
                        + skew_x * sum over stretches ending in an exchange
                          of min(stretch, s_x)

   a and b are the executor's time per layer and per step; alpha_x and
   beta_x the latency and bandwidth of an exchange (one direction);
   alpha_ar and beta_ar those of an allreduce over P ranks (smaller groups
   scale with the number of steps, ceil(log2 group)); inflation what a
   layer loses inside a step against its tile timed over and over (colder
   data, idler BLAS threads); skew the share of a stretch of compute (the
   layers between two synchronisations) lost waiting for the slowest rank
   at its end, growing with the stretch up to s, then flat (a few scheduler
   time slices); skew_x and s_x the same where the stretch ends in an
   exchange that moves data (with more ranks than cores the two waits
   differ: a channel-split layer's all-to-all waits several times longer
   than a batch-norm reduction after the same compute).  s and s_x are
   chosen from a grid by the least residual, and three sizes of
   convolutions tell the skews from the latencies.
   The exchange and collective figures therefore include the waiting that
   synchronising costs on this machine at this job size.

``Sampler`` takes the measurements in rounds (collective); ``fit_samples``
pools them (medians) and fits; ``runtime_figures`` does both; ``python -m
hpcnn.bench.runtime_profile SPEC OUT`` (under mpiexec, started by ``hpcnn
calibrate``) writes the figures.
This module is a measurement tool, like the benchmarks beside it: the cost
model and the search never import it.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time

import numpy as np


# ---- op tiles ----------------------------------------------------------------------------
def tile_time(node, obox, ins, dtype, repeats, rng, comm=None, min_total=0.02):
    """Mean seconds of forward + backward of ``node`` on one tile, over runs
    back to back (at least ``repeats`` and about ``min_total`` seconds).
    With ``comm``, every rank runs the tile at once, makes the same number
    of runs, and the figure is the mean over ranks."""
    from hpcnn.strategy.calibrate import random_tile
    op = node.op
    xs, params, buffers, ctx = random_tile(node, obox, ins, dtype, rng)

    def once():
        y, saved = op.forward(xs, params, buffers, ctx)
        op.backward(np.ones_like(y), saved, params, ctx)

    t = time.perf_counter()
    once()                                     # warm-up
    first = time.perf_counter() - t
    if comm is not None:
        from mpi4py import MPI
        first = comm.allreduce(first, op=MPI.MAX)
    n = int(min(200, max(repeats, math.ceil(min_total / max(first, 1e-6)))))
    t = time.perf_counter()
    for _ in range(n):
        once()
    mean = (time.perf_counter() - t) / n
    if comm is not None:
        from mpi4py import MPI
        mean = comm.allreduce(mean, op=MPI.SUM) / comm.Get_size()
    return mean


def profile_tiles(comm, jobs: dict, dtype, repeats=5, budget=None) -> dict:
    """{key: seconds} for ``jobs`` ({key: (node, obox, ins[, flops])}, the
    same on every rank), every rank running each tile at the same time;
    most flops first when a ``budget`` (seconds) may cut the list short."""
    from mpi4py import MPI
    rng = np.random.default_rng(comm.Get_rank())
    # the same order on every rank: most flops first (when known), then by key
    keys = sorted(jobs, key=lambda k: (-(jobs[k][3] if len(jobs[k]) > 3 else 0.0), k))
    out = {}
    t_end = None if budget is None else time.perf_counter() + budget
    for key in keys:
        if t_end is not None and comm.allreduce(time.perf_counter() > t_end, op=MPI.LOR):
            break
        node, obox, ins = jobs[key][:3]
        comm.Barrier()
        out[key] = tile_time(node, obox, ins, dtype, repeats, rng, comm)
    return out


def plan_tile_jobs(graph, plans, dtype) -> dict:
    """{key: (node, obox, ins)} of the representative tile of every layer
    under each of ``plans`` (the tiles the cost model prices them with)."""
    from hpcnn.parallel.layout import degrees_from_config
    from hpcnn.strategy.cost_model import NodeGeometry, tile_key
    jobs, geoms = {}, {}
    for plan in plans:
        for n in graph:
            if n.kind == "input":
                continue
            geom = geoms.setdefault(n.name, NodeGeometry(n))
            deg = degrees_from_config(n.shape, plan.config(n.name))
            ins, out, obox = geom.tile(deg)
            jobs.setdefault(tile_key(n, ins, out, np.dtype(dtype).name), (n, obox, ins))
    return jobs


# ---- memory copies -------------------------------------------------------------------------
def measure_copy(comm, nbytes=2 << 20, runs=50) -> float:
    """Bytes per second of copying a tile into a region (every rank at once;
    mean over ranks)."""
    from mpi4py import MPI
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    dst[...] = src
    comm.Barrier()
    t = time.perf_counter()
    for _ in range(runs):
        dst[...] = src
    per = (time.perf_counter() - t) / runs
    per = comm.allreduce(per, op=MPI.SUM) / comm.Get_size()
    return float(nbytes / per) if per > 0 else float("inf")


# ---- synthetic networks ------------------------------------------------------------------------
def _synthetic(P):
    """(name, graph, plan) of the calibration networks at P ranks."""
    from hpcnn.graph import Graph
    from hpcnn.strategy.plan import Plan, uniform_plan

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
        out.append((g.name, g, uniform_plan(g, P, {"n": P})))
    spatial = dict(fallback=lambda n: {"n": P} if len(n.shape) < 4 else None)
    for L, bn, C, S, B in ((4, False, 8, 16, 4), (4, True, 8, 16, 4), (12, True, 8, 16, 4),
                           (4, True, 16, 32, 4), (2, True, 32, 32, 4), (2, True, 16, 32, 16)):
        g = conv_chain(L, bn, C, S, B)
        out.append((g.name + "/n", g, uniform_plan(g, P, {"n": P})))
    if P > 1:
        for L, C, S in ((4, 8, 16), (12, 8, 16), (4, 16, 32)):
            g = conv_chain(L, False, C, S)
            out.append((g.name + "/h", g, uniform_plan(g, P, {"h": P}, **spatial)))
        # channels split everywhere: long layers, a redistribution after each
        g = conv_chain(3, True, 16, 32)
        out.append((g.name + "/c", g, uniform_plan(
            g, P, {"c": P}, fallback=lambda n: {"n": P} if n.kind in ("input", "softmax_xent") else None)))
        g = redistribution_chain(6)
        configs = {}
        for i, n in enumerate(g):
            if n.kind == "conv2d":
                configs[n.name] = {"n": P} if i % 2 else {"c": P}
            else:
                configs[n.name] = {"n": P}
        out.append((g.name + "/n-c", g, Plan(g.name, P, g.batch, configs)))
        g = wide_fc()
        out.append((g.name + "/n", g, uniform_plan(g, P, {"n": P})))
    return out


class TimedNetwork:
    """A network under a plan, built once (collective), whose training
    steps are timed on demand: the slowest rank's step, from a barrier."""

    def __init__(self, comm, name, g, plan, dtype, warmup=3):
        from hpcnn.backend import Backend
        from hpcnn.runtime.executor import DistributedModel
        from hpcnn.runtime.sgd import SGD
        self.comm, self.name, self.graph, self.plan = comm, name, g, plan
        dt = np.dtype(dtype)
        self.dm = DistributedModel(g, plan, comm, dtype=dt, seed=0, backend=Backend("numpy"), setup=False)
        rng = np.random.default_rng(0)
        x = rng.standard_normal(g[g.input_name].shape).astype(dt)
        self.y = rng.integers(0, g[g.logits_name].shape[1], size=g.batch)
        box = self.dm.input_box()
        self.xt = x[box.slices()] if box is not None else None
        self.sgd = SGD(lr=0.01, momentum=0.9)          # as hpcnn bench model trains
        self.step = 0
        self.times: list = []
        for _ in range(warmup):
            self._one()

    def _one(self):
        self.dm.train_step(self.xt, self.y, self.sgd, step=self.step)
        self.step += 1

    def run(self, steps: int) -> list:
        from mpi4py import MPI
        out = []
        for _ in range(steps):
            self.comm.Barrier()
            t = time.perf_counter()
            self._one()
            out.append(self.comm.allreduce(time.perf_counter() - t, op=MPI.MAX))
        self.times.extend(out)
        return out

    def free(self):
        self.dm.free()


class Sampler:
    """Everything the figures are fitted from, sampled in rounds (collective):
    the op tiles of ``jobs`` and of the synthetic networks, the copy
    bandwidth, and the synthetic networks' training steps.  ``items()``
    gives one round as a list of small collective pieces of work, so that a
    caller can interleave its own (``hpcnn bench model`` times its plans
    between them): a change of the machine's load then touches calibration
    and measurement alike.  ``samples()`` pools what was measured."""

    def __init__(self, comm, jobs: dict, dtype="float32", repeats=5, steps=3):
        from hpcnn.backend import get_backend
        from hpcnn.runtime.node_setup import setup_node
        self.comm, self.dtype, self.repeats, self.steps = comm, dtype, repeats, steps
        self.P = comm.Get_size()
        self.info = setup_node(comm, get_backend(), verbose=False)
        self.jobs = dict(jobs)
        self.networks = [TimedNetwork(comm, name, g, plan, dtype) for name, g, plan in _synthetic(self.P)]
        for net in self.networks:
            self.jobs.update(plan_tile_jobs(net.graph, [net.plan], dtype))
        # the same order on every rank: most flops first (when known), then by key
        self.keys = sorted(self.jobs, key=lambda k: (-(self.jobs[k][3] if len(self.jobs[k]) > 3 else 0.0), k))
        self.ops: dict = {}
        self.copy: list = []
        self.load: list = []

    def _tiles(self, keys):
        got = profile_tiles(self.comm, {k: self.jobs[k] for k in keys}, self.dtype, self.repeats)
        for k, v in got.items():
            self.ops.setdefault(k, []).append(v)

    def _copy(self):
        self.copy.append(measure_copy(self.comm))
        self.load.append(os.getloadavg()[0])

    def items(self, chunks: int = 4) -> list:
        """One round: the tiles in ``chunks`` parts, the copy bandwidth, and
        ``steps`` steps of every synthetic network, spread evenly."""
        parts = [self.keys[c::chunks] for c in range(chunks)]
        tiles = [lambda ks=ks: self._tiles(ks) for ks in parts if ks]
        nets = [lambda n=n: n.run(self.steps) for n in self.networks]
        out, k = [], max(1, len(nets) // max(1, len(tiles)))
        for i, t in enumerate(tiles):
            out.append(t)
            out.extend(nets[i * k:(i + 1) * k])
        out.extend(nets[len(tiles) * k:])
        out.append(self._copy)
        return out

    def run_round(self):
        for item in self.items():
            item()

    def work(self, rounds: int, chunks: int = 4) -> list:
        """``rounds`` rounds of ``items`` in one list."""
        return [it for _ in range(rounds) for it in self.items(chunks)]

    def samples(self) -> dict:
        """The pooled measurements (plain data, the same on every rank)."""
        return {"ranks": self.P, "blas_threads": self.info.blas_threads,
                "ops": {k: list(v) for k, v in self.ops.items()},
                "copy_bandwidth": list(self.copy),
                "networks": {n.name: list(n.times) for n in self.networks},
                "load_average": list(self.load)}

    def free(self):
        for n in self.networks:
            n.free()


def interleave(a: list, b: list) -> list:
    """The items of ``a`` and ``b`` merged so that each list is spread
    evenly over the result (each keeps its own order)."""
    if not a or not b:
        return list(a) + list(b)
    keyed = [((i + 0.5) / len(a), 0, x) for i, x in enumerate(a)] + \
            [((j + 0.5) / len(b), 1, x) for j, x in enumerate(b)]
    return [x for _, _, x in sorted(keyed, key=lambda t: (t[0], t[1]))]


def fit_samples(machine, samples: dict, dtype="float32", solo_ops: dict | None = None) -> tuple:
    """RuntimeFigures from the pooled ``Sampler.samples()``: every tile time,
    the copy bandwidth and every network's step time is the median of its
    measurements; then the fit of the module text.  Pure computation (no
    MPI).  Returns (RuntimeFigures, details)."""
    from hpcnn.strategy.machine import RuntimeFigures
    P = samples["ranks"]
    ops = {k: float(np.median(v)) for k, v in samples["ops"].items() if v}
    base = RuntimeFigures(ranks=P, ops=ops, copy_bandwidth=float(np.median(samples["copy_bandwidth"])),
                          blas_threads=samples.get("blas_threads"))
    if solo_ops:
        ratios = [ops[k] / solo_ops[k] for k in ops if k in solo_ops and solo_ops[k] > 0]
        if ratios:
            base.compute_factor = float(np.median(ratios))
    cases = _synthetic(P)
    measured = np.array([float(np.median(samples["networks"][name])) for name, _, _ in cases])
    t0 = time.perf_counter()
    # weights between absolute and relative errors: the tiny networks
    # (ReLU chains) are the noisiest in relative terms
    w = 1.0 / np.sqrt(np.maximum(measured, 1e-6))
    feats = [_features(machine, base, g, plan, dtype, SATURATIONS) for _, g, plan in cases]
    consts = np.array([c0 for c0, _ in feats])
    best = None
    for sat in SATURATIONS:
        for sat_x in SATURATIONS:
            A = np.array([f[(sat, sat_x)] for _, f in feats])
            if P == 1:
                A[:, -2:] = 0.0         # one rank: no synchronisation to wait at
            y = measured - consts
            theta = _nnls(A * w[:, None], y * w)
            resid = float(np.sum(((A @ theta - y) * w) ** 2))
            if best is None or resid < best[0] - 1e-12:
                best = (resid, (sat, sat_x), theta, A)
    _, (sat, sat_x), theta, A = best
    rf = _figures(base, theta, sat, sat_x)
    fitted = consts + A @ theta
    details = {"params": dict(zip(PARAMS, theta.tolist()), skew_saturation_s=sat,
                              exchange_skew_saturation_s=sat_x),
               "fit_seconds": time.perf_counter() - t0,
               "networks": [{"name": name, "measured_s": float(m), "fitted_s": float(f), "compute_s": float(c)}
                            for (name, _, _), m, f, c in zip(cases, measured, fitted, consts)]}
    return rf, details


#: the fitted figures, in the order of the regression's columns
PARAMS = ("node_overhead_s", "step_overhead_s", "exchange_latency_s", "exchange_s_per_byte",
          "allreduce_latency_s", "allreduce_s_per_byte", "tile_inflation", "skew", "exchange_skew")


def _figures(base, theta, saturation=math.inf, exchange_saturation=math.inf) -> object:
    """A copy of RuntimeFigures ``base`` with the fitted figures ``theta``;
    the skew after a reduction saturates for stretches longer than
    ``saturation`` seconds, the one after an exchange for stretches longer
    than ``exchange_saturation``."""
    from hpcnn.strategy.machine import Link
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


def _features(machine, base, g, plan, dtype, saturations):
    """(cost without the fitted figures, {(saturation, exchange saturation):
    d cost / d figure}) of one network: for given saturations of the two
    skews the cost model is linear in the fitted figures."""
    from hpcnn.strategy.cost_model import CostModel
    P = base.ranks

    def total(theta, sat=math.inf, sat_x=math.inf):
        m = copy.copy(machine)
        m.runtime = dict(machine.runtime)
        m.runtime[P] = _figures(base, theta, sat, sat_x)
        return CostModel(g, P, m, dtype=np.dtype(dtype).name).evaluate(plan).total

    zero = np.zeros(len(PARAMS))
    c0 = total(zero)
    cols = []
    for j in range(len(PARAMS) - 2):
        e = zero.copy()
        e[j] = 1.0
        cols.append(total(e) - c0)
    skew, xskew = zero.copy(), zero.copy()
    skew[-2] = 1.0                                # the skews, last
    xskew[-1] = 1.0
    by_sat = {sat: total(skew, sat=sat) - c0 for sat in saturations}
    by_sat_x = {sat: total(xskew, sat_x=sat) - c0 for sat in saturations}
    return c0, {(a, b): np.array(cols + [by_sat[a], by_sat_x[b]]) for a in saturations for b in saturations}


#: stretch lengths (seconds) beyond which the skew stops growing, tried in the
#: fit: from about the scheduler's granularity (a millisecond) up; below
#: that the skew would only repeat the latencies per synchronisation
SATURATIONS = (1e-3, 2e-3, 4e-3, 8e-3, 16e-3, math.inf)


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


# ---- everything --------------------------------------------------------------------------------
def runtime_figures(comm, machine, jobs: dict, dtype="float32", repeats=5, rounds=3,
                    solo_ops: dict | None = None, steps=4):
    """RuntimeFigures for P = comm's size (collective; every rank gets them)
    and a dict of the raw measurements: ``rounds`` rounds of a Sampler, the
    fit on rank 0.  ``jobs``: the op tiles to time ({key: (node, obox, ins[,
    flops])}); ``solo_ops``: times of tiles alone (the machine file's), for
    the slow-down factor of tiles not timed here."""
    sampler = Sampler(comm, jobs, dtype, repeats, steps)
    for _ in range(rounds):
        sampler.run_round()
    samples = sampler.samples()
    sampler.free()
    res = fit_samples(machine, samples, dtype, solo_ops) if comm.Get_rank() == 0 else None
    rf, fit = comm.bcast(res, root=0)
    raw = {"fit": fit, "tiles": {"count": len(rf.ops), "of": len(jobs)},
           "load_average": samples["load_average"]}
    return rf, raw


def within_budget(jobs, budget, rounds, P, repeats, solo, slots, min_total=0.02):
    """The tiles (most flops first) whose estimated timing fits ``budget``
    seconds over ``rounds`` rounds: a tile costs about max(repeats runs,
    min_total) at its solo time (``solo``, else 1 ms) slowed by P / slots."""
    if budget is None:
        return jobs
    order = sorted(jobs, key=lambda k: (-(jobs[k][3] if len(jobs[k]) > 3 else 0.0), k))
    out, spent = {}, 0.0
    slow = max(1.0, P / max(1, slots))
    for k in order:
        t = solo.get(k, 1e-3) * slow
        cost = rounds * max(repeats * t, min_total) + rounds * 2e-3
        if spent + cost > budget and out:
            break
        out[k] = jobs[k]
        spent += cost
    return out


def main(argv=None) -> int:
    """Worker of ``hpcnn calibrate``: ``mpiexec -n P python -m mpi4py -m
    hpcnn.bench.runtime_profile SPEC.json OUT.json``.  SPEC names the
    machine file so far, the models (NAME or NAME@SIDE), batch, dtype,
    repeats and the tile budget; rank 0 writes the figures."""
    from mpi4py import MPI

    from hpcnn.strategy.calibrate import model_specs, tile_jobs
    from hpcnn.strategy.machine import Machine
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    comm = MPI.COMM_WORLD
    P = comm.Get_size()
    machine = Machine.load(spec["machine"])
    jobs = tile_jobs(model_specs(spec["models"]), [P], spec["batch"], spec["dtype"], spec.get("max_kinds", 2))
    jobs = {k: (v[0], v[2], v[3], v[5]) for k, v in jobs.items()}
    jobs = within_budget(jobs, spec.get("budget"), spec.get("rounds", 3), P, spec.get("repeats", 5),
                         (machine.measured or {}).get("ops", {}), machine.slots_per_node or 1)
    rf, raw = runtime_figures(comm, machine, jobs, spec["dtype"], spec.get("repeats", 5),
                              spec.get("rounds", 3), solo_ops=(machine.measured or {}).get("ops"))
    if comm.Get_rank() == 0:
        with open(argv[1], "w") as f:
            json.dump({"figures": rf.to_dict(), "raw": raw}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
