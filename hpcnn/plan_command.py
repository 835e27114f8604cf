"""``hpcnn plan``: search the per-layer parallel strategy of a model and
print it beside the data-parallel, model-parallel and OWT baselines.

    hpcnn plan --model vgg16 --ranks 4 --machine paper_p100_cluster --batch 128
    hpcnn plan --model resnet50 --ranks 16 --machine hpcnn/machines/local.json --json -o plan.json
    hpcnn plan --model alexnet --ranks 4 --nodes 2 --machine cluster.json

A machine file that does not fit the plan -- calibrated on another layout
(node count, or ranks per node of a file measured across nodes) or for an
older cost model -- is named at start, in one line on stderr.

The table has one row per layer: its configuration (degrees over n, c, h,
w; a folded ReLU/batch-norm/dropout shows ``=`` and its producer's
configuration), the ranks it uses, the predicted compute t_c, incoming
exchange t_x (forward + adjoint), gradient/statistics synchronisation t_s,
and the memory one rank holds for it.  Below it: the predicted iteration
time of the found plan and of each baseline, and the search time.

With ``--trials K``, run under ``mpiexec -n P`` (P = ``--ranks``): rank 0
searches, then every rank times the K cheapest predicted candidates (the
searched plan and the baselines; data parallelism always) for a few steps
on random data of the model's input, and the fastest is the plan written
with ``-o``.  ``--update-machine`` records the measured steps in the machine
file, so that the next search on this machine judges those plans by them::

    mpiexec -n 4 hpcnn plan --model resnet18 --ranks 4 --image-size 64 --trials 3 -o plan.json
"""
from __future__ import annotations

import argparse
import json
import sys

from hpcnn.runtime.plan_trials import add_trial_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model of the zoo (see `hpcnn models`)")
    p.add_argument("--ranks", type=int, required=True, metavar="P", help="MPI ranks of the job")
    p.add_argument("--machine", default="local",
                   help="machine description: a name in hpcnn/machines/ (paper_p100_cluster, local) "
                        "or a JSON file written by `hpcnn calibrate` (default: local)")
    p.add_argument("--nodes", type=int, default=None, metavar="N",
                   help="nodes the job's ranks run on, spread evenly (default: as the machine places them, "
                        "its ranks_per_node on each); a machine file calibrated on another layout is named")
    p.add_argument("--batch", type=int, default=None, metavar="B",
                   help="global mini-batch (default: 32 per rank, the paper's setting)")
    p.add_argument("--image-size", type=int, default=None, metavar="S", help="input side (default: the model's)")
    p.add_argument("--classes", type=int, default=None, metavar="K", help="classes (default: the model's)")
    p.add_argument("--memory", type=float, default=None, metavar="GiB",
                   help="per-rank memory limit in GiB (default: none, as in the paper)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--max-kinds", type=int, default=2, choices=[1, 2, 3],
                   help="how many of the split kinds (samples, channels, space) one layer may combine")
    p.add_argument("--json", action="store_true", help="print the full report as JSON instead of a table")
    p.add_argument("-o", "--output", default=None, metavar="PLAN.json", help="write the found plan here")
    p.add_argument("--trials", type=int, default=0, metavar="K",
                   help="time the K cheapest predicted candidate plans (data parallelism always among "
                        "them) under mpiexec -n P and keep the fastest (default 0: no trials)")
    add_trial_arguments(p)
    p.add_argument("--update-machine", action="store_true",
                   help="with --trials: write the measured steps into the machine file (--machine must "
                        "be a file you may write)")


def _cfg(c: dict) -> str:
    s = " ".join(f"{d}{v}" for d, v in c.items() if v > 1)
    return s or "1"


