"""Label smoothing under plans: the loss split over samples (several ranks)
or on one rank, with the smoothed target, gives the sequential loss and
every gradient (float64, 1e-9), for two plans of each world size."""
import numpy as np
import pytest

from hpcnn.models import build_model
from hpcnn.runtime.executor import DistributedModel
from hpcnn.runtime.optimizers import make_optimizer
from hpcnn.runtime.sequential import SequentialModel

from equivalence import BATCH, SEED, data, rel_err
from mpi_helpers import WORLD, agree, run_or_abort
from plan_cases import cases

pytestmark = pytest.mark.mpi

EPS = 0.2
CASES = [c for c in cases(WORLD.Get_size()) if c[1] in ("lenet5", "resnet_small")][:2]


@pytest.mark.parametrize("name,model,build,_o,_c", CASES, ids=[c[0] for c in CASES])
def test_label_smoothing_under_plan_equals_sequential(name, model, build, _o, _c):
    g = build_model(model, batch=BATCH)        # its own graph: the smoothing is set on its loss op
    g[g.loss_name].op.label_smoothing = EPS
    problems = []

    def run():
        x, y = data(g)
        seq = SequentialModel(g, np.float64, SEED)
        so = make_optimizer("sgd", lr=0.05, momentum=0.9)
        dm = DistributedModel(g, build(g, WORLD.Get_size()), WORLD, dtype=np.float64, seed=SEED)
        opt = make_optimizer("sgd", lr=0.05, momentum=0.9)
        box = dm.input_box()
        for step in range(2):
            want, _ = seq.forward(x, y, training=True, step=step)
            grads = seq.backward()
            so.step_nodes(seq.params, grads)
            got = dm.train_step(x[box.slices()] if box is not None else None, y, opt, step=step)
            if rel_err(got, want) > 1e-9:
                problems.append(f"step {step}: loss {got} vs sequential {want}")
            for n, gs in dm.grads.items():
                for k, gr in gs.items():
                    e = rel_err(gr, grads[n][k][dm.param_box(n, k).slices()])
                    if e > 1e-9:
                        problems.append(f"step {step}: gradient {n}.{k} rel err {e:.2e}")
        # the smoothed loss is not the plain one
        plain = build_model(model, batch=BATCH)
        p, _ = SequentialModel(plain, np.float64, SEED).forward(x, y, training=True)
        s, _ = SequentialModel(g, np.float64, SEED).forward(x, y, training=True)
        if abs(p - s) < 1e-6:
            problems.append("label smoothing did not change the loss")
        dm.free()

    run_or_abort(run)
    agree(problems, f"label smoothing under {name}")
