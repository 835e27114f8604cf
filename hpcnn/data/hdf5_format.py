"""The HDF5 layout of hpcnn image data sets (docs/data-format.md) and a
writer that fills it block by block, so that files larger than memory can
be written.

    /                     attrs: format, format_version, num_classes, source,
                                 mean (C,), std (C,), class_names (optional)
    /train/images         (N, C, H, W) uint8 or float32, chunked along N
                          (volumes: (N, C, D, H, W))
    /train/labels         (N,) int64 in [0, num_classes); a regression data
                          set (root attr task = "regression") holds float32
                          targets (N, num_classes) instead
    /test/images, /test/labels   (same)

A file may instead hold a single split as /images and /labels.
``mean`` and ``std`` are per channel, in the units of the stored values
(0..255 for uint8), computed on the training split; the reader feeds the
network (x - mean[c]) / std[c].
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

FORMAT = "hpcnn-images"
FORMAT_VERSION = 1
IMAGES = "images"
LABELS = "labels"
CHUNK_BYTES = 1 << 20          # about 1 MiB of images per chunk
STORED_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))


class DataError(ValueError):
    """Bad data: a file, group or dataset that is missing or malformed, or a
    request that does not fit the data.  The message names the file, the
    dataset and the value."""


class DataFileNotFound(DataError, FileNotFoundError):
    """The data file does not exist."""


def chunk_rows(sample_shape, itemsize: int, target_bytes: int = CHUNK_BYTES) -> int:
    """Samples per chunk: about ``target_bytes`` of images, at least one."""
    per = int(np.prod(sample_shape)) * int(itemsize)
    return max(1, int(target_bytes // max(1, per)))


def parse_shape(text: str, what="shape") -> tuple:
    """'3x224x224' (or '3,224,224') -> (3, 224, 224)."""
    parts = str(text).lower().replace(",", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise DataError(f"{what} must look like 3x224x224, got {text!r}") from None
    if any(d < 1 for d in dims):
        raise DataError(f"{what} must have positive sizes, got {text!r}")
    return dims


class _ChannelStats:
    """Running per-channel sum and sum of squares (float64)."""

    def __init__(self, channels):
        self.n = 0
        self.s = np.zeros(channels)
        self.ss = np.zeros(channels)

    def add(self, images):
        x = np.asarray(images, dtype=np.float64)
        axes = (0,) + tuple(range(2, x.ndim))          # every axis but the channels
        self.n += x.size // max(1, x.shape[1])
        self.s += x.sum(axis=axes)
        self.ss += np.square(x).sum(axis=axes)

    def mean_std(self):
        if self.n == 0:
            return None, None
        mean = self.s / self.n
        var = np.maximum(self.ss / self.n - mean ** 2, 0.0)
        std = np.sqrt(var)
        return mean, np.where(std > 0, std, 1.0)


class SplitWriter:
    """Fills one split (group) of an image file, block by block, in order."""

    def __init__(self, h5, group: str, n: int, sample_shape, dtype, num_classes, stats,
                 task="classification"):
        self.group_name = group
        self.n = int(n)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.dtype = np.dtype(dtype)
        self.num_classes = num_classes
        self.stats = stats
        self.task = task
        if len(self.sample_shape) not in (3, 4):
            raise DataError(f"images are stored as N x C x H x W (volumes N x C x D x H x W); got a "
                            f"sample shape {self.sample_shape}")
        if self.dtype not in STORED_DTYPES:
            raise DataError(f"images are stored as uint8 or float32, got {self.dtype}")
        if self.n < 1:
            raise DataError(f"split {group!r} would be empty")
        g = h5 if group in ("", "/") else h5.create_group(group)
        rows = min(self.n, chunk_rows(self.sample_shape, self.dtype.itemsize))
        self.images = g.create_dataset(IMAGES, shape=(self.n,) + self.sample_shape, dtype=self.dtype,
                                       chunks=(rows,) + self.sample_shape)
        if task == "regression":        # float targets, num_classes of them per sample
            self.labels = g.create_dataset(LABELS, shape=(self.n, num_classes), dtype=np.float32)
        else:
            self.labels = g.create_dataset(LABELS, shape=(self.n,), dtype=np.int64)
        self.pos = 0

    def append(self, images, labels):
        images = np.asarray(images)
        labels = np.asarray(labels)
        k = images.shape[0]
        if images.shape[1:] != self.sample_shape:
            raise DataError(f"split {self.group_name!r}: a block of images has sample shape "
                            f"{images.shape[1:]}, expected {self.sample_shape}")
        if self.task == "regression":
            self._append_targets(images, labels, k)
            return
        if labels.shape != (k,):
            raise DataError(f"split {self.group_name!r}: {k} images but labels of shape {labels.shape}")
        if labels.dtype.kind not in "iu":
            raise DataError(f"split {self.group_name!r}: labels must be integers, got dtype {labels.dtype}")
        if self.pos + k > self.n:
            raise DataError(f"split {self.group_name!r}: {self.pos + k} samples written, only {self.n} declared")
        if k and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DataError(f"split {self.group_name!r}: labels must lie in [0, {self.num_classes}), "
                            f"got values in [{labels.min()}, {labels.max()}]")
        if self.dtype == np.uint8 and images.dtype != np.uint8:
            raise DataError(f"split {self.group_name!r}: uint8 split given {images.dtype} images")
        self.images[self.pos:self.pos + k] = images.astype(self.dtype, copy=False)
        self.labels[self.pos:self.pos + k] = labels.astype(np.int64)
        if self.stats is not None:
            self.stats.add(images)
        self.pos += k

    def _append_targets(self, images, targets, k):
        if targets.shape != (k, self.num_classes):
            raise DataError(f"split {self.group_name!r}: {k} samples need targets of shape "
                            f"({k}, {self.num_classes}), got {targets.shape}")
        if targets.dtype.kind != "f" or not np.all(np.isfinite(targets)):
            raise DataError(f"split {self.group_name!r}: regression targets must be finite floats, "
                            f"got dtype {targets.dtype}")
        if self.pos + k > self.n:
            raise DataError(f"split {self.group_name!r}: {self.pos + k} samples written, only {self.n} declared")
        self.images[self.pos:self.pos + k] = images.astype(self.dtype, copy=False)
        self.labels[self.pos:self.pos + k] = targets.astype(np.float32)
        if self.stats is not None:
            self.stats.add(images)
        self.pos += k

    def check_complete(self):
        if self.pos != self.n:
            raise DataError(f"split {self.group_name!r}: {self.pos} of {self.n} samples were written")


class ImageFileWriter:
    """Writes an image data set file.  The file appears at ``path`` only when
    ``close()`` succeeds (it is written to ``path + '.tmp'`` first), so an
    interrupted conversion never leaves a half-written file behind.

        with ImageFileWriter(path, num_classes=10, source="...") as w:
            s = w.split("train", n, (1, 16, 16), np.uint8)
            s.append(images, labels)
    """

    def __init__(self, path, num_classes: int, source: str = "", class_names=None,
                 mean=None, std=None, task: str = "classification", target_names=None):
        import h5py
        if task not in ("classification", "regression"):
            raise DataError(f"task must be 'classification' or 'regression', got {task!r}")
        self.task = task
        self.target_names = None if target_names is None else [str(t) for t in target_names]
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(num_classes, bool) or int(num_classes) < 1:
            raise DataError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)
        if class_names is not None:
            class_names = [str(c) for c in class_names]
            if len(class_names) != self.num_classes:
                raise DataError(f"{len(class_names)} class names for {self.num_classes} classes")
        self.class_names = class_names
        self.source = str(source)
        self.fixed_mean, self.fixed_std = mean, std
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.h5 = h5py.File(self.tmp, "w")
        self.splits: list[SplitWriter] = []
        self.stats = None

    def split(self, group: str, n: int, sample_shape, dtype) -> SplitWriter:
        """A new split; statistics come from the first one written (the
        training split by convention) unless mean/std were given."""
        if group in ("", "/") and self.splits or any(s.group_name in ("", "/") for s in self.splits):
            raise DataError("a single-split file (/images, /labels) cannot hold other splits")
        stats = None
        if not self.splits and self.fixed_mean is None:
            stats = self.stats = _ChannelStats(int(sample_shape[0]))
        w = SplitWriter(self.h5, group, n, sample_shape, dtype, self.num_classes, stats, self.task)
        self.splits.append(w)
        return w

    def close(self):
        try:
            for s in self.splits:
                s.check_complete()
            if not self.splits:
                raise DataError("no split was written")
            if self.fixed_mean is not None:
                mean, std = np.asarray(self.fixed_mean, float), np.asarray(self.fixed_std, float)
            else:
                mean, std = self.stats.mean_std()
            a = self.h5.attrs
            a["format"] = FORMAT
            a["format_version"] = FORMAT_VERSION
            a["num_classes"] = self.num_classes
            a["source"] = self.source
            a["mean"] = np.asarray(mean, dtype=np.float64)
            a["std"] = np.asarray(std, dtype=np.float64)
            if self.class_names is not None:
                import h5py
                a["class_names"] = np.array(self.class_names, dtype=h5py.string_dtype())
            if self.task == "regression":
                import h5py
                a["task"] = "regression"
                if self.target_names is not None:
                    a["target_names"] = np.array(self.target_names, dtype=h5py.string_dtype())
            self.h5.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self):
        try:
            self.h5.close()
        finally:
            if self.tmp.exists():
                self.tmp.unlink()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def write_arrays(path, splits: dict, num_classes: int | None = None, source: str = "",
                 class_names=None, block: int = 4096) -> Path:
    """Write in-memory splits {'train': (images, labels), 'test': ...} (or
    {'/': (images, labels)} for a single split).  Images N x C x H x W, uint8
    or float (stored as float32).  Statistics come from the first split."""
    if not splits:
        raise DataError("nothing to write: no splits given")
    if num_classes is None:
        num_classes = int(max(int(np.max(l)) for _, l in splits.values() if len(l))) + 1
    with ImageFileWriter(path, num_classes, source, class_names) as w:
        for group, (images, labels) in splits.items():
            images = np.asarray(images)
            dtype = np.uint8 if images.dtype == np.uint8 else np.float32
            s = w.split(group, images.shape[0], images.shape[1:], dtype)
            for i in range(0, images.shape[0], block):
                s.append(images[i:i + block], np.asarray(labels)[i:i + block])
    return Path(path)
