"""The volume data path: ``hpcnn data cosmo`` writes Gaussian random
fields whose power spectrum follows the targets, as a regression data set
(float targets N x 4); the reader serves 5-D batches and a rank's 3-D box
of each sample reads exactly that part."""
from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest

from hpcnn.data.cosmo import CHANNELS, field, physical, wavenumbers, write_cosmo
from hpcnn.data.hdf5_dataset import HDF5Dataset
from hpcnn.data.hdf5_format import DataError, ImageFileWriter
from hpcnn.parallel import Layout


def _delta(x, u):
    """The Gaussian field back from the last channel: x = log(1 + rho),
    rho = exp(delta - sigma8^2 / 2)."""
    s8 = physical(u)["sigma8"]
    return np.log(np.expm1(x[CHANNELS - 1].astype(np.float64))) + 0.5 * s8 ** 2


def _binned_power(delta, edges):
    side = delta.shape[0]
    p = np.abs(np.fft.rfftn(delta)) ** 2
    k = wavenumbers(side)
    return np.array([p[(k >= a) & (k < b)].mean() for a, b in zip(edges[:-1], edges[1:])])


@pytest.mark.parametrize("u", [(0.5, -1.0, 0.3, 0.0), (-0.5, 1.0, -0.6, 0.8), (0.0, 0.2, 1.0, -1.0)])
def test_fields_have_the_power_spectrum_their_targets_set(u):
    side = 32
    p = physical(u)
    edges = np.array([1.5, 2.5, 4.5, 6.5]) / side          # three shells of wavenumbers
    mids = 0.5 * (edges[:-1] + edges[1:])
    got = np.zeros(3)
    for i in range(12):
        got += _binned_power(_delta(field(u, side, np.random.default_rng(i)), u), edges)
    shape = (mids * side) ** p["n_s"] * np.exp(-(mids / p["k_cutoff"]) ** 2)
    # the shape of the spectrum (ratios between shells) is the model's
    np.testing.assert_allclose(got[1:] / got[0], shape[1:] / shape[0], rtol=0.25)
    x = field(u, side, np.random.default_rng(99))
    assert x.shape == (4, side, side, side) and x.dtype == np.float32
    # the rms of the field is sigma8, and earlier epochs are the growth factor smaller
    d = _delta(x, u)
    assert np.sqrt(np.mean(d ** 2)) == pytest.approx(p["sigma8"], rel=1e-3)
    a2 = p["growth"]
    d2 = np.log(np.expm1(x[CHANNELS - 2].astype(np.float64))) + 0.5 * (a2 * p["sigma8"]) ** 2
    np.testing.assert_allclose(d2, a2 * d, atol=2e-4 * max(1.0, np.abs(d).max()))


def test_distinct_targets_give_distinguishable_statistics():
    """What the network must learn is in the data: the log-density's
    variance grows with sigma8 (target 0)."""
    lo = [np.var(field((-0.9, 0, 0, 0), 16, np.random.default_rng(i))[3]) for i in range(4)]
    hi = [np.var(field((0.9, 0, 0, 0), 16, np.random.default_rng(i))[3]) for i in range(4)]
    assert max(lo) < min(hi)


def test_cosmo_file_is_a_regression_set_read_box_by_box(tmp_path):
    path = write_cosmo(tmp_path / "cosmo.h5", 10, 4, side=8, seed=3)
    with h5py.File(path, "r") as f:
        assert f.attrs["task"] == "regression"
        assert f["train/images"].shape == (10, 4, 8, 8, 8)
        assert f["train/labels"].shape == (10, 4) and f["train/labels"].dtype == np.float32
        assert np.all(np.abs(f["train/labels"][...]) <= 1)
    ds = HDF5Dataset(path, "train", batch_size=6, shuffle=True, seed=1)
    assert ds.task == "regression" and ds.num_classes == 4 and ds.sample_shape == (4, 8, 8, 8)
    assert ds.target_names == ["sigma8", "n_s", "k_cutoff", "growth"]
    whole, y = ds.read(2, 0)
    assert whole.shape == (6, 4, 8, 8, 8) and y.shape == (6, 4)
    assert whole.mean(axis=(0, 2, 3, 4)) == pytest.approx(np.zeros(4), abs=0.6)   # normalised
    # every rank's box of a volume layout (d, h, w splits, uneven) reads exactly its part
    L = Layout((6, 4, 8, 8, 8), (2, 1, 3, 1, 2))
    for r in L.ranks:
        b = L.box(r)
        x, yb = ds.read(2, 0, b)
        np.testing.assert_array_equal(x, whole[b.slices()])
        np.testing.assert_array_equal(yb, y[b[0][0]:b[0][1]])
    with pytest.raises(DataError, match="N x C x D x H x W"):
        ds.read(2, 0, ((0, 6), (0, 4), (0, 9), (0, 8), (0, 8)))
    ds.close()
    # the same seed writes the same file
    again = write_cosmo(tmp_path / "again.h5", 10, 4, side=8, seed=3)
    with h5py.File(path, "r") as a, h5py.File(again, "r") as b:
        np.testing.assert_array_equal(a["test/images"][...], b["test/images"][...])


def test_regression_targets_are_checked_when_written(tmp_path):
    with ImageFileWriter(tmp_path / "r.h5", 3, task="regression") as w:
        s = w.split("train", 2, (1, 2, 2, 2), np.float32)
        with pytest.raises(DataError, match=r"targets of shape \(2, 3\)"):
            s.append(np.zeros((2, 1, 2, 2, 2)), np.zeros((2, 2)))
        with pytest.raises(DataError, match="finite floats"):
            s.append(np.zeros((2, 1, 2, 2, 2)), np.full((2, 3), np.nan))
        s.append(np.zeros((2, 1, 2, 2, 2)), np.zeros((2, 3)))


def test_hpcnn_data_cosmo_command(tmp_path):
    out = tmp_path / "c.h5"
    r = subprocess.run([sys.executable, "-m", "hpcnn", "data", "cosmo", "-o", str(out), "-n", "4",
                        "--test-samples", "2", "--size", "8", "--quiet"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train: 4 x 4x8x8x8 float32, test: 2 x 4x8x8x8 float32; 4 regression targets" in r.stdout
