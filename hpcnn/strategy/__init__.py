"""Configuration space, cost model, search and plans.  Never touches MPI."""
from hpcnn.strategy.plan import Plan, PlanError, data_parallel, uniform_plan

__all__ = ["Plan", "PlanError", "data_parallel", "uniform_plan"]
