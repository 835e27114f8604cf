"""``hpcnn predict --model net.onnx|CKPT.h5 --input x.npy|data.h5 -o
logits.npy``: the logits of a network for a set of images, in one process
(or under ``mpiexec -n N``: each rank the whole network on a contiguous
share of the batches, rank 0 gathers and writes).

The model is an ONNX file (imported with its weights, as ``model.onnx``
imports it) or an hpcnn checkpoint (the network rebuilt from what it
records, with its tensors).  The input is a NumPy array of images
(N, C, H, W), fed as it is, or a split of an HDF5 data file in hpcnn's
format (docs/data-format.md), read in order and turned into the network's
input as evaluation does: for a checkpoint with its job's evaluation
transform and normalisation, for an ONNX file with the data file's
normalisation.  The images go through the network in inference mode in
batches of ``--batch`` (the last one padded, the padding dropped); the
logits (N, classes) are written with ``numpy.save``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np


class PredictError(ValueError):
    """A model or input that cannot be predicted from; the message says why."""


def add_arguments(p):
    p.add_argument("--model", required=True, metavar="net.onnx|CKPT.h5",
                   help="an ONNX file or an hpcnn checkpoint (ckpt-<step>.h5)")
    p.add_argument("--input", required=True, metavar="x.npy|data.h5",
                   help="images: a .npy array (N, C, H, W) or an HDF5 data file (hpcnn data ...)")
    p.add_argument("-o", "--output", required=True, metavar="logits.npy", help="where to write the logits")
    p.add_argument("--split", default="test", help="group of the HDF5 file to read (default: test)")
    p.add_argument("--batch", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="arithmetic and output dtype (default float32)")
    p.add_argument("--mean", default=None, metavar="M[,M...]",
                   help="HDF5 input: per-channel mean subtracted, in stored units (default: the checkpoint's "
                        "job's augment.mean, for an ONNX model the data file's)")
    p.add_argument("--std", default=None, metavar="S[,S...]",
                   help="HDF5 input: per-channel standard deviation divided by (defaults as --mean)")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "lines", "off"],
                   help="a bar on a terminal, plain lines otherwise, for inputs of 10 batches or more "
                        "(auto); bar; lines; or none")


def _is_hdf5(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


def load_model(path, batch: int, dtype):
    """(SequentialModel, the job dict of a checkpoint or None) of an ONNX
    file or a checkpoint, for ``batch`` images per pass."""
    from hpcnn.checkpoint import CheckpointError, read_meta
    from hpcnn.models.onnx_import import load_onnx
    from hpcnn.onnx_export import checkpoint_network
    from hpcnn.runtime.sequential import SequentialModel
    p = Path(path)
    if not p.is_file():
        raise PredictError(f"model {str(p)!r} does not exist: give an ONNX file or an hpcnn checkpoint")
    if not _is_hdf5(p):
        return SequentialModel(load_onnx(p, batch=batch), dtype=dtype), None
    meta = read_meta(p)
    if not isinstance(meta.get("job"), dict):
        raise CheckpointError(f"checkpoint {str(p)!r} does not record its job (written by an older hpcnn)")
    g, params, buffers = checkpoint_network(p, batch=batch)
    model = SequentialModel(g, dtype=dtype)
    for store, saved, what in ((model.params, params, "params"), (model.buffers, buffers, "buffers")):
        for node, tensors in store.items():
            for name, t in tensors.items():
                a = saved.get(node, {}).get(name)
                if a is None or tuple(a.shape) != tuple(t.shape):
                    raise CheckpointError(f"checkpoint {str(p)!r}: tensor {what}/{node}/{name} is "
                                          f"{'missing' if a is None else f'of shape {tuple(a.shape)}'}, the "
                                          f"network it records needs {tuple(t.shape)}")
                tensors[name] = model.backend.to_device(np.asarray(a, dtype=dtype))
    return model, meta["job"]


class _Images:
    """Images by row range from a .npy array or an HDF5 split."""

    def __init__(self, path, split, shape, dtype, job, mean=None, std=None):
        p = Path(path)
        if not p.is_file():
            raise PredictError(f"input {str(p)!r} does not exist: give a .npy array or an HDF5 data file")
        self.ds = None
        if _is_hdf5(p):
            from hpcnn.data.hdf5_dataset import HDF5Dataset
            kw = {}
            if job is not None:
                from hpcnn.job import Job
                from hpcnn.train import augmentations
                j = Job(job)
                a = j["augment"]
                kw = dict(transform=augmentations(j)[1], mean=a["mean"] or None, std=a["std"] or None)
            if mean is not None:
                kw["mean"] = mean
            if std is not None:
                kw["std"] = std
            self.ds = HDF5Dataset(p, split, batch_size=1, shuffle=False, drop_last=False, dtype=dtype, **kw)
            self.n, got = self.ds.num_samples, tuple(self.ds.sample_shape)
        else:
            if mean is not None or std is not None:
                raise PredictError("--mean and --std normalise images read from an HDF5 data file; a .npy "
                                   "input is fed as it is (normalise it before saving)")
            try:
                self.x = np.load(p, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise PredictError(f"input {str(p)!r} is neither an HDF5 data file nor a .npy array: {exc}") from None
            if self.x.ndim != 4:
                raise PredictError(f"input {str(p)!r} has shape {self.x.shape}; give images (N, C, H, W)")
            self.n, got = self.x.shape[0], tuple(self.x.shape[1:])
        if got != tuple(shape):
            raise PredictError(f"the images of {str(p)!r} are {got} (C, H, W), the network takes {tuple(shape)}")
        self.dtype = dtype

    def rows(self, lo, hi):
        if self.ds is not None:
            return self.ds.read_rows(np.arange(lo, hi))
        return np.asarray(self.x[lo:hi], dtype=self.dtype)


def predict(model, images, batch: int, on_batch=None, rows=None) -> np.ndarray:
    """Logits of every image (inference mode), ``batch`` at a time; of the
    images ``rows`` = (first, end) only when given (batch-aligned first)."""
    from hpcnn.backend import to_host
    first, end = rows if rows is not None else (0, images.n)
    out = None
    for lo in range(first, end, batch):
        hi = min(end, lo + batch)
        x = images.rows(lo, hi)
        if hi - lo < batch:             # the graph's batch is fixed: pad, then drop the padding
            x = np.concatenate([x, np.zeros((batch - (hi - lo),) + x.shape[1:], x.dtype)])
        z = to_host(model.predict(x))[: hi - lo]
        if out is None:
            out = np.empty((end - first, z.shape[1]), dtype=z.dtype)
        out[lo - first:hi - first] = z
        if on_batch is not None:
            on_batch(hi - first)
    if out is None:
        k = model.graph[model.graph.logits_name].shape[1]
        out = np.empty((0, k), dtype=model.dtype)
    return out


def _numbers(text, what):
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise PredictError(f"{what} {text!r}: give numbers separated by commas, one per channel") from None


def _progress(mode, total, batch):
    """on_batch(done) for ``total`` images, and a close function."""
    if mode == "auto":
        mode = "off" if total < 10 * batch else "bar" if sys.stderr.isatty() else "lines"
    if mode == "off" or total == 0:
        return None, lambda: None
    if mode == "bar":
        from tqdm import tqdm
        bar = tqdm(total=total, desc="predict", unit="img", file=sys.stderr, dynamic_ncols=True)
        last = [0]

        def update(done):
            bar.update(done - last[0])
            last[0] = done
        return update, bar.close
    t0, shown = time.perf_counter(), [0.0]

    def line(done):
        frac = done / total
        if frac >= shown[0] + 0.1 or done == total:
            shown[0] = frac
            dt = time.perf_counter() - t0
            print(f"predict: {done}/{total} images ({100 * frac:.0f}%, {done / dt if dt > 0 else 0:.0f} images/s)",
                  file=sys.stderr, flush=True)
    return line, lambda: None


def share(n: int, batch: int, rank: int, world: int) -> tuple:
    """(first, end) image of ``rank``'s contiguous share of the batches."""
    nb = -(-n // batch)
    lo, hi = rank * nb // world, (rank + 1) * nb // world
    return min(n, lo * batch), min(n, hi * batch)


def run(args) -> int:
    from mpi4py import MPI

    from hpcnn.checkpoint import CheckpointError
    from hpcnn.data.hdf5_format import DataError
    from hpcnn.failsafe import abort_on_exception
    from hpcnn.job_errors import JobFailure, agree
    from hpcnn.models import ModelError
    comm = MPI.COMM_WORLD
    abort_on_exception(comm)
    rank, world = comm.Get_rank(), comm.Get_size()
    if args.batch < 1:
        if rank == 0:
            print(f"hpcnn predict: error: --batch must be a positive number of images, got {args.batch}",
                  file=sys.stderr)
        return 2
    dtype = np.dtype(args.dtype)
    expected = (PredictError, CheckpointError, DataError, ModelError, OSError)
    try:
        def setup():
            model, job = load_model(args.model, args.batch, dtype)
            g = model.graph
            images = _Images(args.input, args.split, g[g.input_name].shape[1:], dtype, job,
                             mean=_numbers(args.mean, "--mean"), std=_numbers(args.std, "--std"))
            return model, images
        model, images = agree(comm, setup, expected)
        g = model.graph
        rows = share(images.n, args.batch, rank, world)
        update, close = _progress(args.progress if rank == 0 else "off", rows[1] - rows[0], args.batch)
        t0 = time.perf_counter()
        try:
            logits = predict(model, images, args.batch, update, rows=rows)
        finally:
            close()
        if world > 1:
            parts = comm.gather(logits, root=0)
            if rank == 0:
                logits = np.concatenate(parts)
        agree(comm, lambda: np.save(args.output, logits) if rank == 0 else None, (OSError,))
    except JobFailure as exc:
        if rank == 0:
            print(f"hpcnn predict: error: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"wrote {args.output}: logits {logits.shape} {logits.dtype} of {g.name} "
              f"({time.perf_counter() - t0:.1f} s{f' on {world} ranks' if world > 1 else ''})")
    return 0
