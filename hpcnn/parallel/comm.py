"""Execution of exchange plans and collectives over MPI, with byte counts.

``Communicator`` wraps one MPI communicator (a private duplicate of the one
it is given, so its messages never match the caller's) and the backend:

* ``exchange(plan, tile)``: forward.  Every rank sends the pieces of its
  source tile that other ranks need and assembles its own needed region
  (its clipped need box) from the pieces it receives and its own tile.  When
  the region is a part of its own tile (the identity included) the result is
  a view and nothing is copied.
* ``exchange_adjoint(plan, grad, acc)``: the exact adjoint.  Every
  destination sends the gradient of each received piece back to the piece's
  owner, which sums them (and its own piece) into the gradient of its tile.
* ``allreduce(arr, comm)``: sum over a (sub-)communicator.

Two transports execute plans: ``p2p`` (Isend/Irecv, one message per
source-destination pair; the default, chosen by measurement, see
docs/performance.md) and ``neighbor`` (one MPI neighbourhood all-to-all on a
distributed-graph communicator per plan; every rank of the communicator must
then call ``exchange`` for every plan, in the same order).

GPU arrays (CuPy): the stream is synchronised before every MPI call; when MPI
is not CUDA-aware (``hpcnn.backend.probe_cuda_aware``, or
HPCNN_CUDA_AWARE=0|1) messages are staged through host memory.

Every byte handed to MPI for another rank is counted, per plan key and
direction and per step by category (``ByteCounter``).
"""
from __future__ import annotations

import os
import time
from collections import defaultdict

import numpy as np
from mpi4py import MPI

from hpcnn.backend import get_backend, probe_cuda_aware, to_host

__all__ = ["Communicator", "ByteCounter", "TRANSPORTS", "detect_cuda_aware"]

TRANSPORTS = ("p2p", "neighbor")
_TAG_SPAN = 30000   # MPI guarantees tags up to 32767


_cuda_aware_found: dict = {}


def detect_cuda_aware(comm, backend) -> bool:
    """Whether to hand device buffers to MPI directly: HPCNN_CUDA_AWARE=0|1
    when set, else the answer of ``hpcnn.backend.probe_cuda_aware``, probed
    collectively once per process and backend kind (every rank creates its
    communicators in the same order, so every rank probes at the same
    moment)."""
    if not backend.is_gpu:
        backend.cuda_aware = False
        return False
    if os.environ.get("HPCNN_CUDA_AWARE", "").strip() in ("0", "1"):
        return probe_cuda_aware(comm, backend)     # decided by the variable, no communication
    if backend.name not in _cuda_aware_found:
        _cuda_aware_found[backend.name] = probe_cuda_aware(comm, backend)
    backend.cuda_aware = _cuda_aware_found[backend.name]
    return backend.cuda_aware


class ByteCounter:
    """Bytes and messages sent to other ranks.

    per_plan[key][direction] : cumulative bytes ('forward' / 'backward'),
                               and MPI calls ('messages_forward' / ...)
    step[category]           : bytes since the last ``reset_step``
    total[category]          : bytes since creation
    calls[category]          : MPI calls (messages or collectives) since reset
    """

    def __init__(self):
        self.per_plan = defaultdict(lambda: {"forward": 0, "backward": 0,
                                             "messages_forward": 0, "messages_backward": 0})
        self.step = defaultdict(int)
        self.total = defaultdict(int)
        self.calls = defaultdict(int)
        self.seconds = defaultdict(float)

    def add(self, category, nbytes, key=None, direction="forward", calls=1, seconds=0.0):
        self.step[category] += int(nbytes)
        self.total[category] += int(nbytes)
        self.calls[category] += int(calls)
        self.seconds[category] += float(seconds)
        if key is not None:
            self.per_plan[key][direction] += int(nbytes)
            self.per_plan[key]["messages_" + direction] += int(calls)

    def reset_step(self):
        self.step = defaultdict(int)
        self.calls = defaultdict(int)
        self.seconds = defaultdict(float)

    def step_bytes(self) -> dict:
        return dict(self.step)


