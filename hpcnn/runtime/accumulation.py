"""Gradient accumulation: one optimiser step from K micro-batches.

The global batch B of a step is split into K micro-batches of B/K samples,
consecutive in the batch (micro-batch k holds samples [k B/K, (k+1) B/K));
the network (and its plan) is built for the micro-batch.  Each micro-batch
runs forward and backward (its gradients summed over the replicas as in any
step); the gradients are summed over the micro-batches and divided by K,
and the optimiser takes one step.  Each micro-batch's loss is the mean over
its B/K samples, so the result is the gradient of the mean loss over all B
samples: for a network without batch norm the step equals one step on the
whole batch (to rounding).

What batch norm sees: each micro-batch is normalised with its own batch
statistics, over its B/K samples (summed over the ranks that split n, h or
w, as always), not over the B samples of the step; and the running
statistics are updated once per micro-batch, K times per optimiser step,
each time with the micro-batch's statistics and the layer's momentum.
Dropout masks are keyed by step * K + k, so every micro-batch draws its own.
"""
from __future__ import annotations


def accumulated_step(model, micro_batches, optimizer, lr=None, step: int = 0) -> float:
    """One optimiser step of ``model`` (a SequentialModel or a
    DistributedModel) from ``micro_batches``, a list of (input, labels):
    this rank's input tile (or the whole input for a sequential model) and
    the micro-batch's labels.  Returns the mean of the micro-batches'
    losses (the loss of the whole batch without batch norm).  With one
    micro-batch this is exactly ``model.train_step``."""
    k = len(micro_batches)
    if k < 1:
        raise ValueError("accumulated_step needs at least one micro-batch")
    total, loss = None, 0.0
    for i, (x, labels) in enumerate(micro_batches):
        value, _ = model.forward(x, labels, training=True, step=step * k + i)
        grads = model.backward()
        loss += value
        if k == 1:
            total = grads
        elif total is None:
            total = {n: {name: g.copy() for name, g in gs.items()} for n, gs in grads.items()}
        else:
            for n, gs in grads.items():
                for name, g in gs.items():
                    total[n][name] += g
    if k > 1:
        for gs in total.values():
            for g in gs.values():
                g *= 1.0 / k
    optimizer.step_nodes(model.params, total, lr)
    return loss / k
