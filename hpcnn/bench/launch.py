"""Finding the MPI launcher for benchmarks that start their own MPI runs
(``hpcnn bench comm``, ``model`` and ``train`` spawn ``mpiexec -n P``)."""
from __future__ import annotations

import os
import shutil
import sys


def find_mpiexec(command: str, self_launch: bool = True) -> str:
    """The mpiexec beside this Python (a venv with the MPICH wheel) or on
    PATH.  None found: a SystemExit naming ``hpcnn bench COMMAND`` and how
    to get one (and, when ``self_launch``, how to launch the benchmark
    under one's own mpiexec instead)."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.exists(here):
        return here
    found = shutil.which("mpiexec")
    if found:
        return found
    msg = f"hpcnn bench {command}: mpiexec not found; install MPI (pip install mpich)"
    if self_launch:
        msg += f" or launch it yourself: mpiexec -n 4 hpcnn bench {command}"
    raise SystemExit(msg)
