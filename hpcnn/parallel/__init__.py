"""Parallel vocabulary and index math (Box, Layout, ExchangePlan) and the
MPI execution of exchange plans (comm).  Importing this package does not
import MPI; only ``hpcnn.parallel.comm`` and ``hpcnn.parallel.groups`` do."""
from hpcnn.parallel.box import Box
from hpcnn.parallel.exchange_plan import ExchangePlan, needed_boxes
from hpcnn.parallel.layout import Layout, LayoutError, split_bounds

__all__ = ["Box", "ExchangePlan", "Layout", "LayoutError", "needed_boxes", "split_bounds"]
