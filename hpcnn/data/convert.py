"""Converting existing data into the hpcnn HDF5 layout.

* A folder of images with one subfolder per class (``root/cat/001.jpg``),
  or with ``train/`` and ``test/`` (or ``val/``) folders each holding the
  class subfolders.  Read with Pillow (an optional dependency), converted
  to grayscale or RGB, resized, stored as uint8, streamed in blocks.
* NumPy arrays: a .npz file with images and labels (keys images/labels,
  x/y or x_train/y_train, and optionally test_images/test_labels or
  x_test/y_test), or an images .npy file with a labels .npy file.
  Images may be N x H x W, N x C x H x W or N x H x W x C.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hpcnn.data.hdf5_format import DataError, ImageFileWriter
from hpcnn.data.splits import stratified_split

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
TRAIN_KEYS = (("images", "labels"), ("x_train", "y_train"), ("train_images", "train_labels"),
              ("X_train", "y_train"), ("x", "y"), ("X", "y"))
TEST_KEYS = (("test_images", "test_labels"), ("x_test", "y_test"), ("X_test", "y_test"))


# ---- folders of images ---------------------------------------------------------
def _require_pillow():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("converting a folder of images needs Pillow, which is not installed: "
                        "pip install Pillow (or convert the images to a .npz file first)") from None
    return Image


def _class_folders(root: Path):
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"folder {str(root)!r} has no class subfolders (expected root/CLASS/IMAGE files)")
    files, labels = [], []
    for i, c in enumerate(classes):
        imgs = sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        files += imgs
        labels += [i] * len(imgs)
    if not files:
        raise DataError(f"folder {str(root)!r}: its class subfolders {classes[:5]}... hold no image files "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    return classes, files, np.asarray(labels, dtype=np.int64)


def _load_image(Image, path, mode, size):
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read image {str(path)!r}: {exc}") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def convert_folder(root, out, size=None, channels: int = 3, test_fraction: float = 0.0, seed: int = 0,
                   block: int = 256, progress=None) -> Path:
    """Folder of class subfolders (or train/ and test|val/ folders of them)
    -> HDF5.  size: (H, W); default the first image's size, and every image
    must then have it."""
    Image = _require_pillow()
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is not a folder of images")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    mode = "L" if channels == 1 else "RGB"
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        classes, tr_files, tr_labels = _class_folders(root / "train")
        te_classes, te_files, te_labels = _class_folders(test_dir)
        if te_classes != classes:
            raise DataError(f"{str(test_dir)!r} has classes {te_classes[:5]}... but "
                            f"{str(root / 'train')!r} has {classes[:5]}...: they must be the same")
        splits = {"train": (tr_files, tr_labels), "test": (te_files, te_labels)}
    else:
        classes, files, labels = _class_folders(root)
        tr, te = stratified_split(labels, test_fraction, seed)
        splits = {"train": ([files[i] for i in tr], labels[tr])}
        if te.size:
            splits["test"] = ([files[i] for i in te], labels[te])
    first = splits["train"][0][0]
    if size is None:
        with Image.open(first) as im:
            size = (im.size[1], im.size[0])
        fixed = True
    else:
        size = tuple(int(s) for s in size)
        fixed = False
    src = f"image folder {str(root)!r} ({len(classes)} classes), {mode} {size[0]}x{size[1]}"
    with ImageFileWriter(out, len(classes), source=src, class_names=classes) as w:
        for group, (files, labels) in splits.items():
            s = w.split(group, len(files), (channels,) + size, np.uint8)
            for i in range(0, len(files), block):
                imgs = []
                for f in files[i:i + block]:
                    a = _load_image(Image, f, mode, None if fixed else size)
                    if a.shape[1:] != size:
                        raise DataError(f"image {str(f)!r} is {a.shape[1]}x{a.shape[2]} but "
                                        f"{str(first)!r} is {size[0]}x{size[1]}; pass --size HxW to resize all")
                    imgs.append(a)
                s.append(np.stack(imgs), labels[i:i + block])
                if progress is not None:
                    progress(len(imgs))
    return Path(out)


# ---- arrays ----------------------------------------------------------------------
def to_nchw(images, layout: str = "auto", where="images"):
    """N x C x H x W view of an image array given as N x H x W,
    N x C x H x W or N x H x W x C (layout auto|nchw|nhwc|nhw)."""
    a = images
    if layout == "nhw" or (layout == "auto" and a.ndim == 3):
        if a.ndim != 3:
            raise DataError(f"{where}: layout nhw needs 3 dimensions, got shape {a.shape}")
        return a[:, None]
    if a.ndim != 4:
        raise DataError(f"{where} must be N x H x W, N x C x H x W or N x H x W x C, got shape {a.shape}")
    if layout == "nchw":
        return a
    if layout == "nhwc":
        return a.transpose(0, 3, 1, 2)
    if layout != "auto":
        raise DataError(f"layout must be auto, nchw, nhwc or nhw, got {layout!r}")
    if a.shape[1] in (1, 3):
        return a
    if a.shape[3] in (1, 3, 4):
        return a.transpose(0, 3, 1, 2)
    raise DataError(f"{where}: cannot tell the channel axis of shape {a.shape}; pass --layout nchw or nhwc")


def _store_dtype(a, where):
    if a.dtype == np.uint8:
        return np.uint8
    if a.dtype.kind == "f":
        return np.float32
    if a.dtype.kind in "iu":
        lo, hi = int(a.min()), int(a.max())
        if 0 <= lo and hi <= 255:
            return np.uint8
        raise DataError(f"{where}: integer images must lie in 0..255 to be stored as uint8, got "
                        f"[{lo}, {hi}]; convert them to float first")
    raise DataError(f"{where}: images must be numbers, got dtype {a.dtype}")


def _labels(y, n, where):
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{where}: labels must be a vector of {n} values (one per image), got shape {y.shape}")
    if y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integers, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise DataError(f"{where}: labels must be non-negative, got {int(y.min())}")
    return y.astype(np.int64)


def load_arrays(path, labels_path=None):
    """{'train': (x, y)[, 'test': (x, y)]} from a .npz, or from an images
    .npy and a labels .npy."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist")
    if path.suffix == ".npy":
        if labels_path is None:
            raise DataError(f"{str(path)!r} holds images only: give the labels with --labels FILE.npy")
        x = np.load(path, mmap_mode="r", allow_pickle=False)
        y = np.load(labels_path, allow_pickle=False)
        return {"train": (x, y)}
    if path.suffix != ".npz":
        raise DataError(f"{str(path)!r}: convert reads a folder of images, a .npz or a .npy file")
    if labels_path is not None:
        raise DataError("--labels goes with an images .npy file, not with a .npz")
    z = np.load(path, allow_pickle=False)
    keys = set(z.files)
    out = {}
    for kx, ky in TRAIN_KEYS:
        if kx in keys and ky in keys:
            out["train"] = (z[kx], z[ky])
            break
    for kx, ky in TEST_KEYS:
        if kx in keys and ky in keys:
            out["test"] = (z[kx], z[ky])
            break
    if "train" not in out:
        raise DataError(f"{str(path)!r} has arrays {sorted(keys)}; expected an images/labels pair named "
                        f"{', '.join('/'.join(p) for p in TRAIN_KEYS)}")
    return out


