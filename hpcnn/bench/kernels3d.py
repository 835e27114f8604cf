"""The conv3d part of ``hpcnn bench kernels``: forward+backward (input and
weight gradients) of CosmoFlow's five convolutions (kernel 2, 'same'
padding, 4>32, 32>64, 64>128, 128>256, 256>512 channels on volumes that
halve from the input side), hpcnn's kernels against torch.nn.functional
.conv3d in the same process with the same threads, alternating, medians of
the repeats (``_median_pair`` of bench/kernels.py)."""
from __future__ import annotations

import statistics

import numpy as np

#: (name, Cin, Cout, side at a 128^3 input)
COSMOFLOW_CONVS = [("conv1 4>32", 4, 32, 128), ("conv2 32>64", 32, 64, 64),
                   ("conv3 64>128", 64, 128, 32), ("conv4 128>256", 128, 256, 16),
                   ("conv5 256>512", 256, 512, 8)]

SAME_K2 = ((0, 1), (0, 1), (0, 1))


def bench_conv3d(torch, args, median_pair, to_hpcnn, to_torch, sync) -> dict:
    from hpcnn.ops import TileContext, clip_box, full_box, make_op
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    rows = []
    scale = args.volume_size / 128
    print(f"\nCosmoFlow conv3d layers (kernel 2, 'same'), forward+backward (dx, dW), batch "
          f"{args.volume_batch}, {args.volume_size}^3 input")
    print(f"{'layer':16s} {'input':24s} {'GFLOP':>7s} {'hpcnn ms':>9s} {'torch ms':>9s} "
          f"{'hpcnn/s':>8s} {'torch/s':>8s} {'ratio':>6s}")
    for name, cin, cout, side in COSMOFLOW_CONVS:
        s = max(1, int(round(side * scale)))
        x = rng.standard_normal((args.volume_batch, cin, s, s, s)).astype(np.float32)
        w = (rng.standard_normal((cout, cin, 2, 2, 2)) / np.sqrt(cin * 8)).astype(np.float32)
        b = np.zeros(cout, np.float32)
        op = make_op("conv3d", name, out_channels=cout, kernel_size=2, padding=SAME_K2)
        shape = op.infer_shape([x.shape])
        dy = rng.standard_normal(shape).astype(np.float32)
        ob = full_box(shape)
        ctx = TileContext(out_box=ob, in_boxes=[op.input_box(0, ob, [x.shape])], in_shapes=[x.shape],
                          out_shape=shape)
        xin = to_hpcnn(x[tuple(slice(a, c) for a, c in clip_box(ctx.in_boxes[0], x.shape))])
        params = {"weight": to_hpcnn(w), "bias": to_hpcnn(b)}
        hdy = to_hpcnn(dy)

        def run_hpcnn():
            y, saved = op.forward([xin], params, {}, ctx)
            op.backward(hdy, saved, params, ctx)
            sync()

        tx = to_torch(torch, x).requires_grad_(True)
        tw = to_torch(torch, w.copy()).requires_grad_(True)
        tb = to_torch(torch, b.copy()).requires_grad_(True)
        tdy = to_torch(torch, dy)

        def run_torch():
            tx.grad = tw.grad = tb.grad = None
            F.conv3d(F.pad(tx, (0, 1, 0, 1, 0, 1)), tw, tb).backward(tdy)
            sync(torch)

        th, tt, _, _ = median_pair(run_hpcnn, run_torch, args.repeats, args.warmup)
        gflop = 3 * op.flops([x.shape], shape) / 1e9
        rows.append(dict(layer=name, input=list(x.shape), output=list(shape), gflop=gflop,
                         hpcnn_ms=th * 1e3, torch_ms=tt * 1e3, ratio=tt / th))
        print(f"{name:16s} {str(tuple(x.shape)):24s} {gflop:7.2f} {th*1e3:9.1f} {tt*1e3:9.1f} "
              f"{gflop/th:8.1f} {gflop/tt:8.1f} {tt/th:6.2f}", flush=True)
    res = {"batch": args.volume_batch, "volume_size": args.volume_size, "rows": rows,
           "ratio_min": min(r["ratio"] for r in rows),
           "ratio_median": statistics.median(r["ratio"] for r in rows),
           "ratio_total": sum(r["torch_ms"] for r in rows) / sum(r["hpcnn_ms"] for r in rows)}
    print(f"{'all conv3d':16s} ratio of total times {res['ratio_total']:.2f}, median "
          f"{res['ratio_median']:.2f}, lowest {res['ratio_min']:.2f}")
    return res
