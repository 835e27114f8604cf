"""The sequential executor: the whole network in one process, whole tensors,
no MPI.  It is the reference that every parallel run must equal."""
from __future__ import annotations

import numpy as np

from hpcnn.backend import get_backend
from hpcnn.ops import TileContext, clip_box, full_box
from hpcnn.ops.host_memory import retain_freed_memory


class SequentialModel:
    """Parameters, buffers and one training/inference pass of a Graph.

    params[node][name] and buffers[node][name] hold whole tensors in
    ``dtype`` on the current backend.  Parameters are initialised from
    ``seed`` exactly as the distributed runtime initialises its shards."""

    def __init__(self, graph, dtype=np.float32, seed=0, backend=None):
        self.graph = graph
        self.dtype = np.dtype(dtype)
        self.seed = seed
        self.backend = backend or get_backend()
        xp = self.backend.xp
        if not self.backend.is_gpu:
            retain_freed_memory()      # steps reuse the same large host blocks
        self.params, self.buffers = {}, {}
        for n in graph:
            self.params[n.name] = {k: self.backend.to_device(graph.initial_tensor(n.name, k, seed, self.dtype))
                                   for k in n.param_specs()}
            self.buffers[n.name] = {k: self.backend.to_device(graph.initial_tensor(n.name, k, seed, self.dtype))
                                    for k in n.buffer_specs()}
        self._ctx = {}
        self._saved = {}
        self.xp = xp

    def flat_params(self) -> dict:
        """{'node.param': array} of every trainable parameter."""
        return {f"{n}.{k}": v for n, ps in self.params.items() for k, v in ps.items()}

    def _context(self, node, training, step, labels):
        ins = node.in_shapes
        ob = full_box(node.shape)
        g = self.graph
        return TileContext(out_box=ob, in_boxes=[node.op.input_box(i, ob, ins) for i in range(len(ins))],
                           in_shapes=list(ins), out_shape=node.shape, training=training,
                           seed=self.seed, step=step, labels=labels,
                           input_grads=tuple(g[src].kind != "input" for src in node.inputs))

    def forward(self, x, labels=None, training=True, step=0):
        """Run the graph; returns (loss, logits).  Keeps what backward needs."""
        g = self.graph
        x = self.backend.to_device(x, self.dtype)
        acts = {g.input_name: x}
        self._saved = {}
        self._ctx = {}
        loss_name = g.loss_name
        for node in g:
            if node.kind == "input":
                continue
            if node.name == loss_name and labels is None:
                continue
            ctx = self._context(node, training, step,
                                self.backend.to_device(labels) if node.name == loss_name else None)
            xs = []
            for i, src in enumerate(node.inputs):
                cb = clip_box(ctx.in_boxes[i], ctx.in_shapes[i])
                a = acts[src]
                if cb != full_box(ctx.in_shapes[i]):
                    a = a[tuple(slice(lo, hi) for lo, hi in cb)]
                xs.append(a)
            y, saved = node.op.forward(xs, self.params[node.name], self.buffers[node.name], ctx)
            acts[node.name] = y
            self._saved[node.name] = saved
            self._ctx[node.name] = ctx
        self._acts = acts
        logits = acts[g.logits_name]
        loss = float(acts[loss_name].sum()) if labels is not None else None
        return loss, logits

    def backward(self):
        """Gradients of the loss of the last forward: {node: {param: grad}}.

        Activation gradients keep the memory layout the ops return them in
        (an op may return a channels-last array viewed as NCHW).  The
        gradient an op returns is used as it is when it is the only one for
        that tensor and covers it whole; it is never written to (ops may
        return the same array for several inputs), so a second contribution
        goes into a fresh array that this executor owns."""
        g = self.graph
        xp = self.xp
        grads_act = {g.loss_name: xp.ones(g[g.loss_name].shape, dtype=self.dtype)}
        owned = set()          # tensors whose gradient array is ours to add into
        pgrads = {}
        for node in reversed(list(g)):
            if node.kind == "input" or node.name not in grads_act:
                continue
            ctx = self._ctx[node.name]
            dxs, dps = node.op.backward(grads_act.pop(node.name), self._saved.pop(node.name),
                                        self.params[node.name], ctx)
            pgrads[node.name] = dps
            for i, src in enumerate(node.inputs):
                if dxs[i] is None or g[src].kind == "input":
                    continue
                dx = dxs[i]
                cb = clip_box(ctx.in_boxes[i], ctx.in_shapes[i])
                whole = cb == full_box(ctx.in_shapes[i])
                if src not in grads_act:
                    if whole:
                        grads_act[src] = dx                      # borrowed
                        continue
                    grads_act[src] = xp.zeros_like(self._acts[src], dtype=self.dtype)
                    owned.add(src)
                elif src not in owned:
                    if whole:
                        grads_act[src] = grads_act[src] + dx
                        owned.add(src)
                        continue
                    acc = xp.zeros_like(self._acts[src], dtype=self.dtype)
                    acc[...] = grads_act[src]
                    grads_act[src] = acc
                    owned.add(src)
                dst = grads_act[src] if whole else grads_act[src][tuple(slice(lo, hi) for lo, hi in cb)]
                xp.add(dst, dx, out=dst)
        self._saved = {}
        self._acts = {}
        return pgrads

    def train_step(self, x, labels, optimizer, lr=None, step=0):
        """Forward, backward and an optimiser update; returns the loss."""
        loss, _ = self.forward(x, labels, training=True, step=step)
        optimizer.step_nodes(self.params, self.backward(), lr)
        return loss

    def predict(self, x):
        """Logits in inference mode (running batch-norm statistics, no dropout)."""
        _, logits = self.forward(x, None, training=False)
        self._saved = {}
        return logits
