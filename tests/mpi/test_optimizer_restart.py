"""A checkpoint holds each optimiser's state as whole logical tensors: N
steps, a checkpoint, N more steps from it give, with every optimiser (sgd,
adamw, lars with clipping, lamb), bitwise the parameters and state of 2N
steps straight on the same plan, and within 1e-12 (relative, float64) on
fewer ranks (a sub-communicator of the job) under another plan.  The same
for the 3-D volume_small (conv3d weights, 5-D batch norm) split over depth,
height and width, with sgd and adamw."""
import shutil
import tempfile

import numpy as np
import pytest

from hpcnn.backend import to_host
from hpcnn.checkpoint import load_checkpoint, save_checkpoint
from hpcnn.ops import init_param
from hpcnn.runtime.executor import DistributedModel
from hpcnn.runtime.optimizers import make_optimizer
from hpcnn.strategy.baselines import data_parallel

import small_models
from equivalence import SEED, graph
from mpi_helpers import WORLD, agree, run_or_abort
from plan_cases import cases

pytestmark = pytest.mark.mpi

N = 3
OPTIMISERS = {
    "sgd": ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "adamw": ("adamw", dict(lr=0.01, weight_decay=0.05)),
    "lars": ("lars", dict(lr=1.0, momentum=0.9, weight_decay=5e-4, trust_coefficient=0.01, clip_norm=0.1,
                          exclude_bias_and_norm=True)),
    "lamb": ("lamb", dict(lr=0.02, weight_decay=0.01)),
}
# (plan of the job's ranks, plan of one rank fewer) per world size
PLANS = {2: ("lenet5-c2", None), 3: ("resnet_small-c3", "resnet_small-w2"),
         4: ("resnet_small-n2c2", "resnet_small-c3")}
VOLUME_PLANS = {2: ("volume_small-d2", None), 3: ("volume_small-d3", "volume_small-c2"),
                4: ("volume_small-d2h2", "volume_small-w3")}
SETTINGS = [("image", o) for o in OPTIMISERS] + [("volume", "sgd"), ("volume", "adamw")]


def _plan(name, world):
    if name is None:
        return None
    return next(c for c in cases(world) if c[0] == name)


def _batch(g, step):
    rng = np.random.default_rng([99, step])
    return rng.standard_normal(g[g.input_name].shape), small_models.targets(g, rng)


def _train(dm, opt, steps):
    for i in steps:
        x, y = _batch(dm.graph, i)
        box = dm.input_box()
        dm.train_step(x[box.slices()] if box is not None else None, y, opt, lr=opt.lr * (1 + i) / 6, step=i)


def _state(dm, opt):
    """{'params/node/name' | 'buffers/...' | 'state/<s>/node.name': (box, host array)} of this rank."""
    out = {}
    for store, tag in ((dm.params, "params"), (dm.buffers, "buffers")):
        for n, ps in store.items():
            for k, v in ps.items():
                out[f"{tag}/{n}/{k}"] = (tuple(dm.param_box(n, k)), to_host(v).copy())
    for s, held in opt.state.items():
        for key, v in held.items():
            n, k = key.rsplit(".", 1)
            out[f"state/{s}/{key}"] = (tuple(dm.param_box(n, k)), to_host(v).copy())
    return out


def _whole(comm, state):
    """The whole logical tensors of ``state`` gathered from every rank of ``comm``."""
    whole = {}
    for part in comm.allgather(state):
        for key, (box, a) in part.items():
            full = whole.setdefault(key, {})
            full[box] = a
    out = {}
    for key, parts in whole.items():
        rows = sorted(parts)
        out[key] = np.concatenate([parts[b] for b in rows], axis=0) if len(rows) > 1 else parts[rows[0]]
    return out


@pytest.mark.parametrize("family,opt_name", SETTINGS, ids=[f"{f}-{o}" for f, o in SETTINGS])
def test_restart_continues_bitwise_and_across_rank_counts(family, opt_name):
    W = WORLD.Get_size()
    kind, settings = OPTIMISERS[opt_name]
    plans = VOLUME_PLANS if family == "volume" else PLANS
    first, other = _plan(plans[W][0], W), _plan(plans[W][1], W - 1)
    model = first[1]
    g = graph(model)
    problems = []

    def run():
        d = tempfile.mkdtemp(prefix="hpcnn-test-restart-") if WORLD.Get_rank() == 0 else None
        d = WORLD.bcast(d, root=0)
        try:
            plan = first[2](g, W)
            # 2N steps straight
            dm = DistributedModel(g, plan, WORLD, dtype=np.float64, seed=SEED)
            opt = make_optimizer(kind, **settings).attach(dm)
            _train(dm, opt, range(N))
            ck = save_checkpoint(d, dm, opt, WORLD, {"step": N})
            _train(dm, opt, range(N, 2 * N))
            straight, straight_steps = _state(dm, opt), opt.steps
            whole_straight = _whole(WORLD, straight)
            opt.free()
            dm.free()
            # N steps from the checkpoint, same plan and ranks: bitwise
            dm = DistributedModel(g, plan, WORLD, dtype=np.float64, seed=SEED + 1)
            opt = make_optimizer(kind, **settings).attach(dm)
            meta = load_checkpoint(ck, dm, opt)
            if not meta["optimizer_restored"] or opt.steps != N:
                problems.append(f"state not restored: {meta['optimizer_restored']}, steps {opt.steps}")
            _train(dm, opt, range(N, 2 * N))
            resumed = _state(dm, opt)
            if set(resumed) != set(straight) or opt.steps != straight_steps:
                problems.append(f"resumed state holds {sorted(set(resumed) ^ set(straight))} differently")
            for key, (box, a) in straight.items():
                if key in resumed and not np.array_equal(resumed[key][1], a):
                    problems.append(f"same plan: {key} {box} differs after the restart")
            opt.free()
            dm.free()
            # N steps from the checkpoint on W-1 ranks under another plan
            sub = WORLD.Split(0 if WORLD.Get_rank() < W - 1 else 1, key=WORLD.Get_rank())
            if WORLD.Get_rank() < W - 1:
                plan2 = other[2](g, W - 1) if other is not None else data_parallel(g, W - 1)
                dm = DistributedModel(g, plan2, sub, dtype=np.float64, seed=SEED + 2)
                opt = make_optimizer(kind, **settings).attach(dm)
                load_checkpoint(ck, dm, opt)
                _train(dm, opt, range(N, 2 * N))
                whole_other = _whole(sub, _state(dm, opt))
                for key, want in whole_straight.items():
                    got = whole_other.get(key)
                    if got is None:
                        problems.append(f"{key} missing on {W - 1} ranks")
                        continue
                    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)
                    if err > 1e-12:
                        problems.append(f"{W - 1} ranks, plan {plan2.name}: {key} rel diff {err:.2e}")
                opt.free()
                dm.free()
            sub.Free()
            # the runs moved every weight: the comparison is not of untouched tensors
            for n in g:
                for k, spec in n.param_specs().items():
                    start = init_param(spec, f"{n.name}.{k}", SEED, np.float64)
                    if np.array_equal(whole_straight[f"params/{n.name}/{k}"], start):
                        problems.append(f"{n.name}.{k} did not move in {2 * N} steps")
        finally:
            WORLD.Barrier()
            if WORLD.Get_rank() == 0:
                shutil.rmtree(d, ignore_errors=True)

    run_or_abort(run)
    agree(problems, f"restart with {opt_name} at {W} ranks")
