"""Image augmentation as pure functions of (seed, epoch, sample), computed
on the part of each stored image a rank's box needs.

Training: a random resized crop (a rectangle of the stored image whose area
is a uniform fraction in ``scale`` of the image's and whose aspect ratio is
log-uniform in ``ratio``, ten draws and then the largest centred
rectangle within the ratios, as Inception-style training does), resized
bilinearly to the network's input size, and a horizontal flip with
probability 1/2.  Evaluation (or training without the random crop): the
shorter side resized to ``resize`` (0: kept), then the centre crop of the
network's input size.  The reader then normalises per channel.

Every choice is drawn from a generator seeded with (seed, epoch, file row
of the sample), so every rank, every plan and every restart sees the same
image; evaluation draws nothing.

Each output pixel is a bilinear interpolation (half-pixel centres, edges
clamped: torch's interpolate with align_corners=False and no antialias) of
at most 2 x 2 stored pixels, computed separably and elementwise: the value
of a pixel does not depend on which other pixels are computed with it, so a
rank that computes only its box of the network's input gets bitwise the
pixels the whole image would have there, and reads only the stored rows
and columns those pixels interpolate (a weight of exactly 0 reads
nothing).  With no crop, no resize and no flip every pixel is its stored
value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_TAG = 0x61756735          # keys the augmentation's generators apart from the shuffle's


@dataclass(frozen=True)
class AxisMap:
    """Output index j of one axis reads the stored coordinate
    ``clip(origin + (j + 0.5) * step - 0.5, lo, hi)``."""
    origin: float
    step: float
    lo: int
    hi: int

    def taps(self, j0: int, j1: int):
        """(i0, i1, w0, w1) for outputs j0..j1-1: the two stored indices
        each interpolates and their weights (i1 = i0 where w1 is 0)."""
        j = np.arange(j0, j1, dtype=np.float64)
        src = np.clip(self.origin + (j + 0.5) * self.step - 0.5, self.lo, self.hi)
        i0 = np.floor(src).astype(np.int64)
        frac = src - i0
        i1 = np.where(frac > 0, np.minimum(i0 + 1, self.hi), i0)
        return i0, i1, 1.0 - frac, frac


@dataclass(frozen=True)
class View:
    """How one sample's network input is made from its stored image: a map
    per axis and whether the result is flipped left to right."""
    rows: AxisMap
    cols: AxisMap
    flip: bool
    out_h: int
    out_w: int

    def source(self, hbox, wbox) -> tuple:
        """((r0, r1), (q0, q1)): the stored rows and columns the output
        rows ``hbox`` and columns ``wbox`` read."""
        i0, i1, _, _ = self.rows.taps(*hbox)
        c0, c1 = self._cols(wbox)
        j0, j1, _, _ = self.cols.taps(c0, c1)
        return (int(i0.min()), int(i1.max()) + 1), (int(j0.min()), int(j1.max()) + 1)

    def _cols(self, wbox):
        """The output columns before the flip that ``wbox`` shows."""
        lo, hi = wbox
        return (self.out_w - hi, self.out_w - lo) if self.flip else (lo, hi)

    def apply(self, window, origin, hbox, wbox, dtype):
        """The output box (C x rows x cols) from ``window``, the stored
        pixels [r0:, q0:] read for it (``origin`` = (r0, q0)), in ``dtype``."""
        r0, q0 = origin
        x = np.asarray(window, dtype=dtype)
        i0, i1, a0, a1 = self.rows.taps(*hbox)
        rows = x[:, i0 - r0, :] * a0.astype(dtype)[None, :, None] + x[:, i1 - r0, :] * a1.astype(dtype)[None, :, None]
        j0, j1, b0, b1 = self.cols.taps(*self._cols(wbox))
        out = rows[:, :, j0 - q0] * b0.astype(dtype)[None, None, :] + rows[:, :, j1 - q0] * b1.astype(dtype)[None, None, :]
        return out[:, :, ::-1] if self.flip else out


def _pair(name, v, lo=0.0):
    try:
        a, b = (float(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers [low, high], got {v!r}") from None
    if not (lo < a <= b):
        raise ValueError(f"{name} must be two numbers with {lo} < low <= high, got {list(v)}")
    return (a, b)


class Augmentation:
    """The transform of one split.

    size        : (H, W) the network takes; None: the stored size (after
                  ``resize``)
    random_resized_crop : draw a crop per sample (training)
    scale, ratio: the crop's area fraction and aspect-ratio (w/h) ranges
    flip        : flip left to right with probability 1/2 (training)
    resize      : without the random crop, resize the shorter side to this
                  (0: no resize) before the centre crop
    seed        : the job's seed
    """

    def __init__(self, size=None, random_resized_crop=False, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 flip=False, resize=0, seed=0):
        if size is not None:
            size = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"augmentation size must be a positive (height, width), got {size!r}")
        self.size = size
        self.random_resized_crop = bool(random_resized_crop)
        self.scale = _pair("augment.crop_scale", scale)
        if self.scale[1] > 1:
            raise ValueError(f"augment.crop_scale must lie in (0, 1], got {list(scale)}")
        self.ratio = _pair("augment.crop_ratio", ratio)
        self.flip = bool(flip)
        if isinstance(resize, bool) or not isinstance(resize, (int, np.integer)) or resize < 0:
            raise ValueError(f"augment.resize must be a non-negative integer, got {resize!r}")
        self.resize = int(resize)
        self.seed = int(seed)
        self.random = self.random_resized_crop or self.flip

    # ---- shapes -------------------------------------------------------------------
    def _resized(self, h, w):
        if not self.resize:
            return h, w
        if h <= w:
            return self.resize, max(1, int(self.resize * w / h))
        return max(1, int(self.resize * h / w)), self.resize

    def out_hw(self, stored_hw) -> tuple:
        """(H, W) of the network's input for stored images of ``stored_hw``."""
        if self.size is not None:
            return self.size
        return stored_hw if self.random_resized_crop else self._resized(*stored_hw)

    def check(self, stored_hw, where="") -> None:
        """A ValueError naming the sizes when the centre crop does not fit."""
        if self.random_resized_crop:
            return
        rh, rw = self._resized(*stored_hw)
        oh, ow = self.out_hw(stored_hw)
        if oh > rh or ow > rw:
            raise ValueError(f"{where}images of {stored_hw[0]}x{stored_hw[1]}"
                             f"{f' resized to {rh}x{rw}' if self.resize else ''} are smaller than the "
                             f"network's input {oh}x{ow}: set augment.resize to at least {max(oh, ow)} or "
                             f"use augment.random_resized_crop")

    def is_identity(self, stored_hw) -> bool:
        """True when every pixel is its stored value."""
        return (not self.random and not self.resize and tuple(self.out_hw(stored_hw)) == tuple(stored_hw))

    # ---- the views of samples -----------------------------------------------------------
    def views(self, epoch: int, rows, stored_hw) -> list:
        """The View of each file row in ``rows`` at ``epoch``."""
        return [self.view(epoch, int(r), stored_hw) for r in np.asarray(rows).reshape(-1)]

    def view(self, epoch: int, row: int, stored_hw) -> View:
        h, w = (int(s) for s in stored_hw)
        oh, ow = self.out_hw((h, w))
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, int(row), _TAG]) \
            if self.random else None
        if self.random_resized_crop:
            top, left, ch, cw = self._crop(rng, h, w)
            rows = AxisMap(float(top), ch / oh, top, top + ch - 1)
            cols = AxisMap(float(left), cw / ow, left, left + cw - 1)
        else:
            rh, rw = self._resized(h, w)
            sy, sx = h / rh, w / rw
            top, left = int(round((rh - oh) / 2.0)), int(round((rw - ow) / 2.0))
            rows = AxisMap(top * sy, sy, 0, h - 1)
            cols = AxisMap(left * sx, sx, 0, w - 1)
        flip = bool(rng.random() < 0.5) if self.flip else False
        return View(rows, cols, flip, oh, ow)

    def _crop(self, rng, h, w):
        """(top, left, height, width) of a random crop of an h x w image."""
        area = h * w
        lr0, lr1 = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(lr0, lr1))
            cw = int(round(math.sqrt(target * aspect)))
            ch = int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
        # no draw fitted: the whole image, trimmed to the nearest allowed ratio
        r = w / h
        if r < self.ratio[0]:
            cw, ch = w, int(round(w / self.ratio[0]))
        elif r > self.ratio[1]:
            ch, cw = h, int(round(h * self.ratio[1]))
        else:
            ch, cw = h, w
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def describe(self) -> str:
        parts = []
        if self.random_resized_crop:
            parts.append(f"random resized crop (scale {list(self.scale)}, ratio "
                         f"[{self.ratio[0]:.4g}, {self.ratio[1]:.4g}])")
        else:
            if self.resize:
                parts.append(f"resize to {self.resize}")
            parts.append("centre crop")
        if self.flip:
            parts.append("horizontal flip")
        return ", ".join(parts)
