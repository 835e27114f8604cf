"""scikit-learn's handwritten digits (1,797 8x8 images of 0..16, shipped
inside scikit-learn: no download) as an hpcnn HDF5 file.

Each image is upsampled to 16x16 with bilinear interpolation (half-pixel
centres, edges clamped: what torch's interpolate does with
align_corners=False), rescaled to 0..255 and stored as uint8.  The
train/test split is stratified by class and deterministic for a given seed
(20% of each class, rounded, for testing by default: 1,438 train and
359 test images)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hpcnn.data.hdf5_format import DataError, write_arrays
from hpcnn.data.splits import stratified_split

SOURCE = ("scikit-learn load_digits (UCI optical recognition of handwritten digits, 8x8, "
          "values 0..16), upsampled bilinearly to {size}x{size} and scaled to 0..255")


def interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D linear interpolation with half-pixel
    centres and clamped edges; applying it along both axes gives bilinear
    resizing: ``A @ img @ A.T``."""
    a = np.zeros((n_out, n_in))
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    a[np.arange(n_out), lo] += 1 - frac
    a[np.arange(n_out), hi] += frac
    return a


def upsample(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (N, h, w) images to (N, size, size)."""
    n, h, w = images.shape
    ah, aw = interpolation_matrix(h, size), interpolation_matrix(w, size)
    return np.einsum("ij,njk,lk->nil", ah, images.astype(np.float64), aw)


def load_digits_arrays(size: int = 16, test_fraction: float = 0.2, seed: int = 0):
    """((train_images, train_labels), (test_images, test_labels)); images
    uint8 N x 1 x size x size."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits data set ships with scikit-learn, which is not installed: "
                        "pip install scikit-learn (or pip install 'hpcnn[examples]')") from None
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise DataError(f"digits image size must be an integer of at least 8, got {size!r}")
    if not 0 < float(test_fraction) < 1:
        raise DataError(f"test fraction must lie strictly between 0 and 1, got {test_fraction}")
    d = load_digits()
    x = upsample(d.images, int(size)) * (255.0 / 16.0)
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    tr, te = stratified_split(y, float(test_fraction), int(seed))
    return (x[tr], y[tr]), (x[te], y[te])


def write_digits(path, size: int = 16, test_fraction: float = 0.2, seed: int = 0) -> Path:
    (xtr, ytr), (xte, yte) = load_digits_arrays(size, test_fraction, seed)
    return write_arrays(path, {"train": (xtr, ytr), "test": (xte, yte)}, num_classes=10,
                        source=SOURCE.format(size=size), class_names=[str(i) for i in range(10)])
