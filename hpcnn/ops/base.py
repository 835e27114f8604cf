"""The contract every op keeps: whole-tensor shape inference, parameters,
geometry (which input box an output box reads) and the local math of one tile
(forward and backward on arrays).  No communication happens here: an op that
needs a sum over other tiles (batch-norm statistics) calls ``ctx.allreduce``,
which the runtime supplies (identity in a single process).

Boxes here are plain tuples of half-open ``(lo, hi)`` pairs, one per
dimension of the tensor in its logical order (NCHW, NCDHW for volumes, or
(n, c) for fully connected tensors).  An input box may reach outside ``[0, size)``: the part
outside is padding, which the op supplies itself.  The runtime hands the op
the *clipped* region (the part inside the tensor) and the op learns the
padding from ``ctx.pads(i)``.  The sequential trainer and the distributed
runtime call exactly the same methods; the sequential one simply asks for the
whole output box.

An op that sets ``takes_pieces`` may instead be handed a ``TileRegion``:
the same clipped region as parts (this rank's own tile, or a part of it,
and the pieces other ranks send), none of them copied into one array.  Its
own parts can be read at once; the others only after ``region.wait()``,
which the runtime supplies (the halo may still be in flight until then, so
an op computes what its own parts alone determine first).  Its backward
then returns a ``PartGrads`` for that input (one gradient per part), and
may hand the gradients of the parts that came from other ranks back early
through ``ctx.halo_grads_ready[i]``, so that they travel while it computes
the rest.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import numpy as np

from hpcnn.backend import array_module

DIMS_5D = ("n", "c", "d", "h", "w")
DIMS_4D = ("n", "c", "h", "w")
DIMS_2D = ("n", "c")
DIMS_1D = ("n",)

#: the op kinds that end a network: each sample's loss divided by the global
#: batch size, shape (N,), fed by the logits (or predictions) and the labels
LOSS_KINDS = frozenset({"softmax_xent", "mse"})


def dims_of(shape) -> tuple[str, ...]:
    """Logical dimension names of a tensor of this rank."""
    return {5: DIMS_5D, 4: DIMS_4D, 2: DIMS_2D, 1: DIMS_1D}[len(shape)]


class OpError(ValueError):
    """A bad op attribute, input shape or dtype.  The message names the
    layer and the offending value."""


def full_box(shape) -> tuple:
    return tuple((0, int(s)) for s in shape)


def clip_box(box, shape) -> tuple:
    """The part of ``box`` inside a tensor of ``shape`` (may be empty)."""
    out = []
    for (lo, hi), s in zip(box, shape):
        a, b = max(lo, 0), min(hi, s)
        if b < a:
            b = a = min(max(lo, 0), s)
        out.append((a, b))
    return tuple(out)


def box_shape(box) -> tuple:
    return tuple(max(0, hi - lo) for lo, hi in box)


def box_pads(box, shape) -> tuple:
    """Per dimension, how far ``box`` reaches below 0 and above ``size``:
    the padding the op must supply around the clipped region."""
    return tuple((max(0, -lo), max(0, hi - s)) for (lo, hi), s in zip(box, shape))


@dataclass(frozen=True)
class ParamSpec:
    """One parameter (or buffer) of an op.  Axis 0 is always the output
    channel: a layer split c ways holds the rows of its c-range."""
    shape: tuple
    init: str            # kaiming_fan_out | uniform_fan_in | ones | zeros
    fan: int = 1         # fan used by the initialiser
    trainable: bool = True

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def shard_size(self, parts: int) -> int:
        """Elements of the largest shard when the output channels (axis 0)
        are split ``parts`` ways (the split rule: the first shards get the
        extra rows)."""
        return -(-int(self.shape[0]) // int(parts)) * int(np.prod(self.shape[1:]))


def init_param(spec: ParamSpec, key: str, seed: int, dtype=np.float32) -> np.ndarray:
    """The whole logical tensor of a parameter, a pure function of
    (seed, key): every rank and every plan get the same values."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode())])
    if spec.init == "kaiming_fan_out":
        a = rng.standard_normal(spec.shape) * np.sqrt(2.0 / max(1, spec.fan))
    elif spec.init == "uniform_fan_in":
        bound = 1.0 / np.sqrt(max(1, spec.fan))
        a = rng.uniform(-bound, bound, spec.shape)
    elif spec.init == "ones":
        a = np.ones(spec.shape)
    elif spec.init == "zeros":
        a = np.zeros(spec.shape)
    else:
        raise OpError(f"parameter {key}: unknown initialiser {spec.init!r}")
    return a.astype(dtype)


