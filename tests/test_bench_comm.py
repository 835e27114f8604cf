"""``hpcnn bench comm`` launches mpiexec itself, measures every exchange on
every transport (region assembled and as pieces) and the Alltoallv of the
same bytes, and reports bytes that equal the exchange plans' bytes; the
training-step share (overlap on and off) and the conv stack's overlap."""
import json
import subprocess
import sys

from mpi_launch import ROOT, mpi_env


def test_bench_comm_small(tmp_path):
    out = tmp_path / "comm.json"
    r = subprocess.run([sys.executable, "-m", "hpcnn", "bench", "comm", "--ranks", "2", "--repeat", "2",
                        "--warmup", "1", "--scale", "0.1", "--steps", "1", "--image-size", "8",
                        "--batch", "4", "--stack-batch", "2", "--stack-channels", "4", "--stack-image", "8",
                        "--stack-depth", "2", "--stack-steps", "1", "--json", str(out)],
                       cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for title in ("## Exchange time", "## Share of a training step", "## Halo hidden behind"):
        assert title in r.stdout, r.stdout[-2000:]
    (res,) = json.loads(out.read_text())
    assert res["ranks"] == 2 and res["nodes"] == 1
    from hpcnn.bench.comm import _cases
    from hpcnn.parallel import ExchangePlan, Layout, needed_boxes
    from hpcnn.parallel.comm import TRANSPORTS
    rows = res["exchanges"]
    assert len(rows) == len(_cases(2, 0.1))
    for row, (name, kind, src, op, dst_deg) in zip(rows, _cases(2, 0.1)):
        assert row["case"] == name
        dst = Layout(src.shape if op is None else op.infer_shape([src.shape]), dst_deg)
        needs = dst.boxes() if op is None else needed_boxes(op, 0, dst, [src.shape])
        assert row["total_bytes"] == ExchangePlan.compile(src, needs, 4).total_bytes() > 0
        for t in TRANSPORTS:
            for key in (f"{t}_s", f"{t}_pieces_s", f"{t}_adjoint_s"):
                assert row[key] > 0
        assert row["alltoallv_s"] > 0 and row["local_copy_s"] > 0
        assert row["chosen"] in TRANSPORTS
    plans = res["training_step"]["plans"]
    assert set(plans) == {"spatial (h=P, dense n=P)", "spatial, overlap off", "data parallel (n=P)"}
    assert plans["spatial (h=P, dense n=P)"]["bytes_per_step_all_ranks"]["halo"] > 0
    assert plans["spatial (h=P, dense n=P)"]["bytes_per_step_all_ranks"] == \
        plans["spatial, overlap off"]["bytes_per_step_all_ranks"]
    assert all(0 < p["comm_share"] < 1 for p in plans.values())
    stack = res["overlap_stack"]
    assert stack["halo_bytes_per_step"] > 0
    for k in ("overlap", "no_overlap"):
        assert stack[k]["steps"] > 0 and stack[k]["halo"] > 0 and stack[k]["compute"] > 0
    assert stack["overlap"]["flight"] > 0
    pred = stack["predicted"]
    # the overlap term can hide a stack's whole transfer (local.json fits no
    # latency per exchange), never more than the exchange costs without it
    assert pred["no_overlap"] > 0 and 0 <= pred["overlap"] <= pred["no_overlap"]
    assert pred["machine"] == "local"
