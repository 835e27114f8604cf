"""``hpcnn calibrate``: measure this machine for the cost model.

1. Ops: every tile shape that the searched configurations of the given
   models produce at the given rank counts is run through the op API
   (forward then backward, random arrays, the parameter shard of the tile),
   and the median of several runs is stored under the tile's key -- the same
   key the cost model looks up (``cost_model.tile_key``).  Largest tiles
   first, within a time budget.
2. Roofline of this machine for tiles that were not measured: a single-thread
   GEMM gives the peak rate, a large copy the memory bandwidth, the smallest
   op call the fixed overhead; each op kind's efficiency and the memory
   efficiency are then fitted (median) to the measured tiles.
3. MPI: latency and bandwidth by ping-pong between two ranks (``mpiexec -n
   2`` is spawned).  Only inside this node: the inter-node figures of the
   file are copies of the intra-node ones and are marked as not measured --
   measure them on a cluster with the two ranks on two nodes.
4. hpcnn's runtime at each job size P of ``--ranks`` (``mpiexec -n P
   python -m hpcnn.bench.runtime_profile`` is spawned; see that module):
   the op tiles of P-rank configurations timed while all P ranks compute,
   hpcnn's exchanges and allreduces between computations, and the
   executor's own time per layer and per step.  With more ranks than cores
   these differ a lot from the figures of one rank alone; the cost model
   uses them for jobs of that size (``runtime`` in the machine file).

Everything is written as a machine description (``hpcnn/machines/local.json``
or the path given with -o).  Ranks are assumed to use one BLAS thread each
(the measurements do); ``slots_per_node`` is this machine's core count, so
that the cost model slows compute down when more ranks than cores share it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hpcnn.launcher import child_env, find_mpiexec

DEFAULT_MODELS = ["resnet_small@32", "inception_small@32", "digits_cnn", "lenet5"]


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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", nargs="+", default=DEFAULT_MODELS, metavar="M",
                   help="models whose tile shapes are measured, NAME or NAME@SIDE for another image "
                        f"side (default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4], metavar="P",
                   help="rank counts whose configurations are measured (default: 1 2 4)")
    p.add_argument("--batch", type=int, default=32, metavar="B",
                   help="global mini-batch the tiles are cut from (default 32); plans searched for "
                        "another batch fall back to the fitted roofline")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=5, help="runs per tile (median)")
    p.add_argument("--budget", type=float, default=300.0, metavar="S",
                   help="seconds to spend measuring op tiles (largest first)")
    p.add_argument("--max-kinds", type=int, default=2, choices=[1, 2, 3])
    p.add_argument("--no-mpi", action="store_true",
                   help="skip everything that needs MPI (the ping-pong and the runtime figures)")
    p.add_argument("--no-runtime", action="store_true",
                   help="skip the runtime figures per job size (tiles with all ranks computing, "
                        "exchanges, allreduces, executor overheads)")
    p.add_argument("--runtime-budget", type=float, default=240.0, metavar="S",
                   help="seconds of op tiles per job size for the runtime figures (default 240)")
    p.add_argument("--runtime-ranks", type=int, nargs="+", default=None, metavar="P",
                   help="job sizes whose runtime figures are measured (default: those of --ranks)")
    p.add_argument("--runtime-rounds", type=int, default=3, metavar="R",
                   help="rounds of the runtime measurements, pooled by medians (default 3)")
    p.add_argument("--name", default="local")
    p.add_argument("-o", "--output", default=None, metavar="FILE",
                   help="where to write the machine file (default: hpcnn/machines/<name>.json)")


# ---- op tiles ---------------------------------------------------------------------
def tile_jobs(model_names, ranks_list, batch, dtype, max_kinds=2):
    """{key: (node, degrees, flops)} of every tile the searched configurations
    produce (the representative tile the cost model prices)."""
    from hpcnn.models import build_model
    from hpcnn.strategy.config_space import SpaceOptions
    from hpcnn.strategy.cost_model import CostModel, tile_key
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
                    geom = cm.geometry(mname)
                    for row in cm.space.configs[gi]:
                        ins, out, obox = geom.tile(row)
                        key = tile_key(node, ins, out, cm.dtype)
                        if key not in jobs:
                            fl = float(node.op.flops(ins, out))
                            jobs[key] = (node, tuple(int(x) for x in row), obox, ins, out, fl)
    return jobs


def random_tile(node, obox, ins, dtype, rng) -> tuple:
    """(inputs, parameters, buffers, TileContext) of one training tile of
    ``node``: output box ``obox``, input regions of shapes ``ins``, random
    values; the parameter and buffer shards of the tile's output channels."""
    from hpcnn.ops import TileContext
    op = node.op
    dt = np.dtype(dtype)
    in_boxes = [op.input_box(i, obox, node.in_shapes) for i in range(len(node.inputs))]
    xs = [rng.standard_normal(s).astype(dt) for s in ins]
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


