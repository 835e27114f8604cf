"""Every op against PyTorch (torch.nn.functional) as the oracle.

For each op: the output, the gradient of every input and the gradient of
every parameter, for a random upstream gradient, on random data with odd
sizes, stride 2, dilation 2, asymmetric padding, batch 1 and 1x1 spatial
outputs.  float64 must agree to a relative error of 1e-10; a float32 pass
checks the same cases with a looser tolerance.  Inputs and upstream
gradients are also given in other memory layouts (channels-last views,
strided slices), since ops must index logically and accept any strides.

The op is run exactly as runtime/sequential.py runs it on the whole tensor:
the input box the op asks for is clipped to the tensor, the input is sliced
to the clipped box, and the TileContext holds the unclipped boxes.
"""
from __future__ import annotations

import numpy as np
import pytest

import torch  # the oracle: a test dependency (setup.cfg [test]), never skipped
F = torch.nn.functional

from hpcnn.ops import TileContext, clip_box, full_box, make_op  # noqa: E402

TOL = {np.float64: 1e-10, np.float32: 2e-4}


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(float(np.abs(b).max()) if b.size else 0.0, 1e-300)
    return float(np.abs(a - b).max() / scale) if a.size else 0.0


def in_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """The same logical values in another memory layout."""
    if layout == "contig" or a.ndim != 4:
        if layout == "sliced" and a.ndim == 2:
            big = np.zeros((a.shape[0], 2 * a.shape[1] + 1), a.dtype)
            big[:, 1::2] = a
            return big[:, 1::2]
        return np.ascontiguousarray(a)
    if layout == "nhwc":
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    if layout == "sliced":   # every stride non-trivial: a view into a bigger array
        n, c, h, w = a.shape
        big = np.zeros((n + 1, 2 * c, h + 2, 2 * w), a.dtype)
        big[1:, ::2, 1:h + 1, 1::2] = a
        return big[1:, ::2, 1:h + 1, 1::2]
    raise ValueError(layout)


def run_whole(op, xs, params=None, buffers=None, dy=None, training=True, labels=None,
              seed=0, step=0):
    """Forward (and backward when dy is given) of ``op`` on whole tensors, as
    the sequential executor does it."""
    params = params or {}
    buffers = {} if buffers is None else buffers
    in_shapes = [tuple(x.shape) for x in xs]
    out_shape = op.infer_shape(in_shapes)
    ob = full_box(out_shape)
    ctx = TileContext(out_box=ob, in_boxes=[op.input_box(i, ob, in_shapes) for i in range(len(xs))],
                      in_shapes=in_shapes, out_shape=tuple(out_shape), training=training,
                      seed=seed, step=step, labels=labels)
    sub = []
    for i, x in enumerate(xs):
        cb = clip_box(ctx.in_boxes[i], in_shapes[i])
        sub.append(x[tuple(slice(lo, hi) for lo, hi in cb)])
    y, saved = op.forward(sub, params, buffers, ctx)
    assert tuple(y.shape) == tuple(out_shape)
    if dy is None:
        return y, None, None
    dxs, dps = op.backward(dy, saved, params, ctx)
    full = []
    for i, x in enumerate(xs):
        cb = clip_box(ctx.in_boxes[i], in_shapes[i])
        g = np.zeros(x.shape, dtype=np.float64)
        if dxs[i] is not None:
            assert tuple(dxs[i].shape) == tuple(sub[i].shape)
            g[tuple(slice(lo, hi) for lo, hi in cb)] += dxs[i]
        full.append(g)
    return y, full, dps


def torch_vjp(fn, xs, params, dy):
    """Output of ``fn(*xs, **params)`` and the gradients of xs and params
    for upstream gradient dy, in float64."""
    tx = [torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True) for x in xs]
    tp = {k: torch.tensor(np.asarray(v, dtype=np.float64), requires_grad=True) for k, v in params.items()}
    y = fn(*tx, **tp)
    grads = torch.autograd.grad(y, tx + list(tp.values()), torch.tensor(np.asarray(dy, np.float64)),
                                allow_unused=True)
    gx = [g.numpy() if g is not None else np.zeros(x.shape) for g, x in zip(grads[:len(tx)], xs)]
    gp = {k: g.numpy() for k, g in zip(tp, grads[len(tx):])}
    return y.detach().numpy(), gx, gp


