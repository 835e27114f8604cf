"""HDF5 data: the writers (digits, convert, synth), the box reader, the
seeded per-epoch shuffle, prefetch and the errors."""
import contextlib
import io
import sys
import threading

import h5py
import numpy as np
import pytest
import torch

from hpcnn.cli import main as cli_main
from hpcnn.data import DataError, DataFileNotFound, HDF5Dataset, write_arrays
from hpcnn.data.convert import convert_arrays, convert_folder, stratified_split, to_nchw
from hpcnn.data.digits import interpolation_matrix, load_digits_arrays, upsample
from hpcnn.data.synth import write_synth
from hpcnn.parallel.box import Box
from hpcnn.parallel.layout import Layout


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, size=(203, 3, 9, 11), dtype=np.uint8)
    y = rng.integers(0, 5, size=203)
    xt = rng.integers(0, 256, size=(41, 3, 9, 11), dtype=np.uint8)
    yt = rng.integers(0, 5, size=41)
    return x, y, xt, yt


@pytest.fixture(scope="module")
def h5file(tmp_path_factory, arrays):
    x, y, xt, yt = arrays
    path = tmp_path_factory.mktemp("data") / "toy.h5"
    write_arrays(path, {"train": (x, y), "test": (xt, yt)}, num_classes=5, source="toy",
                 class_names=list("abcde"))
    return path


# ---- the file ------------------------------------------------------------------------
def test_round_trip_and_attributes(h5file, arrays):
    x, y, xt, yt = arrays
    with h5py.File(h5file) as f:
        assert f.attrs["format"] == "hpcnn-images" and f.attrs["num_classes"] == 5
        np.testing.assert_allclose(f.attrs["mean"], x.astype(float).mean(axis=(0, 2, 3)))
        np.testing.assert_allclose(f.attrs["std"], x.astype(float).std(axis=(0, 2, 3)))
        im = f["train/images"]
        assert im.dtype == np.uint8 and im.chunks[1:] == (3, 9, 11)   # chunked along N only
        np.testing.assert_array_equal(im[...], x)
        np.testing.assert_array_equal(f["test/labels"][...], yt)
    assert not h5file.with_name(h5file.name + ".tmp").exists()
    with HDF5Dataset(h5file, batch_size=203, shuffle=False, normalize=False) as ds:
        assert ds.group == "train" and ds.class_names == list("abcde") and ds.source == "toy"
        xb, yb = ds.read(0, 0)
        np.testing.assert_array_equal(xb, x.astype(np.float32))
        np.testing.assert_array_equal(yb, y)
    with HDF5Dataset(h5file, "test", batch_size=41, shuffle=False, dtype=np.float64) as ds:
        xb, _ = ds.read(0, 0)
        mean, std = x.astype(float).mean(axis=(0, 2, 3)), x.astype(float).std(axis=(0, 2, 3))
        np.testing.assert_allclose(xb, (xt - mean[:, None, None]) / std[:, None, None], rtol=1e-12)


def test_single_split_file_and_float_images(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 2, 4, 4))
    y = np.arange(20) % 3
    write_arrays(tmp_path / "f.h5", {"/": (x, y)})
    with HDF5Dataset(tmp_path / "f.h5", batch_size=5, shuffle=False, normalize=False) as ds:
        assert ds.group == "/" and ds.num_classes == 3 and ds.stored_dtype == np.float32
        np.testing.assert_array_equal(ds.read(0, 1)[0], x[5:10].astype(np.float32))


# ---- shuffling ------------------------------------------------------------------------
def test_shuffle_is_identical_for_a_seed_and_new_each_epoch(h5file):
    a = HDF5Dataset(h5file, batch_size=16, seed=3)
    b = HDF5Dataset(h5file, batch_size=16, seed=3)     # another rank
    c = HDF5Dataset(h5file, batch_size=16, seed=4)
    try:
        for epoch in range(3):
            np.testing.assert_array_equal(a.permutation(epoch), b.permutation(epoch))
            assert sorted(a.permutation(epoch)) == list(range(203))
            for i in range(a.num_batches):
                np.testing.assert_array_equal(a.batch_indices(epoch, i), b.batch_indices(epoch, i))
        assert not np.array_equal(a.permutation(0), a.permutation(1))
        assert not np.array_equal(a.permutation(0), c.permutation(0))
        assert a.num_batches == 203 // 16
        seen = np.concatenate([a.batch_indices(5, i) for i in range(a.num_batches)])
        assert len(set(seen.tolist())) == seen.size == 16 * 12      # no repeats in an epoch
    finally:
        for d in (a, b, c):
            d.close()
    with HDF5Dataset(h5file, batch_size=50, shuffle=False, drop_last=False) as d:
        assert d.num_batches == 5 and d.batch_len(4) == 3 and d.batch_shape(4) == (3, 3, 9, 11)
        np.testing.assert_array_equal(d.batch_indices(7, 4), [200, 201, 202])


