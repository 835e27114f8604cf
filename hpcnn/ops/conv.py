"""2-D convolution: attributes, shapes, parameters, geometry and the tile
math (the kernels themselves live in conv_kernels.py and nhwc_kernels.py).

A convolution takes its input region as pieces (``TileRegion``: this
rank's own tile plus the halo strips or channel blocks other ranks send),
never copied into one array.  Convolution is linear in its input, and the
parts partition the region, so the tile's output is the sum over the parts
of the convolution of each part alone, zero everywhere else: each part is
convolved by the ordinary kernel, with zero padding standing in for the
rest of the region and the input channels of the weights cut to the
part's, over the output rows and columns its values reach.  The own part
comes first (the interior of the tile, while the halo is in flight), then
``region.wait()``, then the parts from other ranks (the boundary, added in).
Backward runs the other way round: the gradients of the other ranks' parts
first, handed back at once (``ctx.halo_grads_ready``), then the own part's
and the weights'.  Every (output, tap, channel) product is computed once,
as in one whole convolution.

Parts that split the input channels (a channel-split producer) all reach
every output: convolving them one by one would repeat, per part, the
kernel's unrolling of the output gradient in backward and add the outputs
up (15-30% slower than one convolution, measured), so a window larger than
1x1 assembles such a region first -- its own part while the others travel
-- and convolves it once (``convolves_pieces``).

A grouped convolution (``groups`` G > 1: weights (Cout, Cin/G, kh, kw),
output channel o reading only the Cin/G input channels of its group
o // (Cout/G)) reads, for an output channel range, only the input channels
of the groups that range touches (depthwise: the same channels), so a
channel-split depthwise layer after a channel-split layer needs no
exchange.  Such an op instance does not take pieces (its region is
assembled by the runtime, and the cost model prices it so); its kernels are
in grouped_kernels.py.  A tile whose channel range begins or ends inside a
group computes that group whole (the weights completed by zero rows) and
keeps its own channels.
"""
from __future__ import annotations

import numpy as np

from hpcnn.ops.base import Op, ParamSpec, PartGrads, TileRegion, register
from hpcnn.ops.grouped_kernels import grouped_backward, grouped_forward
from hpcnn.ops.kernel_set import window_kernels


def conv_out_size(size, k, stride, pad_lo, pad_hi, dilation):
    """Output length of a convolution/pooling window along one dimension."""
    eff = dilation * (k - 1) + 1
    return (size + pad_lo + pad_hi - eff) // stride + 1


def window_input_range(lo, hi, k, stride, pad_lo, dilation):
    """Input rows (unclipped, padding coordinates included) that output rows
    [lo, hi) of a sliding window read."""
    if hi <= lo:
        s = lo * stride - pad_lo
        return (s, s)
    return (lo * stride - pad_lo, (hi - 1) * stride - pad_lo + dilation * (k - 1) + 1)


