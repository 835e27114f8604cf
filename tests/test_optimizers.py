"""The optimisers on whole tensors (the sequential model), float64, 5 steps:
AdamW equals torch.optim.AdamW (and Adam with L2 decay torch.optim.Adam);
LARS and LAMB equal references written from the papers' formulas
(tests/optimizer_reference.py); clipping equals
torch.nn.utils.clip_grad_norm_; the errors name what is wrong."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcnn.models import build_model
from hpcnn.runtime.optimizers import OptimizerError, make_optimizer
from hpcnn.runtime.sequential import SequentialModel

from optimizer_reference import clip_global, make_reference, one_dimensional

STEPS = 5
TOL = 1e-10
SEED = 3


def _graph(name="resnet_small"):
    return build_model(name, batch=6)


def _data(g, step):
    rng = np.random.default_rng([7, step])
    x = rng.standard_normal(g[g.input_name].shape)
    y = rng.integers(0, g[g.logits_name].shape[1], size=g.batch)
    return x, y


def _copy(d):
    return {n: {k: np.array(v, dtype=np.float64) for k, v in ps.items()} for n, ps in d.items() if ps}


def rel(a, b):
    return float(np.linalg.norm(a - b)) / max(float(np.linalg.norm(b)), 1e-300)


def _run(kind, settings, model="resnet_small", lrs=None, update_ref=None):
    """STEPS steps of hpcnn's optimiser on a SequentialModel and, from the
    same gradients (the model's), of the reference ``update_ref(ref_params,
    grads, lr)`` on its own copy of the parameters; the worst relative
    difference of any parameter after any step."""
    g = _graph(model)
    m = SequentialModel(g, np.float64, SEED)
    opt = make_optimizer(kind, **settings).attach(m)
    ref_params = _copy(m.params)
    worst = 0.0
    for s in range(STEPS):
        x, y = _data(g, s)
        m.forward(x, y, training=True, step=s)
        grads = m.backward()
        lr = None if lrs is None else lrs[s]
        ref_grads = _copy(grads)
        opt.step_nodes(m.params, grads, lr)
        update_ref(ref_params, ref_grads, lr if lr is not None else settings["lr"])
        for n, ps in ref_params.items():
            for k, want in ps.items():
                worst = max(worst, rel(m.params[n][k], want))
    return worst, opt


def _torch_update(cls, settings, params0, groups_fn):
    """An update function driving torch optimiser ``cls`` on copies of the
    parameters."""
    tparams = {(n, k): torch.tensor(v, dtype=torch.float64, requires_grad=True)
               for n, ps in params0.items() for k, v in ps.items()}
    opt = cls(groups_fn(tparams), **settings)

    def update(ref_params, grads, lr):
        for grp in opt.param_groups:
            grp["lr"] = lr
        for (n, k), t in tparams.items():
            t.grad = torch.from_numpy(grads[n][k].copy())
        opt.step()
        for (n, k), t in tparams.items():
            ref_params[n][k] = t.detach().numpy().copy()
    return update


def _initial(model="resnet_small"):
    return _copy(SequentialModel(_graph(model), np.float64, SEED).params)


@pytest.mark.parametrize("exclude", [False, True])
def test_adamw_equals_torch(exclude):
    p0 = _initial()
    ones = one_dimensional(p0)

    def groups(tp):
        if not exclude:
            return list(tp.values())
        return [{"params": [t for key, t in tp.items() if key not in ones]},
                {"params": [t for key, t in tp.items() if key in ones], "weight_decay": 0.0}]
    settings = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    upd = _torch_update(torch.optim.AdamW, settings, p0, groups)
    lrs = [0.01, 0.02, 0.015, 0.01, 0.005]
    worst, opt = _run("adamw", dict(settings, exclude_bias_and_norm=exclude), lrs=lrs, update_ref=upd)
    assert worst <= TOL, worst
    assert opt.steps == STEPS and set(opt.state) == {"exp_avg", "exp_avg_sq"}


def test_the_adamw_reference_of_the_mpi_tests_equals_torch():
    """tests/mpi/test_optimizers.py holds distributed AdamW to the formula
    reference (no torch under mpiexec): that reference is torch's AdamW."""
    from optimizer_reference import RefAdamW
    p0 = _initial()
    settings = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    upd = _torch_update(torch.optim.AdamW, settings, p0, lambda tp: list(tp.values()))
    ref = RefAdamW(0.01, (0.9, 0.99), 1e-8, 0.05)
    ref_params, torch_params = _copy(p0), _copy(p0)
    g = _graph()
    m = SequentialModel(g, np.float64, SEED)
    for s in range(STEPS):
        x, y = _data(g, s)
        m.forward(x, y, training=True, step=s)
        grads = _copy(m.backward())
        ref.step(ref_params, grads, 0.01)
        upd(torch_params, grads, 0.01)
        for n, ps in torch_params.items():
            for k, want in ps.items():
                assert rel(ref_params[n][k], want) <= TOL, (s, n, k)
                m.params[n][k][...] = want


def test_adam_with_l2_decay_equals_torch_adam():
    p0 = _initial()
    settings = dict(lr=0.01, betas=(0.8, 0.999), eps=1e-7, weight_decay=0.01)
    upd = _torch_update(torch.optim.Adam, settings, p0, lambda tp: list(tp.values()))
    worst, _ = _run("adamw", dict(settings, weight_decay_mode="l2"), update_ref=upd)
    assert worst <= TOL, worst