# ---- boxes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("degrees", [(2, 1, 1, 1), (1, 3, 1, 1), (2, 1, 2, 2), (3, 1, 1, 2), (1, 2, 3, 1)])
def test_box_reads_tile_the_batch(h5file, degrees):
    with HDF5Dataset(h5file, batch_size=16, seed=1) as ds:
        whole, ywhole = ds.read(2, 3)
        layout = Layout(ds.batch_shape(3), degrees)
        got = np.full_like(whole, np.nan)
        for r in range(layout.k):
            b = layout.box(r)
            x, y = ds.read(2, 3, b)
            assert x.shape == b.shape
            np.testing.assert_array_equal(x, whole[b.slices()])
            np.testing.assert_array_equal(y, ywhole[b[0][0]:b[0][1]])
            np.testing.assert_array_equal(ds.batch_labels(2, 3, b[0]), y)
            got[b.slices()] = x
        np.testing.assert_array_equal(got, whole)


def test_box_reads_only_its_hyperslab(h5file):
    """What is handed to h5py is exactly the box: runs of consecutive sample
    rows (in increasing order, each row once) with the c, h, w ranges."""
    with HDF5Dataset(h5file, batch_size=16, seed=1) as ds:
        calls = []
        real = ds._images

        class Spy:
            def __getitem__(self, sel):
                calls.append(sel)
                return real[sel]
        ds._images = Spy()
        box = Box(((4, 9), (1, 3), (2, 7), (0, 5)))
        x, _ = ds.read(0, 2, box)
        assert x.shape == (5, 2, 5, 5)
        assert all(sel[1:] == (slice(1, 3), slice(2, 7), slice(0, 5)) for sel in calls)
        read_rows = [r for sel in calls for r in range(sel[0].start, sel[0].stop)]
        assert read_rows == sorted(ds.batch_indices(0, 2)[4:9].tolist())
        calls.clear()
        ds.read_raw([7, 3, 4, 5, 9, 8])        # runs 3..5 and 7..9: two reads
        assert [(sel[0].start, sel[0].stop) for sel in calls] == [(3, 6), (7, 10)]


def test_sorted_reads_on_every_path(h5file, arrays):
    x = arrays[0]
    with HDF5Dataset(h5file, batch_size=8, normalize=False) as ds:
        for rows in ([5, 6, 7, 8], [8, 5, 7, 6], [10, 3, 12, 3, 10],        # one run, shuffled, repeats
                     [200, 0, 100, 57, 58], [202], []):                      # scattered, one, none
            got = ds.read_raw(rows, ((0, 2), (1, 8), (3, 11)))
            np.testing.assert_array_equal(got, x[rows][:, 0:2, 1:8, 3:11])


def test_empty_box_is_allowed(h5file):
    with HDF5Dataset(h5file, batch_size=8) as ds:
        x, y = ds.read(0, 0, ((3, 3), (0, 3), (0, 9), (0, 11)))
        assert x.shape == (0, 3, 9, 11) and y.shape == (0,)


# ---- prefetch ------------------------------------------------------------------------------
def test_prefetch_equals_direct_reads(h5file):
    with HDF5Dataset(h5file, batch_size=16, seed=9) as ds:
        items = ds.batches(0) + ds.batches(1)
        box = lambda e, i: Box(((i % 3, 16), (0, 2), (1, 9), (e, 11)))  # noqa: E731
        with ds.prefetch(items, box, depth=2) as pf:
            got = list(pf)
        assert [(b.epoch, b.index) for b in got] == items
        for b in got:
            x, y = ds.read(b.epoch, b.index, box(b.epoch, b.index))
            np.testing.assert_array_equal(b.x, x)
            np.testing.assert_array_equal(b.y, y)


