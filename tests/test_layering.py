"""The layers of docs/design.md: each module imports only from its own layer
or the layers below it (checked on the source, at module level and inside
functions), and nothing in hpcnn imports torch outside the benchmarks."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "hpcnn"

# layer number of each module or package (longest prefix wins)
LAYER = {
    "hpcnn": 0, "hpcnn.__main__": 8,
    "hpcnn.backend": 1,
    "hpcnn.ops": 2,
    "hpcnn.graph": 3, "hpcnn.models": 3,
    "hpcnn.parallel": 4,
    "hpcnn.strategy": 5,
    "hpcnn.runtime": 6,
    "hpcnn.data": 7, "hpcnn.checkpoint": 7,
    "hpcnn.train": 8, "hpcnn.cli": 8, "hpcnn.job": 8, "hpcnn.failsafe": 8, "hpcnn.progress": 8,
    "hpcnn.checkpoint_command": 8, "hpcnn.bench": 8,
    "hpcnn.cluster": 8,
}
# modules of a layer that may import MPI (the rest of that layer may not)
MPI_ALLOWED = ("hpcnn.backend", "hpcnn.parallel.comm", "hpcnn.parallel.groups", "hpcnn.runtime",
               "hpcnn.checkpoint", "hpcnn.train", "hpcnn.failsafe", "hpcnn.bench",
               "hpcnn.strategy.calibrate", "hpcnn.cluster.probe")


def layer_of(mod: str) -> int:
    best = None
    for k in LAYER:
        if mod == k or mod.startswith(k + "."):
            if best is None or len(k) > len(best):
                best = k
    return LAYER[best]


def modules():
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        yield name, p


def imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


@pytest.mark.parametrize("name,path", list(modules()), ids=lambda x: str(x) if isinstance(x, str) else "")
def test_imports_follow_the_layers(name, path):
    mine = layer_of(name)
    for imp in imports(path):
        if imp.startswith("hpcnn"):
            assert layer_of(imp) <= mine, f"{name} (layer {mine}) imports {imp} (layer {layer_of(imp)})"
        if imp.split(".")[0] == "torch":
            assert name.startswith("hpcnn.bench"), f"{name} imports torch (only benchmarks may)"
        if imp.split(".")[0] == "mpi4py":
            assert name.startswith(MPI_ALLOWED), f"{name} imports MPI but its layer must not"