def check(op, fn, xs, params, dtype, layout="contig", rng=None, **kw):
    """Compare op (in ``dtype``) with the torch function in float64."""
    rng = rng or np.random.default_rng(0)
    xs_d = [in_layout(x.astype(dtype), layout) for x in xs]
    ps_d = {k: v.astype(dtype) for k, v in params.items()}
    out_shape = op.infer_shape([x.shape for x in xs])
    dy = rng.standard_normal(out_shape)
    y, gx, gp = run_whole(op, xs_d, ps_d, dy=in_layout(dy.astype(dtype), layout), **kw)
    ty, tgx, tgp = torch_vjp(fn, [x.astype(dtype).astype(np.float64) for x in xs],
                             {k: v.astype(dtype).astype(np.float64) for k, v in params.items()}, dy)
    tol = TOL[dtype]
    assert y.dtype == dtype, f"output dtype {y.dtype} != {np.dtype(dtype)}"
    assert rel_err(y, ty) <= tol, f"output: rel err {rel_err(y, ty):.3g}"
    for i, (a, b) in enumerate(zip(gx, tgx)):
        assert rel_err(a, b) <= tol, f"input {i} gradient: rel err {rel_err(a, b):.3g}"
    assert set(gp) == set(tgp), (sorted(gp), sorted(tgp))
    for k in gp:
        assert gp[k].dtype == dtype, f"{k} gradient dtype {gp[k].dtype}"
        assert rel_err(gp[k], tgp[k]) <= tol, f"{k} gradient: rel err {rel_err(gp[k], tgp[k]):.3g}"


DTYPES = [np.float64, np.float32]


LAYOUTS = ["contig", "nhwc", "sliced"]

# ---------------------------------------------------------------- conv2d
# (N, Cin, H, W, Cout, kernel, stride, padding, dilation, bias)
CONV_CASES = [
    (2, 3, 7, 9, 4, 3, 1, 1, 1, True),
    (1, 5, 11, 8, 3, (3, 2), 2, ((1, 0), (2, 1)), 1, False),     # asymmetric, batch 1
    (3, 4, 9, 10, 6, 3, 2, 2, 2, True),                          # stride 2, dilation 2
    (2, 3, 5, 5, 2, 5, 1, 0, 1, True),                           # 1x1 output
    (2, 8, 6, 7, 16, 1, 1, 0, 1, False),                         # 1x1 conv
    (2, 8, 7, 7, 16, 1, 2, 0, 1, False),                         # 1x1 stride 2
    (2, 3, 13, 11, 8, 7, 2, 3, 1, True),                         # 7x7/2 stem
    (1, 2, 4, 6, 3, 3, 3, ((0, 2), (1, 0)), (1, 2), True),       # stride 3, mixed dilation
    (2, 16, 5, 5, 8, 3, 2, 1, 1, False),                         # 3x3/2 to 3x3
    (1, 3, 3, 3, 5, 3, 1, 0, 1, True),                           # 1x1 output, batch 1
]


def conv_torch(case):
    n, cin, h, w, cout, k, s, p, d, b = case
    if isinstance(p, int):
        p = ((p, p), (p, p))
    elif isinstance(p[0], int):
        p = ((p[0], p[0]), (p[1], p[1]))
    (pt, pb), (pl, pr) = p

    def fn(x, weight, bias=None):
        return F.conv2d(F.pad(x, (pl, pr, pt, pb)), weight, bias, stride=s, dilation=d)
    return fn


def conv_data(case, rng):
    n, cin, h, w, cout, k, s, p, d, b = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x = rng.standard_normal((n, cin, h, w))
    params = {"weight": rng.standard_normal((cout, cin, kh, kw)) / np.sqrt(cin * kh * kw)}
    if b:
        params["bias"] = rng.standard_normal(cout)
    return x, params


