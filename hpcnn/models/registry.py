"""The model registry and ``build_model``.

``MODELS`` maps each name to a ModelSpec: its builder, default input
(channels, height, width; channels, depth, height, width for a volume
network), default number of classes (of outputs, for a regression network)
and the smallest input side its layers accept.  ``build_model`` validates
the request and returns an ``hpcnn.graph.Graph`` named after the model,
ending in a loss node "loss" fed by the logits: softmax cross-entropy for
classification, mean squared error for regression."""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

from hpcnn.graph import Graph, GraphError
from hpcnn.models.alexnet import alexnet
from hpcnn.models.inception import inception_v3
from hpcnn.models.lenet import lenet5
from hpcnn.models.mobilenet import mobilenet_v2
from hpcnn.models.resnet import resnet18, resnet50, resnet101
from hpcnn.models.small import digits_cnn, inception_small, mobilenet_small, resnet_small
from hpcnn.models.vgg import vgg16
from hpcnn.models.volumes import cosmoflow, volume_small


class ModelError(ValueError):
    """An unknown model name or an input size / class count the model cannot
    take.  The message names the value and what is accepted."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable
    in_channels: int
    image_size: tuple          # default (H, W), or (D, H, W) for a volume network
    num_classes: int           # classes, or regression outputs
    min_size: int              # smallest H (and W, and D) every layer accepts
    description: str
    small: bool = False        # a test/example network
    task: str = "classification"   # or "regression" (float targets, MSE loss)

    @property
    def volume(self) -> bool:
        """Whether samples are volumes (C, D, H, W)."""
        return len(self.image_size) == 3

    @property
    def input_shape(self) -> tuple:
        """Default (C, H, W) of one sample."""
        return (self.in_channels,) + tuple(self.image_size)


_SPECS = [
    ModelSpec("lenet5", lenet5, 1, (32, 32), 10, 16,
              "LeNet-5 (ReLU, max pooling)", small=True),
    ModelSpec("alexnet", alexnet, 3, (224, 224), 1000, 63,
              "AlexNet (torchvision layout)"),
    ModelSpec("vgg16", vgg16, 3, (224, 224), 1000, 32, "VGG-16 (configuration D)"),
    ModelSpec("resnet18", resnet18, 3, (224, 224), 1000, 1, "ResNet-18 (basic blocks)"),
    ModelSpec("resnet50", resnet50, 3, (224, 224), 1000, 1, "ResNet-50 (bottleneck v1.5)"),
    ModelSpec("resnet101", resnet101, 3, (224, 224), 1000, 1, "ResNet-101 (bottleneck v1.5)"),
    ModelSpec("inception_v3", inception_v3, 3, (299, 299), 1000, 75,
              "Inception-v3 without the auxiliary head"),
    ModelSpec("mobilenet_v2", mobilenet_v2, 3, (224, 224), 1000, 1,
              "MobileNet-V2 (inverted residuals, depthwise convolutions, ReLU6)"),
    ModelSpec("resnet_small", resnet_small, 3, (16, 16), 10, 1,
              "3 basic blocks, stride-2 projection (tests)", small=True),
    ModelSpec("inception_small", inception_small, 3, (16, 16), 10, 3,
              "stem + 4-branch Inception block + reduction (tests)", small=True),
    ModelSpec("digits_cnn", digits_cnn, 1, (16, 16), 10, 4,
              "2 conv+BN+ReLU+pool, dropout, fc (digits data)", small=True),
    ModelSpec("cosmoflow", cosmoflow, 4, (128, 128, 128), 4, 32,
              "CosmoFlow (MLPerf HPC): 5 conv3d+leaky ReLU+max pool, 3 fc, 4 outputs, MSE",
              task="regression"),
    ModelSpec("volume_small", volume_small, 2, (12, 10, 14), 3, 2,
              "3 conv3d (BN, max/avg pool, dilation), global pool, fc, MSE (tests)",
              small=True, task="regression"),
    ModelSpec("mobilenet_small", mobilenet_small, 3, (16, 16), 10, 1,
              "depthwise-separable blocks, multiplier 2, inverted residual, grouped conv (tests)",
              small=True),
]

MODELS: dict[str, ModelSpec] = {s.name: s for s in _SPECS}


def model_names() -> list[str]:
    return list(MODELS)


def get_spec(name: str) -> ModelSpec:
    if not isinstance(name, str) or name not in MODELS:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name]


def _positive_int(what, v, model):
    """``v`` as an int (Python or NumPy integers), else a ModelError."""
    try:
        if isinstance(v, bool):
            raise TypeError
        v = operator.index(v)
    except TypeError:
        raise ModelError(f"model {model!r}: {what} must be a positive integer, got {v!r}") from None
    if v < 1:
        raise ModelError(f"model {model!r}: {what} must be a positive integer, got {v}")
    return v


def _image_size(spec, image_size):
    if image_size is None:
        return tuple(spec.image_size)
    nd = len(spec.image_size)
    names = "(depth, height, width)" if nd == 3 else "(height, width)"
    if isinstance(image_size, (tuple, list)):
        if len(image_size) != nd:
            raise ModelError(f"model {spec.name!r}: image_size must be an integer or {names}, "
                             f"got {tuple(image_size)!r}")
        size = tuple(_positive_int("image_size", v, spec.name) for v in image_size)
    else:
        size = (_positive_int("image_size", image_size, spec.name),) * nd
    if min(size) < spec.min_size:
        least = "x".join([str(spec.min_size)] * nd)
        raise ModelError(f"model {spec.name!r} needs {'volumes' if nd == 3 else 'images'} of at least "
                         f"{least}, got image_size {'x'.join(map(str, size))} (its default is "
                         f"{'x'.join(map(str, spec.image_size))})")
    return size


def build_model(name: str, batch: int = 1, image_size=None, num_classes: int | None = None,
                in_channels: int | None = None) -> Graph:
    """The Graph of model ``name`` for mini-batches of ``batch`` samples.

    image_size: int or (height, width) ((depth, height, width) for a volume
    network); default the model's own size.
    num_classes, in_channels: default the model's own (num_classes is the
    number of outputs of a regression network).
    Raises ModelError for an unknown name or a size the model cannot take."""
    spec = get_spec(name)
    batch = _positive_int("batch", batch, name)
    size = _image_size(spec, image_size)
    classes = spec.num_classes if num_classes is None else _positive_int("num_classes", num_classes, name)
    if classes < 2 and spec.task == "classification":
        raise ModelError(f"model {name!r}: num_classes must be at least 2, got {classes}")
    chans = spec.in_channels if in_channels is None else _positive_int("in_channels", in_channels, name)
    try:
        g = spec.builder(batch, chans, size, classes, name=name)
    except GraphError as exc:  # a size that passes min_size but still fails a layer
        raise ModelError(f"model {name!r} cannot take input {chans}x{'x'.join(map(str, size))}: {exc}") from None
    g.meta.update(model=name, input_shape=(chans,) + size, num_classes=classes)
    return g
