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
