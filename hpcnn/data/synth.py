"""Synthetic data files of any shape (ImageNet-shaped by default: uint8
3x224x224, 1000 classes): random images and labels, written block by block
so that files far larger than memory can be made.  The samples come in
units of ``chunk_rows(shape)`` samples (one HDF5 chunk); unit u of split s is
drawn from its own generator seeded by (seed, s, u), so the content depends
only on the seed, the shape and the dtype, not on the size of the write
blocks."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hpcnn.data.hdf5_format import DataError, ImageFileWriter, chunk_rows

BLOCK_BYTES = 64 << 20


def synth_block(rng, n, sample_shape, dtype, num_classes):
    if np.dtype(dtype) == np.uint8:
        x = rng.integers(0, 256, size=(n,) + tuple(sample_shape), dtype=np.uint8)
    else:
        x = rng.standard_normal(size=(n,) + tuple(sample_shape), dtype=np.float32)
    y = rng.integers(0, num_classes, size=n, dtype=np.int64)
    return x, y


def write_synth(path, n_train: int, n_test: int = 0, sample_shape=(3, 224, 224), num_classes: int = 1000,
                dtype=np.uint8, seed: int = 0, block_bytes: int = BLOCK_BYTES, progress=None) -> Path:
    """Write ``n_train`` (and ``n_test``) random samples.  With n_test = 0
    the file holds the 'train' split only."""
    sample_shape = tuple(int(s) for s in sample_shape)
    if len(sample_shape) != 3:
        raise DataError(f"sample shape must be C x H x W, got {sample_shape}")
    dtype = np.dtype(dtype)
    if dtype not in (np.uint8, np.float32):
        raise DataError(f"synthetic images are uint8 or float32, got {dtype}")
    if int(n_train) < 1 or int(n_test) < 0:
        raise DataError(f"need at least one training sample and no negative count, got "
                        f"{n_train} train and {n_test} test")
    if int(num_classes) < 1:
        raise DataError(f"num_classes must be positive, got {num_classes}")
    per = int(np.prod(sample_shape)) * dtype.itemsize
    unit = chunk_rows(sample_shape, dtype.itemsize)
    units_per_block = max(1, int(block_bytes // (per * unit)))
    src = (f"synthetic: uniform random {dtype.name} images {'x'.join(map(str, sample_shape))}, "
           f"uniform random labels in [0, {num_classes}), seed {seed}")
    with ImageFileWriter(path, int(num_classes), source=src) as w:
        for si, (group, n) in enumerate((("train", int(n_train)), ("test", int(n_test)))):
            if n == 0:
                continue
            s = w.split(group, n, sample_shape, dtype)
            n_units = -(-n // unit)
            for u0 in range(0, n_units, units_per_block):
                parts = []
                for u in range(u0, min(n_units, u0 + units_per_block)):
                    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, si, u])
                    parts.append(synth_block(rng, min(unit, n - u * unit), sample_shape, dtype,
                                             int(num_classes)))
                x = np.concatenate([p[0] for p in parts])
                s.append(x, np.concatenate([p[1] for p in parts]))
                if progress is not None:
                    progress(x.shape[0])
    return Path(path)
