"""Plan: JSON with a schema version, and validation that names what is
wrong when a plan does not fit the model, the rank count or a layer."""
import json

import pytest

from hpcnn.models import build_model
from hpcnn.strategy.baselines import baselines, data_parallel
from hpcnn.strategy.plan import SCHEMA_VERSION, Plan, PlanError


@pytest.fixture(scope="module")
def g():
    return build_model("lenet5", batch=8)


def test_round_trip(g, tmp_path):
    for plan in baselines(g, 4).values():
        p = tmp_path / "p.json"
        plan.save(p)
        back = Plan.load(p)
        assert back == plan and back.to_dict()["schema_version"] == SCHEMA_VERSION
        back.validate(g, 4)


def test_wrong_rank_count_model_or_batch(g):
    plan = data_parallel(g, 4)
    with pytest.raises(PlanError, match="made for 4 ranks but the job has 2"):
        plan.validate(g, 2)
    other = build_model("digits_cnn", batch=8)
    with pytest.raises(PlanError, match="is for model 'lenet5'"):
        plan.validate(other, 4)
    with pytest.raises(PlanError, match="global batch 8"):
        plan.validate(build_model("lenet5", batch=16), 4)


def test_degrees_that_do_not_fit(g):
    d = data_parallel(g, 4).to_dict()
    d["configs"]["conv1"] = {"n": 16}
    with pytest.raises(PlanError, match="conv1.*larger than its size 8"):
        Plan.from_dict(d).validate(g, 4)
    d["configs"]["conv1"] = {"n": 2, "c": 4}
    with pytest.raises(PlanError, match="conv1.*need 8 ranks but the job has 4"):
        Plan.from_dict(d).validate(g, 4)
    d = data_parallel(g, 4).to_dict()
    d["configs"]["loss"] = {"c": 2}
    with pytest.raises(PlanError, match="loss"):
        Plan.from_dict(d).validate(g, 4)
    d = data_parallel(g, 4).to_dict()
    del d["configs"]["conv1"]
    with pytest.raises(PlanError, match="no configuration for layer"):
        Plan.from_dict(d).validate(g, 4)


def test_bad_json_and_schema():
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json("{")
    with pytest.raises(PlanError, match="no schema_version"):
        Plan.from_json(json.dumps({"model": "x"}))
    with pytest.raises(PlanError, match="schema version 99"):
        Plan.from_json(json.dumps({"schema_version": 99}))


def test_the_job_and_the_benchmarks_mean_one_data_parallel_plan():
    """LeNet-5, batch 10, 12 ranks: hpcnn train's plan.mode = "data-parallel"
    and the benchmarks' "data-parallel" are the same plan, every layer on
    the 10 ranks that hold a sample each (they once were n=10 against n=8)."""
    from pathlib import Path

    from hpcnn.bench.model import make_plans
    from hpcnn.job import Job
    from hpcnn.strategy.machine import load_machine
    from hpcnn.train import choose_plan
    g = build_model("lenet5", batch=10)
    job = Job.load(Path(__file__).resolve().parents[1] / "jobs/digits.toml",
                   ['plan.mode="data-parallel"', "train.batch=10"])
    plan, report = choose_plan(job, g, 12)
    assert report is None
    bench = make_plans(g, 12, load_machine("paper_p100_cluster"), ["data-parallel"])["data-parallel"]
    assert plan == bench == baselines(g, 12)["data-parallel"]
    assert {json.dumps(c) for c in plan.configs.values()} == {'{"n": 10}'}
    plan.validate(g, 12)
