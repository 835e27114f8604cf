"""Reading an hpcnn HDF5 image file (docs/data-format.md) batch by batch,
each rank reading only its own box.

A batch is named by (epoch, index).  Its samples are a slice of a per-epoch
permutation that is a pure function of (seed, epoch), so every rank agrees
on it without communication.  A rank that holds a box of the input tensor
(its samples of the batch and, when the input layer is split over c, h, w,
only those channels and rows and columns) reads exactly that hyperslab from
the file: h5py needs increasing indices, so the sample indices are read in
sorted order and put back in batch order in memory.  uint8 images are
turned into floats as (x - mean[c]) / std[c].  ``prefetch`` reads the next
batches in a background thread so that reading overlaps compute.

With a ``transform`` (hpcnn.data.augment.Augmentation: random resized crop,
flip, resize and centre crop) a box refers to the network's input, the
transformed images: each sample is read on its own, only the stored rows,
columns and channels its part of the box interpolates, and transformed as a
pure function of (seed, epoch, file row).

No MPI here: the caller passes the box (hpcnn.parallel.box.Box) of its tile.
"""
from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict, namedtuple
from pathlib import Path

import numpy as np

from hpcnn.data.hdf5_format import IMAGES, LABELS, DataError, DataFileNotFound
from hpcnn.parallel.box import Box

Batch = namedtuple("Batch", "epoch index x y")

CACHE_BYTES = 64 << 20     # HDF5 chunk cache of the reader


def _attr(node, key, default=None):
    v = node.attrs.get(key, default)
    if isinstance(v, bytes):
        v = v.decode()
    return v


