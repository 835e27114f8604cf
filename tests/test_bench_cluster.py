"""``hpcnn bench cluster`` (issue 11, item 4): the summary of a row and the
targets judged on it (pure); the refusal without root; and, as root, one
short run on an emulated cluster of two nodes (a tiny model, one link
setting, one layout): the machine file calibrated across the nodes, every
plan measured and predicted, the trials' choice, JSON and plot.  No
assertion on speed: the numbers are in docs/performance.md."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hpcnn.bench.cluster import parse_layout, parse_model, plot, summarise_row, targets
from hpcnn.cluster import unavailable
from hpcnn.strategy.machine import COST_MODEL_VERSION, load_machine
from mpi_launch import ROOT, mpi_env

PY = sys.executable


def fake_result(steps: dict, searched_alias=None, trialled="searched"):
    """What ``hpcnn bench model`` returns for one model: a row per distinct
    plan with its timed steps and predictions (10% high, the file's 20%)."""
    rows = []
    for name, ts in steps.items():
        plans = [name] + (["searched"] if name == searched_alias else [])
        if name == "searched" and searched_alias:
            continue
        m = sorted(ts)[len(ts) // 2]
        rows.append({"plans": plans, "measured_s": m, "measured_steps_s": ts, "predicted_s": m * 1.1,
                     "error": 0.1, "predicted_file_s": m * 1.2, "error_file": 0.2,
                     "trialled": trialled in plans, "plan": {"configs": {}}})
    return {"model": "vgg16", "image_size": 32, "batch": 32, "ranks": 2, "rows": rows,
            "trials": {"chosen": [trialled]}, "load_average": [1.0, 1.0, 1.0]}


def test_a_row_says_how_the_trialled_plan_compares():
    res = fake_result({"data-parallel": [2.0, 2.1, 2.2], "owt": [1.2, 1.25, 1.3], "model-parallel": [5.0, 5.1, 5.2],
                       "searched": [1.0, 1.05, 1.1]})
    row = summarise_row(res, "1gbit", "2x1", 1.19e8)
    assert row["trialled"] == "searched" and not row["searched_is_a_baseline"]
    assert row["speedup_over_dp"] == pytest.approx(2.1 / 1.05)
    assert row["fastest_baseline"] == "owt" and row["vs_fastest_baseline"] == pytest.approx(1.05 / 1.25)
    assert row["searched_beats_all"] and row["searched_beats_all_steps"]
    assert row["spread"]["owt"] == (1.2, 1.3)
    # overlapping steps: faster by the median, not by every step
    res = fake_result({"data-parallel": [2.0, 2.1, 2.2], "owt": [1.0, 1.25, 1.3], "model-parallel": [5.0, 5.1, 5.2],
                       "searched": [1.0, 1.05, 1.1]})
    row2 = summarise_row(res, "10gbit", "2x1", 1.19e9)
    assert row2["searched_beats_all"] and not row2["searched_beats_all_steps"]
    # the searched plan is OWT and the trials chose data parallelism
    res = fake_result({"data-parallel": [1.0, 1.0, 1.0], "owt": [1.1, 1.1, 1.1], "model-parallel": [3.0, 3, 3]},
                      searched_alias="owt", trialled="data-parallel")
    row3 = summarise_row(res, "unshaped", "2x2", 2e9)
    assert row3["searched_is_a_baseline"] and row3["plans"]["searched"]["same_as"] == ["owt"]
    assert row3["trialled"] == "data-parallel" and row3["vs_fastest_baseline"] == 1.0
    t = targets([row, row2, row3])
    assert t["trialled_within_5pc_of_fastest_baseline"]["met"]
    assert t["vgg16_at_slowest_link_1.5x"] == {"met": True, "speedups": {"2x1": pytest.approx(2.1 / 1.05)}}
    assert t["layer_wise_row_beating_all"]["rows_every_step"] == ["2x1 1gbit vgg16@32"]
    assert t["profile_error"]["median"] == pytest.approx(0.1) and t["profile_error"]["met"]
    assert t["machine_file_error"]["max"] == pytest.approx(0.2) and t["machine_file_error"]["met"]


def test_a_failed_model_is_reported_and_the_run_fails_with_the_other_rows_kept(tmp_path, capsys):
    """A model whose benchmark failed (bench cluster then goes on with the
    others): the report names it with its last error line, the rows
    measured stand, and the command's status is 1 (from --from-json too)."""
    from hpcnn.bench.cluster import report, run
    res = fake_result({"data-parallel": [2.0], "owt": [1.2], "model-parallel": [5.0], "searched": [1.0]})
    row = summarise_row(res, "1gbit", "2x1", 1.19e8)
    out = {"rows": [row], "calibrations": [], "targets": targets([row]), "seconds": 60.0,
           "failures": [{"rate": "1gbit", "layout": "2x2", "model": "alexnet@96",
                         "error": "Traceback ...\nRuntimeError: a part was read before wait()\n"}]}
    text = report(out)
    assert "FAILED: alexnet@96 on 2x2 at 1gbit: RuntimeError: a part was read before wait()" in text
    assert "| 2x1 | 1gbit | vgg16@32 |" in text
    path = tmp_path / "results.json"
    path.write_text(json.dumps(out))
    import argparse
    args = argparse.Namespace(from_json=str(path), plot=None, paper_report=None)
    assert run(args) == 1 and "FAILED: alexnet@96" in capsys.readouterr().out
    out["failures"] = []
    path.write_text(json.dumps(out))
    assert run(args) == 0


def test_plot_and_arguments(tmp_path):
    res = fake_result({"data-parallel": [2.0], "owt": [1.2], "model-parallel": [5.0], "searched": [1.0]})
    rows = [summarise_row(res, r, lay, bw) for r, bw in (("1gbit", 1.19e8), ("10gbit", 1.19e9))
            for lay in ("2x1", "2x2")]
    plot(rows, tmp_path / "speedup.png")
    assert (tmp_path / "speedup.png").stat().st_size > 1000
    assert parse_layout("2x2") == (2, 2) and parse_model("vgg16@32") == ("vgg16", 32)
    for bad, msg in ((lambda: parse_layout("2by2"), "write NODESxRANKS"), (lambda: parse_layout("1x4"), "2 nodes"),
                     (lambda: parse_model("vgg16"), "give its image side")):
        with pytest.raises(SystemExit, match=msg):
            bad()


def test_refuses_without_root_saying_why(tmp_path):
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PY, "-m", "hpcnn"]
    else:
        cmd = [PY, "-m", "hpcnn"]
    r = subprocess.run(cmd + ["bench", "cluster", "--models", "lenet5@28"], capture_output=True, text=True,
                       cwd=tmp_path, env=mpi_env(), timeout=60)
    assert r.returncode != 0
    assert "hpcnn bench cluster: the emulated cluster needs root" in r.stderr, r.stderr


def test_a_short_run_on_two_emulated_nodes(tmp_path):
    """LeNet-5 on 2 nodes x 1 rank, links unshaped: calibrated across the
    nodes by the bench itself, all four plans measured and predicted (from
    the file: the run's profile, the sampler across nodes, takes a minute
    more and runs in the benchmark), the trials choose one of them."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    work = tmp_path / "work"
    r = subprocess.run([PY, "-m", "hpcnn", "bench", "cluster", "--models", "lenet5@28", "--rates", "unshaped",
                        "--layouts", "2x1", "--batch", "8", "--rounds", "2", "--no-profile",
                        "--trial-steps", "1", "--calibrate-budget", "2", "--no-runtime", "--detail",
                        "--workdir", str(work),
                        "--name", f"hbt{os.getpid() % 10000}", "--json", str(tmp_path / "out.json"),
                        "--plot", str(tmp_path / "out.png")],
                       cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(r.stdout)
    out = json.loads((tmp_path / "out.json").read_text())
    (row,) = out["rows"]
    assert (row["layout"], row["rate"], row["model"], row["ranks"]) == ("2x1", "unshaped", "lenet5@28", 2)
    for name in ("data-parallel", "owt", "model-parallel", "searched"):
        p = row["plans"][name]
        assert p["measured_s"] > 0 and p["predicted_s"] > 0 and p["predicted_file_s"] > 0
        assert len(p["steps_s"]) == 2
    assert row["trialled"] in row["plans"]
    assert {c["plans"][0] for c in row["trials"]["candidates"]} >= {"data-parallel"}
    m = load_machine(work / "machine-unshaped-2x1.json")
    assert (m.nodes, m.ranks_per_node, m.cost_model_version) == (2, 1, COST_MODEL_VERSION)
    assert "allreduce.inter_node" in m.collectives
    assert out["calibrations"][0]["inter_node_bandwidth"] == m.inter.bandwidth
    assert set(out["targets"]) >= {"trialled_within_5pc_of_fastest_baseline", "profile_error",
                                   "machine_file_error", "layer_wise_row_beating_all"}
    assert "trials chose" in r.stdout and (tmp_path / "out.png").is_file()
    # --detail: each plan's traced categories beside its predicted parts, kept in the work directory
    res = json.loads((work / "bench-unshaped-2x1-lenet5-28.json").read_text())
    for rr in res["rows"]:
        assert rr["measured_categories_s"]["forward"] > 0 and rr["measured_categories_s"]["backward"] > 0
        assert set(rr["predicted_parts_s"]) == {"t_c", "t_s", "t_x", "t_o"}


def test_the_measured_section_of_the_paper_page_is_written_in_place(tmp_path):
    """--paper-report writes the measured section before "## Where hpcnn
    differs" and, on a later run, replaces it; the other sections stay."""
    from hpcnn.bench.cluster import PAPER_SECTION, update_paper_report
    res = fake_result({"data-parallel": [2.0], "owt": [1.2], "model-parallel": [5.0], "searched": [1.0]})
    out = {"rows": [summarise_row(res, "1gbit", "2x1", 1.19e8)], "settings": {"models": ["vgg16@32"]}}
    out["targets"] = targets(out["rows"])
    md = tmp_path / "page.md"
    md.write_text("# Page\n\n## Predicted\n\nold tables\n\n## Where hpcnn differs from the paper, and why\n\n- x\n")
    update_paper_report(md, out, tmp_path / "img" / "c.json", tmp_path / "img" / "c.png")
    text = md.read_text()
    assert text.index("## Predicted") < text.index(PAPER_SECTION) < text.index("## Where hpcnn differs")
    assert "| vgg16@32 | 2 x 1 | 1gbit | layer-wise: none of the baselines | searched | 2.00x | 1.20x | 1.5x |" in text
    assert "(img/c.json)" in text and "![speed-up" in text and "old tables" in text
    out["rows"][0]["speedup_over_dp"] = 3.0
    update_paper_report(md, out, tmp_path / "img" / "c.json")
    again = md.read_text()
    assert again.count(PAPER_SECTION) == 1 and "| 3.00x |" in again and "![speed-up" not in again
    assert again.endswith("- x\n")
