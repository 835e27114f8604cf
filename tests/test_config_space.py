"""The configuration space: exactly the configurations its documented rules
admit, folding of elementwise ops, baselines built by the same rules."""
import numpy as np
import pytest

from hpcnn.graph import Graph
from hpcnn.models import MODELS, build_model
from hpcnn.strategy.baselines import baselines, data_parallel, model_parallel, owt
from hpcnn.strategy.config_space import (ConfigSpace, ConfigSpaceError, SpaceOptions,
                                         allowed_rank_counts, enumerate_configs, fit_config,
                                         fold_groups)


def test_allowed_rank_counts():
    assert allowed_rank_counts(1) == (1,)
    assert allowed_rank_counts(4) == (1, 2, 4)
    assert allowed_rank_counts(6) == (1, 2, 3, 4, 6)
    assert allowed_rank_counts(12) == (1, 2, 3, 4, 6, 8, 12)
    assert allowed_rank_counts(256) == tuple(2 ** i for i in range(9))
    with pytest.raises(ConfigSpaceError, match="positive"):
        allowed_rank_counts(0)


def _rules(row, shape, splittable, P, opts):
    names = ("n", "c", "h", "w")[:len(shape)] if len(shape) != 1 else ("n",)
    cfg = dict(zip(names, row))
    if any(v > 1 and d not in splittable for d, v in cfg.items()):
        return False
    if any(v > s for v, s in zip(row, shape)):
        return False
    if int(np.prod(row)) not in allowed_rank_counts(P):
        return False
    ph, pw = cfg.get("h", 1), cfg.get("w", 1)
    if ph > 1 and pw > 1 and max(ph, pw) > opts.aspect * min(ph, pw):
        return False
    if not (ph > 1 and pw > 1) and max(ph, pw) > opts.strip:
        return False
    kinds = (cfg.get("n", 1) > 1) + (cfg.get("c", 1) > 1) + (ph * pw > 1)
    return kinds <= opts.max_kinds


