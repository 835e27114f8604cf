"""``hpcnn bench train``: training throughput (images/s) of ResNet-18 at 1
and 2 ranks, side by side with PyTorch in one process and PyTorch
DistributedDataParallel (gloo, localhost) in two.

The command runs in one process and launches every sub-run as a subprocess,
one after the other (hpcnn/bench/train_worker.py does the measuring):

* hpcnn, 1 rank            ``mpiexec -n 1 python -m hpcnn.bench.train_worker hpcnn``
* PyTorch, 1 process       ``python -m hpcnn.bench.train_worker torch``
* hpcnn, 2 ranks, data-parallel plan and the searched plan (rank 0 runs
  hpcnn.strategy.search_plan for ``--machine``, then the ranks run the
  trials a job's ``plan.trials = "auto"`` would and keep the fastest
  candidate; search and trials excluded from the timing)
                           ``mpiexec -n 2 python -m hpcnn.bench.train_worker hpcnn --plan ...``
* PyTorch DDP, 2 processes two ``python -m hpcnn.bench.train_worker torch --rank r --world 2``

Fairness: both frameworks get the same total cores, ``--cores`` (default 2):
at 1 rank one process with that many threads, at 2 ranks two processes with
half as many each (BLAS, OpenMP and hpcnn's host threads limited alike).
The model is the same (ResNet-18 in torchvision's layout; the PyTorch one is
``bench kernels``' torch.nn network, hpcnn/bench/kernels.py, loaded with the
initial weights of hpcnn's SequentialModel), as are the per-rank batch, the image size, the classes, float32,
SGD with momentum, and the data: synthetic random images held in memory (no
data loading).  ``--warmup`` steps are not timed; each timed step starts
after a barrier and counts the slowest rank; throughput is ranks x batch
per rank / the median step time.  With ``--rounds R`` every sub-run is
repeated R times, interleaved, and the medians are taken over all rounds'
steps (so that a burst of load from other processes hits every sub-run).

On a shared machine other processes disturb the timings, the one-process
runs with two threads most (a descheduled thread stalls the other at the
next barrier).  Beside the ratios of the medians the report therefore gives
those of each sub-run's least disturbed round (the round with the lowest
median) and of the fastest steps, the load average around every sub-run,
and, with ``--wait-idle S``, each sub-run starts once the machine's CPUs
are less than ``--idle-below`` busy (or after S seconds).

One difference is intended and stated: hpcnn's batch normalisation uses the
statistics of the global batch (an allreduce per layer), so its 2-rank step
computes exactly the sequential function; DDP's uses each process's own
samples (torch.nn.SyncBatchNorm needs a GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time

from hpcnn.bench.train_worker import RESULT_TAG

RUNS = ("hpcnn-1", "torch-1", "hpcnn-2-dp", "hpcnn-2-search", "ddp-2")
LABELS = {"hpcnn-1": "hpcnn, 1 rank", "torch-1": "PyTorch, 1 process",
          "hpcnn-2-dp": "hpcnn, 2 ranks, data-parallel plan",
          "hpcnn-2-search": "hpcnn, 2 ranks, searched (and trialled) plan",
          "ddp-2": "PyTorch DDP (gloo), 2 processes"}
TARGET_VS_TORCH = 0.5


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=32, help="samples per rank (default 32)")
    p.add_argument("--image-size", type=int, default=64, help="image side (default 64)")
    p.add_argument("--classes", type=int, default=1000, help="classes (default 1000)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per sub-run (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every sub-run this many times, interleaved (default 1)")
    p.add_argument("--cores", type=int, default=2,
                   help="total cores of every configuration: 1 process x CORES threads, "
                        "2 processes x CORES/2 threads (default 2)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--machine", default="local",
                   help="machine description the 2-rank search prices plans with (default local)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before every sub-run, wait up to SECONDS for the other processes on the machine "
                        "to use less than --idle-below of its CPUs (default 0: do not wait)")
    p.add_argument("--idle-below", type=float, default=0.25, metavar="FRACTION",
                   help="busy fraction of all CPUs that counts as idle for --wait-idle (default 0.25)")
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS),
                   help=f"sub-runs to make (default all: {' '.join(RUNS)})")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per sub-run")


def _check(args):
    for k in ("batch", "image_size", "classes", "steps", "rounds", "cores"):
        if getattr(args, k) < 1:
            raise SystemExit(f"hpcnn bench train: --{k.replace('_', '-')} must be at least 1, "
                             f"got {getattr(args, k)}")
    if args.warmup < 0:
        raise SystemExit(f"hpcnn bench train: --warmup must be non-negative, got {args.warmup}")
    if args.cores % 2:
        raise SystemExit(f"hpcnn bench train: --cores must be even (2 processes x CORES/2 threads "
                         f"at 2 ranks), got {args.cores}")
    if args.classes < 2:
        raise SystemExit(f"hpcnn bench train: --classes must be at least 2, got {args.classes}")
    if int(os.environ.get("PMI_SIZE", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        raise SystemExit("hpcnn bench train: run it without mpiexec; it launches mpiexec -n 1 and -n 2 itself")
    from hpcnn.models import ModelError, build_model
    try:
        build_model("resnet18", batch=2 * args.batch, image_size=args.image_size, num_classes=args.classes)
    except ModelError as exc:
        raise SystemExit(f"hpcnn bench train: {exc}") from None


# ---- launching --------------------------------------------------------------------------
def _mpiexec() -> str:
    from hpcnn.launcher import require_mpiexec
    return require_mpiexec("hpcnn bench train")


def _env(threads: int) -> dict:
    from hpcnn.launcher import child_env
    env = child_env()
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "HPCNN_HOST_THREADS"):
        env[v] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_args(args, threads) -> list:
    return ["--batch", str(args.batch), "--image-size", str(args.image_size), "--classes", str(args.classes),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(threads),
            "--lr", str(args.lr), "--momentum", str(args.momentum)]


def _result(run, out: str, err: str, code: int) -> dict:
    lines = [ln for ln in out.splitlines() if ln.startswith(RESULT_TAG)]
    if code != 0 or not lines:
        sys.stderr.write(out[-3000:] + err[-3000:])
        raise SystemExit(f"hpcnn bench train: sub-run {run!r} ({LABELS[run]}) failed (exit {code})")
    return json.loads(lines[-1][len(RESULT_TAG):])


def cpu_busy(interval: float = 2.0) -> float | None:
    """Fraction of all CPUs busy over ``interval`` seconds (Linux
    /proc/stat; None elsewhere).  The bench itself sleeps meanwhile."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)
    try:
        t0, i0 = read()
        time.sleep(interval)
        t1, i1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_idle(limit_s: float, below: float) -> tuple:
    """Wait up to ``limit_s`` seconds until the machine's CPUs are less
    than ``below`` busy; returns (seconds waited, busy fraction at the end)."""
    t0 = time.monotonic()
    busy = cpu_busy()
    while busy is not None and busy >= below and time.monotonic() - t0 < limit_s:
        busy = cpu_busy()
    return time.monotonic() - t0, busy


