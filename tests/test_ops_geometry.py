"""Op geometry: a tile computed from ONLY the input box the op says it reads
equals the same box of the whole computation, and tile backwards summed
over a partition of the output equal the whole backward.

A tile is run exactly as runtime/sequential.py runs the whole tensor, but
for a sub-box: the op's input_box for the output box (unclipped), the input
sliced to its clipped part, a TileContext whose in_boxes are the unclipped
boxes, and the parameter rows of the tile's channel range (parameters are
split along output channels).

Batch norm needs its statistics summed over the tiles that share a channel
range.  The partition tests run every tile in its own thread and give each
TileContext an allreduce that really sums the tiles' partial sums (a barrier
per channel range), so the partial sums of every tile are what is tested,
not a precomputed total.  Single random boxes (not a partition) test batch
norm in inference only, where no statistics are summed.
"""
from __future__ import annotations

import threading
import zlib

import numpy as np
import pytest

from hpcnn.ops import TileContext, clip_box, dims_of, full_box, make_op
from hpcnn.parallel.layout import split_bounds



def split_dims(op, shape) -> tuple:
    """The dimensions of an output of ``shape`` the op may split."""
    return tuple(d for d in dims_of(shape) if d in op.splittable)


def sl(box):
    return tuple(slice(lo, hi) for lo, hi in box)


