"""Bad input gives OpError (or GraphError through the Graph API) whose
message names the layer and the offending value, never a bare NumPy
traceback from inside a kernel."""
from __future__ import annotations

import numpy as np
import pytest

from hpcnn.graph import Graph, GraphError
from hpcnn.ops import REGISTRY, OpError, TileContext, full_box, make_op


def whole_ctx(op, shapes, **kw):
    out = op.infer_shape(shapes)
    ob = full_box(out)
    return TileContext(out_box=ob, in_boxes=[op.input_box(i, ob, shapes) for i in range(len(shapes))],
                       in_shapes=[tuple(s) for s in shapes], out_shape=tuple(out), **kw)


def test_unknown_op_kind_lists_known_ops():
    with pytest.raises(OpError, match=r"layer 'c1'.*unknown op 'convolution'.*conv2d"):
        make_op("convolution", "c1")
    g = Graph()
    x = g.input((1, 3, 8, 8))
    with pytest.raises(GraphError, match=r"'c1'.*unknown op 'conv4d'"):
        g.layer("conv4d", x, "c1")


@pytest.mark.parametrize("kind,attrs,bad", [
    ("conv2d", dict(out_channels=4, kernel=3), "kernel"),
    ("maxpool2d", dict(kernel_size=2, ceil_mode=True), "ceil_mode"),
    ("relu", dict(inplace=True), "inplace"),
    ("batchnorm", dict(affine=False), "affine"),
    ("avgpool2d", dict(kernel_size=2, dilation=2), "dilation"),
])
def test_unknown_attribute(kind, attrs, bad):
    with pytest.raises(OpError, match=rf"layer 'L7' \({kind}\).*{bad}"):
        make_op(kind, "L7", **attrs)


@pytest.mark.parametrize("kind,attrs,needle", [
    ("conv2d", dict(out_channels=0), r"out_channels must be positive, got 0"),
    ("conv2d", dict(out_channels=-3), r"out_channels must be positive, got -3"),
    ("conv2d", dict(out_channels=4, kernel_size=0), r"kernel_size must be positive, got 0"),
    ("conv2d", dict(out_channels=4, stride=(1, 0)), r"stride must be positive, got 0"),
    ("conv2d", dict(out_channels=4, dilation=-1), r"dilation must be positive, got -1"),
    ("conv2d", dict(out_channels=4, padding=-1), r"padding must be non-negative, got -1"),
    ("conv2d", dict(out_channels=4, padding=((1, -2), (0, 0))), r"padding must be non-negative, got -2"),
    ("conv2d", dict(out_channels=4, kernel_size=(3, 3, 3)), r"kernel_size must be an int or a pair"),
    ("conv2d", dict(out_channels=4, kernel_size=2.5), r"kernel_size must be an integer, got 2.5"),
    ("conv2d", dict(out_channels="8"), r"out_channels must be an integer, got '8'"),
    ("conv2d", dict(out_channels=4, bias="yes"), r"bias must be true or false, got 'yes'"),
    ("conv2d", dict(), r"out_channels is required"),
    ("linear", dict(out_features=0), r"out_features must be positive, got 0"),
    ("maxpool2d", dict(kernel_size=3, padding=2), r"padding \(2, 2\) must be at most half"),
    ("dropout", dict(p=1.0), r"p must be a probability in \[0, 1\), got 1.0"),
    ("dropout", dict(p=-0.1), r"got -0.1"),
    ("batchnorm", dict(eps=0), r"eps must be a positive number, got 0"),
    ("batchnorm", dict(momentum=1.5), r"momentum must be in \[0, 1\], got 1.5"),
    ("input", dict(shape=(4, 0, 8, 8)), r"shape must be positive, got 0"),
    ("input", dict(shape=(4, 3, -8, 8)), r"shape must be positive, got -8"),
    ("input", dict(shape=(4, 3, 8)), r"shape must be \(N, C, H, W\), \(N, C, D, H, W\) or \(N, F\)"),
])
def test_bad_attribute_values(kind, attrs, needle):
    with pytest.raises(OpError, match=rf"layer 'bad' \({kind}\): .*{needle}"):
        make_op(kind, "bad", **attrs)


@pytest.mark.parametrize("kind,attrs,shapes", [
    ("conv2d", dict(out_channels=2), [(2, 3, 0, 5)]),
    ("relu", {}, [(2, 0, 4, 4)]),
    ("batchnorm", {}, [(0, 3)]),
    ("linear", dict(out_features=2), [(3, -1)]),
    ("add", {}, [(2, 3, 0, 1), (2, 3, 0, 1)]),
    ("softmax_xent", {}, [(0, 5)]),
])
def test_non_positive_input_sizes(kind, attrs, shapes):
    op = make_op(kind, "L", **attrs)
    with pytest.raises(OpError, match=r"layer 'L'.*non-positive size"):
        op.infer_shape(shapes)


