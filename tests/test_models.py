"""The model zoo: parameter counts against torch.nn oracles (torchvision is
not importable here, so tests/torch_zoo_oracle.py writes the architectures
out), logits against the oracle with copied weights, small models through
SequentialModel, the registry's errors and ``hpcnn models``."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch

from hpcnn.cli import main as cli_main
from hpcnn.graph import Graph
from hpcnn.models import MODELS, ModelError, build_model
from hpcnn.runtime.sequential import SequentialModel

import torch_zoo_oracle as oracle

# torchvision's published counts at 1000 classes (Inception-v3 without its
# auxiliary head: 27,161,264 - 3,326,696).
TORCHVISION_PARAMS = {
    "alexnet": 61_100_840,
    "vgg16": 138_357_544,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "inception_v3": 23_834_568,
    "mobilenet_v2": 3_504_872,
}

# LeNet-5 (1x32x32, 10 classes) from the formula: conv1 6*(1*5*5)+6, conv2
# 16*(6*5*5)+16, fc1 400*120+120, fc2 120*84+84, fc 84*10+10.
LENET5_PARAMS = (6 * 25 + 6) + (16 * 6 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)

SMALL = ["lenet5", "resnet_small", "inception_small", "digits_cnn", "mobilenet_small"]


def meta_oracle(name, **kw):
    with torch.device("meta"):
        return oracle.ORACLES[name](**kw)


def graph_param_shapes(g):
    return [tuple(s.shape) for n in g for s in n.param_specs().values()]


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_param_count_equals_torch_oracle(name):
    g = build_model(name, batch=1)
    net = meta_oracle(name)
    count = sum(p.numel() for p in net.parameters())
    assert count == TORCHVISION_PARAMS[name]
    assert g.num_params() == TORCHVISION_PARAMS[name]
    # not only the total: the same tensors in the same order
    assert graph_param_shapes(g) == [tuple(p.shape) for p in net.parameters()]


def test_inception_aux_head_is_what_is_left_out():
    with_aux = meta_oracle("inception_v3", aux_logits=True)
    total = sum(p.numel() for p in with_aux.parameters())
    aux = sum(p.numel() for p in with_aux.AuxLogits.parameters())
    assert (total, aux) == (27_161_264, 3_326_696)
    assert build_model("inception_v3").num_params() == total - aux


def test_lenet5_count_from_formula():
    assert LENET5_PARAMS == 61_706
    assert build_model("lenet5").num_params() == LENET5_PARAMS
    assert sum(p.numel() for p in meta_oracle("lenet5").parameters()) == LENET5_PARAMS


@pytest.mark.parametrize("name", list(MODELS))
def test_graph_structure_and_logits_shape(name):
    spec = MODELS[name]
    g = build_model(name, batch=3)
    assert g.name == name
    assert g.loss_name == "loss"
    assert g[g.logits_name].shape == (3, spec.num_classes)
    assert g[g.input_name].shape == (3,) + spec.input_shape
    assert g.batch == 3
    g7 = build_model(name, batch=2, num_classes=7)
    assert g7[g7.logits_name].shape == (2, 7)
    # the description survives a JSON round trip (plans store graphs)
    g2 = Graph.from_dict(json.loads(json.dumps(g.to_dict())))
    assert g2.num_params() == g.num_params() and len(g2) == len(g)


@pytest.mark.parametrize("name", list(MODELS))
def test_min_size_is_exact(name):
    spec = MODELS[name]
    g = build_model(name, image_size=spec.min_size, batch=1)
    assert g[g.logits_name].shape == (1, spec.num_classes)
    if spec.min_size > 1:
        nd = len(spec.image_size)
        with pytest.raises(ModelError, match="at least " + "x".join([str(spec.min_size)] * nd)):
            build_model(name, image_size=spec.min_size - 1)
        # the check is the layers' own: the builder itself fails one below
        from hpcnn.graph import GraphError
        with pytest.raises(GraphError):
            spec.builder(1, spec.in_channels, (spec.min_size - 1,) * nd, 10)


def test_classifier_pool_at_other_sizes():
    g = build_model("vgg16", image_size=448)       # 14x14 feature map -> avgpool 2x2
    assert g.num_params() == TORCHVISION_PARAMS["vgg16"]
    assert g["avgpool"].shape == (1, 512, 7, 7)
    assert g.meta["classifier_pool"].startswith("avgpool 2x2")
    g = build_model("vgg16", image_size=32, num_classes=10)   # 1x1 feature map: fc reads 512
    assert g["fc1"].in_shapes[0] == (1, 512)
    assert g.meta["classifier_pool"].startswith("none")
    g = build_model("alexnet", image_size=416)     # 12x12 -> avgpool 2x2
    assert g["avgpool"].shape == (1, 256, 6, 6)
    assert g.num_params() == TORCHVISION_PARAMS["alexnet"]
    g = build_model("alexnet", image_size=(224, 448))   # 6x13: not a multiple
    assert g["fc1"].in_shapes[0] == (1, 256 * 6 * 13)
    assert build_model("alexnet").meta["classifier_pool"].startswith("identity")


def _copy_torch_weights(model, net, name):
    """Put the oracle's parameters and BN running statistics into hpcnn's."""
    flat = {}
    for n in model.graph:
        for k in list(n.param_specs()) + list(n.buffer_specs()):
            flat[f"{n.name}.{k}"] = (model.params if k in model.params[n.name] else model.buffers)[n.name][k]
    tensors = list(net.named_parameters()) + [(k, v) for k, v in net.named_buffers()
                                               if not k.endswith("num_batches_tracked")]
    if name in ("alexnet", "vgg16"):   # Sequential indices: map by order
        ours = [k for k in flat if not k.endswith(("running_mean", "running_var"))]
        pairs = list(zip(ours, [v for _, v in tensors]))
        assert len(ours) == len(tensors)
    else:
        pairs = [(oracle.hpcnn_key(k, name), v) for k, v in tensors]
        assert sorted(k for k, _ in pairs) == sorted(flat)
    for k, v in pairs:
        assert flat[k].shape == tuple(v.shape), k
        flat[k][...] = v.detach().numpy()


@pytest.mark.parametrize("name,size,batch,classes,train", [
    ("lenet5", 32, 3, 10, True),
    ("resnet18", 32, 2, 10, True),
    ("resnet50", 32, 2, 10, False),
    ("inception_v3", 75, 1, 10, False),
    ("alexnet", 224, 1, 10, False),
    ("mobilenet_v2", 32, 2, 10, False),
])
def test_logits_equal_torch_oracle(name, size, batch, classes, train):
    torch.manual_seed(0)
    net = oracle.ORACLES[name](num_classes=classes).double()
    for m in net.modules():   # non-trivial running statistics for eval mode
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    cin = MODELS[name].in_channels
    g = build_model(name, batch=batch, image_size=size, num_classes=classes)
    model = SequentialModel(g, dtype=np.float64, seed=1)
    _copy_torch_weights(model, net, name)
    x = np.random.default_rng(0).standard_normal((batch, cin, size, size))
    with torch.no_grad():
        want = net.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.predict(x), want, rtol=1e-9, atol=1e-9)
    if train:   # batch statistics (no dropout in these two)
        with torch.no_grad():
            want = net.train()(torch.from_numpy(x)).numpy()
        _, got = model.forward(x, labels=np.zeros(batch, dtype=np.int64), training=True)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", SMALL)
def test_small_model_forward_backward(name):
    """One forward+backward in float64; the gradient agrees with a central
    difference of the loss along a random direction of every parameter."""
    g = build_model(name, batch=4)
    model = SequentialModel(g, dtype=np.float64, seed=3)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(g[g.input_name].shape)
    y = rng.integers(0, MODELS[name].num_classes, size=4)
    loss, logits = model.forward(x, y, training=True, step=5)
    assert logits.shape == (4, MODELS[name].num_classes) and np.isfinite(loss)
    grads = model.backward()
    flat_p = model.flat_params()
    flat_g = {f"{n}.{k}": v for n, gs in grads.items() for k, v in gs.items()}
    assert sorted(flat_g) == sorted(flat_p)
    for k in flat_p:
        assert flat_g[k].shape == flat_p[k].shape, k
    d = {k: rng.standard_normal(v.shape) for k, v in flat_p.items()}
    saved_buffers = {n: {k: v.copy() for k, v in b.items()} for n, b in model.buffers.items()}

    def loss_at(t):
        for k, v in flat_p.items():
            v += t * d[k]
        val, _ = model.forward(x, y, training=True, step=5)
        for k, v in flat_p.items():
            v -= t * d[k]
        for n, b in saved_buffers.items():
            for k, v in b.items():
                model.buffers[n][k][...] = v
        return val

    analytic = sum(float((flat_g[k] * d[k]).sum()) for k in flat_p)
    # ReLU and max pooling are not smooth: a step may cross a kink, which
    # spoils that difference, so the closest of three step sizes must agree.
    errs = [abs((loss_at(eps) - loss_at(-eps)) / (2 * eps) - analytic) for eps in (1e-5, 1e-6, 1e-7)]
    assert min(errs) <= 1e-6 * abs(analytic) + 1e-9, (analytic, errs)


def test_unknown_model_lists_known_ones():
    with pytest.raises(ModelError) as e:
        build_model("resnet19")
    msg = str(e.value)
    assert "'resnet19'" in msg
    for name in MODELS:
        assert name in msg


@pytest.mark.parametrize("kw,match", [
    (dict(image_size=8), r"'alexnet' needs images of at least 63x63, got image_size 8x8"),
    (dict(image_size=(224, 10)), r"at least 63x63, got image_size 224x10"),
    (dict(image_size=(1, 2, 3)), r"image_size must be an integer or \(height, width\), got \(1, 2, 3\)"),
    (dict(image_size=0), r"image_size must be a positive integer, got 0"),
    (dict(image_size=2.5), r"image_size must be a positive integer, got 2.5"),
    (dict(batch=0), r"batch must be a positive integer, got 0"),
    (dict(batch="8"), r"batch must be a positive integer, got '8'"),
    (dict(num_classes=1), r"num_classes must be at least 2, got 1"),
    (dict(in_channels=-3), r"in_channels must be a positive integer, got -3"),
])
def test_bad_sizes_are_clear_errors(kw, match):
    with pytest.raises(ModelError, match=match):
        build_model("alexnet", **kw)


def test_numpy_integers_are_accepted():
    g = build_model("lenet5", batch=np.int64(5), image_size=np.int32(32))
    assert g.batch == 5


def _cli(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(list(argv))
    return rc, out.getvalue()


def test_models_command_json_and_table():
    rc, out = _cli("models", "--json")
    assert rc == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == list(MODELS)
    for r in rows:
        g = build_model(r["name"], batch=2)
        assert r["params"] == g.num_params()
        assert r["forward_flops_per_sample"] == g.forward_flops() // 2
        assert r["input_shape"] == list(MODELS[r["name"]].input_shape)
        assert r["num_classes"] == MODELS[r["name"]].num_classes
    by = {r["name"]: r for r in rows}
    assert by["resnet50"]["params"] == TORCHVISION_PARAMS["resnet50"]
    # conv FLOPs dominate: ResNet-50 is about 4.1 GMACs = 8.2 GFLOPs a sample
    assert 8.0e9 < by["resnet50"]["forward_flops_per_sample"] < 8.4e9
    rc, out = _cli("models")
    assert rc == 0
    assert "138,357,544" in out and "inception_v3" in out and "3x299x299" in out


def test_cosmoflow_is_the_mlperf_reference_network():
    """5 conv3d (32..512 filters, kernel 2, 'same') + leaky ReLU + max pool,
    fc 128, 64, 4, 1.2 tanh; parameter count from the layer formula."""
    g = build_model("cosmoflow", batch=2)
    assert g[g.input_name].shape == (2, 4, 128, 128, 128)
    assert [g[f"conv{i}"].shape for i in range(1, 6)] == [
        (2, 32 * 2 ** i, 128 >> i, 128 >> i, 128 >> i) for i in range(5)]
    assert g["pool5"].shape == (2, 512, 4, 4, 4)
    assert g["flatten"].shape == (2, 512 * 64)
    assert g.logits_name == "output" and g["output"].shape == (2, 4)
    assert g["loss"].kind == "mse"
    chans = [4, 32, 64, 128, 256, 512]
    conv = sum(chans[i + 1] * (chans[i] * 8 + 1) for i in range(5))
    fc = 128 * (512 * 64 + 1) + 64 * (128 + 1) + 4 * (64 + 1)
    assert g.num_params() == conv + fc
    small = build_model("cosmoflow", batch=1, image_size=32)
    assert small["pool5"].shape == (1, 512, 1, 1, 1)


def test_volume_small_trains_forward_backward_against_a_central_difference():
    g = build_model("volume_small", batch=3)
    assert g[g.input_name].shape == (3, 2, 12, 10, 14)
    model = SequentialModel(g, dtype=np.float64, seed=3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 12, 10, 14))
    y = rng.standard_normal((3, 3)) * 0.5
    loss, _ = model.forward(x, labels=y, training=True)
    grads = model.backward()
    d = {(n, k): rng.standard_normal(v.shape) for n, ps in model.params.items() for k, v in ps.items()}
    analytic = sum(float((grads[n][k] * v).sum()) for (n, k), v in d.items())
    base = {(n, k): model.params[n][k].copy() for (n, k) in d}

    def loss_at(eps):
        for (n, k), v in d.items():
            model.params[n][k][...] = base[(n, k)] + eps * v
        val, _ = model.forward(x, labels=y, training=True)
        return val
    errs = [abs((loss_at(e) - loss_at(-e)) / (2 * e) - analytic) for e in (1e-5, 1e-6)]
    assert min(errs) <= 1e-6 * abs(analytic) + 1e-9, (analytic, errs)


def test_random_labels_fit_the_loss():
    rng = np.random.default_rng(0)
    y = build_model("volume_small", batch=3).random_labels(rng)
    assert y.shape == (3, 3) and y.dtype.kind == "f" and np.all(np.abs(y) < 1)
    c = build_model("lenet5", batch=5).random_labels(rng)
    assert c.shape == (5,) and c.dtype.kind == "i" and c.min() >= 0 and c.max() < 10