def conv_op(case):
    """The conv2d op of a CONV_CASES entry."""
    n, cin, h, w, cout, k, s, p, d, b = case
    return make_op("conv2d", "conv", out_channels=cout, kernel_size=k, stride=s, padding=p,
                   dilation=d, bias=b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c) for c in CONV_CASES])
def test_conv2d(case, dtype, kernels):
    rng = np.random.default_rng(1)
    op = conv_op(case)
    x, params = conv_data(case, rng)
    check(op, conv_torch(case), [x], params, dtype, rng=rng)


@pytest.mark.parametrize("layout", ["nhwc", "sliced"])
@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[2], CONV_CASES[4], CONV_CASES[5]],
                         ids=["3x3", "s2d2", "1x1", "1x1s2"])
def test_conv2d_any_memory_layout(case, layout, kernels):
    rng = np.random.default_rng(2)
    op = conv_op(case)
    x, params = conv_data(case, rng)
    check(op, conv_torch(case), [x], params, np.float64, layout=layout, rng=rng)


def test_conv2d_reference_kernel_agrees():
    """The reference (window view + einsum) kernels stay available as the
    fallback and agree with PyTorch too."""
    from hpcnn.ops import conv_kernels as K
    rng = np.random.default_rng(3)
    case = CONV_CASES[2]
    x, params = conv_data(case, rng)
    y, saved = K.conv2d_forward(x, params["weight"], params["bias"], (2, 2),
                                ((2, 2), (2, 2)), (2, 2))
    dy = rng.standard_normal(y.shape)
    dx, dw, db = K.conv2d_backward(dy, saved, params["weight"], True)
    ty, (tdx,), tgp = torch_vjp(conv_torch(case), [x], params, dy)
    assert rel_err(y, ty) <= 1e-10 and rel_err(dx, tdx) <= 1e-10
    assert rel_err(dw, tgp["weight"]) <= 1e-10 and rel_err(db, tgp["bias"]) <= 1e-10


# ---------------------------------------------------------------- grouped conv2d
# (N, Cin, H, W, Cout, kernel, stride, padding, dilation, bias, groups)
GROUPED_CASES = [
    (2, 6, 11, 9, 12, 3, 2, ((1, 2), (0, 1)), 2, True, 3),          # grouped, stride 2, dilation 2
    (2, 8, 7, 9, 4, 3, 1, 1, 1, False, 2),                          # grouped, Cout < Cin
    (3, 5, 11, 9, 5, 3, 2, ((1, 2), (2, 0)), 2, True, 5),           # depthwise
    (1, 7, 9, 8, 7, (3, 2), 1, ((2, 0), (1, 1)), (2, 1), False, 7),  # depthwise, batch 1, odd window
    (2, 4, 9, 11, 8, 3, 2, ((0, 1), (1, 2)), 2, True, 4),           # depthwise, multiplier 2
    (2, 3, 7, 7, 9, 5, 1, 2, 1, True, 3),                           # depthwise, multiplier 3, 5x5
    (2, 6, 7, 8, 6, 1, 2, 0, 1, True, 6),                           # depthwise 1x1 stride 2
    (1, 4, 3, 3, 8, 3, 1, 0, 1, True, 4),                           # depthwise, 1x1 output
]


def grouped_torch(case):
    fn = conv_torch(case[:10])
    groups = case[10]
    n, cin, h, w, cout, k, s, p, d, b = case[:10]
    if isinstance(p, int):
        p = ((p, p), (p, p))
    (pt, pb), (pl, pr) = p

    def grouped(x, weight, bias=None):
        return F.conv2d(F.pad(x, (pl, pr, pt, pb)), weight, bias, stride=s, dilation=d, groups=groups)
    return grouped if groups > 1 else fn


