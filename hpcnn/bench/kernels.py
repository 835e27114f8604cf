"""``hpcnn bench kernels``: hpcnn's CPU kernels side by side with PyTorch CPU
in the same process, with the same number of threads.

Four parts:
  conv  forward+backward (input and weight gradients) of the convolution
        layers of ResNet-50 (the 7x7/2 stem, and per stage the bottleneck's
        1x1 reduce, 3x3, 1x1 expand, the strided 3x3 and the strided 1x1
        projection), at batch 32, at the real ImageNet sizes (56/28/14/7,
        --conv-size real) or scaled to 64x64 images (16/8/4/2, the default).
        The stem reads the network input, so as in training neither side
        computes its input gradient.
  conv3d forward+backward of CosmoFlow's five 3-D convolutions at batch 1
        and a 128^3 input (--volume-size, --volume-batch), against
        torch.nn.functional.conv3d (bench/kernels3d.py).
  depthwise  forward+backward of the depthwise 3x3 convolutions of
        MobileNet-V2 (per stage, stride 1 and 2; inputs at the real sizes
        112/56/28/14/7 or scaled to 64x64 images), a depthwise layer with
        channel multiplier 2 and a ResNeXt grouped 3x3 (32 groups), batch 32:
        hpcnn's direct depthwise kernel and its per-group loop against
        PyTorch's grouped convolution.
  step  a whole ResNet-18 training step (forward, backward, SGD with
        momentum and weight decay) through hpcnn's SequentialModel, against
        the same network written with torch.nn and torch.optim.SGD; batch 32,
        64x64 images, 1000 classes, float32.  Both start from the same
        weights, and the first step's losses are printed side by side.

Every measurement alternates hpcnn and PyTorch and reports the median of
the repeats, so that load from other processes hits both alike.  The ratio
is hpcnn's throughput over PyTorch's (above 1: hpcnn is faster).
"""
from __future__ import annotations

import argparse
from collections import OrderedDict
import json
import os
import platform
import statistics
import time

import numpy as np

# ResNet-50 convolution layers: (name, Cin, Cout, kernel, stride, padding,
# input size at 224x224 images); the stem needs no input gradient
RESNET50_CONVS = [
    ("conv1 7x7/2 (no dX)", 3, 64, 7, 2, 3, 224),
    ("s2 1x1 256>64", 256, 64, 1, 1, 0, 56),
    ("s2 3x3 64", 64, 64, 3, 1, 1, 56),
    ("s2 1x1 64>256", 64, 256, 1, 1, 0, 56),
    ("s3 3x3/2 128", 128, 128, 3, 2, 1, 56),
    ("s3 1x1/2 256>512", 256, 512, 1, 2, 0, 56),
    ("s3 1x1 512>128", 512, 128, 1, 1, 0, 28),
    ("s3 3x3 128", 128, 128, 3, 1, 1, 28),
    ("s3 1x1 128>512", 128, 512, 1, 1, 0, 28),
    ("s4 3x3/2 256", 256, 256, 3, 2, 1, 28),
    ("s4 1x1/2 512>1024", 512, 1024, 1, 2, 0, 28),
    ("s4 1x1 1024>256", 1024, 256, 1, 1, 0, 14),
    ("s4 3x3 256", 256, 256, 3, 1, 1, 14),
    ("s4 1x1 256>1024", 256, 1024, 1, 1, 0, 14),
    ("s5 3x3/2 512", 512, 512, 3, 2, 1, 14),
    ("s5 1x1/2 1024>2048", 1024, 2048, 1, 2, 0, 14),
    ("s5 1x1 2048>512", 2048, 512, 1, 1, 0, 7),
    ("s5 3x3 512", 512, 512, 3, 1, 1, 7),
    ("s5 1x1 512>2048", 512, 2048, 1, 1, 0, 7),
]


