"""The measuring processes of ``hpcnn bench train`` (hpcnn/bench/train.py
launches them; run them by hand only to debug one sub-run).

    mpiexec -n P python -m hpcnn.bench.train_worker hpcnn --plan data-parallel ...
    python -m hpcnn.bench.train_worker torch --rank R --world P --port PORT ...

Both train ResNet-18 with SGD + momentum on synthetic data held in memory:
one global batch of ``P * batch`` random images and labels, drawn from a
seed, of which rank r trains on its own part (hpcnn: this rank's input box
under the plan; PyTorch: samples r*batch .. (r+1)*batch).  Both start from
the same weights (hpcnn's initialisation, copied into the torch.nn model),
so the first step's loss of the two frameworks agrees when they compute the
same function.

Each timed step starts after a barrier; its time is the slowest rank's.
Rank 0 prints one line ``HPCNN_BENCH_TRAIN {json}`` with the step times.
torch is imported only inside the torch functions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

RESULT_TAG = "HPCNN_BENCH_TRAIN "


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m hpcnn.bench.train_worker",
                                description="one sub-run of hpcnn bench train")
    p.add_argument("framework", choices=["hpcnn", "torch"])
    p.add_argument("--batch", type=int, default=32, help="samples per rank")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=1, help="compute threads per process")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    # hpcnn
    p.add_argument("--plan", default="data-parallel",
                   help="hpcnn: data-parallel, search, or a plan JSON file")
    p.add_argument("--machine", default="local", help="hpcnn --plan search: machine description")
    p.add_argument("--trials", default="auto",
                   help="hpcnn --plan search: plan.trials as a job has it (an integer, or auto: the default, "
                        "trials when a baseline is predicted within 25%% of the searched plan)")
    # torch
    p.add_argument("--rank", type=int, default=0, help="torch: this process's rank")
    p.add_argument("--world", type=int, default=1, help="torch: number of processes")
    p.add_argument("--port", type=int, default=29500, help="torch: gloo rendezvous port on 127.0.0.1")
    return p.parse_args(argv)


def synthetic_batch(world, batch, image_size, classes, seed):
    """The global batch (images float32 NCHW, int64 labels) every rank draws
    alike and then cuts its own part from."""
    import numpy as np
    rng = np.random.default_rng([seed, 12345])
    x = rng.standard_normal((world * batch, 3, image_size, image_size), dtype=np.float32)
    y = rng.integers(0, classes, size=world * batch).astype(np.int64)
    return x, y


def limit_threads(n):
    """Every thread pool hpcnn's NumPy work may use: BLAS and the host
    threads of the memory-bound kernels."""
    from hpcnn.backend import limit_blas_threads
    from hpcnn.ops.host_threads import set_host_threads
    limit_blas_threads(n)
    set_host_threads(n)


def summarise(times, world, batch, load_before):
    import numpy as np
    t = np.asarray(times, dtype=float)
    med = float(np.median(t))
    return {"step_times_s": [float(v) for v in t], "median_step_s": med, "min_step_s": float(t.min()),
            "mean_step_s": float(t.mean()), "images_per_s": world * batch / med,
            "load_average": [load_before, _load()]}


def _load():
    """1-minute load average of the machine (other processes disturb the
    timings; the report records it)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


# ---- hpcnn ----------------------------------------------------------------------------
def run_hpcnn(a) -> dict:
    import numpy as np
    from mpi4py import MPI

    from hpcnn.models import build_model
    from hpcnn.runtime.executor import DistributedModel
    from hpcnn.runtime.sgd import SGD
    from hpcnn.strategy.baselines import data_parallel
    from hpcnn.strategy.plan import Plan

    world = MPI.COMM_WORLD
    P, me = world.Get_size(), world.Get_rank()
    limit_threads(a.threads)
    g = build_model("resnet18", batch=P * a.batch, image_size=a.image_size, num_classes=a.classes)
    search_s, trials = None, None
    if a.plan == "data-parallel":
        plan = data_parallel(g, P)
    elif a.plan == "search":
        plan, search_s, trials = _searched_and_trialled(a, world, g)
    else:
        plan = Plan.load(a.plan)
    dm = DistributedModel(g, plan, world, dtype=np.float32, seed=a.seed, setup=False, trace=True)
    x, y = synthetic_batch(P, a.batch, a.image_size, a.classes, a.seed)
    box = dm.input_box()
    xt = np.ascontiguousarray(x[box.slices()]) if box is not None else None
    opt = SGD(lr=a.lr, momentum=a.momentum)
    losses, times, parts = [], [], {}
    load = _load()
    for s in range(a.warmup + a.steps):
        dm.events = []
        world.Barrier()
        t0 = time.perf_counter()
        loss = dm.train_step(xt, y, opt, step=s)
        own = time.perf_counter() - t0
        dt = world.allreduce(own, op=MPI.MAX)
        losses.append(loss)
        if s >= a.warmup:
            times.append(dt)
            _add_parts(parts, dm.events, g, own, a.steps)
    configs = {}
    for c in plan.configs.values():
        k = ",".join(f"{d}={v}" for d, v in sorted(c.items()) if v > 1) or "1"
        configs[k] = configs.get(k, 0) + 1
    out = {"framework": "hpcnn", "ranks": P, "threads_per_rank": a.threads,
           "plan": plan.name or a.plan, "plan_layer_configs": configs, "search_s": search_s,
           "params": int(g.num_params()), "losses": losses,
           "rank0_seconds_by_part": dict(sorted(parts.items(), key=lambda kv: -kv[1]))}
    if trials is not None:
        out["trials"] = trials
    out.update(summarise(times, P, a.batch, load))
    dm.free()
    return out


