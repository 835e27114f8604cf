"""The gradient allreduce that overlaps backward (GradientReduction) gives
the sequential gradients whatever the bucket size: tiny buckets (every
tensor started as soon as its layer's backward is done, while other ranks
are still inside later layers' batch-norm and exchange collectives) and one
bucket per group started at the end, under data parallelism and under plans
with several replica groups (channel splits, layouts changing on every
edge)."""
import numpy as np
import pytest

from hpcnn.runtime.executor import DistributedModel
from hpcnn.runtime.sgd import SGD
from hpcnn.strategy.baselines import data_parallel

from equivalence import SEED, STEPS, data, gradient_problems, graph, reference
from mpi_helpers import WORLD, agree, run_or_abort
from plan_cases import OPTIMISERS, cases

pytestmark = pytest.mark.mpi


def _plans():
    out = [("resnet_small-data-parallel", "resnet_small", lambda g, w: data_parallel(g, w), "momentum")]
    for name, model, build, opt, _ in cases(WORLD.Get_size()):
        kind = name[len(model) + 1:]
        if kind == "zigzag" or kind.startswith("c") or kind == "n2c2":
            out.append((name, model, build, opt))
    return out


@pytest.mark.parametrize("bucket_bytes", [64, 1 << 40])
@pytest.mark.parametrize("name,model,build,opt", _plans(), ids=[p[0] for p in _plans()])
def test_bucketed_overlapped_allreduce_equals_sequential(name, model, build, opt, bucket_bytes):
    from hpcnn.backend import Backend
    g = graph(model)
    ref = reference(model, opt, Backend("numpy"))
    problems = []

    def run():
        dm = DistributedModel(g, build(g, WORLD.Get_size()), WORLD, dtype=np.float64, seed=SEED,
                              bucket_bytes=bucket_bytes)
        x, y = data(g)
        box = dm.input_box()
        xt = x[box.slices()] if box is not None else None
        sgd = SGD(**OPTIMISERS[opt])
        for s in range(STEPS):
            dm.train_step(xt, y, sgd, step=s)
            problems.extend(gradient_problems(dm, ref["steps"][s], s))
        dm.free()

    run_or_abort(run)
    agree(problems, f"plan {name} of {model}, buckets of {bucket_bytes} bytes")
