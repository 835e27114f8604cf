"""The distributed executor in one process (MPI.COMM_SELF, a world of one
rank): it equals the sequential trainer, and bad input gets errors that name
what is wrong.  The many-rank equivalence lives in tests/mpi/."""
import numpy as np
import pytest

from mpi4py import MPI

from hpcnn.backend import Backend
from hpcnn.models import build_model
from hpcnn.runtime.sequential import SequentialModel
from hpcnn.runtime.sgd import SGD
from hpcnn.strategy.baselines import data_parallel
from hpcnn.strategy.plan import Plan, PlanError


def _model(g, plan, **kw):
    from hpcnn.runtime.executor import DistributedModel
    return DistributedModel(g, plan, MPI.COMM_SELF, dtype=np.float64, seed=3,
                            backend=Backend("numpy"), **kw)


def test_one_rank_equals_sequential():
    g = build_model("resnet_small", batch=3, image_size=8)
    dm = _model(g, data_parallel(g, 1), trace=True)
    seq = SequentialModel(g, np.float64, 3, Backend("numpy"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal(g[g.input_name].shape)
    y = rng.integers(0, 10, size=3)
    assert dm.input_box().shape == x.shape and dm.label_range() == (0, 3)
    o1, o2 = SGD(lr=0.1, momentum=0.9), SGD(lr=0.1, momentum=0.9)
    for s in range(2):
        a = dm.train_step(x, y, o1, step=s)
        b = seq.train_step(x, y, o2, step=s)
        assert abs(a - b) <= 1e-12 * abs(b)
    for key, p in seq.flat_params().items():
        np.testing.assert_allclose(dm.flat_params()[key], p, rtol=1e-11, atol=1e-13)
    # one rank: nothing crosses between ranks, every event is timed
    assert dm.step_bytes().get("halo", 0) == 0 and dm.step_bytes().get("redistribution", 0) == 0
    cats = {c for c, _, t0, t1 in dm.events if t1 >= t0}
    assert {"forward", "backward"} <= cats
    # the layer of every event is a node of the graph
    assert {n for _, n, _, _ in dm.events} <= set(g.nodes)
    correct, count = dm.count_correct(x, y, valid=[True, True, False])
    assert count == 2 and 0 <= correct <= 2
    assert dm.param_box("conv1", "weight") == ((0, 8), (0, 3), (0, 3), (0, 3))
    dm.free()


def test_bad_input_is_a_clear_error():
    g = build_model("lenet5", batch=2)
    with pytest.raises(PlanError, match="made for 2 ranks but the job has 1"):
        _model(g, data_parallel(g, 2))
    dm = _model(g, data_parallel(g, 1))
    with pytest.raises(ValueError, match=r"must feed the input box .* \(shape \(2, 1, 32, 32\)\)"):
        dm.forward(np.zeros((1, 1, 32, 32)), np.zeros(2, dtype=int))
    with pytest.raises(KeyError, match="has no parameter or buffer 'gamma'"):
        dm.param_box("conv1", "gamma")
    with pytest.raises(RuntimeError, match="backward needs a forward with labels"):
        dm.backward()
    bad = Plan(g.name, 1, g.batch, {**data_parallel(g, 1).configs, "fc1": {"n": 1, "h": 2}})
    with pytest.raises(PlanError, match="fc1"):
        _model(g, bad)
    dm.free()