def grouped_data(case, rng):
    n, cin, h, w, cout, k, s, p, d, b, groups = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x = rng.standard_normal((n, cin, h, w))
    params = {"weight": rng.standard_normal((cout, cin // groups, kh, kw)) / np.sqrt(cin // groups * kh * kw)}
    if b:
        params["bias"] = rng.standard_normal(cout)
    return x, params


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GROUPED_CASES, ids=[str(c) for c in GROUPED_CASES])
def test_grouped_conv2d(case, dtype, kernels):
    rng = np.random.default_rng(5)
    n, cin, h, w, cout, k, s, p, d, b, groups = case
    op = make_op("conv2d", "conv", out_channels=cout, kernel_size=k, stride=s, padding=p,
                 dilation=d, bias=b, groups=groups)
    x, params = grouped_data(case, rng)
    check(op, grouped_torch(case), [x], params, dtype, rng=rng)


@pytest.mark.parametrize("layout", ["nhwc", "sliced"])
@pytest.mark.parametrize("case", [GROUPED_CASES[0], GROUPED_CASES[2], GROUPED_CASES[4]],
                         ids=["grouped", "depthwise", "depthwise_m2"])
def test_grouped_conv2d_any_memory_layout(case, layout, kernels):
    rng = np.random.default_rng(6)
    n, cin, h, w, cout, k, s, p, d, b, groups = case
    op = make_op("conv2d", "conv", out_channels=cout, kernel_size=k, stride=s, padding=p,
                 dilation=d, bias=b, groups=groups)
    x, params = grouped_data(case, rng)
    check(op, grouped_torch(case), [x], params, np.float64, layout=layout, rng=rng)


def test_grouped_conv2d_shape_errors_name_the_groups():
    from hpcnn.ops import OpError
    with pytest.raises(OpError, match=r"out_channels=10 is not divisible by groups=4"):
        make_op("conv2d", "dw", out_channels=10, kernel_size=3, groups=4)
    op = make_op("conv2d", "dw", out_channels=8, kernel_size=3, groups=4)
    with pytest.raises(OpError, match=r"input channels 6 .* not divisible by groups=4"):
        op.infer_shape([(2, 6, 8, 8)])
    assert op.param_specs([(2, 8, 8, 8)])["weight"].shape == (8, 2, 3, 3)


# ---------------------------------------------------------------- pooling
# (N, C, H, W, kernel, stride, padding, dilation)
POOL_CASES = [
    (2, 3, 9, 11, 3, 2, 1, 1),                     # ResNet's 3x3/2 pad 1
    (1, 4, 8, 8, 2, 2, 0, 1),
    (3, 2, 7, 9, (3, 2), (1, 2), ((1, 0), (0, 1)), 1),   # asymmetric padding
    (2, 3, 10, 9, 3, 2, 1, 2),                     # dilation 2
    (2, 5, 3, 3, 3, 1, 0, 1),                      # 1x1 output
    (1, 3, 6, 5, 3, 3, 1, 1),                      # stride 3
    (2, 2, 9, 8, 5, 2, 2, 1),                      # 25 taps (the fast max-pool's general path)
]


def _pads(p):
    if isinstance(p, int):
        return (p, p, p, p)
    return (p[1][0], p[1][1], p[0][0], p[0][1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES, ids=[str(c) for c in POOL_CASES])
@pytest.mark.parametrize("impl", ["compiled", "fast", "reference"])
def test_maxpool2d(case, dtype, impl, numpy_kernels):
    numpy_kernels(impl)
    rng = np.random.default_rng(4)
    n, c, h, w, k, s, p, d = case
    op = make_op("maxpool2d", "pool", kernel_size=k, stride=s, padding=p, dilation=d)
    x = rng.standard_normal((n, c, h, w))

    def fn(x):
        return F.max_pool2d(F.pad(x, _pads(p), value=-np.inf), k, s, dilation=d)
    check(op, fn, [x], {}, dtype, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [c for c in POOL_CASES if c[7] == 1], ids=str)
def test_avgpool2d_counts_padding(case, dtype, kernels):
    rng = np.random.default_rng(5)
    n, c, h, w, k, s, p, d = case
    op = make_op("avgpool2d", "pool", kernel_size=k, stride=s, padding=p)
    x = rng.standard_normal((n, c, h, w))

    def fn(x):  # count_include_pad=True: padded zeros count in the average
        return F.avg_pool2d(F.pad(x, _pads(p)), k, s)
    check(op, fn, [x], {}, dtype, rng=rng)
    if isinstance(p, int) and p > 0:   # and PyTorch's own padding agrees
        def fn2(x):
            return F.avg_pool2d(x, k, s, padding=p, count_include_pad=True)
        check(op, fn2, [x], {}, dtype, rng=rng)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pools_any_memory_layout(layout, kernels):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 9, 11))
    op = make_op("maxpool2d", "pool", kernel_size=3, stride=2, padding=1)
    check(op, lambda x: F.max_pool2d(x, 3, 2, 1), [x], {}, np.float64, layout, rng)
    op = make_op("avgpool2d", "pool", kernel_size=3, stride=2, padding=1)
    check(op, lambda x: F.avg_pool2d(x, 3, 2, 1), [x], {}, np.float64, layout, rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 4, 1, 1), (3, 2, 4, 4)])
