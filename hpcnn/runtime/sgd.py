"""SGD with momentum, Nesterov momentum and weight decay (PyTorch's update
rule, dampening 0).  Works on any shard of a parameter: the update is
elementwise, so every rank updates its own slice and replicas stay equal."""
from __future__ import annotations


class SGD:
    def __init__(self, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0):
        if lr <= 0:
            raise ValueError(f"optimiser lr must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"optimiser momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"optimiser weight_decay must be non-negative, got {weight_decay}")
        if nesterov and momentum == 0:
            raise ValueError("optimiser nesterov needs a positive momentum")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.weight_decay = float(weight_decay)
        self.state: dict = {}      # key -> momentum buffer

    def step(self, params: dict, grads: dict, lr: float | None = None) -> None:
        """Update ``params[key]`` in place from ``grads[key]`` for every key
        in grads."""
        lr = self.lr if lr is None else float(lr)
        for key, g in grads.items():
            p = params[key]
            if self.weight_decay:
                g = g + self.weight_decay * p
            if self.momentum:
                buf = self.state.get(key)
                if buf is None:
                    buf = self.state[key] = g.copy()
                else:
                    buf *= self.momentum
                    buf += g
                g = g + self.momentum * buf if self.nesterov else buf
            p -= lr * g

    def step_nodes(self, params: dict, grads: dict, lr: float | None = None) -> None:
        """``step`` for parameters and gradients held per layer, as the
        models hold them: {node: {name: array}}; the state is keyed
        'node.name'."""
        self.step({f"{n}.{k}": v for n, ps in params.items() for k, v in ps.items()},
                  {f"{n}.{k}": v for n, gs in grads.items() for k, v in gs.items()}, lr)

    def state_dict(self) -> dict:
        return {"momentum_buffer": dict(self.state)}