def run_one(run: str, args) -> dict:
    """Launch one sub-run and return its rank 0's result."""
    worker = [sys.executable, "-m", "hpcnn.bench.train_worker"]
    ranks = 1 if run.endswith("-1") else 2
    threads = args.cores // ranks
    common = _worker_args(args, threads)
    env = _env(threads)
    if run.startswith("hpcnn"):
        plan = ["--plan", "search", "--machine", args.machine] if run.endswith("search") else \
            ["--plan", "data-parallel"]
        cmd = [_mpiexec(), "-n", str(ranks)] + worker + ["hpcnn"] + common + plan
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"hpcnn bench train: sub-run {run!r} did not finish in {args.timeout:.0f} s; "
                             "lower --steps or raise --timeout") from None
        return _result(run, r.stdout, r.stderr, r.returncode)
    port = _free_port()
    procs = []
    for rank in range(ranks):
        cmd = worker + ["torch", "--rank", str(rank), "--world", str(ranks), "--port", str(port)] + common
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs, deadline = [], time.monotonic() + args.timeout
    try:
        for p in procs:
            o, e = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append((o, e, p.returncode))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise SystemExit(f"hpcnn bench train: sub-run {run!r} did not finish in {args.timeout:.0f} s; "
                         "lower --steps or raise --timeout") from None
    for i, (o, e, c) in enumerate(outs[1:], 1):
        if c != 0:
            sys.stderr.write(o[-2000:] + e[-2000:])
            raise SystemExit(f"hpcnn bench train: sub-run {run!r}, process {i}, failed (exit {c})")
    return _result(run, *outs[0])


# ---- combining ----------------------------------------------------------------------------
def _merge(rounds: list) -> dict:
    """One sub-run's results over several rounds: step times pooled."""
    import numpy as np
    best = min(rounds, key=lambda r: r["median_step_s"])
    out = dict(rounds[0])
    out["rank0_seconds_by_part"] = best.get("rank0_seconds_by_part", {})
    times = [t for r in rounds for t in r["step_times_s"]]
    med = float(np.median(times))
    out.update(step_times_s=times, median_step_s=med, min_step_s=float(np.min(times)),
               mean_step_s=float(np.mean(times)), images_per_s=out["ranks"] * out["batch_per_rank"] / med,
               rounds=len(rounds), round_medians_s=[r["median_step_s"] for r in rounds],
               load_average=[r["load_average"] for r in rounds],
               best_round_median_s=min(r["median_step_s"] for r in rounds),
               cpu_busy_before=[r.get("cpu_busy_before") for r in rounds])
    return out