# (description, op kind, attrs, input shapes, params?, training)
CASES = [
    ("conv3x3", "conv2d", dict(out_channels=5, kernel_size=3, padding=1), [(3, 4, 9, 8)], True),
    ("conv_s2_d2", "conv2d", dict(out_channels=4, kernel_size=3, stride=2, padding=2, dilation=2),
     [(2, 3, 11, 10)], True),
    ("conv_asym", "conv2d", dict(out_channels=3, kernel_size=(3, 2), stride=(2, 1),
                                 padding=((1, 0), (2, 1)), bias=False), [(2, 2, 9, 7)], True),
    ("conv1x1_s2", "conv2d", dict(out_channels=6, kernel_size=1, stride=2), [(2, 5, 7, 8)], True),
    ("conv7x7_s2", "conv2d", dict(out_channels=4, kernel_size=7, stride=2, padding=3),
     [(2, 3, 13, 12)], True),
    # grouped: a random channel range may begin and end inside a group
    ("conv_groups3", "conv2d", dict(out_channels=12, kernel_size=3, stride=2, padding=((1, 2), (0, 1)),
                                    dilation=2, groups=3), [(2, 6, 11, 9)], True),
    ("conv_depthwise", "conv2d", dict(out_channels=6, kernel_size=3, stride=2, padding=1, groups=6),
     [(2, 6, 9, 11)], True),
    ("conv_depthwise_m2", "conv2d", dict(out_channels=10, kernel_size=(3, 2), padding=((2, 0), (1, 1)),
                                         dilation=(2, 1), groups=5, bias=False), [(3, 5, 9, 8)], True),
    ("maxpool", "maxpool2d", dict(kernel_size=3, stride=2, padding=1), [(2, 4, 9, 11)], False),
    ("maxpool_asym_d2", "maxpool2d", dict(kernel_size=(3, 2), stride=(1, 2),
                                         padding=((1, 0), (0, 1)), dilation=(2, 1)),
     [(2, 3, 9, 8)], False),
    ("avgpool", "avgpool2d", dict(kernel_size=3, stride=2, padding=1), [(2, 4, 9, 10)], False),
    ("avgpool_k2", "avgpool2d", dict(kernel_size=2), [(3, 2, 8, 7)], False),
    ("gap", "global_avgpool", {}, [(4, 6, 5, 3)], False),
    ("linear", "linear", dict(out_features=7), [(5, 9)], True),
    ("relu", "relu", {}, [(3, 4, 5, 6)], False),
    ("relu2d", "relu", {}, [(5, 8)], False),
    ("bn4d", "batchnorm", dict(momentum=0.2), [(4, 3, 5, 6)], True),
    ("bn2d", "batchnorm", {}, [(7, 5)], True),
    ("dropout", "dropout", dict(p=0.4), [(3, 4, 5, 6)], False),
    ("concat", "concat", {}, [(3, 2, 5, 4), (3, 3, 5, 4), (3, 1, 5, 4)], False),
    ("add", "add", {}, [(3, 4, 5, 6)] * 3, False),
    ("flatten", "flatten", {}, [(3, 2, 3, 4)], False),
    ("loss", "softmax_xent", {}, [(7, 6)], False),
    # volumes (N, C, D, H, W)
    ("conv3d", "conv3d", dict(out_channels=3, kernel_size=3, padding=1), [(2, 2, 5, 4, 6)], True),
    ("conv3d_s2_d2_asym", "conv3d", dict(out_channels=2, kernel_size=(3, 2, 2), stride=(2, 1, 2),
                                         padding=((1, 0), (0, 1), (2, 1)), dilation=(1, 2, 1)),
     [(2, 2, 7, 6, 5)], True),
    ("conv3d_k2_same", "conv3d", dict(out_channels=3, kernel_size=2, padding=((0, 1),) * 3),
     [(2, 2, 5, 4, 3)], True),
    ("maxpool3d", "maxpool3d", dict(kernel_size=2), [(2, 2, 6, 5, 4)], False),
    ("maxpool3d_s1_pad", "maxpool3d", dict(kernel_size=3, stride=(2, 1, 2), padding=((1, 0), 1, 0),
                                           dilation=(1, 1, 2)), [(2, 2, 7, 5, 8)], False),
    ("avgpool3d", "avgpool3d", dict(kernel_size=3, stride=2, padding=1), [(2, 2, 7, 5, 6)], False),
    ("gap3d", "global_avgpool", {}, [(3, 4, 3, 4, 5)], False),
    ("bn5d", "batchnorm", dict(momentum=0.2), [(2, 3, 4, 3, 5)], True),
    ("leaky5d", "leaky_relu", dict(negative_slope=0.2), [(2, 3, 4, 3, 5)], False),
    ("tanh", "tanh", dict(scale=1.2), [(3, 4, 5, 6)], False),
    ("flatten5d", "flatten", {}, [(3, 2, 2, 3, 2)], False),
    ("mse", "mse", {}, [(7, 4)], False),
]
# sliding-window ops run with both kernel sets (fast channels-last GEMM
# kernels and the reference fallback); the others have one NumPy
# implementation
WINDOW_KINDS = ("conv2d", "maxpool2d", "avgpool2d", "conv3d", "maxpool3d", "avgpool3d")
# and the ops with Numba loops also with the kernel set "compiled"
COMPILED_KINDS = ("batchnorm", "relu", "maxpool2d")


def _sets(kind):
    sets = ("fast", "reference") if kind in WINDOW_KINDS else ("fast",)
    return sets + ("compiled",) if kind in COMPILED_KINDS else sets


CASES = [c + (k,) for c in CASES for k in _sets(c[1])]
IDS = [c[0] + {"reference": "-ref", "compiled": "-compiled"}.get(c[-1], "") for c in CASES]


def make_case(kind, attrs, shapes, has_params, rng):
    op = make_op(kind, "layer_" + kind, **attrs)
    xs = [rng.standard_normal(s) for s in shapes]
    params = {k: rng.standard_normal(spec.shape) for k, spec in op.param_specs(shapes).items()}
    buffers = {k: (np.abs(rng.standard_normal(spec.shape)) + 0.5)
               for k, spec in op.buffer_specs(shapes).items()}
    labels = rng.integers(0, shapes[0][1], shapes[0][0]) if kind == "softmax_xent" else None
    if kind == "mse":
        labels = rng.standard_normal(shapes[0])
    return op, xs, params, buffers, labels


