"""The check shared by the NumPy and CuPy equivalence tests: three SGD steps
under a plan against the sequential trainer, on every rank."""
from __future__ import annotations

import hashlib

import numpy as np

from hpcnn.backend import to_host
from hpcnn.runtime.executor import DistributedModel
from hpcnn.runtime.sequential import SequentialModel
from hpcnn.runtime.sgd import SGD

import small_models
from mpi_helpers import WORLD, agree, run_or_abort
from plan_cases import OPTIMISERS

BATCH = 5
STEPS = 3
SEED = 11
TOL = 1e-9

_graphs, _refs = {}, {}


def graph(model):
    if model not in _graphs:
        _graphs[model] = small_models.build(model, BATCH)
    return _graphs[model]


def data(g):
    rng = np.random.default_rng(2024)
    x = rng.standard_normal(g[g.input_name].shape)
    y = small_models.targets(g, rng)
    return x, y


def _host(d):
    return {n: {k: to_host(v).copy() for k, v in ps.items()} for n, ps in d.items()}


def reference(model, opt, backend):
    """Losses, whole gradients, parameters and buffers after each of the
    sequential trainer's steps, and its accuracy afterwards (cached)."""
    key = (model, opt, backend.name)
    if key not in _refs:
        g = graph(model)
        x, y = data(g)
        seq = SequentialModel(g, np.float64, SEED, backend)
        sgd = SGD(**OPTIMISERS[opt])
        steps = []
        for s in range(STEPS):
            loss, _ = seq.forward(x, y, training=True, step=s)
            grads = seq.backward()
            sgd.step_nodes(seq.params, grads)
            steps.append(dict(loss=loss, grads=_host(grads), params=_host(seq.params),
                              buffers=_host(seq.buffers)))
        if small_models.regression(g):   # the loss in inference mode (running statistics)
            correct = seq.forward(x, y, training=False)[0]
        else:
            logits = to_host(seq.predict(x))
            correct = int((logits.argmax(axis=1) == y).sum())
        _refs[key] = dict(steps=steps, correct=correct)
    return _refs[key]


def gradient_problems(dm, ref_step, s) -> list:
    """Where this rank's gradient shards of the last step differ from the
    sequential step ``ref_step`` by more than TOL."""
    out = []
    for node, gs in dm.grads.items():
        for name, gr in gs.items():
            want = ref_step["grads"][node][name][dm.param_box(node, name).slices()]
            e = rel_err(to_host(gr), want)
            if e > TOL:
                out.append(f"step {s}: gradient {node}.{name} rel err {e:.2e}")
    return out


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = float(np.linalg.norm(a - b))
    nb = float(np.linalg.norm(b))
    return d / nb if nb > 0 else d


def check_plan(model, build_plan, opt, backend, transport=None):
    """Train STEPS steps under the plan on ``backend``; returns this rank's
    problems (a list of strings, empty when everything matched) against the
    sequential trainer on NumPy.  Collective.  ``transport`` None: the
    executor's default (HPCNN_TRANSPORT, else measured per plan; overlap
    as HPCNN_OVERLAP says, else on)."""
    from hpcnn.backend import Backend
    from hpcnn.strategy.plan import Plan
    g = graph(model)
    ref = reference(model, opt, Backend("numpy"))
    me = WORLD.Get_rank()
    # plans travel as JSON (written by hand or by the search): round-trip it
    plan = Plan.from_json(build_plan(g, WORLD.Get_size()).to_json())
    problems = []

    def run():
        dm = DistributedModel(g, plan, WORLD, dtype=np.float64, seed=SEED, backend=backend,
                              transport=transport)
        x, y = data(g)
        box = dm.input_box()
        xt = x[box.slices()] if box is not None else None
        sgd = SGD(**OPTIMISERS[opt])
        for s in range(STEPS):
            loss = dm.train_step(xt, y, sgd, step=s)
            r = ref["steps"][s]
            e = rel_err(loss, r["loss"])
            if e > TOL:
                problems.append(f"step {s}: loss {loss!r} vs sequential {r['loss']!r} (rel {e:.2e})")
            problems.extend(gradient_problems(dm, r, s))
            for store, rstore in ((dm.params, r["params"]), (dm.buffers, r["buffers"])):
                for node, ps in store.items():
                    for name, p in ps.items():
                        want = rstore[node][name][dm.param_box(node, name).slices()]
                        e = rel_err(to_host(p), want)
                        if e > TOL:
                            problems.append(f"step {s}: updated {node}.{name} rel err {e:.2e}")
        # every layer's parameters are held by the ranks of its layout
        for node in g.nodes:
            if g[node].param_specs() and (me in dm.layouts[node]) != (node in dm.params):
                problems.append(f"rank holds parameters of {node} iff it is in its layout: broken")
        # counted exchange bytes equal the plans' bytes
        counted = dm.edge_bytes()
        expect_step = {}
        for e in dm.edges.values():
            back = g[e.producer].kind != "input" and e.consumer in dm._live
            fwd = e.plan.bytes_sent(me)
            bwd = e.plan.bytes_received(me) if back else 0
            mfwd = e.plan.messages_sent(me)
            mbwd = e.plan.messages_received(me) if back else 0
            got = counted.get(e.key, {})
            want = {"forward": fwd, "backward": bwd, "messages_forward": mfwd, "messages_backward": mbwd}
            if any(got.get(k, 0) != STEPS * v for k, v in want.items()):
                problems.append(f"edge {e.key}: counted {got} over {STEPS} steps, plan predicts "
                                f"{want} per step")
            expect_step[e.category] = expect_step.get(e.category, 0) + fwd + bwd
        step = dm.step_bytes()
        for cat, nbytes in expect_step.items():
            if step.get(cat, 0) != nbytes:
                problems.append(f"step bytes {cat}: counted {step.get(cat, 0)}, plans predict {nbytes}")
        # replicas of every parameter are bitwise identical
        mine = [(node, name, tuple(dm.param_box(node, name)),
                 hashlib.sha256(np.ascontiguousarray(to_host(p)).tobytes()).hexdigest())
                for store in (dm.params, dm.buffers) for node, ps in store.items()
                for name, p in ps.items()]
        seen = {}
        for r, entries in enumerate(WORLD.allgather(mine)):
            for node, name, box, h in entries:
                seen.setdefault((node, name, box), {}).setdefault(h, []).append(r)
        for (node, name, box), hs in seen.items():
            if len(hs) > 1 and me == 0:
                problems.append(f"replicas of {node}.{name} {box} differ: {list(hs.values())}")
        # accuracy (a regression's loss) in inference mode (running statistics) equals sequential
        if small_models.regression(g):
            loss, _ = dm.forward(xt, y, training=False)
            if rel_err(loss, ref["correct"]) > TOL:
                problems.append(f"inference loss {loss!r}, sequential {ref['correct']!r}")
        else:
            correct, count = dm.count_correct(xt, y)
            if (correct, count) != (ref["correct"], g.batch):
                problems.append(f"count_correct gave {correct}/{count}, sequential {ref['correct']}/{g.batch}")
        dm.free()

    run_or_abort(run)
    return problems


def check_and_agree(name, model, build_plan, opt, backend, transport=None):
    problems = check_plan(model, build_plan, opt, backend, transport)
    agree(problems, f"plan {name} at {WORLD.Get_size()} ranks")
