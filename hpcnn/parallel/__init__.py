"""Parallel vocabulary and index math (Box, Layout, ExchangePlan) and the
MPI execution of exchange plans (comm).  Importing this package does not
import MPI; only ``hpcnn.parallel.comm`` does."""
from hpcnn.parallel.box import Box
from hpcnn.parallel.layout import Layout, LayoutError, split_bounds

__all__ = ["Box", "Layout", "LayoutError", "split_bounds"]
