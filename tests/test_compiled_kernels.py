"""The kernel set "compiled" (Numba loops for batch norm, ReLU's backward
and max pooling) against the NumPy code it replaces, which stays
as the reference: same values on the same data, in every memory layout and
dtype, with and without host threads, and a clear choice when Numba is
missing.  (tests/test_ops_vs_torch.py holds both sets to PyTorch.)"""
from __future__ import annotations

import sys

import numba  # noqa: F401  (a dependency of hpcnn, setup.cfg: missing, these tests fail)
import numpy as np
import pytest

from hpcnn.ops import kernel_set, make_op
from hpcnn.ops.activation import dense_flat
from hpcnn.ops.kernel_set import kernel_state, restore_kernel_state

from test_ops_vs_torch import in_layout, run_whole  # noqa: E402

TOL = {np.float64: 1e-12, np.float32: 2e-6}


@pytest.fixture
def restore_kernels():
    before = kernel_state()
    yield
    restore_kernel_state(before)


def both_sets(fn):
    """fn() under "compiled" and under "fast" (NumPy)."""
    kernel_set("compiled")
    a = fn()
    kernel_set("fast")
    b = fn()
    return a, b


def close(a, b, tol):
    """Equal to ``tol`` relative to the larger of b's magnitude and 1 (the
    data are of order 1; a gradient that is zero up to rounding compares
    absolutely)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    scale = max(float(np.abs(b).max()), 1.0)
    assert float(np.abs(a - b).max()) <= tol * scale


def bn_run(shape, training, layout, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = in_layout((rng.standard_normal(shape) * 3 + 2).astype(dtype), layout)
    dy = in_layout(rng.standard_normal(shape).astype(dtype), layout)
    params = {"weight": rng.standard_normal(c).astype(dtype), "bias": rng.standard_normal(c).astype(dtype)}
    rm, rv = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)

    def run():
        buffers = {"running_mean": rm.copy(), "running_var": rv.copy()}
        op = make_op("batchnorm", "bn", eps=1e-3, momentum=0.3)
        y, dxs, dps = run_whole(op, [x], params, buffers, dy=dy, training=training)
        return y, dxs, dps, buffers
    return run


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("layout", ["contig", "nhwc", "sliced"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(4, 5, 6, 7), (9, 3), (2, 3, 4, 3, 5), (1, 2, 1, 1)])
def test_batchnorm_compiled_equals_numpy(shape, training, layout, dtype, restore_kernels):
    got, want = both_sets(bn_run(shape, training, layout, dtype))
    tol = TOL[dtype]
    close(got[0], want[0], tol)                        # output
    for a, b in zip(got[1], want[1]):                  # input gradient
        close(a, b, tol * 10)
    for name in ("weight", "bias"):                    # parameter gradients
        close(got[2][name], want[2][name], tol * 10)
    for name in ("running_mean", "running_var"):
        close(got[3][name], want[3][name], tol)
    if not training:
        assert np.array_equal(got[3]["running_mean"], want[3]["running_mean"])


def test_batchnorm_compiled_keeps_large_offsets_accurate(restore_kernels):
    """float32 input with a mean 1e4 times its spread: the shifted float64
    sums keep the variance (a naive E[x^2] - E[x]^2 in float32 would lose
    it entirely)."""
    rng = np.random.default_rng(3)
    x = (1e4 + rng.standard_normal((64, 4, 8, 8))).astype(np.float32)
    kernel_set("compiled")
    op = make_op("batchnorm", "bn", eps=1e-5)
    y, _, _ = run_whole(op, [x], {"weight": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)},
                        {"running_mean": np.full(4, 1e4, np.float32), "running_var": np.ones(4, np.float32)})
    assert np.allclose(y.std(axis=(0, 2, 3)), 1, atol=2e-3)
    assert np.allclose(y.mean(axis=(0, 2, 3)), 0, atol=2e-3)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("layouts", [("contig", "contig"), ("nhwc", "nhwc"), ("sliced", "sliced"),
                                     ("nhwc", "contig"), ("nhwc", "sliced"), ("contig", "nhwc")],
                         ids=lambda v: "-".join(v))
def test_relu_backward_compiled_equals_numpy(layouts, dtype, restore_kernels):
    rng = np.random.default_rng(1)
    x = in_layout(rng.standard_normal((3, 4, 5, 6)).astype(dtype), layouts[0])
    x[0, 0, 0, :3] = 0                                  # zeros take no gradient
    dy = in_layout(rng.standard_normal((3, 4, 5, 6)).astype(dtype), layouts[1])

    def run():
        return run_whole(make_op("relu", "r"), [x], dy=dy)
    got, want = both_sets(run)
    assert np.array_equal(got[0], want[0])
    assert np.array_equal(got[1][0], want[1][0])
    assert np.all(got[1][0][x <= 0] == 0)


POOLS = [  # (input shape, kernel, stride, padding, dilation)
    ((2, 5, 9, 11), 3, 2, 1, 1),
    ((3, 2, 7, 9), (3, 2), (1, 2), ((1, 0), (0, 1)), 1),
    ((2, 3, 10, 9), 3, 2, 1, 2),
    ((2, 2, 9, 8), 5, 2, 2, 1),                         # 25 taps: NumPy's general path
    ((1, 4, 8, 8), 2, 2, 0, 1),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("case", POOLS, ids=[str(c) for c in POOLS])
def test_maxpool_backward_compiled_equals_numpy(case, ties, dtype, restore_kernels):
    shape, k, s, p, d = case
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape)
    if ties:                                            # many equal maxima: the first one wins
        x = np.round(x)
    x = in_layout(x.astype(dtype), "nhwc")
    op = make_op("maxpool2d", "p", kernel_size=k, stride=s, padding=p, dilation=d)
    dy = rng.standard_normal(op.infer_shape([shape])).astype(dtype)

    def run():
        return run_whole(make_op("maxpool2d", "p", kernel_size=k, stride=s, padding=p, dilation=d),
                         [x], dy=dy)
    got, want = both_sets(run)
    assert np.array_equal(got[0], want[0])
    close(got[1][0], want[1][0], TOL[dtype])
    assert float(got[1][0].sum()) == pytest.approx(float(dy.astype(np.float64).sum()), rel=1e-5)


def test_compiled_kernels_split_over_host_threads(monkeypatch, restore_kernels):
    """Chunks on three host threads give what one call gives (up to the
    order of partial sums)."""
    from hpcnn.ops import host_threads
    kernel_set("compiled")
    run = bn_run((6, 4, 9, 7), True, "nhwc", np.float64, seed=4)
    one = run()
    monkeypatch.setattr(host_threads, "MIN_ELEMENTS", 1)
    before = host_threads.host_threads()
    host_threads.set_host_threads(3)
    try:
        many = run()
        close(many[0], one[0], 1e-12)
        close(many[1][0], one[1][0], 1e-11)
        close(many[2]["weight"], one[2]["weight"], 1e-11)
    finally:
        host_threads.set_host_threads(before)


def test_dense_flat_pairs_elements_only_for_one_dense_layout():
    a = np.arange(24.0).reshape(2, 3, 4)
    t = np.ascontiguousarray(a.transpose(0, 2, 1)).transpose(0, 2, 1)   # same values, other order
    fa, fb = dense_flat(t, t.copy(order="K"))
    assert fa.base is not None and np.array_equal(np.sort(fa), np.sort(a.reshape(-1)))
    fa[0] = -1.0
    assert t.min() == -1.0                               # a view, not a copy
    assert dense_flat(a, t) is None                      # layouts differ
    assert dense_flat(a[:, :, ::2], a[:, :, ::2].copy()) is None
    assert dense_flat(a[:, :, ::2], a[:, :, ::2]) is None  # gaps


def test_compiled_without_numba_is_a_clear_error_and_not_the_default(monkeypatch):
    ks = sys.modules["hpcnn.ops.kernel_set"]            # the module (its name is also the function's)
    monkeypatch.setattr(ks, "_current", ks._current)     # restored after the test
    monkeypatch.setitem(sys.modules, "numba", None)      # import numba now fails
    monkeypatch.delitem(sys.modules, "hpcnn.ops.compiled_kernels", raising=False)
    monkeypatch.delenv("HPCNN_KERNELS", raising=False)
    with pytest.raises(ValueError, match="needs Numba"):
        kernel_set("compiled")
    monkeypatch.setattr(ks, "_current", None)
    assert kernel_set() == "fast"
    monkeypatch.setattr(ks, "_current", None)
    monkeypatch.setenv("HPCNN_KERNELS", "compiled")
    with pytest.raises(ValueError, match="HPCNN_KERNELS='compiled' needs Numba"):
        kernel_set()
    # installed but not importable (found, then failing): the default falls back, once, saying why
    monkeypatch.setattr(ks, "_current", "compiled")
    monkeypatch.setattr(ks, "_min_elements", ks.COMPILED_MIN_ELEMENTS)
    with pytest.warns(RuntimeWarning, match="Numba does not import"):
        assert ks.compiled_for(np.zeros(ks.COMPILED_MIN_ELEMENTS)) is None
    assert kernel_set() == "fast"
    monkeypatch.setattr(ks, "_current", None)
    monkeypatch.setenv("HPCNN_KERNELS", "fastest")
    with pytest.raises(ValueError, match="choose one of compiled, fast, reference"):
        kernel_set()


def test_bench_kernels_memory_part_times_every_set_beside_torch(tmp_path, capsys, restore_kernels):
    import argparse
    import json

    from hpcnn.bench import kernels as bench
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    out = tmp_path / "memory.json"
    args = p.parse_args(["--part", "memory", "--batch", "2", "--image-size", "16", "--threads", "1",
                         "--repeats", "2", "--warmup", "0", "--json", str(out)])
    kernel_set()                                       # the choice resolved before the run
    before = kernel_state()
    assert bench.run(args) == 0
    assert kernel_state() == before                    # the part restores the set in use
    res = json.loads(out.read_text())["memory"]
    assert res["sets"] == ["compiled", "fast"]
    assert [r["op"] for r in res["rows"]][:1] == ["batchnorm"] and len(res["rows"]) == 9
    assert res["rows"][0]["input"] == [2, 64, 8, 8]     # 32 at 64x64, scaled to 16x16
    for r in res["rows"]:
        assert r["compiled_ms"] > 0 and r["fast_ms"] > 0 and r["torch_ms"] > 0
        assert r["ratio_fast"] == pytest.approx(r["torch_ms"] / r["fast_ms"])
    assert "PyTorch's speed" in capsys.readouterr().out


def test_the_default_set_compiles_only_tiles_worth_it(monkeypatch):
    """By default, tiles under COMPILED_MIN_ELEMENTS run the NumPy code (a
    job of small tiles never loads Numba); asked for by name, "compiled"
    takes every tile; a tile's backward follows what its forward chose."""
    ks = sys.modules["hpcnn.ops.kernel_set"]
    monkeypatch.setattr(ks, "_current", None)
    monkeypatch.setattr(ks, "_min_elements", 0)
    monkeypatch.delenv("HPCNN_KERNELS", raising=False)
    assert kernel_set() == "compiled"
    small, big = np.zeros(ks.COMPILED_MIN_ELEMENTS - 1), np.zeros(ks.COMPILED_MIN_ELEMENTS)
    assert ks.compiled_for(small) is None and ks.compiled_for(big) is not None
    c = 8
    params = {"weight": np.ones(c), "bias": np.zeros(c)}
    for n, compiled in ((2, False), (ks.COMPILED_MIN_ELEMENTS // (c * 16), True)):
        x = in_layout(np.random.default_rng(0).standard_normal((n, c, 4, 4)), "nhwc")
        op = make_op("batchnorm", "bn")
        from hpcnn.ops import TileContext, full_box
        ctx = TileContext(out_box=full_box(x.shape), in_boxes=[full_box(x.shape)], in_shapes=[x.shape],
                          out_shape=x.shape, training=True)
        _, saved = op.forward([x], params, {}, ctx)
        assert (saved[0] == "compiled") is compiled
        dx, _ = op.backward(x.copy(), saved, params, ctx)
        assert dx[0].shape == x.shape
    # a pool whose input is large enough and whose output is not
    n = ks.COMPILED_MIN_ELEMENTS // (c * 64)
    x = in_layout(np.random.default_rng(1).standard_normal((n, c, 8, 8)), "nhwc")
    y, dxs, _ = run_whole(make_op("maxpool2d", "p", kernel_size=2, stride=2), [x],
                          dy=np.ones((n, c, 4, 4)))
    assert y.size < ks.COMPILED_MIN_ELEMENTS <= x.size
    assert float(dxs[0].sum()) == y.size
    kernel_set("compiled")
    assert ks.compiled_for(small) is not None
