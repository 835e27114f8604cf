"""The cost model's per-rank memory of a volume plan is the memory a rank
really takes: CosmoFlow at one 128^3 sample on 4 ranks under the plan the
memory-limited search returns (a 1 GiB limit: split over space), two
training steps; the estimate is within 20% of the largest growth of a
rank's peak resident memory (tests/volume_memory_probe.py)."""
import json
import sys

from mpi_launch import ROOT, run_mpi


def test_memory_estimate_is_within_20_percent_of_the_measured_peak():
    r = run_mpi(4, [sys.executable, str(ROOT / "tests" / "volume_memory_probe.py"), "128", "1"], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])
    est, peak = res["estimate"], max(res["grown"])
    print(f"CosmoFlow 128^3, 4 ranks, {res['configs']}: estimate {est / 2**20:.0f} MiB per rank, "
          f"measured peak growth {peak / 2**20:.0f} MiB (ranks: {[g >> 20 for g in res['grown']]})")
    assert est <= 1 << 30                              # the plan fits its limit
    assert res["configs"]["conv1"].get("n", 1) == 1    # one sample: the split is spatial
    assert abs(est - peak) <= 0.2 * peak, (est, peak)
