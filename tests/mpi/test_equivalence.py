"""Distributed training equals sequential training: for each plan (48 over
2, 3 and 4 ranks, across LeNet-5, a small ResNet, a small Inception block,
the digits CNN, a small depthwise-separable MobileNet and the 3-D
volume_small -- 14 plans of volumes split over d, h, w alone and combined,
channels, samples, subsets of the ranks and a layout change on every edge),
three SGD steps in float64 give the sequential loss, every parameter
gradient and the updated weights (relative error <= 1e-9); replicas are
bitwise identical; the bytes comm counts equal the bytes the exchange plans
predict; inference accuracy (a regression network's inference loss)
matches."""
import pytest

from hpcnn.backend import Backend

from equivalence import check_and_agree, graph
from mpi_helpers import WORLD
from plan_cases import REDIST, cases

pytestmark = pytest.mark.mpi

CASES = cases(WORLD.Get_size())


@pytest.mark.parametrize("name,model,build,opt,covers", CASES, ids=[c[0] for c in CASES])
def test_plan_equals_sequential(name, model, build, opt, covers):
    check_and_agree(name, model, build, opt, Backend("numpy"))


def test_zigzag_plans_change_layout_on_every_edge():
    from hpcnn.runtime.executor import exchange_category
    zig = [c for c in CASES if "zigzag" in c[0]]
    assert zig
    for name, model, build, _, _ in zig:
        g = graph(model)
        L = build(g, WORLD.Get_size()).layouts(g)
        same = [(s, d) for s, d, _ in g.edges() if exchange_category(L[s], L[d]) != REDIST]
        assert not same, f"{name}: edges without a layout change: {same}"


def test_neighbourhood_transport_equals_sequential():
    name, model, build, opt, _ = next(c for c in CASES if "zigzag" in c[0])
    check_and_agree(name + "/neighbor", model, build, opt, Backend("numpy"), transport="neighbor")
