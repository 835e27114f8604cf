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
"""
from __future__ import annotations

import argparse
import json
import sys


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


def _cfg(c: dict) -> str:
    s = " ".join(f"{d}{v}" for d, v in c.items() if v > 1)
    return s or "1"


def format_report(rep) -> str:
    ms = 1e3
    lines = [f"model {rep['model']}, batch {rep['batch']}, {rep['ranks']} ranks on {rep['machine']} "
             f"({rep['dtype']})",
             f"{'layer':26s} {'op':14s} {'config':12s} {'ranks':>5s} {'t_c ms':>9s} {'t_x ms':>9s} "
             f"{'t_s ms':>9s} {'mem MiB':>9s}"]
    prev = None
    for r in rep["predicted"]["layers"]:
        cfg = _cfg(r["config"])
        shown = ("= " + cfg) if r.get("folded") else cfg
        lines.append(f"{r['node'][:26]:26s} {r['op'][:14]:14s} {shown[:12]:12s} {r['ranks']:5d} "
                     f"{r['t_c'] * ms:9.3f} {r['t_x'] * ms:9.3f} {r['t_s'] * ms:9.3f} "
                     f"{r['memory'] / 2 ** 20:9.1f}")
        prev = r
    p = rep["predicted"]
    lines.append(f"{'whole plan':26s} {'':14s} {'':12s} {'':5s} {p['t_c_s'] * ms:9.3f} {p['t_x_s'] * ms:9.3f} "
                 f"{p['t_s_s'] * ms:9.3f} {p['memory_bytes'] / 2 ** 20:9.1f}")
    if p.get("t_o_s"):
        lines.append(f"{'executor (layers, step)':26s} {'':14s} {'':12s} {'':5s} {p['t_o_s'] * ms:9.3f}")
    if p.get("objective_s") is not None and abs(p["objective_s"] + p.get("t_o_s", 0.0) - p["total_s"]) > 1e-9:
        lines.append("(the rows price gradient buckets and waits per layer, as the search does; the whole "
                     "plan follows the runtime's buckets and the stretches between synchronisations)")
    lines.append("")
    lines.append(f"predicted iteration time (ms) and speed-up of the found plan:")
    lines.append(f"  {'searched':16s} {p['total_s'] * ms:10.3f}")
    for name, b in rep.get("baselines", {}).items():
        lines.append(f"  {name:16s} {b['total_s'] * ms:10.3f}   x{b['total_s'] / p['total_s']:.2f}")
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
    if args.nodes is not None and not 1 <= args.nodes <= args.ranks:
        return fail(f"--nodes must be between 1 and --ranks ({args.ranks}), got {args.nodes}")
    batch = args.batch if args.batch is not None else 32 * args.ranks
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
    if args.output:
        try:
            plan.save(args.output)
        except OSError as exc:
            return fail(f"cannot write the plan to {args.output}: {exc}")
    if args.json:
        print(json.dumps({"report": rep, "plan": plan.to_dict()}, indent=1))
    else:
        print(format_report(rep))
        if args.output:
            print(f"plan written to {args.output}")
    return 0