def _ratios(tp: dict) -> dict:
    ratios = {}
    if "hpcnn-1" in tp and "torch-1" in tp:
        ratios["hpcnn_vs_torch_1rank"] = tp["hpcnn-1"] / tp["torch-1"]
    if "hpcnn-1" in tp:
        for k in ("hpcnn-2-dp", "hpcnn-2-search"):
            if k in tp:
                ratios[f"scaling_{k.replace('-', '_')}"] = tp[k] / tp["hpcnn-1"]
    if "torch-1" in tp and "ddp-2" in tp:
        ratios["scaling_ddp_2"] = tp["ddp-2"] / tp["torch-1"]
    for k in ("hpcnn-2-dp", "hpcnn-2-search"):
        if k in tp and "ddp-2" in tp:
            ratios[f"{k.replace('-', '_')}_vs_ddp_2"] = tp[k] / tp["ddp-2"]
    return ratios


def summarise(results: dict) -> dict:
    """Ratios (of the median steps' throughput; of each sub-run's least
    disturbed round's; of the fastest steps'), targets (on the medians) and
    checks from the sub-runs' results (those present)."""
    tp = {k: v["images_per_s"] for k, v in results.items()}
    ratios = _ratios(tp)
    fastest = _ratios({k: v["ranks"] * v["batch_per_rank"] / v["min_step_s"] for k, v in results.items()})
    best = _ratios({k: v["ranks"] * v["batch_per_rank"] / v["best_round_median_s"] for k, v in results.items()})
    checks = {}
    targets = {}
    if "hpcnn_vs_torch_1rank" in ratios:
        targets["hpcnn_vs_torch_1rank_at_least_0.5"] = ratios["hpcnn_vs_torch_1rank"] >= TARGET_VS_TORCH
    if "scaling_ddp_2" in ratios:
        if "scaling_hpcnn_2_dp" in ratios:
            targets["scaling_hpcnn_dp_at_least_ddp"] = ratios["scaling_hpcnn_2_dp"] >= ratios["scaling_ddp_2"]
        if "scaling_hpcnn_2_search" in ratios:
            targets["scaling_hpcnn_search_at_least_ddp"] = (ratios["scaling_hpcnn_2_search"]
                                                            >= ratios["scaling_ddp_2"])
    # the same function: the first step's loss (same weights, same data)
    def rel(a, b):
        la, lb = results[a]["losses"][0], results[b]["losses"][0]
        return abs(la - lb) / max(abs(lb), 1e-12)
    if "hpcnn-1" in results and "torch-1" in results:
        checks["first_loss_rel_diff_hpcnn_torch_1rank"] = rel("hpcnn-1", "torch-1")
    if "hpcnn-2-dp" in results and "hpcnn-2-search" in results:
        checks["first_loss_rel_diff_hpcnn_dp_search_2ranks"] = rel("hpcnn-2-dp", "hpcnn-2-search")
    if "hpcnn-2-dp" in results and "ddp-2" in results:
        checks["first_loss_rel_diff_hpcnn_ddp_2ranks"] = rel("hpcnn-2-dp", "ddp-2")
    return {"ratios": ratios, "ratios_best_round": best, "ratios_fastest_steps": fastest,
            "targets": targets, "checks": checks}


