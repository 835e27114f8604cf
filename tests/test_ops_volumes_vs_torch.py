"""The 3-D ops (volumes N x C x D x H x W) against PyTorch as the oracle:
conv3d, max and average pooling 3-D, global average pooling, batch norm
and leaky ReLU over 5-D tensors, tanh and the mean-squared-error loss.

As in test_ops_vs_torch.py: the output, every input gradient and every
parameter gradient for a random upstream gradient, with odd sizes, stride
2, dilation 2 and asymmetric padding, run as the sequential executor runs
an op on the whole tensor; float64 to 1e-10, float32 looser; inputs also in
channels-last and strided memory; both kernel sets.
"""
from __future__ import annotations

import numpy as np
import pytest

import torch
from test_ops_vs_torch import TOL, rel_err, run_whole, torch_vjp

from hpcnn.ops import make_op

F = torch.nn.functional
DTYPES = [np.float64, np.float32]


def in_layout5(a: np.ndarray, layout: str) -> np.ndarray:
    """The same logical 5-D values in another memory layout."""
    if layout == "contig" or a.ndim != 5:
        return np.ascontiguousarray(a)
    if layout == "ndhwc":
        return np.ascontiguousarray(a.transpose(0, 2, 3, 4, 1)).transpose(0, 4, 1, 2, 3)
    if layout == "sliced":
        n, c, d, h, w = a.shape
        big = np.zeros((n + 1, 2 * c, d + 1, h + 2, 2 * w), a.dtype)
        big[1:, ::2, 1:, 1:h + 1, 1::2] = a
        return big[1:, ::2, 1:, 1:h + 1, 1::2]
    raise ValueError(layout)


def check5(op, fn, xs, params, dtype, layout="contig", seed=0, **kw):
    rng = np.random.default_rng(seed)
    xs_d = [in_layout5(x.astype(dtype), layout) for x in xs]
    ps_d = {k: v.astype(dtype) for k, v in params.items()}
    out_shape = op.infer_shape([x.shape for x in xs])
    dy = rng.standard_normal(out_shape)
    y, gx, gp = run_whole(op, xs_d, ps_d, dy=in_layout5(dy.astype(dtype), layout), **kw)
    ty, tgx, tgp = torch_vjp(fn, [x.astype(dtype).astype(np.float64) for x in xs],
                             {k: v.astype(dtype).astype(np.float64) for k, v in params.items()}, dy)
    tol = TOL[dtype]
    assert y.dtype == dtype
    assert rel_err(y, ty) <= tol, f"output: rel err {rel_err(y, ty):.3g}"
    for i, (a, b) in enumerate(zip(gx, tgx)):
        assert rel_err(a, b) <= tol, f"input {i} gradient: rel err {rel_err(a, b):.3g}"
    assert set(gp) == set(tgp)
    for k in gp:
        assert gp[k].dtype == dtype
        assert rel_err(gp[k], tgp[k]) <= tol, f"{k} gradient: rel err {rel_err(gp[k], tgp[k]):.3g}"


def _torch_pad(pads):
    """((d0, d1), (h0, h1), (w0, w1)) as F.pad's (w0, w1, h0, h1, d0, d1)."""
    out = []
    for lo, hi in reversed(pads):
        out += [lo, hi]
    return tuple(out)


def _pairs(padding):
    if isinstance(padding, int):
        return ((padding, padding),) * 3
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


# (N, Cin, D, H, W, Cout, kernel, stride, padding, dilation, bias)
CONV3D_CASES = [
    (2, 3, 5, 7, 6, 4, 3, 1, 1, 1, True),
    (1, 2, 9, 7, 8, 3, (3, 2, 2), 2, ((1, 0), (0, 1), (2, 1)), 1, False),   # asymmetric, batch 1
    (2, 3, 9, 10, 11, 2, 3, 2, 2, 2, True),                                 # stride 2, dilation 2
    (2, 4, 5, 4, 3, 5, 2, 1, ((0, 1), (0, 1), (0, 1)), 1, True),            # CosmoFlow's 'same' k=2
    (2, 6, 3, 4, 5, 7, 1, 1, 0, 1, False),                                  # 1x1x1
    (1, 2, 3, 3, 3, 2, 3, 1, 0, 1, True),                                   # 1x1x1 output
]