class Communicator:
    """Plans and collectives on a private duplicate of ``comm``."""

    def __init__(self, comm=None, backend=None, transport: str = "p2p", dup: bool = True,
                 probe: bool = True):
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}: choose one of {', '.join(TRANSPORTS)}")
        base = comm if comm is not None else MPI.COMM_WORLD
        self.mpi = base.Dup() if dup else base
        self.rank = self.mpi.Get_rank()
        self.size = self.mpi.Get_size()
        self.backend = backend or get_backend()
        self.transport = transport
        self.counter = ByteCounter()
        self._graph_comms = {}
        # staging through host memory when the arrays live on a GPU and MPI
        # does not accept device buffers
        if self.backend.is_gpu and probe:
            detect_cuda_aware(self.mpi, self.backend)
        self.staging = bool(self.backend.is_gpu and not self.backend.cuda_aware)

    # ---- buffers ------------------------------------------------------------
    def _sync(self):
        if self.backend.is_gpu:
            self.backend.synchronize()

    def _send_buf(self, a):
        """A contiguous buffer MPI can read (host copy when staging)."""
        xp = self.backend.xp
        a = xp.ascontiguousarray(a)
        if self.staging:
            return to_host(a)
        return a

    def _recv_buf(self, shape, dtype, view=None):
        """A buffer MPI can write: ``view`` itself when it is a contiguous
        window on the right memory, else a fresh contiguous array."""
        if view is not None and not self.staging and view.flags.c_contiguous:
            return view, False
        if self.staging:
            return np.empty(shape, dtype=dtype), True
        return self.backend.xp.empty(shape, dtype=dtype), True

    def _alloc(self, shape, dtype, like=None, zeros=False):
        """A new array of ``shape`` on the compute device, laid out in
        memory like ``like`` when that is a 4-D channels-last array (the
        layout the fast kernels return and read without a copy), else
        C-contiguous."""
        xp = self.backend.xp
        make = xp.zeros if zeros else xp.empty
        if (like is not None and like.ndim == 4 and len(shape) == 4 and like.shape[1] > 1
                and like.strides[1] == like.itemsize and not like.flags.c_contiguous):
            n, c, h, w = shape
            return make((n, h, w, c), dtype=dtype).transpose(0, 3, 1, 2)
        return make(shape, dtype=dtype)

    def _to_compute(self, a):
        return self.backend.to_device(a) if self.staging else a

    def _tag(self, tag):
        return int(tag) % _TAG_SPAN

    # ---- forward ------------------------------------------------------------
    def exchange(self, plan, tile, dtype=None, tag=0, key=None, category="exchange"):
        """Run ``plan`` forward.  ``tile`` is this rank's source tile (None
        when it holds none).  Returns this rank's region (an array of the
        clipped need's shape; a view of ``tile`` when it comes from the tile
        alone) or None when this rank needs nothing."""
        me = self.rank
        src_box = plan.src.box(me)
        if src_box is not None:
            if tile is None:
                raise ValueError(f"rank {me} holds tile {src_box} of the source of plan {key!r} "
                                 "but passed no array")
            if tuple(tile.shape) != src_box.shape:
                raise ValueError(f"rank {me}: plan {key!r} expects a source tile of shape "
                                 f"{src_box.shape}, got {tuple(tile.shape)}")
        if dtype is None:
            if tile is None:
                raise ValueError(f"rank {me}: give the dtype of plan {key!r}'s region")
            dtype = tile.dtype
        dtype = np.dtype(dtype)
        if dtype.itemsize != plan.itemsize:
            raise ValueError(f"plan {key!r} was compiled for {plan.itemsize}-byte elements, "
                             f"got {dtype}")
        need = plan.need(me)
        recvs = plan.receives(me)
        # zero-copy: the region is (part of) this rank's own tile
        if need is not None and not need.empty and len(recvs) == 1 and recvs[0][0] == me:
            if need == src_box:
                region = tile
            else:
                region = tile[need.slices(src_box.lo)]
            if self.transport == "neighbor":
                self._neighbor_forward(plan, tile, src_box, None, need, dtype, tag, key, category)
            else:
                self._p2p_forward(plan, tile, src_box, None, need, dtype, tag, key, category)
            return region
        out = None
        if need is not None:
            out = self._alloc(need.shape, dtype, like=tile)
        if self.transport == "neighbor":
            self._neighbor_forward(plan, tile, src_box, out, need, dtype, tag, key, category)
        else:
            self._p2p_forward(plan, tile, src_box, out, need, dtype, tag, key, category)
        return out

    def _p2p_forward(self, plan, tile, src_box, out, need, dtype, tag, key, category):
        me, t = self.rank, self._tag(tag)
        sends = [(d, b) for d, b in plan.sends(me) if d != me]
        recvs = [(s, b) for s, b in plan.receives(me) if s != me] if out is not None else []
        if not sends and not recvs:
            if out is not None:
                self._local_pieces(plan, tile, src_box, out, need)
            return
        t0 = time.perf_counter()
        reqs, pending = [], []
        sendbufs = [self._send_buf(tile[b.slices(src_box.lo)]) for _, b in sends]
        recvbufs = []
        for s, b in recvs:
            buf, temp = self._recv_buf(b.shape, dtype, out[b.slices(need.lo)])
            recvbufs.append(buf)
            pending.append((buf, b, temp))
        self._sync()
        for (s, b), buf in zip(recvs, recvbufs):
            reqs.append(self.mpi.Irecv(buf, source=s, tag=t))
        nbytes = 0
        for (d, b), buf in zip(sends, sendbufs):
            reqs.append(self.mpi.Isend(buf, dest=d, tag=t))
            nbytes += buf.nbytes
        if out is not None:
            self._local_pieces(plan, tile, src_box, out, need)
        MPI.Request.Waitall(reqs)
        for buf, b, temp in pending:
            if temp:
                out[b.slices(need.lo)] = self._to_compute(buf)
        self.counter.add(category, nbytes, key, "forward", calls=len(sends),
                         seconds=time.perf_counter() - t0)

    def _local_pieces(self, plan, tile, src_box, out, need):
        me = self.rank
        for s, b in plan.receives(me):
            if s == me:
                out[b.slices(need.lo)] = tile[b.slices(src_box.lo)]

    # ---- backward (adjoint) -------------------------------------------------
    def exchange_adjoint(self, plan, grad, acc=None, dtype=None, tag=0, key=None,
                         category="exchange"):
        """The adjoint of ``exchange``.  ``grad`` is the gradient of this
        rank's region (None when it needs nothing, or zeros implied when it
        has none); ``acc`` is the gradient of this rank's source tile, to
        which the returned pieces are added (created as zeros when None and
        this rank holds a source tile).  Returns ``acc`` (None when this rank
        holds no source tile)."""
        me = self.rank
        src_box = plan.src.box(me)
        need = plan.need(me)
        if dtype is None:
            dtype = grad.dtype if grad is not None else (acc.dtype if acc is not None else None)
            if dtype is None:
                raise ValueError(f"rank {me}: give the dtype of plan {key!r}'s gradient")
        dtype = np.dtype(dtype)
        xp = self.backend.xp
        if need is not None and grad is not None and tuple(grad.shape) != need.shape:
            raise ValueError(f"rank {me}: plan {key!r} expects a region gradient of shape "
                             f"{need.shape}, got {tuple(grad.shape)}")
        if need is not None and not need.empty and grad is None:
            grad = xp.zeros(need.shape, dtype=dtype)
        if src_box is not None and acc is None:
            acc = self._alloc(src_box.shape, dtype, like=grad, zeros=True)
        if self.transport == "neighbor":
            self._neighbor_adjoint(plan, grad, acc, src_box, need, dtype, tag, key, category)
        else:
            self._p2p_adjoint(plan, grad, acc, src_box, need, dtype, tag, key, category)
        return acc

    def _p2p_adjoint(self, plan, grad, acc, src_box, need, dtype, tag, key, category):
        me, t = self.rank, self._tag(tag)
        # messages flow from destinations back to sources
        sends = [(s, b) for s, b in plan.receives(me) if s != me] if grad is not None else []
        recvs = [(d, b) for d, b in plan.sends(me) if d != me]
        t0 = time.perf_counter()
        reqs = []
        sendbufs = [self._send_buf(grad[b.slices(need.lo)]) for _, b in sends]
        recvbufs = [self._recv_buf(b.shape, dtype)[0] for _, b in recvs]
        if sends or recvs:
            self._sync()
        for (d, b), buf in zip(recvs, recvbufs):
            reqs.append(self.mpi.Irecv(buf, source=d, tag=t))
        nbytes = 0
        for (s, b), buf in zip(sends, sendbufs):
            reqs.append(self.mpi.Isend(buf, dest=s, tag=t))
            nbytes += buf.nbytes
        self._local_adjoint(plan, grad, acc, src_box, need)
        if reqs:
            MPI.Request.Waitall(reqs)
        for (d, b), buf in zip(recvs, recvbufs):
            acc[b.slices(src_box.lo)] += self._to_compute(buf)
        if sends or recvs:
            self.counter.add(category, nbytes, key, "backward", calls=len(sends),
                             seconds=time.perf_counter() - t0)

    def _local_adjoint(self, plan, grad, acc, src_box, need):
        me = self.rank
        if grad is None or acc is None:
            return
        for s, b in plan.receives(me):
            if s == me:
                acc[b.slices(src_box.lo)] += grad[b.slices(need.lo)]

    # ---- neighbourhood collectives -------------------------------------------
    def _graph_comm(self, plan):
        """The distributed-graph communicator of ``plan`` (created
        collectively on first use: every rank must reach it)."""
        gc = self._graph_comms.get(plan)
        if gc is None:
            me = self.rank
            sources = [s for s, _ in plan.receives(me) if s != me]
            dests = [d for d, _ in plan.sends(me) if d != me]
            gc = self.mpi.Create_dist_graph_adjacent(sources, dests, reorder=False)
            self._graph_comms[plan] = gc
        return gc

    def _alltoallv(self, gc, send_parts, recv_shapes, dtype):
        """One Neighbor_alltoallv: send_parts in destination order, receive
        into contiguous parts of recv_shapes in source order."""
        xp = np if self.staging else self.backend.xp
        scounts = [int(np.prod(p.shape)) for p in send_parts]
        rcounts = [int(np.prod(s)) for s in recv_shapes]
        sbuf = (xp.concatenate([p.reshape(-1) for p in send_parts]) if send_parts
                else xp.empty(0, dtype=dtype))
        rbuf = xp.empty(sum(rcounts), dtype=dtype)
        sdis = np.concatenate([[0], np.cumsum(scounts)[:-1]]).astype(int).tolist() if scounts else []
        rdis = np.concatenate([[0], np.cumsum(rcounts)[:-1]]).astype(int).tolist() if rcounts else []
        mtype = MPI._typedict[np.dtype(dtype).char]
        self._sync()
        gc.Neighbor_alltoallv([sbuf, scounts, sdis, mtype], [rbuf, rcounts, rdis, mtype])
        parts = [rbuf[o:o + c].reshape(s) for o, c, s in zip(rdis, rcounts, recv_shapes)]
        return parts, int(sbuf.nbytes)

    def _neighbor_forward(self, plan, tile, src_box, out, need, dtype, tag, key, category):
        me = self.rank
        gc = self._graph_comm(plan)
        sends = [(d, b) for d, b in plan.sends(me) if d != me]
        recvs = [(s, b) for s, b in plan.receives(me) if s != me]
        t0 = time.perf_counter()
        parts = [self._send_buf(tile[b.slices(src_box.lo)]) for _, b in sends]
        got, nbytes = self._alltoallv(gc, parts, [b.shape for _, b in recvs], dtype)
        if out is not None:
            self._local_pieces(plan, tile, src_box, out, need)
            for (s, b), g in zip(recvs, got):
                out[b.slices(need.lo)] = self._to_compute(g)
        if sends or recvs:
            self.counter.add(category, nbytes, key, "forward", calls=len(sends),
                             seconds=time.perf_counter() - t0)

    def _neighbor_adjoint(self, plan, grad, acc, src_box, need, dtype, tag, key, category):
        me = self.rank
        # the adjoint sends along the reversed edges: to the sources of the
        # forward, in the order the graph lists them (its sources)
        sources = [s for s, _ in plan.receives(me) if s != me]
        dests = [d for d, _ in plan.sends(me) if d != me]
        t0 = time.perf_counter()
        back = [self._send_buf(grad[b.slices(need.lo)]) for s, b in plan.receives(me) if s != me]
        # reversed graph: a second communicator with sources and destinations swapped
        rgc = self._graph_comms.get((plan, "adjoint"))
        if rgc is None:
            rgc = self.mpi.Create_dist_graph_adjacent(dests, sources, reorder=False)
            self._graph_comms[(plan, "adjoint")] = rgc
        got, nbytes = self._alltoallv(rgc, back, [b.shape for d, b in plan.sends(me) if d != me],
                                      dtype)
        self._local_adjoint(plan, grad, acc, src_box, need)
        for (d, b), g in zip([(d, b) for d, b in plan.sends(me) if d != me], got):
            acc[b.slices(src_box.lo)] += self._to_compute(g)
        if sources or dests:
            self.counter.add(category, nbytes, key, "backward", calls=len(back),
                             seconds=time.perf_counter() - t0)

    # ---- collectives ----------------------------------------------------------
    def allreduce(self, arr, comm=None, category="allreduce", key=None):
        """Sum ``arr`` over ``comm`` (default: all ranks); returns a new
        array on the compute device.  None or a size-1 communicator: a copy."""
        comm = self.mpi if comm is None else comm
        if comm == MPI.COMM_NULL or comm.Get_size() == 1:
            return arr.copy()
        t0 = time.perf_counter()
        send = self.backend.xp.ascontiguousarray(arr)
        if self.staging:
            send = to_host(send)
            recv = np.empty_like(send)
        else:
            recv = self.backend.xp.empty_like(send)
        self._sync()
        comm.Allreduce(send, recv, op=MPI.SUM)
        self.counter.add(category, send.nbytes, key, "forward", calls=1,
                         seconds=time.perf_counter() - t0)
        return self._to_compute(recv)

    def iallreduce(self, arr, comm, category="allreduce", key=None):
        """Start summing ``arr`` over ``comm`` without waiting (MPI
        Iallreduce, in place: ``arr`` itself when it is a contiguous array on
        memory MPI can read, which then belongs to the reduction until
        ``wait_allreduce``).  Returns a handle for ``wait_allreduce``."""
        buf = self.backend.xp.ascontiguousarray(arr)
        if self.staging:
            buf = to_host(buf)
        self._sync()
        req = comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        self.counter.add(category, buf.nbytes, key, "forward", calls=1)
        return req, buf

    @staticmethod
    def progress(handles) -> None:
        """Let MPI advance started reductions (MPICH moves non-blocking
        collectives on only inside MPI calls)."""
        reqs = [h[0] for h in handles]
        if reqs:
            MPI.Request.Testall(reqs)

    def wait_allreduce(self, handles) -> list:
        """Finish reductions started by ``iallreduce``; their sums, in order,
        on the compute device."""
        if handles:
            MPI.Request.Waitall([h[0] for h in handles])
        return [self._to_compute(buf) for _, buf in handles]

    def allreduce_scalars(self, values, comm=None, op=None, category="scalars"):
        """Sum (or ``op``) a few host floats over ``comm``; a float64 host array."""
        comm = self.mpi if comm is None else comm
        send = np.asarray(values, dtype=np.float64).reshape(-1)
        recv = np.empty_like(send)
        comm.Allreduce(send, recv, op=op or MPI.SUM)
        self.counter.add(category, send.nbytes, None, calls=1)
        return recv

    def free(self):
        for gc in self._graph_comms.values():
            gc.Free()
        self._graph_comms.clear()
        if self.mpi not in (MPI.COMM_WORLD, MPI.COMM_SELF):
            self.mpi.Free()