class GroupSum:
    """allreduce for tiles run in threads: sums the arrays of every tile
    that shares a key (the channel range), in a fixed order."""

    def __init__(self, members: dict):
        # members: key -> number of tiles with that key
        self.barriers = {k: threading.Barrier(m) for k, m in members.items()}
        self.slots = {k: {} for k in members}
        self.lock = threading.Lock()

    def for_tile(self, key, tile_id):
        rounds = [0]

        def allreduce(a):
            r = rounds[0]
            rounds[0] += 1
            with self.lock:
                self.slots[key].setdefault(r, {})[tile_id] = np.array(a, copy=True)
            self.barriers[key].wait(timeout=30)
            parts = self.slots[key][r]
            total = sum(parts[t] for t in sorted(parts))
            self.barriers[key].wait(timeout=30)
            return total
        return allreduce


def tile_context(op, out_box, in_shapes, training, labels, allreduce=None, seed=4, step=7):
    out_shape = op.infer_shape(in_shapes)
    in_boxes = [op.input_box(i, out_box, in_shapes) for i in range(len(in_shapes))]
    kw = {} if allreduce is None else {"allreduce": allreduce}
    return TileContext(out_box=tuple(out_box), in_boxes=in_boxes, in_shapes=list(in_shapes),
                       out_shape=tuple(out_shape), training=training, seed=seed, step=step,
                       labels=None if labels is None else labels[sl(out_box[:1])], **kw)


def param_shard(params, out_box):
    """Parameter rows of the tile's output-channel range (axis 0)."""
    if not params:
        return {}
    c0, c1 = out_box[1]
    return {k: v[c0:c1] for k, v in params.items()}


def run_tile(op, xs, params, buffers, out_box, training, labels, dy=None, allreduce=None):
    in_shapes = [tuple(x.shape) for x in xs]
    ctx = tile_context(op, out_box, in_shapes, training, labels, allreduce)
    sub = [x[sl(clip_box(b, x.shape))] for x, b in zip(xs, ctx.in_boxes)]
    ps = param_shard(params, out_box)
    bufs = {k: v.copy() for k, v in param_shard(buffers, out_box).items()}
    y, saved = op.forward(sub, ps, bufs, ctx)
    if dy is None:
        return ctx, y, None, None, bufs
    dxs, dps = op.backward(dy[sl(out_box)], saved, ps, ctx)
    return ctx, y, dxs, dps, bufs


def random_box(shape, splittable, rng):
    box = []
    for d, s in zip(dims_of(shape), shape):
        if d in splittable:
            lo = int(rng.integers(0, s))
            hi = int(rng.integers(lo + 1, s + 1))
        else:
            lo, hi = 0, s
        box.append((lo, hi))
    return tuple(box)


def close(a, b, tol=1e-12):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(float(np.abs(b).max()) if b.size else 0.0, 1e-300)
    err = float(np.abs(a - b).max()) / scale if a.size else 0.0
    assert err <= tol, f"relative error {err:.3g}"


@pytest.mark.parametrize("name,kind,attrs,shapes,has_params,impl", CASES, ids=IDS)
def test_random_output_box_reads_only_its_input_box(name, kind, attrs, shapes, has_params, impl,
                                                    numpy_kernels):
    numpy_kernels(impl)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    op, xs, params, buffers, labels = make_case(kind, attrs, shapes, has_params, rng)
    # batch norm: a single box is not a partition, so no statistics to sum:
    # test it in inference here and in training over partitions below
    training = kind != "batchnorm"
    out_shape = op.infer_shape(shapes)
    _, y_whole, _, _, _ = run_tile(op, xs, params, buffers, full_box(out_shape), training, labels)
    splittable = split_dims(op, out_shape)
    for _ in range(12):
        box = random_box(out_shape, splittable, rng)
        ctx, y, _, _, _ = run_tile(op, xs, params, buffers, box, training, labels)
        assert y.shape == tuple(hi - lo for lo, hi in box)
        close(y, y_whole[sl(box)])
        # the input box really is the receptive field: poisoning everything
        # outside the clipped input box leaves the tile unchanged
        poisoned = []
        for x, b in zip(xs, ctx.in_boxes):
            p = np.full_like(x, np.nan)
            cb = sl(clip_box(b, x.shape))
            p[cb] = x[cb]
            poisoned.append(p)
        _, y2, _, _, _ = run_tile(op, poisoned, params, buffers, box, training, labels)
        close(y2, y)


