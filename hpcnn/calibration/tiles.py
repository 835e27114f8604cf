"""Op tiles to time, and timing them: the jobs of ``hpcnn calibrate`` and of
the runtime sampler, and the roofline of this machine for the tiles that
were not timed.

A ``TileJob`` is one op at one tile shape: the representative tile the cost
model prices a layer's configuration with (``tile_geometry.NodeGeometry``), and
the key under which its time is stored in a machine file (``tile_key``).
``tile_jobs`` lists the tiles of every searched configuration of some models
at some rank counts; ``plan_tile_jobs`` those of given plans.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from hpcnn.graph import Graph
from hpcnn.ops import TileContext
from hpcnn.parallel.layout import degrees_from_config
from hpcnn.strategy.cost_model import BACKWARD_FLOPS
from hpcnn.strategy.tile_geometry import NodeGeometry, tile_key


@dataclass(frozen=True, eq=False)
class TileJob:
    """One op tile to time.

    node      the graph node (its op, shapes and parameters)
    degrees   the layer's configuration the tile comes from (a degree per
              output dimension)
    out_box   the tile's output box in the whole tensor
    in_tiles  the shapes of the input regions it reads (halos included)
    out_tile  the shape of its output
    flops     forward flops of the tile
    key       where its time is stored (``cost_model.tile_key``)
    """
    node: object
    degrees: tuple
    out_box: tuple
    in_tiles: tuple
    out_tile: tuple
    flops: float
    key: str

    @classmethod
    def of(cls, node, geometry: NodeGeometry, degrees, dtype) -> "TileJob":
        """The representative tile of ``node`` under ``degrees``."""
        ins, out, obox = geometry.tile(degrees)
        ins = tuple(tuple(int(x) for x in s) for s in ins)
        out = tuple(int(x) for x in out)
        return cls(node, tuple(int(x) for x in degrees), tuple(obox), ins, out,
                   float(node.op.flops(list(ins), out)), tile_key(node, ins, out, np.dtype(dtype).name))

    def work(self, itemsize: int) -> tuple[float, float]:
        """(flops, bytes) of forward + backward, as the roofline counts
        them: backward flops per op kind (``BACKWARD_FLOPS``, else as many
        as forward); every input, output and parameter shard read or
        written three times."""
        flops = self.flops * (1.0 + BACKWARD_FLOPS.get(self.node.kind, 1.0))
        obox = self.out_box
        channels = obox[1][1] - obox[1][0] if len(obox) > 1 else 1
        shard = sum(sp.size // max(1, sp.shape[0]) * channels for sp in self.node.param_specs().values())
        elements = sum(int(np.prod(s)) for s in self.in_tiles) + int(np.prod(self.out_tile)) + shard
        return flops, 3.0 * elements * itemsize


def by_flops(jobs: dict) -> list:
    """The keys of ``jobs`` ({key: TileJob}), most flops first, then by key:
    the order in which tiles are timed (the same on every rank), so that a
    budget leaves out the cheapest."""
    return sorted(jobs, key=lambda k: (-jobs[k].flops, k))


def model_specs(names) -> list:
    """[(name, image side or None)] from NAME or NAME@SIZE entries."""
    out = []
    for spec in names:
        name, _, size = str(spec).partition("@")
        if size:
            try:
                side = int(size)
            except ValueError:
                raise ValueError(f"model {spec!r}: the image side after @ must be an integer") from None
            out.append((name, side))
        else:
            out.append((name, None))
    return out


def tile_jobs(model_names, ranks_list, batch, dtype, max_kinds=2) -> dict:
    """{key: TileJob} of every tile the searched configurations of the
    models (``model_specs`` entries) produce at each rank count."""
    from hpcnn.models import build_model
    from hpcnn.strategy.config_space import SpaceOptions
    from hpcnn.strategy.cost_model import CostModel
    from hpcnn.strategy.machine import load_machine
    mach = load_machine("paper_p100_cluster")      # any machine: only geometry is used
    jobs = {}
    for spec in model_names:
        name, side = spec if isinstance(spec, tuple) else (spec, None)
        g = build_model(name, batch=batch, image_size=side)
        for P in ranks_list:
            cm = CostModel(g, P, mach, dtype=dtype, opts=SpaceOptions(max_kinds=max_kinds))
            for gi, grp in enumerate(cm.space.groups):
                for mname in grp.members:
                    node = g[mname]
                    if node.kind == "input":
                        continue
                    for row in cm.space.configs[gi]:
                        job = TileJob.of(node, cm.geometry(mname), row, cm.dtype)
                        jobs.setdefault(job.key, job)
    return jobs


def plan_tile_jobs(graph, plans, dtype) -> dict:
    """{key: TileJob} of the representative tile of every layer under each
    of ``plans`` (the tiles the cost model prices them with)."""
    jobs, geoms = {}, {}
    for plan in plans:
        for n in graph:
            if n.kind == "input":
                continue
            geom = geoms.setdefault(n.name, NodeGeometry(n))
            job = TileJob.of(n, geom, degrees_from_config(n.shape, plan.config(n.name)), dtype)
            jobs.setdefault(job.key, job)
    return jobs


def random_tile(job: TileJob, dtype, rng) -> tuple:
    """(inputs, parameters, buffers, TileContext) of one training tile of
    ``job``: random values in input regions of its shapes; the parameter and
    buffer shards of the tile's output channels."""
    node, obox = job.node, job.out_box
    op = node.op
    dt = np.dtype(dtype)
    in_boxes = [op.input_box(i, obox, node.in_shapes) for i in range(len(node.inputs))]
    xs = [rng.standard_normal(s).astype(dt) for s in job.in_tiles]
    c0, c1 = obox[1] if len(obox) > 1 else (0, 1)
    params = {k: (rng.standard_normal((c1 - c0,) + tuple(sp.shape[1:])) * 0.1).astype(dt)
              for k, sp in node.param_specs().items()}
    buffers = {k: np.abs(rng.standard_normal((c1 - c0,) + tuple(sp.shape[1:]))).astype(dt) + 0.5
               for k, sp in node.buffer_specs().items()}
    labels = None
    if node.kind == "softmax_xent":
        labels = rng.integers(0, node.in_shapes[0][1], obox[0][1] - obox[0][0])
    ctx = TileContext(out_box=tuple(obox), in_boxes=in_boxes, in_shapes=list(node.in_shapes),
                      out_shape=tuple(node.shape), training=True, labels=labels)
    return xs, params, buffers, ctx


