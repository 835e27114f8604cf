"""A convolution whose input region comes as pieces (TileRegion: the own
tile and the parts other ranks send, none copied into one array) computes
what the convolution of the assembled region computes: output, input
gradient of every part, weight and bias gradients, float64, for strides,
dilations, padding, output tiles that read only some rows, parts thinner
than the kernel's reach (a halo wider than a neighbour's tile), channel
blocks, parts no output reads, and both kernel sets.  The parts from other
ranks are read only after the region's wait, and their gradients are handed
back before the own part's."""
import itertools

import numpy as np
import pytest

from hpcnn.ops import TileContext, TileRegion, make_op
from hpcnn.ops.conv import part_window


def _cuts(n, rng, most):
    inner = sorted(set(int(v) for v in rng.integers(1, n, size=int(rng.integers(0, most + 1)))) if n > 1 else [])
    b = [0] + inner + [n]
    return list(zip(b, b[1:]))


def _case(rng, kernels, k, s, p, d, shape, cout, out_rows=None, local=1, most=3, samples=False,
          spatial=True):
    op = make_op("conv2d", "c", out_channels=cout, kernel_size=k, stride=s, padding=p, dilation=d)
    out_shape = op.infer_shape([shape])
    rows = out_rows or (0, out_shape[2])
    ob = ((0, shape[0]), (0, cout), rows, (0, out_shape[3]))
    ctx = TileContext(out_box=ob, in_boxes=[op.input_box(0, ob, [shape])], in_shapes=[shape],
                      out_shape=out_shape)
    x = rng.standard_normal(shape)
    xr = x[tuple(slice(a, b) for a, b in ctx.clipped(0))]
    params = {"weight": rng.standard_normal((cout, shape[1], k, k)), "bias": rng.standard_normal(cout)}
    y0, s0 = op.forward([xr.copy()], params, {}, ctx)
    dy = rng.standard_normal(y0.shape)
    (dx0,), g0 = op.backward(dy, s0, params, ctx)
    R = xr.shape
    boxes = [(nb, cb, hb, wb) for nb, cb, hb, wb in itertools.product(
        _cuts(R[0], rng, 2) if samples else [(0, R[0])], _cuts(R[1], rng, 1) if spatial else [(0, R[1])],
        _cuts(R[2], rng, most) if spatial else [(0, R[2])], _cuts(R[3], rng, most) if spatial else [(0, R[3])])]
    if len(boxes) < 2:
        return 0
    local = min(local, len(boxes) - 1)
    parts = []
    for j, b in enumerate(boxes):
        sl = tuple(slice(lo, hi) for lo, hi in b)
        # the parts as they arrive: channels-last, not views of one array
        a = np.ascontiguousarray(xr[sl].transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        parts.append((b, a, j == local))
    events = []
    region = TileRegion(R, xr.dtype, parts, wait=lambda: events.append("wait"))
    y1, s1 = op.forward([region], params, {}, ctx)
    early = {}

    def ready(grads):
        events.append("early")
        early.update(grads)
    ctx.halo_grads_ready = [ready]
    (pg,), g1 = op.backward(dy, s1, params, ctx)
    dx1 = np.zeros(R)
    for j, part in enumerate(region.parts):
        gj = pg[j] if pg[j] is not None else early.get(j)
        if gj is not None:
            assert gj.shape == part.shape
            dx1[tuple(slice(lo, hi) for lo, hi in part.box)] = gj
    for got, want, what in ((y1, y0, "output"), (dx1, dx0, "input gradient"),
                            (g1["weight"], g0["weight"], "weight gradient"),
                            (g1["bias"], g0["bias"], "bias gradient")):
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)
        assert err < 1e-12, f"{what} differs by {err:.1e} ({kernels}, k={k} s={s} p={p} d={d} {shape}, " \
                            f"{len(boxes)} parts)"
    remote = [j for j, p_ in enumerate(region.parts) if not p_.local]
    by_parts = op.convolves_pieces(len({b[1] for b in boxes}) > 1)
    if remote and by_parts:
        assert events.count("wait") == 1 and events[-1] == "early"
        assert set(early) == set(remote), "the other ranks' parts go back early, the own part does not"
        assert all(pg[j] is None for j in remote)
    elif remote:
        # channel blocks under a window larger than 1x1: assembled, convolved once
        assert events == ["wait"] and not early
    return len(boxes)


