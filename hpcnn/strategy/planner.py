"""Search the plan of a graph: build the configuration space, price it, run
the exact search, and report the found plan beside the baselines.

``search_plan(graph, ranks, machine, memory=None)`` is what ``hpcnn plan``
and the job runner (rank 0, before broadcasting the plan) call.

The search minimises the cost model's sum over layers and edges exactly.
Priced as a whole plan (``CostModel.evaluate``), a few terms depend on more
than one layer -- the runtime packs gradients of a replica group into
shared buckets, and on a calibrated machine ranks wait for each other after
every stretch of compute that ends in a synchronisation -- so the found plan
and the baselines are priced whole, and a baseline that comes out cheaper
(and fits the memory limit) is returned instead; the report says so
(``chosen``, ``status``).

Memory limit (optional, bytes per rank; the paper has none).  A plan's
per-rank memory is the sum of its layers' figures.  First, every
configuration that cannot fit whatever the other layers choose (its memory
plus the least memory of every other layer exceeds the limit) is excluded;
if a layer has none left, or the least memory of the whole graph exceeds the
limit, that is an error naming the smallest possible figure.  Then the search
runs; if its plan fits, it is optimal among the plans that fit (every such
plan was in the space searched).  If it does not fit, the limit couples the
layers; a Lagrangian penalty lambda * memory is added to every layer and
lambda is bisected to the smallest value whose plan fits.  The report then
gives that plan's cost and the Lagrangian lower bound on the best cost that
fits, so the remaining gap is stated, not hidden.
"""
from __future__ import annotations

import resource
import time

import numpy as np

from hpcnn.strategy.baselines import baselines
from hpcnn.strategy.config_space import SpaceOptions
from hpcnn.strategy.cost_model import CostModel
from hpcnn.strategy.plan_pricing import price_plan
from hpcnn.strategy.machine import Machine
from hpcnn.strategy.plan import Plan, PlanError
from hpcnn.strategy.search import SearchError, solve

GiB = float(1 << 30)


class MemoryLimitError(PlanError):
    """No plan of the searched space fits the per-rank memory limit."""


def cpu_seconds() -> float:
    """CPU seconds of this process and of the worker processes it waited for."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def _plan_from_choice(model: CostModel, choice, name="searched") -> Plan:
    sp = model.space
    return Plan(model.graph.name, model.ranks, model.graph.batch, sp.plan_configs(choice), name=name)


class PlanReport(dict):
    """The search's report (a JSON-able dict); ``.layers`` lists the found
    plan's per-layer rows (node, op, config, ranks, t_c, t_s, t_x, memory)."""

    @property
    def layers(self) -> list:
        return self.get("predicted", {}).get("layers", [])


