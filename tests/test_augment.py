"""Augmentation (hpcnn.data.augment with HDF5Dataset): the pixels equal
torch's crop + interpolate(bilinear, align_corners=False) + flip of the
stored image; they are a pure function of (seed, epoch, sample), the same
whatever box a rank reads (splits over n, c, h, w as 1, 2 and 4 ranks
would read them); a rank whose box is part of the image reads only the
stored rows and columns that part interpolates; the crops follow their
ranges; bad settings are named."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcnn.data import DataError, HDF5Dataset, write_arrays
from hpcnn.data.augment import Augmentation
from hpcnn.parallel import Layout

F = torch.nn.functional
N, C, H, W = 24, 3, 21, 26           # stored images (not square, not the network's size)
OUT = 16
B = 8


@pytest.fixture(scope="module")
def images_file(tmp_path_factory):
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, size=(N, C, H, W), dtype=np.uint8)
    y = rng.integers(0, 5, size=N)
    path = tmp_path_factory.mktemp("aug") / "img.h5"
    write_arrays(path, {"train": (x, y), "test": (x[:10], y[:10])}, num_classes=5)
    return path, x


def _train_aug(**kw):
    kw.setdefault("size", OUT)
    kw.setdefault("random_resized_crop", True)
    kw.setdefault("flip", True)
    return Augmentation(seed=7, **kw)


def _open(path, aug, group="train", dtype=np.float64, **kw):
    return HDF5Dataset(path, group, batch_size=B, seed=3, dtype=dtype, transform=aug, **kw)


def _torch_view(img, view, out_hw):
    """The whole network input of one sample by torch: the crop (or the
    resized image), bilinear interpolation, the flip."""
    t = torch.tensor(img, dtype=torch.float64)[None]
    rows, cols = view.rows, view.cols
    crop = t[:, :, rows.lo:rows.hi + 1, cols.lo:cols.hi + 1]
    ch, cw = crop.shape[2:]
    if abs(rows.origin - rows.lo) < 1e-12 and abs(rows.step - ch / out_hw[0]) < 1e-12:
        y = F.interpolate(crop, size=out_hw, mode="bilinear", align_corners=False)   # random resized crop
    else:
        rh, rw = int(round(H / rows.step)), int(round(W / cols.step))                 # resize, centre crop
        big = F.interpolate(t, size=(rh, rw), mode="bilinear", align_corners=False)
        top, left = int(round(rows.origin / rows.step)), int(round(cols.origin / cols.step))
        y = big[:, :, top:top + out_hw[0], left:left + out_hw[1]]
    if view.flip:
        y = torch.flip(y, dims=[3])
    return y[0].numpy()


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_pixels_equal_torch_crop_interpolate_and_flip(images_file, kind):
    path, x = images_file
    aug = _train_aug() if kind == "train" else Augmentation(size=OUT, resize=18)
    with _open(path, aug, normalize=False) as ds:
        assert ds.sample_shape == (C, OUT, OUT) and ds.stored_shape == (C, H, W)
        rows = ds.batch_indices(2, 1)
        got = ds.read_rows(rows, epoch=2)
        flips = 0
        for i, r in enumerate(rows):
            view = aug.view(2, int(r), (H, W))
            flips += view.flip
            want = _torch_view(x[r], view, (OUT, OUT))
            assert np.abs(got[i] - want).max() <= 1e-10, (kind, int(r))
    if kind == "train":
        assert 0 < flips < len(rows)


def test_augmentation_is_a_pure_function_of_seed_epoch_and_sample(images_file):
    path, _ = images_file
    a, b = _train_aug(), _train_aug()
    views = {e: a.views(e, range(N), (H, W)) for e in (0, 1)}
    assert views[0] == b.views(0, range(N), (H, W))               # another object, same draws
    assert views[0][5] == a.view(0, 5, (H, W))                     # a sample alone, same draw
    assert sum(v0 != v1 for v0, v1 in zip(views[0], views[1])) > N // 2   # epochs differ
    assert views[0] != Augmentation(size=OUT, random_resized_crop=True, flip=True, seed=8).views(0, range(N), (H, W))
    with _open(path, a) as d1, _open(path, b) as d2:
        x1, _ = d1.read(1, 2)
        x2, _ = d2.read(1, 2)
        assert np.array_equal(x1, x2)
        # a sample gets its pixels wherever it sits in a batch
        rows = d1.batch_indices(1, 2)
        alone = d1.read_rows(rows[3:4], epoch=1)
        assert np.array_equal(alone[0], x1[3])


SPLITS = {"1 rank": (1, 1, 1, 1), "n2": (2, 1, 1, 1), "n4": (4, 1, 1, 1), "h2": (1, 1, 2, 1),
          "w2": (1, 1, 1, 2), "h2w2": (1, 1, 2, 2), "c3": (1, 3, 1, 1), "n2w2": (2, 1, 1, 2), "h4": (1, 1, 4, 1)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("split", list(SPLITS))
def test_every_box_gets_the_pixels_of_the_whole_image(images_file, split, dtype):
    path, _ = images_file
    with _open(path, _train_aug(), dtype=dtype, mean=[100.0, 120.0, 90.0], std=[50.0, 60.0, 70.0]) as ds:
        whole, _ = ds.read(3, 1)
        L = Layout((B, C, OUT, OUT), SPLITS[split])
        assembled = np.full_like(whole, np.nan)
        for r in L.ranks:
            box = L.box(r)
            tile, _ = ds.read(3, 1, box)
            assembled[box.slices()] = tile
        assert np.array_equal(assembled, whole)
        # the normalisation is the job's mean and std
        raw = _open(path, _train_aug(), dtype=np.float64, normalize=False).read(3, 1)[0]
        want = (raw - np.array([100.0, 120.0, 90.0])[:, None, None]) / np.array([50.0, 60.0, 70.0])[:, None, None]
        assert np.abs(whole - want).max() <= (1e-5 if dtype == np.float32 else 1e-12)


class _Spy:
    """The stored images, recording every hyperslab read from them."""

    def __init__(self, ds):
        self.ds, self.reads = ds, []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.ds[key]

    def __getattr__(self, name):
        return getattr(self.ds, name)


def test_a_rank_reads_only_what_its_box_needs(images_file):
    path, _ = images_file
    aug = _train_aug()
    with _open(path, aug) as ds:
        spy = ds._images = _Spy(ds._images)
        L = Layout((B, C, OUT, OUT), (1, 1, 2, 2))
        box = L.box(3)                                     # the bottom right quarter
        ds.read(0, 0, box)
        rows = ds.batch_indices(0, 0)
        assert len(spy.reads) == B
        full = 0
        for key, r in zip(spy.reads, rows):
            view = aug.view(0, int(r), (H, W))
            (r0, r1), (q0, q1) = view.source(tuple(box[2]), tuple(box[3]))
            assert key == (int(r), slice(0, C), slice(r0, r1), slice(q0, q1))
            # the rows and columns read are exactly those the pixels interpolate
            need_r = set(view.rows.taps(*box[2])[0]) | set(view.rows.taps(*box[2])[1])
            cols = view._cols(tuple(box[3]))
            need_q = set(view.cols.taps(*cols)[0]) | set(view.cols.taps(*cols)[1])
            assert set(range(r0, r1)) == need_r and set(range(q0, q1)) == need_q
            crop_h, crop_w = view.rows.hi - view.rows.lo + 1, view.cols.hi - view.cols.lo + 1
            full += crop_h * crop_w
        read = sum((k[2].stop - k[2].start) * (k[3].stop - k[3].start) for k in spy.reads)
        assert read < 0.5 * full             # a quarter of the output needs about a quarter of the crop
        # a channel split reads its channels only
        spy.reads.clear()
        ds.read(0, 0, Layout((B, C, OUT, OUT), (1, 3, 1, 1)).box(1))
        assert all(k[1] == slice(1, 2) for k in spy.reads)


def test_without_augmentation_a_spatial_box_reads_its_rows_only(images_file):
    path, x = images_file
    ident = Augmentation()                    # no crop, no flip, no resize: the stored image
    with _open(path, ident, normalize=False) as ds:
        assert ds.transform is None and ds.sample_shape == (C, H, W)
        spy = ds._images = _Spy(ds._images)
        box = Layout((B, C, H, W), (1, 1, 2, 1)).box(1)
        tile, _ = ds.read(0, 1, box)
        assert all(k[2] == slice(*box[2]) for k in spy.reads)
        rows = ds.batch_indices(0, 1)
        assert np.array_equal(tile, x[rows][box.slices()[0]][:, :, box[2][0]:box[2][1]])


def test_crops_follow_their_ranges():
    aug = Augmentation(size=OUT, random_resized_crop=True, scale=(0.25, 0.5), ratio=(0.5, 2.0), flip=True, seed=1)
    hw = (200, 300)
    views = aug.views(0, range(400), hw)
    area = np.array([(v.rows.hi - v.rows.lo + 1) * (v.cols.hi - v.cols.lo + 1) for v in views]) / (200 * 300)
    ratio = np.array([(v.cols.hi - v.cols.lo + 1) / (v.rows.hi - v.rows.lo + 1) for v in views])
    assert area.min() >= 0.24 and area.max() <= 0.51
    assert ratio.min() >= 0.49 and ratio.max() <= 2.05
    assert 0.4 < np.mean([v.flip for v in views]) < 0.6
    assert all(0 <= v.rows.lo and v.rows.hi < 200 and 0 <= v.cols.lo and v.cols.hi < 300 for v in views)
    # no draw fits: the centred crop at the nearest allowed ratio
    tall = Augmentation(size=8, random_resized_crop=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), seed=0)
    v = tall.view(0, 0, (40, 10))
    assert (v.rows.lo, v.rows.hi, v.cols.lo, v.cols.hi) == (15, 24, 0, 9)


def test_evaluation_view_is_deterministic_and_identity_when_sizes_match(images_file):
    path, x = images_file
    aug = Augmentation(size=OUT, resize=18)
    assert aug.views(0, range(5), (H, W)) == aug.views(9, range(5), (H, W))
    same = Augmentation(size=(H, W))
    assert same.is_identity((H, W))
    with _open(path, same, group="test", normalize=False) as ds:
        got = ds.read_rows(np.arange(10))
        assert np.array_equal(got, x[:10].astype(np.float64))


@pytest.mark.parametrize("kw,match", [
    (dict(size=OUT, resize=10), "smaller than the network's input 16x16: set augment.resize to at least 16"),
    (dict(size=30), "images of 21x26 are smaller than the network's input 30x30"),
])
def test_a_centre_crop_that_does_not_fit_is_named(images_file, kw, match):
    path, _ = images_file
    with pytest.raises(DataError, match=match):
        _open(path, Augmentation(**kw))


def test_bad_settings_are_named(images_file):
    path, _ = images_file
    with pytest.raises(ValueError, match=r"augment.crop_scale must lie in \(0, 1\]"):
        Augmentation(random_resized_crop=True, scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="augment.crop_ratio must be two numbers"):
        Augmentation(random_resized_crop=True, ratio=(2.0, 1.0))
    with pytest.raises(DataError, match=r"augment.mean must have one value per channel \(3\)"):
        _open(path, None, mean=[1.0, 2.0])