def test_global_avgpool(shape, layout, dtype):
    rng = np.random.default_rng(7)
    op = make_op("global_avgpool", "gap")
    check(op, lambda x: x.mean(dim=(2, 3)), [rng.standard_normal(shape)], {}, dtype, layout, rng)


# ---------------------------------------------------------------- linear, relu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contig", "sliced"])
@pytest.mark.parametrize("n,fin,fout,bias", [(3, 7, 5, True), (1, 4, 9, False), (5, 1, 2, True)])
def test_linear(n, fin, fout, bias, layout, dtype):
    rng = np.random.default_rng(8)
    op = make_op("linear", "fc", out_features=fout, bias=bias)
    params = {"weight": rng.standard_normal((fout, fin))}
    if bias:
        params["bias"] = rng.standard_normal(fout)
    check(op, lambda x, weight, bias=None: F.linear(x, weight, bias),
          [rng.standard_normal((n, fin))], params, dtype, layout, rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (4, 9), (1, 1, 1, 1)])
@pytest.mark.parametrize("impl", ["compiled", "fast"])
def test_relu(shape, layout, dtype, impl, numpy_kernels):
    numpy_kernels(impl)
    rng = np.random.default_rng(9)
    op = make_op("relu", "relu")
    check(op, F.relu, [rng.standard_normal(shape)], {}, dtype, layout, rng)


ACTIVATIONS = [
    ("sigmoid", {}, torch.sigmoid),
    ("leaky_relu", {"negative_slope": 0.1}, lambda x: F.leaky_relu(x, 0.1)),
    ("leaky_relu", {"negative_slope": 0.0}, lambda x: F.leaky_relu(x, 0.0)),
    ("clip", {"lo": 0.0, "hi": 6.0}, F.relu6),
    ("clip", {"lo": -1.0, "hi": 0.5}, lambda x: F.hardtanh(x, -1.0, 0.5)),
    ("hardswish", {}, F.hardswish),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (4, 9)])
