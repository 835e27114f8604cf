"""Execution of exchange plans and collectives over MPI, with byte counts.

``Communicator`` wraps one MPI communicator (a private duplicate of the one
it is given, so its messages never match the caller's) and the backend:

* ``exchange(plan, tile)``: forward.  Every rank sends the pieces of its
  source tile that other ranks need and assembles its own needed region
  (its clipped need box) from the pieces it receives and its own tile.  When
  the region is a part of its own tile (the identity included) the result is
  a view and nothing is copied.  With ``pieces=True`` nothing is assembled:
  the result is a ``TileRegion`` whose parts are views of this rank's own
  tile and the pieces as they arrived (a halo exchange then moves and
  writes the halo strips alone).
* ``exchange_adjoint(plan, grad, acc)``: the exact adjoint.  Every
  destination sends the gradient of each received piece back to the piece's
  owner, which sums them (and its own piece) into the gradient of its tile,
  in place.  ``grad`` is the region's gradient as one array or per piece.
* ``start_exchange`` / ``start_adjoint`` begin the same transfers and return
  a ``Flight`` whose ``finish()`` completes them, so that a tile's interior
  can be computed while its halo is in flight.
* ``allreduce(arr, comm)``: sum over a (sub-)communicator.

Three transports execute a plan, each moving every piece once without a
copy by hpcnn where MPI can read or write it in place:

* ``p2p``: one Isend/Irecv per source-destination pair;
* ``neighbor``: one MPI neighbourhood all-to-all (``Ineighbor_alltoallw``)
  on a distributed-graph communicator made per plan;
* ``alltoallw``: one ``Ialltoallw`` over the whole communicator (the
  Alltoallv of the same bytes, with a datatype per peer).

``neighbor`` and ``alltoallw`` are collective: when any rank of the
communicator moves data in a plan, every rank must start that plan's
exchange, in the same order (ranks without pieces take part with nothing).
The runtime chooses a transport per plan by measurement at set-up
(``measure_transports``).

How a piece meets MPI (host memory): a piece whose elements are contiguous
in memory is handed over as it is; a strided one whose contiguous runs are
at least ``DATATYPE_MIN_RUN`` bytes travels as an MPI derived datatype
(MPI reads it from the tile and writes it into the region directly); one
with shorter runs (a channel slice of a channels-last tile) is packed by
NumPy into one persistent buffer per plan and direction, which measured
faster than MPI's own packing of short runs.  Pieces travel in the
channels-last element order of 4-D tensors (the layout of the kernels'
outputs) and in logical order otherwise.  GPU arrays (CuPy): the stream is
synchronised before every MPI call, pieces are packed on the device, and
when MPI is not CUDA-aware (``hpcnn.backend.probe_cuda_aware``, or
HPCNN_CUDA_AWARE=0|1) they are staged through host memory; with
CUDA-aware MPI only ``p2p`` runs on device buffers.

Every byte handed to MPI for another rank is counted, per plan key and
direction and per step by category (``ByteCounter``).  A message is a
(source, destination) pair of the plan's pieces, whatever the number of
MPI calls the transport makes for it.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict

import numpy as np
from mpi4py import MPI

from hpcnn.backend import get_backend, probe_cuda_aware, to_host

__all__ = ["Communicator", "ByteCounter", "Flight", "TRANSPORTS", "DATATYPE_MIN_RUN",
           "detect_cuda_aware"]

TRANSPORTS = ("p2p", "neighbor", "alltoallw")
_COLLECTIVE = ("neighbor", "alltoallw")
_TAG_SPAN = 30000   # MPI guarantees tags up to 32767

#: seconds between the progress thread's polls (HPCNN_PROGRESS_US, in
#: microseconds; 0 turns the thread off)
PROGRESS_INTERVAL = 200e-6

#: a strided piece whose contiguous runs are at least this many bytes is sent
#: and received as an MPI derived datatype (no copy by hpcnn); shorter runs
#: are packed by NumPy.  Measured with MPICH 5.0.2 on shared memory: runs of
#: 128 KiB cost nothing over a contiguous message, runs of 16 to 128 bytes
#: cost MPI 10-20% more than NumPy's pack and unpack (docs/performance.md)
DATATYPE_MIN_RUN = 1024

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
                               and messages ('messages_forward' / ...):
                               (source, destination) pairs of the plan
    step[category]           : bytes since the last ``reset_step``
    total[category]          : bytes since creation
    calls[category]          : messages or collectives since reset
    seconds[category]        : time spent inside the calls since reset
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


# ---- pieces in memory ---------------------------------------------------------------------
def _canonical(a):
    """The piece in its travelling element order: channels-last for 4-D."""
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def _address(a) -> int:
    """Address of the first element of a host array."""
    if a.flags.c_contiguous:
        return MPI.Get_address(a)
    c = a.transpose(0, 2, 3, 1) if a.ndim == 4 else a
    if c.flags.c_contiguous:
        return MPI.Get_address(c)
    return a.ctypes.data


def _span(a) -> int:
    """Bytes from the first to one past the last element of a view with
    positive strides."""
    return sum((s - 1) * st for s, st in zip(a.shape, a.strides)) + a.itemsize


def _positive(a) -> bool:
    return all(st > 0 or s == 1 for s, st in zip(a.shape, a.strides))


_types: dict = {}


def _mpi_type(dtype):
    return MPI._typedict[np.dtype(dtype).char]


def _strided_type(c):
    """(committed MPI datatype, its contiguous run in bytes) describing the
    elements of the canonical view ``c`` in order, relative to its first
    element; None when its strides are not usable (not positive)."""
    it = c.itemsize
    dims = [(int(s), int(st)) for s, st in zip(c.shape, c.strides) if s > 1]
    if any(st <= 0 for _, st in dims):
        return None
    run = 1
    while dims and dims[-1][1] == it * run:
        run *= dims[-1][0]
        dims.pop()
    key = (c.dtype.char, run, tuple(dims))
    hit = _types.get(key)
    if hit is None:
        t = _mpi_type(c.dtype).Create_contiguous(run)
        for s, st in reversed(dims):
            t2 = t.Create_hvector(s, 1, st)
            t.Free()
            t = t2
        t.Commit()                      # kept for the process: recipes hold them
        hit = _types[key] = (t, run * it)
    return hit


class _Piece:
    """How one piece meets MPI: its peer, its slices in the array it lives
    in, and either (in place) its byte offset from that array's first
    element with a count and datatype, or its place in a pack/staging
    buffer (``slot`` >= 0, ``cshape``: its canonical shape)."""

    __slots__ = ("peer", "sl", "count", "mtype", "span", "off", "slot", "cshape")

    def __init__(self, peer, sl, count, mtype, span, off, slot=-1, cshape=None):
        self.peer, self.sl, self.count, self.mtype = peer, sl, count, mtype
        self.span, self.off, self.slot, self.cshape = span, off, slot, cshape


def _describe(peer, sl, c, base, dtype, used):
    """A _Piece for the canonical view ``c`` of an array whose first element
    is at ``base``; ``used``: elements of the slot buffer taken so far."""
    mt = _mpi_type(dtype)
    if c.flags.c_contiguous:
        return _Piece(peer, sl, c.size, mt, c.nbytes, _address(c) - base), used
    st = _strided_type(c)
    if st is not None and st[1] >= DATATYPE_MIN_RUN:
        return _Piece(peer, sl, 1, st[0], _span(c), _address(c) - base), used
    return _Piece(peer, sl, c.size, mt, c.size * c.itemsize, 0, used, c.shape), used + c.size


class _Recipe:
    """The pieces of one direction of a plan on this rank, for arrays of
    one memory layout, worked out once: per call only addresses change."""

    __slots__ = ("pieces", "slots", "direct")

    def __init__(self, pieces, slots):
        self.pieces, self.slots = pieces, slots
        self.direct = slots == 0


def _recipe_for(array, entries, dtype) -> _Recipe:
    base = _address(array)
    out, used = [], 0
    for peer, sl, _ in entries:
        p, used = _describe(peer, sl, _canonical(array[sl]), base, dtype, used)
        out.append(p)
    return _Recipe(out, used)


def _contiguous_recipe(entries, dtype) -> tuple:
    """(recipe, elements): pieces one after the other in one flat buffer,
    contiguous in their travelling order (fresh parts, staging of what the
    adjoint receives)."""
    mt, it = _mpi_type(dtype), np.dtype(dtype).itemsize
    out, off = [], 0
    for peer, sl, shape in entries:
        n = int(np.prod(shape))
        out.append(_Piece(peer, sl, n, mt, n * it, off * it, -1,
                          (shape[0], shape[2], shape[3], shape[1]) if len(shape) == 4 else tuple(shape)))
        off += n
    return _Recipe(out, 0), off


class _Program:
    """One rank's part of a plan: the slices of what it sends, receives and
    copies from its own tile, in both directions, its recipes and buffers."""

    def __init__(self, plan, me):
        self.plan = plan
        self.src_box = sb = plan.src.box(me)
        self.need = need = plan.need(me)
        self.src_shape = sb.shape if sb is not None else None
        self.need_shape = need.shape if need is not None else None
        self.sends = [(d, b.slices(sb.lo), b.shape) for d, b in plan.sends(me) if d != me]
        if need is not None:
            self.recvs = [(s, b.slices(need.lo), b.shape) for s, b in plan.receives(me) if s != me]
            self.local = [(b.slices(sb.lo), b.slices(need.lo), b) for s, b in plan.receives(me) if s == me]
        else:
            self.recvs, self.local = [], []
        self.view = (need is not None and not need.empty and not self.recvs and len(self.local) == 1)
        self.traffic = plan.total_bytes() > 0
        self.moves = bool(self.sends or self.recvs)
        self.whole_tile = (sb is not None and len(self.local) == 1 and self.local[0][2] == sb)
        self.sent = plan.bytes_sent(me)
        self.received = plan.bytes_received(me)
        self.sources = [me] * len(self.local) + [s for s, _, _ in self.recvs]
        self.rel_boxes = ([b.shift(need.lo) for _, _, b in self.local]
                          + [tuple((x.start, x.stop) for x in sl) for _, sl, _ in self.recvs]) if need else []
        self.graphs: dict = {}
        self.slots: dict = {}
        self.busy: set = set()
        self.recipes: dict = {}

    def recipe(self, what, array, dtype):
        key = (what, array.shape, array.strides, np.dtype(dtype).char)
        r = self.recipes.get(key)
        if r is None:
            if len(self.recipes) > 64:
                self.recipes.clear()
            entries = self.sends if what == "fsend" else self.recvs
            r = _recipe_for(array, entries, dtype)
            self.recipes[key] = r
        return r

    def contiguous(self, what, dtype):
        key = (what, np.dtype(dtype).char)
        r = self.recipes.get(key)
        if r is None:
            entries = self.recvs if what == "fresh" else self.sends
            r = self.recipes[key] = _contiguous_recipe(entries, dtype)
        return r

    def slot(self, purpose, n, dtype, xp):
        """A persistent flat buffer of at least ``n`` elements for
        ``purpose`` (packing or staging), or a fresh one while the last is
        still in use by a flight."""
        key = (purpose, np.dtype(dtype).char, xp.__name__)
        if key in self.busy:
            return xp.empty(n, dtype=dtype), None
        buf = self.slots.get(key)
        if buf is None or buf.size < n:
            buf = self.slots[key] = xp.empty(n, dtype=dtype)
        self.busy.add(key)
        return buf, key


class Flight:
    """Transfers started by ``start_exchange`` or ``start_adjoint``;
    ``finish()`` waits for them and returns the result (the region, or the
    tile's gradient).  ``test()`` lets MPI advance them meanwhile."""

    __slots__ = ("cm", "prog", "key", "category", "direction", "transport", "reqs", "keep", "types",
                 "unpack", "slot_keys", "spent", "nbytes", "messages", "done", "_finish",
                 "started_at", "region_parts", "part_sources", "count", "background")

    def __init__(self, cm, prog, key, category, direction, transport):
        self.cm, self.prog, self.key, self.category = cm, prog, key, category
        self.direction, self.transport = direction, transport
        self.reqs = []
        self.keep = []
        self.types = []
        self.unpack = []
        self.slot_keys = []
        self.spent = 0.0
        self.nbytes = 0
        self.messages = 0
        self.done = False
        self._finish = None
        self.count = False
        self.region_parts = None
        self.part_sources = None
        self.background = False
        self.started_at = time.perf_counter()

    def test(self) -> bool:
        if self.done or not self.reqs:
            return True
        return MPI.Request.Testall(self.reqs)

    def finish(self, *args, **kw):
        if self.done:
            raise RuntimeError(f"the exchange {self.key!r} was finished twice")
        t0 = time.perf_counter()
        if self.background:
            self.cm._progress.release(self)
            self.background = False
        if self.reqs:
            MPI.Request.Waitall(self.reqs)
        for t in self.types:
            t.Free()
        if self.unpack:
            conv = self.cm._to_compute
            for dst, src in self.unpack:
                dst[...] = conv(src)
        for k in self.slot_keys:
            self.prog.busy.discard(k)
        self.done = True
        out = self._finish(*args, **kw) if self._finish is not None else None
        self.spent += time.perf_counter() - t0
        if self.count:
            self.cm.counter.add(self.category, self.nbytes, self.key, self.direction,
                                calls=self.messages, seconds=self.spent)
        self.keep = self.types = self.unpack = None
        return out


class _Progress:
    """A thread that advances exchanges in flight behind computation: it
    tests their requests every ``interval`` seconds until they complete
    (MPICH advances a rendezvous -- large messages, or any message over
    TCP -- only inside MPI calls, and the computing thread makes none),
    then sleeps.  A flight leaves it (``release``) before its own thread
    waits on it, so that no request is completed by two threads at once.
    Needs MPI_THREAD_MULTIPLE."""

    def __init__(self, interval):
        import threading
        self.interval = interval
        self.flights: list = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="hpcnn-mpi-progress", daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping:
            self.wake.wait()
            with self.lock:
                self.flights = [fl for fl in self.flights if not MPI.Request.Testall(fl.reqs)]
                if not self.flights:
                    self.wake.clear()
            time.sleep(self.interval)

    def acquire(self, fl):
        with self.lock:
            self.flights.append(fl)
            self.wake.set()

    def release(self, fl):
        with self.lock:
            if fl in self.flights:
                self.flights.remove(fl)

    def stop(self):
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=5)


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
        self._programs: dict = {}
        # staging through host memory when the arrays live on a GPU and MPI
        # does not accept device buffers
        if self.backend.is_gpu and probe:
            detect_cuda_aware(self.mpi, self.backend)
        self.staging = bool(self.backend.is_gpu and not self.backend.cuda_aware)
        self.device_buffers = bool(self.backend.is_gpu and not self.staging)
        self._progress = None

    def background(self, fl) -> None:
        """Keep MPI progressing ``fl`` while this thread computes (until
        ``fl`` finishes): the progress thread, when MPI allows threads."""
        if fl.reqs and not fl.background and self._progress_thread() is not None:
            self._progress.acquire(fl)
            fl.background = True

    def _progress_thread(self):
        if self._progress is None:
            us = os.environ.get("HPCNN_PROGRESS_US", "").strip()
            interval = float(us) * 1e-6 if us else PROGRESS_INTERVAL
            if interval <= 0 or MPI.Query_thread() != MPI.THREAD_MULTIPLE:
                self._progress = False
            else:
                self._progress = _Progress(interval)
        return self._progress or None

    # ---- buffers ------------------------------------------------------------
    def _sync(self):
        if self.backend.is_gpu:
            self.backend.synchronize()

    def _alloc(self, shape, dtype, like=None, zeros=False):
        """A new array of ``shape`` on the compute device, laid out in
        memory like ``like`` when that is a 4-D channels-last array (the
        layout the fast kernels return and read without a copy), channels-
        last too for a 4-D array without a model, else C-contiguous."""
        xp = self.backend.xp
        make = xp.zeros if zeros else xp.empty
        if len(shape) == 4 and shape[1] > 1 and (like is None or (
                like.ndim == 4 and like.shape[1] > 1 and like.strides[1] == like.itemsize
                and not like.flags.c_contiguous)):
            n, c, h, w = shape
            return make((n, h, w, c), dtype=dtype).transpose(0, 3, 1, 2)
        return make(shape, dtype=dtype)

    def _to_compute(self, a):
        return self.backend.to_device(a) if self.staging else a

    def _tag(self, tag):
        return int(tag) % _TAG_SPAN

    def _program(self, plan) -> _Program:
        prog = self._programs.get(plan)
        if prog is None:
            prog = self._programs[plan] = _Program(plan, self.rank)
        return prog

    def _check_transport(self, transport):
        t = self.transport if transport is None else transport
        if t not in TRANSPORTS:
            raise ValueError(f"unknown transport {t!r}: choose one of {', '.join(TRANSPORTS)}")
        if self.backend.is_gpu:
            t = "p2p"      # device arrays travel packed, point to point
        return t

    @staticmethod
    def _host_ok(a) -> bool:
        if a is None:
            return True
        if not isinstance(a, np.ndarray):
            return False
        if a.flags.c_contiguous or (a.ndim == 4 and a.transpose(0, 2, 3, 1).flags.c_contiguous):
            return True
        return _positive(a)

    # ---- moving pieces (host memory) ------------------------------------------------
    def _bind(self, fl, prog, recipe, array, purpose, dtype, send):
        """[(peer, memory spec)] of a recipe's pieces in ``array`` (packing
        the short-run pieces of a send into the plan's buffer now, or
        staging those of a receive, unpacked at the end); also the array's
        base address and whether every piece is in place in it."""
        base = _address(array)
        out = []
        slot = None
        fromaddr = MPI.memory.fromaddress
        for p in recipe.pieces:
            if p.slot < 0:
                out.append((p.peer, p, fromaddr(base + p.off, p.span)))
                continue
            if slot is None:
                slot, skey = prog.slot(purpose, recipe.slots, dtype, np)
                if skey is not None:
                    fl.slot_keys.append(skey)
                fl.keep.append(slot)
            part = slot[p.slot:p.slot + p.count].reshape(p.cshape)
            if send:
                part[...] = _canonical(array[p.sl])
            else:
                fl.unpack.append((_canonical(array[p.sl]), part))
            out.append((p.peer, p, fromaddr(_address(part), p.span)))
        return out, base

    def _bind_one(self, fl, prog, peer, a, purpose, dtype):
        """(peer, piece, memory) of one whole array to send: in place, or
        packed into its own persistent buffer when its runs are short."""
        c = _canonical(a)
        p, used = _describe(peer, (slice(None),) * a.ndim, c, _address(c), dtype, 0)
        fl.keep.append(a)
        if p.slot < 0:
            return peer, p, MPI.memory.fromaddress(_address(c), p.span)
        slot, skey = prog.slot(purpose, used, dtype, np)
        if skey is not None:
            fl.slot_keys.append(skey)
        part = slot[:p.count].reshape(p.cshape)
        part[...] = c
        fl.keep.append(slot)
        return peer, p, MPI.memory.fromaddress(_address(part), p.span)

    def _post(self, fl, transport, sends, recvs, tag, graph_key, prog, sbase=None, rbase=None):
        """Start the transfers: ``sends``/``recvs`` are [(peer, _Piece,
        memory)]; ``sbase``/``rbase`` (address, span) of the one array
        every piece of that side lies in, when they all do (the collectives
        then take byte displacements into it, else absolute addresses)."""
        t = self._tag(tag)
        self._sync()
        mpi = self.mpi
        if transport == "p2p":
            reqs = fl.reqs
            for peer, p, mem in recvs:
                reqs.append(mpi.Irecv([mem, p.count, p.mtype], peer, t))
            for peer, p, mem in sends:
                reqs.append(mpi.Isend([mem, p.count, p.mtype], peer, t))
            return

        def side(items, base):
            if base is not None:
                a0, span = base
                return (MPI.memory.fromaddress(a0, span) if span else MPI.BOTTOM,
                        [p.count for _, p, _ in items], [p.off for _, p, _ in items],
                        [p.mtype for _, p, _ in items])
            types = []
            for _, p, mem in items:
                at = MPI.Datatype.Create_struct([p.count], [MPI.Get_address(mem)], [p.mtype])
                at.Commit()
                types.append(at)
            fl.types.extend(types)
            return MPI.BOTTOM, [1] * len(items), [0] * len(items), types

        sb, sc, sd, st = side(sends, sbase)
        rb, rc, rd, rt = side(recvs, rbase)
        if transport == "alltoallw":
            P = self.size
            SC, SD, ST = [0] * P, [0] * P, [MPI.BYTE] * P
            RC, RD, RT = [0] * P, [0] * P, [MPI.BYTE] * P
            for (peer, _, _), c, d, ty in zip(sends, sc, sd, st):
                SC[peer], SD[peer], ST[peer] = c, d, ty
            for (peer, _, _), c, d, ty in zip(recvs, rc, rd, rt):
                RC[peer], RD[peer], RT[peer] = c, d, ty
            if not sends:
                sb = MPI.BOTTOM
            if not recvs:
                rb = MPI.BOTTOM
            fl.reqs.append(mpi.Ialltoallw([sb, SC, SD, ST], [rb, RC, RD, RT]))
            return
        # neighbourhood collective on the plan's graph (sources: who sends
        # to this rank in this direction; destinations: whom it sends to)
        gc = prog.graphs.get(graph_key)
        if gc is None:
            gc = prog.graphs[graph_key] = mpi.Create_dist_graph_adjacent(
                [peer for peer, _, _ in recvs], [peer for peer, _, _ in sends], reorder=False)
        fl.reqs.append(gc.Ineighbor_alltoallw([sb if sends else MPI.BOTTOM, sc, sd, st],
                                              [rb if recvs else MPI.BOTTOM, rc, rd, rt]))

    # ---- forward ------------------------------------------------------------
    def exchange(self, plan, tile, dtype=None, tag=0, key=None, category="exchange", pieces=False,
                 transport=None):
        """Run ``plan`` forward.  ``tile`` is this rank's source tile (None
        when it holds none).  Returns this rank's region (an array of the
        clipped need's shape, a view of ``tile`` when it comes from the tile
        alone; a ``TileRegion`` with ``pieces=True``) or None when this rank
        needs nothing."""
        return self.start_exchange(plan, tile, dtype, tag, key, category, pieces, transport).finish()

    def local_region(self, plan, tile, dtype=None, key=None):
        """The region of a plan that moves nothing on any rank: (a view of)
        this rank's tile, or None when it needs nothing; what ``exchange``
        returns, without a flight."""
        prog = self._programs.get(plan) or self._program(plan)
        if prog.traffic or not (prog.view or prog.need is None):
            return self.exchange(plan, tile, dtype, key=key)
        if prog.need is None:
            return None
        if tile is None or tile.shape != prog.src_shape:
            return self.exchange(plan, tile, dtype, key=key)     # says what is wrong
        loc = prog.local[0]
        return tile if loc[2] == prog.src_box else tile[loc[0]]

    def start_exchange(self, plan, tile, dtype=None, tag=0, key=None, category="exchange",
                       pieces=False, transport=None) -> Flight:
        """Start ``plan`` forward; ``finish()`` of the returned flight gives
        what ``exchange`` returns.  With ``pieces=True``, ``region(flight,
        wait)`` gives the region at once, its own parts readable and the
        others after ``wait`` (which must finish the flight)."""
        me = self.rank
        prog = self._programs.get(plan) or self._program(plan)
        src_box = prog.src_box
        if src_box is not None:
            if tile is None:
                raise ValueError(f"rank {me} holds tile {src_box} of the source of plan {key!r} "
                                 "but passed no array")
            if tile.shape != prog.src_shape:
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
        t0 = time.perf_counter()
        transport = self._check_transport(transport)
        fl = Flight(self, prog, key, category, "forward", transport)
        need = prog.need
        out = flat = None
        if prog.view:
            loc = prog.local[0]
            out = tile if loc[2] == src_box else tile[loc[0]]
            pieces = False
        elif need is not None:
            if pieces and prog.recvs:
                fresh, total = prog.contiguous("fresh", dtype)
                flat = self.backend.xp.empty(total, dtype=dtype)
            else:
                pieces = False
                out = self._alloc(prog.need_shape, dtype, like=tile)
        if prog.traffic and (prog.moves or transport in _COLLECTIVE):
            if not self.backend.is_gpu and not self._host_ok(tile):
                tile = self._host_copy(tile)
            if self.backend.is_gpu:
                self._start_device(fl, prog, tile, out if not prog.view else None, flat, dtype, tag)
            else:
                sends, sbase = ([], None)
                if prog.sends:
                    sr = prog.recipe("fsend", tile, dtype)
                    sends, a0 = self._bind(fl, prog, sr, tile, "fsend", dtype, True)
                    if sr.direct and transport in _COLLECTIVE:
                        sbase = (a0, _span(tile))
                    fl.keep.append(tile)
                recvs, rbase = ([], None)
                if prog.recvs and flat is not None:
                    recvs, a0 = self._bind(fl, prog, fresh, flat, "frecv", dtype, False)
                    rbase = (a0, flat.nbytes)
                elif prog.recvs and out is not None:
                    rr = prog.recipe("frecv", out, dtype)
                    recvs, a0 = self._bind(fl, prog, rr, out, "frecv", dtype, False)
                    if rr.direct and transport in _COLLECTIVE:
                        rbase = (a0, _span(out))
                self._post(fl, transport, sends, recvs, tag, "forward", prog, sbase, rbase)
            fl.nbytes, fl.messages, fl.count = prog.sent, len(prog.sends), True
        # this rank's own pieces, while the others travel
        if out is not None and not prog.view:
            for tsl, nsl, _ in prog.local:
                out[nsl] = tile[tsl]
        fl.spent = time.perf_counter() - t0
        if flat is not None:
            parts = [(rb, tile[tsl], True) for (tsl, _, _), rb in zip(prog.local, prog.rel_boxes)]
            for p, rb in zip(fresh.pieces, prog.rel_boxes[len(prog.local):]):
                a = flat[p.off // dtype.itemsize:p.off // dtype.itemsize + p.count].reshape(p.cshape)
                parts.append((rb, a.transpose(0, 3, 1, 2) if a.ndim == 4 else a, False))
            fl.region_parts = (prog.need_shape, dtype, parts)
            fl.part_sources = prog.sources
            fl._finish = lambda: self._region_of(fl, None)
        else:
            fl._finish = lambda: out
        return fl

    def _host_copy(self, a):
        """A copy with positive strides of an array MPI cannot address as
        it is (negative or zero strides), in the same layout otherwise."""
        out = self._alloc(a.shape, a.dtype, like=a if a.ndim == 4 else None)
        out[...] = a
        return out

    def _region_of(self, fl, wait):
        from hpcnn.ops.base import TileRegion
        shape, dtype, parts = fl.region_parts
        return TileRegion(shape, dtype, parts, wait=wait, xp=self.backend.xp)

    def region(self, fl, wait):
        """The TileRegion of a flight started with ``pieces=True`` before it
        finished: ``wait`` must finish ``fl``."""
        return self._region_of(fl, wait)

    # ---- device arrays: packed, point to point --------------------------------------
    def _start_device(self, fl, prog, tile, out, flat, dtype, tag):
        xp = self.backend.xp
        t = self._tag(tag)
        mt = _mpi_type(dtype)
        sends = []
        for d, sl, _ in prog.sends:
            a = xp.ascontiguousarray(_canonical(tile[sl]))
            if self.staging:
                a = to_host(a)
            sends.append((d, a))
        recvs = []
        if flat is not None:
            fresh, _ = prog.contiguous("fresh", dtype)
            for p in fresh.pieces:
                i0 = p.off // dtype.itemsize
                dst = flat[i0:i0 + p.count]
                if self.staging:
                    h = np.empty(p.count, dtype=dtype)
                    fl.unpack.append((dst, h))
                    dst = h
                recvs.append((p.peer, dst))
        elif out is not None:
            for s, sl, _ in prog.recvs:
                c = _canonical(out[sl])
                h = np.empty(c.shape, dtype=dtype) if self.staging else xp.empty(c.shape, dtype=dtype)
                fl.unpack.append((c, h))
                recvs.append((s, h))
        fl.keep.extend(a for _, a in sends + recvs)
        self._sync()
        for s, buf in recvs:
            fl.reqs.append(self.mpi.Irecv([buf, buf.size, mt], s, t))
        for d, buf in sends:
            fl.reqs.append(self.mpi.Isend([buf, buf.size, mt], d, t))

    # ---- backward (adjoint) -------------------------------------------------
    def exchange_adjoint(self, plan, grad, acc=None, dtype=None, tag=0, key=None,
                         category="exchange", transport=None, borrow=False):
        """The adjoint of ``exchange``.  ``grad`` is the gradient of this
        rank's region (an array of its shape, or {source rank: gradient of
        that piece}, None entries and None meaning zeros); ``acc`` is the
        gradient of this rank's source tile, to which the returned pieces are
        added in place (created when None and this rank holds a source tile:
        with ``borrow``, this rank's own piece of ``grad`` itself when it is
        the whole tile, else zeros).  Returns ``acc`` (None when this rank
        holds no source tile)."""
        return self.start_adjoint(plan, grad, dtype, tag, key, category, transport).finish(acc, borrow=borrow)

    def start_adjoint(self, plan, grad, dtype=None, tag=0, key=None, category="exchange",
                      transport=None) -> Flight:
        """Start the adjoint: the gradients of the pieces that came from
        other ranks go home.  ``finish(acc, local=None, borrow=False)``
        waits and sums into ``acc`` what comes back and this rank's own
        pieces (from ``local`` when given: {rank: gradient} or the region's
        gradient array, else from ``grad``)."""
        me = self.rank
        prog = self._program(plan)
        need, src_box = prog.need, prog.src_box
        if dtype is None:
            if isinstance(grad, dict):
                dtype = next((g.dtype for g in grad.values() if g is not None), None)
            elif grad is not None:
                dtype = grad.dtype
            if dtype is None:
                raise ValueError(f"rank {me}: give the dtype of plan {key!r}'s gradient")
        dtype = np.dtype(dtype)
        if need is not None and grad is not None and not isinstance(grad, dict) \
                and tuple(grad.shape) != need.shape:
            raise ValueError(f"rank {me}: plan {key!r} expects a region gradient of shape "
                             f"{need.shape}, got {tuple(grad.shape)}")
        t0 = time.perf_counter()
        transport = self._check_transport(transport)
        fl = Flight(self, prog, key, category, "backward", transport)
        back = []         # (tile slices, staged gradient piece) summed into the tile's gradient
        if prog.traffic and (prog.moves or transport in _COLLECTIVE):
            xp = self.backend.xp
            host = not self.backend.is_gpu
            # the gradients of the pieces other ranks sent go back to them
            sends, sbase = [], None
            if prog.recvs:
                if isinstance(grad, dict) or grad is None:
                    arrays = [self._piece_grad(grad, s, sl, shape, dtype) for s, sl, shape in prog.recvs]
                    if host:
                        for i, ((s, _, _), a) in enumerate(zip(prog.recvs, arrays)):
                            a = a if self._host_ok(a) else self._host_copy(a)
                            sends.append(self._bind_one(fl, prog, s, a, f"asend{i}", dtype))
                    else:
                        dev = arrays
                else:
                    g = grad if not host or self._host_ok(grad) else self._host_copy(grad)
                    if host:
                        sr = prog.recipe("asend", g, dtype)
                        sends, a0 = self._bind(fl, prog, sr, g, "asend", dtype, True)
                        sbase = (a0, _span(g)) if sr.direct else None
                        fl.keep.append(g)
                    else:
                        dev = [g[sl] for _, sl, _ in prog.recvs]
            # what comes back is staged, then summed into the tile's gradient
            recvs, rbase = [], None
            if prog.sends:
                rr, total = prog.contiguous("aback", dtype)
                flat, skey = prog.slot("arecv", total, dtype, np if (host or self.staging) else xp)
                if skey is not None:
                    fl.slot_keys.append(skey)
                fl.keep.append(flat)
                it = dtype.itemsize
                for p in rr.pieces:
                    part = flat[p.off // it:p.off // it + p.count].reshape(p.cshape)
                    back.append((p.sl, part))
                if host:
                    a0 = _address(flat)
                    recvs = [(p.peer, p, MPI.memory.fromaddress(a0 + p.off, p.span)) for p in rr.pieces]
                    rbase = (a0, flat.nbytes)
            if host:
                self._post(fl, transport, sends, recvs, tag, "adjoint", prog, sbase, rbase)
            else:
                t = self._tag(tag)
                mt = _mpi_type(dtype)
                outgoing = []
                for (s, _, _), a in zip(prog.recvs, dev if prog.recvs else []):
                    a = xp.ascontiguousarray(_canonical(a))
                    outgoing.append((s, to_host(a) if self.staging else a))
                fl.keep.extend(a for _, a in outgoing)
                self._sync()
                for (d, _, _), (_, part) in zip(prog.sends, back):
                    fl.reqs.append(self.mpi.Irecv([part, part.size, mt], d, t))
                for s, a in outgoing:
                    fl.reqs.append(self.mpi.Isend([a, a.size, mt], s, t))
            fl.nbytes, fl.messages, fl.count = prog.received, len(prog.recvs), True
        fl.spent = time.perf_counter() - t0

        def finish(acc=None, local=None, borrow=False):
            src = grad if local is None else local
            if src_box is None:
                return acc
            own = [(tsl, self._piece_grad(src, me, nsl, b.shape, dtype, zeros=False))
                   for tsl, nsl, b in prog.local]
            if acc is None:
                if (borrow and prog.whole_tile and own and own[0][1] is not None
                        and tuple(own[0][1].shape) == src_box.shape):
                    acc = own[0][1]
                    own = []
                else:
                    like = next((g for _, g in own if g is not None), None)
                    acc = self._alloc(src_box.shape, dtype, like=like, zeros=True)
            xp = self.backend.xp
            for tsl, g in own:
                if g is not None:
                    view = acc[tsl]
                    xp.add(view, g, out=view)
            for tsl, part in back:
                view = _canonical(acc[tsl])
                xp.add(view, self._to_compute(part), out=view)
            return acc
        fl._finish = finish
        return fl

    def _piece_grad(self, grad, src, slices, shape, dtype, zeros=True):
        """The gradient of the piece that came from ``src`` (at ``slices``
        of the region): from the region's gradient array, or the entry of a
        {rank: gradient} mapping; zeros (or None) when there is none."""
        if isinstance(grad, dict):
            g = grad.get(src)
        elif grad is not None:
            g = grad[slices]
        else:
            g = None
        if g is None and zeros:
            g = self._alloc(shape, dtype, zeros=True)
        return g

    # ---- choosing a transport ---------------------------------------------------
    def measure_transports(self, plan, dtype, pieces=False, reps=3, transports=TRANSPORTS) -> dict:
        """Seconds of one forward and adjoint of ``plan`` per transport: the
        median of ``reps`` (after one untimed), the slowest rank's, the same
        on every rank.  Collective (every rank calls it for the same plans in
        the same order); counts nothing in ``counter``."""
        prog = self._program(plan)
        dtype = np.dtype(dtype)
        tile = self._alloc(prog.src_box.shape, dtype, zeros=True) if prog.src_box is not None else None
        need = prog.need
        grad = self._alloc(need.shape, dtype, zeros=True) if need is not None else None
        saved, self.counter = self.counter, ByteCounter()
        mine = []
        try:
            for t in transports:
                times = []
                for r in range(reps + 1):
                    t0 = time.perf_counter()
                    self.exchange(plan, tile, dtype, tag=1, pieces=pieces, transport=t)
                    self.exchange_adjoint(plan, grad, None, dtype, tag=2, transport=t)
                    if r:
                        times.append(time.perf_counter() - t0)
                mine.append(float(np.median(times)))
        finally:
            self.counter = saved
        worst = np.empty(len(mine))
        self.mpi.Allreduce(np.asarray(mine, dtype=np.float64), worst, op=MPI.MAX)
        return dict(zip(transports, (float(v) for v in worst)))

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
        if self._progress:
            self._progress.stop()
        self._progress = None
        for prog in self._programs.values():
            for gc in prog.graphs.values():
                gc.Free()
            prog.graphs.clear()
        self._programs.clear()
        if self.mpi not in (MPI.COMM_WORLD, MPI.COMM_SELF):
            self.mpi.Free()