def convert_arrays(path, out, labels_path=None, layout="auto", test_fraction: float = 0.0, seed: int = 0,
                   num_classes=None, class_names=None, block: int = 1024) -> Path:
    splits = load_arrays(path, labels_path)
    prepared = {}
    for group, (x, y) in splits.items():
        where = f"{Path(path).name} ({group})"
        x = to_nchw(x, layout, where)
        prepared[group] = (x, _labels(y, x.shape[0], where), _store_dtype(x, where))
    if "test" not in prepared and test_fraction > 0:
        x, y, dt = prepared["train"]
        tr, te = stratified_split(y, test_fraction, seed)
        prepared = {"train": (x[tr], y[tr], dt), "test": (x[te], y[te], dt)}
    k = int(max(int(y.max()) for _, y, _ in prepared.values() if y.size)) + 1
    if num_classes is None:
        num_classes = len(class_names) if class_names else k
    if k > int(num_classes):
        raise DataError(f"labels reach {k - 1} but num_classes is {num_classes}")
    shapes = {g: x.shape[1:] for g, (x, _, _) in prepared.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"the splits have different sample shapes: {shapes}")
    src = f"arrays from {Path(path).name}" + (f" and {Path(labels_path).name}" if labels_path else "")
    with ImageFileWriter(out, int(num_classes), source=src, class_names=class_names) as w:
        for group, (x, y, dt) in prepared.items():
            s = w.split(group, x.shape[0], x.shape[1:], dt)
            for i in range(0, x.shape[0], block):
                s.append(np.ascontiguousarray(x[i:i + block]).astype(dt, copy=False), y[i:i + block])
    return Path(out)
