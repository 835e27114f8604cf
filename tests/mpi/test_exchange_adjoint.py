"""Exchange plans executed over MPI: the forward equals slicing the global
tensor, the backward is the exact adjoint (<F x, y> = <x, F* y> in float64),
and the bytes comm counts equal the bytes the plan predicts.  Random layouts
(different degrees, subsets of ranks, uneven splits) and convolution
geometry with big kernels and dilation, so halos reach past neighbours."""
import numpy as np
import pytest

from hpcnn.backend import Backend
from hpcnn.ops import make_op
from hpcnn.parallel import Box, ExchangePlan, Layout, needed_boxes
from hpcnn.parallel.comm import Communicator

from mpi_helpers import WORLD, agree, run_or_abort

pytestmark = pytest.mark.mpi

P = WORLD.Get_size()
ME = WORLD.Get_rank()


def random_layout(rng, shape, allow_subset=True):
    degrees, k = [], 1
    for s in shape:
        d = int(rng.integers(1, max(1, min(s, P // k)) + 1))
        degrees.append(d)
        k *= d
    ranks = rng.permutation(P)[:k] if allow_subset else np.arange(k)
    return Layout(shape, degrees, [int(r) for r in ranks])


def random_case(rng):
    """(source layout, needs) of a random convolution, pooling, linear or
    free-form exchange."""
    kind = rng.choice(["conv", "conv", "pool", "linear", "boxes"])
    if kind in ("conv", "pool"):
        shape = (int(rng.integers(1, 4)), int(rng.integers(1, 5)),
                 int(rng.integers(4, 11)), int(rng.integers(4, 11)))
        k = int(rng.integers(1, 6))
        dil = int(rng.integers(1, 3))
        eff = dil * (k - 1) + 1
        while eff > min(shape[2:]):
            k -= 1
            eff = dil * (k - 1) + 1
        if kind == "conv":
            op = make_op("conv2d", "c", out_channels=int(rng.integers(1, 4)), kernel_size=k,
                         stride=int(rng.integers(1, 3)), padding=int(rng.integers(0, eff)),
                         dilation=dil)
        else:
            op = make_op("maxpool2d", "p", kernel_size=k, stride=int(rng.integers(1, 3)),
                         padding=int(rng.integers(0, k // 2 + 1)), dilation=dil)
        out_shape = op.infer_shape([shape])
        src = random_layout(rng, shape)
        dst = random_layout(rng, out_shape)
        return src, needed_boxes(op, 0, dst, [shape]), op.kind
    if kind == "linear":
        shape = (int(rng.integers(1, 6)), int(rng.integers(1, 9)))
        op = make_op("linear", "fc", out_features=int(rng.integers(1, 6)))
        src = random_layout(rng, shape)
        dst = random_layout(rng, op.infer_shape([shape]))
        return src, needed_boxes(op, 0, dst, [shape]), "linear"
    shape = tuple(int(s) for s in rng.integers(1, 7, size=4))
    src = random_layout(rng, shape)
    needs = {}
    for r in range(P):
        if rng.random() < 0.8:
            lo = [int(rng.integers(-2, s + 1)) for s in shape]
            needs[r] = Box((l, l + int(rng.integers(0, s + 3))) for l, s in zip(lo, shape))
    return src, needs, "boxes"


@pytest.mark.parametrize("transport", ["p2p", "neighbor", "alltoallw"])
def test_adjoint_identity_and_forward_slicing(transport):
    cm = Communicator(WORLD, Backend("numpy"), transport=transport)
    rng = np.random.default_rng(1234 + P)  # same cases on every rank
    problems = []

    def check(case):
        src, needs, kind = random_case(rng)
        plan = ExchangePlan.compile(src, needs, 8)
        x = rng.standard_normal(src.shape)
        # a y for every destination, drawn identically on every rank
        ys = {r: rng.standard_normal(plan.need(r).shape) for r in plan.destinations}
        key = f"case{case}"
        sb = src.box(ME)
        tile = x[sb.slices()].copy() if sb is not None else None
        region = cm.exchange(plan, tile, np.float64, tag=case, key=key)
        need = plan.need(ME)
        if need is not None and not np.array_equal(region, x[need.slices()]):
            problems.append(f"{key} ({kind}): forward region differs from the global slice {need}")
        y = ys.get(ME)
        acc = cm.exchange_adjoint(plan, None if y is None else y.copy(), None, np.float64,
                                  tag=case, key=key)
        lhs = float(np.vdot(region, y)) if need is not None else 0.0
        rhs = float(np.vdot(tile, acc)) if sb is not None else 0.0
        lhs, rhs = cm.allreduce_scalars([lhs, rhs])
        if abs(lhs - rhs) > 1e-12 * max(1.0, abs(lhs)):
            problems.append(f"{key} ({kind}): <Fx,y>={lhs!r} but <x,F*y>={rhs!r}")
        got = cm.counter.per_plan[key]
        if got["forward"] != plan.bytes_sent(ME) or got["backward"] != plan.bytes_received(ME):
            problems.append(f"{key} ({kind}): counted {got} but the plan predicts forward "
                            f"{plan.bytes_sent(ME)} backward {plan.bytes_received(ME)}")
        return plan.total_bytes()

    moved = [run_or_abort(check, c) for c in range(60)]
    assert sum(moved) > 0
    cm.free()
    agree(problems, f"exchange plans over {transport}")


def test_adjoint_with_halo_wider_than_a_tile():
    """A dilated 7x7 convolution over tiles of one or two rows: every
    interior rank's halo spans several neighbours."""
    cm = Communicator(WORLD, Backend("numpy"))
    problems = []

    def run():
        shape = (2, 3, 2 * P + 1, 5)
        conv = make_op("conv2d", "c", out_channels=2, kernel_size=7, dilation=2, padding=6)
        src = Layout(shape, (1, 1, P, 1))
        dst = Layout(conv.infer_shape([shape]), (1, 1, P, 1), ranks=list(range(P))[::-1])
        plan = ExchangePlan.compile(src, needed_boxes(conv, 0, dst, [shape]), 8)
        senders = {s for s, d, _ in plan.pieces if d == 0 and s != 0}
        if P >= 3 and len(senders) < 2:
            problems.append(f"rank 0 should receive from several ranks, got {senders}")
        rng = np.random.default_rng(7)
        x = rng.standard_normal(shape)
        ys = {r: rng.standard_normal(plan.need(r).shape) for r in plan.destinations}
        tile = x[src.box(ME).slices()].copy()
        region = cm.exchange(plan, tile, tag=1, key="wide")
        if not np.array_equal(region, x[plan.need(ME).slices()]):
            problems.append("forward differs from the global slice")
        acc = cm.exchange_adjoint(plan, ys[ME], tag=1, key="wide")
        lhs, rhs = cm.allreduce_scalars([np.vdot(region, ys[ME]), np.vdot(tile, acc)])
        if abs(lhs - rhs) > 1e-12 * max(1.0, abs(lhs)):
            problems.append(f"<Fx,y>={lhs!r} but <x,F*y>={rhs!r}")

    run_or_abort(run)
    cm.free()
    agree(problems, "wide halo")


def test_identity_plan_copies_nothing():
    cm = Communicator(WORLD, Backend("numpy"))
    L = Layout((P, 2, 3, 3), (P, 1, 1, 1))
    plan = ExchangePlan.compile(L, L.boxes(), 8)
    tile = np.arange(18.0).reshape(1, 2, 3, 3)
    region = cm.exchange(plan, tile, key="id")
    g = np.ones_like(tile)
    acc = cm.exchange_adjoint(plan, g, key="id")
    problems = []
    if region is not tile:
        problems.append("the identity plan copied the tile")
    if not np.array_equal(acc, g):
        problems.append("the identity adjoint changed the gradient")
    if any(cm.counter.per_plan["id"].values()):
        problems.append(f"the identity plan counted bytes {cm.counter.per_plan['id']}")
    cm.free()
    agree(problems, "identity plan")
