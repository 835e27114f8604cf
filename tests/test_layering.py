"""The layers of docs/design.md: each module imports only from its own layer
or the layers below it (checked on the source, at module level and inside
functions), and nothing in hpcnn imports torch outside the benchmarks.

A string constant that is exactly a dotted hpcnn module name ("hpcnn.x.y")
counts as an import of that module: it is how a module starts another one
(``python -m hpcnn.x.y`` under mpiexec, ``importlib.import_module``), which
the import statements do not show.  Such a module must exist."""
import ast
import re
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
    "hpcnn.data": 7, "hpcnn.checkpoint": 7, "hpcnn.calibration": 7,
    "hpcnn.train": 8, "hpcnn.cli": 8, "hpcnn.job": 8, "hpcnn.failsafe": 8, "hpcnn.progress": 8,
    "hpcnn.checkpoint_command": 8, "hpcnn.plan_command": 8, "hpcnn.onnx_export": 8, "hpcnn.evaluate": 8, "hpcnn.predict": 8, "hpcnn.bench": 8, "hpcnn.job_errors": 8, "hpcnn.fault_injection": 8,
    # the emulated cluster launches MPI jobs across its nodes: hpcnn calibrate
    # (layer 7) measures links on it; its command is a command like the others
    "hpcnn.cluster": 7, "hpcnn.cluster.command": 8,
}
# modules of a layer that may import MPI (the rest of that layer may not)
MPI_ALLOWED = ("hpcnn.backend", "hpcnn.parallel.comm", "hpcnn.parallel.groups", "hpcnn.runtime",
               "hpcnn.checkpoint", "hpcnn.calibration", "hpcnn.train", "hpcnn.evaluate", "hpcnn.predict", "hpcnn.failsafe", "hpcnn.bench", "hpcnn.plan_command",
               "hpcnn.cluster.probe")
#: a string constant that names an hpcnn module
MODULE_NAME = re.compile(r"^hpcnn(\.\w+)+$")


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


def imports(source: str):
    """The modules ``source`` imports, and the hpcnn modules it names in
    string constants (modules it starts by name)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_NAME.match(node.value):
            yield node.value


def module_exists(mod: str) -> bool:
    rel = Path(*mod.split(".")[1:])
    return (PKG / rel).with_suffix(".py").is_file() or (PKG / rel / "__init__.py").is_file()


def problems(name: str, source: str) -> list:
    """What is wrong with the imports of module ``name`` whose text is
    ``source``."""
    out = []
    mine = layer_of(name)
    for imp in imports(source):
        if imp.startswith("hpcnn.") or imp == "hpcnn":
            if layer_of(imp) > mine:
                out.append(f"{name} (layer {mine}) imports {imp} (layer {layer_of(imp)})")
            if not module_exists(imp):
                out.append(f"{name} names the module {imp}, which does not exist")
        if imp.split(".")[0] == "torch" and not name.startswith("hpcnn.bench"):
            out.append(f"{name} imports torch (only benchmarks may)")
        if imp.split(".")[0] == "mpi4py" and not name.startswith(MPI_ALLOWED):
            out.append(f"{name} imports MPI but its layer must not")
    return out


@pytest.mark.parametrize("name,path", list(modules()), ids=lambda x: str(x) if isinstance(x, str) else "")
def test_imports_follow_the_layers(name, path):
    assert problems(name, path.read_text()) == []


def test_a_module_started_by_name_counts_as_imported():
    """The launch that crossed the layers unseen before hpcnn.calibration
    existed: strategy/calibrate.py (layer 5) started the benchmarks'
    runtime_profile (layer 8) under mpiexec by its module name."""
    old = ('import subprocess, sys\n'
           'def measure_runtime(exe, P, spec, out):\n'
           '    subprocess.run([exe, "-n", str(P), sys.executable, "-m", "mpi4py", "-m",\n'
           '                    "hpcnn.bench.runtime_profile", str(spec), str(out)])\n')
    found = problems("hpcnn.strategy.calibrate", old)
    assert any("imports hpcnn.bench.runtime_profile (layer 8)" in p for p in found), found
    assert any("hpcnn.bench.runtime_profile, which does not exist" in p for p in found), found
    # the same launch from where it lives now is allowed, and its target exists
    new = old.replace("hpcnn.bench.runtime_profile", "hpcnn.calibration.runtime_sampler")
    assert problems("hpcnn.calibration.command", new) == []
    # text that merely mentions a module (a docstring, a message) is not a launch
    assert problems("hpcnn.strategy.plan", '"""see hpcnn.bench.model for the benchmark"""\n') == []