@pytest.mark.parametrize("shape,splittable,P", [
    ((32, 64, 56, 56), "nchw", 4), ((32, 64, 56, 56), "nchw", 6), ((64, 512, 14, 14), "nchw", 16),
    ((8, 3, 5, 7), "nchw", 12), ((32, 1000), "nc", 8), ((24,), "n", 6), ((16, 10, 9, 9), "nc", 16),
    ((512, 256, 28, 28), "nchw", 64),
])
@pytest.mark.parametrize("opts", [SpaceOptions(), SpaceOptions(max_kinds=3), SpaceOptions(aspect=1, strip=2)])
def test_enumeration_is_exactly_the_rules(shape, splittable, P, opts):
    got = {tuple(int(x) for x in r) for r in enumerate_configs(shape, splittable, P, opts)}
    want = set()

    def rows(prefix, budget):           # every tuple with product <= P
        if len(prefix) == len(shape):
            yield tuple(prefix)
            return
        for v in range(1, budget + 1):
            yield from rows(prefix + [v], budget // v)

    for row in rows([], P):
        if _rules(row, shape, splittable, P, opts):
            want.add(row)
    assert got == want
    assert (1,) * len(shape) in got


def test_degrees_never_exceed_dimensions_and_non_powers_of_two_are_used():
    cf = enumerate_configs((8, 3, 5, 5), "nchw", 6)
    assert cf[:, 1].max() == 3 and cf[:, 2].max() == 4 and cf[:, 0].max() == 6
    assert any(np.prod(r) == 6 for r in cf) and any(np.prod(r) == 3 for r in cf)
    assert all(np.prod(r) != 5 for r in cf)


def test_space_sizes_stay_searchable_at_256_ranks():
    big = enumerate_configs((8192, 256, 56, 56), "nchw", 256)
    assert 100 < len(big) <= 200
    assert len(enumerate_configs((8192, 256, 56, 56), "nchw", 256, SpaceOptions(max_kinds=3))) > len(big)


def test_bad_options_are_named():
    with pytest.raises(ConfigSpaceError, match="max_kinds"):
        SpaceOptions(max_kinds=4)
    with pytest.raises(ConfigSpaceError, match="aspect"):
        SpaceOptions(aspect=0.5)


def _residual_graph():
    g = Graph("res")
    x = g.input((8, 3, 8, 8))
    c = g.conv(x, 4, 3, padding=1)
    b = g.bn(c)
    r = g.relu(b)
    c2 = g.conv(r, 4, 3, padding=1)
    b2 = g.bn(c2)
    a = g.add_([b2, r])
    r2 = g.relu(a)
    p = g.global_avgpool(r2)
    f = g.linear(p, 5)
    d = g.dropout(f)
    g.loss(d)
    return g


def test_folding_groups_elementwise_followers():
    g = _residual_graph()
    groups, of = fold_groups(g)
    roots = [gr.root for gr in groups]
    assert roots == ["input", "conv2d_1", "conv2d_2", "add_1", "global_avgpool_1", "linear_1", "loss"]
    assert groups[1].members == ["conv2d_1", "batchnorm_1", "relu_1"]
    assert groups[3].members == ["add_1", "relu_2"]
    assert groups[5].members == ["linear_1", "dropout_1"]
    unfolded, _ = fold_groups(g, fold=False)
    assert len(unfolded) == len(g)
    sp = ConfigSpace(g, 4)
    # edges inside a group are gone, the residual edge (relu_1 -> add) stays
    edges = {(s, d) for _, _, s, d, _ in sp.edges()}
    assert ("relu_1", "add_1") in edges and ("conv2d_1", "batchnorm_1") not in edges
    # every member gets its group's configuration and the plan validates
    from hpcnn.strategy.plan import Plan
    choice = [len(c) - 1 for c in sp.configs]
    cfgs = sp.plan_configs(choice)
    assert cfgs["relu_1"] == cfgs["conv2d_1"] == cfgs["batchnorm_1"]
    Plan(g.name, 4, g.batch, cfgs).validate(g, 4)


def test_paper_vgg16_optimum_is_inside_the_space():
    """Table 5 of the paper (4 GPUs): n=4 on blocks 1-4, h=2 w=2 on the last
    convolutions and pool, c=4 on FC1 and FC2, c=2 on FC3, loss on one device."""
    g = build_model("vgg16", batch=128)
    sp = ConfigSpace(g, 4)
    for gi, gr in enumerate(sp.groups):
        for cfg in ({"n": 4}, {"h": 2, "w": 2}, {"c": 4}, {"c": 2}, {"n": 1}):
            names = gr.dims
            if all(d in names and (v == 1 or d in gr.splittable) and v <= gr.shape[names.index(d)]
                   for d, v in cfg.items()):
                assert sp.index_of(gi, cfg) is not None, (gr.root, cfg)


def test_fit_config_and_baselines():
    assert fit_config((8, 3, 4, 4), "nchw", 4, {"c": 4}) == {"n": 1, "c": 2, "h": 1, "w": 1}
    assert fit_config((8, 3, 4, 4), "nchw", 6, {"c": 4}) == {"n": 1, "c": 3, "h": 1, "w": 1}
    assert fit_config((2, 3), "nc", 4, {"n": 4}) == {"n": 2, "c": 1}
    g = _residual_graph()
    for P in (1, 2, 4, 6):
        for plan in baselines(g, P).values():
            plan.validate(g, P)
    dp, mp, ow = data_parallel(g, 4), model_parallel(g, 4), owt(g, 4)
    assert dp.config("conv2d_1") == {"n": 4} and dp.config("relu_1") == {"n": 4}
    assert mp.config("conv2d_1")["c"] == 4 and mp.config("loss") == {"n": 4}
    assert ow.config("conv2d_1") == {"n": 4} and ow.config("linear_1")["c"] == 4
    assert ow.config("dropout_1") == ow.config("linear_1")


@pytest.mark.parametrize("name", list(MODELS))
def test_baselines_are_valid_for_the_zoo_and_keep_the_fold_groups(name):
    """At 1..16 ranks every baseline of every zoo model validates, and the
    ops folded into a layer take its configuration, as in the search."""
    g = build_model(name, batch=8)
    groups, _ = fold_groups(g)
    folded = [grp for grp in groups if len(grp.members) > 1]
    assert folded
    for P in range(1, 17):
        for plan in baselines(g, P).values():
            plan.validate(g, P)
            for grp in folded:
                root = plan.config(grp.root)
                assert all(plan.config(m) == root for m in grp.members), (plan.name, P, grp.root)
        assert {str(c) for c in data_parallel(g, P).configs.values()} == {str({"n": min(P, 8)})}
