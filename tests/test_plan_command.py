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
    (["--model", "lenet5", "--ranks", "2", "--machine", "paper_p100_cluster", "--nodes", "3"],
     "--nodes must be between 1 and --ranks (2)"),
])
def test_bad_input_is_a_clear_error(capsys, argv, msg):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert msg in err and "Traceback" not in err


def calibrated(tmp_path, version=None):
    """The paper's machine as `hpcnn calibrate --cluster` records a file
    measured on 2 nodes x 2 ranks (this hpcnn's cost-model version, or
    ``version``)."""
    from hpcnn.strategy.machine import COST_MODEL_VERSION, load_machine
    d = load_machine("paper_p100_cluster").to_dict()
    d.update(nodes=2, ranks_per_node=2, hosts=["labn0", "labn1"], cost_model_version=version or COST_MODEL_VERSION)
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(d))
    return path


def test_says_at_start_when_the_machine_file_does_not_fit(capsys, tmp_path):
    """One line on stderr, before the table: the layout it was calibrated on
    against the plan's (--nodes, or the machine's own placement), an older
    cost model, and what to re-run."""
    m = str(calibrated(tmp_path))
    common = ["--model", "lenet5", "--batch", "8", "--machine", m]
    rc, out, err = run(capsys, *common, "--ranks", "4")          # 2 nodes x 2: as calibrated
    assert rc == 0 and "warning" not in err, err
    rc, out, err = run(capsys, *common, "--ranks", "4", "--nodes", "1")
    assert rc == 0, err
    lines = [line for line in err.splitlines() if "warning" in line]
    assert len(lines) == 1 and lines[0].startswith(f"hpcnn: warning: machine file {m}: "), err
    assert "calibrated on 2 nodes x 2 ranks (labn0, labn1), this job runs on 1 node x 4 ranks" in lines[0]
    assert "re-run hpcnn calibrate with the job's layout" in lines[0]
    assert "searched" in out                                      # the plan is still searched
    rc, out, err = run(capsys, *common, "--ranks", "8")          # placed as 4 nodes x 2
    assert "this job runs on 4 nodes x 2 ranks" in err, err
    rc, out, err = run(capsys, "--model", "lenet5", "--batch", "8", "--ranks", "4", "--machine",
                       str(calibrated(tmp_path, version=1)))
    assert rc == 0 and "written for cost-model version 1, older than this hpcnn's" in err, err
    assert "calibrated on" not in err
