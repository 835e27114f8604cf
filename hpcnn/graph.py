"""A network as a DAG of op nodes with whole-tensor shapes.

Nodes are added in topological order (an input must exist before a node that
reads it), so the insertion order is a valid execution order.  Shapes are
inferred as nodes are added; a mismatch is an error naming the node and
both shapes.  No parallelism here: the same Graph drives the sequential
trainer, the strategy search and the distributed runtime.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hpcnn.ops import LOSS_KINDS, Op, OpError, init_param, make_op
from hpcnn.ops.base import ParamSpec


class GraphError(ValueError):
    """A malformed network (unknown input, duplicate name, bad shapes)."""


@dataclass
class Node:
    name: str
    op: Op
    inputs: list[str]
    shape: tuple
    in_shapes: list = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.op.kind

    def param_specs(self) -> dict[str, ParamSpec]:
        return self.op.param_specs(self.in_shapes)

    def buffer_specs(self) -> dict[str, ParamSpec]:
        return self.op.buffer_specs(self.in_shapes)

    def flops(self) -> int:
        return self.op.flops(self.in_shapes, self.shape)


class Graph:
    def __init__(self, name: str = "net"):
        self.name = name
        self.nodes: dict[str, Node] = {}
        self._consumers: dict[str, list[str]] = {}
        self.meta: dict = {}
        #: given initial values of parameters and buffers (an imported
        #: network's weights): {node: {name: whole logical array}}
        self.initial: dict[str, dict] = {}

    # ---- construction ----------------------------------------------------
    def add(self, op: Op, inputs=(), name: str | None = None) -> str:
        if not name:
            i = 1
            while f"{op.kind}_{i}" in self.nodes:
                i += 1
            name = f"{op.kind}_{i}"
        elif name in self.nodes:
            raise GraphError(f"a node named {name!r} is already in the graph")
        op.name = name
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        for src in inputs:
            if src not in self.nodes:
                raise GraphError(f"node {name!r} reads {src!r}, which is not (yet) in the graph")
        in_shapes = [self.nodes[s].shape for s in inputs]
        try:
            shape = tuple(int(d) for d in op.infer_shape(in_shapes))
        except OpError as exc:
            raise GraphError(f"node {name!r}: {exc} (input shapes {[tuple(s) for s in in_shapes]})") from None
        self.nodes[name] = Node(name, op, inputs, shape, in_shapes)
        self._consumers[name] = []
        for src in inputs:
            self._consumers[src].append(name)
        return name

    def layer(self, kind: str, inputs=(), name: str | None = None, **attrs) -> str:
        """Add a node by op kind: ``g.layer('conv2d', x, out_channels=64, kernel_size=3)``."""
        try:
            op = make_op(kind, name or "", **attrs)
        except OpError as exc:
            raise GraphError(str(exc)) from None
        return self.add(op, inputs, name)

    # shortcuts used by models/
    def input(self, shape, name="input"):
        return self.layer("input", (), name, shape=tuple(shape))

    def conv(self, x, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True, name=None,
             groups=1):
        extra = {"groups": groups} if groups != 1 else {}
        return self.layer("conv2d", x, name, out_channels=out_channels, kernel_size=kernel_size,
                          stride=stride, padding=padding, dilation=dilation, bias=bias, **extra)

    def relu(self, x, name=None):
        return self.layer("relu", x, name)

    def bn(self, x, name=None, eps=1e-5, momentum=0.1):
        return self.layer("batchnorm", x, name, eps=eps, momentum=momentum)

    def maxpool(self, x, kernel_size, stride=None, padding=0, name=None):
        return self.layer("maxpool2d", x, name, kernel_size=kernel_size, stride=stride, padding=padding)

    def avgpool(self, x, kernel_size, stride=None, padding=0, name=None):
        return self.layer("avgpool2d", x, name, kernel_size=kernel_size, stride=stride, padding=padding)

    def global_avgpool(self, x, name=None):
        return self.layer("global_avgpool", x, name)

    def flatten(self, x, name=None):
        return self.layer("flatten", x, name)

    def linear(self, x, out_features, bias=True, name=None):
        return self.layer("linear", x, name, out_features=out_features, bias=bias)

    def sigmoid(self, x, name=None):
        return self.layer("sigmoid", [x], name)

    def leaky_relu(self, x, negative_slope=0.01, name=None):
        return self.layer("leaky_relu", [x], name, negative_slope=negative_slope)

    def clip(self, x, lo=0.0, hi=6.0, name=None):
        return self.layer("clip", [x], name, lo=lo, hi=hi)

    def hardswish(self, x, name=None):
        return self.layer("hardswish", [x], name)

    def channel_scale(self, x, s, name=None):
        """x (N, C, H, W) times s (N, C), per sample and channel."""
        return self.layer("channel_scale", [x, s], name)

    def dropout(self, x, p=0.5, name=None):
        return self.layer("dropout", x, name, p=p)

    def concat(self, xs, name=None):
        return self.layer("concat", list(xs), name)

    def add_(self, xs, name=None):
        return self.layer("add", list(xs), name)

    def loss(self, x, name="loss"):
        return self.layer("softmax_xent", x, name)

    def mse_loss(self, x, name="loss"):
        """Mean squared error of the predictions ``x`` (N, K) against float
        targets (N, K): a regression network's loss."""
        return self.layer("mse", x, name)

    # volumes (N, C, D, H, W)
    def conv3d(self, x, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True, name=None):
        return self.layer("conv3d", x, name, out_channels=out_channels, kernel_size=kernel_size,
                          stride=stride, padding=padding, dilation=dilation, bias=bias)

    def maxpool3d(self, x, kernel_size, stride=None, padding=0, name=None):
        return self.layer("maxpool3d", x, name, kernel_size=kernel_size, stride=stride, padding=padding)

    def avgpool3d(self, x, kernel_size, stride=None, padding=0, name=None):
        return self.layer("avgpool3d", x, name, kernel_size=kernel_size, stride=stride, padding=padding)

    def tanh(self, x, scale=1.0, name=None):
        return self.layer("tanh", [x], name, scale=scale)

    # ---- queries -------------------------------------------------------------
    def __iter__(self):
        return iter(self.nodes.values())

    def __len__(self):
        return len(self.nodes)

    def __getitem__(self, name) -> Node:
        return self.nodes[name]

    def consumers(self, name) -> list[str]:
        return list(self._consumers[name])

    @property
    def input_name(self) -> str:
        ins = [n.name for n in self if n.kind == "input"]
        if len(ins) != 1:
            raise GraphError(f"graph {self.name!r} must have exactly one input node, has {ins}")
        return ins[0]

    @property
    def loss_name(self) -> str:
        outs = [n.name for n in self if n.kind in LOSS_KINDS]
        if len(outs) != 1:
            raise GraphError(f"graph {self.name!r} must have exactly one loss node, has {outs}")
        return outs[0]

    @property
    def logits_name(self) -> str:
        return self.nodes[self.loss_name].inputs[0]

    @property
    def batch(self) -> int:
        return self.nodes[self.input_name].shape[0]

    def random_labels(self, rng, n: int | None = None) -> np.ndarray:
        """Labels of ``n`` samples (default: the batch) for timing and
        tests: class indices for a classifier, float targets in (-1, 1) for
        a regression network (its loss is mse)."""
        n = self.batch if n is None else int(n)
        width = self.nodes[self.logits_name].shape[1]
        if self.nodes[self.loss_name].kind == "mse":
            return rng.uniform(-0.8, 0.8, size=(n, width))
        return rng.integers(0, width, size=n)

    def initial_tensor(self, node: str, key: str, seed: int, dtype=np.float32) -> np.ndarray:
        """The whole logical tensor parameter (or buffer) ``key`` of
        ``node`` starts from: the given one (``initial``), else the pure
        function of (seed, node, key) every plan shares."""
        n = self.nodes[node]
        spec = n.param_specs().get(key) or n.buffer_specs().get(key)
        given = self.initial.get(node, {}).get(key)
        if given is not None:
            return np.array(given, dtype=dtype)            # a copy: the run updates it
        return init_param(spec, f"{node}.{key}", seed, dtype)

    def reaches_loss(self) -> set:
        """The layers whose output reaches the loss (all of them in a graph
        without one): only their gradients travel back in training."""
        try:
            todo = [self.loss_name]
        except GraphError:
            return set(self.nodes)
        live = set()
        while todo:
            n = todo.pop()
            if n not in live:
                live.add(n)
                todo.extend(self.nodes[n].inputs)
        return live

    def edges(self) -> list[tuple[str, str, int]]:
        """(producer, consumer, input index) for every data edge."""
        return [(src, n.name, i) for n in self for i, src in enumerate(n.inputs)]

    def num_params(self) -> int:
        return sum(s.size for n in self for s in n.param_specs().values())

    def forward_flops(self) -> int:
        """Forward FLOPs of the whole batch (excluding the loss)."""
        return sum(n.flops() for n in self if n.kind not in LOSS_KINDS)

    def to_dict(self) -> dict:
        return {"name": self.name,
                "nodes": [{"name": n.name, "op": n.kind, "inputs": n.inputs,
                           "attrs": n.op.attrs(), "shape": list(n.shape)} for n in self]}

    @classmethod
    def from_dict(cls, d: dict) -> "Graph":
        g = cls(d.get("name", "net"))
        for nd in d["nodes"]:
            g.layer(nd["op"], nd["inputs"], nd["name"], **nd.get("attrs", {}))
        return g

    def summary(self) -> str:
        lines = [f"{'layer':24s} {'op':15s} {'output shape':22s} {'params':>12s}"]
        for n in self:
            p = sum(s.size for s in n.param_specs().values())
            lines.append(f"{n.name:24s} {n.kind:15s} {str(n.shape):22s} {p:12,d}")
        lines.append(f"total parameters: {self.num_params():,d}")
        return "\n".join(lines)
