"""The model zoo: LeNet-5, AlexNet, VGG-16, ResNet-18/50/101, Inception-v3
and small test networks, each built as an ``hpcnn.graph.Graph``.

    >>> from hpcnn.models import build_model, MODELS
    >>> g = build_model("resnet18", batch=32)
    >>> g.num_params()
    11689512
"""
from hpcnn.models.registry import MODELS, ModelError, ModelSpec, build_model, get_spec, model_names

__all__ = ["MODELS", "ModelError", "ModelSpec", "build_model", "get_spec", "model_names"]
