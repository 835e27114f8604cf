"""Deterministic stratified train/test splits."""
from __future__ import annotations

import numpy as np

from hpcnn.data.hdf5_format import DataError


def stratified_split(labels, test_fraction: float, seed: int):
    """(train_idx, test_idx), each sorted: per class, round(fraction * count)
    samples (at least one when the class has two or more) go to the test
    split, chosen by a generator seeded with ``seed``."""
    labels = np.asarray(labels)
    if not 0 <= test_fraction < 1:
        raise DataError(f"test fraction must lie in [0, 1), got {test_fraction}")
    if test_fraction == 0:
        return np.arange(labels.size), np.arange(0)
    rng = np.random.default_rng(int(seed))
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(test_fraction * idx.size))
        if idx.size >= 2:
            k = min(max(k, 1), idx.size - 1)
        else:
            k = 0
        test.append(rng.permutation(idx)[:k])
    test = np.sort(np.concatenate(test)) if test else np.arange(0)
    train = np.setdiff1d(np.arange(labels.size), test)
    return train, test
