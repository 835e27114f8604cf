"""The strategies layer-wise parallelism is compared with, built by the same
configuration rules as the searched space (``config_space.fit_config``), so
that every degree is admissible for its layer and the job:

data-parallel   every layer split over samples on all ranks;
model-parallel  every layer split over channels on all ranks ("channel split
                everywhere"); a layer that cannot split channels (the loss)
                splits samples instead;
owt             Krizhevsky's "one weird trick": layers with image outputs
                (convolution, pooling, their elementwise followers) data
                parallel, fully connected layers channel parallel, everything
                else (flatten, global pooling, loss) data parallel.

Folded elementwise ops (ReLU, batch norm, dropout) take their producer's
configuration in every baseline, as in the search.
"""
from __future__ import annotations

from hpcnn.strategy.config_space import FOLDABLE_KINDS, fit_config
from hpcnn.strategy.plan import Plan


def _build(graph, ranks: int, name: str, want) -> Plan:
    configs = {}
    for n in graph:
        if n.kind in FOLDABLE_KINDS and len(n.inputs) == 1 and n.inputs[0] in configs \
                and tuple(graph[n.inputs[0]].shape) == tuple(n.shape):
            cfg = dict(configs[n.inputs[0]])
            if all(v == 1 or d in n.op.splittable for d, v in cfg.items()):
                configs[n.name] = cfg
                continue
        configs[n.name] = fit_config(n.shape, n.op.splittable, ranks, want(n))
    return Plan(graph.name, ranks, graph.batch, configs, name=name)


def data_parallel(graph, ranks: int) -> Plan:
    return _build(graph, ranks, "data-parallel", lambda n: {"n": ranks})


def model_parallel(graph, ranks: int) -> Plan:
    def want(n):
        return {"c": ranks} if "c" in n.op.splittable and len(n.shape) >= 2 else {"n": ranks}
    return _build(graph, ranks, "model-parallel", want)


def owt(graph, ranks: int) -> Plan:
    def want(n):
        if n.kind == "linear":
            return {"c": ranks}
        return {"n": ranks}
    return _build(graph, ranks, "owt", want)


BASELINES = {"data-parallel": data_parallel, "model-parallel": model_parallel, "owt": owt}


def baselines(graph, ranks: int) -> dict[str, Plan]:
    return {k: f(graph, ranks) for k, f in BASELINES.items()}