def partition(shape, degrees):
    """All boxes of a grid split of ``shape`` (array_split rule)."""
    per_dim = [split_bounds(s, d) for s, d in zip(shape, degrees)]
    boxes = [()]
    for bounds in per_dim:
        boxes = [b + (r,) for b in boxes for r in bounds]
    return boxes


def run_partition(op, xs, params, buffers, degrees, training, labels, dy):
    """Run every tile of the partition in its own thread (batch-norm sums
    through a real group allreduce); returns the per-tile results."""
    out_shape = op.infer_shape([x.shape for x in xs])
    boxes = partition(out_shape, degrees)
    keys = [b[1] if len(b) > 1 else None for b in boxes]
    group = GroupSum({k: keys.count(k) for k in set(keys)})
    results, errors = [None] * len(boxes), []

    def work(t):
        try:
            results[t] = run_tile(op, xs, params, buffers, boxes[t], training, labels, dy,
                                  group.for_tile(keys[t], t))
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)
            for b in group.barriers.values():
                b.abort()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(boxes))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return boxes, results


@pytest.mark.parametrize("name,kind,attrs,shapes,has_params,impl", CASES, ids=IDS)
def test_tile_backward_over_a_partition_sums_to_the_whole(name, kind, attrs, shapes, has_params,
                                                          impl, numpy_kernels):
    numpy_kernels(impl)
    rng = np.random.default_rng(zlib.crc32((name + "bw").encode()))
    op, xs, params, buffers, labels = make_case(kind, attrs, shapes, has_params, rng)
    out_shape = op.infer_shape(shapes)
    dy = rng.standard_normal(out_shape)
    splittable = split_dims(op, out_shape)
    trainings = [True, False] if kind in ("batchnorm", "dropout") else [True]
    for training in trainings:
        ctx_w, y_w, dxs_w, dp_w, buf_w = run_tile(op, xs, params, buffers, full_box(out_shape),
                                                  training, labels, dy)
        dx_w = [np.zeros(x.shape) for x in xs]
        for i, g in enumerate(dxs_w):   # inputs a strided window never reads get zero
            dx_w[i][sl(clip_box(ctx_w.in_boxes[i], xs[i].shape))] = g
        for trial in range(4):
            degrees = [int(rng.integers(1, min(3, s) + 1)) if d in splittable else 1
                       for d, s in zip(dims_of(out_shape), out_shape)]
            if trial == 0:   # always include the finest split allowed
                degrees = [min(3, s) if d in splittable else 1 for d, s in zip(dims_of(out_shape), out_shape)]
            boxes, results = run_partition(op, xs, params, buffers, degrees, training, labels, dy)
            y = np.full(out_shape, np.nan)
            dx = [np.zeros(x.shape) for x in xs]
            dp = {k: np.zeros(v.shape) for k, v in params.items()}
            for box, (ctx, yt, dxs, dps, bufs) in zip(boxes, results):
                y[sl(box)] = yt
                for i, g in enumerate(dxs):
                    if g is not None:
                        dx[i][sl(clip_box(ctx.in_boxes[i], xs[i].shape))] += g
                for k, g in dps.items():
                    c0, c1 = box[1]
                    dp[k][c0:c1] += g
                for k, b in bufs.items():   # every replica updates its statistics alike
                    c0, c1 = box[1]
                    close(b, buf_w[k][c0:c1])
            close(y, y_w)
            for a, b in zip(dx, dx_w):
                close(a, b)
            assert set(dp) == set(dp_w)
            for k in dp:
                close(dp[k], dp_w[k])
