"""Networks from ONNX files: a model exported with ``torch.onnx.export``
becomes an hpcnn Graph, with its weights.

    >>> from hpcnn.models.onnx_import import load_onnx
    >>> g = load_onnx("net.onnx", batch=64)          # weights in g.initial

The importer walks the ONNX nodes in their (topological) order and maps each
to hpcnn ops: Conv (stride, padding, dilation, groups: grouped and
depthwise convolution), BatchNormalization, Relu, LeakyRelu, Sigmoid, Clip
(ReLU6, bounds as constants), HardSwish, MaxPool, AveragePool,
GlobalAveragePool (or ReduceMean over height and width), Gemm, MatMul + Add, Add, Mul by a per-channel gate
(squeeze-and-excitation), Concat over channels, Flatten and Reshape to
(N, features), Dropout and Identity.  The batch dimension is fixed to the
job's batch; every other dimension must be a number.  A final Softmax or
LogSoftmax is dropped (hpcnn's loss takes logits) and the loss is appended
to the single output, which must be (N, classes).  Anything else -- another
op, a dynamic shape, an attribute hpcnn cannot honour -- is an
``OnnxImportError`` naming the ONNX node, its op type and what is supported.

ONNX's global pooling keeps the spatial dimensions as 1 x 1; hpcnn's gives
(N, C).  The importer tracks such tensors and maps what follows them (a
1 x 1 convolution becomes a fully connected layer, a Flatten nothing, a Mul
a channel scale), so squeeze-and-excitation blocks import as they compute.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hpcnn.graph import Graph, GraphError
from hpcnn.models.registry import ModelError

SUPPORTED = ("Conv", "BatchNormalization", "Relu", "LeakyRelu", "Sigmoid", "Clip", "HardSwish", "MaxPool",
             "AveragePool", "GlobalAveragePool", "Gemm", "MatMul", "Add", "Mul", "Concat", "Flatten",
             "Reshape", "ReduceMean", "Dropout", "Identity", "Softmax", "LogSoftmax")


class OnnxImportError(ModelError):
    """An ONNX model hpcnn cannot import; the message names the node."""


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise OnnxImportError("reading ONNX files needs the onnx package: pip install onnx "
                              "(or pip install 'hpcnn[onnx]')") from None
    return onnx, numpy_helper


class _Tensor:
    """An ONNX tensor as hpcnn holds it: the hpcnn node producing it, and
    whether ONNX sees it as (N, C, 1, 1) where hpcnn has (N, C)."""

    def __init__(self, node: str, pooled: bool = False):
        self.node, self.pooled = node, pooled


class _Importer:
    def __init__(self, model, batch: int, with_weights: bool, name: str):
        onnx, self.nh = _onnx()
        self.model = model
        self.batch = int(batch)
        self.with_weights = with_weights
        self.g = Graph(name)
        self.consts = {t.name: self.nh.to_array(t) for t in model.graph.initializer}
        self.tensors: dict[str, _Tensor] = {}
        self.pending_bias: dict[str, str] = {}      # MatMul outputs whose bias an Add may supply
        self.used = set()

    # ---- helpers -------------------------------------------------------------
    def fail(self, node, what: str):
        raise OnnxImportError(f"ONNX node {node.name or '(unnamed)'!r} ({node.op_type}): {what}")

    def attrs(self, node) -> dict:
        import onnx
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def name_for(self, node, i: int) -> str:
        base = (node.name or f"{node.op_type.lower()}_{i}").replace("/", ".").strip(".") or f"node_{i}"
        name, k = base, 1
        while name in self.g.nodes:
            k += 1
            name = f"{base}_{k}"
        return name

    def const(self, node, tensor: str):
        if tensor in self.consts:
            return self.consts[tensor]
        self.fail(node, f"input {tensor!r} must be a constant (an initializer or a Constant node)")

    def inp(self, node, k: int = 0) -> _Tensor:
        name = node.input[k]
        if name not in self.tensors:
            self.fail(node, f"input {name!r} is neither the network's input nor an earlier node's output")
        return self.tensors[name]

    def weights(self, hp_node: str, **arrays):
        if self.with_weights:
            self.g.initial[hp_node] = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()
                                       if v is not None}

    def add(self, node, i, kind, inputs, pooled=False, **attrs) -> str:
        try:
            out = self.g.layer(kind, inputs, self.name_for(node, i), **attrs)
        except GraphError as exc:
            self.fail(node, str(exc))
        self.tensors[node.output[0]] = _Tensor(out, pooled)
        return out

    def alias(self, node, t: _Tensor):
        self.tensors[node.output[0]] = t

    # ---- the walk ----------------------------------------------------------------
    def run(self):
        gr = self.model.graph
        for n in gr.node:
            if n.op_type == "Constant":
                a = self.attrs(n)
                if "value" not in a:
                    self.fail(n, "only Constant nodes with a tensor 'value' are supported")
                self.consts[n.output[0]] = self.nh.to_array(a["value"])
        inputs = [v for v in gr.input if v.name not in self.consts]
        if len(inputs) != 1:
            raise OnnxImportError(f"the ONNX graph must have one input besides its weights, has "
                                  f"{[v.name for v in inputs]}")
        shape = self._input_shape(inputs[0])
        self.tensors[inputs[0].name] = _Tensor(self.g.input(shape))
        for i, n in enumerate(gr.node):
            if n.op_type == "Constant":
                continue
            if n.op_type not in SUPPORTED:
                self.fail(n, f"this op type is not supported; hpcnn imports {', '.join(SUPPORTED)}")
            getattr(self, "op_" + n.op_type)(n, i)
        outs = list(gr.output)
        if len(outs) != 1:
            raise OnnxImportError(f"the ONNX graph must have one output (the logits), has {[o.name for o in outs]}")
        t = self.tensors.get(outs[0].name)
        if t is None:
            raise OnnxImportError(f"the output {outs[0].name!r} is not produced by any imported node")
        if len(self.g[t.node].shape) != 2:
            raise OnnxImportError(f"the output {outs[0].name!r} has shape {self.g[t.node].shape}; hpcnn trains "
                                  f"classifiers whose output is (N, classes)")
        self.g.loss(t.node)
        return self.g

    def _input_shape(self, v):
        dims = v.type.tensor_type.shape.dim
        shape = []
        for k, d in enumerate(dims):
            if k == 0:
                shape.append(self.batch)
            elif d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
            else:
                raise OnnxImportError(f"input {v.name!r}: dimension {k} is {d.dim_param or '?'}, a dynamic size "
                                      f"hpcnn cannot fix; export with a fixed input size (only the batch "
                                      f"may be dynamic)")
        if len(shape) != 4:
            raise OnnxImportError(f"input {v.name!r} has {len(shape)} dimensions; hpcnn takes images (N, C, H, W)")
        return tuple(shape)

    # ---- ops ------------------------------------------------------------------------
    def _window(self, n, a, k):
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            self.fail(n, f"auto_pad={a['auto_pad']!r} is not supported; export with explicit pads")
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if len(pads) != 4:
            self.fail(n, f"pads {pads} are not those of a 2-D window")
        return dict(kernel_size=tuple(k), stride=tuple(a.get("strides", [1, 1])),
                    padding=((pads[0], pads[2]), (pads[1], pads[3])))

    def op_Conv(self, n, i):
        a = self.attrs(n)
        x = self.inp(n)
        w = self.const(n, n.input[1])
        b = self.const(n, n.input[2]) if len(n.input) > 2 and n.input[2] else None
        group = int(a.get("group", 1))
        if w.ndim != 4:
            self.fail(n, f"only 2-D convolutions are supported (weight of shape {w.shape})")
        win = self._window(n, a, w.shape[2:])
        dil = tuple(a.get("dilations", [1, 1]))
        if x.pooled:
            if w.shape[2:] != (1, 1) or group != 1 or win["stride"] != (1, 1) or win["padding"] != ((0, 0), (0, 0)):
                self.fail(n, "a convolution after global pooling must be 1x1, stride 1, no padding, no groups")
            out = self.add(n, i, "linear", [x.node], pooled=True, out_features=int(w.shape[0]), bias=b is not None)
            self.weights(out, weight=w[:, :, 0, 0], bias=b)
            return
        cin = int(self.g[x.node].shape[1])
        if group < 1 or w.shape[1] * group != cin or w.shape[0] % group:
            self.fail(n, f"group={group} does not fit weight {tuple(w.shape)} and {cin} input channels: "
                         f"a grouped convolution needs weight (Cout, Cin/group, kh, kw) with Cout "
                         f"divisible by group")
        extra = {"groups": group} if group != 1 else {}
        out = self.add(n, i, "conv2d", [x.node], out_channels=int(w.shape[0]), dilation=dil,
                       bias=b is not None, **win, **extra)
        self.weights(out, weight=w, bias=b)

    def op_BatchNormalization(self, n, i):
        a = self.attrs(n)
        if a.get("training_mode", 0):
            self.fail(n, "training_mode=1 is not supported; export the model in eval mode")
        x = self.inp(n)
        scale, bias, mean, var = (self.const(n, t) for t in n.input[1:5])
        # ONNX: running = running * momentum + batch * (1 - momentum); hpcnn/torch the other way
        out = self.add(n, i, "batchnorm", [x.node], pooled=x.pooled, eps=float(a.get("epsilon", 1e-5)),
                       momentum=1.0 - float(a.get("momentum", 0.9)))
        if self.with_weights:
            self.g.initial[out] = {"weight": scale, "bias": bias, "running_mean": mean, "running_var": var}

    def _unary(self, n, i, kind, **attrs):
        x = self.inp(n)
        self.add(n, i, kind, [x.node], pooled=x.pooled, **attrs)

    def op_Relu(self, n, i):
        self._unary(n, i, "relu")

    def op_Sigmoid(self, n, i):
        self._unary(n, i, "sigmoid")

    def op_HardSwish(self, n, i):
        self._unary(n, i, "hardswish")

    def op_LeakyRelu(self, n, i):
        self._unary(n, i, "leaky_relu", negative_slope=float(self.attrs(n).get("alpha", 0.01)))

    def op_Clip(self, n, i):
        a = self.attrs(n)
        lo = a.get("min", -np.inf)
        hi = a.get("max", np.inf)
        if len(n.input) > 1 and n.input[1]:
            lo = float(np.asarray(self.const(n, n.input[1])).reshape(()))
        if len(n.input) > 2 and n.input[2]:
            hi = float(np.asarray(self.const(n, n.input[2])).reshape(()))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            self.fail(n, f"clip bounds must both be given, got min={lo}, max={hi}")
        self._unary(n, i, "clip", lo=float(lo), hi=float(hi))

    def op_MaxPool(self, n, i):
        a = self.attrs(n)
        if a.get("ceil_mode", 0):
            self.fail(n, "ceil_mode=1 is not supported; export with ceil_mode=False")
        if a.get("storage_order", 0):
            self.fail(n, "storage_order=1 is not supported")
        x = self.inp(n)
        win = self._window(n, a, a["kernel_shape"])
        self.add(n, i, "maxpool2d", [x.node], dilation=tuple(a.get("dilations", [1, 1])), **win)

    def op_AveragePool(self, n, i):
        a = self.attrs(n)
        if a.get("ceil_mode", 0):
            self.fail(n, "ceil_mode=1 is not supported; export with ceil_mode=False")
        win = self._window(n, a, a["kernel_shape"])
        if win["padding"] != ((0, 0), (0, 0)) and not a.get("count_include_pad", 0):
            self.fail(n, "hpcnn's average pool counts padded elements; export with count_include_pad=True")
        x = self.inp(n)
        self.add(n, i, "avgpool2d", [x.node], **win)

    def op_GlobalAveragePool(self, n, i):
        x = self.inp(n)
        self.add(n, i, "global_avgpool", [x.node], pooled=True)

    def op_ReduceMean(self, n, i):
        """A mean over height and width (what torch.export makes of
        adaptive average pooling to 1 x 1) is global average pooling."""
        a = self.attrs(n)
        axes = a.get("axes")
        if len(n.input) > 1 and n.input[1]:
            axes = [int(v) for v in np.asarray(self.const(n, n.input[1])).reshape(-1)]
        x = self.inp(n)
        rank = len(self.g[x.node].shape)
        if x.pooled or rank != 4 or axes is None or sorted(int(v) % 4 for v in axes) != [2, 3]:
            self.fail(n, f"only a mean over height and width of an image (axes [2, 3]) is supported, got axes {axes}")
        self.add(n, i, "global_avgpool", [x.node], pooled=bool(a.get("keepdims", 1)))

    def _to_features(self, n, i, x):
        """A 4-D tensor flattened to (N, C*H*W); a pooled one as it is."""
        if x.pooled or len(self.g[x.node].shape) == 2:
            self.alias(n, _Tensor(x.node))
        else:
            self.add(n, i, "flatten", [x.node])

    def op_Flatten(self, n, i):
        if int(self.attrs(n).get("axis", 1)) != 1:
            self.fail(n, "only Flatten(axis=1) is supported")
        self._to_features(n, i, self.inp(n))

    def op_Reshape(self, n, i):
        x = self.inp(n)
        target = [int(v) for v in np.asarray(self.const(n, n.input[1])).reshape(-1)]
        shape = self.g[x.node].shape
        features = int(np.prod(shape[1:]))
        if len(target) == 2 and target[0] in (-1, 0, self.batch, 1) and target[1] in (-1, features):
            self._to_features(n, i, x)
        else:
            self.fail(n, f"only a reshape to (N, features) is supported, got target {target}")

    def op_Gemm(self, n, i):
        a = self.attrs(n)
        if float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0 or a.get("transA", 0):
            self.fail(n, "only Gemm with alpha = beta = 1 and transA = 0 (a fully connected layer) is supported")
        x = self.inp(n)
        w = self.const(n, n.input[1])
        w = w if a.get("transB", 0) else w.T
        b = self.const(n, n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if b is not None and b.size != w.shape[0]:
            self.fail(n, f"the bias must have one value per output feature ({w.shape[0]}), has shape {b.shape}")
        out = self.add(n, i, "linear", [x.node], out_features=int(w.shape[0]), bias=b is not None)
        self.weights(out, weight=w, bias=None if b is None else b.reshape(-1))

    def op_MatMul(self, n, i):
        x = self.inp(n)
        if len(self.g[x.node].shape) != 2:
            self.fail(n, "only a matrix product of (N, features) with a constant weight is supported")
        w = self.const(n, n.input[1])
        out = self.add(n, i, "linear", [x.node], out_features=int(w.shape[1]), bias=True)
        self.weights(out, weight=w.T, bias=np.zeros(w.shape[1]))
        self.pending_bias[n.output[0]] = out

    def op_Add(self, n, i):
        a, b = n.input[0], n.input[1]
        const = b if b in self.consts else a if a in self.consts else None
        if const is not None:
            other = a if const == b else b
            lin = self.pending_bias.get(other)
            if lin is None:
                self.fail(n, "adding a constant is supported only as the bias of a MatMul")
            bias = np.asarray(self.consts[const]).reshape(-1)
            if bias.size != self.g[lin].shape[1]:
                self.fail(n, f"bias of {bias.size} values for a layer of {self.g[lin].shape[1]} features")
            if self.with_weights:
                self.g.initial[lin]["bias"] = self.g.initial[lin]["bias"] + bias
            self.alias(n, self.tensors[other])
            return
        x, y = self.inp(n, 0), self.inp(n, 1)
        if self.g[x.node].shape != self.g[y.node].shape:
            self.fail(n, f"adding shapes {self.g[x.node].shape} and {self.g[y.node].shape}: only equal shapes "
                         f"are supported (no broadcasting)")
        self.add(n, i, "add", [x.node, y.node], pooled=x.pooled and y.pooled)

    def op_Mul(self, n, i):
        x, y = self.inp(n, 0), self.inp(n, 1)
        if y.pooled and not x.pooled:
            self.add(n, i, "channel_scale", [x.node, y.node])
        elif x.pooled and not y.pooled:
            self.add(n, i, "channel_scale", [y.node, x.node])
        else:
            self.fail(n, "only a product of an image by a per-channel gate of global pooling "
                         "(squeeze-and-excitation) is supported")

    def op_Concat(self, n, i):
        if int(self.attrs(n).get("axis", 1)) != 1:
            self.fail(n, "only concatenation over channels (axis 1) is supported")
        xs = [self.inp(n, k) for k in range(len(n.input))]
        self.add(n, i, "concat", [x.node for x in xs], pooled=all(x.pooled for x in xs))

    def op_Dropout(self, n, i):
        x = self.inp(n)
        ratio = self.attrs(n).get("ratio", 0.5)
        if len(n.input) > 1 and n.input[1]:
            ratio = float(np.asarray(self.const(n, n.input[1])).reshape(()))
        self.add(n, i, "dropout", [x.node], pooled=x.pooled, p=float(ratio))

    def op_Identity(self, n, i):
        # the TorchScript exporter stores equal weights once and names the copies by
        # Identity nodes of that initializer: such an output is a constant too
        if n.input[0] in self.consts:
            self.consts[n.output[0]] = self.consts[n.input[0]]
            return
        self.alias(n, self.inp(n))

    def op_Softmax(self, n, i):
        if n.output[0] not in [o.name for o in self.model.graph.output]:
            self.fail(n, "a softmax is supported only as the network's last node (it is dropped: "
                         "hpcnn's loss takes logits)")
        self.alias(n, self.inp(n))

    op_LogSoftmax = op_Softmax


def load_onnx(path, batch: int, num_classes: int | None = None, init: str = "weights",
              name: str | None = None) -> Graph:
    """The network of the ONNX file ``path`` as a Graph of global batch
    ``batch``; ``init="weights"`` keeps its weights (in ``Graph.initial``),
    ``"random"`` starts from hpcnn's seeded initialisation."""
    onnx, _ = _onnx()
    p = Path(path)
    if not p.is_file():
        raise OnnxImportError(f"ONNX file {str(p)!r} does not exist")
    if init not in ("weights", "random"):
        raise OnnxImportError(f"model.onnx_init must be 'weights' or 'random', got {init!r}")
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # noqa: BLE001  (onnx raises protobuf errors of several kinds)
        raise OnnxImportError(f"{p} is not a readable ONNX model: {exc}") from None
    g = _Importer(model, batch, init == "weights", name or p.stem).run()
    classes = g[g.logits_name].shape[1]
    if num_classes and num_classes != classes:
        raise OnnxImportError(f"the ONNX model has {classes} outputs but the job asks for {num_classes} classes")
    g.meta["onnx"] = str(p)
    return g
