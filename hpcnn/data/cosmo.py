"""``hpcnn data cosmo``: a CosmoFlow-like regression task without a
download.

Each sample is a cubic box of side S voxels holding a Gaussian random field
whose power spectrum is set by four parameters, seen at four epochs (the
channels, as CosmoFlow's four redshifts), as a log-normal density.  The
targets are the four parameters, each drawn uniformly in [-1, 1] (CosmoFlow
normalises its cosmological parameters the same way); the network must
read them off the field's statistics.

With u = (u0, u1, u2, u3) in [-1, 1]^4 and k the wavenumber in cycles per
voxel (0 < |k| <= sqrt(3)/2):

    amplitude      sigma8 = 0.8 * 2 ** (0.5 * u0)      (the field's rms at the last epoch)
    spectral index n      = -2.0 + 0.75 * u1           (P ~ k^n at large scales)
    cutoff         k_c    = 0.18 * 2 ** (0.5 * u2)     (P damped by exp(-(k/k_c)^2))
    growth         g      = 0.55 + 0.25 * u3           (amplitude ratio of successive epochs)

    P(k)      = (k / k0)^n * exp(-(k / k_c)^2),  k0 = 1 / S
    delta     = IFFT(sqrt(P) * FFT(white noise)), scaled to rms sigma8
    channel e = log(1 + exp(g^(3-e) delta - (g^(3-e) sigma8)^2 / 2)),  e = 0..3

(the log-normal density exp(delta - var/2) has mean 1; log(1 + rho) is
CosmoFlow's preprocessing of particle counts).  The white noise of sample i
of split s comes from a generator seeded by (seed, s, i), so a file's
content depends only on its arguments.  Pure NumPy; h5py through the
writer of hdf5_format.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hpcnn.data.hdf5_format import DataError, ImageFileWriter

TARGETS = ("sigma8", "n_s", "k_cutoff", "growth")
CHANNELS = 4


def physical(u) -> dict:
    """The physical parameters of targets ``u`` (..., 4)."""
    u = np.asarray(u, dtype=np.float64)
    return {"sigma8": 0.8 * 2.0 ** (0.5 * u[..., 0]), "n_s": -2.0 + 0.75 * u[..., 1],
            "k_cutoff": 0.18 * 2.0 ** (0.5 * u[..., 2]), "growth": 0.55 + 0.25 * u[..., 3]}


def wavenumbers(side: int) -> np.ndarray:
    """|k| in cycles per voxel on the rfftn grid of a side^3 box."""
    k = np.fft.fftfreq(side)
    kz = np.fft.rfftfreq(side)
    return np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kz[None, None, :] ** 2)


def field(u, side: int, rng, kgrid=None) -> np.ndarray:
    """The (4, side, side, side) float32 channels of one sample of targets u."""
    p = physical(u)
    kk = wavenumbers(side) if kgrid is None else kgrid
    k = np.where(kk > 0, kk, 1.0)
    power = (k * side) ** p["n_s"] * np.exp(-(k / p["k_cutoff"]) ** 2)
    power[kk == 0] = 0.0                                   # no mean density fluctuation
    noise = np.fft.rfftn(rng.standard_normal((side, side, side)))
    delta = np.fft.irfftn(noise * np.sqrt(power), s=(side, side, side), axes=(0, 1, 2))
    rms = float(np.sqrt(np.mean(delta ** 2)))
    delta *= p["sigma8"] / max(rms, 1e-30)
    out = np.empty((CHANNELS, side, side, side), dtype=np.float32)
    for e in range(CHANNELS):
        a = p["growth"] ** (CHANNELS - 1 - e)
        rho = np.exp(a * delta - 0.5 * (a * p["sigma8"]) ** 2)
        out[e] = np.log1p(rho)
    return out


def write_cosmo(path, n_train: int, n_test: int, side: int = 32, seed: int = 0, progress=None) -> Path:
    """Write ``n_train`` training and ``n_test`` test samples of side^3
    voxels with their four targets."""
    if int(side) < 4:
        raise DataError(f"--size must be at least 4 voxels, got {side}")
    if int(n_train) < 1 or int(n_test) < 0:
        raise DataError(f"need at least one training sample and no negative count, got {n_train} train "
                        f"and {n_test} test")
    side = int(side)
    kgrid = wavenumbers(side)
    src = (f"hpcnn data cosmo: Gaussian random fields, {side}^3 voxels, 4 epochs as log-normal densities; "
           f"targets {', '.join(TARGETS)} uniform in [-1, 1] (hpcnn/data/cosmo.py), seed {seed}")
    with ImageFileWriter(path, len(TARGETS), source=src, task="regression", target_names=TARGETS) as w:
        for si, (group, n) in enumerate((("train", int(n_train)), ("test", int(n_test)))):
            if n == 0:
                continue
            s = w.split(group, n, (CHANNELS, side, side, side), np.float32)
            block = max(1, (64 << 20) // (CHANNELS * side ** 3 * 4))
            for i0 in range(0, n, block):
                xs, ys = [], []
                for i in range(i0, min(n, i0 + block)):
                    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, si, i])
                    u = rng.uniform(-1.0, 1.0, len(TARGETS))
                    xs.append(field(u, side, rng, kgrid))
                    ys.append(u.astype(np.float32))
                s.append(np.stack(xs), np.stack(ys))
                if progress is not None:
                    progress(len(xs))
    return Path(path)
