"""Run under mpiexec by tests/test_volume_memory.py: CosmoFlow at one
128^3 sample on the job's ranks under the plan the memory-limited search
returns, two training steps; prints one JSON line on rank 0 with the cost
model's per-rank memory of the plan and every rank's measured growth of
its peak resident memory over what it held before the model was built."""
import json
import resource
import sys

import numpy as np
from mpi4py import MPI


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main():
    from hpcnn.models import build_model
    from hpcnn.runtime.executor import DistributedModel
    from hpcnn.runtime.optimizers import make_optimizer
    from hpcnn.strategy.cost_model import CostModel
    from hpcnn.strategy.machine import load_machine
    from hpcnn.strategy.plan_pricing import price_plan
    from hpcnn.strategy.planner import search_plan
    comm = MPI.COMM_WORLD
    P, me = comm.Get_size(), comm.Get_rank()
    side, limit = int(sys.argv[1]), float(sys.argv[2])
    g = build_model("cosmoflow", batch=1, image_size=side)
    machine = load_machine("local")
    plan = search_plan(g, P, machine, memory_gib=limit)[0] if me == 0 else None
    plan = comm.bcast(plan, root=0)
    estimate = price_plan(CostModel(g, P, machine), plan).memory
    rng = np.random.default_rng(0)
    x = rng.standard_normal(g[g.input_name].shape).astype(np.float32)
    y = rng.uniform(-1, 1, (1, 4))
    before = rss_bytes()
    dm = DistributedModel(g, plan, comm, dtype=np.float32, seed=1)
    opt = make_optimizer("adamw", lr=1e-3).attach(dm)
    box = dm.input_box()
    xt = None if box is None else np.ascontiguousarray(x[box.slices()])
    for s in range(2):
        dm.train_step(xt, y, opt, step=s)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grown = comm.gather(peak - before, root=0)
    if me == 0:
        print(json.dumps({"estimate": estimate, "grown": grown,
                          "configs": {n: plan.config(n) for n in ("conv1", "conv2", "fc1")}}))


if __name__ == "__main__":
    main()