@pytest.mark.parametrize("kind,attrs,fn", ACTIVATIONS, ids=[f"{k}{a}" for k, a, _ in ACTIVATIONS])
def test_activations(kind, attrs, fn, shape, layout, dtype):
    rng = np.random.default_rng(11)
    op = make_op(kind, kind, **attrs)
    x = rng.standard_normal(shape) * 4          # reaches both ends of clip and hardswish
    check(op, fn, [x], {}, dtype, layout, rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_channel_scale(layout, dtype):
    rng = np.random.default_rng(12)
    op = make_op("channel_scale", "scale")
    x, sc = rng.standard_normal((3, 4, 5, 2)), rng.standard_normal((3, 4))
    check(op, lambda a, b: a * b[:, :, None, None], [x, sc], {}, dtype, layout, rng)


# ---------------------------------------------------------------- batch norm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (1, 3, 2, 3), (6, 5), (2, 3, 1, 1)])
@pytest.mark.parametrize("impl", ["compiled", "fast"])
def test_batchnorm(shape, training, layout, dtype, impl, numpy_kernels):
    numpy_kernels(impl)
    rng = np.random.default_rng(10)
    mom = 0.3
    op = make_op("batchnorm", "bn", eps=1e-3, momentum=mom)
    c = shape[1]
    x = rng.standard_normal(shape) * 2 + 1.5
    params = {"weight": rng.standard_normal(c), "bias": rng.standard_normal(c)}
    rm0, rv0 = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
    buffers = {"running_mean": rm0.astype(dtype), "running_var": rv0.astype(dtype)}
    trm = torch.tensor(rm0.astype(dtype).astype(np.float64))
    trv = torch.tensor(rv0.astype(dtype).astype(np.float64))

    def fn(x, weight, bias):
        return F.batch_norm(x, trm, trv, weight, bias, training=training, momentum=mom, eps=1e-3)
    check(op, fn, [x], params, dtype, layout, rng, buffers=buffers, training=training)
    # running statistics: updated in training exactly as PyTorch updates them
    # (the unbiased variance), untouched in inference
    tol = TOL[dtype]
    assert rel_err(buffers["running_mean"], trm.numpy()) <= tol
    assert rel_err(buffers["running_var"], trv.numpy()) <= tol
    if not training:
        assert np.array_equal(buffers["running_mean"], rm0.astype(dtype))


# ---------------------------------------------------------------- joins, flatten
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("four_d", [True, False], ids=["4d", "2d"])
def test_concat(four_d, layout, dtype):
    rng = np.random.default_rng(11)
    shapes = [(2, 3, 4, 5), (2, 1, 4, 5), (2, 4, 4, 5)] if four_d else [(3, 2), (3, 5)]
    xs = [rng.standard_normal(s) for s in shapes]
    check(make_op("concat", "cat"), lambda *t: torch.cat(t, dim=1), xs, {}, dtype, layout, rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_add(k, layout, dtype):
    rng = np.random.default_rng(12)
    xs = [rng.standard_normal((2, 3, 4, 5)) for _ in range(k)]

    def fn(*t):
        out = t[0] * 1.0
        for a in t[1:]:
            out = out + a
        return out
    check(make_op("add", "add"), fn, xs, {}, dtype, layout, rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 7, 1, 1), (3, 6)])
def test_flatten(shape, layout, dtype):
    rng = np.random.default_rng(13)
    check(make_op("flatten", "flat"), lambda x: torch.flatten(x, 1),
          [rng.standard_normal(shape)], {}, dtype, layout, rng)


# ---------------------------------------------------------------- loss
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contig", "sliced"])
@pytest.mark.parametrize("n,k", [(5, 7), (1, 3), (8, 1000)])
def test_softmax_cross_entropy(n, k, layout, dtype):
    rng = np.random.default_rng(14)
    z = rng.standard_normal((n, k)) * 3
    labels = rng.integers(0, k, n)
    tl = torch.tensor(labels)

    def fn(z):  # per-sample loss over the GLOBAL batch: sums to the mean loss
        return F.cross_entropy(z, tl, reduction="none") / n
    op = make_op("softmax_xent", "loss")
    check(op, fn, [z], {}, dtype, layout, rng, labels=labels)
    y, _, _ = run_whole(op, [z.astype(dtype)], labels=labels)
    mean = F.cross_entropy(torch.tensor(z.astype(dtype).astype(np.float64)), tl).item()
    assert abs(float(y.sum()) - mean) <= TOL[dtype] * abs(mean)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contig", "sliced"])
@pytest.mark.parametrize("n,k,eps", [(5, 7, 0.1), (1, 3, 0.5), (8, 1000, 0.1), (4, 2, 0.9)])
def test_softmax_cross_entropy_with_label_smoothing(n, k, eps, layout, dtype):
    rng = np.random.default_rng(18)
    z = rng.standard_normal((n, k)) * 3
    labels = rng.integers(0, k, n)
    tl = torch.tensor(labels)

    def fn(z):
        return F.cross_entropy(z, tl, reduction="none", label_smoothing=eps) / n
    op = make_op("softmax_xent", "loss", label_smoothing=eps)
    check(op, fn, [z], {}, dtype, layout, rng, labels=labels)
    # the geometry is the loss's own: samples split, every class of a sample read
    plain = make_op("softmax_xent", "loss")
    box = ((1, n), (0, 1))
    assert op.input_box(0, box[:1], [(n, k)]) == plain.input_box(0, box[:1], [(n, k)])
    assert op.splittable == ("n",) and op.attrs() == {"label_smoothing": eps} and plain.attrs() == {}