@pytest.mark.parametrize("kind,attrs,shape,needle", [
    ("conv2d", dict(out_channels=2, kernel_size=5), (1, 3, 4, 9), r"kernel \(5, 5\).*larger than the padded input H=4\+0\+0"),
    ("conv2d", dict(out_channels=2, kernel_size=3, dilation=3, padding=1), (1, 3, 9, 4),
     r"extent 7 with dilation 3.*W=4\+1\+1"),
    ("maxpool2d", dict(kernel_size=3), (1, 3, 2, 2), r"larger than the padded input"),
    ("avgpool2d", dict(kernel_size=(1, 4)), (1, 3, 5, 3), r"larger than the padded input W=3"),
])
def test_kernel_larger_than_padded_input(kind, attrs, shape, needle):
    op = make_op(kind, "win", **attrs)
    with pytest.raises(OpError, match=rf"layer 'win'.*{needle}"):
        op.infer_shape([shape])
    g = Graph()
    x = g.input(shape)
    with pytest.raises(GraphError, match=rf"node 'win'.*{needle}"):
        g.layer(kind, x, "win", **attrs)


# one valid configuration of every op, to feed it bad arrays
VALID = {
    "conv2d": (dict(out_channels=2, kernel_size=3, padding=1), [(2, 3, 5, 5)]),
    "maxpool2d": (dict(kernel_size=2), [(2, 3, 4, 4)]),
    "avgpool2d": (dict(kernel_size=2), [(2, 3, 4, 4)]),
    "global_avgpool": ({}, [(2, 3, 4, 4)]),
    "linear": (dict(out_features=3), [(2, 5)]),
    "relu": ({}, [(2, 3, 4, 4)]),
    "batchnorm": ({}, [(2, 3, 4, 4)]),
    "dropout": (dict(p=0.5), [(2, 3, 4, 4)]),
    "concat": ({}, [(2, 3, 4, 4), (2, 1, 4, 4)]),
    "add": ({}, [(2, 3, 4, 4), (2, 3, 4, 4)]),
    "flatten": ({}, [(2, 3, 4, 4)]),
    "softmax_xent": ({}, [(2, 5)]),
    "sigmoid": ({}, [(2, 3, 4, 4)]),
    "leaky_relu": (dict(negative_slope=0.2), [(2, 3, 4, 4)]),
    "clip": (dict(lo=0.0, hi=6.0), [(2, 3, 4, 4)]),
    "hardswish": ({}, [(2, 3, 4, 4)]),
    "channel_scale": ({}, [(2, 3, 4, 4), (2, 3)]),
    "conv3d": (dict(out_channels=2, kernel_size=2, padding=((0, 1), (0, 1), (0, 1))), [(2, 3, 3, 4, 5)]),
    "maxpool3d": (dict(kernel_size=2), [(2, 3, 4, 4, 4)]),
    "avgpool3d": (dict(kernel_size=2), [(2, 3, 4, 4, 4)]),
    "tanh": (dict(scale=1.2), [(2, 3, 4, 4)]),
    "mse": ({}, [(2, 4)]),
}


def test_every_registered_op_is_covered():
    assert set(REGISTRY) - {"input"} == set(VALID)


def _params(op, shapes, dtype):
    return {k: np.ones(s.shape, dtype) for k, s in op.param_specs(shapes).items()}


def _buffers(op, shapes, dtype):
    return {k: np.ones(s.shape, dtype) for k, s in op.buffer_specs(shapes).items()}


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float16, np.bool_, np.complex128])
@pytest.mark.parametrize("kind", sorted(VALID))
def test_wrong_dtype(kind, dtype):
    attrs, shapes = VALID[kind]
    op = make_op(kind, "typed", **attrs)
    xs = [np.ones(s, dtype=dtype) for s in shapes]
    ctx = whole_ctx(op, shapes, labels=np.zeros(shapes[0][0], np.int64))
    with pytest.raises(OpError, match=rf"layer 'typed' \({kind}\).*dtype.*{np.dtype(dtype).name}"):
        op.forward(xs, _params(op, shapes, np.float32), _buffers(op, shapes, np.float32), ctx)


def _mixable(kind):
    """An op with parameters or with two inputs can get two float types."""
    attrs, shapes = VALID[kind]
    return len(shapes) > 1 or bool(make_op(kind, "probe", **attrs).param_specs(shapes))


