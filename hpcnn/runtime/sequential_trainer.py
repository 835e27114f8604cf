"""The minimal training loop of one process: a Graph, a data set of
mini-batches, SGD and a learning-rate schedule, with a test evaluation after
every epoch.  The job loop reuses it for single-process runs and as the
reference of distributed ones.

The data sets are duck-typed (this layer does not import hpcnn.data): they
need ``batch_size``, ``num_batches``, ``sample_shape``, ``num_samples``,
``read(epoch, index) -> (x, y)`` and, for overlap of reading and compute,
``prefetch(items)`` yielding objects with ``.x`` and ``.y``
(hpcnn.data.HDF5Dataset has all of these)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from hpcnn.backend import to_host
from hpcnn.runtime.sequential import SequentialModel


class TrainerError(ValueError):
    """A data set that does not fit the graph, or bad loop settings."""


@dataclass
class EpochMetrics:
    epoch: int
    loss: float                 # mean training loss over the epoch's batches
    train_accuracy: float       # on the training batches, in training mode
    test_loss: float | None
    test_accuracy: float | None
    lr: float                   # learning rate of the epoch's last step
    seconds: float              # training time of the epoch (evaluation excluded)
    samples_per_second: float


@dataclass
class TrainResult:
    epochs: list = field(default_factory=list)
    test_accuracy: float | None = None
    test_loss: float | None = None
    steps: int = 0
    model: SequentialModel | None = None

    def to_dict(self) -> dict:
        return {"epochs": [asdict(e) for e in self.epochs], "test_accuracy": self.test_accuracy,
                "test_loss": self.test_loss, "steps": self.steps}


def _check_fits(graph, ds, what):
    inp = graph[graph.input_name].shape
    if tuple(ds.sample_shape) != tuple(inp[1:]):
        raise TrainerError(f"{what} samples have shape {tuple(ds.sample_shape)} but graph "
                           f"{graph.name!r} takes {tuple(inp[1:])} (input {inp})")
    classes = graph[graph.logits_name].shape[1]
    if getattr(ds, "num_classes", classes) > classes:
        raise TrainerError(f"{what} has {ds.num_classes} classes but graph {graph.name!r} "
                           f"has {classes} outputs")


def _check_eval_data(ds, batch):
    if ds.batch_size != batch:
        raise TrainerError(f"evaluation batch size {ds.batch_size} differs from the graph's {batch}")
    left_out = ds.num_samples - ds.num_batches * ds.batch_size
    if left_out > 0:
        raise TrainerError(f"the evaluation data would leave out its last {left_out} samples: "
                           f"open it with drop_last=False")


def loss_and_accuracy(model: SequentialModel, ds) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` in inference mode over every sample
    of ``ds``.  A short last batch is padded to the graph's batch size with
    copies of its last sample, whose outputs are ignored (in inference mode
    samples do not interact, so this is exact)."""
    b = model.graph.batch
    _check_eval_data(ds, b)
    total_loss, correct, seen = 0.0, 0, 0
    for i in range(ds.num_batches):
        x, y = ds.read(0, i)
        k = x.shape[0]
        if k < b:
            x = np.concatenate([x, np.repeat(x[-1:], b - k, axis=0)])
        z = to_host(model.predict(x))[:k].astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        total_loss -= float(logp[np.arange(k), y].sum())
        correct += int((z.argmax(axis=1) == y).sum())
        seen += k
    return total_loss / max(seen, 1), correct / max(seen, 1)


def train_sequential(graph, dataset, epochs: int, optimizer, schedule=None, test_dataset=None,
                     dtype=np.float32, seed: int = 0, prefetch: bool = True, start_epoch: int = 0,
                     model: SequentialModel | None = None, on_epoch=None, eval_every: int = 1) -> TrainResult:
    """Train ``graph`` for ``epochs`` epochs on ``dataset``.

    optimizer : an hpcnn.runtime.optimizers optimiser (or anything with
                step_nodes(params, grads, lr)); one that needs norms is
                attached to the model here
    schedule  : callable step -> learning rate (hpcnn.runtime.lr_schedule.Schedule);
                None keeps the optimiser's lr
    test_dataset : evaluated after every ``eval_every`` epochs and at the end
    on_epoch  : called with each EpochMetrics (logging, checkpoints)
    Returns a TrainResult (per-epoch metrics, final test accuracy, the model)."""
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise TrainerError(f"epochs must be a positive integer, got {epochs!r}")
    if dataset.batch_size != graph.batch:
        raise TrainerError(f"data batch size {dataset.batch_size} differs from graph {graph.name!r}'s "
                           f"batch size {graph.batch}: build the graph with batch={dataset.batch_size}")
    if dataset.num_batches < 1:
        raise TrainerError("the training data set has no full batch")
    _check_fits(graph, dataset, "training data")
    if test_dataset is not None:
        _check_fits(graph, test_dataset, "test data")
        _check_eval_data(test_dataset, graph.batch)
    model = model or SequentialModel(graph, dtype=dtype, seed=seed)
    if getattr(optimizer, "needs_norms", False) and getattr(optimizer, "norms", None) is None:
        optimizer.attach(model)       # LARS, LAMB, clipping: norms of the model's whole tensors
    result = TrainResult(model=model)
    nb = dataset.num_batches
    step = start_epoch * nb
    for epoch in range(start_epoch, start_epoch + int(epochs)):
        items = [(epoch, i) for i in range(nb)]
        source = dataset.prefetch(items) if prefetch else (
            dataset.read(e, i) for e, i in items)
        t0 = time.perf_counter()
        losses, correct, seen, lr = [], 0, 0, None
        try:
            for batch in source:
                x, y = (batch.x, batch.y) if hasattr(batch, "x") else batch
                if x.shape[0] != graph.batch:
                    raise TrainerError(f"batch of {x.shape[0]} samples for a graph of batch {graph.batch} "
                                       f"(use drop_last=True for training)")
                lr = schedule(step) if schedule is not None else None
                loss, logits = model.forward(x, y, training=True, step=step)
                optimizer.step_nodes(model.params, model.backward(), lr)
                if not np.isfinite(loss):
                    raise TrainerError(f"the training loss became {loss} at epoch {epoch}, step {step}; "
                                       f"lower the learning rate")
                losses.append(loss)
                correct += int((to_host(logits).argmax(axis=1) == np.asarray(y)).sum())
                seen += x.shape[0]
                step += 1
        finally:
            if hasattr(source, "close"):
                source.close()
        secs = time.perf_counter() - t0
        test_loss = test_acc = None
        last = epoch == start_epoch + int(epochs) - 1
        if test_dataset is not None and (last or (epoch - start_epoch + 1) % max(1, eval_every) == 0):
            test_loss, test_acc = loss_and_accuracy(model, test_dataset)
        m = EpochMetrics(epoch=epoch, loss=float(np.mean(losses)), train_accuracy=correct / seen,
                         test_loss=test_loss, test_accuracy=test_acc,
                         lr=float(lr if lr is not None else getattr(optimizer, "lr", float("nan"))),
                         seconds=secs, samples_per_second=seen / secs if secs > 0 else float("inf"))
        result.epochs.append(m)
        if on_epoch is not None:
            on_epoch(m)
    result.steps = step
    if result.epochs and result.epochs[-1].test_accuracy is not None:
        result.test_accuracy = result.epochs[-1].test_accuracy
        result.test_loss = result.epochs[-1].test_loss
    return result