def test_prefetch_error_is_raised_in_the_consumer(h5file):
    def box(epoch, index):
        if index == 2:
            raise RuntimeError("box of batch 2 is broken")
        return None
    with HDF5Dataset(h5file, batch_size=16) as ds:
        pf = ds.prefetch(ds.batches(0), box)
        assert next(pf).index == 0 and next(pf).index == 1
        with pytest.raises(RuntimeError, match="box of batch 2 is broken"):
            next(pf)
        with pytest.raises(StopIteration):
            next(pf)
        pf.close()
        # a read error (box outside the batch) travels the same way
        with ds.prefetch([(0, 0)], ((0, 99), (0, 3), (0, 9), (0, 11))) as pf:
            with pytest.raises(DataError, match="does not lie inside batch 0"):
                list(pf)


def test_prefetch_stops_cleanly_when_abandoned(h5file):
    with HDF5Dataset(h5file, batch_size=4) as ds:
        items = [(e, i) for e in range(100) for i in range(ds.num_batches)]
        pf = ds.prefetch(items, depth=2)
        next(pf)
        pf.close()
        assert not pf._thread.is_alive()
        assert not any(t.name == "hpcnn-prefetch" and t is pf._thread for t in threading.enumerate())


# ---- errors ----------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(DataFileNotFound, match=r"nope\.h5.*does not exist.*hpcnn data digits"):
        HDF5Dataset(tmp_path / "nope.h5")


def test_not_hdf5(tmp_path):
    p = tmp_path / "text.h5"
    p.write_text("hello")
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        HDF5Dataset(p)


def _raw_file(path, images, labels, group="train", **attrs):
    with h5py.File(path, "w") as f:
        g = f.create_group(group)
        if images is not None:
            g["images"] = images
        if labels is not None:
            g["labels"] = labels
        for k, v in attrs.items():
            f.attrs[k] = v
    return path


@pytest.mark.parametrize("images,labels,group,kw,match", [
    (np.zeros((4, 1, 2, 2), np.uint8), None, "train", {}, r"group 'train' has no dataset 'labels'"),
    (None, np.zeros(4, int), "train", {}, r"has no dataset 'images'"),
    (np.zeros((4, 5, 5), np.uint8), np.zeros(4, int), "train", {},
     r"must be 4-dimensional N x C x H x W, got shape \(4, 5, 5\) \(add a channel axis"),
    (np.zeros((4, 1, 2, 2), np.uint8), np.zeros(3, int), "train", {}, r"has 3 labels but .* has 4 images"),
    (np.zeros((4, 1, 2, 2), np.uint8), np.zeros((4, 1), int), "train", {}, r"must be 1-dimensional"),
    (np.zeros((4, 1, 2, 2), np.uint8), np.zeros(4, np.float32), "train", {}, r"must hold integers"),
    (np.zeros((4, 1, 2, 2), np.uint8), np.array([0, 1, 7, 2]), "train", {"num_classes": 5},
     r"label 7 of sample 2 is outside \[0, 5\)"),
    (np.zeros((4, 1, 2, 2), np.uint8), np.array([0, -1, 0, 0]), "train", {},
     r"label -1 of sample 1 is outside"),
    (np.zeros((4, 1, 2, 2), np.int32), np.zeros(4, int), "train", {}, r"must hold uint8 or floating"),
    (np.zeros((4, 1, 2, 2), np.uint8), np.zeros(4, int), "valid", {}, r"has no group 'train'; its groups are \['valid'\]"),
])
def test_malformed_files(tmp_path, images, labels, group, kw, match):
    p = _raw_file(tmp_path / "bad.h5", images, labels, group, **kw)
    with pytest.raises(DataError, match=match):
        HDF5Dataset(p, "train", batch_size=1)


def test_bad_requests(h5file):
    with pytest.raises(DataError, match="batch_size 500 is larger than the 203 samples"):
        HDF5Dataset(h5file, batch_size=500)
    with pytest.raises(DataError, match="batch_size must be a positive integer, got 0"):
        HDF5Dataset(h5file, batch_size=0)
    with HDF5Dataset(h5file, batch_size=16) as ds:
        with pytest.raises(DataError, match=r"batch index 12 is outside \[0, 12\)"):
            ds.read(0, 12)
        with pytest.raises(DataError, match=r"does not lie inside batch 0 of shape \(16, 3, 9, 11\)"):
            ds.read(0, 0, ((0, 16), (0, 4), (0, 9), (0, 11)))
        with pytest.raises(DataError, match="box must be"):
            ds.read(0, 0, "all")


