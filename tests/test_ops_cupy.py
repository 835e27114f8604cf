"""The same op code on CuPy (GPU) computes what it computes on NumPy: every
op's output, input gradients and parameter gradients in float64 (relative
error 1e-10), with both kernel sets, and two SGD steps of a narrow
ResNet-18 through SequentialModel on the CuPy backend equal the NumPy ones.
Skipped where CuPy or a GPU is missing (run it on a GPU machine:
``HPCNN_BACKEND=cupy python -m pytest tests/test_ops_cupy.py``)."""
from __future__ import annotations

import numpy as np
import pytest

cp = pytest.importorskip("cupy")
try:
    _NDEV = cp.cuda.runtime.getDeviceCount()
except Exception:  # CuPy imports but CUDA is unusable
    _NDEV = 0
if _NDEV < 1:
    pytest.skip("no GPU visible to CuPy", allow_module_level=True)

from hpcnn.backend import Backend  # noqa: E402
from hpcnn.ops import TileContext, clip_box, full_box, kernel_set, make_op  # noqa: E402
from hpcnn.ops.kernel_set import kernel_state, restore_kernel_state  # noqa: E402

pytestmark = pytest.mark.gpu

CASES = [
    ("conv3x3", "conv2d", dict(out_channels=6, kernel_size=3, padding=1), [(2, 5, 9, 8)]),
    ("conv_s2d2_asym", "conv2d", dict(out_channels=4, kernel_size=3, stride=2, padding=((2, 1), (0, 2)),
                                      dilation=2, bias=False), [(3, 3, 11, 10)]),
    ("conv1x1s2", "conv2d", dict(out_channels=8, kernel_size=1, stride=2), [(2, 6, 7, 7)]),
    ("conv7x7s2", "conv2d", dict(out_channels=4, kernel_size=7, stride=2, padding=3), [(2, 3, 13, 12)]),
    ("conv_wide", "conv2d", dict(out_channels=64, kernel_size=3, padding=1, bias=False), [(1, 32, 2, 2)]),
    ("conv_groups", "conv2d", dict(out_channels=12, kernel_size=3, stride=2, padding=((1, 2), (0, 1)),
                                   dilation=2, groups=3), [(2, 6, 11, 9)]),
    ("conv_depthwise_m2", "conv2d", dict(out_channels=10, kernel_size=3, stride=2, padding=1, groups=5),
     [(2, 5, 9, 8)]),
    ("maxpool", "maxpool2d", dict(kernel_size=3, stride=2, padding=1), [(2, 4, 9, 11)]),
    ("maxpool5", "maxpool2d", dict(kernel_size=5, stride=2, padding=2), [(2, 3, 9, 8)]),
    ("avgpool", "avgpool2d", dict(kernel_size=3, stride=2, padding=1), [(2, 4, 9, 10)]),
    ("gap", "global_avgpool", {}, [(3, 6, 5, 4)]),
    ("linear", "linear", dict(out_features=7), [(5, 9)]),
    ("relu", "relu", {}, [(3, 4, 5, 6)]),
    ("bn4d", "batchnorm", dict(momentum=0.2), [(4, 3, 5, 6)]),
    ("bn2d", "batchnorm", {}, [(7, 5)]),
    ("dropout", "dropout", dict(p=0.4), [(3, 4, 5, 6)]),
    ("concat", "concat", {}, [(3, 2, 5, 4), (3, 3, 5, 4)]),
    ("add", "add", {}, [(3, 4, 5, 6)] * 3),
    ("flatten", "flatten", {}, [(3, 2, 3, 4)]),
    ("loss", "softmax_xent", {}, [(7, 6)]),
]
WINDOW = ("conv2d", "maxpool2d", "avgpool2d")
PARAMS = [c + (k,) for c in CASES for k in (("fast", "reference") if c[1] in WINDOW else ("fast",))]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)) if a.size else 0.0