def test_label_smoothing_outside_0_1_is_named():
    from hpcnn.ops import OpError
    for bad in (-0.1, 1.0, "0.1", True):
        with pytest.raises(OpError, match=r"label_smoothing must be a number in \[0, 1\)"):
            make_op("softmax_xent", "loss", label_smoothing=bad)


# ---------------------------------------------------------------- dropout
def _dropout(p=0.3):
    return make_op("dropout", "drop1", p=p)


def test_dropout_inference_is_identity():
    x = np.random.default_rng(15).standard_normal((3, 4, 5, 6))
    y, gx, _ = run_whole(_dropout(), [x], dy=x, training=False)
    assert np.array_equal(y, x) and np.array_equal(gx[0], x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_mask_scale_and_gradient(dtype):
    p = 0.3
    x = np.random.default_rng(16).standard_normal((4, 8, 9, 10)).astype(dtype)
    dy = np.random.default_rng(17).standard_normal(x.shape).astype(dtype)
    y, (gx,), _ = run_whole(_dropout(p), [x], dy=dy, seed=3, step=5)
    keep = y != 0
    # kept elements are scaled by 1/(1-p); the gradient uses the same mask
    np.testing.assert_allclose(y[keep], x[keep] / (1 - p), rtol=TOL[dtype])
    np.testing.assert_allclose(gx[keep], dy[keep] / (1 - p), rtol=TOL[dtype])
    assert np.all(gx[~keep] == 0)
    # expected keep fraction (binomial: 2880 draws, 5 sigma is about 0.043)
    frac = keep.mean()
    assert abs(frac - (1 - p)) < 5 * np.sqrt(p * (1 - p) / keep.size), frac


def test_dropout_is_reproducible_and_keyed():
    x = np.ones((4, 8, 6, 6))
    masks = {}
    for seed, step, name in [(1, 0, "a"), (1, 0, "a"), (2, 0, "a"), (1, 1, "a"), (1, 0, "b")]:
        op = make_op("dropout", name, p=0.5)
        y, _, _ = run_whole(op, [x], seed=seed, step=step)
        key = (seed, step, name)
        if key in masks:
            assert np.array_equal(masks[key], y != 0), "same (seed, step, layer) gave another mask"
        masks[key] = y != 0
    base = masks[(1, 0, "a")]
    for key in [(2, 0, "a"), (1, 1, "a"), (1, 0, "b")]:
        assert not np.array_equal(base, masks[key]), f"{key} gave the same mask as (1, 0, 'a')"


def test_dropout_tile_mask_equals_whole_mask():
    """A tile computed from its box gives the same mask as the whole tensor."""
    rng = np.random.default_rng(18)
    x = rng.standard_normal((5, 6, 7, 8))
    op = _dropout(0.4)
    y_whole, _, _ = run_whole(op, [x], seed=9, step=2)
    box = ((1, 4), (2, 5), (3, 7), (0, 5))
    ctx = TileContext(out_box=box, in_boxes=[box], in_shapes=[x.shape], out_shape=x.shape,
                      training=True, seed=9, step=2)
    sl = tuple(slice(lo, hi) for lo, hi in box)
    y_tile, _ = op.forward([x[sl]], {}, {}, ctx)
    assert np.array_equal(y_tile, y_whole[sl])


def test_dropout_2d():
    x = np.random.default_rng(19).standard_normal((7, 300))
    y, _, _ = run_whole(_dropout(0.5), [x], seed=1)
    assert 0.4 < (y != 0).mean() < 0.6


# ---------------------------------------------------------------- host threads
@pytest.fixture
def host_threads_3(monkeypatch):
    """Three host threads, and every array big enough to be split."""
    from hpcnn.ops import host_threads
    monkeypatch.setattr(host_threads, "MIN_ELEMENTS", 1)
    before = host_threads.host_threads()
    host_threads.set_host_threads(3)
    yield
    host_threads.set_host_threads(before)


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[1], CONV_CASES[2], CONV_CASES[5],
                                  CONV_CASES[6], (4, 8, 6, 6, 40, 3, 1, 1, 1, True)],
                         ids=["3x3", "asym", "s2d2", "1x1s2", "7x7s2", "col2im"])
