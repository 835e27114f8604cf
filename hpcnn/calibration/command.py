"""``hpcnn calibrate``: measure this machine for the cost model.

1. Ops: every tile shape that the searched configurations of the given
   models produce at the given rank counts is run through the op API
   (forward then backward, random arrays, the parameter shard of the tile),
   and the median of several runs is stored under the tile's key -- the same
   key the cost model looks up (``cost_model.tile_key``).  Largest tiles
   first, within a time budget (``calibration.tiles``).
2. Roofline of this machine for tiles that were not measured: a single-thread
   GEMM gives the peak rate, a large copy the memory bandwidth, the smallest
   op call the fixed overhead; each op kind's efficiency and the memory
   efficiency are then fitted (median) to the measured tiles.
3. MPI: latency and bandwidth by ping-pong between two ranks (``mpiexec -n
   2`` is started, ``calibration.links``).  Only inside this node: the
   inter-node figures of the file are copies of the intra-node ones and are
   marked as not measured -- measure them on a cluster with the two ranks on
   two nodes.
4. hpcnn's runtime at each job size P of ``--ranks`` (``mpiexec -n P
   python -m mpi4py -m hpcnn.calibration.runtime_sampler`` is started): the
   op tiles of P-rank configurations timed while all P ranks compute,
   hpcnn's exchanges and allreduces between computations, and the
   executor's own time per layer and per step (fitted by
   ``strategy.runtime_fit``).  With more ranks than cores these differ a lot
   from the figures of one rank alone; the cost model uses them for jobs of
   that size (``runtime`` in the machine file).

Everything is written as a machine description (``hpcnn/machines/local.json``
or the path given with -o).  Ranks are assumed to use one BLAS thread each
(the measurements do); ``slots_per_node`` is this machine's core count, so
that the cost model slows compute down when more ranks than cores share it.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hpcnn.calibration.links import measure_link
from hpcnn.calibration.runtime_sampler import RuntimeSpec, measure_runtime
from hpcnn.calibration.tiles import (by_flops, fit_roofline, model_specs, probe_bandwidth, probe_overhead,
                                     probe_peak, run_tile, tile_jobs)

DEFAULT_MODELS = ["resnet_small@32", "inception_small@32", "digits_cnn", "lenet5"]


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


# ---- this machine ------------------------------------------------------------------------
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


def _slots() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _link(d):
    from hpcnn.strategy.machine import Link
    return Link(float(d["bandwidth"]), float(d["latency"]))


# ---- the steps -------------------------------------------------------------------------------
def _measure_tiles(jobs, args) -> tuple[dict, dict]:
    """({key: median seconds} of the tiles timed within ``--budget``, most
    flops first, and {kind: [(flops, bytes, seconds)]} for the roofline)."""
    from hpcnn.strategy.cost_model import ITEMSIZE
    rng = np.random.default_rng(0)
    measured, samples = {}, {}
    t_end = time.perf_counter() + args.budget
    for key in by_flops(jobs):
        if time.perf_counter() > t_end:
            break
        job = jobs[key]
        t = run_tile(job, args.dtype, args.repeats, rng)
        measured[key] = t
        samples.setdefault(job.node.kind, []).append(job.work(ITEMSIZE[args.dtype]) + (t,))
    return measured, samples


def _roofline_figures(src, dtype, peak, bw, overhead, kind_eff, mem_eff, errs, slots) -> list:
    return [
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


def _link_figures(args, src) -> tuple[dict, list]:
    """(intra-node link {bandwidth, latency}, its figures): the ping-pong,
    or typical figures marked as assumed with --no-mpi.  Raises
    RuntimeError or TimeoutExpired when the ping-pong fails."""
    if args.no_mpi:
        intra = {"bandwidth": 5e9, "latency": 2e-6}
        return intra, [{"figure": "links.intra_node", "value": intra, "assumed": True,
                        "source": "assumed (--no-mpi): typical shared-memory MPI"}]
    print("MPI ping-pong between 2 ranks of this node ...", flush=True)
    m = measure_link("intra_node")
    print(f"  latency {m.latency * 1e6:.2f} us, bandwidth {m.bandwidth / 1e9:.2f} GB/s")
    return {"bandwidth": m.bandwidth, "latency": m.latency}, m.figures(src)


def _runtime_line(rf) -> str:
    """One line that summarises the runtime figures of a job size."""
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
    return line


# ---- the command -------------------------------------------------------------------------
def run(args) -> int:
    from hpcnn.backend import limit_blas_threads
    from hpcnn.models import ModelError
    from hpcnn.strategy.machine import MACHINES_DIR, Machine

    out_path = Path(args.output) if args.output else MACHINES_DIR / f"{args.name}.json"
    limit_blas_threads(1)
    dtype = args.dtype
    host = socket.gethostname()
    when = datetime.datetime.now().isoformat(timespec="seconds")
    src = f"measured by hpcnn calibrate on {host} at {when}"
    slots = _slots()

    print("probing the roofline (single-thread GEMM, 64 MiB copy, smallest op call) ...", flush=True)
    peak = probe_peak(dtype)
    bw = probe_bandwidth()
    overhead = probe_overhead(dtype)
    print(f"  peak {peak / 1e9:.2f} GFLOP/s, memory {bw / 1e9:.2f} GB/s, op overhead {overhead * 1e6:.1f} us")

    try:
        jobs = tile_jobs(model_specs(args.model), args.ranks, args.batch, dtype, args.max_kinds)
    except (ModelError, ValueError) as exc:
        print(f"hpcnn calibrate: error: {exc}", file=sys.stderr)
        return 2
    print(f"measuring {len(jobs)} op tiles of {', '.join(args.model)} at ranks {args.ranks} "
          f"(batch {args.batch}, {dtype}, {args.repeats} runs each, budget {args.budget:.0f} s) ...",
          flush=True)
    measured, samples = _measure_tiles(jobs, args)
    skipped = len(jobs) - len(measured)
    print(f"  measured {len(measured)} tiles" + (f", {skipped} left to the roofline (budget)" if skipped else ""))
    kind_eff, mem_eff, errs = fit_roofline(samples, peak, bw, overhead)
    if errs:
        print(f"  fitted roofline vs measured tiles: median error {np.median(errs) * 100:.0f}%, "
              f"90th percentile {np.percentile(errs, 90) * 100:.0f}% (measured tiles use their "
              f"measured time; the roofline prices the others)")
    figures = _roofline_figures(src, dtype, peak, bw, overhead, kind_eff, mem_eff, errs, slots)
    try:
        intra, link_figures = _link_figures(args, src)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"hpcnn calibrate: error: {exc}", file=sys.stderr)
        return 1
    figures += link_figures
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
        spec = RuntimeSpec(models=tuple(args.model), batch=args.batch, dtype=dtype, repeats=args.repeats,
                           budget=args.runtime_budget, rounds=args.runtime_rounds, max_kinds=args.max_kinds)
        for P in (args.runtime_ranks or args.ranks):
            print(f"runtime figures with {P} rank(s) running at once (tiles, exchanges, allreduces, "
                  f"executor overheads; tile budget {args.runtime_budget:.0f} s) ...", flush=True)
            try:
                rf, raw = measure_runtime(out_path, P, spec)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"hpcnn calibrate: error: {exc}", file=sys.stderr)
                return 1
            m.runtime[P] = rf
            print(_runtime_line(rf), flush=True)
            m.figures.append({"figure": f"runtime.{P}", "value": {k: v for k, v in rf.to_dict().items()
                                                                  if k != "ops"},
                              "assumed": False,
                              "source": f"{src}: hpcnn.calibration.runtime_sampler with {P} rank(s) running "
                                        f"at once, load average {raw.get('load_average')}"})
            m.save(out_path)
    print(f"machine written to {out_path}")
    return 0
