"""``hpcnn bench comm``: the time of the exchange plans -- halo exchanges
and redistributions, on every transport of hpcnn.parallel.comm, the region
assembled into one array and handed over as pieces (as a convolution reads
it) -- against a plain mpi4py Alltoallv of the same bytes between the same
ranks; the share of a training step spent communicating; and how much of a
spatially split convolution stack's halo time its interior compute hides
(the stack trained with and without overlap in one run, step by step).

Run it under mpiexec (``mpiexec -n 4 hpcnn bench comm``, or on an emulated
cluster: ``hpcnn cluster run -n 2 --ppn 1 -- hpcnn bench comm``) or alone,
in which case it launches ``mpiexec -n P`` itself for every P of
``--ranks`` and prints one table.

Every timing is the median over ``--repeat`` repetitions of the slowest
rank's time (each repetition starts after a barrier).  Tiles are in the
memory layout the kernels leave them in (channels-last).  The Alltoallv
sends contiguous, ready-made buffers; hpcnn also reads the pieces out of
the tiles and writes them into the region, which is part of what it is
timed for.  Load averages are recorded before and after each section.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

RESULT_TAG = "HPCNN_BENCH_COMM "
SECTIONS = ("exchanges", "step", "overlap")
_LAUNCHED_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS",
                  "HYDI_CONTROL_FD")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4],
                   help="world sizes to launch when run without mpiexec (default: 2 4)")
    p.add_argument("--repeat", type=int, default=30, help="timed repetitions per case (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed repetitions first (default 5)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the tensors' batch by this (default 1: tensors of 2 to 16 MiB)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--model", default="resnet_small", help="model of the training-step share (default resnet_small)")
    p.add_argument("--image-size", type=int, default=32, help="its image side (default 32)")
    p.add_argument("--batch", type=int, default=16, help="its global batch (default 16)")
    p.add_argument("--steps", type=int, default=6, help="timed training steps (default 6)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="what to measure (default all): the exchanges, the training-step share, "
                        "the overlap of a spatially split conv stack")
    p.add_argument("--stack-batch", type=int, default=8, help="conv stack: batch (default 8)")
    p.add_argument("--stack-channels", type=int, default=64, help="conv stack: channels (default 64)")
    p.add_argument("--stack-image", type=int, default=64, help="conv stack: image side (default 64)")
    p.add_argument("--stack-depth", type=int, default=4, help="conv stack: 3x3 convolutions (default 4)")
    p.add_argument("--stack-steps", type=int, default=6, help="conv stack: timed steps of each (default 6)")
    p.add_argument("--stack-transport", default="p2p",
                   help="conv stack: the transport of its halos (default p2p; auto measures)")
    p.add_argument("--machine", default="local",
                   help="machine file of the conv stack's predicted halo time (default local)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per mpiexec launch")


def _launched() -> bool:
    return any(v in os.environ for v in _LAUNCHED_VARS)


def run(args) -> int:
    if not _launched():
        return _launch_all(args)
    from mpi4py import MPI
    if MPI.COMM_WORLD.Get_size() == 1 and not os.environ.get("HPCNN_BENCH_INNER"):
        return _launch_all(args)
    result = _measure(args)
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(RESULT_TAG + json.dumps(result), flush=True)
        if os.environ.get("HPCNN_BENCH_INNER") != "1":
            print(format_tables([result]))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump([result], f, indent=1)
    return 0


# ---- launcher --------------------------------------------------------------------------
def _mpiexec() -> str:
    from hpcnn.launcher import require_mpiexec
    return require_mpiexec("hpcnn bench comm", " or launch it yourself: mpiexec -n 4 hpcnn bench comm")


def _launch_all(args) -> int:
    results = []
    passthrough = ["--repeat", str(args.repeat), "--warmup", str(args.warmup), "--scale", str(args.scale),
                   "--dtype", args.dtype, "--model", args.model, "--image-size", str(args.image_size),
                   "--batch", str(args.batch), "--steps", str(args.steps), "--sections", *args.sections,
                   "--stack-batch", str(args.stack_batch), "--stack-channels", str(args.stack_channels),
                   "--stack-image", str(args.stack_image), "--stack-depth", str(args.stack_depth),
                   "--stack-steps", str(args.stack_steps), "--stack-transport", args.stack_transport,
                   "--machine", args.machine]
    from hpcnn.launcher import child_env
    env = child_env(HPCNN_BENCH_INNER="1")
    for p in args.ranks:
        cmd = [_mpiexec(), "-n", str(p), sys.executable, "-m", "hpcnn", "bench", "comm"] + passthrough
        print(f"hpcnn bench comm: running {p} ranks ...", file=sys.stderr, flush=True)
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"hpcnn bench comm: {p} ranks did not finish in {args.timeout:.0f} s; "
                             "lower --repeat or --scale, or raise --timeout")
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith(RESULT_TAG)]
        if r.returncode != 0 or not lines:
            sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
            raise SystemExit(f"hpcnn bench comm: the run on {p} ranks failed (exit {r.returncode})")
        results.append(json.loads(lines[-1][len(RESULT_TAG):]))
    print(format_tables(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


# ---- the measurements (collective) -----------------------------------------------------
def _cases(P, scale):
    """(name, kind, producer layout, consumer op or None, consumer layout) of
    the exchanges measured at P ranks."""
    from hpcnn.ops import make_op
    from hpcnn.parallel import Layout

    def n(b):
        return max(P, int(round(b * scale)))

    conv3 = make_op("conv2d", "conv3x3", out_channels=64, kernel_size=3, padding=1)
    conv7 = make_op("conv2d", "conv7x7", out_channels=64, kernel_size=7, padding=3)
    out = []
    shape = (n(16), 64, 64, 64)
    out.append(("halo 3x3, h split", "halo", Layout(shape, (1, 1, P, 1)), conv3, (1, 1, P, 1)))
    if P >= 4 and P % 2 == 0:
        hw = (2, P // 2)
        out.append(("halo 3x3, h x w split", "halo", Layout(shape, (1, 1) + hw), conv3, (1, 1) + hw))
    out.append(("halo 7x7, h split", "halo", Layout(shape, (1, 1, P, 1)), conv7, (1, 1, P, 1)))
    shape = (n(32), 64, 32, 32)
    out.append(("redistribute n -> c", "redistribution", Layout(shape, (P, 1, 1, 1)), None, (1, P, 1, 1)))
    out.append(("redistribute h -> n", "redistribution", Layout(shape, (1, 1, P, 1)), None, (P, 1, 1, 1)))
    fshape = (n(64), 4096)
    out.append(("gather features n -> c (fc input)", "redistribution", Layout(fshape, (P, 1)),
                make_op("linear", "fc", out_features=4096), (1, P)))
    return out


def _timed(comm, fn, warmup, repeat):
    import numpy as np
    from mpi4py import MPI
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(comm.allreduce(dt, op=MPI.MAX))
    return float(np.median(times))


def _channels_last(a):
    import numpy as np
    if a.ndim != 4:
        return a
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def _load() -> list:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _measure(args) -> dict:
    import numpy as np
    from mpi4py import MPI

    from hpcnn.backend import Backend
    from hpcnn.parallel import ExchangePlan, Layout, needed_boxes
    from hpcnn.parallel.comm import TRANSPORTS, Communicator
    from hpcnn.runtime.node_setup import setup_node

    world = MPI.COMM_WORLD
    P, me = world.Get_size(), world.Get_rank()
    backend = Backend("numpy")
    info = setup_node(world, backend, verbose=False)
    dtype = np.dtype(args.dtype)
    load = [_load()]
    rows = []
    if "exchanges" in args.sections:
        cm = Communicator(world, backend)
        for name, kind, src, op, dst_deg in _cases(P, args.scale):
            if op is None:
                dst = Layout(src.shape, dst_deg)
                needs = dst.boxes()
            else:
                out_shape = op.infer_shape([src.shape])
                dst = Layout(out_shape, dst_deg)
                needs = needed_boxes(op, 0, dst, [src.shape])
            plan = ExchangePlan.compile(src, needs, dtype.itemsize)
            box = src.box(me)
            rng = np.random.default_rng(me)
            # tiles as the kernels leave them: channels-last memory
            tile = _channels_last(rng.standard_normal(box.shape).astype(dtype)) if box is not None else None
            row = {"case": name, "kind": kind, "shape": list(src.shape), "src": src.config(),
                   "dst": dst.config(), "total_bytes": plan.total_bytes(),
                   "max_rank_bytes": plan.max_rank_bytes(), "messages": plan.num_messages()}
            need = plan.need(me)
            grad = _channels_last(np.ones(need.shape, dtype)) if need is not None else None
            for t in TRANSPORTS:
                row[f"{t}_s"] = _timed(world, lambda t=t: cm.exchange(plan, tile, dtype, tag=1, transport=t),
                                       args.warmup, args.repeat)
                row[f"{t}_pieces_s"] = _timed(world, lambda t=t: cm.exchange(plan, tile, dtype, tag=1,
                                                                             pieces=True, transport=t),
                                              args.warmup, args.repeat)
                row[f"{t}_adjoint_s"] = _timed(world, lambda t=t: cm.exchange_adjoint(plan, grad, None, dtype,
                                                                                      tag=2, transport=t),
                                               args.warmup, args.repeat)
            # what the executor's set-up measurement chooses for this plan
            secs = cm.measure_transports(plan, dtype, pieces=op is not None and op.takes_pieces)
            row["chosen"] = min(TRANSPORTS, key=lambda t: (secs[t], TRANSPORTS.index(t)))
            # what assembling the region costs without any message: allocate it
            # and copy this rank's own piece (the whole tile, for a halo exchange)
            own = [b for s_, b in plan.receives(me) if s_ == me]

            def local_copy():
                if need is None or need.empty:
                    return None
                out = cm._alloc(need.shape, dtype, like=tile)
                for b in own:
                    out[b.slices(need.lo)] = tile[b.slices(box.lo)]
                return out
            row["local_copy_s"] = _timed(world, local_copy, args.warmup, args.repeat)
            # a plain Alltoallv of the same bytes, contiguous ready-made buffers
            scounts = [0] * P
            rcounts = [0] * P
            for d, b in plan.sends(me):
                if d != me:
                    scounts[d] += b.volume
            for s_, b in plan.receives(me):
                if s_ != me:
                    rcounts[s_] += b.volume
            sbuf = np.ones(sum(scounts), dtype)
            rbuf = np.empty(sum(rcounts), dtype)
            sdis = np.concatenate([[0], np.cumsum(scounts)[:-1]]).astype(int).tolist()
            rdis = np.concatenate([[0], np.cumsum(rcounts)[:-1]]).astype(int).tolist()
            mtype = MPI._typedict[dtype.char]
            row["alltoallv_s"] = _timed(world, lambda: world.Alltoallv([sbuf, scounts, sdis, mtype],
                                                                       [rbuf, rcounts, rdis, mtype]),
                                        args.warmup, args.repeat)
            rows.append(row)
        cm.free()
        load.append(_load())
    step = _training_step_share(args, world, backend) if "step" in args.sections else None
    load.append(_load())
    stack = _overlap_stack(args, world, backend) if "overlap" in args.sections else None
    load.append(_load())
    hosts = sorted(set(world.allgather(MPI.Get_processor_name())))
    return {"ranks": P, "nodes": len(hosts), "dtype": args.dtype, "blas_threads": info.blas_threads,
            "cores": info.cores, "load_average": load, "exchanges": rows, "training_step": step,
            "overlap_stack": stack}


def _overlap_stack(args, world, backend) -> dict:
    """A stack of 3x3 convolutions (ReLU between) split over h on every
    rank, trained with and without overlap in one run (the two take turns,
    step by step): the halo time each step exposes on the ranks' threads,
    and how much of it the interior compute hides."""
    import numpy as np
    from mpi4py import MPI

    from hpcnn.graph import Graph
    from hpcnn.runtime.executor import DistributedModel
    from hpcnn.runtime.sgd import SGD
    from hpcnn.strategy.plan import Plan

    P = world.Get_size()
    b, c, hw, depth = args.stack_batch, args.stack_channels, args.stack_image, args.stack_depth
    g = Graph("conv_stack")
    x = g.input((b, c, hw, hw))
    for i in range(depth):
        x = g.conv(x, c, 3, padding=1, name=f"conv{i}")
        x = g.relu(x, name=f"relu{i}")
    x = g.global_avgpool(x, name="avgpool")
    x = g.linear(x, 10, name="fc")
    g.loss(x)
    cfg = {n.name: ({"h": P} if len(n.shape) == 4 else {"n": min(P, n.shape[0])}) for n in g}
    plan = Plan(g.name, P, g.batch, cfg, name="h")
    rng = np.random.default_rng(0)
    xs = rng.standard_normal(g[g.input_name].shape).astype(args.dtype)
    ys = rng.integers(0, 10, size=g.batch)
    runs = {}
    for ov in (True, False):
        dm = DistributedModel(g, plan, world, dtype=np.dtype(args.dtype), seed=0, backend=backend,
                              transport=args.stack_transport, trace=True, setup=False, overlap=ov)
        box = dm.input_box()
        runs[ov] = dict(dm=dm, xt=_channels_last(xs[box.slices()]), sgd=SGD(lr=0.01, momentum=0.9),
                        steps=[], halo=[], flight=[], compute=[])
        dm.train_step(runs[ov]["xt"], ys, runs[ov]["sgd"], step=0)      # warm-up
    for s in range(args.stack_steps):
        for ov in (True, False):
            r = runs[ov]
            dm = r["dm"]
            dm.events, dm.flights = [], []
            world.Barrier()
            t0 = time.perf_counter()
            dm.train_step(r["xt"], ys, r["sgd"], step=s + 1)
            dt = time.perf_counter() - t0
            halo = sum(t1 - ta for cat, node, ta, t1 in dm.events if cat == "halo" and node != "conv0")
            comp = sum(t1 - ta for cat, _, ta, t1 in dm.events if cat in ("forward", "backward"))
            fl = sum(t1 - ta for cat, node, ta, t1 in dm.flights if cat == "halo in flight" and node != "conv0")
            r["steps"].append(world.allreduce(dt, op=MPI.MAX))
            r["halo"].append(world.allreduce(halo, op=MPI.SUM) / P)
            r["compute"].append(world.allreduce(comp, op=MPI.SUM) / P)
            r["flight"].append(world.allreduce(fl, op=MPI.SUM) / P)
    out = {"shape": [b, c, hw, hw], "depth": depth, "transport": runs[True]["dm"].edges[("conv1", 0)].transport,
           "halo_bytes_per_step": 0}
    for ov, r in runs.items():
        key = "overlap" if ov else "no_overlap"
        out[key] = {k: float(np.median(r[k])) for k in ("steps", "halo", "compute", "flight")}
        if ov:
            out["halo_bytes_per_step"] = int(world.allreduce(r["dm"].step_bytes().get("halo", 0), op=MPI.SUM))
        r["dm"].free()
    exposed_off = out["no_overlap"]["halo"]
    out["hidden_fraction"] = float(1.0 - out["overlap"]["halo"] / exposed_off) if exposed_off > 0 else 0.0
    # what the cost model predicts for the stack's halos (t_x of the edges
    # into the convolutions), with and without its overlap term
    if world.Get_rank() == 0:
        from hpcnn.strategy.cost_model import CostModel
        from hpcnn.strategy.machine import load_machine
        from hpcnn.strategy.plan_pricing import price_plan
        m = load_machine(args.machine)
        pred = {}
        for ov in (True, False):
            rows = price_plan(CostModel(g, P, m, dtype=args.dtype, overlap=ov), plan).rows
            pred["overlap" if ov else "no_overlap"] = float(sum(r["t_x"] for r in rows if r["op"] == "conv2d"
                                                                and r["node"] != "conv0"))
        pred["machine"] = args.machine
        pred["hidden_fraction"] = (1.0 - pred["overlap"] / pred["no_overlap"]) if pred["no_overlap"] else 0.0
        out["predicted"] = pred
    return out


def _training_step_share(args, world, backend) -> dict:
    """Time a few training steps of ``args.model`` under a spatial plan and a
    data-parallel plan, with the executor's timed events."""
    import numpy as np
    from mpi4py import MPI

    from hpcnn.models import build_model
    from hpcnn.runtime.executor import DistributedModel
    from hpcnn.runtime.sgd import SGD
    from hpcnn.strategy.baselines import data_parallel
    from hpcnn.strategy.plan import Plan

    P, me = world.Get_size(), world.Get_rank()
    g = build_model(args.model, batch=args.batch, image_size=args.image_size)
    out = {"model": args.model, "batch": args.batch, "image_size": args.image_size, "plans": {}}
    spatial = {}
    for n in g:
        if len(n.shape) == 4:
            spatial[n.name] = {"h": P} if n.shape[2] >= P else {"n": P}
        elif len(n.shape) == 2:
            spatial[n.name] = {"n": min(P, n.shape[0])}
        else:
            spatial[n.name] = {"n": min(P, n.shape[0])}
    sp = Plan(g.name, P, g.batch, spatial, name="spatial")
    plans = {"spatial (h=P, dense n=P)": (sp, True), "spatial, overlap off": (sp, False),
             "data parallel (n=P)": (data_parallel(g, P), True)}
    rng = np.random.default_rng(0)
    x = rng.standard_normal(g[g.input_name].shape).astype(args.dtype)
    y = rng.integers(0, g[g.logits_name].shape[1], size=g.batch)
    comm_cats = ("halo", "redistribution", "allreduce", "batchnorm")
    for label, (plan, overlap) in plans.items():
        dm = DistributedModel(g, plan, world, dtype=np.dtype(args.dtype), seed=0, backend=backend,
                              trace=True, setup=False, overlap=overlap)
        box = dm.input_box()
        xt = x[box.slices()] if box is not None else None
        sgd = SGD(lr=0.01, momentum=0.9)
        dm.train_step(xt, y, sgd, step=0)       # warm-up
        step_times, comm_times, byts = [], [], {}
        for s in range(args.steps):
            dm.events = []
            world.Barrier()
            t0 = time.perf_counter()
            dm.train_step(xt, y, sgd, step=s + 1)
            dt = time.perf_counter() - t0
            c = sum(t1 - ta for cat, _, ta, t1 in dm.events if cat in comm_cats)
            step_times.append(world.allreduce(dt, op=MPI.MAX))
            comm_times.append(world.allreduce(c, op=MPI.SUM) / P)
            byts = dm.step_bytes()
        all_bytes = {}
        for d in world.allgather(dict(byts)):
            for k, v in d.items():
                all_bytes[k] = all_bytes.get(k, 0) + v
        out["plans"][label] = {"step_s": float(np.median(step_times)),
                               "comm_s_mean_rank": float(np.median(comm_times)),
                               "comm_share": float(np.median(comm_times) / np.median(step_times)),
                               "bytes_per_step_all_ranks": all_bytes}
        dm.free()
    return out


