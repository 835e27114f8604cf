"""Data: the HDF5 image format (hdf5_format), the per-rank box reader with
a seeded per-epoch shuffle and background prefetch (hdf5_dataset), and the
makers of data files (digits, convert, synth) behind ``hpcnn data``."""
from hpcnn.data.hdf5_dataset import Batch, HDF5Dataset, Prefetcher, open_dataset
from hpcnn.data.hdf5_format import DataError, DataFileNotFound, ImageFileWriter, write_arrays

__all__ = ["Batch", "HDF5Dataset", "Prefetcher", "open_dataset", "DataError", "DataFileNotFound",
           "ImageFileWriter", "write_arrays"]