def run(op, xs, params, buffers, labels, dy, training, xp):
    conv = (lambda a: cp.asarray(a)) if xp is cp else (lambda a: a)
    in_shapes = [x.shape for x in xs]
    out_shape = op.infer_shape(in_shapes)
    ob = full_box(out_shape)
    ctx = TileContext(out_box=ob, in_boxes=[op.input_box(i, ob, in_shapes) for i in range(len(xs))],
                      in_shapes=in_shapes, out_shape=out_shape, training=training, seed=2, step=3,
                      labels=None if labels is None else conv(labels))
    sub = [conv(x[tuple(slice(a, b) for a, b in clip_box(bx, x.shape))]) for x, bx in zip(xs, ctx.in_boxes)]
    ps = {k: conv(v) for k, v in params.items()}
    bufs = {k: conv(v.copy()) for k, v in buffers.items()}
    y, saved = op.forward(sub, ps, bufs, ctx)
    dxs, dps = op.backward(conv(dy), saved, ps, ctx)
    host = (lambda a: cp.asnumpy(a)) if xp is cp else np.asarray
    assert (type(y).__module__.startswith("cupy")) == (xp is cp)
    return (host(y), [None if d is None else host(d) for d in dxs], {k: host(v) for k, v in dps.items()},
            {k: host(v) for k, v in bufs.items()})


@pytest.mark.parametrize("name,kind,attrs,shapes,impl", PARAMS,
                         ids=[p[0] + ("-ref" if p[-1] == "reference" else "") for p in PARAMS])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_op_on_cupy_equals_numpy(name, kind, attrs, shapes, impl, training):
    before = kernel_state()
    kernel_set(impl)
    try:
        rng = np.random.default_rng(7)
        op = make_op(kind, name, **attrs)
        xs = [rng.standard_normal(s) for s in shapes]
        params = {k: rng.standard_normal(s.shape) for k, s in op.param_specs(shapes).items()}
        buffers = {k: np.abs(rng.standard_normal(s.shape)) + 0.5 for k, s in op.buffer_specs(shapes).items()}
        labels = rng.integers(0, shapes[0][1], shapes[0][0]) if kind == "softmax_xent" else None
        dy = rng.standard_normal(op.infer_shape(shapes))
        a = run(op, xs, params, buffers, labels, dy, training, np)
        b = run(op, xs, params, buffers, labels, dy, training, cp)
        assert rel(b[0], a[0]) <= 1e-10, "output"
        for i, (gb, ga) in enumerate(zip(b[1], a[1])):
            assert (gb is None) == (ga is None)
            if ga is not None:
                assert rel(gb, ga) <= 1e-10, f"input {i} gradient"
        for part in (2, 3):
            assert set(b[part]) == set(a[part])
            for k in a[part]:
                assert rel(b[part][k], a[part][k]) <= 1e-10, k
    finally:
        restore_kernel_state(before)


def test_resnet18_steps_on_cupy_equal_numpy():
    from hpcnn.bench.kernels import resnet18_graph
    from hpcnn.runtime.sequential import SequentialModel
    from hpcnn.runtime.sgd import SGD
    g = resnet18_graph(4, 35, 10, width=16)
    models = {name: SequentialModel(g, dtype=np.float64, seed=1, backend=Backend(name))
              for name in ("numpy", "cupy")}
    opts = {name: SGD(lr=0.05, momentum=0.9, weight_decay=1e-4) for name in models}
    rng = np.random.default_rng(0)
    for step in range(2):
        x = rng.standard_normal((4, 3, 35, 35))
        labels = rng.integers(0, 10, 4)
        losses = {name: m.train_step(x, labels, opts[name], step=step) for name, m in models.items()}
        assert abs(losses["cupy"] - losses["numpy"]) <= 1e-10 * abs(losses["numpy"])
    for node, ps in models["numpy"].params.items():
        for k, v in ps.items():
            assert rel(cp.asnumpy(models["cupy"].params[node][k]), v) <= 1e-9, f"{node}.{k}"
