"""``hpcnn plan``: the table, the JSON report, the written plan, and clear
errors for bad input."""
import json

import pytest

from hpcnn.cli import main
from hpcnn.models import build_model
from hpcnn.strategy.plan import Plan


def run(capsys, *argv):
    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_table_and_plan_file(capsys, tmp_path):
    path = tmp_path / "plan.json"
    rc, out, err = run(capsys, "--model", "lenet5", "--ranks", "4", "--machine", "paper_p100_cluster",
                       "--batch", "16", "-o", str(path))
    assert rc == 0, err
    for word in ("t_c ms", "t_x ms", "t_s ms", "mem MiB", "searched", "data-parallel",
                 "model-parallel", "owt", "search time", "conv1"):
        assert word in out
    plan = Plan.load(path)
    g = build_model("lenet5", batch=16)
    plan.validate(g, 4)
    assert plan.to_dict()["schema_version"] == 1 and plan.meta["predicted_s"] > 0


def test_json_report(capsys):
    rc, out, err = run(capsys, "--model", "resnet_small", "--ranks", "2", "--machine",
                       "paper_p100_cluster", "--batch", "8", "--json")
    assert rc == 0, err
    d = json.loads(out)
    rep = d["report"]
    assert rep["ranks"] == 2 and rep["batch"] == 8
    assert {"data-parallel", "model-parallel", "owt"} <= set(rep["baselines"])
    assert rep["predicted"]["total_s"] <= min(b["total_s"] for b in rep["baselines"].values()) * (1 + 1e-12)
    assert Plan.from_dict(d["plan"]).world == 2
    assert rep["timing"]["total_s"] >= rep["timing"]["search_s"]


def test_memory_limit_option(capsys):
    rc, out, err = run(capsys, "--model", "lenet5", "--ranks", "2", "--machine", "paper_p100_cluster",
                       "--batch", "8", "--memory", "4")
    assert rc == 0, err
    assert "memory limit 4.000 GiB per rank" in out
    rc, out, err = run(capsys, "--model", "lenet5", "--ranks", "2", "--machine", "paper_p100_cluster",
                       "--batch", "8", "--memory", "1e-6")
    assert rc == 2 and "no plan fits" in err


@pytest.mark.parametrize("argv,msg", [
    (["--model", "nonet", "--ranks", "2", "--machine", "paper_p100_cluster"], "unknown model 'nonet'"),
    (["--model", "lenet5", "--ranks", "0", "--machine", "paper_p100_cluster"], "--ranks must be a positive"),
    (["--model", "lenet5", "--ranks", "2", "--machine", "nowhere"], "neither a file nor a known machine"),
    (["--model", "lenet5", "--ranks", "2", "--machine", "paper_p100_cluster", "--batch", "0"],
     "batch must be a positive"),
])
def test_bad_input_is_a_clear_error(capsys, argv, msg):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert msg in err and "Traceback" not in err
