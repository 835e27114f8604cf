"""hpcnn bench search: the timing rows and the figures its report quotes."""
import json
import subprocess
import sys

from hpcnn.bench.search import vgg16_fc1_bytes
from hpcnn.models import build_model
from hpcnn.strategy.machine import load_machine


def test_vgg16_fc1_traffic_is_the_gradient_against_the_gathered_features():
    by_samples, by_channels = vgg16_fc1_bytes(load_machine("paper_p100_cluster"))
    g = build_model("vgg16", batch=64)
    params = sum(s.size for s in g["fc1"].param_specs().values())
    features = g[g["fc1"].inputs[0]].shape[1]
    assert by_samples == params * 4                       # ring allreduce at 2 ranks: 2(P-1)/P
    # a channel split needs the 32 samples the other rank holds, forward and back
    assert by_channels == 2 * 32 * features * 4


def test_bench_search_times_a_small_search(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, "-m", "hpcnn", "bench", "search", "--models", "lenet5",
                        "--ranks", "4", "16", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {row["ranks"] for row in rows} == {4, 16}
    assert all(row["cpu_s"] > 0 and row["model"] == "lenet5" for row in rows)
