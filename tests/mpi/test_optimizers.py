"""AdamW, LARS, LAMB and clipping under distributed plans (three per world
size, 9 over 2, 3 and 4 ranks, every one with channel-split layers) equal
the references written from the papers' formulas run on the sequential
model: 5 steps in float64, every updated parameter within 1e-10; the
clipped gradients and the global norm equal the sequential ones; replicas
stay bitwise identical (the norms are summed in the same order on every
rank)."""
import hashlib

import numpy as np
import pytest

from hpcnn.backend import to_host
from hpcnn.runtime.executor import DistributedModel
from hpcnn.runtime.optimizers import make_optimizer
from hpcnn.runtime.sequential import SequentialModel

from equivalence import SEED, data, graph, rel_err
from mpi_helpers import WORLD, agree, run_or_abort
from optimizer_reference import clip_global, make_reference
from plan_cases import cases

pytestmark = pytest.mark.mpi

STEPS = 5
TOL = 1e-10
LRS = [0.3, 0.6, 1.0, 0.8, 0.5]        # a schedule's factors of lr

PLANS = {2: ["lenet5-c2", "resnet_small-w2", "inception_small-c2"],
         3: ["lenet5-n3", "resnet_small-c3", "inception_small-c3"],
         4: ["lenet5-owt", "resnet_small-n2c2", "inception_small-c2h2"]}

SETTINGS = {
    "adamw": ("adamw", dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)),
    "lars": ("lars", dict(lr=2.0, momentum=0.9, weight_decay=5e-4, trust_coefficient=0.02,
                          exclude_bias_and_norm=True)),
    "lamb": ("lamb", dict(lr=0.02, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)),
    "lamb-clip": ("lamb", dict(lr=0.02, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, clip_norm=0.05)),
    "sgd-clip": ("sgd", dict(lr=0.05, momentum=0.9, clip_norm=0.05)),
}

_refs = {}


def _host(d):
    return {n: {k: np.array(to_host(v), dtype=np.float64) for k, v in ps.items()} for n, ps in d.items() if ps}


def reference(model, setting):
    """Parameters after each step, the clipped gradients and the global
    norm of each step, of the papers' formulas (tests/optimizer_reference)
    on the sequential model (cached)."""
    key = (model, setting)
    if key not in _refs:
        kind, s = SETTINGS[setting]
        g = graph(model)
        x, y = data(g)
        seq = SequentialModel(g, np.float64, SEED)
        params = _host(seq.params)
        if kind == "sgd":
            ref = _RefSGD(s["lr"], s["momentum"])
        else:
            ref = make_reference(kind, s, params)
        steps = []
        for i in range(STEPS):
            seq.forward(x, y, training=True, step=i)
            grads = _host(seq.backward())
            total = None
            if s.get("clip_norm"):
                grads, total = clip_global(grads, s["clip_norm"])
            ref.step(params, grads, s["lr"] * LRS[i])
            for n, ps in params.items():
                for k, v in ps.items():
                    seq.params[n][k][...] = v
            steps.append(dict(params=_host(params), grads=grads, total=total))
        _refs[key] = steps
    return _refs[key]


class _RefSGD:
    """torch.optim.SGD's rule (dampening 0), to follow the clipping."""

    def __init__(self, lr, momentum):
        self.mom, self.buf = momentum, {}

    def step(self, params, grads, lr):
        for n, gs in grads.items():
            for k, g in gs.items():
                b = self.buf.get((n, k))
                b = g.copy() if b is None else self.mom * b + g
                self.buf[(n, k)] = b
                params[n][k] = params[n][k] - lr * b


def _cases():
    known = {c[0]: c for c in cases(WORLD.Get_size())}
    return [(name, known[name][1], known[name][2]) for name in PLANS[WORLD.Get_size()]]


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name,model,build", _cases(), ids=[c[0] for c in _cases()])
def test_optimiser_under_plan_equals_reference(name, model, build, setting):
    kind, s = SETTINGS[setting]
    g = graph(model)
    ref = reference(model, setting)
    plan = build(g, WORLD.Get_size())
    assert any(plan.config(n.name).get("c", 1) > 1 for n in g if n.param_specs()), \
        f"plan {name} splits no parameter layer over channels"
    problems = []

    def run():
        dm = DistributedModel(g, plan, WORLD, dtype=np.float64, seed=SEED)
        opt = make_optimizer(kind, **s).attach(dm)
        x, y = data(g)
        box = dm.input_box()
        xt = x[box.slices()] if box is not None else None
        for i in range(STEPS):
            dm.train_step(xt, y, opt, lr=s["lr"] * LRS[i], step=i)
            r = ref[i]
            if s.get("clip_norm"):
                if rel_err(opt.last_grad_norm, r["total"]) > TOL:
                    problems.append(f"step {i}: global norm {opt.last_grad_norm!r}, sequential {r['total']!r}")
                clipped, _ = opt.clip(dm.grads)          # the same clipping again, on the raw gradients
                for n, gs in clipped.items():
                    for k, gr in gs.items():
                        want = r["grads"][n][k][dm.param_box(n, k).slices()]
                        if rel_err(to_host(gr), want) > TOL:
                            problems.append(f"step {i}: clipped gradient {n}.{k} rel err "
                                            f"{rel_err(to_host(gr), want):.2e}")
            for n, ps in dm.params.items():
                for k, p in ps.items():
                    want = r["params"][n][k][dm.param_box(n, k).slices()]
                    e = rel_err(to_host(p), want)
                    if e > TOL:
                        problems.append(f"step {i}: {n}.{k} rel err {e:.2e}")
        mine = [(n, k, tuple(dm.param_box(n, k)),
                 hashlib.sha256(np.ascontiguousarray(to_host(p)).tobytes()).hexdigest())
                for n, ps in dm.params.items() for k, p in ps.items()]
        seen = {}
        for rk, entries in enumerate(WORLD.allgather(mine)):
            for n, k, b, h in entries:
                seen.setdefault((n, k, b), {}).setdefault(h, []).append(rk)
        if WORLD.Get_rank() == 0:
            problems.extend(f"replicas of {n}.{k} {b} differ: {list(hs.values())}"
                            for (n, k, b), hs in seen.items() if len(hs) > 1)
        opt.free()
        dm.free()

    run_or_abort(run)
    agree(problems, f"{setting} under plan {name} at {WORLD.Get_size()} ranks")
