"""Networks written with torch.nn, exported to ONNX and imported, trained
distributed equal the sequential run: three SGD steps in float64 under
channel, spatial, sample and combined plans at 2, 3 and 4 ranks give the
sequential loss, every parameter's gradient and the updated weights
(relative error <= 1e-9), identical replicas, the bytes the exchange plans
predict and the same inference accuracy (the checks of equivalence.py).
The networks (tests/onnx_nets.py): every op the importer maps (concat,
squeeze-and-excitation, ReLU6, hard swish, ...), and a ResNet block with a
projection shortcut followed by a MobileNet-v2 inverted residual with a
depthwise convolution."""
import os
import tempfile

import pytest

from hpcnn.backend import Backend

import equivalence
from equivalence import check_and_agree
from mpi_helpers import WORLD
from plan_cases import make_plan

pytestmark = pytest.mark.mpi

NETS = ("Net", "Residual")


def _import(net: str) -> str:
    """The key of the imported network in equivalence's graphs: rank 0
    exports it from torch, every rank imports the same bytes."""
    key = f"onnx_{net.lower()}"
    if key in equivalence._graphs:
        return key
    data = err = None
    if WORLD.Get_rank() == 0:
        try:
            import torch

            import onnx_nets
            torch.set_num_threads(1)
            torch.manual_seed(0)
            with tempfile.TemporaryDirectory(prefix="hpcnn-onnx-equiv-") as d:
                onnx_nets.export(getattr(onnx_nets, net)(), os.path.join(d, "net.onnx"))
                with open(os.path.join(d, "net.onnx"), "rb") as f:
                    data = f.read()
        except Exception as exc:  # noqa: BLE001  (every rank must learn of it, not wait)
            err = f"exporting {net} on rank 0: {type(exc).__name__}: {exc}"
    data, err = WORLD.bcast((data, err), root=0)
    assert err is None, err
    from hpcnn.models.onnx_import import load_onnx
    with tempfile.TemporaryDirectory(prefix="hpcnn-onnx-equiv-") as d:
        path = os.path.join(d, f"{key}.onnx")
        with open(path, "wb") as f:
            f.write(data)
        equivalence._graphs[key] = load_onnx(path, batch=equivalence.BATCH, name=key)
    return key


def _channels(w):
    return lambda n: {"c": w} if n.kind != "input" else {"n": w}


def plans(world):
    """(name, builder(g, world) -> Plan, optimiser) at this world size."""
    P = world
    if P == 2:
        return [("n2", lambda g, w: make_plan(g, w, "n2", {"n": 2}, {"n": 2}, {"n": 2}), "momentum"),
                ("h2", lambda g, w: make_plan(g, w, "h2", {"h": 2}, {"c": 2}, {"n": 1}), "nesterov"),
                ("c2", lambda g, w: make_plan(g, w, "c2", _channels(2), {"c": 2}, {"n": 2}), "decay")]
    if P == 3:
        return [("w3", lambda g, w: make_plan(g, w, "w3", {"w": 3}, {"n": 3}, {"n": 3}), "nesterov"),
                ("c3", lambda g, w: make_plan(g, w, "c3", _channels(3), {"c": 3}, {"n": 1}), "momentum")]
    return [("h2w2", lambda g, w: make_plan(g, w, "h2w2", {"h": 2, "w": 2}, {"n": 4}, {"n": 4}), "decay"),
            ("n2c2", lambda g, w: make_plan(g, w, "n2c2", lambda n: {"n": 2, "c": 2} if n.kind != "input"
                                            else {"n": 4}, {"n": 2, "c": 2}, {"n": 2}), "momentum")]


CASES = [(net, name, build, opt) for net in NETS for name, build, opt in plans(WORLD.Get_size())]


@pytest.mark.parametrize("net,name,build,opt", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_imported_network_distributed_equals_sequential(net, name, build, opt):
    key = _import(net)
    check_and_agree(f"{key}-{name}", key, build, opt, Backend("numpy"))