def test_sgd_equals_torch_with_nesterov_and_decay():
    p0 = _initial()
    settings = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    upd = _torch_update(torch.optim.SGD, settings, p0, lambda tp: list(tp.values()))
    worst, _ = _run("sgd", settings, update_ref=upd)
    assert worst <= TOL, worst


@pytest.mark.parametrize("kind,settings", [
    ("lars", dict(lr=2.0, momentum=0.9, weight_decay=5e-4, trust_coefficient=0.02)),
    ("lars", dict(lr=2.0, momentum=0.9, weight_decay=5e-4, trust_coefficient=0.02, exclude_bias_and_norm=True)),
    ("lamb", dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)),
    ("lamb", dict(lr=0.01, betas=(0.85, 0.99), eps=1e-6, weight_decay=0.1, exclude_bias_and_norm=True)),
], ids=["lars", "lars-exclude", "lamb", "lamb-exclude"])
def test_layerwise_optimisers_equal_the_papers_formulas(kind, settings):
    ref = make_reference(kind, settings, _initial())
    worst, opt = _run(kind, settings, update_ref=lambda p, gr, lr: ref.step(p, gr, lr),
                      lrs=[settings["lr"] * f for f in (0.2, 0.4, 0.6, 0.8, 1.0)])
    assert worst <= TOL, worst


def test_trust_ratios_move_the_step_size():
    """LARS's step is not SGD's: the trust ratios differ from layer to
    layer (the test above would pass for a trust ratio of 1 everywhere only
    if the reference were wrong the same way)."""
    g = _graph()
    m = SequentialModel(g, np.float64, SEED)
    opt = make_optimizer("lars", lr=1.0, momentum=0.9, weight_decay=1e-4).attach(m)
    x, y = _data(g, 0)
    m.forward(x, y, training=True)
    grads = m.backward()
    ratios = opt.trust_ratios(m.params, grads)
    values = [r for rs in ratios.values() for r in rs.values()]
    assert len(set(np.round(values, 12))) > len(values) // 2
    w, gr = m.params["fc"]["weight"], grads["fc"]["weight"]
    want = 0.001 * np.linalg.norm(w) / (np.linalg.norm(gr) + 1e-4 * np.linalg.norm(w))
    assert ratios["fc"]["weight"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("clip", [1e-3, 1e6])
def test_clipping_equals_torch_clip_grad_norm(clip):
    """SGD with clip_norm equals torch's clip_grad_norm_ followed by
    torch.optim.SGD (clipping active at 1e-3, inactive at 1e6)."""
    p0 = _initial()
    settings = dict(lr=0.05, momentum=0.9)
    tparams = {(n, k): torch.tensor(v, dtype=torch.float64, requires_grad=True)
               for n, ps in p0.items() for k, v in ps.items()}
    topt = torch.optim.SGD(list(tparams.values()), **settings)
    totals = []

    def update(ref_params, grads, lr):
        for (n, k), t in tparams.items():
            t.grad = torch.from_numpy(grads[n][k].copy())
        totals.append(float(torch.nn.utils.clip_grad_norm_(list(tparams.values()), clip)))
        topt.step()
        for (n, k), t in tparams.items():
            ref_params[n][k] = t.detach().numpy().copy()
    worst, opt = _run("sgd", dict(settings, clip_norm=clip), update_ref=update)
    assert worst <= TOL, worst
    assert opt.last_grad_norm == pytest.approx(totals[-1], rel=1e-12)


def test_clip_returns_the_clipped_gradients():
    g = _graph()
    m = SequentialModel(g, np.float64, SEED)
    opt = make_optimizer("adamw", lr=1e-3, clip_norm=0.01).attach(m)
    x, y = _data(g, 0)
    m.forward(x, y, training=True)
    grads = m.backward()
    want, total = clip_global(_copy(grads), 0.01)
    got, coef = opt.clip(grads)
    assert coef < 1 and opt.last_grad_norm == pytest.approx(total, rel=1e-12)
    for n, gs in want.items():
        for k, w in gs.items():
            assert rel(got[n][k], w) <= 1e-13


def test_layerwise_norms_need_an_attached_model():
    g = _graph()
    m = SequentialModel(g, np.float64, SEED)
    x, y = _data(g, 0)
    m.forward(x, y, training=True)
    grads = m.backward()
    for kind, extra in (("lars", {}), ("lamb", {}), ("sgd", {"clip_norm": 1.0})):
        opt = make_optimizer(kind, lr=0.1, **extra)
        with pytest.raises(OptimizerError, match=r"optimizer.attach\(model\)"):
            opt.step_nodes(m.params, grads)
    other = SequentialModel(g, np.float64, SEED + 1)
    opt = make_optimizer("lars", lr=0.1).attach(other)
    with pytest.raises(OptimizerError, match="attached to another model"):
        opt.step_nodes(m.params, grads)
    # plain SGD and AdamW are elementwise: no attachment needed
    make_optimizer("adamw", lr=1e-3).step_nodes(m.params, grads)


@pytest.mark.parametrize("kind,kw,match", [
    ("adam", {}, "optimizer.kind must be one of sgd, adamw, lars, lamb"),
    ("adamw", {"nesterov": True}, "nesterov = true applies to sgd only"),
    ("lars", {"weight_decay_mode": "decoupled"}, "inside the trust ratio"),
    ("lamb", {"betas": (0.9, 1.0)}, "betas must be two numbers in"),
    ("sgd", {"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
    ("lars", {"trust_coefficient": 0}, "trust_coefficient must be a positive number"),
])
def test_bad_settings_are_named(kind, kw, match):
    with pytest.raises(OptimizerError, match=match):
        make_optimizer(kind, lr=0.1, **kw)
