"""``hpcnn data digits|convert|synth|cosmo``: make HDF5 data sets in the layout of
docs/data-format.md."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="WHAT", required=True)

    d = sub.add_parser("digits", help="scikit-learn's handwritten digits, upsampled to 16x16 (no download)",
                       description="Write scikit-learn's 1,797 handwritten digits, upsampled bilinearly "
                                   "to SIZExSIZE uint8 images, with a stratified train/test split.")
    d.add_argument("-o", "--output", required=True, metavar="FILE", help="HDF5 file to write")
    d.add_argument("--size", type=int, default=16, help="image side after upsampling (default 16)")
    d.add_argument("--test-fraction", type=float, default=0.2, help="fraction of each class for testing")
    d.add_argument("--seed", type=int, default=0, help="seed of the split")

    c = sub.add_parser("convert", help="a folder of images (one subfolder per class) or .npz/.npy arrays",
                       description="Convert a folder of images (root/CLASS/*.png, or root/train/CLASS and "
                                   "root/test|val/CLASS; needs Pillow) or NumPy arrays (.npz with "
                                   "images/labels or x_train/y_train[/x_test/y_test], or an images .npy "
                                   "with --labels) to an hpcnn HDF5 file.")
    c.add_argument("source", help="folder of images, .npz file or images .npy file")
    c.add_argument("-o", "--output", required=True, metavar="FILE", help="HDF5 file to write")
    c.add_argument("--labels", metavar="FILE.npy", help="labels of an images .npy file")
    c.add_argument("--size", metavar="HxW", help="resize every image to HxW (folders only; "
                                                 "default: the first image's size)")
    c.add_argument("--channels", type=int, choices=(1, 3), default=3,
                   help="1: grayscale, 3: RGB (folders only; default 3)")
    c.add_argument("--layout", choices=("auto", "nchw", "nhwc", "nhw"), default="auto",
                   help="axis order of array images (default: guessed)")
    c.add_argument("--test-fraction", type=float, default=0.0,
                   help="split this fraction of each class off for testing when the source has "
                        "no test split (default 0: training split only)")
    c.add_argument("--seed", type=int, default=0, help="seed of the split")
    c.add_argument("--classes", type=int, help="number of classes (arrays; default max label + 1)")
    c.add_argument("--class-names", help="comma-separated class names (arrays)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("synth", help="synthetic ImageNet-shaped (or any shape) data, written in blocks",
                       description="Random images and labels, written block by block so that files "
                                   "larger than memory can be made (benchmarks of the data path).")
    s.add_argument("-o", "--output", required=True, metavar="FILE", help="HDF5 file to write")
    s.add_argument("-n", "--samples", type=int, default=1024, help="training samples (default 1024)")
    s.add_argument("--test-samples", type=int, default=0, help="test samples (default 0)")
    s.add_argument("--shape", default="3x224x224", metavar="CxHxW", help="sample shape (default 3x224x224)")
    s.add_argument("--classes", type=int, default=1000, help="number of classes (default 1000)")
    s.add_argument("--dtype", choices=("uint8", "float32"), default="uint8", help="stored type")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    v = sub.add_parser("cosmo", help="CosmoFlow-like volumes: Gaussian random fields whose power spectrum "
                                     "sets 4 regression targets (no download)",
                       description="Write cubic volumes of 4 channels (a Gaussian random field seen at 4 "
                                   "epochs as a log-normal density) whose power spectrum (amplitude, "
                                   "spectral index, cutoff, growth) is set by 4 targets uniform in [-1, 1] "
                                   "(hpcnn/data/cosmo.py); train it with jobs/cosmoflow.toml.")
    v.add_argument("-o", "--output", required=True, metavar="FILE", help="HDF5 file to write")
    v.add_argument("-n", "--samples", type=int, default=512, help="training samples (default 512)")
    v.add_argument("--test-samples", type=int, default=128, help="test samples (default 128)")
    v.add_argument("--size", type=int, default=32, help="voxels per side (default 32; CosmoFlow: 128)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--quiet", action="store_true", help="no progress bar")


def _progress(total, quiet, desc):
    if quiet or not sys.stderr.isatty():
        return None, None
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr)
    return bar, bar.update


def _summary(path) -> str:
    from hpcnn.data.hdf5_dataset import HDF5Dataset
    import h5py
    parts = []
    with h5py.File(path, "r") as f:
        groups = [g for g in ("train", "test") if g in f] or ["/"]
    for g in groups:
        with HDF5Dataset(path, g, batch_size=1, shuffle=False) as ds:
            parts.append(f"{g}: {ds.num_samples} x {'x'.join(map(str, ds.sample_shape))} "
                         f"{ds.stored_dtype}")
            classes = ds.num_classes
            what = "regression targets" if ds.task == "regression" else "classes"
    size = Path(path).stat().st_size
    return f"wrote {path} ({size / 2**20:.1f} MiB): " + ", ".join(parts) + f"; {classes} {what}"


def run(args) -> int:
    from hpcnn.data.hdf5_format import DataError, parse_shape
    try:
        if args.data_command == "digits":
            from hpcnn.data.digits import write_digits
            path = write_digits(args.output, args.size, args.test_fraction, args.seed)
        elif args.data_command == "cosmo":
            from hpcnn.data.cosmo import write_cosmo
            bar, update = _progress(args.samples + args.test_samples, args.quiet, "cosmo")
            try:
                path = write_cosmo(args.output, args.samples, args.test_samples, args.size, args.seed,
                                   progress=update)
            finally:
                if bar is not None:
                    bar.close()
        elif args.data_command == "synth":
            import numpy as np
            from hpcnn.data.synth import write_synth
            shape = parse_shape(args.shape, "--shape")
            if len(shape) != 3:
                raise DataError(f"--shape must be CxHxW, got {args.shape!r}")
            bar, update = _progress(args.samples + args.test_samples, args.quiet, "synth")
            try:
                path = write_synth(args.output, args.samples, args.test_samples, shape, args.classes,
                                   np.dtype(args.dtype), args.seed, progress=update)
            finally:
                if bar is not None:
                    bar.close()
        else:
            src = Path(args.source)
            if src.is_dir():
                from hpcnn.data.convert import convert_folder
                size = None
                if args.size:
                    size = parse_shape(args.size, "--size")
                    if len(size) == 1:
                        size = size * 2
                    if len(size) != 2:
                        raise DataError(f"--size must be HxW, got {args.size!r}")
                path = convert_folder(src, args.output, size, args.channels, args.test_fraction, args.seed)
            else:
                from hpcnn.data.convert import convert_arrays
                names = args.class_names.split(",") if args.class_names else None
                path = convert_arrays(src, args.output, args.labels, args.layout, args.test_fraction,
                                      args.seed, args.classes, names)
    except DataError as exc:
        print(f"hpcnn data {args.data_command}: error: {exc}", file=sys.stderr)
        return 2
    print(_summary(path))
    return 0