def format_report(rep) -> str:
    ms = 1e3
    lines = [f"model {rep['model']}, batch {rep['batch']}, {rep['ranks']} ranks on {rep['machine']} "
             f"({rep['dtype']})",
             f"{'layer':26s} {'op':14s} {'config':12s} {'ranks':>5s} {'t_c ms':>9s} {'t_x ms':>9s} "
             f"{'t_s ms':>9s} {'mem MiB':>9s}"]
    for r in rep["predicted"]["layers"]:
        cfg = _cfg(r["config"])
        shown = ("= " + cfg) if r.get("folded") else cfg
        lines.append(f"{r['node'][:26]:26s} {r['op'][:14]:14s} {shown[:12]:12s} {r['ranks']:5d} "
                     f"{r['t_c'] * ms:9.3f} {r['t_x'] * ms:9.3f} {r['t_s'] * ms:9.3f} "
                     f"{r['memory'] / 2 ** 20:9.1f}")
    p = rep["predicted"]
    lines.append(f"{'whole plan':26s} {'':14s} {'':12s} {'':5s} {p['t_c_s'] * ms:9.3f} {p['t_x_s'] * ms:9.3f} "
                 f"{p['t_s_s'] * ms:9.3f} {p['memory_bytes'] / 2 ** 20:9.1f}")
    if p.get("t_o_s"):
        lines.append(f"{'executor (layers, step)':26s} {'':14s} {'':12s} {'':5s} {p['t_o_s'] * ms:9.3f}")
    if p.get("objective_s") is not None and abs(p["objective_s"] + p.get("t_o_s", 0.0) - p["total_s"]) > 1e-9:
        lines.append("(the rows price gradient buckets and waits per layer, as the search does; the whole "
                     "plan follows the runtime's buckets and the stretches between synchronisations)")
    lines.append("")
    lines.append("predicted iteration time (ms) and speed-up of the found plan:")
    lines.append(f"  {'searched':16s} {p['total_s'] * ms:10.3f}")
    for name, b in rep.get("baselines", {}).items():
        lines.append(f"  {name:16s} {b['total_s'] * ms:10.3f}   x{b['total_s'] / p['total_s']:.2f}")
    if rep.get("measured"):
        lines.append("measured on this machine (ms per step, hpcnn plan --trials --update-machine): " +
                     ", ".join(f"{k} {v * 1e3:.2f}" for k, v in sorted(rep["measured"].items(), key=lambda x: x[1])))
        lines.append(f"chosen: {rep['chosen']} ({rep['status']})")
    t = rep["timing"]
    lines.append(f"search time: {t['total_s']:.3f} s wall, {t['total_cpu_s']:.3f} s CPU "
                 f"(cost tables {t['tables_s']:.3f} s, search {t['search_s']:.3f} s); "
                 f"{rep['space']['groups']} search units, {rep['space']['configs_min']}-"
                 f"{rep['space']['configs_max']} configurations each; "
                 f"{rep['search']['remaining']} nodes left after series-parallel reduction")
    mem = rep.get("memory")
    if mem:
        lines.append(f"memory limit {mem['limit_bytes'] / 2 ** 30:.3f} GiB per rank: {mem['status']}"
                     + (f" (cost within {mem['gap'] * ms:.3f} ms of the Lagrangian bound)"
                        if "gap" in mem else ""))
    meas = sum(1 for r in rep["predicted"]["layers"] if r.get("measured"))
    if meas:
        lines.append(f"t_c of {meas} layers from the machine's measured table, the rest from its roofline")
    return "\n".join(lines)


def run(args) -> int:
    from hpcnn.models import ModelError, build_model
    from hpcnn.strategy.config_space import ConfigSpaceError, SpaceOptions
    from hpcnn.strategy.machine import MachineError, block_layout, even_layout, load_machine, stale_warning
    from hpcnn.strategy.plan import PlanError
    from hpcnn.strategy.planner import search_plan
    from hpcnn.strategy.search import SearchError

    def fail(msg):
        print(f"hpcnn plan: error: {msg}", file=sys.stderr)
        return 2

    if args.ranks < 1:
        return fail(f"--ranks must be a positive integer, got {args.ranks}")
    if args.trials < 0 or args.trial_steps < 1 or args.trial_rounds < 1:
        return fail("--trials must be >= 0, --trial-steps and --trial-rounds >= 1")
    if args.update_machine and not args.trials:
        return fail("--update-machine records what --trials measures: give --trials K")
    if args.nodes is not None and not 1 <= args.nodes <= args.ranks:
        return fail(f"--nodes must be between 1 and --ranks ({args.ranks}), got {args.nodes}")
    batch = args.batch if args.batch is not None else 32 * args.ranks
    if args.trials:
        return _run_with_trials(args, batch, fail)
    try:
        machine = load_machine(args.machine)
        per_node = (even_layout(args.ranks, args.nodes) if args.nodes is not None
                    else block_layout(args.ranks, machine.ranks_per_node))
        line = stale_warning(machine, per_node)
        if line:
            print(line, file=sys.stderr, flush=True)
        g = build_model(args.model, batch=batch, image_size=args.image_size, num_classes=args.classes)
        plan, rep = search_plan(g, args.ranks, machine, memory=args.memory, dtype=args.dtype,
                                opts=SpaceOptions(max_kinds=args.max_kinds))
    except (ModelError, MachineError, PlanError, SearchError, ConfigSpaceError) as exc:
        return fail(str(exc))
    return _finish(args, plan, rep, fail)