# ---- report ---------------------------------------------------------------------------
def _ms(t):
    return f"{t * 1e3:.2f} ms"


def format_tables(results) -> str:
    from hpcnn.parallel.comm import TRANSPORTS
    lines = []
    if any(res["exchanges"] for res in results):
        lines += ["## Exchange time (median of the slowest rank)", "",
                  "*region*: assembled into one array; *pieces*: handed over as parts, as a convolution "
                  "reads them (no copy of the own tile); ratios are the fastest transport's time over a "
                  "bare Alltoallv of the same bytes.", "",
                  "| ranks | exchange | tensor | bytes moved | messages | region: "
                  + " / ".join(TRANSPORTS) + " | pieces: " + " / ".join(TRANSPORTS)
                  + " | Alltoallv | region / Alltoallv | pieces / Alltoallv | own-part copy | adjoint (fastest) "
                  "| chosen |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for res in results:
            for r in res["exchanges"]:
                reg = min(r[f"{t}_s"] for t in TRANSPORTS)
                pcs = min(r[f"{t}_pieces_s"] for t in TRANSPORTS)
                adj = min(r[f"{t}_adjoint_s"] for t in TRANSPORTS)
                lines.append(
                    f"| {res['ranks']} | {r['case']} | {'x'.join(map(str, r['shape']))} | "
                    f"{r['total_bytes'] / 1e6:.2f} MB | {r['messages']} | "
                    + " / ".join(f"{r[f'{t}_s'] * 1e3:.2f}" for t in TRANSPORTS) + " ms | "
                    + " / ".join(f"{r[f'{t}_pieces_s'] * 1e3:.2f}" for t in TRANSPORTS) + " ms | "
                    f"{_ms(r['alltoallv_s'])} | {reg / r['alltoallv_s']:.2f} | {pcs / r['alltoallv_s']:.2f} | "
                    f"{_ms(r['local_copy_s'])} | {_ms(adj)} | {r['chosen']} |")
    if any(res.get("training_step") for res in results):
        lines += ["", "## Share of a training step spent communicating", "",
                  "| ranks | model | plan | step | communication (mean rank) | share | bytes per step (all ranks) |",
                  "|---|---|---|---|---|---|---|"]
        for res in results:
            st = res.get("training_step")
            if not st:
                continue
            for label, p in st["plans"].items():
                b = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(p["bytes_per_step_all_ranks"].items())
                              if v and k != "scalars")
                lines.append(f"| {res['ranks']} | {st['model']} {st['image_size']}px batch {st['batch']} | "
                             f"{label} | {p['step_s'] * 1e3:.1f} ms | {p['comm_s_mean_rank'] * 1e3:.1f} ms | "
                             f"{p['comm_share'] * 100:.0f}% | {b} |")
    if any(res.get("overlap_stack") for res in results):
        lines += ["", "## Halo hidden behind interior compute (spatially split conv stack, mean rank)", "",
                  "Halo: the exchanges into the convolutions after the first (whose input is the network's, "
                  "forward only); *exposed*: time on the ranks' threads in those exchanges (posting, waiting); "
                  "*predicted*: the cost model's t_x of those edges with and without its overlap term.", "",
                  "| ranks | nodes | stack | transport | halo bytes per step | step: overlap / without | "
                  "halo exposed: overlap / without | halo in flight (overlap) | compute (overlap) | hidden | "
                  "predicted t_x: overlap / without (machine) | predicted hidden |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for res in results:
            o = res.get("overlap_stack")
            if not o:
                continue
            on, off = o["overlap"], o["no_overlap"]
            lines.append(f"| {res['ranks']} | {res.get('nodes', 1)} | {o['depth']} x conv3x3, "
                         f"{'x'.join(map(str, o['shape']))} | {o['transport']} | "
                         f"{o['halo_bytes_per_step'] / 1e6:.2f} MB | {_ms(on['steps'])} / {_ms(off['steps'])} | "
                         f"{_ms(on['halo'])} / {_ms(off['halo'])} | {_ms(on['flight'])} | {_ms(on['compute'])} | "
                         f"{o['hidden_fraction'] * 100:.0f}% | "
                         + (f"{_ms(o['predicted']['overlap'])} / {_ms(o['predicted']['no_overlap'])} "
                            f"({o['predicted']['machine']}) | {o['predicted']['hidden_fraction'] * 100:.0f}% |"
                            if o.get("predicted") else "- | - |"))
    return "\n".join(lines)
