"""The networks of the equivalence tests, from the model zoo, cached per
process (every rank builds the same graphs)."""
from __future__ import annotations

from hpcnn.models import build_model

_cache: dict = {}


def build(name, batch):
    key = (name, batch)
    if key not in _cache:
        _cache[key] = build_model(name, batch=batch)
    return _cache[key]


def regression(g) -> bool:
    """Whether the graph ends in a regression loss (float targets)."""
    return g[g.loss_name].kind == "mse"


def targets(g, rng):
    """Labels of one batch for ``g``: class indices, or float targets in
    (-1, 1) for a regression network."""
    k = g[g.logits_name].shape[1]
    if regression(g):
        return rng.uniform(-0.8, 0.8, size=(g.batch, k))
    return rng.integers(0, k, size=g.batch)