def run_tile(job: TileJob, dtype, repeats, rng) -> float:
    """Median seconds of forward + backward of one tile, over ``repeats``
    runs after one that warms up."""
    op = job.node.op
    xs, params, buffers, ctx = random_tile(job, dtype, rng)
    times = []
    for r in range(repeats + 1):                      # the first run warms up
        t = time.perf_counter()
        y, saved = op.forward(xs, params, buffers, ctx)
        dy = np.ones_like(y)
        op.backward(dy, saved, params, ctx)
        if r:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


# ---- roofline probes -----------------------------------------------------------------
def probe_peak(dtype, seconds=1.0) -> float:
    """Flops per second of the best single-thread 768^3 GEMM."""
    n = 768
    a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
    b = a.copy()
    a @ b
    best = np.inf
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def probe_bandwidth(seconds=1.0) -> float:
    """Bytes per second (read + write) of the best copy of 64 MiB."""
    x = np.ones(1 << 23, dtype=np.float64)          # 64 MiB
    y = np.empty_like(x)
    best = np.inf
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        np.copyto(y, x)
        best = min(best, time.perf_counter() - t)
    return 2.0 * x.nbytes / best


def probe_overhead(dtype, repeats=200) -> float:
    """Seconds of the smallest op call: forward + backward of a 1-element
    ReLU through the op API."""
    g = Graph("tiny")
    node = g[g.relu(g.input((1, 1)))]
    job = TileJob.of(node, NodeGeometry(node), (1, 1), dtype)
    return run_tile(job, dtype, repeats, np.random.default_rng(0))


def fit_roofline(samples: dict, peak: float, bandwidth: float, overhead: float) -> tuple:
    """Each op kind's compute efficiency and the memory efficiency fitted
    (medians) to measured tiles, ``samples`` = {kind: [(flops, bytes,
    seconds)]}: kinds with a backward flop count (conv, linear) are compute
    bound, the others memory bound.  Returns (kind efficiencies, memory
    efficiency, relative errors of the fitted roofline on the samples)."""
    kind_eff, mem_effs = {}, []
    for kind, rows in samples.items():
        eff_c = [f / (peak * max(t - overhead, 1e-9)) for f, b, t in rows if f > 0]
        eff_m = [b / (bandwidth * max(t - overhead, 1e-9)) for f, b, t in rows]
        if kind in BACKWARD_FLOPS and eff_c:
            kind_eff[kind] = float(np.clip(np.median(eff_c), 0.01, 1.0))
        else:
            mem_effs.extend(eff_m)
            if eff_c:
                kind_eff[kind] = float(np.clip(np.median(eff_c), 0.001, 1.0))
    mem_eff = float(np.clip(np.median(mem_effs), 0.01, 1.0)) if mem_effs else 0.5
    errors = []
    for kind, rows in samples.items():
        eff = kind_eff.get(kind, 1.0)
        for f, b, t in rows:
            pred = max(f / (peak * eff), b / (bandwidth * mem_eff)) + overhead
            errors.append(abs(pred - t) / t)
    return kind_eff, mem_eff, errors
