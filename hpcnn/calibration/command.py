"""``hpcnn calibrate``: measure this machine for the cost model.

1. Ops: every tile shape that the searched configurations of the given
   models produce at the given rank counts is run through the op API
   (forward then backward, random arrays, the parameter shard of the tile),
   and the median of several runs is stored under the tile's key -- the same
   key the cost model looks up (``cost_model.tile_key``).  Largest tiles
   first, within a time budget (``calibration.tiles``).
2. Roofline of this machine for tiles that were not measured: a single-thread
   GEMM gives the peak rate, a large copy the memory bandwidth, the smallest
   op call the fixed overhead; each op kind's fixed cost per call and its
   rate on large tiles (a share of the peak flop rate or of the memory
   bandwidth) are then fitted to its measured tiles
   (``tiles.fit_roofline``).  A tile measured at another sample count is
   scaled instead (``cost_model.scaled_tile``).
3. MPI: latency and bandwidth of the links, and the collectives hpcnn uses
   at a job's sizes, in one MPI job (``calibration.links``).  By default
   ``mpiexec -n 2`` on this node: the intra-node link only, and the
   inter-node figures of the file are copies marked as not measured.
   Across nodes -- ``--cluster NAME`` (an emulated cluster, ``hpcnn cluster
   up``), ``--hosts A,B --ppn R`` (MPICH's mpiexec on those nodes) or
   ``--launcher CMD`` (e.g. ``srun`` inside a Slurm allocation) -- the same
   job measures both links, and the file records the node count, the ranks
   per node and the node names it was measured on.
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

from hpcnn.calibration.links import COLLECTIVE_BYTES, DEFAULT_MAX_BYTES, LinkMeasurementError, measure_links
from hpcnn.calibration.runtime_sampler import RuntimeSpec, measure_runtime
from hpcnn.calibration.tiles import (by_flops, fit_roofline, model_specs, probe_bandwidth, probe_overhead,
                                     probe_peak, run_tile, tile_jobs)

DEFAULT_MODELS = ["resnet_small@32", "inception_small@32", "digits_cnn", "lenet5", "resnet18@64"]


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
    where = p.add_mutually_exclusive_group()
    where.add_argument("--cluster", default=None, metavar="NAME",
                       help="measure the links across the nodes of this emulated cluster (hpcnn cluster up; "
                            "root), --ppn ranks on each")
    where.add_argument("--hosts", default=None, metavar="A,B,...",
                       help="measure the links across these nodes with MPICH's mpiexec (-hosts A,B -ppn R); "
                            "other MPIs: --launcher")
    where.add_argument("--launcher", default=None, metavar="CMD",
                       help="a command line that starts MPI ranks across nodes, the same number on each "
                            "(e.g. 'srun' inside a Slurm allocation, 'mpirun --host a:2,b:2 -n 4')")
    p.add_argument("--ppn", type=int, default=2, metavar="R",
                   help="ranks per node of the link measurement with --cluster or --hosts (default 2: one "
                        "pair inside a node, and pairs across nodes)")
    p.add_argument("--mpiexec-args", default="", metavar="ARGS",
                   help="more arguments for mpiexec (this node's, or with --hosts), one string")
    p.add_argument("--link-max-mib", type=float, default=DEFAULT_MAX_BYTES / 2 ** 20, metavar="M",
                   help=f"largest ping-pong message in MiB (default {DEFAULT_MAX_BYTES // 2 ** 20}; messages "
                        f"stop growing once one takes 25 ms); the collectives go up to hpcnn's gradient bucket "
                        f"({COLLECTIVE_BYTES // 2 ** 20} MiB) or this, if smaller; at least 1")
    p.add_argument("--link-timeout", type=float, default=900.0, metavar="S",
                   help="give up on the link measurement after this many seconds (default 900)")
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


def _roofline_figures(src, dtype, peak, bw, overhead, roof, slots) -> list:
    errs = roof["errors"]
    return [
        {"figure": "device.peak_flops", "value": peak, "assumed": False,
         "source": f"{src}: best single-thread {dtype} GEMM 768x768x768"},
        {"figure": "device.memory_bandwidth", "value": bw, "assumed": False,
         "source": f"{src}: best single-thread copy of 64 MiB (read + write)"},
        {"figure": "device.op_overhead_s", "value": overhead, "assumed": False,
         "source": f"{src}: median forward + backward of a 1-element ReLU through the op API"},
        {"figure": "device.kind_efficiency", "value": roof["kind_efficiency"], "assumed": False,
         "source": f"{src}: per compute-bound op kind, flops / (peak x seconds) on large tiles: the slope of "
                   f"seconds = overhead + flops / rate fitted to its measured tiles (relative errors)"},
        {"figure": "device.kind_memory_efficiency", "value": roof["kind_memory_efficiency"], "assumed": False,
         "source": f"{src}: per memory-bound op kind, bytes / (bandwidth x seconds) on large tiles, fitted as "
                   f"for kind_efficiency"},
        {"figure": "device.kind_overhead_s", "value": roof["kind_overhead_s"], "assumed": False,
         "source": f"{src}: per op kind, the fixed seconds of a call (forward + backward), the intercept of "
                   f"the same fit"},
        {"figure": "roofline_fit_error", "value": {"median": float(np.median(errs)) if errs else None,
                                                   "p90": float(np.percentile(errs, 90)) if errs else None},
         "assumed": False, "source": f"{src}: relative error of the fitted roofline on the measured tiles"},
        {"figure": "device.memory_efficiency", "value": roof["memory_efficiency"], "assumed": False,
         "source": f"{src}: summed bytes / (bandwidth x summed seconds) over the measured memory-bound tiles "
                   f"(op kinds without a figure of their own)"},
        {"figure": "slots_per_node", "value": slots, "assumed": False,
         "source": f"{src}: CPUs this process may run on; ranks beyond it share cores"},
    ]


def _launch(args, n: int | None = None) -> tuple[list, dict | None, str]:
    """(launcher command line, its environment or None for this one's, what
    it is) of the link measurement (and, across nodes, of the runtime
    figures: ``n`` ranks, --ppn on each node)."""
    import shlex

    from hpcnn.launcher import find_mpiexec
    extra = shlex.split(args.mpiexec_args)
    if args.launcher:
        return shlex.split(args.launcher), None, f"`{args.launcher}`"
    if args.ppn < 1:
        raise LinkMeasurementError(f"--ppn must be at least 1, got {args.ppn}")
    if args.cluster:
        from hpcnn.cluster import ClusterError, EmulatedCluster
        try:
            c = EmulatedCluster.attach(args.cluster)
            n = args.ppn * len(c.nodes) if n is None else n
            return c.mpiexec_argv(n, [], ppn=args.ppn, mpiexec_args=extra), c.job_env(), \
                f"emulated cluster {c.prefix} ({len(c.nodes)} nodes x {args.ppn} ranks)"
        except ClusterError as exc:
            raise LinkMeasurementError(f"--cluster {args.cluster}: {exc}") from None
    exe = find_mpiexec()
    if exe is None:
        raise LinkMeasurementError("mpiexec not found: install an MPI (pip install mpich) or pass --no-mpi")
    if args.hosts:
        hosts = [h for h in args.hosts.split(",") if h]
        if len(hosts) < 2:
            raise LinkMeasurementError(f"--hosts {args.hosts}: name at least two nodes, separated by commas")
        return [exe, "-hosts", ",".join(hosts), "-ppn", str(args.ppn), "-n", str(args.ppn * len(hosts)),
                *extra], None, f"mpiexec on {', '.join(hosts)} ({args.ppn} ranks each)"
    return [exe, "-n", "2", *extra], None, "mpiexec -n 2 on this node"


def _fmt_link(m) -> str:
    return f"latency {m.latency * 1e6:.1f} us, bandwidth {m.bandwidth / 1e6:,.1f} MB/s"


def _collectives(rep) -> dict:
    """The machine file's ``collectives`` record of a link measurement:
    group, latency, bandwidth (and bus bandwidth) of each collective."""
    return {name: {k: c[k] for k in ("group", "latency", "bandwidth", "bus_bandwidth") if k in c}
            for name, c in sorted(rep.collectives.items())}


def _link_figures(args, src, host) -> tuple[dict, dict | None, dict, list]:
    """(intra-node link {bandwidth, latency}, inter-node link or None when
    not measured, the layout {nodes, ranks_per_node, hosts, collectives},
    the figures):
    the link measurement, or typical figures marked as assumed with --no-mpi.
    Raises LinkMeasurementError when the measurement fails or finds one node
    where several were asked for."""
    one_node = {"nodes": 1, "ranks_per_node": 256, "hosts": [host]}
    rpn_figure = {"figure": "ranks_per_node", "value": 256, "assumed": True,
                  "source": "every rank of a local run is on this node"}
    if args.no_mpi:
        if args.cluster or args.hosts or args.launcher:
            raise LinkMeasurementError("--no-mpi measures no link: leave it out to measure across nodes")
        intra = {"bandwidth": 5e9, "latency": 2e-6}
        return intra, None, one_node, [rpn_figure, {"figure": "links.intra_node", "value": intra, "assumed": True,
                                                    "source": "assumed (--no-mpi): typical shared-memory MPI"}]
    if args.link_max_mib < 1:
        raise LinkMeasurementError(f"--link-max-mib must be at least 1 (the bandwidth is fitted to messages "
                                   f"of 1 MiB and more), got {args.link_max_mib:g}")
    launch, env, what = _launch(args)
    across = bool(args.cluster or args.hosts or args.launcher)
    print(f"MPI links and collectives, {what} ...", flush=True)
    rep = measure_links(launch, env=env, timeout=args.link_timeout, max_bytes=int(args.link_max_mib * 2 ** 20))
    print(f"  {rep.layout()}; {rep.mpi}")
    for name, m in rep.links.items():
        print(f"  {name}: {_fmt_link(m)}")
    for name, c in sorted(rep.collectives.items()):
        bus = f", bus {c['bus_bandwidth'] / 1e6:,.1f} MB/s" if "bus_bandwidth" in c else ""
        print(f"  {name} ({c['group']} ranks): latency {c['latency'] * 1e6:.1f} us, "
              f"{c['bandwidth'] / 1e6:,.1f} MB/s of buffer{bus}")
    figures = rep.figures(src)
    if across and rep.nodes < 2:
        raise LinkMeasurementError(f"the launcher started every rank on one node ({rep.hosts[0]}): nothing "
                                   f"crossed a link between nodes; spread the ranks over two or more nodes "
                                   f"(check --hosts / --launcher, e.g. srun -N 2 --ntasks-per-node=2)")
    if rep.nodes < 2:
        return (_as_link(rep.links["intra_node"]), None,
                {**one_node, "hosts": rep.hosts, "collectives": _collectives(rep)}, [rpn_figure] + figures)
    layout = {"nodes": rep.nodes, "ranks_per_node": rep.ranks_per_node, "hosts": rep.hosts,
              "collectives": _collectives(rep)}
    figures.insert(0, {"figure": "ranks_per_node", "value": rep.ranks_per_node, "assumed": False,
                       "source": f"{src}: the layout of the link measurement, {rep.layout()}"})
    intra = rep.links.get("intra_node")
    if intra is None:
        # one rank per node: the intra-node link from two ranks on this node
        print("  one rank per node: the intra-node link from 2 ranks on this node ...", flush=True)
        from hpcnn.launcher import find_mpiexec
        local = measure_links([find_mpiexec() or "mpiexec", "-n", "2"], timeout=args.link_timeout,
                              max_bytes=int(args.link_max_mib * 2 ** 20))
        intra = local.links["intra_node"]
        layout["collectives"].update({k: v for k, v in _collectives(local).items()
                                      if k not in layout["collectives"]})
        print(f"  intra_node: {_fmt_link(intra)} (on {host})")
        figures += local.figures(f"{src}, on {host} (the cluster run had one rank per node)")
    return _as_link(intra), _as_link(rep.links["inter_node"]), layout, figures


def _as_link(m) -> dict:
    return {"bandwidth": m.bandwidth, "latency": m.latency}


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

    # the links first: a launch across nodes that fails should fail at once
    try:
        intra, inter, layout, link_figures = _link_figures(args, src, host)
    except LinkMeasurementError as exc:
        print(f"hpcnn calibrate: error: {exc}", file=sys.stderr)
        return 1

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
    roof = fit_roofline(samples, peak, bw, overhead)
    errs = roof["errors"]
    if errs:
        print(f"  fitted roofline vs measured tiles: median error {np.median(errs) * 100:.0f}%, "
              f"90th percentile {np.percentile(errs, 90) * 100:.0f}% (measured tiles use their "
              f"measured time; the roofline prices the others)")
    figures = _roofline_figures(src, dtype, peak, bw, overhead, roof, slots)
    figures += link_figures
    if inter is None:
        inter = intra
        figures.append({"figure": "links.inter_node", "value": intra, "assumed": True,
                        "source": "NOT MEASURED: a copy of the intra-node figures. Measure across nodes: "
                                  "hpcnn calibrate --hosts A,B (or --launcher srun inside an allocation, "
                                  "--cluster NAME on an emulated cluster)"})

    from hpcnn.ops import kernel_set
    m = Machine(
        name=args.name, ranks_per_node=layout["ranks_per_node"], nodes=layout["nodes"],
        hosts=layout["hosts"], slots_per_node=slots,
        description=(f"This machine ({host}, {_cpu_name()}, {slots} CPUs), calibrated {when} with "
                     f"numpy {np.__version__} and the kernel set {kernel_set()}; op tiles alone with one BLAS thread, runtime figures "
                     f"with the BLAS threads hpcnn gives each rank (cores / ranks). Op tiles of "
                     f"{', '.join(args.model)} at ranks {args.ranks}, global batch {args.batch}."
                     + (f" MPI links measured across {layout['nodes']} nodes x {layout['ranks_per_node']} "
                        f"ranks ({', '.join(layout['hosts'])}); op tiles and runtime figures on {host}."
                        if layout["nodes"] > 1 else "")),
        device={"kind": "cpu", "name": _cpu_name(), "peak_flops": peak, "memory_bandwidth": bw,
                "memory_bytes": _mem_bytes(), "compute_efficiency": 1.0,
                "kind_efficiency": roof["kind_efficiency"],
                "kind_memory_efficiency": roof["kind_memory_efficiency"],
                "kind_overhead_s": roof["kind_overhead_s"],
                "memory_efficiency": roof["memory_efficiency"], "op_overhead_s": overhead},
        intra=_link(intra), inter=_link(inter), figures=figures, collectives=layout.get("collectives", {}),
        measured={"dtype": dtype, "blas_threads": 1, "models": list(args.model), "ranks": list(args.ranks),
                  "batch": args.batch, "repeats": args.repeats, "ops": measured})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    m.save(out_path)
    if not (args.no_mpi or args.no_runtime):
        spec = RuntimeSpec(models=tuple(args.model), batch=args.batch, dtype=dtype, repeats=args.repeats,
                           budget=args.runtime_budget, rounds=args.runtime_rounds, max_kinds=args.max_kinds)
        runs = [(P, None, None, f"{P} rank(s)") for P in (args.runtime_ranks or args.ranks)]
        if layout["nodes"] > 1:
            # across nodes: the runtime as the jobs will have it, every rank
            # of the calibrated layout at once under the same launcher
            P = layout["nodes"] * layout["ranks_per_node"]
            launch, env, what = _launch(args, P)
            runs = [(P, launch, env, f"{P} ranks across {what}")]
        for P, launch, env, what in runs:
            print(f"runtime figures with {what} running at once (tiles, exchanges, allreduces, "
                  f"executor overheads; tile budget {args.runtime_budget:.0f} s) ...", flush=True)
            try:
                rf, raw = measure_runtime(out_path, P, spec, launch=launch, env=env)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"hpcnn calibrate: error: {exc}", file=sys.stderr)
                return 1
            m.runtime[P] = rf
            print(_runtime_line(rf), flush=True)
            m.figures.append({"figure": f"runtime.{P}", "value": {k: v for k, v in rf.to_dict().items()
                                                                  if k != "ops"},
                              "assumed": False,
                              "source": f"{src}: hpcnn.calibration.runtime_sampler with {what} running "
                                        f"at once, load average {raw.get('load_average')}"})
            m.save(out_path)
    print(f"machine written to {out_path}")
    return 0