# MobileNet-V2's depthwise 3x3 layers (name, C, C*multiplier, kernel, stride,
# padding, input size at 224x224 images, groups), a multiplier-2 depthwise
# layer and ResNeXt-50 (32x4d)'s grouped 3x3 of its first stage
DEPTHWISE_CONVS = [
    ("dw 3x3 32", 32, 32, 3, 1, 1, 112, 32),
    ("dw 3x3/2 96", 96, 96, 3, 2, 1, 112, 96),
    ("dw 3x3 144", 144, 144, 3, 1, 1, 56, 144),
    ("dw 3x3/2 144", 144, 144, 3, 2, 1, 56, 144),
    ("dw 3x3 192", 192, 192, 3, 1, 1, 28, 192),
    ("dw 3x3/2 192", 192, 192, 3, 2, 1, 28, 192),
    ("dw 3x3 384", 384, 384, 3, 1, 1, 14, 384),
    ("dw 3x3 576", 576, 576, 3, 1, 1, 14, 576),
    ("dw 3x3/2 576", 576, 576, 3, 2, 1, 14, 576),
    ("dw 3x3 960", 960, 960, 3, 1, 1, 7, 960),
    ("dw x2 3x3 64>128", 64, 128, 3, 1, 1, 56, 64),
    ("g32 3x3 128", 128, 128, 3, 1, 1, 56, 32),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--part", choices=["all", "conv", "conv3d", "depthwise", "memory", "step"],
                   default="all",
                   help="what to time (default: all; memory: batch norm, ReLU and max pooling with "
                        "each NumPy kernel set, CPU only)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: hpcnn on NumPy against PyTorch CPU (default); cuda: hpcnn on CuPy "
                        "against PyTorch CUDA on the same GPU")
    p.add_argument("--threads", type=int, default=2,
                   help="threads for both (torch.set_num_threads; hpcnn's BLAS pool and host "
                        "threads for copies and elementwise work; default 2)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--image-size", type=int, default=64,
                   help="ResNet-18 step image size (default 64)")
    p.add_argument("--classes", type=int, default=1000, help="ResNet-18 classes (default 1000)")
    p.add_argument("--conv-size", choices=["scaled", "real"], default="scaled",
                   help="conv layer inputs at 64x64-scaled sizes (16/8/4/2, default) or the "
                        "real ImageNet sizes (56/28/14/7)")
    p.add_argument("--volume-size", type=int, default=128,
                   help="conv3d part: CosmoFlow input side (default 128, the reference's)")
    p.add_argument("--volume-batch", type=int, default=1, help="conv3d part: batch (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up repeats")
    p.add_argument("--kernels", choices=["default", "compiled", "fast", "reference"], default="default",
                   help="hpcnn kernel set: default (compiled for tiles of 1 MB and more where "
                        "Numba is installed, else fast), compiled (Numba loops for batch norm, ReLU's "
                        "backward and max pooling, every tile), fast (NumPy only) or reference (the "
                        "slow, simple fallback)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall-clock time (default), or this process's CPU time, which other "
                        "processes' load disturbs far less; cpu is meaningful with --threads 1 only")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")


# ----------------------------------------------------------------- networks
def resnet18_graph(batch, image_size, classes, width=64):
    """ResNet-18 of the model zoo (torchvision's structure) with stage
    widths width*(1, 2, 4, 8); width 64 is the standard network."""
    from hpcnn.models.resnet import resnet18
    s = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return resnet18(batch, 3, s, classes, width=width)