def _identity(a):
    return a


class RegionPart:
    """One part of a ``TileRegion``: ``box`` (relative to the region, a
    tuple of (lo, hi) per dimension) and its array.  ``local``: the part
    comes from this rank's own tile (readable at once); the array of a part
    from another rank may only be read after the region's ``wait()``."""

    __slots__ = ("box", "local", "_array", "_region")

    def __init__(self, box, array, local, region):
        self.box, self.local, self._array, self._region = tuple(box), bool(local), array, region

    @property
    def array(self):
        if not self.local and not self._region.arrived:
            raise RuntimeError("a part of the region that another rank sends was read before "
                               "region.wait(): call wait() first (the halo may still be in flight)")
        return self._array

    @property
    def shape(self) -> tuple:
        return box_shape(self.box)


class TileRegion:
    """The clipped input region of a tile, given as parts that partition
    it instead of one array (see the module docstring): no part is copied
    to assemble it.  ``shape``/``dtype`` are the region's; ``parts`` lists
    every part, this rank's own first."""

    def __init__(self, shape, dtype, parts, wait: Callable | None = None, xp=None):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self._wait = wait
        self.arrived = wait is None
        self.xp = xp
        self.parts = [RegionPart(b, a, loc, self) for b, a, loc in parts]
        self.parts.sort(key=lambda p: not p.local)

    def wait(self) -> None:
        """Block until the parts from other ranks have arrived."""
        if not self.arrived:
            self._wait()
            self.arrived = True

    def local_parts(self) -> list:
        return [p for p in self.parts if p.local]

    def remote_parts(self) -> list:
        return [p for p in self.parts if not p.local]

    def assemble(self, like=None):
        """The region as one array (waits first): what an op that does not
        take pieces reads; channels-last when the first part is."""
        self.wait()
        xp = self.xp if self.xp is not None else array_module(self.parts[0].array)
        first = self.parts[0].array if self.parts else None
        if (len(self.shape) == 4 and first is not None and first.ndim == 4 and self.shape[1] > 1
                and first.strides[1] == first.itemsize and not first.flags.c_contiguous):
            n, c, h, w = self.shape
            out = xp.empty((n, h, w, c), dtype=self.dtype).transpose(0, 3, 1, 2)
        else:
            out = xp.empty(self.shape, dtype=self.dtype)
        for p in self.parts:
            out[tuple(slice(lo, hi) for lo, hi in p.box)] = p.array
        return out


class PartGrads(list):
    """The gradient of a ``TileRegion`` input, per part: ``self[k]`` is the
    gradient of ``region.parts[k]`` (of that part's shape), None where it is
    zero or was already handed back through ``ctx.halo_grads_ready``.  The
    runtime owns these arrays afterwards (it sums other ranks' gradients
    into them in place)."""


@dataclass
class TileContext:
    """What an op knows about the tile it computes.

    out_box   : global box of the output tile
    in_boxes  : the (unclipped) input boxes the op asked for via input_box
    in_shapes : global shapes of the inputs
    out_shape : global shape of the output
    training  : training mode (batch norm batch statistics, dropout active)
    seed, step: key of the reproducible randomness (dropout)
    allreduce : sums an array over the tiles that share this tile's channel
                range (batch-norm statistics); identity in one process
    labels    : integer labels of the tile's samples (loss only)
    input_grads: per input, whether its gradient is wanted (None: all are);
                an op may return None for an input marked False (the
                network's input needs none) and skip that work
    halo_grads_ready: per input, None or a callable taking {part index:
                gradient} of a TileRegion's parts from other ranks: their
                gradients start home while the op computes the rest
    """
    out_box: tuple
    in_boxes: list
    in_shapes: list
    out_shape: tuple
    training: bool = True
    seed: int = 0
    step: int = 0
    allreduce: Callable = _identity
    labels: object = None
    input_grads: tuple | None = None
    halo_grads_ready: list | None = None

    @classmethod
    def whole(cls, op: "Op", in_shapes, **kw) -> "TileContext":
        """The context of the whole tensor (the sequential case)."""
        out_shape = op.infer_shape(in_shapes)
        ob = full_box(out_shape)
        return cls(out_box=ob,
                   in_boxes=[op.input_box(i, ob, in_shapes) for i in range(len(in_shapes))],
                   in_shapes=list(in_shapes), out_shape=tuple(out_shape), **kw)

    def needs_input_grad(self, i: int = 0) -> bool:
        return self.input_grads is None or bool(self.input_grads[i])

    def pads(self, i: int = 0) -> tuple:
        return box_pads(self.in_boxes[i], self.in_shapes[i])

    def clipped(self, i: int = 0) -> tuple:
        return clip_box(self.in_boxes[i], self.in_shapes[i])