def run_tile(node, obox, ins, dtype, repeats, rng):
    """Median seconds of forward + backward of ``node`` on one tile."""
    op = node.op
    xs, params, buffers, ctx = random_tile(node, obox, ins, dtype, rng)
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
    from hpcnn.graph import Graph
    g = Graph("tiny")
    x = g.input((1, 1))
    r = g.relu(x)
    node = g[r]
    rng = np.random.default_rng(0)
    return run_tile(node, ((0, 1), (0, 1)), [(1, 1)], dtype, repeats, rng)


# ---- MPI ping-pong ---------------------------------------------------------------------
PINGPONG_SIZES = [8, 64, 512, 4096, 32768, 262144, 1 << 21, 1 << 23]


def _pingpong_worker(out_path: str) -> None:
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    res = {}
    for size in PINGPONG_SIZES:
        buf = np.zeros(size, dtype=np.uint8)
        reps = max(5, min(1000, (1 << 24) // max(size, 1)))
        comm.Barrier()
        best = np.inf
        for _ in range(3):
            t = MPI.Wtime()
            for _ in range(reps):
                if rank == 0:
                    comm.Send([buf, MPI.BYTE], dest=1, tag=7)
                    comm.Recv([buf, MPI.BYTE], source=1, tag=7)
                elif rank == 1:
                    comm.Recv([buf, MPI.BYTE], source=0, tag=7)
                    comm.Send([buf, MPI.BYTE], dest=0, tag=7)
            best = min(best, (MPI.Wtime() - t) / reps / 2.0)    # one way
        res[size] = best
    if rank == 0:
        Path(out_path).write_text(json.dumps({str(k): v for k, v in res.items()}))


def measure_mpi(timeout=300) -> dict:
    """One-way time per message size between two ranks of this node."""
    exe = find_mpiexec()
    if exe is None:
        raise RuntimeError("mpiexec not found: install an MPI (pip install mpich) or pass --no-mpi")
    env = child_env()
    env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "pingpong.json"
        r = subprocess.run([exe, "-n", "2", sys.executable, "-m", "hpcnn.strategy.calibrate",
                            "--pingpong-worker", str(out)], env=env, capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0 or not out.exists():
            raise RuntimeError(f"the MPI ping-pong failed (exit {r.returncode}): {r.stderr[-2000:]}")
        return {int(k): v for k, v in json.loads(out.read_text()).items()}


def fit_link(times: dict) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s) from one-way times: latency from the
    smallest message, bandwidth from the largest ones."""
    sizes = sorted(times)
    lat = times[sizes[0]]
    big = [s for s in sizes if s >= (1 << 20)] or sizes[-2:]
    bw = float(np.median([s / max(times[s] - lat, 1e-12) for s in big]))
    return bw, float(lat)


# ---- the command -------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _mem_bytes() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def run(args) -> int:
    from hpcnn.backend import limit_blas_threads
    from hpcnn.models import ModelError
    from hpcnn.strategy.cost_model import BACKWARD_FLOPS, ITEMSIZE
    from hpcnn.strategy.machine import MACHINES_DIR, Machine

    out_path = Path(args.output) if args.output else MACHINES_DIR / f"{args.name}.json"
    limit_blas_threads(1)
    dtype = args.dtype
    host = socket.gethostname()
    when = datetime.datetime.now().isoformat(timespec="seconds")
    src = f"measured by hpcnn calibrate on {host} at {when}"
    try:
        slots = len(os.sched_getaffinity(0))
    except AttributeError:
        slots = os.cpu_count() or 1

    print("probing the roofline (single-thread GEMM, 64 MiB copy, smallest op call) ...", flush=True)
    peak = probe_peak(dtype)
    bw = probe_bandwidth()
    overhead = probe_overhead(dtype)
    print(f"  peak {peak / 1e9:.2f} GFLOP/s, memory {bw / 1e9:.2f} GB/s, op overhead {overhead * 1e6:.1f} us")

    try:
        specs = model_specs(args.model)
        jobs = tile_jobs(specs, args.ranks, args.batch, dtype, args.max_kinds)
    except (ModelError, ValueError) as exc:
        print(f"hpcnn calibrate: error: {exc}", file=sys.stderr)
        return 2
    order = sorted(jobs, key=lambda k: -jobs[k][5])
    print(f"measuring {len(order)} op tiles of {', '.join(args.model)} at ranks {args.ranks} "
          f"(batch {args.batch}, {dtype}, {args.repeats} runs each, budget {args.budget:.0f} s) ...",
          flush=True)
    rng = np.random.default_rng(0)
    measured, fits = {}, {}
    t_end = time.perf_counter() + args.budget
    isz = ITEMSIZE[dtype]
    for n_done, key in enumerate(order):
        if time.perf_counter() > t_end:
            break
        node, row, obox, ins, out, fl = jobs[key]
        t = run_tile(node, obox, ins, dtype, args.repeats, rng)
        measured[key] = t
        flops = fl * (1.0 + BACKWARD_FLOPS.get(node.kind, 1.0))
        shard = sum(sp.size // max(1, sp.shape[0]) * (obox[1][1] - obox[1][0] if len(obox) > 1 else 1)
                    for sp in node.param_specs().values())
        nbytes = 3.0 * (sum(int(np.prod(s)) for s in ins) + int(np.prod(out)) + shard) * isz
        fits.setdefault(node.kind, []).append((flops, nbytes, t))
    skipped = len(order) - len(measured)
    print(f"  measured {len(measured)} tiles" + (f", {skipped} left to the roofline (budget)" if skipped else ""))

    # fit each kind's compute efficiency and the memory efficiency
    kind_eff, mem_effs = {}, []
    for kind, rows in fits.items():
        eff_c = [f / (peak * max(t - overhead, 1e-9)) for f, b, t in rows if f > 0]
        eff_m = [b / (bw * max(t - overhead, 1e-9)) for f, b, t in rows]
        if kind in BACKWARD_FLOPS and eff_c:
            kind_eff[kind] = float(np.clip(np.median(eff_c), 0.01, 1.0))
        else:
            mem_effs.extend(eff_m)
            if eff_c:
                kind_eff[kind] = float(np.clip(np.median(eff_c), 0.001, 1.0))
    mem_eff = float(np.clip(np.median(mem_effs), 0.01, 1.0)) if mem_effs else 0.5
    # how well the fitted roofline alone predicts the measured tiles
    errs = []
    for kind, rows in fits.items():
        eff = kind_eff.get(kind, 1.0)
        for f, b, t in rows:
            pred = max(f / (peak * eff), b / (bw * mem_eff)) + overhead
            errs.append(abs(pred - t) / t)
    if errs:
        print(f"  fitted roofline vs measured tiles: median error {np.median(errs) * 100:.0f}%, "
              f"90th percentile {np.percentile(errs, 90) * 100:.0f}% (measured tiles use their "
              f"measured time; the roofline prices the others)")

    figures = [
        {"figure": "device.peak_flops", "value": peak, "assumed": False,
         "source": f"{src}: best single-thread {dtype} GEMM 768x768x768"},
        {"figure": "device.memory_bandwidth", "value": bw, "assumed": False,
         "source": f"{src}: best single-thread copy of 64 MiB (read + write)"},
        {"figure": "device.op_overhead_s", "value": overhead, "assumed": False,
         "source": f"{src}: median forward + backward of a 1-element ReLU through the op API"},
        {"figure": "device.kind_efficiency", "value": kind_eff, "assumed": False,
         "source": f"{src}: median of flops / (peak x time) over the measured tiles of each op kind"},
        {"figure": "roofline_fit_error", "value": {"median": float(np.median(errs)) if errs else None,
                                                   "p90": float(np.percentile(errs, 90)) if errs else None},
         "assumed": False, "source": f"{src}: relative error of the fitted roofline on the measured tiles"},
        {"figure": "device.memory_efficiency", "value": mem_eff, "assumed": False,
         "source": f"{src}: median of bytes / (bandwidth x time) over measured memory-bound tiles"},
        {"figure": "slots_per_node", "value": slots, "assumed": False,
         "source": f"{src}: CPUs this process may run on; ranks beyond it share cores"},
        {"figure": "ranks_per_node", "value": 256, "assumed": True,
         "source": "every rank of a local run is on this node"},
    ]
    intra = {"bandwidth": 5e9, "latency": 2e-6}
    if not args.no_mpi:
        print("MPI ping-pong between 2 ranks of this node ...", flush=True)
        try:
            times = measure_mpi()
            b, lat = fit_link(times)
            intra = {"bandwidth": b, "latency": lat}
            print(f"  latency {lat * 1e6:.2f} us, bandwidth {b / 1e9:.2f} GB/s")
            figures += [
                {"figure": "links.intra_node.latency", "value": lat, "assumed": False,
                 "source": f"{src}: one-way time of an 8-byte message, MPI ping-pong (Send/Recv)"},
                {"figure": "links.intra_node.bandwidth", "value": b, "assumed": False,
                 "source": f"{src}: MPI ping-pong of 2-8 MiB messages, one way"},
                {"figure": "pingpong_one_way_s", "value": {str(k): v for k, v in times.items()},
                 "assumed": False, "source": src}]
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"hpcnn calibrate: error: {exc}", file=sys.stderr)
            return 1
    else:
        figures.append({"figure": "links.intra_node", "value": intra, "assumed": True,
                        "source": "assumed (--no-mpi): typical shared-memory MPI"})
    figures.append({"figure": "links.inter_node", "value": intra, "assumed": True,
                    "source": "NOT MEASURED: a copy of the intra-node figures. Measure on a cluster with "
                              "the ping-pong ranks on two nodes (mpiexec -n 2 -ppn 1)"})

    m = Machine(
        name=args.name, ranks_per_node=256, nodes=1, slots_per_node=slots,
        description=(f"This machine ({host}, {_cpu_name()}, {slots} CPUs), calibrated {when} with "
                     f"numpy {np.__version__}; op tiles alone with one BLAS thread, runtime figures "
                     f"with the BLAS threads hpcnn gives each rank (cores / ranks). Op tiles of "
                     f"{', '.join(args.model)} at ranks {args.ranks}, global batch {args.batch}."),
        device={"kind": "cpu", "name": _cpu_name(), "peak_flops": peak, "memory_bandwidth": bw,
                "memory_bytes": _mem_bytes(), "compute_efficiency": 1.0, "kind_efficiency": kind_eff,
                "memory_efficiency": mem_eff, "op_overhead_s": overhead},
        intra=_link(intra), inter=_link(intra), figures=figures,
        measured={"dtype": dtype, "blas_threads": 1, "models": list(args.model), "ranks": list(args.ranks),
                  "batch": args.batch, "repeats": args.repeats, "ops": measured})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    m.save(out_path)
    if not (args.no_mpi or args.no_runtime):
        for P in (args.runtime_ranks or args.ranks):
            print(f"runtime figures with {P} rank(s) running at once (tiles, exchanges, allreduces, "
                  f"executor overheads; tile budget {args.runtime_budget:.0f} s) ...", flush=True)
            try:
                rf, raw = measure_runtime(out_path, P, args)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"hpcnn calibrate: error: {exc}", file=sys.stderr)
                return 1
            m.runtime[P] = rf
            line = (f"  {len(rf.ops)} tiles (compute x{rf.compute_factor:.2f} against alone), "
                    f"per layer {rf.node_overhead_s * 1e6:.0f} us, per step {rf.step_overhead_s * 1e3:.2f} ms")
            if rf.exchange is not None:
                bw = rf.exchange.bandwidth
                per_byte = f"{bw / 1e9:.2f} GB/s" if bw < 1e20 else "no measurable cost per byte"
                line += (f"; exchange {rf.exchange.latency * 1e3:.3f} ms + {per_byte}"
                         f"; allreduce " + ", ".join(f"{g} ranks {v * 1e3:.3f} ms"
                                                     for g, v in sorted(rf.allreduce_latency.items())))
                waits = [("after a reduction", rf.skew, rf.skew_cap_s),
                         ("after an exchange", rf.exchange_skew, rf.exchange_skew_cap_s)]
                line += "; waits " + ", ".join(
                    f"{what} {k:.2f} x stretch up to {cap * 1e3:.2f} ms" if math.isfinite(cap)
                    else f"{what} {k:.2f} x stretch" for what, k, cap in waits if k is not None)
            print(line, flush=True)
            m.figures.append({"figure": f"runtime.{P}", "value": {k: v for k, v in rf.to_dict().items()
                                                                  if k != "ops"},
                              "assumed": False,
                              "source": f"{src}: hpcnn.bench.runtime_profile with {P} rank(s) running at "
                                        f"once, load average {raw.get('load_average')}"})
            m.save(out_path)
    print(f"machine written to {out_path}")
    return 0


def measure_runtime(machine_path, P, args, timeout=3600):
    """Spawn ``mpiexec -n P python -m hpcnn.bench.runtime_profile`` and read
    its RuntimeFigures (and raw measurements)."""
    from hpcnn.strategy.machine import RuntimeFigures
    exe = find_mpiexec()
    if exe is None:
        raise RuntimeError("mpiexec not found: install an MPI (pip install mpich) or pass --no-runtime")
    env = child_env()
    with tempfile.TemporaryDirectory() as d:
        spec = Path(d) / "spec.json"
        out = Path(d) / "runtime.json"
        spec.write_text(json.dumps({"machine": str(machine_path), "models": list(args.model),
                                    "batch": args.batch, "dtype": args.dtype, "repeats": args.repeats,
                                    "budget": args.runtime_budget, "rounds": args.runtime_rounds,
                                    "max_kinds": args.max_kinds}))
        r = subprocess.run([exe, "-n", str(P), sys.executable, "-m", "mpi4py", "-m", "hpcnn.bench.runtime_profile",
                            str(spec), str(out)], env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0 or not out.exists():
            raise RuntimeError(f"the runtime measurement with {P} ranks failed (exit {r.returncode}): "
                               f"{r.stderr[-2000:]}")
        d = json.loads(out.read_text())
    return RuntimeFigures.from_dict(d["figures"]), d["raw"]


def _link(d):
    from hpcnn.strategy.machine import Link
    return Link(float(d["bandwidth"]), float(d["latency"]))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--pingpong-worker":
        _pingpong_worker(sys.argv[2])
    else:
        print("usage: hpcnn calibrate [options]  (this module's own entry is the MPI ping-pong worker)",
              file=sys.stderr)
        sys.exit(2)
