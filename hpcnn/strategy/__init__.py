"""Configuration space, cost model, search and plans.  Never touches MPI.

    >>> from hpcnn.strategy import search_plan
    >>> plan, report = search_plan(graph, ranks=4, machine="paper_p100_cluster")
"""
from hpcnn.strategy.baselines import data_parallel
from hpcnn.strategy.plan import Plan, PlanError, uniform_plan


def search_plan(graph, ranks, machine, memory=None, **kw):
    """Search the per-layer plan; see hpcnn.strategy.planner.search_plan."""
    from hpcnn.strategy.planner import search_plan as _search
    return _search(graph, ranks, machine, memory, **kw)


__all__ = ["Plan", "PlanError", "data_parallel", "uniform_plan", "search_plan"]