def _conv3d_case(case, rng):
    n, cin, d, h, w, cout, k, s, p, dil, bias = case
    op = make_op("conv3d", "c", out_channels=cout, kernel_size=k, stride=s, padding=p,
                 dilation=dil, bias=bias)
    x = rng.standard_normal((n, cin, d, h, w))
    params = {"weight": rng.standard_normal(op.param_specs([x.shape])["weight"].shape)}
    if bias:
        params["bias"] = rng.standard_normal(cout)
    pads = _pairs(p)

    def fn(x, weight, bias=None):
        return F.conv3d(F.pad(x, _torch_pad(pads)), weight, bias, stride=s, dilation=dil)
    return op, x, params, fn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV3D_CASES, ids=[str(c) for c in CONV3D_CASES])
def test_conv3d(case, dtype, kernels):
    op, x, params, fn = _conv3d_case(case, np.random.default_rng(1))
    check5(op, fn, [x], params, dtype)


@pytest.mark.parametrize("layout", ["ndhwc", "sliced"])
@pytest.mark.parametrize("case", [CONV3D_CASES[1], CONV3D_CASES[3], CONV3D_CASES[4]], ids=str)
def test_conv3d_any_memory_layout(case, layout, kernels):
    op, x, params, fn = _conv3d_case(case, np.random.default_rng(2))
    check5(op, fn, [x], params, np.float64, layout)


# (N, C, D, H, W, kernel, stride, padding, dilation)
POOL3D_CASES = [
    (2, 3, 6, 8, 4, 2, None, 0, 1),
    (1, 2, 7, 9, 8, 3, 2, 1, 1),
    (2, 2, 9, 7, 10, (3, 2, 3), (1, 2, 2), ((1, 0), (0, 1), 1), (2, 1, 1)),   # asymmetric, dilation 2
    (2, 3, 5, 5, 5, 3, 2, 0, 2),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL3D_CASES, ids=str)
def test_maxpool3d(case, dtype, kernels):
    n, c, d, h, w, k, s, p, dil = case
    op = make_op("maxpool3d", "p", kernel_size=k, stride=s, padding=p, dilation=dil)
    x = np.random.default_rng(3).standard_normal((n, c, d, h, w))
    pads = _pairs(p)

    def fn(x):
        return F.max_pool3d(F.pad(x, _torch_pad(pads), value=-np.inf), k, stride=s if s else k,
                            dilation=dil)
    check5(op, fn, [x], {}, dtype)


def test_maxpool3d_ties_send_the_gradient_to_the_first_maximum(kernels):
    op = make_op("maxpool3d", "p", kernel_size=2)
    x = np.zeros((1, 1, 4, 4, 4))
    check5(op, lambda t: F.max_pool3d(t, 2), [x], {}, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [c for c in POOL3D_CASES if c[8] == 1], ids=str)
def test_avgpool3d_counts_padding(case, dtype, kernels):
    n, c, d, h, w, k, s, p, _ = case
    op = make_op("avgpool3d", "p", kernel_size=k, stride=s, padding=p)
    x = np.random.default_rng(4).standard_normal((n, c, d, h, w))
    pads = _pairs(p)

    def fn(x):
        return F.avg_pool3d(F.pad(x, _torch_pad(pads)), k, stride=s if s else k)
    check5(op, fn, [x], {}, dtype)


