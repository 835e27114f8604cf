"""Where a job's network comes from: the zoo (``model.name``), an ONNX file
(``model.onnx``) or a Python function (``model.builder``).

A builder is ``"package.module:function"``; hpcnn imports the module and
calls ``function(batch=B, input_shape=(C, H, W), num_classes=K)``, which
returns an ``hpcnn.graph.Graph`` whose input is (B, C, H, W) and whose last
node is the loss (``g.loss(logits)``).  For example::

    # mynets.py
    def tiny(batch, input_shape, num_classes):
        from hpcnn.graph import Graph
        g = Graph("tiny")
        x = g.input((batch,) + tuple(input_shape))
        x = g.relu(g.bn(g.conv(x, 16, 3, padding=1)))
        g.loss(g.linear(g.flatten(g.maxpool(x, 2)), num_classes))
        return g

and ``model.builder = "mynets:tiny"`` (``mynets`` on PYTHONPATH or beside
the job file).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

from hpcnn.graph import Graph, GraphError
from hpcnn.models.registry import ModelError, build_model

__all__ = ["build_network", "builder_network", "network_source"]


def network_source(model: dict) -> str:
    """Which of ``name``, ``onnx`` and ``builder`` the [model] section
    names (exactly one)."""
    given = [k for k in ("name", "onnx", "builder") if model.get(k)]
    if len(given) != 1:
        raise ModelError(f"[model] must name exactly one of model.name (the zoo), model.onnx (a file) and "
                         f"model.builder (package.module:function), got {given or 'none'}")
    return given[0]


def builder_network(spec: str, batch: int, input_shape, num_classes: int, search_dir=None) -> Graph:
    """The Graph a ``package.module:function`` builder returns, checked."""
    mod_name, _, fn_name = str(spec).partition(":")
    if not mod_name or not fn_name:
        raise ModelError(f"model.builder must be 'package.module:function', got {spec!r}")
    added = False
    if search_dir is not None and str(search_dir) not in sys.path:
        sys.path.insert(0, str(search_dir))
        added = True
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ModelError(f"model.builder {spec!r}: cannot import {mod_name!r}: {exc}") from None
    finally:
        if added:
            sys.path.remove(str(search_dir))
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ModelError(f"model.builder {spec!r}: module {mod_name!r} has no function {fn_name!r}")
    try:
        g = fn(batch=batch, input_shape=tuple(input_shape), num_classes=num_classes)
    except GraphError as exc:
        raise ModelError(f"model.builder {spec!r} built a bad graph: {exc}") from None
    if not isinstance(g, Graph):
        raise ModelError(f"model.builder {spec!r} returned {type(g).__name__}, not an hpcnn.graph.Graph")
    want = (batch,) + tuple(input_shape)
    try:
        got = tuple(g[g.input_name].shape)
        logits = g[g.logits_name].shape
    except GraphError as exc:
        raise ModelError(f"model.builder {spec!r}: {exc} (end the graph with g.loss(logits))") from None
    if got != want:
        raise ModelError(f"model.builder {spec!r}: the graph's input is {got}, the job feeds {want}")
    if logits[1] != num_classes:
        raise ModelError(f"model.builder {spec!r}: {logits[1]} outputs for {num_classes} classes")
    return g


def build_network(model: dict, batch: int, sample_shape, num_classes: int, resolve=lambda p: p) -> Graph:
    """The job's network: ``model`` is the job's [model] section,
    ``sample_shape`` (C, H, W) of the data ((C, D, H, W) for volumes),
    ``resolve`` turns a path of the job file into a real one."""
    from hpcnn.models.onnx_import import load_onnx
    from hpcnn.models.registry import get_spec
    source = network_source(model)
    if source == "name":
        c, *spatial = sample_shape
        spec = get_spec(model["name"])
        if spec.volume != (len(spatial) == 3):
            raise ModelError(f"model {spec.name!r} takes {'volumes' if spec.volume else 'images'} but the "
                             f"data holds {'volumes' if len(spatial) == 3 else 'images'} "
                             f"{'x'.join(map(str, sample_shape))}: choose a "
                             f"{'volume network (cosmoflow, volume_small)' if len(spatial) == 3 else 'model for images'}")
        size = tuple(spatial) if spec.volume else spatial[0]
        return build_model(model["name"], batch=batch, image_size=size, num_classes=num_classes, in_channels=c)
    if len(sample_shape) != 3:
        raise ModelError(f"model.{source} networks take images C x H x W; the data holds volumes "
                         f"{'x'.join(map(str, sample_shape))}: use a zoo volume network (cosmoflow, volume_small)")
    c, h, w = sample_shape
    if source == "onnx":
        g = load_onnx(resolve(model["onnx"]), batch=batch, num_classes=num_classes,
                      init=model.get("onnx_init", "weights"))
        shape = tuple(g[g.input_name].shape[1:])
        if shape != (c, h, w):
            raise ModelError(f"the ONNX model takes images {shape}, the data has {(c, h, w)}")
        return g
    job_dir = Path(resolve(".")).resolve()
    return builder_network(model["builder"], batch, (c, h, w), num_classes, search_dir=job_dir)