def search_plan(graph, ranks: int, machine, memory: float | None = None, *,
                memory_gib: float | None = None, dtype="float32",
                opts: SpaceOptions | None = None, with_baselines: bool = True,
                workers: int | None = None):
    """Search the plan of ``graph`` for ``ranks`` ranks on ``machine`` (a
    Machine, or a name in hpcnn/machines/ or a file path).  ``memory`` (or
    ``memory_gib``): per-rank limit in GiB, None for none.  ``workers``:
    processes that build the exchange tables (``CostModel.build_tables``).  Returns
    (Plan, PlanReport)."""
    if not isinstance(machine, Machine):
        machine = Machine.load(machine)
    if memory is None:
        memory = memory_gib
    if memory is not None:
        if not float(memory) > 0:
            raise PlanError(f"the memory limit must be a positive number of GiB, got {memory!r}")
        memory = float(memory) * GiB
    ranks = int(ranks)
    if ranks < 1:
        raise PlanError(f"the rank count must be positive, got {ranks}")
    w0, c0 = time.perf_counter(), cpu_seconds()
    model = CostModel(graph, ranks, machine, dtype=dtype, opts=opts)
    vecs, edges, gcost = model.problem(workers)
    w1, c1 = time.perf_counter(), cpu_seconds()

    mem_info = None
    if memory is not None:
        limit = float(memory)
        mems = [gc.mem for gc in gcost]
        least = float(sum(m.min() for m in mems))
        if least > limit:
            worst = max(range(len(mems)), key=lambda g: mems[g].min())
            raise MemoryLimitError(
                f"no plan fits {limit / GiB:.3f} GiB per rank: even the least memory of every layer "
                f"adds up to {least / GiB:.3f} GiB (largest: layer {model.space.groups[worst].root!r} "
                f"with {mems[worst].min() / GiB:.3f} GiB). Use more ranks or a smaller batch")
        excluded = 0
        for g, m in enumerate(mems):
            bad = m - m.min() + least > limit
            excluded += int(bad.sum())
            vecs[g] = np.where(bad, np.inf, vecs[g])
        mem_info = {"limit_bytes": limit, "least_bytes": least, "excluded_configs": excluded}

    res = solve(vecs, edges)
    choice = res.choice
    status = "exact"
    if memory is not None:
        used = float(sum(gcost[g].mem[c] for g, c in enumerate(choice)))
        mem_info["plan_bytes"] = used
        if used <= limit:
            mem_info["status"] = "fits; optimal among plans that fit"
        else:
            # Lagrangian relaxation of the coupled limit: minimise
            # t(S) + lam * mem(S); every lam gives the lower bound
            # min_S [t(S) + lam (mem(S) - limit)] on the best plan that fits
            best_bound = -np.inf

            fitting = []                          # every plan seen that fits

            def run(lam):
                v = [vecs[g] + lam * gcost[g].mem for g in range(len(vecs))]
                r = solve(v, edges)
                u = float(sum(gcost[g].mem[c] for g, c in enumerate(r.choice)))
                if u <= limit:
                    t = float(sum(vecs[g][c] for g, c in enumerate(r.choice)) +
                              sum(m[r.choice[a], r.choice[b]] for a, b, m in edges))
                    fitting.append((t, u, r))
                return r, u, r.cost - lam * limit

            scale = max(res.cost, 1e-30) / max(used, 1.0)      # seconds per byte
            lo, hi, found = 0.0, None, None
            lam = scale * 1e-6
            for _ in range(40):                   # grow the penalty until a plan fits
                r, u, bound = run(lam)
                best_bound = max(best_bound, bound)
                if u <= limit:
                    hi, found = lam, (r, u)
                    break
                lo, lam = lam, lam * 4.0
            if found is None:
                raise MemoryLimitError(f"no plan found that fits {limit / GiB:.3f} GiB per rank")
            for _ in range(30):                   # then the smallest penalty that fits
                mid = 0.5 * (lo + hi)
                r, u, bound = run(mid)
                best_bound = max(best_bound, bound)
                if u <= limit:
                    hi, found = mid, (r, u)
                else:
                    lo = mid
            _, u, r = min(fitting, key=lambda x: x[0])
            choice = r.choice
            status = "memory-limited (Lagrangian)"
            cost = float(sum(vecs[g][c] for g, c in enumerate(choice)) +
                         sum(m[choice[a], choice[b]] for a, b, m in edges))
            mem_info.update(status="limit binding: Lagrangian plan", plan_bytes=u,
                            lower_bound_s=float(best_bound), plan_cost_s=cost,
                            gap=float(cost - best_bound))
    w2, c2 = time.perf_counter(), cpu_seconds()

    plan = _plan_from_choice(model, choice)
    found = price_plan(model, plan, "searched")
    search_cost = float(sum(vecs[g][c] for g, c in enumerate(choice)) +
                        sum(m[choice[a], choice[b]] for a, b, m in edges))
    if memory is None and not np.isclose(found.objective, search_cost, rtol=1e-9, atol=1e-12):
        raise SearchError(f"internal: the plan's evaluated cost {found.objective} differs from the "
                          f"search's {search_cost}")
    # the search minimises a sum over layers and edges; priced as a whole
    # (the runtime's gradient buckets, waits after stretches of compute) a
    # baseline may come out cheaper: then it is the plan
    chosen = "searched"
    base_plans = baselines(graph, ranks)
    priced = {name: price_plan(model, bp, name) for name, bp in base_plans.items()}
    for name, bc in priced.items():
        fits = memory is None or bc.memory <= float(memory)
        if fits and bc.total < found.total * (1 - 1e-9):
            plan = Plan(graph.name, ranks, graph.batch, base_plans[name].configs, name="searched")
            found, chosen = bc, name
            status += f"; {name} priced lower as a whole plan"
    # plans measured on this machine (``hpcnn plan --trials K
    # --update-machine``) are judged by their measured steps
    measured = {name: machine.measured_step(graph, ranks, bp, model.dtype) for name, bp in base_plans.items()}
    measured[chosen] = machine.measured_step(graph, ranks, plan, model.dtype)
    measured = {k: v for k, v in measured.items() if v is not None}
    if chosen in measured:
        best = min(measured, key=measured.get)
        fits = memory is None or priced.get(best, found).memory <= float(memory)
        if best != chosen and measured[best] < measured[chosen] and fits:
            plan = Plan(graph.name, ranks, graph.batch, base_plans[best].configs, name="searched")
            found, chosen = priced[best], best
            status += f"; {best} measured faster on this machine"
    report = PlanReport({
        "model": graph.name, "ranks": ranks, "batch": graph.batch, "machine": machine.name,
        "dtype": model.dtype, "status": status,
        "space": {"groups": len(model.space), "nodes": len(graph),
                  "configs_min": int(min(model.space.sizes())),
                  "configs_max": int(max(model.space.sizes())),
                  "configs_mean": float(np.mean(model.space.sizes())),
                  "options": model.space.opts.to_dict()},
        "timing": {"tables_s": w1 - w0, "tables_cpu_s": c1 - c0, "search_s": w2 - w1,
                   "search_cpu_s": c2 - c1, "total_s": w2 - w0, "total_cpu_s": c2 - c0},
        "search": res.stats, "cost_model": dict(model.stats),
        "predicted": found.to_dict(), "memory": mem_info, "chosen": chosen, "measured": measured,
    })
    if with_baselines:
        report["baselines"] = {}
        for name, bp in base_plans.items():
            bc = priced[name]
            report["baselines"][name] = {k: v for k, v in bc.to_dict().items() if k != "layers"}
            report["baselines"][name]["configs"] = bp.configs
    plan.meta = {"predicted_s": found.total, "machine": machine.name, "dtype": model.dtype,
                 "status": status, "search_s": w2 - w0}
    return plan, report