def _machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    cpu = ln.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numpy
    return {"host": platform.node(), "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "numpy": numpy.__version__, "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def format_report(res: dict) -> str:
    cfg = res["config"]
    rounds = f" x {cfg['rounds']} rounds" if cfg["rounds"] > 1 else ""
    lines = [f"## Training throughput: ResNet-18, {cfg['image_size']}x{cfg['image_size']} images, "
             f"{cfg['classes']} classes, batch {cfg['batch_per_rank']} per rank, float32, SGD momentum "
             f"{cfg['momentum']}", "",
             f"Same total cores ({cfg['cores']}): 1 process x {cfg['cores']} threads at 1 rank, "
             f"2 processes x {cfg['cores'] // 2} thread(s) each at 2 ranks. Synthetic data in memory; "
             f"{cfg['warmup']} warm-up steps excluded; median of {cfg['steps']} timed steps{rounds} "
             "(slowest rank per step).", "",
             "| run | ranks x threads | plan | median step | fastest step | images/s | first-step loss |",
             "|---|---|---|---|---|---|---|"]
    for k in RUNS:
        r = res["results"].get(k)
        if r is None:
            continue
        plan = r.get("plan") or ("DDP" if r["ranks"] > 1 else "-")
        if r.get("plan_layer_configs") and r["ranks"] > 1:
            plan += " (" + ", ".join(f"{c}: {n}" for c, n in sorted(r["plan_layer_configs"].items())) + " layers)"
        lines.append(f"| {LABELS[k]} | {r['ranks']} x {r['threads_per_rank']} | {plan} | "
                     f"{r['median_step_s'] * 1e3:.0f} ms | {r['min_step_s'] * 1e3:.0f} ms | "
                     f"{r['images_per_s']:.1f} | {r['losses'][0]:.5f} |")
    s = res["summary"]
    names = {"hpcnn_vs_torch_1rank": "hpcnn / PyTorch at 1 rank (images/s)",
             "scaling_hpcnn_2_dp": "scaling 1 -> 2 ranks, hpcnn data-parallel (throughput(2) / throughput(1))",
             "scaling_hpcnn_2_search": "scaling 1 -> 2 ranks, hpcnn searched plan",
             "scaling_ddp_2": "scaling 1 -> 2 ranks, PyTorch DDP",
             "hpcnn_2_dp_vs_ddp_2": "hpcnn data-parallel / DDP at 2 ranks",
             "hpcnn_2_search_vs_ddp_2": "hpcnn searched / DDP at 2 ranks"}
    lines += ["", "| ratio | median steps | least disturbed round | fastest steps |", "|---|---|---|---|"]
    for k, label in names.items():
        if k in s["ratios"]:
            lines.append(f"| {label} | {s['ratios'][k]:.2f} | {s['ratios_best_round'][k]:.2f} | "
                         f"{s['ratios_fastest_steps'][k]:.2f} |")
    for k, ok in s["targets"].items():
        lines.append(f"| target {k} (median steps) | {'met' if ok else 'MISSED'} | | |")
    for k, v in s["checks"].items():
        lines.append(f"| {k} | {v:.1e} | | |")
    lines += _parts_table(res["results"])
    loads = [x for r in res["results"].values() for pair in r["load_average"] for x in pair if x is not None]
    if loads:
        lines += ["", f"Load average (1 min) at the start and end of the sub-runs: {min(loads):.1f} to "
                      f"{max(loads):.1f} on {res['machine']['cpus']} CPUs ({res['machine']['cpu']})."]
    return "\n".join(lines)


def _parts_table(results) -> list:
    """Where the step goes: rank 0's time per part, ms per step (hpcnn: its
    traced timed steps; PyTorch: one more step under torch.profiler)."""
    runs = [k for k in RUNS if results.get(k, {}).get("rank0_seconds_by_part")]
    if not runs:
        return []
    parts = {k: results[k]["rank0_seconds_by_part"] for k in runs}
    keys = []
    for k in runs:
        for name, sec in parts[k].items():
            if name not in keys and sec >= 0.01 * results[k]["mean_step_s"]:
                keys.append(name)
    keys.sort(key=lambda n: -max(parts[k].get(n, 0.0) for k in runs))
    out = ["", "Where the step goes (rank 0, ms per step, in each sub-run's least disturbed round; "
           "hpcnn: the executor's trace of the timed steps; PyTorch: one more step under torch.profiler, "
           "operators' inclusive CPU time; parts under 1% of every step are summed as 'other ops'):", "",
           "| part | " + " | ".join(LABELS[k] for k in runs) + " |", "|---|" + "---|" * len(runs)]
    for name in keys:
        out.append(f"| {name} | " + " | ".join(f"{parts[k].get(name, 0.0) * 1e3:.0f}" for k in runs) + " |")
    other = [sum(v for n, v in parts[k].items() if n not in keys) for k in runs]
    out.append("| other ops | " + " | ".join(f"{v * 1e3:.0f}" for v in other) + " |")
    return out


def run(args) -> int:
    _check(args)
    runs = [r for r in RUNS if r in args.runs]
    got = {r: [] for r in runs}
    t0 = time.perf_counter()
    for rnd in range(args.rounds):
        for r in runs:
            print(f"hpcnn bench train: round {rnd + 1}/{args.rounds}: {LABELS[r]} ...", file=sys.stderr, flush=True)
            waited, busy = wait_idle(args.wait_idle, args.idle_below) if args.wait_idle > 0 else (0.0, None)
            res = run_one(r, args)
            res.update(waited_s=waited, cpu_busy_before=busy)
            got[r].append(res)
    results = {r: _merge(v) for r, v in got.items()}
    res = {"config": {"model": "resnet18", "batch_per_rank": args.batch, "image_size": args.image_size,
                      "classes": args.classes, "dtype": "float32", "lr": args.lr, "momentum": args.momentum,
                      "cores": args.cores, "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
                      "machine_description": args.machine},
           "machine": _machine(), "command": "hpcnn bench train " + " ".join(sys.argv[3:] if
                                                                              sys.argv[1:3] == ["bench", "train"]
                                                                              else []),
           "results": results, "summary": summarise(results), "wall_s": time.perf_counter() - t0}
    print(format_report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0
