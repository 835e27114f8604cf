"""``hpcnn export CKPT.h5 -o model.onnx``: a trained network as ONNX, for
inference stacks (onnxruntime, TensorRT, ...).

The network is rebuilt from what the checkpoint records (the job's [model]
section and the input shape) and its whole logical tensors are written as
initialisers.  The ONNX graph computes the logits in inference mode:
batch norm with its running statistics (kept as BatchNormalization nodes, or
folded into the convolution before it with ``--fold-bn``), dropout as the
identity, the loss left out.  The batch dimension is dynamic.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

OPSET = 17


class ExportError(ValueError):
    """A checkpoint or network that cannot be written as ONNX."""


def add_arguments(p):
    p.add_argument("checkpoint", help="an hpcnn checkpoint (ckpt-<step>.h5), or a directory: its newest")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.onnx", help="where to write the ONNX model")
    p.add_argument("--fold-bn", action="store_true",
                   help="fold every batch norm that follows a convolution into its weights")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="dtype of the weights and of the model's input (default float32)")


def checkpoint_network(path, batch=None):
    """(graph, params, buffers) of a checkpoint: the network rebuilt from its
    metadata (for ``batch`` samples, default the batch it was trained with)
    and its whole logical tensors."""
    import h5py

    from hpcnn.checkpoint import read_meta
    from hpcnn.models.sources import build_network
    meta = read_meta(path)
    net = meta.get("network")
    if not net:
        raise ExportError(f"{path} does not record its network (written by an older hpcnn): train it again "
                          f"with this one, or build the graph yourself and call export_onnx")
    job_dir = Path(net.get("job_dir", "."))
    shape = net["input_shape"]

    def resolve(p):
        p = Path(p).expanduser()
        return p if p.is_absolute() else job_dir / p

    g = build_network(meta["job"]["model"], int(batch or shape[0]), tuple(shape[1:]), int(net["num_classes"]), resolve)
    params, buffers = {}, {}
    with h5py.File(path, "r") as f:
        for store, group in ((params, "params"), (buffers, "buffers")):
            if group in f:
                for layer in f[group]:
                    store[layer] = {k: f[group][layer][k][()] for k in f[group][layer]}
    return g, params, buffers


def export_onnx(graph, params: dict, buffers: dict, path, fold_bn: bool = False, dtype="float32"):
    """Write ``graph`` with the whole logical tensors ``params`` and
    ``buffers`` ({layer: {name: array}}) as an ONNX model at ``path``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    dt = np.dtype(dtype)
    elem = TensorProto.FLOAT if dt == np.float32 else TensorProto.DOUBLE
    nodes, inits = [], []
    out = {}                                   # hpcnn node -> ONNX tensor name

    def init(name, a):
        inits.append(numpy_helper.from_array(np.asarray(a, dtype=dt), name))
        return name

    def tensor(name, a):                       # an int64 constant (shapes, axes)
        inits.append(numpy_helper.from_array(np.asarray(a, dtype=np.int64), name))
        return name

    def get(layer, key, store=params):
        try:
            return store[layer][key]
        except KeyError:
            raise ExportError(f"the checkpoint has no tensor {layer}/{key}") from None

    consumers = {n.name: graph.consumers(n.name) for n in graph}
    folded = set()
    g = graph
    for n in g:
        a = n.op.attrs()
        src = [out[i] for i in n.inputs]
        y = n.name
        if n.kind == "input":
            out[y] = "input"
            continue
        if n.kind == "conv2d":
            w = get(y, "weight").astype(np.float64)
            b = get(y, "bias").astype(np.float64) if a.get("bias") else np.zeros(w.shape[0])
            nxt = consumers[y]
            if fold_bn and len(nxt) == 1 and g[nxt[0]].kind == "batchnorm":
                bn = nxt[0]
                eps = g[bn].op.eps
                scale = get(bn, "weight") / np.sqrt(get(bn, "running_var", buffers) + eps)
                w = w * scale[:, None, None, None]
                b = (b - get(bn, "running_mean", buffers)) * scale + get(bn, "bias")
                folded.add(bn)
            (pt, pb), (pl, pr) = a["padding"]
            nodes.append(helper.make_node("Conv", src + [init(y + ".weight", w), init(y + ".bias", b)], [y], name=y,
                                          kernel_shape=list(a["kernel_size"]), strides=list(a["stride"]),
                                          pads=[pt, pl, pb, pr], dilations=list(a["dilation"]),
                                          group=int(a.get("groups", 1))))
        elif n.kind == "batchnorm":
            if y in folded:
                out[y] = src[0]
                continue
            ins = src + [init(y + ".weight", get(y, "weight")), init(y + ".bias", get(y, "bias")),
                         init(y + ".running_mean", get(y, "running_mean", buffers)),
                         init(y + ".running_var", get(y, "running_var", buffers))]
            nodes.append(helper.make_node("BatchNormalization", ins, [y], name=y, epsilon=n.op.eps,
                                          momentum=1.0 - n.op.momentum))
        elif n.kind in ("relu", "sigmoid"):
            nodes.append(helper.make_node({"relu": "Relu", "sigmoid": "Sigmoid"}[n.kind], src, [y], name=y))
        elif n.kind == "leaky_relu":
            nodes.append(helper.make_node("LeakyRelu", src, [y], name=y, alpha=a["negative_slope"]))
        elif n.kind == "hardswish":
            nodes.append(helper.make_node("HardSwish", src, [y], name=y))
        elif n.kind == "clip":
            nodes.append(helper.make_node("Clip", src + [init(y + ".min", np.array(a["lo"])),
                                                          init(y + ".max", np.array(a["hi"]))], [y], name=y))
        elif n.kind in ("maxpool2d", "avgpool2d"):
            (pt, pb), (pl, pr) = a["padding"]
            kw = dict(kernel_shape=list(a["kernel_size"]), strides=list(a["stride"]), pads=[pt, pl, pb, pr])
            if n.kind == "maxpool2d":
                nodes.append(helper.make_node("MaxPool", src, [y], name=y, dilations=list(a["dilation"]), **kw))
            else:
                nodes.append(helper.make_node("AveragePool", src, [y], name=y, count_include_pad=1, **kw))
        elif n.kind == "global_avgpool":            # hpcnn's (N, C): ONNX pools to (N, C, 1, 1), then flatten
            nodes.append(helper.make_node("GlobalAveragePool", src, [y + ".pooled"], name=y))
            nodes.append(helper.make_node("Flatten", [y + ".pooled"], [y], name=y + ".flatten", axis=1))
        elif n.kind == "flatten":
            nodes.append(helper.make_node("Flatten", src, [y], name=y, axis=1))
        elif n.kind == "linear":
            ins = src + [init(y + ".weight", get(y, "weight"))]
            if a.get("bias"):
                ins.append(init(y + ".bias", get(y, "bias")))
            nodes.append(helper.make_node("Gemm", ins, [y], name=y, transB=1))
        elif n.kind == "dropout":
            out[y] = src[0]                          # inference: the identity
            continue
        elif n.kind == "concat":
            nodes.append(helper.make_node("Concat", src, [y], name=y, axis=1))
        elif n.kind == "add":
            nodes.append(helper.make_node("Sum", src, [y], name=y))
        elif n.kind == "channel_scale":
            gate = y + ".gate"
            nodes.append(helper.make_node("Unsqueeze", [src[1], tensor(y + ".axes", [2, 3])], [gate], name=gate))
            nodes.append(helper.make_node("Mul", [src[0], gate], [y], name=y))
        elif n.kind == "softmax_xent":
            continue
        else:
            raise ExportError(f"layer {y!r}: op {n.kind!r} has no ONNX export")
        out[y] = y
    logits = out[g.logits_name]
    shape = list(g[g.input_name].shape)
    model = helper.make_model(
        helper.make_graph(nodes, g.name, [helper.make_tensor_value_info("input", elem, ["batch"] + shape[1:])],
                          [helper.make_tensor_value_info(logits, elem, ["batch", g[g.logits_name].shape[1]])],
                          inits),
        opset_imports=[helper.make_opsetid("", OPSET)], producer_name="hpcnn")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return model


def run(args) -> int:
    from hpcnn.checkpoint import CheckpointError
    from hpcnn.models import ModelError
    from hpcnn.checkpoint import latest_checkpoint
    try:
        path = Path(args.checkpoint)
        if path.is_dir():
            path = latest_checkpoint(path)
            if path is None:
                raise CheckpointError(f"directory {args.checkpoint!r} holds no checkpoint (ckpt-<step>.h5)")
        g, params, buffers = checkpoint_network(path)
        export_onnx(g, params, buffers, args.output, fold_bn=args.fold_bn, dtype=args.dtype)
    except (CheckpointError, ModelError, ExportError, OSError) as exc:
        print(f"hpcnn export: error: {exc}", file=sys.stderr)
        return 2
    except ImportError:
        print("hpcnn export: error: writing ONNX needs the onnx package: pip install onnx", file=sys.stderr)
        return 2
    print(f"wrote {args.output} from {path}: {g.name}, {sum(1 for n in g if n.kind != 'input')} layers, input "
          f"{['batch'] + list(g[g.input_name].shape[1:])}")
    return 0
