"""Starting hpcnn in child processes: the MPI launcher to use and the
environment in which a child imports this copy of hpcnn.  ``hpcnn
calibrate`` and the benchmarks that start their own MPI runs use it; it
imports nothing from hpcnn, so every layer may."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

#: the directory that holds the hpcnn package (the repository root)
SOURCE_ROOT = str(Path(__file__).resolve().parents[1])


def find_mpiexec() -> str | None:
    """The mpiexec beside this Python (a venv with the MPICH wheel), else
    the one on PATH, else None."""
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    return shutil.which("mpiexec")


def require_mpiexec(who: str, hint: str = "") -> str:
    """``find_mpiexec()``, or a SystemExit that names ``who`` and how to get
    an MPI (``hint`` adds an alternative, e.g. launching by hand)."""
    exe = find_mpiexec()
    if exe is None:
        raise SystemExit(f"{who}: mpiexec not found; install MPI (pip install mpich){hint}")
    return exe


def child_env(**extra: str) -> dict:
    """This process's environment with the source root first on PYTHONPATH
    (so that children import this hpcnn, installed or not), plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SOURCE_ROOT, env.get("PYTHONPATH")]))
    env.update(extra)
    return env