# ---- digits --------------------------------------------------------------------------------
def test_bilinear_upsampling_equals_torch():
    img = np.random.default_rng(0).random((3, 8, 8))
    want = torch.nn.functional.interpolate(torch.from_numpy(img)[:, None], size=(16, 16), mode="bilinear",
                                           align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(upsample(img, 16), want, atol=1e-12)
    np.testing.assert_allclose(interpolation_matrix(8, 16).sum(axis=1), 1.0)


def test_digits_command(tmp_path):
    out = tmp_path / "digits.h5"
    rc, text, err = _cli("data", "digits", "-o", str(out))
    assert rc == 0, err
    assert "train: 1438 x 1x16x16 uint8, test: 359 x 1x16x16 uint8; 10 classes" in text
    with HDF5Dataset(out, "train", batch_size=1, shuffle=False, normalize=False) as tr, \
            HDF5Dataset(out, "test", batch_size=1, shuffle=False, normalize=False) as te:
        counts = np.bincount(np.concatenate([tr.labels, te.labels]))
        np.testing.assert_array_equal(np.bincount(te.labels), np.round(0.2 * counts).astype(int))
        assert tr.num_classes == 10 and tr.class_names == [str(i) for i in range(10)]
        x = tr.read_raw(np.arange(tr.num_samples))
        assert x.min() == 0 and x.max() == 255
    # deterministic: the same arrays again; another seed gives another split
    (a, ya), (b, yb) = load_digits_arrays()
    with HDF5Dataset(out, "test", batch_size=1, shuffle=False, normalize=False) as te:
        np.testing.assert_array_equal(te.read_raw(np.arange(te.num_samples)), b)
    (_, _), (b2, _) = load_digits_arrays(seed=1)
    assert not np.array_equal(b, b2)


def test_stratified_split():
    y = np.repeat(np.arange(4), [10, 20, 3, 1])
    tr, te = stratified_split(y, 0.25, seed=0)
    assert np.intersect1d(tr, te).size == 0 and np.union1d(tr, te).size == y.size
    np.testing.assert_array_equal(np.bincount(y[te], minlength=4), [2, 5, 1, 0])
    tr2, te2 = stratified_split(y, 0.25, seed=0)
    np.testing.assert_array_equal(te, te2)


# ---- convert -------------------------------------------------------------------------------
def test_convert_npz_nhwc_with_test_split(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 6, 5, 3), dtype=np.uint8)          # N x H x W x C
    y = np.arange(30) % 3
    xt = rng.integers(0, 256, (6, 6, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x_train=x, y_train=y, x_test=xt, y_test=np.arange(6) % 3)
    rc, text, err = _cli("data", "convert", str(tmp_path / "a.npz"), "-o", str(tmp_path / "a.h5"),
                         "--class-names", "r,g,b")
    assert rc == 0, err
    with HDF5Dataset(tmp_path / "a.h5", batch_size=30, shuffle=False, normalize=False) as ds:
        np.testing.assert_array_equal(ds.read_raw(np.arange(30)), x.transpose(0, 3, 1, 2))
        assert ds.class_names == ["r", "g", "b"]
    with HDF5Dataset(tmp_path / "a.h5", "test", batch_size=6, shuffle=False, normalize=False) as ds:
        np.testing.assert_array_equal(ds.read_raw(np.arange(6)), xt.transpose(0, 3, 1, 2))


def test_convert_npy_pair_float_and_split(tmp_path):
    x = np.random.default_rng(1).standard_normal((40, 8, 8))       # N x H x W, float
    y = np.arange(40) % 4
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    convert_arrays(tmp_path / "x.npy", tmp_path / "b.h5", tmp_path / "y.npy", test_fraction=0.3)
    with HDF5Dataset(tmp_path / "b.h5", "test", batch_size=10, shuffle=False, normalize=False) as ds:
        assert ds.num_samples == 12 and ds.stored_dtype == np.float32 and ds.sample_shape == (1, 8, 8)
        np.testing.assert_array_equal(np.bincount(ds.labels), [3, 3, 3, 3])


def test_convert_array_errors(tmp_path):
    np.savez(tmp_path / "c.npz", pictures=np.zeros((2, 3, 4, 4)))
    with pytest.raises(DataError, match=r"has arrays \['pictures'\]; expected an images/labels pair"):
        convert_arrays(tmp_path / "c.npz", tmp_path / "c.h5")
    with pytest.raises(DataError, match="cannot tell the channel axis of shape"):
        to_nchw(np.zeros((2, 5, 6, 7)))
    np.savez(tmp_path / "d.npz", images=np.full((2, 1, 2, 2), 300), labels=[0, 1])
    with pytest.raises(DataError, match=r"integer images must lie in 0..255 .* got \[300, 300\]"):
        convert_arrays(tmp_path / "d.npz", tmp_path / "d.h5")
    assert not (tmp_path / "d.h5").exists()
    rc, _, err = _cli("data", "convert", str(tmp_path / "none.npz"), "-o", str(tmp_path / "e.h5"))
    assert rc == 2 and "none.npz' does not exist" in err


def _png_folder(root, split_dirs=False):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in (["train", "test"] if split_dirs else [None]):
        base = root / split if split else root
        for ci, cls in enumerate(["cat", "dog"]):
            (base / cls).mkdir(parents=True)
            for i in range(5):
                a = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
                Image.fromarray(a).save(base / cls / f"{i}.png")


def test_convert_folder_of_images(tmp_path):
    from PIL import Image
    _png_folder(tmp_path / "imgs")
    rc, text, err = _cli("data", "convert", str(tmp_path / "imgs"), "-o", str(tmp_path / "f.h5"),
                         "--test-fraction", "0.2")
    assert rc == 0, err
    with HDF5Dataset(tmp_path / "f.h5", batch_size=8, shuffle=False, normalize=False) as ds:
        assert ds.class_names == ["cat", "dog"] and ds.sample_shape == (3, 12, 10)
        np.testing.assert_array_equal(ds.labels, [0] * 4 + [1] * 4)
        first = np.asarray(Image.open(sorted((tmp_path / "imgs" / "cat").glob("*.png"))[0]))
        rows = ds.read_raw(np.arange(8))
        assert any(np.array_equal(r, first.transpose(2, 0, 1)) for r in rows)
    # grayscale, resized, with explicit train/test folders
    _png_folder(tmp_path / "split", split_dirs=True)
    convert_folder(tmp_path / "split", tmp_path / "g.h5", size=(6, 7), channels=1)
    with HDF5Dataset(tmp_path / "g.h5", "test", batch_size=10, shuffle=False) as ds:
        assert ds.sample_shape == (1, 6, 7) and ds.num_samples == 10


def test_convert_folder_needs_pillow(tmp_path, monkeypatch):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DataError, match="needs Pillow, which is not installed: pip install Pillow"):
        convert_folder(tmp_path / "imgs", tmp_path / "x.h5")