def part_window(lo, hi, out_len, k, stride, pad_lo, dilation):
    """Where one part of an input region acts along one axis.

    The part holds rows [lo, hi) of the clipped region, whose row 0 sits at
    padded coordinate ``pad_lo``; the tile has ``out_len`` outputs along the
    axis.  Returns None when no output reads the part, else (o0, o1, c0, c1,
    p0, p1): outputs [o0, o1) read it; the kernel reads the part's rows
    [c0, c1) with p0 zeros before and p1 after, which makes its output 0
    the tile's output o0 and yields exactly o1 - o0 outputs."""
    a, b = lo + pad_lo, hi + pad_lo                  # padded coordinates
    reach = dilation * (k - 1)
    o0 = max(0, -(-(a - reach) // stride))
    o1 = min(out_len, (b - 1) // stride + 1)
    if o1 <= o0 or b <= a:
        return None
    start = o0 * stride
    end = start + (o1 - o0 - 1) * stride + reach + 1
    c0, c1 = max(a, start) - a, min(b, end) - a
    if c1 <= c0:
        return None
    return o0, o1, c0, c1, max(0, a - start), max(0, end - b)


class _Window(Op):
    """Shared attribute handling of convolution and pooling windows."""

    def _window_attrs(self, kernel_size, stride, padding, dilation):
        self.kernel_size = self._pair("kernel_size", kernel_size)
        self.stride = self._pair("stride", stride if stride is not None else self.kernel_size)
        self.dilation = self._pair("dilation", dilation)
        # padding: int | (ph, pw) | ((top, bottom), (left, right))
        if isinstance(padding, (tuple, list)) and len(padding) == 2 and all(
                isinstance(p, (tuple, list)) for p in padding):
            self.padding = (self._pair("padding", padding[0], True),
                            self._pair("padding", padding[1], True))
        else:
            ph, pw = self._pair("padding", padding, True)
            self.padding = ((ph, ph), (pw, pw))

    def _window_out(self, shape):
        n, c, h, w = shape
        out = []
        for axis, size in ((0, h), (1, w)):
            k, s, d = self.kernel_size[axis], self.stride[axis], self.dilation[axis]
            plo, phi = self.padding[axis]
            eff = d * (k - 1) + 1
            if eff > size + plo + phi:
                self.fail(f"kernel {self.kernel_size} (extent {eff} with dilation {d}) is larger "
                          f"than the padded input {'HW'[axis]}={size}+{plo}+{phi} of input shape {tuple(shape)}")
            out.append(conv_out_size(size, k, s, plo, phi, d))
        return out

    def _spatial_box(self, out_box):
        return tuple(window_input_range(out_box[2 + a][0], out_box[2 + a][1], self.kernel_size[a],
                                        self.stride[a], self.padding[a][0], self.dilation[a])
                     for a in (0, 1))

    def _window_attrs_dict(self):
        return dict(kernel_size=list(self.kernel_size), stride=list(self.stride),
                    padding=[list(p) for p in self.padding], dilation=list(self.dilation))


@register
class Conv2d(_Window):
    kind = "conv2d"
    takes_pieces = True

    def __init__(self, name="", out_channels=None, kernel_size=3, stride=1, padding=0,
                 dilation=1, bias=True, groups=1):
        super().__init__(name)
        self.out_channels = self._required_pos_int("out_channels", out_channels)
        self._window_attrs(kernel_size, stride, padding, dilation)
        self.bias = self._flag("bias", bias)
        self.groups = self._pos_int("groups", groups)
        if self.out_channels % self.groups:
            self.fail(f"out_channels={self.out_channels} is not divisible by groups={self.groups}: "
                      "each group needs the same number of output channels")
        if self.groups > 1:
            # a grouped convolution reads its region assembled (see the module docstring)
            self.takes_pieces = False

    def attrs(self):
        a = dict(out_channels=self.out_channels, bias=self.bias, **self._window_attrs_dict())
        if self.groups != 1:      # absent for ordinary convolutions: their tile keys stay as measured
            a["groups"] = self.groups
        return a

    def infer_shape(self, in_shapes):
        self.check_arity(in_shapes)
        self.check_rank(in_shapes[0], 4)
        cin = int(in_shapes[0][1])
        if cin % self.groups:
            self.fail(f"input channels {cin} (input shape {tuple(in_shapes[0])}) are not divisible by "
                      f"groups={self.groups}: give groups a divisor of the input channels")
        ho, wo = self._window_out(in_shapes[0])
        return (in_shapes[0][0], self.out_channels, ho, wo)

    def param_specs(self, in_shapes):
        cin = in_shapes[0][1] // self.groups
        kh, kw = self.kernel_size
        specs = {"weight": ParamSpec((self.out_channels, cin, kh, kw), "kaiming_fan_out",
                                     fan=self.out_channels * kh * kw)}
        if self.bias:
            specs["bias"] = ParamSpec((self.out_channels,), "zeros")
        return specs

    def group_span(self, c0, c1) -> tuple:
        """The groups (g0, g1) that output channels [c0, c1) belong to."""
        og = self.out_channels // self.groups
        if c1 <= c0:
            return (c0 // og, c0 // og)
        return (c0 // og, -(-c1 // og))

    def input_box(self, i, out_box, in_shapes):
        hbox, wbox = self._spatial_box(out_box)
        cin = in_shapes[0][1]
        if self.groups == 1:
            cbox = (0, cin)
        else:
            # only the input channels of the groups the output channels belong to
            cg = cin // self.groups
            g0, g1 = self.group_span(*out_box[1])
            cbox = (g0 * cg, g1 * cg)
        return (tuple(out_box[0]), cbox, hbox, wbox)

    def forward(self, xs, params, buffers, ctx):
        x = xs[0]
        self.check_inputs(xs, ctx, params)
        pads = ctx.pads(0)
        K = window_kernels()
        if isinstance(x, TileRegion):
            return self._forward_parts(K, x, params, pads, ctx)
        if self.groups > 1:
            return self._forward_grouped(K, x, params, pads, ctx)
        y, saved = K.conv2d_forward(x, params["weight"], params.get("bias"), self.stride,
                                    (pads[2], pads[3]), self.dilation)
        return y, (K, saved)

    # ---- groups --------------------------------------------------------------------
    def _group_pad(self, ctx):
        """(groups in the tile, output channels before the tile's first in
        its first group, after its last in its last group)."""
        c0, c1 = ctx.out_box[1]
        g0, g1 = self.group_span(c0, c1)
        og = self.out_channels // self.groups
        return g1 - g0, c0 - g0 * og, g1 * og - c1

    def _forward_grouped(self, K, x, params, pads, ctx):
        """A tile's output channels may begin or end inside a group (a
        channel split that does not fall on group boundaries): the weights
        are completed by zero rows to whole groups and the outputs cut."""
        from hpcnn.backend import array_module
        w, b = params["weight"], params.get("bias")
        groups, lead, trail = self._group_pad(ctx)
        if lead or trail:
            xp = array_module(w)
            wf = xp.zeros((lead + w.shape[0] + trail,) + tuple(w.shape[1:]), dtype=w.dtype)
            wf[lead:lead + w.shape[0]] = w
            if b is not None:
                bf = xp.zeros(wf.shape[0], dtype=b.dtype)
                bf[lead:lead + b.shape[0]] = b
                b = bf
            w = wf
        y, saved = grouped_forward(K, x, w, b, self.stride, (pads[2], pads[3]), self.dilation, groups)
        if lead or trail:
            y = _channels_last_copy(y[:, lead:lead + params["weight"].shape[0]])
        return y, (K, _GroupedSaved(saved, w, lead, trail))

    def _backward_grouped(self, K, dy, saved, params, ctx):
        w = saved.weight
        lead, trail, cout = saved.lead, saved.trail, params["weight"].shape[0]
        if lead or trail:
            from hpcnn.backend import array_module
            n, _, ho, wo = dy.shape
            full = array_module(dy).zeros((n, ho, wo, w.shape[0]), dtype=dy.dtype).transpose(0, 3, 1, 2)
            full[:, lead:lead + cout] = dy
            dy = full
        dx, dw, db = grouped_backward(K, dy, saved.kernel, w, self.bias, ctx.needs_input_grad(0))
        grads = {"weight": dw[lead:lead + cout] if (lead or trail) else dw}
        if self.bias:
            grads["bias"] = db[lead:lead + cout] if (lead or trail) else db
        return [dx], grads

    def backward(self, dy, saved, params, ctx):
        K, saved = saved
        if isinstance(saved, _GroupedSaved):
            return self._backward_grouped(K, dy, saved, params, ctx)
        if isinstance(saved, (_PartsSaved, _AssembledSaved)):
            return self._backward_parts(K, dy, saved, params, ctx)
        dx, dw, db = K.conv2d_backward(dy, saved, params["weight"], self.bias,
                                       ctx.needs_input_grad(0))
        grads = {"weight": dw}
        if self.bias:
            grads["bias"] = db
        return [dx], grads

    # ---- the input as pieces (see the module docstring) ----------------------------
    def _part_plan(self, part, region_shape, out_shape, pads):
        """(output block, input crop, kernel pads) of one part, or None when
        no output of the tile reads it."""
        (n0, n1), (c0, c1), hb, wb = part.box
        if n1 <= n0 or c1 <= c0:
            return None
        wins = []
        for a, (lo, hi) in enumerate((hb, wb)):
            win = part_window(lo, hi, out_shape[2 + a], self.kernel_size[a], self.stride[a],
                              pads[2 + a][0], self.dilation[a])
            if win is None:
                return None
            wins.append(win)
        (oh0, oh1, ch0, ch1, ph0, ph1), (ow0, ow1, cw0, cw1, pw0, pw1) = wins
        out = (slice(n0, n1), slice(None), slice(oh0, oh1), slice(ow0, ow1))
        crop = (slice(None), slice(None), slice(ch0, ch1), slice(cw0, cw1))
        whole = (n0 == 0 and n1 == out_shape[0] and oh0 == 0 and oh1 == out_shape[2]
                 and ow0 == 0 and ow1 == out_shape[3])
        return out, crop, ((ph0, ph1), (pw0, pw1)), (c0, c1), whole

    def convolves_pieces(self, channel_split: bool) -> bool:
        """Whether a region given as pieces is convolved part by part (else
        assembled first): always for a 1x1 window, else unless the parts
        split the input channels (see the module docstring)."""
        return not channel_split or self.kernel_size == (1, 1)

    def _forward_parts(self, K, region, params, pads, ctx):
        w, b = params["weight"], params.get("bias")
        if not self.convolves_pieces(len({p.box[1] for p in region.parts}) > 1):
            return self._forward_assembled(K, region, params, pads)
        n, cin = region.shape[:2]
        out_shape = (n, w.shape[0]) + tuple(hi - lo for lo, hi in ctx.out_box[2:])
        y, runs, biased = None, [None] * len(region.parts), False
        geos = [self._part_plan(part, region.shape, out_shape, pads) for part in region.parts]
        # parts that split the samples alone write disjoint outputs: placed
        # (each with the bias), not summed
        by_samples = (len(region.parts) > 1 and len({p.box[1:] for p in region.parts}) == 1
                      and all(geo is not None for geo in geos))
        for k, (part, geo) in enumerate(zip(region.parts, geos)):
            if not part.local:
                region.wait()
            if geo is None:
                continue
            out, crop, kpads, (c0, c1), whole = geo
            wq = w if (c0, c1) == (0, cin) else w[:, c0:c1]
            first = y is None and whole
            with_bias = first or by_samples
            yq, sq = K.conv2d_forward(part.array[crop], wq, b if with_bias else None, self.stride,
                                      kpads, self.dilation)
            runs[k] = (sq, out, crop, (c0, c1), with_bias)
            biased = biased or (with_bias and b is not None)
            if first:
                y = yq
                continue
            if y is None:
                y = _zeros_like_layout(yq, out_shape, empty=by_samples)
            if by_samples:
                y[out] = yq
            else:
                y[out] += yq
        region.wait()          # every part is read by some output, but keep the promise
        if y is None:          # no part is read (an empty tile): zeros
            y = _zeros_like_layout(None, out_shape, w)
        if b is not None and not biased:
            y += b[None, :, None, None]
        return y, (K, _PartsSaved(runs, [p.shape for p in region.parts], [p.local for p in region.parts]))

    def _forward_assembled(self, K, region, params, pads):
        """One convolution of the region, copied into one channels-last
        array: the own parts before the wait, the others after."""
        from hpcnn.backend import array_module
        xp = region.xp
        if xp is None:
            # a rank may hold none of its region (all parts from others):
            # then the array module is known only after they arrive
            local = region.local_parts()
            if not local:
                region.wait()
            xp = array_module((local or region.parts)[0].array)
        n, c, h, w_ = region.shape
        x = xp.empty((n, h, w_, c), dtype=region.dtype).transpose(0, 3, 1, 2)
        for part in region.parts:
            if not part.local:
                region.wait()
            x[tuple(slice(lo, hi) for lo, hi in part.box)] = part.array
        region.wait()
        y, sk = K.conv2d_forward(x, params["weight"], params.get("bias"), self.stride, (pads[2], pads[3]),
                                 self.dilation)
        return y, (K, _AssembledSaved(sk, [p.box for p in region.parts]))

    def _backward_parts(self, K, dy, saved, params, ctx):
        if isinstance(saved, _AssembledSaved):
            dx, dw, db = K.conv2d_backward(dy, saved.kernel, params["weight"], self.bias,
                                           ctx.needs_input_grad(0))
            grads = {"weight": dw}
            if self.bias:
                grads["bias"] = db
            if dx is None:
                return [None], grads
            return [PartGrads(dx[tuple(slice(lo, hi) for lo, hi in b)] for b in saved.boxes)], grads
        w = params["weight"]
        cin = w.shape[1]
        want_dx = ctx.needs_input_grad(0)
        hook = ctx.halo_grads_ready[0] if ctx.halo_grads_ready else None
        dxs = PartGrads([None] * len(saved.runs))
        dw = db = None
        order = [k for k, loc in enumerate(saved.local) if not loc] + \
                [k for k, loc in enumerate(saved.local) if loc]
        early_sent = False
        for k in order:
            if saved.local[k] and not early_sent:
                early_sent = True
                if hook is not None and want_dx:
                    early = {j: dxs[j] for j in range(len(dxs)) if not saved.local[j]}
                    hook(early)
                    for j in early:
                        dxs[j] = None
            run = saved.runs[k]
            if run is None:
                continue
            sq, out, crop, (c0, c1), first = run          # first: the part that added the bias
            wq = w if (c0, c1) == (0, cin) else w[:, c0:c1]
            dxq, dwq, dbq = K.conv2d_backward(dy[out], sq, wq, self.bias and first, want_dx)
            if want_dx:
                dxs[k] = dxq if _whole_crop(crop, dxq, saved.shapes[k]) else \
                    _placed(dxq, crop, saved.shapes[k])
            if dw is None and (c0, c1) == (0, cin):
                dw = dwq
            else:
                if dw is None:
                    dw = _zeros_like_layout(None, w.shape, w)
                dw[:, c0:c1] += dwq
            if first and self.bias:
                db = dbq if db is None else db + dbq
        if dw is None:
            dw = _zeros_like_layout(None, w.shape, w)
        grads = {"weight": dw}
        if self.bias:
            grads["bias"] = db if db is not None else dy.sum(axis=(0, 2, 3))
        return [dxs if want_dx else None], grads

    def flops(self, in_shapes, out_shape):
        n, cin = in_shapes[0][:2]
        kh, kw = self.kernel_size
        if self.groups == 1:
            return int(2 * np.prod(out_shape) * cin * kh * kw)
        # every whole group the tile touches, cin/G inputs for each of its
        # Cout/G outputs (what the kernel computes: a tile that starts or
        # ends inside a group computes that group whole)
        n, _, ho, wo = out_shape
        return int(2 * n * ho * wo * cin * (self.out_channels // self.groups) * kh * kw)


class _GroupedSaved:
    """A grouped convolution's kernel state, the weights it ran with
    (completed to whole groups) and how many zero rows before/after."""

    __slots__ = ("kernel", "weight", "lead", "trail")

    def __init__(self, kernel, weight, lead, trail):
        self.kernel, self.weight, self.lead, self.trail = kernel, weight, lead, trail


def _channels_last_copy(y):
    """A channels-last copy of a logical NCHW array (the layout the fast
    kernels return)."""
    from hpcnn.backend import array_module
    n, c, h, w = y.shape
    out = array_module(y).empty((n, h, w, c), dtype=y.dtype)
    out[...] = y.transpose(0, 2, 3, 1)
    return out.transpose(0, 3, 1, 2)


class _PartsSaved:
    """What the backward of a convolution over pieces needs: per part, the
    kernel's saved state, its output block, its crop and its channels (None
    for a part no output reads), the parts' shapes and which are local."""

    __slots__ = ("runs", "shapes", "local")

    def __init__(self, runs, shapes, local):
        self.runs, self.shapes, self.local = runs, shapes, local


class _AssembledSaved:
    """A convolution of a region assembled from pieces: the kernel's saved
    state and the parts' boxes (its backward returns their gradients)."""

    __slots__ = ("kernel", "boxes")

    def __init__(self, kernel, boxes):
        self.kernel, self.boxes = kernel, boxes


def _zeros_like_layout(like, shape, ref=None, empty=False):
    """Zeros (or, with ``empty``, uninitialised) of ``shape``, channels-last
    when ``like`` is (the layout the fast kernels return), else C order."""
    from hpcnn.backend import array_module
    xp = array_module(like if like is not None else ref)
    dtype = (like if like is not None else ref).dtype
    make = xp.empty if empty else xp.zeros
    if (like is not None and like.ndim == 4 and len(shape) == 4 and like.shape[1] > 1
            and like.strides[1] == like.itemsize and not like.flags.c_contiguous):
        n, c, h, w = shape
        return make((n, h, w, c), dtype=dtype).transpose(0, 3, 1, 2)
    return make(shape, dtype=dtype)


def _whole_crop(crop, dxq, shape) -> bool:
    return tuple(dxq.shape) == tuple(shape)


def _placed(dxq, crop, shape):
    """The gradient of a whole part from that of its cropped rows (the
    rows outside the crop are read by no output: zero)."""
    full = _zeros_like_layout(dxq, shape)
    full[crop] = dxq
    return full