@pytest.mark.parametrize("kind", [k for k in sorted(VALID) if _mixable(k)])
def test_mixed_float_dtypes(kind):
    """float32 data with float64 parameters (or inputs of two float types)
    is an error rather than a silent upcast (ops with one input and no
    parameters have nothing to mix)."""
    attrs, shapes = VALID[kind]
    op = make_op(kind, "mixed", **attrs)
    ctx = whole_ctx(op, shapes, labels=np.zeros(shapes[0][0], np.int64))
    xs = [np.ones(s, np.float32) for s in shapes]
    params = _params(op, shapes, np.float64)
    if not params:
        xs[-1] = xs[-1].astype(np.float64)
    with pytest.raises(OpError, match=r"layer 'mixed'.*(float64|float32)"):
        op.forward(xs, params, _buffers(op, shapes, np.float32), ctx)


@pytest.mark.parametrize("kind", sorted(VALID))
def test_array_of_wrong_shape_for_the_tile(kind):
    attrs, shapes = VALID[kind]
    op = make_op(kind, "shaped", **attrs)
    ctx = whole_ctx(op, shapes, labels=np.zeros(shapes[0][0], np.int64))
    xs = [np.ones(s, np.float64) for s in shapes]
    xs[0] = np.ones(tuple(s + 1 for s in shapes[0]), np.float64)
    with pytest.raises(OpError, match=r"layer 'shaped'.*input 0 has shape"):
        op.forward(xs, _params(op, shapes, np.float64), _buffers(op, shapes, np.float64), ctx)


def test_wrong_number_of_inputs():
    with pytest.raises(OpError, match=r"layer 'c'.*takes 1 input\(s\), got 2"):
        make_op("conv2d", "c", out_channels=2).infer_shape([(1, 1, 3, 3)] * 2)
    with pytest.raises(OpError, match=r"layer 'fc'.*input \(flatten it first\) must have 2 dimensions"):
        make_op("linear", "fc", out_features=2).infer_shape([(1, 1, 3, 3)])


@pytest.mark.parametrize("labels,needle", [
    (np.array([0, 5]), r"labels must lie in \[0, 5\), got values in \[0, 5\]"),
    (np.array([-1, 2]), r"got values in \[-1, 2\]"),
    (np.array([0, 1, 2]), r"labels have shape \(3,\), expected \(2,\)"),
    (np.array([0.0, 1.5]), r"labels must be integers, got float64"),
    (None, r"no labels were given"),
])
def test_labels_out_of_range(labels, needle):
    op = make_op("softmax_xent", "loss")
    ctx = whole_ctx(op, [(2, 5)], labels=labels)
    with pytest.raises(OpError, match=rf"layer 'loss'.*{needle}"):
        op.forward([np.zeros((2, 5))], {}, {}, ctx)


def test_mismatched_joins():
    with pytest.raises(OpError, match=r"layer 'cat'.*input 1 has shape \(2, 3, 5, 4\).*input 0 of shape \(2, 3, 4, 4\)"):
        make_op("concat", "cat").infer_shape([(2, 3, 4, 4), (2, 3, 5, 4)])
    with pytest.raises(OpError, match=r"layer 'cat'.*input 1 has shape \(3, 3, 4, 4\)"):
        make_op("concat", "cat").infer_shape([(2, 3, 4, 4), (3, 3, 4, 4)])
    with pytest.raises(OpError, match=r"layer 'sum'.*input 2 has shape \(2, 4, 4, 4\) but input 0 has shape \(2, 3, 4, 4\)"):
        make_op("add", "sum").infer_shape([(2, 3, 4, 4)] * 2 + [(2, 4, 4, 4)])
    g = Graph()
    a = g.input((2, 3, 8, 8))
    b = g.conv(a, 4, 3, padding=1, name="b")
    with pytest.raises(GraphError, match=r"node 'res'.*input 1 has shape \(2, 4, 8, 8\)"):
        g.add_([a, b], name="res")


def test_sequential_model_reports_bad_labels():
    from hpcnn.runtime.sequential import SequentialModel
    g = Graph("tiny")
    x = g.input((2, 4))
    g.loss(g.linear(x, 3, name="fc"))
    m = SequentialModel(g, dtype=np.float64)
    with pytest.raises(OpError, match=r"layer 'loss'.*\[0, 3\).*\[0, 7\]"):
        m.forward(np.zeros((2, 4)), np.array([0, 7]))


@pytest.mark.parametrize("kind,attrs,shapes,needle", [
    ("leaky_relu", dict(negative_slope=-1), None, "negative_slope must be a non-negative number"),
    ("clip", dict(lo=6, hi=0), None, "lo must be less than hi"),
    ("clip", dict(lo="a", hi=1), None, "lo must be a number"),
    ("channel_scale", {}, [(2, 3, 4, 4), (2, 4)], r"input 1 must be \(N, C\) = \(2, 3\)"),
])
def test_new_activation_and_scale_errors_are_named(kind, attrs, shapes, needle):
    with pytest.raises(OpError, match=rf"layer 'x'.*{needle}"):
        op = make_op(kind, "x", **attrs)
        op.infer_shape(shapes or [(2, 3, 4, 4)])