def _searched_and_trialled(a, world, g):
    """(plan, search seconds, trials or None): rank 0 searches with
    ``--machine``; then, as a job with ``plan.mode = "search"`` does
    (``plan.trials``, here ``--trials``), every rank times the candidates
    the search's report calls for on this run's batch and keeps the
    fastest (``hpcnn.runtime.plan_trials``).  Neither the search nor the
    trials are in the timed steps."""
    import numpy as np

    from hpcnn.runtime.plan_trials import Candidate, candidates, fastest, run_trials, trials_wanted
    from hpcnn.runtime.sgd import SGD
    from hpcnn.strategy.plan import Plan
    me, P = world.Get_rank(), world.Get_size()
    setting = a.trials if a.trials == "auto" else int(a.trials)
    payload = None
    t0 = time.perf_counter()
    if me == 0:
        from hpcnn.strategy import search_plan
        plan, rep = search_plan(g, P, a.machine)
        search_s = time.perf_counter() - t0
        k = trials_wanted(setting, rep, plan, 0.25)
        base = {n: Plan(g.name, P, g.batch, b["configs"], name=n) for n, b in rep.get("baselines", {}).items()}
        cands = [(c.name, c.plan.to_json(), c.predicted_s) for c in candidates(plan, rep, base, k)] if k else []
        payload = (plan.to_json(), search_s, cands)
    text, search_s, cands = world.bcast(payload, root=0)
    plan = Plan.from_json(text)
    if len(cands) < 2:
        return plan, search_s, None
    cands = [Candidate(n, Plan.from_json(t), p) for n, t, p in cands]
    x, y = synthetic_batch(P, a.batch, a.image_size, a.classes, a.seed)
    run_trials(world, g, cands, lambda box, i: (None if box is None else np.ascontiguousarray(x[box.slices()]), y),
               lambda: SGD(lr=a.lr, momentum=a.momentum), dtype=np.float32, seed=a.seed)
    best = fastest(cands)
    chosen = Plan(g.name, P, g.batch, best.plan.configs, best.plan.ranks, name=f"searched, trials chose {best.name}")
    return chosen, search_s, {"chosen": best.name,
                              "candidates": [{"name": c.name, "predicted_s": c.predicted_s,
                                              "measured_s": c.measured_s, "steps_s": c.steps_s} for c in cands]}


def _add_parts(parts, events, graph, step_s, steps):
    """Add one step's traced time per part (computation per op kind and
    direction, communication per category; the rest: optimiser and Python)
    to ``parts``, averaged over ``steps``."""
    traced = 0.0
    nested = {}          # batch-norm statistics reduced inside the op's own event
    for cat, node, t0, t1 in events:
        dt = t1 - t0
        if cat in ("forward", "backward"):
            key = f"{graph[node].kind} {cat}"
            dt -= nested.pop(node, 0.0)
        else:
            key = f"communication: {cat}"
            if cat == "batchnorm":
                nested[node] = nested.get(node, 0.0) + dt
        parts[key] = parts.get(key, 0.0) + dt / steps
        traced += dt
    parts["optimiser and the rest"] = parts.get("optimiser and the rest", 0.0) + (step_s - traced) / steps


