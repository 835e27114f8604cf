"""hpcnn eval and hpcnn predict on a checkpoint the digits job trained: the
same test accuracy and loss in one process and at 2 ranks under another
plan, equal to the sequential executor's on the checkpoint's weights; the
logits of predict from the checkpoint (in one process and on 3 ranks) and
from its ONNX export equal the sequential executor's and onnxruntime's; clear errors for a missing,
corrupt or foreign checkpoint."""
import json
import subprocess
import sys

import numpy as np
import pytest

from mpi_launch import ROOT, mpi_env, run_mpi

pytestmark = pytest.mark.slow

JOB = str(ROOT / "jobs" / "digits.toml")


def hpcnn(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "hpcnn", *map(str, args)], env=mpi_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data file, checkpoint, the --set options of the job) after 6 steps
    of the digits job on 2 ranks."""
    from hpcnn.checkpoint import latest_checkpoint
    d = tmp_path_factory.mktemp("evalpredict")
    data = d / "digits.h5"
    r = hpcnn("data", "digits", "-o", data)
    assert r.returncode == 0, r.stderr
    sets = ["--set", f"data.path={str(data)!r}", "--set", "log.metrics=''"]
    r = run_mpi(2, [sys.executable, "-m", "hpcnn", "train", JOB, *sets, "--set", "train.max_steps=6",
                    "--set", f"checkpoint.dir={str(d / 'ck')!r}", "--set", "plan.trials=0"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return d, data, latest_checkpoint(d / "ck"), sets


def _sequential(ckpt, batch):
    """The sequential executor with the checkpoint's tensors (float32)."""
    from hpcnn.onnx_export import checkpoint_network
    from hpcnn.runtime.sequential import SequentialModel
    g, params, buffers = checkpoint_network(ckpt, batch=batch)
    seq = SequentialModel(g, dtype=np.float32)
    for store, saved in ((seq.params, params), (seq.buffers, buffers)):
        for n in store:
            store[n] = {k: saved[n][k].astype(np.float32) for k in store[n]}
    return seq


def _test_images(data):
    """The test split as the digits job evaluates it (its mean and std)."""
    from hpcnn.data.hdf5_dataset import HDF5Dataset
    ds = HDF5Dataset(data, "test", batch_size=1, shuffle=False, drop_last=False, mean=[77.9], std=[81.3])
    return ds.read_rows(np.arange(ds.num_samples)), ds.labels[:]


def _reference_logits(ckpt, x, batch=64):
    seq = _sequential(ckpt, batch)
    out = []
    for lo in range(0, len(x), batch):
        xb = x[lo:lo + batch]
        pad = np.zeros((batch - len(xb),) + x.shape[1:], x.dtype)
        out.append(seq.predict(np.concatenate([xb, pad]))[:len(xb)])
    return np.concatenate(out)


def _h2_plan(ckpt, path):
    """A plan for 2 ranks that the digits job's search would not pick:
    images split over height, dense layers over channels, the loss over
    samples."""
    from hpcnn.onnx_export import checkpoint_network
    from hpcnn.strategy.plan import Plan
    g, _, _ = checkpoint_network(ckpt)
    configs = {}
    for n in g:
        nd = len(n.shape)
        cfg = {"h": 2} if nd == 4 else {"c": 2} if nd == 2 else {"n": 2}
        if any(d not in n.op.splittable for d in cfg):
            cfg = {"n": 2}
        configs[n.name] = cfg
    plan = Plan(g.name, 2, g.batch, configs, name="h2c2")
    plan.validate(g, 2)
    plan.save(path)
    return path


def test_eval_gives_the_same_accuracy_in_one_process_and_at_two_ranks_under_another_plan(trained):
    d, data, ckpt, sets = trained
    r = hpcnn("eval", JOB, "--checkpoint", ckpt, *sets, "-o", d / "one.json")
    assert r.returncode == 0, r.stderr
    plan = _h2_plan(ckpt, d / "h2c2.json")
    r2 = run_mpi(2, [sys.executable, "-m", "hpcnn", "eval", JOB, "--checkpoint", d / "ck", *sets, "--plan", plan,
                     "-o", d / "two.json"], timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    one, two = (json.loads((d / f).read_text()) for f in ("one.json", "two.json"))
    assert (one["ranks"], two["ranks"], two["plan"]) == (1, 2, "h2c2")
    assert f"test accuracy {one['accuracy']:.4f}" in r.stdout
    # the sequential executor on the checkpoint's weights, the whole test split
    x, y = _test_images(data)
    z = _reference_logits(ckpt, x).astype(np.float64)
    acc = float((z.argmax(axis=1) == y).mean())
    lse = z.max(axis=1) + np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1))
    loss = float((lse - z[np.arange(len(y)), y]).mean())
    for res in (one, two):
        assert res["samples"] == len(y) == 359
        assert res["accuracy"] == acc
        assert res["loss"] == pytest.approx(loss, rel=1e-5)
    assert 0.3 < acc < 1.0


