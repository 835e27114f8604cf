"""HDF5 checkpoints of whole logical tensors, restorable under any plan and
rank count.

Layout of a checkpoint file (plain h5py or h5dump can read it)::

    /params/<layer>/<name>      every trainable parameter, its whole logical shape
    /buffers/<layer>/<name>     batch-norm running statistics
    /optimizer/<state>/<layer>/<name>    the optimiser's state, one tensor per
                                parameter: momentum (sgd, lars; when
                                momentum > 0), exp_avg and exp_avg_sq
                                (adamw, lamb)
    attributes on /             format, format_version, hpcnn_version, model,
                                plan (JSON), world, dtype, step, epoch,
                                batch_in_epoch, seed, rng (JSON), job (JSON),
                                optimizer (JSON: kind and steps taken),
                                created (UTC ISO time)

Every dataset is chunked with Fletcher32 checksums, which HDF5 verifies on
every read.  Writing: each distinct shard is sent to rank 0, which writes it
into its hyperslab, so no rank ever holds more than one shard (never a whole
tensor plus replicas).  The file is written under a temporary name, flushed,
fsynced and renamed, so a crash mid-write leaves the previous checkpoint
intact; the newest ``keep`` are kept.  Restore: every rank opens the file
read-only and reads only the boxes it holds under the *current* plan, so a
checkpoint written on 4 ranks with one plan restores on 2 ranks with another.
The optimiser's state is restored when the checkpoint was written by the
same kind of optimiser (a file without the ``optimizer`` attribute was
written by SGD); another kind starts from fresh state, and the metadata
returned by ``load_checkpoint`` says so (``optimizer_restored``).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np

from hpcnn import __version__
from hpcnn.backend import to_host

FORMAT = "hpcnn-checkpoint"
FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{8,})\.h5$")


class CheckpointError(RuntimeError):
    """A missing, corrupt or mismatched checkpoint."""


def _h5():
    import h5py
    return h5py


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.h5"


def list_checkpoints(directory) -> list[Path]:
    """Checkpoint files in ``directory``, oldest first (temporary files of
    interrupted writes are ignored)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory) -> Path | None:
    cks = list_checkpoints(directory)
    return cks[-1] if cks else None


def _tensors(model, optimizer):
    """Every tensor of the state, in a deterministic order:
    (group path, node, name, local shard or None, logical shape)."""
    g = model.graph
    out = []
    for node in g:
        for pname, spec in node.param_specs().items():
            shard = model.params.get(node.name, {}).get(pname)
            out.append((f"params/{node.name}/{pname}", node.name, pname, shard, spec.shape))
        for bname, spec in node.buffer_specs().items():
            shard = model.buffers.get(node.name, {}).get(bname)
            out.append((f"buffers/{node.name}/{bname}", node.name, bname, shard, spec.shape))
    if optimizer is not None:
        for state in optimizer.state_names:
            held = optimizer.state.get(state, {})
            for node in g:
                for pname, spec in node.param_specs().items():
                    shard = held.get(f"{node.name}.{pname}")
                    has = node.name in model.params and pname in model.params[node.name]
                    if has and shard is None:
                        # no step taken yet: the state is zero
                        shard = np.zeros(model.params[node.name][pname].shape, model.dtype)
                    out.append((f"optimizer/{state}/{node.name}/{pname}", node.name, pname,
                                shard if has else None, spec.shape))
    return out


def _box_of(model, node, name, shard):
    if shard is None:
        return None
    return tuple(tuple(p) for p in model.param_box(node, name))


def save_checkpoint(directory, model, optimizer=None, comm=None, meta: dict | None = None,
                    keep: int = 3, on_tensor=None) -> Path:
    """Write a checkpoint of ``model`` (and the optimiser's state) into
    ``directory``; collective over ``comm`` (None: one process).  Returns
    the path of the new file (on every rank).  ``on_tensor(i, n, path)`` is
    called on rank 0 after each tensor is written (progress, fault tests)."""
    rank = comm.Get_rank() if comm is not None else 0
    meta = dict(meta or {})
    step = int(meta.get("step", 0))
    directory = Path(directory)
    tensors = _tensors(model, optimizer)
    # which distinct boxes exist for each tensor, and which rank writes each
    mine = [_box_of(model, node, name, shard) for _, node, name, shard, _ in tensors]
    everyone = comm.allgather(mine) if comm is not None else [mine]
    writers = []   # per tensor: list of (box, writer rank)
    for t in range(len(tensors)):
        seen = {}
        for r, boxes in enumerate(everyone):
            b = boxes[t]
            if b is not None and b not in seen:
                seen[b] = r
        writers.append(sorted(seen.items()))
    final = directory / checkpoint_name(step)
    tmp = directory / f".{final.name}.tmp"
    err = None
    if rank == 0:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            f = _h5().File(tmp, "w")
        except Exception as exc:  # report on every rank below
            err = f"cannot create checkpoint {str(tmp)!r}: {exc}"
    if comm is not None:
        err = comm.bcast(err, root=0)
    if err:
        raise CheckpointError(err)
    try:
        for t, (path, node, name, shard, shape) in enumerate(tensors):
            if rank == 0:
                chunks = _chunks(shape, model.dtype.itemsize)
                ds = f.create_dataset(path, shape=shape, dtype=model.dtype, chunks=chunks,
                                      fletcher32=True)
            for box, w in writers[t]:
                sl = tuple(slice(lo, hi) for lo, hi in box)
                if w == rank == 0:
                    ds[sl] = to_host(shard)
                elif rank == 0:
                    buf = np.empty(tuple(hi - lo for lo, hi in box), dtype=model.dtype)
                    comm.Recv(buf, source=w, tag=7000 + t % 1000)
                    ds[sl] = buf
                    del buf
                elif w == rank:
                    comm.Send(np.ascontiguousarray(to_host(shard)), dest=0, tag=7000 + t % 1000)
            if rank == 0 and on_tensor is not None:
                on_tensor(t, len(tensors), path)
        if rank == 0:
            attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "hpcnn_version": __version__,
                     "model": model.graph.name, "dtype": str(model.dtype),
                     "world": comm.Get_size() if comm is not None else 1,
                     "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            if optimizer is not None:
                attrs["optimizer"] = json.dumps({"kind": optimizer.kind, "steps": int(optimizer.steps)})
            for k, v in meta.items():
                attrs[k] = v if isinstance(v, (int, float, str)) else json.dumps(v)
            for k, v in attrs.items():
                f.attrs[k] = v
            f.flush()
            f.close()
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            try:
                dfd = os.open(directory, os.O_RDONLY)
                os.fsync(dfd)
                os.close(dfd)
            except OSError:
                pass
            for old in list_checkpoints(directory)[:-keep]:
                old.unlink(missing_ok=True)
    except BaseException:
        if rank == 0:
            try:
                f.close()
            except Exception:
                pass
            Path(tmp).unlink(missing_ok=True)
        raise
    if comm is not None:
        comm.Barrier()
    return final


