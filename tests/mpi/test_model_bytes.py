"""The cost model's communication bytes equal the bytes the runtime counts.

For every plan of the runtime's equivalence tests at this world size (on
their models: LeNet-5, a small ResNet, a small Inception block, the digits
CNN, the 3-D volume_small; some layers on explicit ranks or on a subset of the ranks), two training
steps run under the DistributedModel, and every rank compares what its byte
counter recorded with what ``plan_pricing.rank_bytes`` predicts for that rank:
per exchange edge forward and backward (bytes and messages), per category per step (halo,
redistribution, gradient allreduce, batch-norm statistics, the loss scalar).
The plan-level figures the cost model prices with -- all ranks' exchange
bytes and, per layer, the busiest rank's exchange bytes -- are checked
against the counts summed and maximised over ranks.  The verdict is agreed
by all ranks before asserting."""
import numpy as np
import pytest
from mpi4py import MPI

from hpcnn.backend import Backend
from hpcnn.runtime.executor import DistributedModel
from hpcnn.runtime.sgd import SGD
from hpcnn.strategy.cost_model import CostModel
from hpcnn.strategy.plan_pricing import price_plan, rank_bytes
from hpcnn.strategy.machine import load_machine
from hpcnn.strategy.plan import Plan

import small_models
from mpi_helpers import WORLD, agree, run_or_abort
from plan_cases import cases

pytestmark = pytest.mark.mpi

BATCH = 5
STEPS = 2
CASES = cases(WORLD.Get_size())
CATEGORIES = ("halo", "redistribution", "allreduce", "batchnorm", "scalars")


def _check(model, build):
    g = small_models.build(model, BATCH)
    P, me = WORLD.Get_size(), WORLD.Get_rank()
    plan = Plan.from_json(build(g, P).to_json())
    cm = CostModel(g, P, load_machine("paper_p100_cluster"), dtype="float32")
    predicted = rank_bytes(cm, plan)
    mine = predicted[me]
    problems = []

    def run():
        dm = DistributedModel(g, plan, WORLD, dtype=np.float32, seed=3, backend=Backend("numpy"))
        rng = np.random.default_rng(5)
        x = rng.standard_normal(g[g.input_name].shape).astype(np.float32)
        y = small_models.targets(g, rng)
        box = dm.input_box()
        xt = x[box.slices()] if box is not None else None
        sgd = SGD(lr=0.01, momentum=0.9)
        for s in range(STEPS):
            dm.train_step(xt, y, sgd, step=s)
        step = dm.step_bytes()
        for cat in CATEGORIES:
            if step.get(cat, 0) != mine[cat]:
                problems.append(f"{cat}: counted {step.get(cat, 0)} bytes in a step, "
                                f"the cost model predicts {mine[cat]}")
        other = set(step) - set(CATEGORIES)
        if any(step[c] for c in other):
            problems.append(f"bytes in categories the cost model does not know: "
                            f"{ {c: step[c] for c in other} }")
        counted = dm.edge_bytes()
        for key in sorted(set(counted) | set(mine["edges"])):
            got = counted.get(key, {})
            want = mine["edges"].get(key, {})
            if any(got.get(f, 0) != STEPS * want.get(f, 0)
                   for f in ("forward", "backward", "messages_forward", "messages_backward")):
                problems.append(f"edge {key}: counted {got} over {STEPS} steps, the cost model "
                                f"predicts {want} per step")
        dm.free()
        return step, counted

    step, counted = run_or_abort(run)
    # plan-level figures: all ranks' exchange bytes, each layer's busiest rank
    total = WORLD.allreduce(step.get("halo", 0) + step.get("redistribution", 0), op=MPI.SUM)
    priced = price_plan(cm, plan)
    if total != priced.exchange_bytes:
        problems.append(f"all ranks exchanged {total} bytes in a step; price_plan prices "
                        f"{priced.exchange_bytes}")
    per_edge = WORLD.allgather({k: (v["forward"], v["backward"]) for k, v in counted.items() if "->" in k})
    if me == 0:
        for row in priced.rows:
            n = g[row["node"]]
            keys = [f"{src}->{n.name}[{i}]" for i, src in enumerate(n.inputs)]
            if any(g[src].kind == "input" for src in n.inputs):
                continue       # no backward: what a rank receives is not counted
            busiest = sum(max((max(d.get(k, (0, 0))) for d in per_edge), default=0) // STEPS
                          for k in keys)
            if busiest != row["exchange_max_rank_bytes"]:
                problems.append(f"layer {n.name}: the busiest rank exchanged {busiest} bytes, the "
                                f"cost model prices {row['exchange_max_rank_bytes']}")
    return problems


@pytest.mark.parametrize("name,model,build,opt,covers", CASES, ids=[c[0] for c in CASES])
def test_model_bytes_equal_counted_bytes(name, model, build, opt, covers):
    agree(_check(model, build), f"plan {name} at {WORLD.Get_size()} ranks")