def test_conv2d_split_over_host_threads(case, host_threads_3):
    rng = np.random.default_rng(20)
    op = conv_op(case)
    x, params = conv_data(case, rng)
    check(op, conv_torch(case), [x], params, np.float64, rng=rng)


def test_split_reorders_and_copies_cover_every_block(host_threads_3):
    """The threaded reorders and copies write every block exactly (run
    many times: a race between threads would leave a block unwritten)."""
    from hpcnn.ops import nhwc_kernels as K
    rng = np.random.default_rng(23)
    w = rng.standard_normal((37, 11, 3, 3))
    for _ in range(30):
        assert np.array_equal(K._reordered(w, (0, 2, 3, 1)), w.transpose(0, 2, 3, 1))
        assert np.array_equal(K._reordered(w[:, :, ::-1, ::-1], (2, 3, 0, 1), 2),
                              w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))
        t = w.transpose(0, 2, 3, 1)[:, ::2]
        assert np.array_equal(K.copy_split(t), t)


@pytest.mark.parametrize("impl", ["compiled", "fast"])
@pytest.mark.parametrize("training", [True, False])
def test_other_ops_split_over_host_threads(training, impl, host_threads_3, numpy_kernels):
    numpy_kernels(impl)
    rng = np.random.default_rng(21)
    x = rng.standard_normal((5, 3, 9, 7))
    check(make_op("maxpool2d", "p", kernel_size=3, stride=2, padding=1),
          lambda x: F.max_pool2d(x, 3, 2, 1), [x], {}, np.float64, "nhwc", rng)
    check(make_op("relu", "r"), F.relu, [x], {}, np.float64, "nhwc", rng)
    check(make_op("add", "a"), lambda a, b: a + b, [x, x[::-1].copy()], {}, np.float64, "nhwc", rng)
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    params = {"weight": rng.standard_normal(3), "bias": rng.standard_normal(3)}
    check(make_op("batchnorm", "bn"),
          lambda x, weight, bias: F.batch_norm(x, trm, trv, weight, bias, training=training),
          [x], params, np.float64, "nhwc", rng,
          buffers={"running_mean": rm.copy(), "running_var": rv.copy()}, training=training)


def test_pooled_buffers_are_never_shared(monkeypatch):
    """The kernels' pooled temporaries: two forwards of one layer before
    either backward (and repeated steps) still give the right gradients,
    and the pool never holds an array a caller can see."""
    from hpcnn.ops import host_memory
    pool = host_memory.BufferPool(min_bytes=1)
    monkeypatch.setattr(host_memory, "POOL", pool)
    from hpcnn.ops import nhwc_kernels
    monkeypatch.setattr(nhwc_kernels, "POOL", pool)
    rng = np.random.default_rng(22)
    case = CONV_CASES[0]
    op = make_op("conv2d", "conv", out_channels=case[4], kernel_size=3, padding=1)
    x1, params = conv_data(case, rng)
    x2 = rng.standard_normal(x1.shape)
    ctx = TileContext.whole(op, [x1.shape])
    y1, s1 = op.forward([x1], params, {}, ctx)
    y2, s2 = op.forward([x2], params, {}, ctx)        # before backward of the first
    dy = rng.standard_normal(y1.shape)
    for x, s in ((x1, s1), (x2, s2)):
        (dx,), g = op.backward(dy, s, params, ctx)
        _, (tdx,), tg = torch_vjp(conv_torch(case), [x], params, dy)
        assert rel_err(dx, tdx) <= 1e-10 and rel_err(g["weight"], tg["weight"]) <= 1e-10
        for a in (dx, g["weight"], g["bias"], y1, y2):
            for free in pool._free.values():
                assert all(not np.shares_memory(a, b) for b in free)
    assert pool.held_bytes > 0            # the columns went back to the pool
    for _ in range(2):                     # and are reused by later steps
        y, s = op.forward([x1], params, {}, ctx)
        (dx,), _ = op.backward(dy, s, params, ctx)
        _, (tdx,), _ = torch_vjp(conv_torch(case), [x1], params, dy)
        assert rel_err(y, y1) <= 1e-12 and rel_err(dx, tdx) <= 1e-10
