"""``hpcnn bench comm`` launches mpiexec itself, measures every exchange
with both transports and the Alltoallv of the same bytes, and reports bytes
that equal the exchange plans' bytes."""
import json
import subprocess
import sys

from mpi_launch import ROOT, mpi_env


def test_bench_comm_small(tmp_path):
    out = tmp_path / "comm.json"
    r = subprocess.run([sys.executable, "-m", "hpcnn", "bench", "comm", "--ranks", "2", "--repeat", "2",
                        "--warmup", "1", "--scale", "0.1", "--steps", "1", "--image-size", "8",
                        "--batch", "4", "--json", str(out)],
                       cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "## Exchange throughput" in r.stdout and "## Share of a training step" in r.stdout
    (res,) = json.loads(out.read_text())
    assert res["ranks"] == 2
    from hpcnn.bench.comm import _cases
    from hpcnn.parallel import ExchangePlan, Layout, needed_boxes
    for row, (name, kind, src, op, dst_deg) in zip(res["exchanges"], _cases(2, 0.1)):
        assert row["case"] == name
        dst = Layout(src.shape if op is None else op.infer_shape([src.shape]), dst_deg)
        needs = dst.boxes() if op is None else needed_boxes(op, 0, dst, [src.shape])
        assert row["total_bytes"] == ExchangePlan.compile(src, needs, 4).total_bytes() > 0
        for key in ("p2p_s", "neighbor_s", "alltoallv_s", "p2p_adjoint_s", "local_copy_s"):
            assert row[key] > 0
    plans = res["training_step"]["plans"]
    assert set(plans) == {"spatial (h=P, dense n=P)", "data parallel (n=P)"}
    assert plans["spatial (h=P, dense n=P)"]["bytes_per_step_all_ranks"]["halo"] > 0
    assert all(0 < p["comm_share"] < 1 for p in plans.values())