def torch_resnet18(torch, classes, width=64):
    """The same network with torch.nn (torchvision's ResNet-18 structure)."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(OrderedDict(
                    conv=nn.Conv2d(cin, cout, 1, stride, bias=False), bn=nn.BatchNorm2d(cout)))

        def forward(self, x):
            h = torch.relu(self.bn1(self.conv1(x)))
            h = self.bn2(self.conv2(h))
            return torch.relu(h + (x if self.downsample is None else self.downsample(x)))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            cin, layers = width, []
            for stage, cout in enumerate((width, 2 * width, 4 * width, 8 * width), 1):
                stride = 1 if stage == 1 else 2
                layers.append(nn.Sequential(Block(cin, cout, stride), Block(cout, cout, 1)))
                cin = cout
            self.layer1, self.layer2, self.layer3, self.layer4 = layers
            self.fc = nn.Linear(8 * width, classes)

        def forward(self, x):
            x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(x.mean(dim=(2, 3)), 1))

    return ResNet18()


def _hpcnn_names(torch_key):
    """hpcnn node names a torch state key may have: the same (the peer
    network uses the model zoo's names, e.g. 'layer2.0.downsample.conv'), or
    the zoo's spelling of torchvision's 'downsample.0' / 'downsample.1'."""
    return (torch_key, torch_key.replace(".downsample.0.", ".downsample.conv."),
            torch_key.replace(".downsample.1.", ".downsample.bn."))


def copy_weights_to_torch(torch, model, hmodel) -> int:
    """Copy hpcnn's parameters and buffers into the torch model by name;
    returns how many tensors were copied, 0 when the names do not line up."""
    sd = model.state_dict()
    src = {}
    for node, ps in list(hmodel.params.items()) + list(hmodel.buffers.items()):
        for k, v in ps.items():
            src[f"{node}.{k}"] = v
    pairs = {}
    for k in sd:
        if k.endswith("num_batches_tracked"):
            continue
        name = next((n for n in _hpcnn_names(k) if n in src), None)
        if name is None or tuple(src[name].shape) != tuple(sd[k].shape):
            return 0
        pairs[k] = name
    from hpcnn.backend import to_host
    with torch.no_grad():
        for k, name in pairs.items():
            sd[k].copy_(torch.from_numpy(np.ascontiguousarray(to_host(src[name]))).to(sd[k].device))
    return len(pairs)


# ----------------------------------------------------------------- timing
_CLOCK = time.perf_counter
_DEVICE = "cpu"


def _sync(torch=None):
    """Wait for queued GPU work so that wall-clock times are the work's."""
    if _DEVICE == "cuda":
        import cupy
        cupy.cuda.get_current_stream().synchronize()
        if torch is not None:
            torch.cuda.synchronize()


def _to_hpcnn(a):
    if _DEVICE == "cuda":
        import cupy
        return cupy.asarray(a)
    return a


def _to_torch(torch, a):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.cuda() if _DEVICE == "cuda" else t


def _median_pair(fa, fb, repeats, warmup):
    """Alternate fa and fb; medians of their times (seconds)."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = _CLOCK()
        fa()
        t1 = _CLOCK()
        fb()
        t2 = _CLOCK()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return statistics.median(ta), statistics.median(tb), ta, tb


def bench_convs(torch, args, layers=None):
    from hpcnn.ops import TileContext, clip_box, full_box, make_op
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    rows = []
    scale = 1.0 if args.conv_size == "real" else 64 / 224
    layers = [layer + (1,) for layer in RESNET50_CONVS] if layers is None else layers
    for name, cin, cout, k, s, p, size, groups in layers:
        hw = max(1, int(round(size * scale)))
        n = args.batch
        x = rng.standard_normal((n, cin, hw, hw)).astype(np.float32)
        cg = cin // groups
        w = (rng.standard_normal((cout, cg, k, k)) / np.sqrt(cg * k * k)).astype(np.float32)
        op = make_op("conv2d", name, out_channels=cout, kernel_size=k, stride=s, padding=p, bias=False,
                     groups=groups)
        shape = op.infer_shape([x.shape])
        dy = rng.standard_normal(shape).astype(np.float32)
        ob = full_box(shape)
        need_dx = "no dX" not in name
        ctx = TileContext(out_box=ob, in_boxes=[op.input_box(0, ob, [x.shape])], in_shapes=[x.shape],
                          out_shape=shape, input_grads=(need_dx,))
        xin = _to_hpcnn(x[tuple(slice(a, b) for a, b in clip_box(ctx.in_boxes[0], x.shape))])
        hw_, hdy = _to_hpcnn(w), _to_hpcnn(dy)

        def run_hpcnn():
            y, saved = op.forward([xin], {"weight": hw_}, {}, ctx)
            op.backward(hdy, saved, {"weight": hw_}, ctx)
            _sync()

        tx = _to_torch(torch, x).requires_grad_(need_dx)
        tw = _to_torch(torch, w.copy()).requires_grad_(True)
        tdy = _to_torch(torch, dy)

        def run_torch():
            tx.grad = tw.grad = None
            F.conv2d(tx, tw, None, s, p, 1, groups).backward(tdy)
            _sync(torch)

        th, tt, _, _ = _median_pair(run_hpcnn, run_torch, args.repeats, args.warmup)
        gflop = (3 if need_dx else 2) * op.flops([x.shape], shape) / 1e9   # fwd + dW (+ dX)
        rows.append(dict(layer=name, input=list(x.shape), output=list(shape), gflop=gflop,
                         hpcnn_ms=th * 1e3, torch_ms=tt * 1e3, hpcnn_gflops=gflop / th,
                         torch_gflops=gflop / tt, ratio=tt / th))
        print(f"{name:22s} {str(tuple(x.shape)):20s} {gflop:7.2f} {th*1e3:9.1f} {tt*1e3:9.1f} "
              f"{gflop/th:8.1f} {gflop/tt:8.1f} {tt/th:6.2f}", flush=True)
    return rows


def bench_step(torch, args):
    from hpcnn.backend import Backend
    from hpcnn.runtime.sequential import SequentialModel
    from hpcnn.runtime.sgd import SGD
    g = resnet18_graph(args.batch, args.image_size, args.classes)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 3, args.image_size, args.image_size)).astype(np.float32)
    labels = rng.integers(0, args.classes, args.batch)
    lr, mom, wd = 0.01, 0.9, 1e-4
    hm = SequentialModel(g, dtype=np.float32, seed=0,
                         backend=Backend("cupy" if _DEVICE == "cuda" else "numpy"))
    hopt = SGD(lr=lr, momentum=mom, weight_decay=wd)
    tm = torch_resnet18(torch, args.classes)
    if _DEVICE == "cuda":
        tm = tm.cuda()
    copied = copy_weights_to_torch(torch, tm, hm)
    topt = torch.optim.SGD(tm.parameters(), lr=lr, momentum=mom, weight_decay=wd)
    tx, tl = _to_torch(torch, x), _to_torch(torch, labels)
    x = _to_hpcnn(x)
    F = torch.nn.functional
    losses = {"hpcnn": [], "torch": []}

    def run_hpcnn():
        losses["hpcnn"].append(hm.train_step(x, labels, hopt, step=len(losses["hpcnn"])))
        _sync()

    def run_torch():
        topt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(tm(tx), tl)
        loss.backward()
        topt.step()
        losses["torch"].append(loss.item())

    th, tt, all_h, all_t = _median_pair(run_hpcnn, run_torch, args.repeats, args.warmup)
    # forward, and backward about twice the forward; the stem skips its dX
    flops = 3 * g.forward_flops() - (g["conv1"].flops() if "conv1" in g.nodes else 0)
    res = dict(model="resnet18", batch=args.batch, image_size=args.image_size, classes=args.classes,
               dtype="float32", hpcnn_s=th, torch_s=tt, hpcnn_img_s=args.batch / th,
               torch_img_s=args.batch / tt, ratio=tt / th, hpcnn_all_s=all_h, torch_all_s=all_t,
               hpcnn_min_s=min(all_h), torch_min_s=min(all_t), ratio_of_minima=min(all_t) / min(all_h),
               approx_gflop_per_step=flops / 1e9, weights_copied=copied,
               first_loss_hpcnn=losses["hpcnn"][0], first_loss_torch=losses["torch"][0])
    return res


# ----------------------------------------------------------------- machine
def machine_info(threads):
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "cpus": os.cpu_count(), "threads": threads}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info
        info["blas"] = [f"{p.get('internal_api')} {p.get('version')} ({p.get('prefix')}, "
                        f"{p.get('threading_layer', '')}, {p.get('architecture', '')}, "
                        f"{p.get('num_threads')} threads)" for p in threadpool_info()]
    except Exception:
        pass
    return info


def run(args) -> int:
    import torch   # the peer: only here
    global _CLOCK, _DEVICE
    _DEVICE = args.device
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("hpcnn bench kernels --device cuda: PyTorch sees no CUDA device")
        from hpcnn.backend import Backend
        Backend("cupy")   # fails with a clear message without CuPy or a GPU
    if args.clock == "cpu" and args.threads != 1:
        raise SystemExit("hpcnn bench kernels: --clock cpu needs --threads 1 (CPU time of several "
                         "threads counts their waiting too)")
    _CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    from hpcnn.backend import limit_blas_threads
    from hpcnn.ops import kernel_set
    from hpcnn.ops.host_threads import set_host_threads
    args.kernels = kernel_set(None if args.kernels == "default" else args.kernels)
    limit_blas_threads(args.threads)
    set_host_threads(args.threads)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = {"machine": machine_info(args.threads), "torch": torch.__version__, "device": args.device,
           "kernels": args.kernels, "repeats": args.repeats, "clock": args.clock,
           "load_average": os.getloadavg()}
    if args.device == "cuda":
        import cupy
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cupy"] = cupy.__version__
        print(f"hpcnn bench kernels on {out['gpu']}: hpcnn on CuPy {cupy.__version__} against "
              f"PyTorch {torch.__version__} CUDA (cuDNN)")
    print(f"hpcnn bench kernels: {out['machine'].get('cpu', '?')}, {args.threads} threads "
          f"(hpcnn and torch), median of {args.repeats} repeats, {args.clock} clock, float32, "
          f"kernels={args.kernels}, load average {out['load_average'][0]:.1f}")
    if args.part in ("all", "conv"):
        sizes = "real 56/28/14/7" if args.conv_size == "real" else "64x64-scaled 16/8/4/2"
        print(f"\nResNet-50 conv layers, forward+backward (dx, dW), batch {args.batch}, {sizes} inputs")
        print(f"{'layer':22s} {'input':20s} {'GFLOP':>7s} {'hpcnn ms':>9s} {'torch ms':>9s} "
              f"{'hpcnn/s':>8s} {'torch/s':>8s} {'ratio':>6s}")
        rows = bench_convs(torch, args)
        out["conv"] = {"batch": args.batch, "sizes": args.conv_size, "rows": rows,
                       "ratio_median": statistics.median(r["ratio"] for r in rows),
                       "ratio_total": sum(r["torch_ms"] for r in rows) / sum(r["hpcnn_ms"] for r in rows)}
        print(f"{'all conv layers':22s} ratio of total times {out['conv']['ratio_total']:.2f}, "
              f"median ratio {out['conv']['ratio_median']:.2f}")
    if args.part in ("all", "conv3d"):
        from hpcnn.bench.kernels3d import bench_conv3d
        out["conv3d"] = bench_conv3d(torch, args, _median_pair, _to_hpcnn, _to_torch, _sync)
    if args.part in ("all", "depthwise"):
        sizes = "real 112/56/28/14/7" if args.conv_size == "real" else "64x64-scaled 32/16/8/4/2"
        print(f"\nMobileNet-V2 depthwise and ResNeXt grouped conv layers, forward+backward (dx, dW), "
              f"batch {args.batch}, {sizes} inputs")
        print(f"{'layer':22s} {'input':20s} {'GFLOP':>7s} {'hpcnn ms':>9s} {'torch ms':>9s} "
              f"{'hpcnn/s':>8s} {'torch/s':>8s} {'ratio':>6s}")
        rows = bench_convs(torch, args, DEPTHWISE_CONVS)
        dw = [r for r in rows if r["layer"].startswith("dw 3x3")]
        out["depthwise"] = {"batch": args.batch, "sizes": args.conv_size, "rows": rows,
                            "ratio_median": statistics.median(r["ratio"] for r in dw),
                            "ratio_total": sum(r["torch_ms"] for r in dw) / sum(r["hpcnn_ms"] for r in dw)}
        print(f"{'MobileNet-V2 dw layers':22s} ratio of total times {out['depthwise']['ratio_total']:.2f}, "
              f"median ratio {out['depthwise']['ratio_median']:.2f}")
    if args.part in ("all", "memory") and args.device == "cpu":
        from hpcnn.bench.kernels_memory import bench_memory_ops
        out["memory"] = bench_memory_ops(torch, args, _CLOCK)
    elif args.part == "memory":
        raise SystemExit("hpcnn bench kernels: --part memory compares the NumPy kernel sets (CPU only)")
    if args.part in ("all", "step"):
        print(f"\nResNet-18 training step: batch {args.batch}, {args.image_size}x{args.image_size} "
              f"images, {args.classes} classes, SGD momentum 0.9, weight decay 1e-4")
        r = bench_step(torch, args)
        out["step"] = r
        print(f"{'':10s} {'s/step':>8s} {'img/s':>8s} {'fastest':>8s}")
        print(f"{'hpcnn':10s} {r['hpcnn_s']:8.3f} {r['hpcnn_img_s']:8.1f} {r['hpcnn_min_s']:8.3f}")
        print(f"{'torch':10s} {r['torch_s']:8.3f} {r['torch_img_s']:8.1f} {r['torch_min_s']:8.3f}")
        print(f"ratio (hpcnn throughput / torch throughput): {r['ratio']:.2f} of the medians, "
              f"{r['ratio_of_minima']:.2f} of the fastest steps")
        if r["weights_copied"]:
            print(f"same weights: first-step loss hpcnn {r['first_loss_hpcnn']:.5f}, "
                  f"torch {r['first_loss_torch']:.5f}")
        else:
            print("note: parameter names differ from torch's; losses not compared")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0
