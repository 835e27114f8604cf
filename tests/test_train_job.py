"""End-to-end tests of ``hpcnn train`` under mpiexec: the default job's
accuracy, restart equivalence (bitwise on the same plan and rank count,
1e-12 across rank counts and plans), and every failure path ending every
rank promptly with a clear message while keeping the last good checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpi_launch import ROOT, mpi_env, mpiexec, run_mpi

PY = sys.executable


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("digits")
    out = d / "digits.h5"
    r = subprocess.run([PY, "-m", "hpcnn", "data", "digits", "-o", str(out)], cwd=ROOT,
                       env=mpi_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


def train(nprocs, workdir, *sets, job=None, timeout=240, env=None, plan=None):
    job = job or ROOT / "jobs" / "digits.toml"
    args = [PY, "-m", "hpcnn", "train", str(job), "--set", "log.progress='lines'"]
    for s in sets:
        args += ["--set", s]
    if plan:
        args += ["--plan", str(plan)]
    t0 = time.monotonic()
    r = run_mpi(nprocs, args, timeout=timeout, env=env, cwd=workdir)
    r.seconds = time.monotonic() - t0
    return r


def base_sets(digits, ckdir=None, **kw):
    sets = [f"data.path='{digits}'", "log.metrics=''"]
    if ckdir is not None:
        sets.append(f"checkpoint.dir='{ckdir}'")
    else:
        sets.append("checkpoint.dir=''")
    sets += [f"{k.replace('__', '.')}={v}" for k, v in kw.items()]
    return sets


def final_params(ckfile):
    with h5py.File(ckfile, "r") as f:
        out = {}
        f.visititems(lambda n, o: out.__setitem__(n, o[...]) if isinstance(o, h5py.Dataset) else None)
        return out, dict(f.attrs)


def output(r):
    return f"--- stdout ---\n{r.stdout[-4000:]}\n--- stderr ---\n{r.stderr[-4000:]}"


# ---------------------------------------------------------------------------
def test_default_job_reaches_97_percent_on_4_ranks(digits, tmp_path):
    """The README's main command: the default job on 4 ranks with a searched plan."""
    r = train(4, tmp_path, f"data.path='{digits}'", timeout=300)
    assert r.returncode == 0, output(r)
    lines = [line for line in r.stderr.splitlines() if line.startswith("final test accuracy")]
    assert lines, output(r)
    acc = float(lines[-1].split()[3])
    assert acc >= 0.97, output(r)
    assert "plan searched" in r.stderr
    assert r.seconds < 300
    metrics = [json.loads(x) for x in (tmp_path / "runs/digits/metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["kind"] == "final" and metrics[-1]["test_accuracy"] == pytest.approx(acc, abs=1e-4)
    assert any(m["kind"] == "eval" for m in metrics) and any(m["kind"] == "train" for m in metrics)
    assert list((tmp_path / "runs/digits/checkpoints").glob("ckpt-*.h5"))


# ---------------------------------------------------------------------------
def _plans(tmp_path):
    """A layer-wise plan for 4 ranks (spatial early, channel late) and a
    data-parallel one for 2 ranks, for the 32-sample float64 digits_cnn."""
    from hpcnn.models import build_model
    from hpcnn.strategy.plan import Plan
    g = build_model("digits_cnn", batch=32, image_size=16, num_classes=10, in_channels=1)
    cfg4 = {}
    for n in g:
        if n.name.startswith(("input", "conv1", "pool1")):
            cfg4[n.name] = {"n": 2, "h": 2}
        elif n.name.startswith(("conv2", "pool2")):
            cfg4[n.name] = {"c": 2, "w": 2}
        elif n.name in ("flatten", "dropout", "fc"):
            cfg4[n.name] = {"c": 2} if n.name == "fc" else {"n": 4}
        else:
            cfg4[n.name] = {"n": 2}
    p4 = Plan(g.name, 4, 32, cfg4, name="mixed-4")
    p4.validate(g, 4)
    p2 = Plan(g.name, 2, 32, {n.name: {"n": 2} for n in g}, name="dp-2")
    p2.validate(g, 2)
    f4, f2 = tmp_path / "plan4.json", tmp_path / "plan2.json"
    p4.save(f4)
    p2.save(f2)
    return f4, f2


def _restart_sets(digits, ck, steps):
    return base_sets(digits, ck, job__dtype="'float64'", train__batch=32, train__epochs=2,
                     train__max_steps=steps, train__eval_every=0, data__test="''",
                     checkpoint__keep=10)


def _straight_and_restarted(digits, tmp_path, f4, ranks, plan, N):
    """2N steps straight on 4 ranks with plan file ``f4``, and N steps
    there, a checkpoint, then N more on ``ranks`` ranks with ``plan``: the
    final parameters of both (and the restarted run's output and metadata)."""
    straight = train(4, tmp_path, *_restart_sets(digits, tmp_path / "a", 2 * N), plan=f4)
    assert straight.returncode == 0, output(straight)
    first = train(4, tmp_path, *_restart_sets(digits, tmp_path / "b", N), plan=f4)
    assert first.returncode == 0, output(first)
    second = train(ranks, tmp_path, *_restart_sets(digits, tmp_path / "b", 2 * N), plan=plan)
    assert second.returncode == 0, output(second)
    a, meta_a = final_params(tmp_path / "a" / f"ckpt-{2 * N:08d}.h5")
    b, meta_b = final_params(tmp_path / "b" / f"ckpt-{2 * N:08d}.h5")
    return a, b, meta_a, meta_b, second


def test_restart_is_bitwise_on_same_plan_and_ranks(digits, tmp_path):
    N = 6
    f4, _ = _plans(tmp_path)
    a, b, meta_a, meta_b, second = _straight_and_restarted(digits, tmp_path, f4, 4, f4, N)
    assert f"at step {N}" in second.stderr and "resumed from" in second.stderr, output(second)
    assert meta_a["step"] == meta_b["step"] == 2 * N
    assert set(a) == set(b) and len(a) > 10
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{k} differs after a restart on the same plan"


def test_restart_on_other_rank_count_and_plan(digits, tmp_path):
    """4 ranks with a layer-wise plan, a checkpoint, then 2 ranks with a
    data-parallel plan: within 1e-12 (relative, float64) of 4 ranks straight."""
    N = 6
    f4, f2 = _plans(tmp_path)
    a, b, _, meta_b, second = _straight_and_restarted(digits, tmp_path, f4, 2, f2, N)
    assert "written on 4 ranks" in second.stderr, output(second)
    assert meta_b["world"] == 2
    for k in a:
        scale = max(np.abs(a[k]).max(), 1e-300)
        err = np.abs(a[k] - b[k]).max() / scale
        assert err <= 1e-12, f"{k}: relative difference {err:.2e} after resharding 4 -> 2 ranks"
    # the restart really changed something: the runs moved the weights
    with h5py.File(tmp_path / "b" / f"ckpt-{N:08d}.h5", "r") as f:
        assert not np.array_equal(f["params/fc/weight"][...], a["params/fc/weight"])


# ---------------------------------------------------------------------------
def _ends_everywhere(r, code=None):
    assert r.returncode != 0 if code is None else r.returncode == code, output(r)
    assert r.seconds < 30 + 15, f"took {r.seconds:.0f} s\n{output(r)}"


def test_unknown_key_in_job_file(digits, tmp_path):
    job = tmp_path / "bad.toml"
    job.write_text((ROOT / "jobs/digits.toml").read_text().replace("[train]", "[train]\nbatchsize = 3"))
    r = train(2, tmp_path, *base_sets(digits), job=job)
    _ends_everywhere(r, 2)
    assert "unknown key train.batchsize" in r.stderr
    assert r.stderr.count("unknown key train.batchsize") == 1   # said once, by rank 0


def test_bad_value_names_the_key(digits, tmp_path):
    r = train(2, tmp_path, *base_sets(digits), "train.epochs=-1")
    _ends_everywhere(r, 2)
    assert "train.epochs" in r.stderr and "-1" in r.stderr


def test_missing_data_file(tmp_path):
    r = train(2, tmp_path, "data.path='nowhere/digits.h5'", "checkpoint.dir=''")
    _ends_everywhere(r, 2)
    assert "nowhere/digits.h5" in r.stderr and "does not exist" in r.stderr


def test_corrupt_data_file(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(4096))
    r = train(2, tmp_path, f"data.path='{bad}'", "checkpoint.dir=''")
    _ends_everywhere(r, 2)
    assert "bad.h5" in r.stderr and "not a readable HDF5 file" in r.stderr


def test_plan_for_wrong_world_size(digits, tmp_path):
    _, f2 = _plans(tmp_path)
    r = train(4, tmp_path, *base_sets(digits, train__batch=32), plan=f2)
    _ends_everywhere(r, 2)
    assert "made for 2 ranks but the job has 4" in r.stderr


def test_diverging_loss_names_the_step(digits, tmp_path):
    r = train(2, tmp_path, *base_sets(digits, tmp_path / "ck", optimizer__lr=1e12, optimizer__momentum=0.0, optimizer__nesterov='false',
                                      schedule__warmup_epochs=0, train__max_steps=20))
    _ends_everywhere(r, 3)
    assert "training diverged" in r.stderr and "at step" in r.stderr


def test_rank_raising_mid_step_ends_every_rank(digits, tmp_path):
    r = train(3, tmp_path, *base_sets(digits, train__max_steps=50), env={"HPCNN_FAULT": "raise:3:1"})
    _ends_everywhere(r)
    assert "[hpcnn rank 1]" in r.stderr and "injected fault on rank 1 after step 3" in r.stderr


def test_rank_killed_ends_every_rank(digits, tmp_path):
    r = train(3, tmp_path, *base_sets(digits, train__max_steps=200), env={"HPCNN_FAULT": "kill:3:2"})
    _ends_everywhere(r)


def test_kill_during_checkpoint_keeps_previous_one(digits, tmp_path):
    ck = tmp_path / "ck"
    r = train(2, tmp_path, *base_sets(digits, ck, train__max_steps=5))
    assert r.returncode == 0, output(r)
    good = ck / "ckpt-00000005.h5"
    before = good.read_bytes()
    r = train(2, tmp_path, *base_sets(digits, ck, train__max_steps=10),
              env={"HPCNN_FAULT": "kill-in-checkpoint:0"})
    _ends_everywhere(r)
    assert sorted(p.name for p in ck.glob("ckpt-*.h5")) == ["ckpt-00000005.h5"]
    assert good.read_bytes() == before
    r = train(2, tmp_path, *base_sets(digits, ck, train__max_steps=10))
    assert r.returncode == 0 and "at step 5" in r.stderr, output(r)
    assert (ck / "ckpt-00000010.h5").exists()


def test_corrupt_checkpoint_is_a_clear_error(digits, tmp_path):
    ck = tmp_path / "ck"
    r = train(2, tmp_path, *base_sets(digits, ck, train__max_steps=3))
    assert r.returncode == 0, output(r)
    f = ck / "ckpt-00000003.h5"
    data = bytearray(f.read_bytes())
    # flip bytes inside the fc weight's chunk (fletcher32 catches it)
    with h5py.File(f, "r") as h:
        info = h["params/fc/weight"].id.get_chunk_info(0)
        off = info.byte_offset
    for i in range(off + 16, off + 48):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))
    r = train(2, tmp_path, *base_sets(digits, ck, train__max_steps=6))
    _ends_everywhere(r, 2)
    assert "ckpt-00000003.h5" in r.stderr and "params/fc/weight" in r.stderr


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(digits, tmp_path):
    ck = tmp_path / "ck"
    args = [mpiexec(), "-n", "2", PY, "-m", "hpcnn", "train", str(ROOT / "jobs/digits.toml"),
            "--set", "log.progress='lines'"]
    for s in base_sets(digits, ck, train__epochs=50, train__log_every=1):
        args += ["--set", s]
    p = subprocess.Popen(args, cwd=tmp_path, env=mpi_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    seen = ""
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        seen += line
        if line.startswith("step 5/"):
            break
    os.killpg(p.pid, signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    err = seen + err
    assert p.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM at step" in err, err[-3000:]
    step = int(err.split("stopped by SIGTERM at step")[1].split()[0].rstrip(";"))
    assert (ck / f"ckpt-{step:08d}.h5").exists()


def machine_file(tmp_path, name, **changes) -> Path:
    """The shipped local machine with ``changes`` (a layout, a version)."""
    from hpcnn.strategy.machine import load_machine
    d = load_machine("local").to_dict()
    d.update(changes)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(d))
    return path


def test_search_says_when_the_machine_file_does_not_fit(digits, tmp_path):
    """plan.mode = "search" with a file calibrated on 2 nodes x 2 ranks, the
    job on 2 ranks of this node: one line at start names both layouts (the
    job's found by MPI) and what to re-run; a file calibrated here for an
    older cost model is named for that alone."""
    import socket
    from hpcnn.strategy.machine import COST_MODEL_VERSION
    two = machine_file(tmp_path, "two", nodes=2, ranks_per_node=2, hosts=["labn0", "labn1"],
                       cost_model_version=COST_MODEL_VERSION)
    old = machine_file(tmp_path, "old", nodes=1, ranks_per_node=256, hosts=[socket.gethostname()],
                       cost_model_version=1)
    for path, want, unwanted in [
            (two, "calibrated on 2 nodes x 2 ranks (labn0, labn1), this job runs on 1 node x 2 ranks", "cost-model"),
            (old, f"written for cost-model version 1, older than this hpcnn's {COST_MODEL_VERSION}", "calibrated on")]:
        r = train(2, tmp_path, *base_sets(digits, train__max_steps=1, data__test="''"),
                  f"plan.machine='{path}'")
        assert r.returncode == 0, output(r)
        lines = [line for line in r.stderr.splitlines() if "hpcnn: warning: machine file" in line]
        assert len(lines) == 1, output(r)                     # rank 0 only, once
        assert want in lines[0] and unwanted not in lines[0] and "re-run hpcnn calibrate" in lines[0], lines
        # at start: before the job's description
        assert r.stderr.index(lines[0]) < r.stderr.index("job digits:"), output(r)


def test_stall_watchdog_names_the_late_rank(digits, tmp_path):
    r = train(3, tmp_path, *base_sets(digits, train__max_steps=6, log__stall_seconds=1),
              env={"HPCNN_FAULT": "sleep:2:2:4"})
    assert r.returncode == 0, output(r)
    assert "[hpcnn watchdog] stall: ranks [2] have not finished step" in r.stderr, output(r)


def test_trace_and_layer_table(digits, tmp_path):
    trace = tmp_path / "trace.json"
    f4, _ = _plans(tmp_path)
    r = subprocess.run([mpiexec(), "-n", "4", PY, "-m", "hpcnn", "train", str(ROOT / "jobs/digits.toml"),
                        "--plan", str(f4), "--trace", str(trace), "--trace-steps", "3"]
                       + sum((["--set", s] for s in base_sets(digits, train__batch=32, train__max_steps=6)), []),
                       cwd=tmp_path, env=mpi_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, output(r)
    events = json.loads(trace.read_text())["traceEvents"]
    ranks = {e["pid"] for e in events}
    cats = {e.get("cat") for e in events if e["ph"] == "X"}
    assert ranks == {0, 1, 2, 3}
    assert {"forward", "backward", "halo", "redistribution", "allreduce"} <= cats, cats
    assert all(e["dur"] >= 0 for e in events if e["ph"] == "X")
    # the transport chosen for each exchange at start, and the exchanges in
    # flight behind the convolutions' compute on a row of their own
    assert "transport" in cats, cats
    flights = [e for e in events if e.get("cat") == "halo in flight"]
    assert flights and all(e["tid"] == 1 for e in flights)
    assert all(e["tid"] == 0 for e in events if e["ph"] == "X" and not e["cat"].endswith(" in flight"))
    assert "per-layer time" in r.stderr and "conv1" in r.stderr


# ---------------------------------------------------------------------------
# training recipes through the job loop
RECIPE = ["optimizer.kind='lamb'", "optimizer.lr=0.01", "optimizer.nesterov=false", "optimizer.weight_decay=0.01",
          "optimizer.clip_norm=0.5", "optimizer.exclude_bias_and_norm=true", "train.batch=64", "train.accumulate=2",
          "train.label_smoothing=0.1", "augment.flip=true", "train.log_every=1"]


def test_restart_with_lamb_accumulation_clipping_and_smoothing(digits, tmp_path):
    """LAMB, 2 micro-batches of 32 per step, clipping, label smoothing,
    crops and flips: N steps, a checkpoint, N more continue bitwise on the
    same plan and 4 ranks, and within 1e-12 on 2 ranks under another plan
    (the plans are for the micro-batch of 32)."""
    import shutil
    N = 4
    f4, f2 = _plans(tmp_path)

    def sets(ck, steps, metrics=""):
        return _restart_sets(digits, ck, steps) + RECIPE + [f"log.metrics='{metrics}'"]
    straight = train(4, tmp_path, *sets(tmp_path / "a", 2 * N, tmp_path / "m.jsonl"), plan=f4)
    assert straight.returncode == 0, output(straight)
    assert "global batch 64 in 2 micro-batches of 32" in straight.stderr, output(straight)
    assert "optimizer lamb" in straight.stderr and "label smoothing 0.1" in straight.stderr
    records = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in records if r["kind"] == "train"]
    assert len(norms) == 2 * N and all(n > 0 for n in norms)
    first = train(4, tmp_path, *sets(tmp_path / "b", N), plan=f4)
    assert first.returncode == 0, output(first)
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    a, _ = final_params(tmp_path / "a" / f"ckpt-{2 * N:08d}.h5")
    same = train(4, tmp_path, *sets(tmp_path / "b", 2 * N), plan=f4)
    assert same.returncode == 0 and f"at step {N}" in same.stderr, output(same)
    b, meta = final_params(tmp_path / "b" / f"ckpt-{2 * N:08d}.h5")
    assert json.loads(meta["optimizer"]) == {"kind": "lamb", "steps": 2 * N}
    assert any(k.startswith("optimizer/exp_avg_sq/") for k in a)
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{k} differs after a restart on the same plan"
    other = train(2, tmp_path, *sets(tmp_path / "c", 2 * N), plan=f2)
    assert other.returncode == 0 and "written on 4 ranks" in other.stderr, output(other)
    c, _ = final_params(tmp_path / "c" / f"ckpt-{2 * N:08d}.h5")
    for k in a:
        err = np.abs(a[k] - c[k]).max() / max(np.abs(a[k]).max(), 1e-300)
        assert err <= 1e-12, f"{k}: relative difference {err:.2e} after resharding 4 -> 2 ranks"


def test_resuming_with_another_optimiser_starts_it_fresh(digits, tmp_path):
    ck = tmp_path / "ck"
    r = train(2, tmp_path, *base_sets(digits, ck, train__max_steps=3, data__test="''"))
    assert r.returncode == 0, output(r)
    r = train(2, tmp_path, *base_sets(digits, ck, train__max_steps=5, data__test="''"),
              "optimizer.kind='adamw'", "optimizer.nesterov=false", "optimizer.lr=0.001")
    assert r.returncode == 0, output(r)
    assert "was written by optimizer.kind = 'sgd'; adamw starts with fresh state" in r.stderr, output(r)
    _, meta = final_params(ck / "ckpt-00000005.h5")
    assert json.loads(meta["optimizer"]) == {"kind": "adamw", "steps": 2}


def test_the_imagenet_lars_recipe_runs(tmp_path):
    """jobs/imagenet_resnet50_lars.toml as shipped (ResNet-50, LARS,
    warm-up, label smoothing, crops, flips, resize and centre crop for
    evaluation), on small synthetic images stored larger than the
    network's input: two steps on 2 ranks."""
    data = tmp_path / "synth.h5"
    r = subprocess.run([PY, "-m", "hpcnn", "data", "synth", "-o", str(data), "--shape", "3x40x40", "-n", "32",
                        "--test-samples", "8", "--classes", "10"], cwd=ROOT, env=mpi_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = train(2, tmp_path, f"data.path='{data}'", "model.image_size=32", "augment.resize=36", "train.batch=8",
              "train.max_steps=2", "checkpoint.dir=''", "log.metrics=''", "plan.mode='data-parallel'",
              job=ROOT / "jobs" / "imagenet_resnet50_lars.toml")
    assert r.returncode == 0, output(r)
    assert "model resnet50" in r.stderr and "optimizer lars lr 10" in r.stderr, output(r)
    assert "training images: random resized crop" in r.stderr and "horizontal flip to 32x32 from 40x40" in r.stderr
    assert "evaluation images: resize to 36, centre crop to 32x32 from 40x40" in r.stderr
    assert "final test accuracy" in r.stderr
