"""ONNX in and out: networks exported from PyTorch import with their weights
and compute what PyTorch computes; unsupported nodes are named."""
import numpy as np
import onnx
import pytest
import torch
from torch import nn

from hpcnn.models.onnx_import import OnnxImportError, load_onnx
from hpcnn.runtime.sequential import SequentialModel


class SE(nn.Module):
    """Squeeze-and-excitation: global pool, 1x1 convs, sigmoid gate, multiply."""

    def __init__(self, c, r=2):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))
        return x * s


class Net(nn.Module):
    """Every op the importer maps, in one small classifier."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=1, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch_a = nn.Sequential(nn.Conv2d(8, 4, 3, padding=2, dilation=2), nn.LeakyReLU(0.1))
        self.branch_b = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU6())
        self.se = SE(8)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.avg = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(8, 6, (3, 1), padding=(1, 0))
        self.act2 = nn.Hardswish()
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(6 * 4 * 4, 12)
        self.out = nn.Linear(12, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1) + x
        x = self.se(x)
        x = self.avg(self.pool(x))
        x = self.act2(self.conv2(x))
        x = torch.flatten(self.drop(x), 1)
        return self.out(torch.relu(self.fc(x)))


def _export(model, path, shape=(2, 3, 16, 16), dynamo=False):
    model.eval()
    with torch.no_grad():
        for m in model.modules():            # running statistics that are not the defaults
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    if dynamo:                       # torch's default exporter (torch.export)
        batch = torch.export.Dim("batch", min=2)
        torch.onnx.export(model, (torch.randn(*shape),), str(path), dynamo=True, opset_version=18,
                          input_names=["image"], output_names=["logits"], dynamic_shapes=({0: batch},),
                          optimize=True, verbose=False)
    else:                            # the TorchScript exporter, batch norm kept (not folded)
        torch.onnx.export(model, (torch.randn(*shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"], do_constant_folding=False,
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return model


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_an_exported_network_imports_with_its_weights_and_computes_the_same(tmp_path, dynamo):
    torch.manual_seed(0)
    model = _export(Net(), tmp_path / "net.onnx", dynamo=dynamo)
    g = load_onnx(tmp_path / "net.onnx", batch=4)
    kinds = {n.kind for n in g}
    want_kinds = {"conv2d", "relu", "leaky_relu", "clip", "sigmoid", "channel_scale", "maxpool2d",
                  "avgpool2d", "global_avgpool", "hardswish", "concat", "add", "flatten", "linear", "softmax_xent"}
    if not dynamo:
        want_kinds.add("batchnorm")          # torch.export folds it into the convolution
    assert want_kinds <= kinds, want_kinds - kinds
    x = np.random.default_rng(1).standard_normal((4, 3, 16, 16))
    with torch.no_grad():
        want = model.double()(torch.tensor(x)).numpy()
    got = SequentialModel(g, dtype=np.float64).predict(x)
    # float64 on both sides; torch.export folds batch norm into float32 weights first
    tol = 1e-6 if dynamo else 1e-9
    assert np.abs(got - want).max() <= tol * np.abs(want).max()


def test_random_init_keeps_the_architecture_not_the_weights(tmp_path):
    torch.manual_seed(0)
    _export(Net(), tmp_path / "net.onnx")
    g = load_onnx(tmp_path / "net.onnx", batch=2, init="random")
    assert not g.initial and g.num_params() == sum(p.numel() for p in Net().parameters())


def _graph(nodes, inputs, outputs, inits=()):
    h = onnx.helper
    return h.make_model(h.make_graph(nodes, "g", inputs, outputs, list(inits)),
                        opset_imports=[h.make_opsetid("", 17)])


def test_unsupported_nodes_and_shapes_are_named(tmp_path):
    h, T = onnx.helper, onnx.TensorProto
    x = h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])
    y = h.make_tensor_value_info("y", T.FLOAT, ["N", 3, 8, 8])
    bad = _graph([h.make_node("Tanh", ["x"], ["y"], name="the_tanh")], [x], [y])
    onnx.save(bad, tmp_path / "tanh.onnx")
    with pytest.raises(OnnxImportError, match=r"'the_tanh' \(Tanh\): this op type is not supported; hpcnn imports Conv"):
        load_onnx(tmp_path / "tanh.onnx", batch=2)
    dyn = h.make_tensor_value_info("x", T.FLOAT, ["N", 3, "H", 8])
    onnx.save(_graph([h.make_node("Relu", ["x"], ["y"])], [dyn], [y]), tmp_path / "dyn.onnx")
    with pytest.raises(OnnxImportError, match="dimension 2 is H, a dynamic size"):
        load_onnx(tmp_path / "dyn.onnx", batch=2)
    w = onnx.numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w")
    grp = _graph([h.make_node("Conv", ["x", "w"], ["y"], name="dw", group=3, kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
                 [x], [y], [w])
    onnx.save(grp, tmp_path / "grp.onnx")
    with pytest.raises(OnnxImportError, match=r"'dw' \(Conv\): group=3 does not fit weight \(4, 1, 3, 3\) and 3 input"):
        load_onnx(tmp_path / "grp.onnx", batch=2)
    with pytest.raises(OnnxImportError, match="does not exist"):
        load_onnx(tmp_path / "none.onnx", batch=2)


class Separable(nn.Module):
    """Depthwise (multiplier 1 and 2, stride 2) and grouped convolutions with
    batch norm, as MobileNet and ResNeXt blocks have them."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.dw2 = nn.Sequential(nn.Conv2d(12, 24, 3, stride=2, padding=(1, 2), dilation=(1, 2), groups=12),
                                 nn.BatchNorm2d(24), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(24, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.pw(self.dw(self.stem(x)))
        x = torch.relu(self.grouped(self.dw2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_depthwise_and_grouped_convolutions_import_and_compute_the_same(tmp_path, dynamo):
    torch.manual_seed(0)
    model = _export(Separable(), tmp_path / "sep.onnx", dynamo=dynamo)
    g = load_onnx(tmp_path / "sep.onnx", batch=3)
    groups = sorted(n.op.groups for n in g if n.kind == "conv2d")
    assert groups == [1, 1, 4, 8, 12], groups
    x = np.random.default_rng(3).standard_normal((3, 3, 16, 16))
    with torch.no_grad():
        want = model.double()(torch.tensor(x)).numpy()
    got = SequentialModel(g, dtype=np.float64).predict(x)
    tol = 1e-6 if dynamo else 1e-9
    assert np.abs(got - want).max() <= tol * np.abs(want).max()


def _ort(path, x):
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("fold_bn", [False, True], ids=["bn-kept", "bn-folded"])
def test_an_imported_network_exports_and_onnxruntime_agrees(tmp_path, fold_bn):
    from hpcnn.onnx_export import export_onnx
    torch.manual_seed(0)
    _export(Net(), tmp_path / "net.onnx")
    g = load_onnx(tmp_path / "net.onnx", batch=3)
    params = {n: {k: v for k, v in d.items() if k in g[n].param_specs()} for n, d in g.initial.items()}
    buffers = {n: {k: v for k, v in d.items() if k in g[n].buffer_specs()} for n, d in g.initial.items()}
    model = export_onnx(g, params, buffers, tmp_path / "back.onnx", fold_bn=fold_bn)
    ops = {n.op_type for n in model.graph.node}
    assert ("BatchNormalization" in ops) != fold_bn
    x = np.random.default_rng(2).standard_normal((5, 3, 16, 16)).astype(np.float32)   # another batch size
    want = SequentialModel(load_onnx(tmp_path / "net.onnx", batch=5), dtype=np.float32).predict(x)
    got = _ort(tmp_path / "back.onnx", x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("fold_bn", [False, True], ids=["bn-kept", "bn-folded"])
def test_grouped_convolutions_round_trip_and_onnxruntime_agrees(tmp_path, fold_bn):
    """torch -> ONNX -> hpcnn -> ONNX (groups kept, batch norm folded into
    depthwise and grouped weights or not): onnxruntime's logits equal torch's."""
    from hpcnn.onnx_export import export_onnx
    torch.manual_seed(0)
    model = _export(Separable(), tmp_path / "sep.onnx")
    g = load_onnx(tmp_path / "sep.onnx", batch=3)
    params = {n: {k: v for k, v in d.items() if k in g[n].param_specs()} for n, d in g.initial.items()}
    buffers = {n: {k: v for k, v in d.items() if k in g[n].buffer_specs()} for n, d in g.initial.items()}
    back = export_onnx(g, params, buffers, tmp_path / "back.onnx", fold_bn=fold_bn)
    groups = sorted(next((a.i for a in n.attribute if a.name == "group"), 1)
                    for n in back.graph.node if n.op_type == "Conv")
    assert groups == [1, 1, 4, 8, 12], groups
    assert ("BatchNormalization" in {n.op_type for n in back.graph.node}) != fold_bn
    x = np.random.default_rng(4).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = model.float()(torch.tensor(x)).numpy()
    got = _ort(tmp_path / "back.onnx", x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.slow
def test_a_trained_checkpoint_exports_and_onnxruntime_gives_the_logits(tmp_path):
    """Train the digits job for a few steps on 2 ranks, export its last
    checkpoint with `hpcnn export`, and compare onnxruntime's logits with
    hpcnn's (the checkpoint's weights, inference mode) in float32."""
    import subprocess
    import sys as _sys

    from hpcnn.checkpoint import latest_checkpoint
    from mpi_launch import ROOT, mpi_env, run_mpi
    data = tmp_path / "digits.h5"
    subprocess.run([_sys.executable, "-m", "hpcnn", "data", "digits", "-o", str(data)], check=True,
                   env=mpi_env(), capture_output=True)
    ck = tmp_path / "ck"
    r = run_mpi(2, [_sys.executable, "-m", "hpcnn", "train", str(ROOT / "jobs" / "digits.toml"),
                    "--set", f"data.path={str(data)!r}", "--set", "train.max_steps=6",
                    "--set", f"checkpoint.dir={str(ck)!r}", "--set", "plan.trials=0"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    path = latest_checkpoint(ck)
    out = tmp_path / "digits.onnx"
    r = subprocess.run([_sys.executable, "-m", "hpcnn", "export", str(path), "-o", str(out)], env=mpi_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0 and "wrote" in r.stdout, r.stderr
    from hpcnn.onnx_export import checkpoint_network
    g, params, buffers = checkpoint_network(path)
    seq = SequentialModel(g, dtype=np.float32)
    for n in params:
        seq.params[n] = {k: v.astype(np.float32) for k, v in params[n].items()}
    for n in buffers:
        seq.buffers[n] = {k: v.astype(np.float32) for k, v in buffers[n].items()}
    from hpcnn.data.hdf5_dataset import HDF5Dataset
    ds = HDF5Dataset(data, "test", batch_size=64, shuffle=False, drop_last=False)
    x = ds.read_rows(np.arange(64))                 # the graph's batch: the job's
    got = _ort(out, x)
    want = seq.predict(x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    bad = tmp_path / "nothing.h5"
    bad.write_bytes(b"not hdf5")
    r = subprocess.run([_sys.executable, "-m", "hpcnn", "export", str(bad), "-o", str(out)], env=mpi_env(),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "hpcnn export: error" in r.stderr


class Digits(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(6, 8, 3, padding=1), nn.Hardswish(), nn.AdaptiveAvgPool2d(1),
                               nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        return self.f(x)


def _digits_job(tmp_path, model_keys: dict, cwd=None, ranks=2):
    import json as _json
    import subprocess
    import sys as _sys

    from mpi_launch import ROOT, mpi_env, run_mpi
    data = tmp_path / "digits.h5"
    if not data.exists():
        subprocess.run([_sys.executable, "-m", "hpcnn", "data", "digits", "-o", str(data)], check=True,
                       env=mpi_env(), capture_output=True)
    metrics = tmp_path / "m.jsonl"
    # images as stored (the reference below reads them so) and no checkpoints
    sets = [f"data.path={str(data)!r}", "train.max_steps=3", "train.log_every=1", "plan.trials=0",
            f"log.metrics={str(metrics)!r}", "model.name=''", "checkpoint.dir=''",
            "augment.random_resized_crop=false", "augment.mean=[]", "augment.std=[]"] + [f"model.{k}={v!r}" for k, v in model_keys.items()]
    args = [_sys.executable, "-m", "hpcnn", "train", str(ROOT / "jobs" / "digits.toml")]
    for s in sets:
        args += ["--set", s]
    r = run_mpi(ranks, args, timeout=600, cwd=cwd)
    rows = [_json.loads(line) for line in open(metrics)] if metrics.exists() else []
    return r, data, rows


@pytest.mark.slow
def test_a_job_trains_an_onnx_model_from_its_weights(tmp_path):
    from hpcnn.data.hdf5_dataset import HDF5Dataset
    torch.manual_seed(3)
    _export(Digits(), tmp_path / "digits_net.onnx", shape=(2, 1, 16, 16))
    r, data, rows = _digits_job(tmp_path, {"onnx": str(tmp_path / "digits_net.onnx")})
    assert r.returncode == 0, r.stderr[-3000:]
    first = [x for x in rows if x["kind"] == "train"][0]
    # the first step's loss is the imported network's loss on the first batch
    ds = HDF5Dataset(data, "train", batch_size=64, shuffle=True, seed=0, drop_last=True)
    rows_ = ds.batch_indices(0, 0)
    g = load_onnx(tmp_path / "digits_net.onnx", batch=64)
    loss, _ = SequentialModel(g, dtype=np.float32).forward(ds.read_rows(rows_), ds.labels[rows_], training=True)
    assert first["loss"] == pytest.approx(loss, rel=1e-5)


@pytest.mark.slow
def test_a_job_trains_a_network_built_by_a_python_function(tmp_path):
    (tmp_path / "mynets.py").write_text(
        "from hpcnn.graph import Graph\n"
        "def tiny(batch, input_shape, num_classes):\n"
        "    g = Graph('tiny')\n"
        "    x = g.input((batch,) + tuple(input_shape))\n"
        "    x = g.relu(g.bn(g.conv(x, 8, 3, padding=1)))\n"
        "    g.loss(g.linear(g.flatten(g.maxpool(x, 2)), num_classes))\n"
        "    return g\n"
        "def wrong(batch, input_shape, num_classes):\n"
        "    return 42\n")
    r, _, rows = _digits_job(tmp_path, {"builder": "mynets:tiny"}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model tiny" in r.stderr and len([x for x in rows if x["kind"] == "train"]) == 3
    r, _, _ = _digits_job(tmp_path, {"builder": "mynets:wrong"}, cwd=tmp_path)
    assert r.returncode == 2 and "returned int, not an hpcnn.graph.Graph" in r.stderr
    r, _, _ = _digits_job(tmp_path, {"builder": "mynets:tiny", "onnx": "x.onnx"}, cwd=tmp_path)
    assert r.returncode == 2 and "exactly one of model.name" in r.stderr
