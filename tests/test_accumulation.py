"""Gradient accumulation (hpcnn.runtime.accumulation): K micro-batches per
optimiser step equal one step on the whole batch for a network without
batch norm (LeNet-5, float64, 1e-10, with SGD, LARS and LAMB); with batch
norm, what docs/user-guide.md says: each micro-batch is normalised with its
own statistics (the step differs from the whole batch's and equals the mean
of the micro-batches' gradients) and the running statistics are updated
once per micro-batch."""
from __future__ import annotations

import numpy as np
import pytest

from hpcnn.models import build_model
from hpcnn.runtime.accumulation import accumulated_step
from hpcnn.runtime.optimizers import make_optimizer
from hpcnn.runtime.sequential import SequentialModel

B = 12
SEED = 5
SETTINGS = {
    "sgd": ("sgd", dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "lars": ("lars", dict(lr=1.0, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.01, clip_norm=0.5)),
    "lamb": ("lamb", dict(lr=0.01, weight_decay=0.01)),
}


def _batch(g, step, n=B):
    rng = np.random.default_rng([17, step])
    shape = (n,) + tuple(g[g.input_name].shape[1:])
    return rng.standard_normal(shape), rng.integers(0, g[g.logits_name].shape[1], size=n)


def _micro(x, y, k):
    m = len(y) // k
    return [(x[i * m:(i + 1) * m], y[i * m:(i + 1) * m]) for i in range(k)]


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b))) / max(float(np.linalg.norm(b)), 1e-300)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_accumulation_equals_the_whole_batch_without_batch_norm(setting, k):
    kind, s = SETTINGS[setting]
    whole_g, micro_g = build_model("lenet5", batch=B), build_model("lenet5", batch=B // k)
    whole, micro = SequentialModel(whole_g, np.float64, SEED), SequentialModel(micro_g, np.float64, SEED)
    o1 = make_optimizer(kind, **s).attach(whole)
    o2 = make_optimizer(kind, **s).attach(micro)
    for step in range(3):
        x, y = _batch(whole_g, step)
        l1 = whole.train_step(x, y, o1, step=step)
        l2 = accumulated_step(micro, _micro(x, y, k), o2, step=step)
        assert rel(l2, l1) <= 1e-10
    worst = max(rel(micro.params[n][p], whole.params[n][p]) for n in whole.params for p in whole.params[n])
    assert worst <= 1e-10, worst
    moved = max(rel(whole.params[n][p], SequentialModel(whole_g, np.float64, SEED).params[n][p])
                for n in whole.params for p in whole.params[n])
    assert moved > 1e-4


def test_one_micro_batch_is_the_plain_step():
    g = build_model("resnet_small", batch=4)
    a, b = SequentialModel(g, np.float64, SEED), SequentialModel(g, np.float64, SEED)
    oa, ob = make_optimizer("sgd", lr=0.1, momentum=0.9), make_optimizer("sgd", lr=0.1, momentum=0.9)
    for step in range(2):
        x, y = _batch(g, step, 4)
        a.train_step(x, y, oa, step=step)
        accumulated_step(b, [(x, y)], ob, step=step)
    for n in a.params:
        for p in a.params[n]:
            assert np.array_equal(a.params[n][p], b.params[n][p])


def test_batch_norm_sees_each_micro_batch():
    """resnet_small (batch norm everywhere), K = 3: the step is the mean of
    the micro-batches' own gradients (each normalised with its own
    statistics, running statistics carried from one to the next), not the
    whole batch's; the running statistics are updated 3 times."""
    k = 3
    whole_g, micro_g = build_model("resnet_small", batch=B), build_model("resnet_small", batch=B // k)
    x, y = _batch(whole_g, 0)
    acc = SequentialModel(micro_g, np.float64, SEED)
    opt = make_optimizer("sgd", lr=0.1)
    accumulated_step(acc, _micro(x, y, k), opt, step=0)

    # the documented rule, by hand: forward/backward on each micro-batch in turn
    ref = SequentialModel(micro_g, np.float64, SEED)
    start = {n: {p: v.copy() for p, v in ps.items()} for n, ps in ref.params.items()}
    mean = {}
    for i, (xm, ym) in enumerate(_micro(x, y, k)):
        ref.forward(xm, ym, training=True, step=i)
        for n, gs in ref.backward().items():
            for p, gr in gs.items():
                mean.setdefault(n, {})[p] = mean.get(n, {}).get(p, 0.0) + gr / k
    for n, gs in mean.items():
        for p, gr in gs.items():
            assert rel(acc.params[n][p], start[n][p] - 0.1 * gr) <= 1e-12, (n, p)
    for n, bs in ref.buffers.items():
        for p, v in bs.items():
            assert rel(acc.buffers[n][p], v) <= 1e-12, (n, p)

    # ... which is not one step on the whole batch
    whole = SequentialModel(whole_g, np.float64, SEED)
    whole.train_step(x, y, make_optimizer("sgd", lr=0.1), step=0)
    assert rel(acc.params["conv1"]["weight"], whole.params["conv1"]["weight"]) > 1e-6
    # running statistics: 3 momentum updates with 4-sample statistics, not 1 with 12
    bn = next(n.name for n in whole_g if n.kind == "batchnorm")
    once = SequentialModel(micro_g, np.float64, SEED)
    once.forward(x[:B // k], y[:B // k], training=True)
    assert rel(acc.buffers[bn]["running_mean"], once.buffers[bn]["running_mean"]) > 1e-3
    assert rel(acc.buffers[bn]["running_mean"], whole.buffers[bn]["running_mean"]) > 1e-3