class HDF5Dataset:
    """One split of an image file, served as mini-batches.

    path       : the HDF5 file
    group      : 'train', 'test', '/' (a single-split file) or None: 'train'
                 when the file has it, else the single split
    batch_size : samples per batch
    shuffle    : a new permutation every epoch (seeded by (seed, epoch))
    drop_last  : drop the last partial batch (the default: graphs have a
                 fixed batch size); with False it is served short
    normalize  : (x - mean) / std per channel; False gives the raw values
    dtype      : float dtype of the batches
    transform  : an hpcnn.data.augment.Augmentation, or None (images as stored)
    mean, std  : per-channel values (in the units of the stored values) that
                 replace the file's attributes; None: the file's
    """

    def __init__(self, path, group=None, batch_size=32, shuffle=True, seed=0, drop_last=True,
                 normalize=True, dtype=np.float32, transform=None, mean=None, std=None):
        import h5py
        self.path = Path(path)
        if not self.path.exists():
            raise DataFileNotFound(f"data file {str(self.path)!r} does not exist; make one with "
                                   f"'hpcnn data digits -o {self.path}', 'hpcnn data convert' or "
                                   f"'hpcnn data synth'")
        if self.path.is_dir():
            raise DataError(f"data file {str(self.path)!r} is a directory; convert a folder of images "
                            f"with 'hpcnn data convert {self.path} -o FILE.h5'")
        try:
            # best-effort locking: many ranks open the file read-only at once,
            # and some parallel file systems do not support locks at all
            self._h5 = h5py.File(self.path, "r", rdcc_nbytes=CACHE_BYTES, locking="best-effort")
        except OSError as exc:
            raise DataError(f"data file {str(self.path)!r} is not a readable HDF5 file ({exc})") from None
        try:
            self._open(group, batch_size, shuffle, seed, drop_last, normalize, dtype, mean, std)
            self._set_transform(transform)
        except BaseException:
            self._h5.close()
            raise
        self._perm_cache: OrderedDict = OrderedDict()
        self._perm_lock = threading.Lock()

    # ---- opening and validation ------------------------------------------
    def _open(self, group, batch_size, shuffle, seed, drop_last, normalize, dtype, mean_override=None,
              std_override=None):
        import h5py
        f = self._h5
        where = f"data file {str(self.path)!r}"
        if group is None:
            group = "train" if "train" in f else "/"
        group = str(group)
        if group not in ("", "/") and group not in f:
            have = [k for k in f if isinstance(f[k], h5py.Group)]
            raise DataError(f"{where} has no group {group!r}; its groups are {have or 'none'}"
                            f"{' (and a single split at /)' if IMAGES in f else ''}")
        g = f if group in ("", "/") else f[group]
        if not isinstance(g, h5py.Group):
            raise DataError(f"{where}: {group!r} is a dataset, not a group of images and labels")
        self.group = "/" if group in ("", "/") else group
        for key in (IMAGES, LABELS):
            if key not in g or not isinstance(g[key], h5py.Dataset):
                have = list(g.keys())
                raise DataError(f"{where}: group {self.group!r} has no dataset {key!r} (it has {have}); "
                                f"see docs/data-format.md")
        images, labels = g[IMAGES], g[LABELS]
        name = f"{where}, dataset {images.name!r}"
        if images.ndim not in (4, 5):
            hint = " (add a channel axis: N x 1 x H x W)" if images.ndim == 3 else ""
            raise DataError(f"{name} must be 4-dimensional N x C x H x W, got shape {images.shape}{hint} "
                            f"(or 5-dimensional N x C x D x H x W for volumes)")
        if images.dtype != np.uint8 and images.dtype.kind != "f":
            raise DataError(f"{name} must hold uint8 or floating-point values, got {images.dtype}")
        if images.shape[0] < 1 or min(images.shape[1:]) < 1:
            raise DataError(f"{name} is empty (shape {images.shape})")
        lname = f"{where}, dataset {labels.name!r}"
        self.task = "regression" if _attr(f, "task", "classification") == "regression" else "classification"
        if labels.shape[:1] != images.shape[:1]:
            raise DataError(f"{lname} has {labels.shape[0]} labels but {images.name!r} has "
                            f"{images.shape[0]} images")
        if self.task == "regression":
            if labels.ndim != 2 or labels.dtype.kind != "f":
                raise DataError(f"{lname} of a regression data set must hold float targets N x K, "
                                f"got shape {labels.shape} and dtype {labels.dtype}")
            self.labels = labels[...].astype(np.float32)
            self.num_classes = int(labels.shape[1])        # the network's outputs
            names = _attr(f, "target_names")
            self.target_names = None if names is None else [
                n.decode() if isinstance(n, bytes) else str(n) for n in names]
        else:
            self._class_labels(g, f, labels, lname)
        self._images = images
        self.num_samples = int(images.shape[0])
        self.sample_shape = tuple(int(s) for s in images.shape[1:])
        self.stored_shape = self.sample_shape
        self.stored_dtype = images.dtype
        c = self.sample_shape[0]
        names = _attr(g, "class_names", _attr(f, "class_names"))
        self.class_names = None if names is None else [n.decode() if isinstance(n, bytes) else str(n)
                                                       for n in names]
        self.source = _attr(f, "source", "")
        mean = _attr(g, "mean", _attr(f, "mean"))
        std = _attr(g, "std", _attr(f, "std"))
        if mean is None or std is None:
            mean, std = np.zeros(c), np.full(c, 255.0 if images.dtype == np.uint8 else 1.0)
        for key, value in (("mean", mean_override), ("std", std_override)):
            if value is None:
                continue
            if np.size(value) not in (1, c):
                raise DataError(f"augment.{key} must have one value per channel ({c}) of {where}, "
                                f"got {list(np.ravel(value))}")
            if key == "mean":
                mean = value
            else:
                std = value
        mean = np.broadcast_to(np.asarray(mean, dtype=np.float64).reshape(-1), (c,)) \
            if np.size(mean) in (1, c) else None
        std = np.broadcast_to(np.asarray(std, dtype=np.float64).reshape(-1), (c,)) \
            if np.size(std) in (1, c) else None
        if mean is None or std is None:
            raise DataError(f"{where}: attributes mean/std must have one value per channel ({c})")
        if not np.all(std > 0):
            raise DataError(f"{where}: attribute std must be positive, got {std.tolist()}")
        self.mean, self.std = mean.copy(), std.copy()
        self.normalize = bool(normalize)
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise DataError(f"batches are float32 or float64, got dtype {self.dtype}")
        self._scale = (1.0 / self.std).astype(self.dtype)
        self._shift = (-self.mean / self.std).astype(self.dtype)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        if self.drop_last and self.batch_size > self.num_samples:
            raise DataError(f"batch_size {self.batch_size} is larger than the {self.num_samples} samples "
                            f"of group {self.group!r} in {where}; use a smaller batch or drop_last=False")

    def _class_labels(self, g, f, labels, lname):
        """Integer class labels in [0, num_classes)."""
        if labels.ndim != 1:
            raise DataError(f"{lname} must be 1-dimensional (N,), got shape {labels.shape}")
        if labels.dtype.kind not in "iu":
            raise DataError(f"{lname} must hold integers, got {labels.dtype}")
        self.labels = labels[...].astype(np.int64)
        num_classes = _attr(g, "num_classes", _attr(f, "num_classes"))
        if num_classes is None:
            num_classes = int(self.labels.max()) + 1
        self.num_classes = int(num_classes)
        self.target_names = None
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= self.num_classes))
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{lname}: label {int(self.labels[i])} of sample {i} is outside "
                            f"[0, {self.num_classes}) ({bad.size} labels out of range); "
                            f"fix the labels or the num_classes attribute")

    def _set_transform(self, transform):
        """Images as the network sees them: ``sample_shape`` becomes the
        transformed shape; a transform that changes nothing is dropped."""
        self.transform = None
        if transform is None:
            return
        hw = self.stored_shape[1:]
        if len(hw) != 2:
            if not transform.random and not transform.resize and transform.size is None:
                return                          # nothing to do: volumes are fed as stored
            raise DataError(f"data file {str(self.path)!r}, group {self.group!r} holds volumes "
                            f"{'x'.join(map(str, self.stored_shape))}: the augmentations (crops, flips, "
                            f"resizing) are for images; remove the job's [augment] section")
        try:
            transform.check(hw, where=f"data file {str(self.path)!r}, group {self.group!r}: ")
        except ValueError as exc:
            raise DataError(str(exc)) from None
        self.sample_shape = (self.stored_shape[0],) + tuple(int(s) for s in transform.out_hw(hw))
        if not transform.is_identity(hw):
            self.transform = transform

    # ---- batches -------------------------------------------------------------
    @property
    def num_batches(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def __len__(self):
        return self.num_batches

    def batch_len(self, index: int) -> int:
        """Samples in batch ``index`` (the last one may be short)."""
        self._check_index(index)
        return min(self.batch_size, self.num_samples - index * self.batch_size)

    def batch_shape(self, index: int = 0) -> tuple:
        """(n, C, H, W) of batch ``index``: the tensor a box refers to."""
        return (self.batch_len(index),) + self.sample_shape

    def _check_index(self, index):
        if not 0 <= int(index) < self.num_batches:
            raise DataError(f"batch index {index} is outside [0, {self.num_batches}) for group "
                            f"{self.group!r} of {str(self.path)!r}")

    def permutation(self, epoch: int) -> np.ndarray:
        """Sample order of ``epoch``: identical on every rank and every run
        for the same seed, different from epoch to epoch."""
        epoch = int(epoch)
        if not self.shuffle:
            return np.arange(self.num_samples)
        with self._perm_lock:
            p = self._perm_cache.get(epoch)
            if p is None:
                p = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, 0x68]).permutation(
                    self.num_samples)
                self._perm_cache[epoch] = p
                while len(self._perm_cache) > 2:
                    self._perm_cache.popitem(last=False)
            return p

    def batch_indices(self, epoch: int, index: int) -> np.ndarray:
        """Sample indices (file rows) of batch ``index`` of ``epoch``, in batch order."""
        self._check_index(index)
        lo = int(index) * self.batch_size
        return self.permutation(epoch)[lo:lo + self.batch_size]

    def batch_labels(self, epoch: int, index: int, nrange=None) -> np.ndarray:
        """Labels of the batch (or of its samples [n0, n1))."""
        y = self.labels[self.batch_indices(epoch, index)]
        return y if nrange is None else y[nrange[0]:nrange[1]]

    def batches(self, epoch: int) -> list:
        """(epoch, index) of every batch of ``epoch``."""
        return [(int(epoch), i) for i in range(self.num_batches)]

    def _box(self, box, index) -> Box:
        shape = self.batch_shape(index)
        if box is None:
            return Box.full(shape)
        try:
            b = Box(box)
        except (TypeError, ValueError, IndexError):
            raise DataError(f"box must be ((n0, n1), (c0, c1), (h0, h1), (w0, w1)), got {box!r}") from None
        if b.ndim != len(shape) or not Box.full(shape).contains(b) or any(hi < lo for lo, hi in b):
            raise DataError(f"box {b!r} does not lie inside batch {index} of shape {shape} "
                            f"({'N x C x D x H x W' if len(shape) == 5 else 'N x C x H x W'}) of "
                            f"{str(self.path)!r}")
        return b

    def read(self, epoch: int, index: int, box=None):
        """(x, y): the ``box`` (default: all) of batch ``index`` of ``epoch``
        as floats, and the labels of the box's samples."""
        b = self._box(box, index)
        idx = self.batch_indices(epoch, index)[b[0][0]:b[0][1]]
        x = self.read_rows(idx, b[1:], epoch)
        return x, self.labels[idx]

    def read_rows(self, rows, chw=None, epoch: int = 0) -> np.ndarray:
        """Images of file rows ``rows`` (any order, repeats allowed),
        restricted to the (c, h, w) ranges ``chw`` ((c, d, h, w) for
        volumes: a rank reads only its 3-D box) of the network's input,
        converted to floats (and transformed as at ``epoch``)."""
        if self.transform is not None:
            x = self._read_transformed(rows, chw, epoch)
        else:
            x = self.read_raw(rows, chw).astype(self.dtype)
        if self.normalize:
            c0 = 0 if chw is None else chw[0][0]
            c1 = c0 + x.shape[1]
            per = (-1,) + (1,) * (x.ndim - 2)          # broadcast over the spatial axes
            x *= self._scale[c0:c1].reshape(per)
            x += self._shift[c0:c1].reshape(per)
        return x

    def _read_transformed(self, rows, chw, epoch) -> np.ndarray:
        """The transformed images of ``rows`` in the box ``chw`` of the
        network's input: each sample's stored pixels that box interpolates,
        one hyperslab per sample."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if chw is None:
            chw = tuple((0, s) for s in self.sample_shape)
        (c0, c1), hbox, wbox = (tuple(int(v) for v in r) for r in chw)
        out = np.empty((rows.size, max(0, c1 - c0), max(0, hbox[1] - hbox[0]), max(0, wbox[1] - wbox[0])),
                       dtype=self.dtype)
        if out.size == 0:
            return out
        if rows.min() < 0 or rows.max() >= self.num_samples:
            raise DataError(f"rows must lie in [0, {self.num_samples}), got [{rows.min()}, {rows.max()}]")
        hw = self.stored_shape[1:]
        done: dict = {}
        for i, r in enumerate(rows.tolist()):
            if r in done:                       # a repeated row (padding): the same pixels
                out[i] = out[done[r]]
                continue
            view = self.transform.view(epoch, r, hw)
            (r0, r1), (q0, q1) = view.source(hbox, wbox)
            window = self._images[r, c0:c1, r0:r1, q0:q1]
            out[i] = view.apply(window, (r0, q0), hbox, wbox, self.dtype)
            done[r] = i
        return out

    def read_raw(self, rows, chw=None) -> np.ndarray:
        """Stored values (uint8 or float) of file rows ``rows`` in the given
        order, restricted to ``chw``.  The rows are sorted and coalesced into
        runs of consecutive rows; each run is one hyperslab read straight into
        the result, which is then put back in the requested order.  (One
        h5py fancy-indexed read of the sorted rows selects the same data but
        builds an HDF5 union of hyperslabs, which is two orders of magnitude
        slower for ImageNet-sized samples.)"""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if chw is None:
            chw = tuple((0, s) for s in self.sample_shape)
        sl = tuple(slice(int(lo), int(hi)) for lo, hi in chw)
        shape = tuple(max(0, s.stop - s.start) for s in sl)
        if rows.size == 0 or 0 in shape:
            return np.empty((rows.size,) + shape, dtype=self.stored_dtype)
        if rows.min() < 0 or rows.max() >= self.num_samples:
            raise DataError(f"rows must lie in [0, {self.num_samples}), got [{rows.min()}, {rows.max()}]")
        uniq, inverse = np.unique(rows, return_inverse=True)
        data = np.empty((uniq.size,) + shape, dtype=self.stored_dtype)
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [uniq.size]))
        for a, b in zip(starts.tolist(), ends.tolist()):
            lo = int(uniq[a])
            data[a:b] = self._images[(slice(lo, lo + (b - a)),) + sl]
        if uniq.size == rows.size and np.array_equal(uniq, rows):
            return data
        return data[inverse.reshape(-1)]

    # ---- prefetch --------------------------------------------------------------
    def prefetch(self, items, box=None, depth: int = 2) -> "Prefetcher":
        """Read the batches ``items`` ((epoch, index) pairs) in a background
        thread, ``depth`` batches ahead.  ``box`` is one Box for every batch
        or a function (epoch, index) -> Box."""
        return Prefetcher(self, items, box, depth)

    # ---- lifetime ----------------------------------------------------------------
    def close(self):
        if getattr(self, "_h5", None) is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        return (f"HDF5Dataset({str(self.path)!r}, group={self.group!r}, samples={self.num_samples}, "
                f"sample_shape={self.sample_shape}, classes={self.num_classes}, batch_size={self.batch_size})")


_END = object()


class _Failure:
    def __init__(self, exc):
        self.exc = exc


class Prefetcher:
    """Iterator of Batch(epoch, index, x, y) read ahead by one thread through
    a bounded queue.  An exception in the thread is raised by the iterator
    (the original exception, with a note saying it came from the prefetch
    thread).  ``close()`` (or leaving a ``with`` block) stops the thread
    promptly even when the consumer stops early."""

    def __init__(self, dataset: HDF5Dataset, items, box=None, depth: int = 2):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise DataError(f"prefetch depth must be a positive integer, got {depth!r}")
        self.dataset = dataset
        self._items = iter(items)
        self._box = box
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._work, name="hpcnn-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _work(self):
        try:
            for epoch, index in self._items:
                if self._stop.is_set():
                    return
                box = self._box(epoch, index) if callable(self._box) else self._box
                x, y = self.dataset.read(epoch, index, box)
                if not self._put(Batch(epoch, index, x, y)):
                    return
        except BaseException as exc:  # handed to the consumer
            self._put(_Failure(exc))
            return
        self._put(_END)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._q.get(timeout=0.5)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._q.empty():
                    self._done = True
                    raise StopIteration from None
        if item is _END:
            self._done = True
            self._thread.join()
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            self._thread.join()
            exc = item.exc
            if hasattr(exc, "add_note"):
                exc.add_note(f"(raised while prefetching from {str(self.dataset.path)!r})")
            raise exc
        return item

    def close(self):
        """Stop the thread and drop what it had read."""
        self._stop.set()
        self._done = True
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self._stop.set()
        except Exception:
            pass


def open_dataset(path, group=None, **kw) -> HDF5Dataset:
    """Shorthand for HDF5Dataset(path, group, ...)."""
    return HDF5Dataset(os.fspath(path), group, **kw)
