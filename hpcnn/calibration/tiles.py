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
from hpcnn.strategy.tile_geometry import NodeGeometry, inputs_from_input, tile_key


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
    from_input  per input: whether it is the network's input (read from the
              data), which the runtime hands to the op in C order and whose
              gradient it does not ask for; every other 4-D input arrives in
              channels-last memory (the layout the ops return and the
              exchanges keep), and its gradient is computed
    """
    node: object
    degrees: tuple
    out_box: tuple
    in_tiles: tuple
    out_tile: tuple
    flops: float
    key: str
    from_input: tuple = ()

    @classmethod
    def of(cls, node, geometry: NodeGeometry, degrees, dtype, graph=None) -> "TileJob":
        """The representative tile of ``node`` under ``degrees``; ``graph``
        (the node's graph) tells which inputs are the network's input."""
        ins, out, obox = geometry.tile(degrees)
        ins = tuple(tuple(int(x) for x in s) for s in ins)
        out = tuple(int(x) for x in out)
        src = inputs_from_input(graph, node) if graph is not None else (False,) * len(ins)
        return cls(node, tuple(int(x) for x in degrees), tuple(obox), ins, out,
                   float(node.op.flops(list(ins), out)), tile_key(node, ins, out, np.dtype(dtype).name, src),
                   src)

    @property
    def channels_last(self) -> tuple:
        """Per input: whether the runtime gives it in channels-last memory."""
        src = self.from_input or (False,) * len(self.in_tiles)
        return tuple(len(s) == 4 and not f for s, f in zip(self.in_tiles, src))

    @property
    def input_grads(self) -> tuple:
        """Per input: whether the runtime asks for its gradient."""
        src = self.from_input or (False,) * len(self.in_tiles)
        return tuple(not f for f in src)

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
                        job = TileJob.of(node, cm.geometry(mname), row, cm.dtype, g)
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
            job = TileJob.of(n, geom, degrees_from_config(n.shape, plan.config(n.name)), dtype, graph)
            jobs.setdefault(job.key, job)
    return jobs


def random_tile(job: TileJob, dtype, rng) -> tuple:
    """(inputs, parameters, buffers, TileContext) of one training tile of
    ``job``: random values in input regions of its shapes, in the memory
    layout the runtime gives them (``TileJob.channels_last``: a kernel's
    speed depends on it, batch norm's and pooling's by up to 1.6x), the
    gradients the runtime asks for (none of the network's input: the first
    convolution skips its dX, a third of its time); the parameter and
    buffer shards of the tile's output channels."""
    node, obox = job.node, job.out_box
    op = node.op
    dt = np.dtype(dtype)
    in_boxes = [op.input_box(i, obox, node.in_shapes) for i in range(len(node.inputs))]
    xs = [rng.standard_normal((s[0], s[2], s[3], s[1])).astype(dt).transpose(0, 3, 1, 2) if last
          else rng.standard_normal(s).astype(dt) for s, last in zip(job.in_tiles, job.channels_last)]
    c0, c1 = obox[1] if len(obox) > 1 else (0, 1)
    params = {k: (rng.standard_normal((c1 - c0,) + tuple(sp.shape[1:])) * 0.1).astype(dt)
              for k, sp in node.param_specs().items()}
    buffers = {k: np.abs(rng.standard_normal((c1 - c0,) + tuple(sp.shape[1:]))).astype(dt) + 0.5
               for k, sp in node.buffer_specs().items()}
    labels = None
    if node.kind == "softmax_xent":
        labels = rng.integers(0, node.in_shapes[0][1], obox[0][1] - obox[0][0])
    elif node.kind == "mse":
        labels = rng.uniform(-0.8, 0.8, (obox[0][1] - obox[0][0], node.in_shapes[0][1])).astype(dt)
    ctx = TileContext(out_box=tuple(obox), in_boxes=in_boxes, in_shapes=list(node.in_shapes),
                      out_shape=tuple(node.shape), training=True, labels=labels, input_grads=job.input_grads)
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


def fit_roofline(samples: dict, peak: float, bandwidth: float, overhead: float) -> dict:
    """The roofline of each op kind fitted to measured tiles, ``samples`` =
    {kind: [(flops, bytes, seconds)]}.  Kinds with a backward flop count
    (conv, linear) are compute bound, the others memory bound; per kind

        seconds = overhead_k + work / rate_k

    (work: flops at rate_k = efficiency_k x ``peak``, or bytes at rate_k =
    memory efficiency_k x ``bandwidth``), fitted by non-negative least
    squares on relative errors: the fixed cost of an op call and its rate on
    large tiles (Hockney's r_inf and n_1/2), so that tiles much larger or
    smaller than the measured ones extrapolate along the line instead of
    taking the median efficiency of small ones (which, on 2 cores, put
    ResNet-18's 64-pixel convolutions at 15 of their 100 GFLOP/s).  A kind
    with one sample gets ``overhead`` as its fixed cost.

    Returns {"kind_efficiency", "kind_memory_efficiency", "kind_overhead_s":
    {kind: figure}, "memory_efficiency": the ratio of summed bytes to summed
    time over the memory-bound tiles (for kinds not measured), "errors":
    relative errors of the fitted roofline on the samples}."""
    kind_eff, kind_mem, kind_o = {}, {}, {}
    mem_bytes, mem_time = 0.0, 0.0
    for kind, rows in samples.items():
        rows = [r for r in rows if r[2] > 0]
        if not rows:
            continue
        compute = kind in BACKWARD_FLOPS and any(f > 0 for f, _, _ in rows)
        work = np.array([f if compute else b for f, b, _ in rows], dtype=float)
        t = np.array([r[2] for r in rows], dtype=float)
        if not compute:
            mem_bytes += float(work.sum())
            mem_time += float(np.maximum(t - overhead, 1e-9).sum())
        o, per = overhead, None
        if len(rows) >= 2 and np.ptp(work) > 0:
            A = np.stack([np.ones_like(work), work], axis=1) / t[:, None]
            o, per = (float(v) for v in _nnls2(A, np.ones_like(t)))
        if per is None or per <= 0:
            per = float(np.median(np.maximum(t - o, 1e-9) / np.maximum(work, 1.0)))
        kind_o[kind] = o
        if compute:
            kind_eff[kind] = float(np.clip(1.0 / (per * peak), 1e-3, 1.0))
        else:
            kind_mem[kind] = float(np.clip(1.0 / (per * bandwidth), 1e-3, 1.0))
    mem_eff = float(np.clip(mem_bytes / (bandwidth * mem_time), 0.01, 1.0)) if mem_time > 0 else 0.5
    errors = []
    for kind, rows in samples.items():
        for f, b, t in rows:
            if t <= 0:
                continue
            pred = kind_o.get(kind, overhead) + max(f / (peak * kind_eff.get(kind, 1.0)),
                                                    b / (bandwidth * kind_mem.get(kind, mem_eff)))
            errors.append(abs(pred - t) / t)
    return {"kind_efficiency": kind_eff, "kind_memory_efficiency": kind_mem, "kind_overhead_s": kind_o,
            "memory_efficiency": mem_eff, "errors": errors}


def _nnls2(A, y):
    """Non-negative least squares of two columns: the unconstrained
    solution, else the better of each column alone (non-negative)."""
    x, *_ = np.linalg.lstsq(A, y, rcond=None)
    if (x >= 0).all():
        return x
    best, out = None, np.zeros(2)
    for j in range(2):
        a = A[:, j]
        c = max(0.0, float(a @ y) / float(a @ a)) if a @ a > 0 else 0.0
        r = float(np.sum((a * c - y) ** 2))
        if best is None or r < best:
            best, out = r, np.where(np.arange(2) == j, c, 0.0)
    return out
