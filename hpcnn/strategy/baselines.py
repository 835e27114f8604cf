"""The strategies layer-wise parallelism is compared with.  The job
(``plan.mode = "data-parallel"``), the benchmarks and the planner's
comparison all build them here, so one name means one plan:

data-parallel   every layer split over samples on min(ranks, batch) ranks;
model-parallel  every layer split over channels on all ranks ("channel split
                everywhere"); a layer that cannot split channels (the loss)
                splits samples instead;
owt             Krizhevsky's "one weird trick": layers with image outputs
                (convolution, pooling, their elementwise followers) data
                parallel, fully connected layers channel parallel, everything
                else (flatten, global pooling, loss) data parallel.

Model-parallel and OWT degrees are fitted by the rules of the searched space
(``config_space.fit_config``: a layer's rank count divides the job's or is a
power of two), so that they are admissible for their layer and the job.
Data parallelism is what a user means by it, all the samples' ranks, even
where the searched space would use fewer (10 of 12 ranks for a batch of
10); the cost model prices plans outside the searched space too.

Every baseline is built per fold group of the search
(``config_space.fold_groups``): the group's configuration comes from its
root's shape and splittable dimensions, and the elementwise ops folded into
it (ReLU, batch norm, dropout) inherit it, as in the search.
"""
from __future__ import annotations

from hpcnn.strategy.config_space import LayerGroup, fit_config, fold_groups
from hpcnn.strategy.plan import Plan


def _build(graph, ranks: int, name: str, config_of) -> Plan:
    """A plan with ``config_of(group, root node)`` for every fold group."""
    groups, _ = fold_groups(graph)
    configs = {}
    for grp in groups:
        cfg = config_of(grp, graph[grp.root])
        for member in grp.members:
            configs[member] = dict(cfg)
    return Plan(graph.name, ranks, graph.batch, configs, name=name)


def _fitted(ranks: int, want):
    """config_of for a wanted configuration ``want(root node)`` fitted by
    the searched space's rules."""
    def config_of(grp: LayerGroup, root) -> dict:
        return fit_config(grp.shape, grp.splittable, ranks, want(root))
    return config_of


def data_parallel(graph, ranks: int) -> Plan:
    """Every layer split over samples on min(ranks, batch) ranks."""
    def config_of(grp: LayerGroup, root) -> dict:
        return {"n": min(ranks, grp.shape[0]) if "n" in grp.splittable else 1}
    return _build(graph, ranks, "data-parallel", config_of)


def model_parallel(graph, ranks: int) -> Plan:
    def want(n):
        return {"c": ranks} if "c" in n.op.splittable and len(n.shape) >= 2 else {"n": ranks}
    return _build(graph, ranks, "model-parallel", _fitted(ranks, want))


def owt(graph, ranks: int) -> Plan:
    def want(n):
        if n.kind == "linear":
            return {"c": ranks}
        return {"n": ranks}
    return _build(graph, ranks, "owt", _fitted(ranks, want))


BASELINES = {"data-parallel": data_parallel, "model-parallel": model_parallel, "owt": owt}


def baselines(graph, ranks: int) -> dict[str, Plan]:
    return {k: f(graph, ranks) for k, f in BASELINES.items()}