def _finish(args, plan, rep, fail, trials_text=None) -> int:
    if args.output:
        try:
            plan.save(args.output)
        except OSError as exc:
            return fail(f"cannot write the plan to {args.output}: {exc}")
    if args.json:
        print(json.dumps({"report": rep, "plan": plan.to_dict()}, indent=1))
    else:
        print(format_report(rep))
        if trials_text:
            print(trials_text)
        if args.output:
            print(f"plan written to {args.output}")
    return 0


def _run_with_trials(args, batch, fail) -> int:
    """Search on rank 0, time the candidates on every rank, keep the fastest."""
    import numpy as np
    from mpi4py import MPI

    from hpcnn.failsafe import abort_on_exception
    from hpcnn.models import ModelError, build_model
    from hpcnn.runtime.plan_trials import Candidate, candidates, fastest, format_trials, run_trials
    from hpcnn.runtime.sgd import SGD
    from hpcnn.strategy.config_space import ConfigSpaceError, SpaceOptions
    from hpcnn.strategy.machine import MachineError, load_machine
    from hpcnn.strategy.plan import Plan, PlanError
    from hpcnn.strategy.planner import search_plan
    from hpcnn.strategy.search import SearchError

    comm = MPI.COMM_WORLD
    abort_on_exception(comm)
    rank = comm.Get_rank()
    if comm.Get_size() != args.ranks:
        msg = (f"--trials runs the candidates on the job's ranks: start it as mpiexec -n {args.ranks} "
               f"hpcnn plan ... (this run has {comm.Get_size()} rank(s))")
        return fail(msg) if rank == 0 else 2
    err, payload = None, None
    if rank == 0:
        try:
            machine = load_machine(args.machine)
            if args.update_machine and machine.path is None:
                raise MachineError("--update-machine needs --machine to be a file")
            g = build_model(args.model, batch=batch, image_size=args.image_size, num_classes=args.classes)
            plan, rep = search_plan(g, args.ranks, machine, memory=args.memory, dtype=args.dtype,
                                    opts=SpaceOptions(max_kinds=args.max_kinds))
            base = {n: Plan(g.name, args.ranks, g.batch, b["configs"], name=n)
                    for n, b in rep.get("baselines", {}).items()}
            payload = [(c.name, c.plan.to_json(), c.predicted_s) for c in candidates(plan, rep, base, args.trials)]
        except (ModelError, MachineError, PlanError, SearchError, ConfigSpaceError) as exc:
            err = str(exc)
    err, payload = comm.bcast((err, payload), root=0)
    if err:
        return fail(err) if rank == 0 else 2
    g = build_model(args.model, batch=batch, image_size=args.image_size, num_classes=args.classes)
    cands = [Candidate(n, Plan.from_json(t), p) for n, t, p in payload]
    rng = np.random.default_rng(0)
    dt = np.dtype(args.dtype)
    x = rng.standard_normal(g[g.input_name].shape).astype(dt)
    y = g.random_labels(rng)
    run_trials(comm, g, cands, lambda box, i: (None if box is None else x[box.slices()], y),
               lambda: SGD(lr=0.01, momentum=0.9), dtype=dt, steps=args.trial_steps, rounds=args.trial_rounds,
               log=(lambda m: print(m, file=sys.stderr, flush=True)) if rank == 0 else None)
    best = fastest(cands, args.trial_margin)
    if rank != 0:
        return 0
    chosen = Plan(g.name, args.ranks, g.batch, best.plan.configs, best.plan.ranks, name=best.name)
    chosen.meta = {"trials": [{"name": c.name, "predicted_s": c.predicted_s, "measured_s": c.measured_s}
                              for c in cands], "chosen": best.name, "machine": machine.name}
    rep["trials"] = chosen.meta["trials"]
    if args.update_machine:
        for c in cands:
            machine.record_plan_step(g, args.ranks, c.plan, args.dtype, c.measured_s,
                                     name=c.name, predicted_s=c.predicted_s, steps_s=c.steps_s)
        try:
            machine.save(machine.path)
        except OSError as exc:
            return fail(f"cannot update the machine file {machine.path}: {exc}")
    text = format_trials(cands, best)
    if args.update_machine:
        text += f"\nmeasured steps recorded in {machine.path}"
    return _finish(args, chosen, rep, fail, text)
