"""``hpcnn bench model``: the cost model's predicted iteration time against
the measured one, for several plans at several rank counts (the paper's
Table 4 on this machine).

Plans (at P ranks; at 1 rank they are all the sequential program, measured
once; a plan equal to another is measured once and listed under both names):

  data-parallel  every layer split over samples on min(P, batch) ranks
                 (hpcnn.strategy.baselines, as hpcnn train's plan.mode)
  owt            data-parallel images, channel-parallel fully connected
  model-parallel channels everywhere (samples for the loss)
  searched       the plan ``hpcnn plan`` finds with the machine file
  spatial-h      image layers split over height, the rest over samples
  spatial-hw     image layers split over height and width (width alone at 2)
  mixed          image layers split over samples and height, dense layers over
                 channels (at 2 ranks: samples, then height in the second half)

Run it alone (it launches ``mpiexec -n P`` for every P of ``--ranks``) or
under your own launcher (``mpiexec -n 4 hpcnn bench model``: that world size
only).

Measured: every plan runs ``--warmup`` untimed training steps, then the
plans take turns, ``--rounds`` rounds of ``--iters`` timed steps each.  A step's time is the
slowest rank's, from a barrier to the end of its optimiser update; the
measured figure is the median over all timed steps.

Predicted: ``plan_pricing.price_plan(model, plan).total``.  The cost model needs this
machine's figures for jobs of P ranks (``RuntimeFigures``: op tiles timed
with all ranks computing, and the executor, exchange and allreduce figures
fitted to synthetic networks, see hpcnn/calibration/runtime_sampler.py and
hpcnn/strategy/runtime_fit.py).  By
default they are measured in this run, as the paper profiles each layer on
the device before predicting: ``--calibration-rounds`` rounds of the
calibration's pieces (tiles of this run's plans, steps of the synthetic
networks) are spread evenly between the plans' timed steps, so that the
machine's load -- shared with other work -- is the same for calibration and
measurement; the pooled measurements (medians) are fitted once at the end.  The synthetic networks are not the
benchmarked model, and no measured step of a benchmarked plan enters the
prediction.  ``--no-profile`` predicts from ``--machine`` alone (its
``hpcnn calibrate`` figures, taken at another time and load); the table
shows that prediction beside the other.  Error = (predicted - measured) /
measured, as in the paper's Table 4.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from hpcnn.runtime.plan_trials import add_trial_arguments, trial_argv

RESULT_TAG = "HPCNN_BENCH_MODEL "
_LAUNCHED_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS",
                  "HYDI_CONTROL_FD")
PLAN_NAMES = ("data-parallel", "owt", "model-parallel", "searched", "spatial-h", "spatial-hw", "mixed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet_small", help="model (default resnet_small)")
    p.add_argument("--image-size", type=int, default=32, help="input side (default 32)")
    p.add_argument("--batch", type=int, default=32, help="global mini-batch (default 32)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4],
                   help="world sizes to launch when run without mpiexec (default: 1 2 4)")
    p.add_argument("--plans", nargs="+", default=list(PLAN_NAMES), choices=PLAN_NAMES, metavar="PLAN",
                   help=f"plans to run (default: all of {' '.join(PLAN_NAMES)})")
    p.add_argument("--machine", default="local",
                   help="machine file the predictions use (default: local, the calibrated file)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per plan (default 3)")
    p.add_argument("--iters", type=int, default=2, help="timed steps per plan and round (default 2)")
    p.add_argument("--rounds", type=int, default=10, help="rounds over the plans (default 10)")
    p.add_argument("--calibration-rounds", type=int, default=4,
                   help="rounds of the calibration's measurements spread over the run (default 4)")
    p.add_argument("--no-profile", action="store_true",
                   help="predict from the machine file alone; by default the run also measures this "
                        "machine's figures for P ranks (op tiles of the plans, synthetic networks; "
                        "hpcnn.calibration.runtime_sampler), interleaved with the timed steps so that "
                        "calibration and measurement share the machine's load")
    p.add_argument("--detail", action="store_true",
                   help="also print predicted against measured time per category (compute, "
                        "exchanges, allreduce, ...) from the executor's trace")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run the whole benchmark N times (at different moments of the machine's "
                        "load) and report per row the medians over the runs, and each run's error "
                        "(default 1)")
    p.add_argument("--trials", type=int, default=0, metavar="K",
                   help="after the warm-up, time the K cheapest candidates the machine file predicts among "
                        "the searched plan and the baselines, and data parallelism, for --trial-steps steps "
                        "each, as a job's plan.trials does, and report which one the trials choose (the "
                        "searched and trialled plan); its figure is then measured with the others "
                        "(default 0: no trials)")
    add_trial_arguments(p, "steps per trial (default 3)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also plot predicted against measured iteration time (matplotlib)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds allowed per mpiexec launch")


def _launched() -> bool:
    return any(v in os.environ for v in _LAUNCHED_VARS)


def run(args) -> int:
    if not _launched():
        return _launch_all(args)
    from mpi4py import MPI
    result = _measure(args)
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(RESULT_TAG + json.dumps(result), flush=True)
        if os.environ.get("HPCNN_BENCH_INNER") != "1":
            _report([[result]], args)
    return 0


# ---- launcher ---------------------------------------------------------------------------
def _mpiexec() -> str:
    from hpcnn.launcher import require_mpiexec
    return require_mpiexec("hpcnn bench model", " or launch it yourself: mpiexec -n 4 hpcnn bench model")


def _passthrough(args) -> list:
    out = ["--model", args.model, "--image-size", str(args.image_size), "--batch", str(args.batch),
           "--machine", args.machine, "--dtype", args.dtype, "--warmup", str(args.warmup),
           "--iters", str(args.iters), "--rounds", str(args.rounds),
           "--calibration-rounds", str(args.calibration_rounds), "--trials", str(args.trials),
           *trial_argv(args), "--plans"] + list(args.plans)
    if args.detail:
        out.append("--detail")
    if args.no_profile:
        out.append("--no-profile")
    return out


def _launch_all(args) -> int:
    runs = []
    from hpcnn.launcher import child_env
    env = child_env(HPCNN_BENCH_INNER="1")
    for k in range(max(1, args.repeat)):
        results = []
        for p in args.ranks:
            cmd = [_mpiexec(), "-n", str(p), sys.executable, "-m", "mpi4py", "-m", "hpcnn", "bench",
                   "model"] + _passthrough(args)
            print(f"hpcnn bench model: run {k + 1} of {args.repeat}, {p} rank(s) ...", file=sys.stderr,
                  flush=True)
            try:
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                raise SystemExit(f"hpcnn bench model: {p} ranks did not finish in {args.timeout:.0f} s; "
                                 "lower --rounds or --iters, or raise --timeout")
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith(RESULT_TAG)]
            if r.returncode != 0 or not lines:
                sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
                raise SystemExit(f"hpcnn bench model: the run on {p} ranks failed (exit {r.returncode})")
            results.append(json.loads(lines[-1][len(RESULT_TAG):]))
        runs.append(results)
        if args.repeat > 1:
            print(f"run {k + 1}:", file=sys.stderr)
            print(format_table(results), file=sys.stderr, flush=True)
    _report(runs, args)
    return 0


# ---- plans ------------------------------------------------------------------------------
def _fit(n, P, want):
    from hpcnn.strategy.config_space import fit_config
    return fit_config(n.shape, n.op.splittable, P, want)


def make_plans(g, P, machine, names=PLAN_NAMES) -> dict:
    """{name: Plan} of the benchmark at P ranks (see the module text)."""
    from hpcnn.strategy.baselines import data_parallel, model_parallel, owt
    from hpcnn.strategy.plan import Plan
    from hpcnn.strategy.planner import search_plan

    order = {n.name: i for i, n in enumerate(g)}
    half = len(order) // 2

    def custom(name, rule):
        return Plan(g.name, P, g.batch, {n.name: _fit(n, P, rule(n)) for n in g}, name=name)

    def spatial_h(n):
        return {"h": P} if len(n.shape) == 4 else {"n": P}

    def spatial_hw(n):
        if len(n.shape) != 4:
            return {"n": P}
        if P >= 4 and P % 2 == 0:
            return {"h": 2, "w": P // 2}
        return {"w": P}

    def mixed(n):
        if len(n.shape) == 4:
            if P >= 4 and P % 2 == 0:
                return {"n": 2, "h": P // 2}
            return {"n": P} if order[n.name] < half else {"h": P}
        if n.kind == "linear":
            return {"c": P}
        return {"n": P}

    def searched(name):
        plan, _ = search_plan(g, P, machine, with_baselines=False)
        plan.name = name
        return plan
    build = {"data-parallel": lambda name: data_parallel(g, P), "owt": lambda name: owt(g, P),
             "model-parallel": lambda name: model_parallel(g, P), "searched": searched,
             "spatial-h": lambda name: custom(name, spatial_h),
             "spatial-hw": lambda name: custom(name, spatial_hw), "mixed": lambda name: custom(name, mixed)}
    return {name: build[name](name) for name in names}


# ---- the measurement (collective) --------------------------------------------------------
COMM_CATS = ("halo", "redistribution", "allreduce", "batchnorm")


def _measure(args) -> dict:
    import copy

    import numpy as np
    from mpi4py import MPI

    from hpcnn.backend import Backend
    from hpcnn.calibration.runtime_sampler import Sampler, interleave
    from hpcnn.calibration.tiles import plan_tile_jobs
    from hpcnn.models import build_model
    from hpcnn.runtime.executor import DistributedModel
    from hpcnn.runtime.node_setup import setup_node
    from hpcnn.runtime.sgd import SGD
    from hpcnn.strategy.cost_model import CostModel
    from hpcnn.strategy.plan_pricing import price_plan
    from hpcnn.strategy.machine import Machine
    from hpcnn.strategy.runtime_fit import fit_samples

    world = MPI.COMM_WORLD
    P, me = world.Get_size(), world.Get_rank()
    backend = Backend("numpy")
    info = setup_node(world, backend, verbose=False)
    machine = Machine.load(args.machine)
    g = build_model(args.model, batch=args.batch, image_size=args.image_size)
    dtype = np.dtype(args.dtype)
    plans = make_plans(g, P, machine, args.plans) if me == 0 else None
    plans = world.bcast(plans, root=0)
    # identical plans (all of them at 1 rank) are measured once
    unique, alias = {}, {}
    for name, plan in plans.items():
        key = json.dumps(plan.configs, sort_keys=True)
        alias.setdefault(key, []).append(name)
        unique.setdefault(key, plan)
    jobs = plan_tile_jobs(g, list(unique.values()), dtype)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(g[g.input_name].shape).astype(dtype)
    y = g.random_labels(rng)
    runs = []
    for key, plan in unique.items():
        dm = DistributedModel(g, plan, world, dtype=dtype, seed=0, backend=backend, setup=False,
                              trace=args.detail)
        box = dm.input_box()
        xt = x[box.slices()] if box is not None else None
        runs.append(dict(key=key, plan=plan, dm=dm, xt=xt, sgd=SGD(lr=0.01, momentum=0.9),
                         times=[], cats=[], step=0))
    for r in runs:
        for _ in range(args.warmup):
            r["dm"].train_step(r["xt"], y, r["sgd"], step=r["step"])
            r["step"] += 1
    file_model = CostModel(g, P, machine, dtype=args.dtype) if me == 0 else None
    trials = _trials(args, world, runs, alias, file_model, y) if args.trials and P > 1 else None

    def timed(r):
        dm = r["dm"]
        for _ in range(args.iters):
            dm.events = []
            world.Barrier()
            t0 = time.perf_counter()
            dm.train_step(r["xt"], y, r["sgd"], step=r["step"])
            dt = time.perf_counter() - t0
            r["step"] += 1
            r["times"].append(world.allreduce(dt, op=MPI.MAX))
            if args.detail:
                cat, lay = {}, {}
                for c, node, ta, tb in dm.events:
                    cat[c] = cat.get(c, 0.0) + (tb - ta)
                    if c in ("forward", "backward"):
                        lay[node] = lay.get(node, 0.0) + (tb - ta)
                r["cats"].append(cat)
                r.setdefault("layers", []).append(lay)

    sampler = None if args.no_profile else Sampler(world, jobs, args.dtype, steps=2)
    # the plans take turns, round after round; the calibration's pieces are
    # spread evenly between them, so both sample the same stretch of time
    mine = [lambda r=r: timed(r) for _ in range(args.rounds) for r in runs]
    cal = sampler.work(args.calibration_rounds, chunks=8) if sampler is not None else []
    for w in interleave(mine, cal):
        w()
    samples = sampler.samples() if sampler is not None else None
    if sampler is not None:
        sampler.free()
    rows = []
    profile = None
    if samples and me == 0:
        # the figures of all rounds' samples pooled (medians), then fitted
        rf, fit = fit_samples(machine, samples, args.dtype, (machine.measured or {}).get("ops"))
        mr = copy.copy(machine)
        mr.runtime = dict(machine.runtime)
        mr.runtime[P] = rf
        prof_model = CostModel(g, P, mr, dtype=args.dtype)
        profile = {k: v for k, v in rf.to_dict().items() if k != "ops"}
        profile.update(fit=fit, load_average=samples["load_average"])
    for r in runs:
        cats = layers = None
        if args.detail:
            # per category, and per layer (its forward + backward compute):
            # median over steps of the mean over ranks
            allc = world.gather(r["cats"], root=0)
            alll = world.gather(r.get("layers", []), root=0)
            if me == 0:
                cats, layers = ({c: float(np.median([np.mean([per[s].get(c, 0.0) for per in every])
                                                     for s in range(len(every[0]))]))
                                 for c in sorted({c for per in every for st in per for c in st})}
                                for every in (allc, alll))
        r["dm"].free()
        if me != 0:
            continue
        pf = price_plan(file_model, r["plan"], r["plan"].name)
        pc = price_plan(prof_model, r["plan"], r["plan"].name) if profile is not None else pf
        measured = float(np.median(r["times"]))
        row = {"ranks": P, "plans": alias[r["key"]], "plan": r["plan"].to_dict(),
               "predicted_s": pc.total, "measured_s": measured,
               "error": (pc.total - measured) / measured,
               "predicted_file_s": pf.total, "error_file": (pf.total - measured) / measured,
               "measured_steps_s": [float(t) for t in r["times"]],
               "predicted_parts_s": {"t_c": pc.t_c, "t_s": pc.t_s, "t_x": pc.t_x, "t_o": pc.t_o}}
        if cats is not None:
            row["measured_categories_s"] = cats
            row["measured_layers_s"] = layers
            row["predicted_layers"] = pc.rows
        if trials is not None:
            row["trialled"] = r["key"] == trials["chosen_key"]
        rows.append(row)
    out = {"ranks": P, "model": args.model, "image_size": args.image_size, "batch": args.batch,
           "dtype": args.dtype, "machine": args.machine, "profiled": not args.no_profile,
           "blas_threads": info.blas_threads, "cores": info.cores,
           "load_average": list(os.getloadavg()), "profile": profile, "rows": rows}
    if trials is not None:
        out["trials"] = {k: v for k, v in trials.items() if k != "chosen_key"}
    return out


def _trials(args, world, runs, alias, file_model, y) -> dict:
    """The plan a job's trials would choose (collective): the ``--trials``
    cheapest plans the machine file predicts among the searched plan and
    the baselines, and data parallelism, ``--trial-steps`` steps each (the
    slowest rank's, from a barrier), those not told apart timed again for
    up to ``--trial-rounds`` rounds, the fastest kept (the searched plan
    unless another is faster by more than ``--trial-margin``), as
    ``hpcnn.runtime.plan_trials`` does in a job."""
    import statistics

    from mpi4py import MPI

    from hpcnn.runtime.plan_trials import Candidate, fastest, time_in_rounds
    from hpcnn.strategy.plan_pricing import price_plan
    pool = ("searched", "data-parallel", "owt", "model-parallel")
    order = None
    if world.Get_rank() == 0:
        pred = {i: price_plan(file_model, r["plan"]).total for i, r in enumerate(runs)
                if set(alias[r["key"]]) & set(pool)}
        ranked = sorted(pred, key=lambda i: (pred[i], "searched" not in alias[runs[i]["key"]]))
        order = ranked[:args.trials]
        dp = [i for i in ranked if "data-parallel" in alias[runs[i]["key"]]]
        if dp and dp[0] not in order:
            order.append(dp[0])
        order = [(i, pred[i]) for i in order]
    order = world.bcast(order, root=0)
    cands = []
    for i, pred in order:
        names = alias[runs[i]["key"]]
        c = Candidate("searched" if "searched" in names else names[0], i, pred)
        cands.append(c)

    def time_one(c):
        r = runs[c.plan]
        for _ in range(args.trial_steps):
            world.Barrier()
            t0 = time.perf_counter()
            r["dm"].train_step(r["xt"], y, r["sgd"], step=r["step"])
            c.steps_s.append(world.allreduce(time.perf_counter() - t0, op=MPI.MAX))
            r["step"] += 1
        c.measured_s = statistics.median(c.steps_s)
        c.rounds += 1

    time_in_rounds(cands, time_one, args.trial_rounds)
    best = fastest(cands, args.trial_margin)
    out = [{"plans": alias[runs[c.plan]["key"]], "predicted_file_s": c.predicted_s, "steps_s": c.steps_s,
            "measured_s": c.measured_s, "rounds": c.rounds} for c in cands]
    return {"candidates": out, "chosen": alias[runs[best.plan]["key"]], "chosen_key": runs[best.plan]["key"],
            "steps": args.trial_steps, "rounds": max(c.rounds for c in cands), "margin": args.trial_margin}


# ---- report ----------------------------------------------------------------------------------
def summary(results, key="error") -> dict:
    """Median and largest |error| over the rows (``key``: 'error' for the
    prediction with this run's figures, 'error_file' for the machine file's)."""
    import numpy as np
    errs = [abs(r[key]) for res in results for r in res["rows"]]
    return {"rows": len(errs), "median_abs_error": float(np.median(errs)) if errs else None,
            "max_abs_error": float(max(errs)) if errs else None,
            "within_15": sum(e <= 0.15 for e in errs), "within_10": sum(e <= 0.10 for e in errs)}


def plan_label(r) -> str:
    return ", ".join(r["plans"]) if len(r["plans"]) < 3 else "every plan (one program at 1 rank)"


def format_table(results) -> str:
    profiled = any(res.get("profiled") for res in results)
    multi = any("runs_error" in r for res in results for r in res["rows"])
    if profiled:
        head = ["ranks", "plan", "predicted", "measured", "error"]
        head += (["each run's error (their median)"] if multi else [])
        head += ["predicted from the machine file alone", "error"]
    else:
        head = ["ranks", "plan", "predicted (machine file)", "measured", "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        for r in res["rows"]:
            cells = [str(res["ranks"]), plan_label(r) + (" (trialled)" if r.get("trialled") else "")]
            if profiled:
                cells += [f"{r['predicted_s'] * 1e3:.1f} ms", f"{r['measured_s'] * 1e3:.1f} ms",
                          f"{r['error'] * 100:+.1f}%"]
                if multi:
                    cells.append(" ".join(f"{e * 100:+.0f}" for e in r["runs_error"])
                                 + f" ({r['median_run_error'] * 100:+.1f}%)")
                cells += [f"{r['predicted_file_s'] * 1e3:.1f} ms", f"{r['error_file'] * 100:+.1f}%"]
            else:
                cells += [f"{r['predicted_file_s'] * 1e3:.1f} ms", f"{r['measured_s'] * 1e3:.1f} ms",
                          f"{r['error_file'] * 100:+.1f}%"]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    keys = ([("error", "predicted")] if profiled else []) + [("error_file", "machine file alone")]
    if multi and profiled:
        keys.insert(1, ("median_run_error", "median of each run's error"))
    for key, what in keys:
        sm = summary(results, key)
        if sm["rows"]:
            lines.append(f"{what}: |error| median {sm['median_abs_error'] * 100:.1f}%, max "
                         f"{sm['max_abs_error'] * 100:.1f}%; {sm['within_10']} of {sm['rows']} within 10%, "
                         f"{sm['within_15']} within 15%")
    return "\n".join(lines)


def format_detail(results) -> str:
    lines = ["| ranks | plan | compute predicted / traced | exchanges | synchronisation | executor |",
             "|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            if "measured_categories_s" not in r:
                continue
            m = r["measured_categories_s"]
            p = r["predicted_parts_s"]
            # the traced forward includes the batch-norm reductions it waits in
            fb = m.get("forward", 0) + m.get("backward", 0) - m.get("batchnorm", 0)
            ex = m.get("halo", 0) + m.get("redistribution", 0)
            sy = m.get("allreduce", 0) + m.get("batchnorm", 0)
            lines.append(f"| {res['ranks']} | {plan_label(r)} | {p['t_c'] * 1e3:.1f} / {fb * 1e3:.1f} ms | "
                         f"{p['t_x'] * 1e3:.1f} / {ex * 1e3:.1f} ms | {p['t_s'] * 1e3:.1f} / {sy * 1e3:.1f} ms | "
                         f"{p['t_o'] * 1e3:.1f} ms / - |")
    return "\n".join(lines)


def combine(runs) -> list:
    """Per world size, the rows of several runs merged by plan: predicted and
    measured are the medians over the runs (the error is computed from those
    medians); every run's own figures are kept beside them, and since a
    run's prediction and measurement are paired (the same stretch of the
    machine's load), also the median of the runs' own errors.  ``runs``: a
    list of runs, each a list of per-world-size results."""
    import numpy as np
    if len(runs) == 1:
        return runs[0]
    out = []
    for res0 in runs[0]:
        P = res0["ranks"]
        merged = dict(res0, rows=[], runs=len(runs),
                      load_average=[res["load_average"] for run in runs for res in run if res["ranks"] == P])
        for row0 in res0["rows"]:
            same = [r for run in runs for res in run if res["ranks"] == P for r in res["rows"]
                    if r["plans"] == row0["plans"]]
            pred = float(np.median([r["predicted_s"] for r in same]))
            meas = float(np.median([r["measured_s"] for r in same]))
            pfile = float(np.median([r["predicted_file_s"] for r in same]))
            merged["rows"].append(dict(row0, predicted_s=pred, measured_s=meas, error=(pred - meas) / meas,
                                       predicted_file_s=pfile, error_file=(pfile - meas) / meas,
                                       runs_predicted_s=[r["predicted_s"] for r in same],
                                       runs_measured_s=[r["measured_s"] for r in same],
                                       runs_error=[r["error"] for r in same],
                                       trialled_runs=sum(bool(r.get("trialled")) for r in same),
                                       trialled=2 * sum(bool(r.get("trialled")) for r in same) > len(same),
                                       median_run_error=float(np.median([r["error"] for r in same]))))
        out.append(merged)
    return out


def plot(results, path) -> None:
    """Predicted against measured iteration time, one marker per plan and
    world size, with the 10% and 15% bands."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 5))
    pts = [(r["measured_s"] * 1e3, r["predicted_s"] * 1e3) for res in results for r in res["rows"]]
    lo, hi = min(min(p) for p in pts) * 0.8, max(max(p) for p in pts) * 1.2
    xs = [lo, hi]
    ax.plot(xs, xs, "k-", lw=1, label="predicted = measured")
    for f, st in ((0.10, ":"), (0.15, "--")):
        ax.plot(xs, [x * (1 + f) for x in xs], "k" + st, lw=0.8, label=f"±{f:.0%}")
        ax.plot(xs, [x * (1 - f) for x in xs], "k" + st, lw=0.8)
    for res, mk in zip(results, "osD^v"):
        ax.plot([r["measured_s"] * 1e3 for r in res["rows"]], [r["predicted_s"] * 1e3 for r in res["rows"]],
                mk, label=f"{res['ranks']} rank{'s' if res['ranks'] > 1 else ''}", alpha=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured iteration (ms)")
    ax.set_ylabel("predicted iteration (ms)")
    head = results[0]
    ax.set_title(f"{head['model']} {head['image_size']}px, batch {head['batch']}: cost model accuracy",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report(runs, args) -> None:
    results = combine(runs)
    head = results[0] if results else {}
    print(f"## Predicted against measured iteration time: {head.get('model')} "
          f"{head.get('image_size')}px, batch {head.get('batch')}, {head.get('dtype')}, "
          f"machine file {head.get('machine')}"
          + (f"; medians of {len(runs)} runs" if len(runs) > 1 else ""))
    print()
    print(format_table(results))
    if len(runs) > 1:
        print()
        for k, run in enumerate(runs):
            sm = summary(run)
            print(f"run {k + 1}: |error| median {sm['median_abs_error'] * 100:.1f}%, max "
                  f"{sm['max_abs_error'] * 100:.1f}%; {sm['within_15']} of {sm['rows']} within 15%")
    if args.detail:
        # the categories of one run: the one whose median |error| is the median
        order = sorted(range(len(runs)), key=lambda k: summary(runs[k])["median_abs_error"])
        k = order[len(order) // 2]
        print()
        print(f"Per category{f' (run {k + 1})' if len(runs) > 1 else ''}, predicted / traced by the "
              "executor (mean over ranks; waiting is traced where it happens, mostly in exchanges and "
              "reductions):")
        print()
        print(format_detail(runs[k]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "results": results, "summary": summary(results),
                       "summary_machine_file": summary(results, "error_file"),
                       "summary_median_run_error": (summary(results, "median_run_error")
                                                    if len(runs) > 1 else None),
                       "runs_summary": [summary(run) for run in runs]}, f, indent=1)
    if args.plot:
        plot(results, args.plot)