def test_conv_over_pieces_equals_whole_convolution(kernels):
    rng = np.random.default_rng(11)
    geometries = [(3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (1, 2, 0, 1), (5, 1, 4, 2),
                  (7, 2, 3, 1), (3, 3, 0, 1), (2, 2, 1, 1), (3, 1, 2, 2)]
    n_parts = 0
    for k, s, p, d in geometries:
        for _ in range(4):
            shape = (int(rng.integers(1, 3)), int(rng.integers(1, 5)), int(rng.integers(9, 15)),
                     int(rng.integers(9, 14)))
            oh = (shape[2] + 2 * p - d * (k - 1) - 1) // s + 1
            a = int(rng.integers(0, oh))
            rows = (a, int(rng.integers(a + 1, oh + 1)))
            n_parts += _case(rng, kernels, k, s, p, d, shape, int(rng.integers(1, 4)), rows,
                             local=int(rng.integers(0, 3)))
    assert n_parts > 100


def test_parts_that_split_the_samples(kernels):
    """A redistribution from a sample split: parts of whole images,
    disjoint outputs (placed, each with the bias); and samples with rows."""
    rng = np.random.default_rng(8)
    n = 0
    for k, s, p, d in [(3, 1, 1, 1), (1, 1, 0, 1), (3, 2, 1, 1)]:
        for spatial in (False, True):
            n += _case(rng, kernels, k, s, p, d, (5, 3, 9, 8), 4, samples=True, spatial=spatial)
    assert n > 10


def test_halo_wider_than_a_part(kernels):
    """A dilated 7x7 window over one-row parts: each output row reads
    several parts, as when the halo spans more than a neighbour's tile."""
    rng = np.random.default_rng(3)
    op_shape = (2, 3, 11, 6)
    _case(rng, kernels, 7, 1, 6, 2, op_shape, 2, most=10)


def test_part_window_covers_every_output_that_reads_the_part():
    for k, s, d, plo, size, out_len in [(3, 1, 1, 1, 10, 10), (7, 2, 2, 6, 13, 7), (1, 2, 1, 0, 9, 5),
                                        (3, 3, 1, 0, 16, 5)]:
        for lo in range(size):
            for hi in range(lo + 1, size + 1):
                win = part_window(lo, hi, out_len, k, s, plo, d)
                readers = [o for o in range(out_len)
                           if any(lo <= o * s + t * d - plo < hi for t in range(k))]
                if win is None:
                    assert not readers
                    continue
                o0, o1, c0, c1, p0, p1 = win
                # every output that reads the part is in the window, and every
                # output in it spans the part (a dilated window may skip it)
                assert set(readers) <= set(range(o0, o1)), (k, s, d, lo, hi)
                assert all(o * s - plo < hi and lo <= o * s - plo + d * (k - 1) for o in range(o0, o1))
                # the kernel's padded input yields exactly o1 - o0 outputs
                assert ((c1 - c0) + p0 + p1 - d * (k - 1) - 1) // s + 1 == o1 - o0


def test_parts_from_other_ranks_are_read_only_after_the_wait():
    a = np.zeros((1, 1, 2, 2))
    region = TileRegion((1, 1, 4, 2), a.dtype,
                        [(((0, 1), (0, 1), (0, 2), (0, 2)), a, True),
                         (((0, 1), (0, 1), (2, 4), (0, 2)), a, False)], wait=lambda: None)
    assert region.parts[0].array is a
    with pytest.raises(RuntimeError, match="before region.wait"):
        region.parts[1].array
    region.wait()
    assert region.parts[1].array is a
    assert region.assemble().shape == (1, 1, 4, 2)


def test_an_op_that_takes_no_pieces_says_so():
    relu = make_op("relu", "r")
    a = np.zeros((1, 1, 2, 2))
    region = TileRegion((1, 1, 2, 2), a.dtype, [(((0, 1), (0, 1), (0, 2), (0, 2)), a, True)])
    ctx = TileContext.whole(relu, [(1, 1, 2, 2)])
    with pytest.raises(Exception, match="does not take"):
        relu.forward([region], {}, {}, ctx)
