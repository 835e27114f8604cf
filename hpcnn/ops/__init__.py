"""Ops: the local math of each layer on one tile, and its geometry.

Every op kind registers itself; ``make_op(kind, name, **attrs)`` builds one.
"""
from hpcnn.ops.base import (LOSS_KINDS, REGISTRY, Op, OpError, ParamSpec, PartGrads, RegionPart, TileContext,
                            TileRegion, box_pads, box_shape,
                            clip_box, dims_of, full_box, init_param, make_op)
from hpcnn.ops.kernel_set import kernel_set
from hpcnn.ops.activation import Clip, HardSwish, LeakyReLU, ReLU, Sigmoid, Tanh
from hpcnn.ops.batchnorm import BatchNorm
from hpcnn.ops.conv import Conv2d
from hpcnn.ops.conv3d import Conv3d
from hpcnn.ops.dropout import Dropout
from hpcnn.ops.input import Input
from hpcnn.ops.join import Add, Concat
from hpcnn.ops.linear import Linear
from hpcnn.ops.loss import SoftmaxCrossEntropy
from hpcnn.ops.pool import AvgPool2d, GlobalAvgPool, MaxPool2d
from hpcnn.ops.pool3d import AvgPool3d, MaxPool3d
from hpcnn.ops.regression import MeanSquaredError
from hpcnn.ops.reshape import Flatten
from hpcnn.ops.scale import ChannelScale

__all__ = ["REGISTRY", "Op", "OpError", "ParamSpec", "PartGrads", "RegionPart", "TileContext",
           "TileRegion", "box_pads", "box_shape", "clip_box", "dims_of", "full_box", "init_param",
           "make_op", "kernel_set", "ReLU", "Sigmoid", "LeakyReLU", "Clip", "HardSwish",
           "ChannelScale",
           "BatchNorm", "Conv2d", "Dropout", "Input", "Add", "Concat", "Linear",
           "SoftmaxCrossEntropy", "AvgPool2d", "GlobalAvgPool", "MaxPool2d", "Flatten",
           "Conv3d", "MaxPool3d", "AvgPool3d", "MeanSquaredError", "Tanh", "LOSS_KINDS"]
