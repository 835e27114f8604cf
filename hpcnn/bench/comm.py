"""``hpcnn bench comm``: halo-exchange and redistribution throughput of the
exchange plans (both transports of hpcnn.parallel.comm) against a plain
mpi4py Alltoallv of the same bytes between the same ranks, and the share of a
training step spent communicating.

Run it under mpiexec (``mpiexec -n 4 hpcnn bench comm``) or alone, in which
case it launches ``mpiexec -n P`` itself for every P of ``--ranks`` and
prints one table.

Every timing is the median over ``--repeat`` repetitions of the slowest
rank's time (each repetition starts after a barrier).  Throughput counts the
bytes that cross between ranks (ExchangePlan.total_bytes, the same bytes the
Alltoallv moves) divided by that time.  The Alltoallv sends contiguous,
ready-made buffers; hpcnn also cuts the pieces out of (and writes them into)
the tiles, which is part of what it is timed for.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

RESULT_TAG = "HPCNN_BENCH_COMM "
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
                   "--batch", str(args.batch), "--steps", str(args.steps)]
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


def _measure(args) -> dict:
    import numpy as np
    from mpi4py import MPI

    from hpcnn.backend import Backend
    from hpcnn.parallel import ExchangePlan, Layout, needed_boxes
    from hpcnn.parallel.comm import Communicator
    from hpcnn.runtime.node_setup import setup_node

    world = MPI.COMM_WORLD
    P, me = world.Get_size(), world.Get_rank()
    backend = Backend("numpy")
    info = setup_node(world, backend, verbose=False)
    dtype = np.dtype(args.dtype)
    comms = {t: Communicator(world, backend, transport=t) for t in ("p2p", "neighbor")}
    rows = []
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
        tile = rng.standard_normal(box.shape).astype(dtype) if box is not None else None
        row = {"case": name, "kind": kind, "shape": list(src.shape), "src": src.config(),
               "dst": dst.config(), "total_bytes": plan.total_bytes(),
               "max_rank_bytes": plan.max_rank_bytes(), "messages": plan.num_messages()}
        for t, cm in comms.items():
            row[f"{t}_s"] = _timed(world, lambda cm=cm: cm.exchange(plan, tile, dtype, tag=1), args.warmup,
                                   args.repeat)
        # the adjoint (backward) of the default transport
        need = plan.need(me)
        grad = np.ones(need.shape, dtype) if need is not None else None
        row["p2p_adjoint_s"] = _timed(world, lambda: comms["p2p"].exchange_adjoint(plan, grad, None, dtype, tag=2),
                                      args.warmup, args.repeat)
        # what assembling the region costs without any message: allocate it
        # and copy this rank's own piece (the whole tile, for a halo exchange)
        own = [b for s_, b in plan.receives(me) if s_ == me]

        def local_copy():
            if need is None or need.empty:
                return None
            out = np.empty(need.shape, dtype)
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
        for s, b in plan.receives(me):
            if s != me:
                rcounts[s] += b.volume
        sbuf = np.ones(sum(scounts), dtype)
        rbuf = np.empty(sum(rcounts), dtype)
        sdis = np.concatenate([[0], np.cumsum(scounts)[:-1]]).astype(int).tolist()
        rdis = np.concatenate([[0], np.cumsum(rcounts)[:-1]]).astype(int).tolist()
        mtype = MPI._typedict[dtype.char]
        row["alltoallv_s"] = _timed(world, lambda: world.Alltoallv([sbuf, scounts, sdis, mtype],
                                                                   [rbuf, rcounts, rdis, mtype]),
                                    args.warmup, args.repeat)
        rows.append(row)
    for cm in comms.values():
        cm.free()
    step = _training_step_share(args, world, backend)
    return {"ranks": P, "dtype": args.dtype, "blas_threads": info.blas_threads, "cores": info.cores,
            "exchanges": rows, "training_step": step}


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
    plans = {"spatial (h=P, dense n=P)": Plan(g.name, P, g.batch, spatial, name="spatial"),
             "data parallel (n=P)": data_parallel(g, P)}
    rng = np.random.default_rng(0)
    x = rng.standard_normal(g[g.input_name].shape).astype(args.dtype)
    y = rng.integers(0, g[g.logits_name].shape[1], size=g.batch)
    comm_cats = ("halo", "redistribution", "allreduce", "batchnorm")
    for label, plan in plans.items():
        dm = DistributedModel(g, plan, world, dtype=np.dtype(args.dtype), seed=0, backend=backend,
                              trace=True, setup=False)
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
def format_tables(results) -> str:
    lines = ["## Exchange throughput (median of the slowest rank; MB/s = bytes between ranks / time)", "",
             "| ranks | exchange | tensor | bytes moved | messages | hpcnn p2p | hpcnn neighbour | Alltoallv | "
             "p2p / Alltoallv time | of which region copy | p2p adjoint |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["exchanges"]:
            mb = r["total_bytes"] / 1e6

            def tp(t):
                return f"{t * 1e3:.2f} ms ({mb / t:,.0f} MB/s)" if t > 0 else "-"
            lines.append(f"| {res['ranks']} | {r['case']} | {'x'.join(map(str, r['shape']))} | "
                         f"{mb:.2f} MB | {r['messages']} | {tp(r['p2p_s'])} | {tp(r['neighbor_s'])} | "
                         f"{tp(r['alltoallv_s'])} | {r['p2p_s'] / r['alltoallv_s']:.2f} | "
                         f"{r['local_copy_s'] * 1e3:.2f} ms | {r['p2p_adjoint_s'] * 1e3:.2f} ms |")
    lines += ["", "## Share of a training step spent communicating", "",
              "| ranks | model | plan | step | communication (mean rank) | share | bytes per step (all ranks) |",
              "|---|---|---|---|---|---|---|"]
    for res in results:
        st = res["training_step"]
        for label, p in st["plans"].items():
            b = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(p["bytes_per_step_all_ranks"].items())
                          if v and k != "scalars")
            lines.append(f"| {res['ranks']} | {st['model']} {st['image_size']}px batch {st['batch']} | {label} | "
                         f"{p['step_s'] * 1e3:.1f} ms | {p['comm_s_mean_rank'] * 1e3:.1f} ms | "
                         f"{p['comm_share'] * 100:.0f}% | {b} |")
    return "\n".join(lines)