# ---- PyTorch ----------------------------------------------------------------------------
# The peer network is the one `hpcnn bench kernels` uses (hpcnn/bench/kernels.py:
# torch.nn, torchvision's ResNet-18 structure, hpcnn's node names), loaded
# with the initial weights of hpcnn's SequentialModel for the same seed.


# torch.profiler operators (inclusive CPU time) of the parts hpcnn's trace names
_TORCH_PARTS = {"aten::convolution": "conv2d forward", "aten::convolution_backward": "conv2d backward",
                "aten::native_batch_norm": "batchnorm forward",
                "aten::native_batch_norm_backward": "batchnorm backward",
                "aten::relu_": "relu forward", "aten::relu": "relu forward", "aten::threshold_backward": "relu backward",
                "aten::max_pool2d_with_indices": "maxpool2d forward",
                "aten::max_pool2d_with_indices_backward": "maxpool2d backward",
                "aten::addmm": "linear forward", "aten::mm": "linear backward",
                "Optimizer.step#SGD.step": "optimiser"}


def _torch_parts(step, record: bool) -> dict:
    """One more (untimed) step, under torch.profiler where ``record``: CPU
    seconds of the operators that match hpcnn's parts, the rest apart.
    Every rank takes the step (DDP's collectives need them all)."""
    if not record:
        step()
        return {}
    from torch.profiler import ProfilerActivity, profile
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    total = time.perf_counter() - t0
    parts = {}
    for e in prof.key_averages():
        name = _TORCH_PARTS.get(e.key)
        if name is not None:
            parts[name] = parts.get(name, 0.0) + e.cpu_time_total / 1e6
    parts["optimiser and the rest"] = total - sum(parts.values()) + parts.pop("optimiser", 0.0)
    return dict(sorted(parts.items(), key=lambda kv: -kv[1]))


def run_torch(a) -> dict:
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from hpcnn.backend import Backend
    from hpcnn.bench.kernels import copy_weights_to_torch, torch_resnet18
    from hpcnn.models import build_model
    from hpcnn.runtime.sequential import SequentialModel

    torch.set_num_threads(a.threads)
    P, me = a.world, a.rank
    if P > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=me, world_size=P)
    model = torch_resnet18(torch, a.classes)
    g = build_model("resnet18", batch=a.batch, image_size=a.image_size, num_classes=a.classes)
    init = SequentialModel(g, dtype=np.float32, seed=a.seed, backend=Backend("numpy"))
    if not copy_weights_to_torch(torch, model, init):
        raise RuntimeError("the torch peer's parameters do not line up with hpcnn's resnet18")
    del init
    n_params = sum(p.numel() for p in model.parameters())
    if P > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    model.train()
    x, y = synthetic_batch(P, a.batch, a.image_size, a.classes, a.seed)
    xt = torch.from_numpy(np.ascontiguousarray(x[me * a.batch:(me + 1) * a.batch]))
    yt = torch.from_numpy(y[me * a.batch:(me + 1) * a.batch])
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum)
    losses, times = [], []
    load = _load()

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
        return loss

    for s in range(a.warmup + a.steps):
        if P > 1:
            dist.barrier()
        t0 = time.perf_counter()
        loss = train_step()
        dt = time.perf_counter() - t0
        lv = float(loss.detach())
        if P > 1:
            red = torch.tensor([dt, lv], dtype=torch.float64)
            mx = red.clone()
            dist.all_reduce(mx, op=dist.ReduceOp.MAX)
            dist.all_reduce(red, op=dist.ReduceOp.SUM)
            dt, lv = float(mx[0]), float(red[1]) / P
        losses.append(lv)
        if s >= a.warmup:
            times.append(dt)
    parts = _torch_parts(lambda: train_step(), me == 0)
    out = {"framework": "torch" if P == 1 else "torch-ddp", "ranks": P, "threads_per_rank": a.threads,
           "backend": "gloo" if P > 1 else None, "params": int(n_params), "losses": losses,
           "torch_version": torch.__version__, "rank0_seconds_by_part": parts}
    out.update(summarise(times, P, a.batch, load))
    if P > 1:
        dist.destroy_process_group()
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.framework == "hpcnn":
        res = run_hpcnn(a)
        from mpi4py import MPI
        rank = MPI.COMM_WORLD.Get_rank()
    else:
        res = run_torch(a)
        rank = a.rank
    if rank == 0:
        res.update(batch_per_rank=a.batch, image_size=a.image_size, classes=a.classes,
                   warmup=a.warmup, steps=a.steps)
        print(RESULT_TAG + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
