"""``hpcnn bench train`` runs end to end in a tiny configuration and reports
every sub-run, the ratios and the same-function checks.  No assertion on
speed: only on the structure of the output and on the losses (the same
weights and data give the same first-step loss in hpcnn and PyTorch)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from mpi_launch import ROOT, mpi_env


def test_torch_peer_is_resnet18_with_hpcnn_weights():
    import torch
    from hpcnn.bench.kernels import copy_weights_to_torch, torch_resnet18
    from hpcnn.models import build_model
    from hpcnn.runtime.sequential import SequentialModel

    g = build_model("resnet18", batch=2, image_size=32, num_classes=1000)
    m = torch_resnet18(torch, 1000)
    assert sum(p.numel() for p in m.parameters()) == g.num_params() == 11_689_512
    g = build_model("resnet18", batch=2, image_size=32, num_classes=7)
    m = torch_resnet18(torch, 7).double()
    ref = SequentialModel(g, seed=3, dtype=np.float64)
    assert copy_weights_to_torch(torch, m, ref) == len(m.state_dict()) - sum(
        k.endswith("num_batches_tracked") for k in m.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([1, 5])
    loss_h, logits_h = ref.forward(x.numpy(), y.numpy())
    logits_t = m.train()(x)
    loss_t = torch.nn.functional.cross_entropy(logits_t, y)
    assert abs(loss_h - float(loss_t.detach())) < 1e-9 * abs(float(loss_t.detach()))
    assert float((logits_t.detach() - torch.from_numpy(logits_h)).abs().max()) < 1e-8


@pytest.mark.parametrize("args,names", [(["--cores", "3"], "--cores"), (["--steps", "0"], "--steps"),
                                        (["--classes", "1"], "--classes")])
def test_bench_train_bad_arguments(args, names):
    r = subprocess.run([sys.executable, "-m", "hpcnn", "bench", "train"] + args, cwd=ROOT, env=mpi_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and names in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_bench_train_tiny(tmp_path):
    out = tmp_path / "train.json"
    r = subprocess.run([sys.executable, "-m", "hpcnn", "bench", "train", "--batch", "4", "--image-size", "32",
                        "--classes", "10", "--steps", "2", "--warmup", "1", "--rounds", "2", "--json", str(out)],
                       cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "## Training throughput" in r.stdout and "hpcnn / PyTorch at 1 rank" in r.stdout
    res = json.loads(out.read_text())
    assert res["config"]["cores"] == 2 and res["config"]["batch_per_rank"] == 4
    runs = res["results"]
    assert set(runs) == {"hpcnn-1", "torch-1", "hpcnn-2-dp", "hpcnn-2-search", "ddp-2"}
    for key, run in runs.items():
        ranks = 1 if key.endswith("-1") else 2
        assert run["ranks"] == ranks and run["threads_per_rank"] == 2 // ranks
        assert len(run["step_times_s"]) == 4 and all(t > 0 for t in run["step_times_s"])
        assert run["rounds"] == 2 and run["best_round_median_s"] == min(run["round_medians_s"])
        assert run["images_per_s"] == pytest.approx(ranks * 4 / run["median_step_s"])
        assert len(run["losses"]) == 3
        assert run["rank0_seconds_by_part" if key.startswith("hpcnn") else "params"]
        assert run["params"] == runs["hpcnn-1"]["params"]
    assert list(runs["hpcnn-2-dp"]["plan_layer_configs"]) == ["n=2"]
    search = runs["hpcnn-2-search"]
    assert search["search_s"] > 0
    # trials run when the machine file cannot tell the search's plan from a
    # baseline (plan.trials = auto); then the run trains what they chose
    if "trials" in search:
        chosen = search["trials"]["chosen"]
        assert chosen in {c["name"] for c in search["trials"]["candidates"]}
        assert all(c["measured_s"] > 0 for c in search["trials"]["candidates"])
        assert search["plan"] == f"searched, trials chose {chosen}"
    else:
        assert search["plan"] == "searched"
    ratios = res["summary"]["ratios"]
    for k in ("hpcnn_vs_torch_1rank", "scaling_hpcnn_2_dp", "scaling_hpcnn_2_search", "scaling_ddp_2",
              "hpcnn_2_dp_vs_ddp_2", "hpcnn_2_search_vs_ddp_2"):
        assert ratios[k] > 0 and res["summary"]["ratios_fastest_steps"][k] > 0
        assert res["summary"]["ratios_best_round"][k] > 0
    assert ratios["scaling_ddp_2"] == pytest.approx(runs["ddp-2"]["images_per_s"] / runs["torch-1"]["images_per_s"])
    assert set(res["summary"]["targets"]) == {"hpcnn_vs_torch_1rank_at_least_0.5", "scaling_hpcnn_dp_at_least_ddp",
                                              "scaling_hpcnn_search_at_least_ddp"}
    # the same function: same weights and data give the same first loss
    checks = res["summary"]["checks"]
    # (float32; batch norm over 4 samples at 1x1 pixels amplifies rounding)
    assert checks["first_loss_rel_diff_hpcnn_torch_1rank"] < 1e-3
    assert checks["first_loss_rel_diff_hpcnn_dp_search_2ranks"] < 1e-4