def _chunks(shape, itemsize, target=1 << 20):
    """Chunks of about 1 MiB, split along axis 0 (the channel axis shards
    are cut along)."""
    if not shape:
        return None
    row = int(np.prod(shape[1:])) * itemsize if len(shape) > 1 else itemsize
    rows = max(1, min(shape[0], target // max(1, row)))
    return (rows,) + tuple(shape[1:])


def read_meta(path) -> dict:
    """The attributes of a checkpoint, JSON values decoded."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with _h5().File(path, "r") as f:
            attrs = dict(f.attrs)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read (corrupt or not HDF5): {exc}") from None
    if attrs.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an hpcnn checkpoint (no format={FORMAT!r} attribute)")
    out = {}
    for k, v in attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, str) and v[:1] in "{[":
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        out[k] = v
    return out


def load_checkpoint(path, model, optimizer=None) -> dict:
    """Fill ``model``'s shards (and the optimiser's state) from ``path``,
    each rank reading only the boxes it holds.  Returns the checkpoint's
    metadata, with ``optimizer_restored``: whether the optimiser's state
    was restored (False when the checkpoint was written by another kind of
    optimiser: it then starts fresh).  Raises CheckpointError naming the
    file and the tensor on any mismatch or checksum failure."""
    meta = read_meta(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {meta.get('format_version')}; "
                              f"this hpcnn reads version {FORMAT_VERSION}")
    if meta.get("model") != model.graph.name:
        raise CheckpointError(f"checkpoint {str(path)!r} holds model {meta.get('model')!r}, "
                              f"but the job trains {model.graph.name!r}")
    backend = model.backend
    saved_opt = meta.get("optimizer") if isinstance(meta.get("optimizer"), dict) else {"kind": "sgd", "steps": 0}
    restore_opt = optimizer is not None and saved_opt.get("kind") == optimizer.kind
    meta["optimizer_restored"] = restore_opt
    with _h5().File(path, "r") as f:
        for gpath, node, name, shard, shape in _tensors(model, optimizer if restore_opt else None):
            if shard is None:
                continue
            if gpath not in f:
                if gpath.startswith("optimizer/"):
                    continue  # saved without this state (no momentum): start from zero
                raise CheckpointError(f"checkpoint {str(path)!r} has no tensor {gpath!r}")
            ds = f[gpath]
            if tuple(ds.shape) != tuple(shape):
                raise CheckpointError(f"checkpoint {str(path)!r}: tensor {gpath!r} has shape "
                                      f"{tuple(ds.shape)}, the model expects {tuple(shape)}")
            box = model.param_box(node, name)
            try:
                data = ds[tuple(slice(lo, hi) for lo, hi in box)]
            except OSError as exc:
                raise CheckpointError(f"checkpoint {str(path)!r}: tensor {gpath!r} fails its "
                                      f"checksum or cannot be read ({exc})") from None
            value = backend.to_device(data.astype(model.dtype, copy=False))
            if gpath.startswith("params/"):
                model.params[node][name][...] = value
            elif gpath.startswith("buffers/"):
                model.buffers[node][name][...] = value
            else:
                state = gpath.split("/")[1]
                optimizer.state[state][f"{node}.{name}"] = value.copy()
    if restore_opt:
        optimizer.steps = int(saved_opt.get("steps", 0))
    return meta


def inspect(path) -> str:
    """A readable listing of a checkpoint's metadata and tensors."""
    meta = read_meta(path)
    lines = [f"checkpoint {path}"]
    for k in sorted(meta):
        v = meta[k]
        if k in ("plan", "job") and isinstance(v, dict):
            v = json.dumps(v)[:120] + ("..." if len(json.dumps(v)) > 120 else "")
        lines.append(f"  {k:16s} {v}")
    total = 0
    with _h5().File(path, "r") as f:
        rows = []

        def visit(name, obj):
            nonlocal total
            if isinstance(obj, _h5().Dataset):
                total += obj.size
                rows.append(f"  {name:56s} {str(obj.shape):22s} {obj.dtype} "
                            f"{'fletcher32' if obj.fletcher32 else ''}")
        f.visititems(visit)
    lines.append(f"tensors ({len(rows)}, {total:,d} values):")
    lines.extend(rows)
    return "\n".join(lines)
