"""Gradient accumulation under plans: 2 micro-batches of 5 samples per
optimiser step under LeNet-5's plans of this world size equal the
sequential step on the whole batch of 10 (float64, 1e-10), with SGD and
with LARS and clipping (whose norms are summed over the shards)."""
import numpy as np
import pytest

from hpcnn.backend import to_host
from hpcnn.models import build_model
from hpcnn.runtime.accumulation import accumulated_step
from hpcnn.runtime.executor import DistributedModel
from hpcnn.runtime.optimizers import make_optimizer
from hpcnn.runtime.sequential import SequentialModel

from equivalence import BATCH, SEED, graph, rel_err
from mpi_helpers import WORLD, agree, run_or_abort
from plan_cases import cases

pytestmark = pytest.mark.mpi

K = 2
STEPS = 3
SETTINGS = {"sgd": ("sgd", dict(lr=0.05, momentum=0.9)),
            "lars-clip": ("lars", dict(lr=1.0, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.01,
                                       clip_norm=0.5))}


def _batch(g, step):
    rng = np.random.default_rng([23, step])
    return (rng.standard_normal((K * BATCH,) + tuple(g[g.input_name].shape[1:])),
            rng.integers(0, g[g.logits_name].shape[1], size=K * BATCH))


LENET = [c for c in cases(WORLD.Get_size()) if c[1] == "lenet5"][:2]


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name,model,build,_o,_c", LENET, ids=[c[0] for c in LENET])
def test_accumulation_under_plan_equals_whole_batch(name, model, build, _o, _c, setting):
    kind, s = SETTINGS[setting]
    micro_g = graph(model)
    whole_g = build_model(model, batch=K * BATCH)
    problems = []

    def run():
        seq = SequentialModel(whole_g, np.float64, SEED)
        so = make_optimizer(kind, **s).attach(seq)
        dm = DistributedModel(micro_g, build(micro_g, WORLD.Get_size()), WORLD, dtype=np.float64, seed=SEED)
        opt = make_optimizer(kind, **s).attach(dm)
        box = dm.input_box()
        for step in range(STEPS):
            x, y = _batch(whole_g, step)
            want = seq.train_step(x, y, so, step=step)
            micro = []
            for i in range(K):
                xm, ym = x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]
                micro.append((xm[box.slices()] if box is not None else None, ym))
            got = accumulated_step(dm, micro, opt, step=step)
            if rel_err(got, want) > 1e-10:
                problems.append(f"step {step}: loss {got} vs whole batch {want}")
        for n, ps in dm.params.items():
            for p, v in ps.items():
                e = rel_err(to_host(v), seq.params[n][p][dm.param_box(n, p).slices()])
                if e > 1e-10:
                    problems.append(f"{n}.{p} rel err {e:.2e}")
        opt.free()
        dm.free()

    run_or_abort(run)
    agree(problems, f"accumulation ({setting}) under {name}")