@pytest.mark.parametrize("layout", ["contig", "ndhwc", "sliced"])
def test_pools3d_any_memory_layout(layout, kernels):
    x = np.random.default_rng(5).standard_normal((2, 3, 7, 6, 5))
    check5(make_op("maxpool3d", "p", kernel_size=3, stride=2, padding=1),
           lambda t: F.max_pool3d(t, 3, stride=2, padding=1), [x], {}, np.float64, layout)
    check5(make_op("avgpool3d", "p", kernel_size=3, stride=2, padding=1),
           lambda t: F.avg_pool3d(t, 3, stride=2, padding=1), [x], {}, np.float64, layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contig", "ndhwc", "sliced"])
@pytest.mark.parametrize("shape", [(2, 5, 3, 4, 7), (1, 4, 1, 1, 1)])
def test_global_avgpool_5d(shape, layout, dtype):
    x = np.random.default_rng(6).standard_normal(shape)
    check5(make_op("global_avgpool", "g"), lambda t: t.mean(dim=(2, 3, 4)), [x], {}, dtype, layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contig", "ndhwc", "sliced"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm_5d(training, layout, dtype):
    rng = np.random.default_rng(7)
    shape = (3, 4, 5, 3, 7)
    x = rng.standard_normal(shape) * 2 + 1
    op = make_op("batchnorm", "bn", eps=1e-5, momentum=0.3)
    params = {"weight": rng.standard_normal(4), "bias": rng.standard_normal(4)}
    rm, rv = rng.standard_normal(4), np.abs(rng.standard_normal(4)) + 0.5
    buffers = {"running_mean": rm.astype(dtype), "running_var": rv.astype(dtype)}
    trm, trv = torch.tensor(rm.astype(dtype).astype(np.float64)), torch.tensor(rv.astype(dtype).astype(np.float64))

    def fn(x, weight, bias):
        return F.batch_norm(x, trm, trv, weight, bias, training=training, momentum=0.3, eps=1e-5)
    check5(op, fn, [x], params, dtype, layout, buffers=buffers, training=training)
    tol = TOL[dtype]
    assert rel_err(buffers["running_mean"], trm.numpy()) <= tol
    assert rel_err(buffers["running_var"], trv.numpy()) <= tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contig", "ndhwc", "sliced"])
def test_leaky_relu_5d(layout, dtype):
    x = np.random.default_rng(8).standard_normal((2, 3, 4, 5, 3))
    check5(make_op("leaky_relu", "a", negative_slope=0.3), lambda t: F.leaky_relu(t, 0.3), [x], {},
           dtype, layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 1.2])
def test_tanh(scale, dtype):
    x = np.random.default_rng(9).standard_normal((5, 4)) * 2
    check5(make_op("tanh", "t", scale=scale), lambda t: scale * torch.tanh(t), [x], {}, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(7, 4), (1, 1), (3, 9)])
def test_mse_loss_is_the_mean_over_every_target(n, k, dtype):
    rng = np.random.default_rng(10)
    z, target = rng.standard_normal((n, k)), rng.standard_normal((n, k))
    op = make_op("mse", "loss")
    y, gx, _ = run_whole(op, [z.astype(dtype)], dy=np.ones(n, dtype), labels=target.astype(dtype))
    tz = torch.tensor(z.astype(dtype).astype(np.float64), requires_grad=True)
    ref = F.mse_loss(tz, torch.tensor(target.astype(dtype).astype(np.float64)))
    ref.backward()
    tol = TOL[dtype]
    assert y.shape == (n,)
    r = float(ref.detach())
    assert abs(float(y.sum()) - r) <= tol * abs(r)
    assert rel_err(gx[0], tz.grad.numpy()) <= tol


def test_mse_loss_refuses_integer_or_misshaped_targets():
    op = make_op("mse", "loss")
    z = np.zeros((3, 4))
    with pytest.raises(ValueError, match="floating-point"):
        run_whole(op, [z], labels=np.zeros((3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="give 4 targets per sample"):
        run_whole(op, [z], labels=np.zeros((3, 2)))


def test_conv3d_refuses_bad_attributes_naming_the_layer():
    with pytest.raises(ValueError, match="'c3'.*kernel_size must be an int or a triple"):
        make_op("conv3d", "c3", out_channels=2, kernel_size=(3, 3))
    op = make_op("conv3d", "c3", out_channels=2, kernel_size=5)
    with pytest.raises(ValueError, match="larger than the padded input D=3"):
        op.infer_shape([(1, 2, 3, 8, 8)])
    with pytest.raises(ValueError, match="5 dimensions"):
        op.infer_shape([(1, 2, 8, 8)])