def test_eval_names_a_missing_corrupt_or_foreign_checkpoint(trained):
    d, _, ckpt, sets = trained
    r = hpcnn("eval", JOB, "--checkpoint", d / "nothing.h5", *sets)
    assert r.returncode == 2 and "nothing.h5' does not exist" in r.stderr, r.stderr
    (d / "junk.h5").write_bytes(b"not an HDF5 file")
    r = hpcnn("eval", JOB, "--checkpoint", d / "junk.h5", *sets)
    assert r.returncode == 2 and "cannot be read (corrupt or not HDF5)" in r.stderr, r.stderr
    r = hpcnn("eval", JOB, "--checkpoint", ckpt, *sets, "--set", "model.name='mobilenet_small'")
    assert r.returncode == 2 and "holds model 'digits_cnn'" in r.stderr, r.stderr
    assert "the job file that trained it" in r.stderr
    r = hpcnn("eval", JOB, "--checkpoint", ckpt, *sets, "--set", "model.num_classes=12")
    assert r.returncode == 2 and "10 classes, but this job's network takes" in r.stderr, r.stderr


def test_predict_from_the_checkpoint_and_from_its_onnx_export_gives_the_logits(trained):
    d, data, ckpt, _ = trained
    x, _ = _test_images(data)
    want = _reference_logits(ckpt, x)
    # from the checkpoint, reading the HDF5 test split with the job's normalisation,
    # in batches that do not divide the 359 images
    r = hpcnn("predict", "--model", ckpt, "--input", data, "-o", d / "ck.npy", "--batch", 50)
    assert r.returncode == 0, r.stderr
    got = np.load(d / "ck.npy")
    assert got.shape == (359, 10) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    # under mpiexec each rank predicts a share of the batches (3, 3 and 2 of 8): the same logits
    r = run_mpi(3, [sys.executable, "-m", "hpcnn", "predict", "--model", ckpt, "--input", data, "-o",
                    d / "ck3.npy", "--batch", 50], timeout=600)
    assert r.returncode == 0 and "on 3 ranks" in r.stdout, r.stderr[-3000:]
    assert np.array_equal(np.load(d / "ck3.npy"), got)
    # from its ONNX export, reading a .npy array as it is; onnxruntime agrees
    r = hpcnn("export", ckpt, "-o", d / "digits.onnx")
    assert r.returncode == 0, r.stderr
    np.save(d / "x.npy", x)
    r = hpcnn("predict", "--model", d / "digits.onnx", "--input", d / "x.npy", "-o", d / "onnx.npy",
              "--batch", 128, "--progress", "lines")
    assert r.returncode == 0, r.stderr
    assert "predict: 359/359 images (100%" in r.stderr
    got = np.load(d / "onnx.npy")
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    import onnxruntime as ort
    sess = ort.InferenceSession(str(d / "digits.onnx"), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    # the HDF5 split through the ONNX model, normalised as the job did
    r = hpcnn("predict", "--model", d / "digits.onnx", "--input", data, "-o", d / "onnx_h5.npy",
              "--mean", "77.9", "--std", "81.3", "--dtype", "float64")
    assert r.returncode == 0, r.stderr
    got = np.load(d / "onnx_h5.npy")
    assert got.dtype == np.float64 and np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_predict_errors_name_the_problem(trained):
    d, data, ckpt, _ = trained
    np.save(d / "flat.npy", np.zeros((3, 256), np.float32))
    r = hpcnn("predict", "--model", ckpt, "--input", d / "flat.npy", "-o", d / "o.npy")
    assert r.returncode == 2 and "has shape (3, 256); give images (N, C, H, W)" in r.stderr, r.stderr
    np.save(d / "big.npy", np.zeros((3, 1, 28, 28), np.float32))
    r = hpcnn("predict", "--model", ckpt, "--input", d / "big.npy", "-o", d / "o.npy")
    assert r.returncode == 2 and "are (1, 28, 28) (C, H, W), the network takes (1, 16, 16)" in r.stderr
    r = hpcnn("predict", "--model", data, "--input", d / "big.npy", "-o", d / "o.npy")
    assert r.returncode == 2 and "is not an hpcnn checkpoint" in r.stderr
    (d / "junk.onnx").write_bytes(b"\x08\x07garbage")
    r = hpcnn("predict", "--model", d / "junk.onnx", "--input", data, "-o", d / "o.npy")
    assert r.returncode == 2 and "is not a readable ONNX model" in r.stderr, r.stderr
    r = hpcnn("predict", "--model", ckpt, "--input", d / "none.npy", "-o", d / "o.npy")
    assert r.returncode == 2 and "none.npy' does not exist" in r.stderr