class Op:
    """Base class of every op.  Subclasses set ``kind`` and implement the
    methods below; attributes are validated in ``__init__`` so that a bad
    value is reported with the layer's name before anything runs."""

    kind: ClassVar[str] = "op"
    arity: ClassVar[int | None] = 1          # None: any number >= 1
    # output dimensions this op's output tile may be split over
    splittable: ClassVar[tuple] = ("n", "c", "d", "h", "w")
    # forward accepts a TileRegion for inputs that arrive by exchange (and
    # backward then returns a PartGrads for them); see the module docstring
    takes_pieces: ClassVar[bool] = False

    def convolves_pieces(self, channel_split: bool) -> bool:
        """For an op that takes pieces: whether it computes on them part by
        part (assembling nothing, overlapping the transfer) when the parts
        split the input channels or not.  The cost model prices by it."""
        return self.takes_pieces

    def __init__(self, name: str = ""):
        self.name = name or self.kind

    # ---- helpers for subclasses --------------------------------------
    def fail(self, msg: str):
        raise OpError(f"layer {self.name!r} ({self.kind}): {msg}")

    def _pos_int(self, attr: str, v, allow_zero=False) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            self.fail(f"{attr} must be an integer, got {v!r}")
        v = int(v)
        if v < 0 or (v == 0 and not allow_zero):
            self.fail(f"{attr} must be {'non-negative' if allow_zero else 'positive'}, got {v}")
        return v

    def _required_pos_int(self, attr: str, v) -> int:
        """A positive integer attribute the op cannot do without."""
        if v is None:
            self.fail(f"{attr} is required")
        return self._pos_int(attr, v)

    def _flag(self, attr: str, v) -> bool:
        if not isinstance(v, bool):
            self.fail(f"{attr} must be true or false, got {v!r}")
        return v

    def _pair(self, attr: str, v, allow_zero=False) -> tuple:
        if isinstance(v, (tuple, list)):
            if len(v) != 2:
                self.fail(f"{attr} must be an int or a pair, got {v!r}")
            return (self._pos_int(attr, v[0], allow_zero), self._pos_int(attr, v[1], allow_zero))
        x = self._pos_int(attr, v, allow_zero)
        return (x, x)

    def check_arity(self, in_shapes):
        if self.arity is None:
            if len(in_shapes) < 1:
                self.fail("needs at least one input")
        elif len(in_shapes) != self.arity:
            self.fail(f"takes {self.arity} input(s), got {len(in_shapes)}")
        for i, s in enumerate(in_shapes):
            if any(int(d) <= 0 for d in s):
                self.fail(f"input {i} shape {tuple(s)} has a non-positive size")

    def check_rank(self, shape, rank: int, what="input"):
        if len(shape) != rank:
            self.fail(f"{what} must have {rank} dimensions "
                      f"({''.join(dims_of((0,) * rank)).upper()}), got shape {tuple(shape)}")
        for s in shape:
            if int(s) <= 0:
                self.fail(f"{what} shape {tuple(shape)} has a non-positive size")

    # ---- the contract ------------------------------------------------------
    def attrs(self) -> dict:
        """JSON-able attributes (enough to rebuild the op)."""
        return {}

    def infer_shape(self, in_shapes: Sequence[tuple]) -> tuple:
        raise NotImplementedError

    def param_specs(self, in_shapes) -> dict[str, ParamSpec]:
        return {}

    def buffer_specs(self, in_shapes) -> dict[str, ParamSpec]:
        return {}

    def input_box(self, i: int, out_box: tuple, in_shapes) -> tuple:
        """The (unclipped) box of input ``i`` that the output box reads.
        Default: elementwise (same box)."""
        return tuple(out_box)

    def forward(self, xs: list, params: dict, buffers: dict, ctx: TileContext):
        """Local forward on one tile.  ``xs[i]`` holds the clipped region
        ``ctx.clipped(i)`` of input i (an array, or a ``TileRegion`` when
        the op ``takes_pieces``).  Returns (y, saved) where y covers
        ``ctx.out_box`` and ``saved`` is whatever backward needs.  May update
        ``buffers`` in place (running statistics)."""
        raise NotImplementedError

    def backward(self, dy, saved, params: dict, ctx: TileContext):
        """Returns (dxs, dparams): the gradient of each clipped input region
        (same shapes as the forward's xs, a ``PartGrads`` for an input the
        forward got as a ``TileRegion``; None where an input gets none) and
        of each parameter shard."""
        raise NotImplementedError

    def flops(self, in_shapes, out_shape) -> int:
        """Forward floating-point operations for the whole tensor."""
        return int(np.prod(out_shape))

    def workspace(self, in_tiles, out_tile) -> int:
        """Elements of the temporaries one training step of a tile keeps
        beyond its input regions and output (unrolled columns saved for
        backward, padded copies, gradient scratch; the host buffer pool
        holds them between steps).  The cost model adds them to the tile's
        memory; the default is none."""
        return 0

    def tile_reductions(self, channels: int) -> dict:
        """The sums over other tiles that one training step of a tile with
        ``channels`` output channels asks of ``ctx.allreduce`` (the runtime
        sums over the tile's replica group: the ranks that hold the same
        channels), as {'forward': [elements per call], 'backward': [...]}.
        The cost model prices exactly these; the default is none."""
        return {"forward": [], "backward": []}

    def check_dtype(self, x, what="input"):
        if x.dtype not in (np.float32, np.float64):
            self.fail(f"{what} dtype must be float32 or float64, got {x.dtype}")

    def check_inputs(self, xs, ctx: "TileContext", params: dict | None = None):
        """Validate one tile's arrays before any math, so that bad data is
        an OpError naming the layer rather than a NumPy error from inside a
        kernel: every input and parameter float32 or float64 and of ONE
        dtype (no silent upcast), each input of the shape of the clipped box
        the op reads, each parameter shard of the rows of the tile's
        output-channel range.  Returns the dtype."""
        dt = None
        for i, x in enumerate(xs):
            if isinstance(x, TileRegion) and not self.takes_pieces:
                self.fail(f"input {i} was handed over as pieces (a TileRegion), which this op "
                          "does not take: assemble it (region.assemble()) first")
            self.check_dtype(x, f"input {i}")
            if dt is None:
                dt = x.dtype
            elif x.dtype != dt:
                self.fail(f"input {i} has dtype {x.dtype} but input 0 has {dt}: "
                          "give every input and parameter one float dtype")
            want = box_shape(ctx.clipped(i))
            if tuple(x.shape) != want:
                self.fail(f"input {i} has shape {tuple(x.shape)} but the tile reads the box "
                          f"{ctx.clipped(i)} of input shape {tuple(ctx.in_shapes[i])}, "
                          f"of shape {want}")
        if params:
            specs = self.param_specs(ctx.in_shapes)
            c0, c1 = ctx.out_box[1] if len(ctx.out_box) > 1 else (0, 0)
            for k, p in params.items():
                if p.dtype != dt:
                    self.fail(f"parameter {k!r} has dtype {p.dtype} but the input has {dt}: "
                              "give every input and parameter one float dtype")
                if k in specs:
                    want = (c1 - c0,) + tuple(specs[k].shape[1:])
                    if tuple(p.shape) != want:
                        self.fail(f"parameter {k!r} has shape {tuple(p.shape)}, expected {want} "
                                  f"(rows {c0}:{c1} of {tuple(specs[k].shape)})")
        return dt

    def __repr__(self):
        a = ", ".join(f"{k}={v!r}" for k, v in self.attrs().items())
        return f"{type(self).__name__}({self.name!r}{', ' if a else ''}{a})"


REGISTRY: dict[str, type] = {}


def register(cls):
    REGISTRY[cls.kind] = cls
    return cls


def make_op(kind: str, name: str = "", **attrs) -> Op:
    """Build an op from its kind and attributes (as saved in a plan or a
    graph description).  Unknown kinds and attributes are errors naming the
    layer."""
    if kind not in REGISTRY:
        raise OpError(f"layer {name!r}: unknown op {kind!r}; known ops: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[kind]
    try:
        return cls(name=name, **attrs)
    except TypeError as exc:
        raise OpError(f"layer {name!r} ({kind}): bad attributes {sorted(attrs)}: {exc}") from None


def xp_of(a):
    return array_module(a)