def check_plan_memory(graph, plan: Plan, ranks: int, machine, memory_gib: float, dtype="float32") -> float:
    """The cost model's per-rank memory of a given (not searched) plan, in
    bytes; a MemoryLimitError naming the plan, the estimate and the layers
    that hold most when it exceeds ``memory_gib``."""
    from hpcnn.strategy.machine import load_machine
    if not isinstance(machine, Machine):
        machine = load_machine(machine)
    cost = price_plan(CostModel(graph, ranks, machine, dtype=dtype), plan)
    limit = float(memory_gib) * GiB
    if cost.memory > limit:
        top = sorted(cost.rows, key=lambda r: -r["memory"])[:3]
        worst = ", ".join(f"{r['node']} {r['memory'] / GiB:.2f} GiB" for r in top)
        raise MemoryLimitError(
            f"plan {plan.name or 'given'!r} needs about {cost.memory / GiB:.2f} GiB per rank (cost model: "
            f"parameters, optimiser state, activations, input regions and the kernels' temporaries; "
            f"largest {worst}) but "
            f"plan.memory_gib = {memory_gib:g}: one rank cannot hold its share. Use plan.mode = \"search\" "
            f"(it splits the large layers over depth, height and width to fit), more ranks or a "
            f"smaller batch")
    return cost.memory
