"""The search on volumes: the configuration space includes depth splits
with near-cubic tiles, and a memory limit under which one sample per rank
does not fit (CosmoFlow at 256^3) gives a plan that fits by splitting the
early layers spatially, while the same limit makes data parallelism an
error that says why."""
from __future__ import annotations

import numpy as np
import pytest

from hpcnn.models import build_model
from hpcnn.strategy.baselines import data_parallel
from hpcnn.strategy.config_space import SpaceOptions, enumerate_configs
from hpcnn.strategy.planner import GiB, MemoryLimitError, check_plan_memory, search_plan

SPLITTABLE = ("n", "c", "d", "h", "w")


def test_volume_configurations_split_depth_with_near_cubic_tiles():
    rows = enumerate_configs((4, 32, 64, 64, 64), SPLITTABLE, 16)
    cfgs = {tuple(int(x) for x in r) for r in rows}
    assert (1, 1, 2, 2, 2) in cfgs and (1, 1, 4, 2, 2) in cfgs and (1, 1, 4, 1, 1) in cfgs
    assert (1, 1, 8, 1, 1) not in cfgs                       # a strip of more than 4 parts
    assert (1, 1, 8, 2, 1) not in cfgs                       # 8 against 2: not near-cubic
    assert (2, 2, 2, 1, 1) not in cfgs                       # three kinds of split
    for r in rows:
        sp = [int(x) for x in r[2:] if x > 1]
        if len(sp) > 1:
            assert max(sp) <= 2 * min(sp)
    # three kinds allowed on request
    assert (2, 2, 2, 1, 1) in {tuple(int(x) for x in r)
                               for r in enumerate_configs((4, 32, 64, 64, 64), SPLITTABLE, 16,
                                                          SpaceOptions(max_kinds=3))}


def test_memory_limit_at_256_cubed_splits_the_early_layers():
    g = build_model("cosmoflow", batch=1, image_size=256)
    limit = 8.0
    plan, rep = search_plan(g, 4, "paper_p100_cluster", memory_gib=limit)
    used = rep["memory"]["plan_bytes"]
    assert used <= limit * GiB
    assert rep["memory"]["status"].startswith("fits")
    for layer in ("conv1", "act1", "pool1", "conv2"):
        cfg = plan.config(layer)
        assert cfg.get("d", 1) * cfg.get("h", 1) * cfg.get("w", 1) > 1, (layer, cfg)
    assert check_plan_memory(g, plan, 4, "paper_p100_cluster", limit) == pytest.approx(used, rel=1e-9)
    dp = data_parallel(g, 4)
    with pytest.raises(MemoryLimitError, match=r"'data-parallel' needs about \d+\.\d\d GiB per rank.*"
                                               r"largest conv1.*plan.memory_gib = 8.*plan.mode = \"search\""):
        check_plan_memory(g, dp, 4, "paper_p100_cluster", limit)
    # without a limit the data-parallel plan is only slower, not refused
    assert check_plan_memory(g, dp, 4, "paper_p100_cluster", 1000) > 2 * limit * GiB


def test_cosmoflow_search_at_many_ranks_beats_or_ties_the_baselines():
    for P in (16, 64):
        g = build_model("cosmoflow", batch=P)
        plan, rep = search_plan(g, P, "paper_p100_cluster")
        plan.validate(g, P)
        found = rep["predicted"]["total_s"]
        assert np.isfinite(found) and found > 0
        for name, b in rep["baselines"].items():
            assert found <= b["total_s"] * (1 + 1e-9), (P, name)