# ---- synth --------------------------------------------------------------------------------
def test_synth_is_blockwise_and_deterministic(tmp_path):
    blocks = []
    per = 3 * 64 * 64
    write_synth(tmp_path / "s1.h5", 700, 30, (3, 64, 64), 1000, seed=5, block_bytes=200_000,
                progress=blocks.append)
    # never more than about 1 MiB (one chunk) of images in memory at a time
    assert sum(blocks) == 730 and len(blocks) >= 10 and max(blocks) * per <= 1 << 20
    write_synth(tmp_path / "s2.h5", 700, 30, (3, 64, 64), 1000, seed=5)   # one big write block
    with h5py.File(tmp_path / "s1.h5") as a, h5py.File(tmp_path / "s2.h5") as b:
        np.testing.assert_array_equal(a["train/images"][...], b["train/images"][...])
        np.testing.assert_array_equal(a["test/labels"][...], b["test/labels"][...])
        assert a["train/labels"][...].max() < 1000
        assert abs(a.attrs["mean"].mean() - 127.5) < 1.0


def test_synth_command_default_shape(tmp_path):
    rc, text, err = _cli("data", "synth", "-o", str(tmp_path / "in.h5"), "-n", "9", "--quiet")
    assert rc == 0, err
    assert "train: 9 x 3x224x224 uint8; 1000 classes" in text
    rc, _, err = _cli("data", "synth", "-o", str(tmp_path / "x.h5"), "--shape", "3x2x")
    assert rc == 2 and "--shape must look like 3x224x224" in err
