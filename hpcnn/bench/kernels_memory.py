"""The memory part of ``hpcnn bench kernels``: the memory-bound ops of a
ResNet-18 step (batch norm in training, ReLU, 3x3/2 max pooling), forward
and backward on channels-last float32 tensors at the step's sizes, with
each NumPy kernel set ("compiled" where Numba imports, and "fast") beside
PyTorch in the same process with the same threads, alternating, medians of
the repeats.  Freed memory stays in the heap (``retain_freed_memory``, as
in a training step), so that no set pays page faults the step does not."""
from __future__ import annotations

import statistics

import numpy as np

#: (op, channels, side at a 64x64 input): the tensors of ResNet-18's stages
MEMORY_OPS = [("batchnorm", 64, 32), ("batchnorm", 64, 16), ("batchnorm", 128, 8),
              ("batchnorm", 256, 4), ("batchnorm", 512, 2),
              ("relu", 64, 32), ("relu", 64, 16), ("relu", 128, 8),
              ("maxpool 3x3/2", 64, 32)]


def _sets():
    from hpcnn.ops.kernel_set import _numba_ok
    return (["compiled"] if _numba_ok() else []) + ["fast"]


def _median_all(fns, repeats, warmup, clock):
    """Run the functions in turn ``warmup`` times, then ``repeats`` times
    timed; the median seconds of each."""
    for _ in range(warmup):
        for f in fns:
            f()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for f, t in zip(fns, times):
            t0 = clock()
            f()
            t.append(clock() - t0)
    return [statistics.median(t) for t in times]


def _hpcnn_case(kind, x, dy, rng):
    from hpcnn.ops import TileContext, full_box, make_op
    c = x.shape[1]
    if kind == "batchnorm":
        op = make_op("batchnorm", "bn")
        params = {"weight": rng.uniform(0.5, 1.5, c).astype(np.float32),
                  "bias": rng.standard_normal(c).astype(np.float32)}
        buffers = {"running_mean": np.zeros(c, np.float32), "running_var": np.ones(c, np.float32)}
    elif kind == "relu":
        op, params, buffers = make_op("relu", "relu"), {}, {}
    else:
        op, params, buffers = make_op("maxpool2d", "pool", kernel_size=3, stride=2, padding=1), {}, {}
    shape = op.infer_shape([x.shape])
    ob = full_box(shape)
    ctx = TileContext(out_box=ob, in_boxes=[op.input_box(0, ob, [x.shape])], in_shapes=[x.shape],
                      out_shape=shape, training=True)
    g = dy if tuple(shape) == tuple(x.shape) else _channels_last(rng.standard_normal(shape))

    def run():
        y, saved = op.forward([x], params, buffers, ctx)
        op.backward(g, saved, params, ctx)
    return run, shape, g


def _channels_last(a):
    """float32 logical NCHW array with NHWC memory (what the kernels hand on)."""
    return np.ascontiguousarray(a.astype(np.float32).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def _torch_case(torch, kind, x, g):
    F = torch.nn.functional
    tx = torch.from_numpy(np.asarray(x)).contiguous(memory_format=torch.channels_last)
    tx.requires_grad_(True)
    tg = torch.from_numpy(np.asarray(g)).contiguous(memory_format=torch.channels_last)
    c = x.shape[1]
    w = torch.ones(c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    rm, rv = torch.zeros(c), torch.ones(c)

    def run():
        tx.grad = w.grad = b.grad = None
        if kind == "batchnorm":
            y = F.batch_norm(tx, rm, rv, w, b, training=True)
        elif kind == "relu":
            y = F.relu(tx)
        else:
            y = F.max_pool2d(tx, 3, 2, 1)
        y.backward(tg)
    return run


def bench_memory_ops(torch, args, clock) -> dict:
    from hpcnn.ops import kernel_set
    from hpcnn.ops.kernel_set import kernel_state, restore_kernel_state
    from hpcnn.ops.host_memory import retain_freed_memory
    retain_freed_memory()      # as a training step runs: freed blocks stay in the heap
    rng = np.random.default_rng(0)
    sets = _sets()
    scale = args.image_size / 64
    print(f"\nMemory-bound ops of a ResNet-18 step, forward+backward, batch {args.batch}, "
          f"channels-last float32, kernel sets {' and '.join(sets)} against PyTorch (channels_last)")
    head = " ".join(f"{s + ' ms':>12s}" for s in sets)
    print(f"{'op':16s} {'input':20s} {head} {'torch ms':>9s} " + " ".join(f"{'ratio ' + s:>15s}" for s in sets))
    before = kernel_state()
    rows = []
    try:
        for kind, c, side in MEMORY_OPS:
            hw = max(1, int(round(side * scale)))
            x = _channels_last(rng.standard_normal((args.batch, c, hw, hw)))
            dy = _channels_last(rng.standard_normal(x.shape))
            fns = []
            for s in sets:
                kernel_set(s)
                run, _, g = _hpcnn_case(kind, x, dy, rng)

                def in_set(run=run, s=s):
                    kernel_set(s)
                    run()
                fns.append(in_set)
            fns.append(_torch_case(torch, kind, x, g))
            times = _median_all(fns, args.repeats, args.warmup, clock)
            row = {"op": kind, "input": list(x.shape), "torch_ms": times[-1] * 1e3}
            for s, t in zip(sets, times):
                row[f"{s}_ms"] = t * 1e3
                row[f"ratio_{s}"] = times[-1] / t
            rows.append(row)
            cells = " ".join(f"{row[f'{s}_ms']:12.2f}" for s in sets)
            ratios = " ".join(f"{row[f'ratio_{s}']:15.2f}" for s in sets)
            print(f"{kind:16s} {str(tuple(x.shape)):20s} {cells} {row['torch_ms']:9.2f} {ratios}", flush=True)
    finally:
        restore_kernel_state(before)
    totals = {s: sum(r[f"{s}_ms"] for r in rows) for s in sets}
    torch_total = sum(r["torch_ms"] for r in rows)
    print("all: " + ", ".join(f"{s} {totals[s]:.1f} ms ({torch_total / totals[s]:.2f}x PyTorch's speed)"
                              for s in sets) + f", PyTorch {torch_total:.1f} ms")
    return {"batch": args.batch, "sets": sets, "rows": rows, "total_ms": totals,
            "torch_total_ms": torch_total}
