"""Launch a command under mpiexec from a test, with a hard timeout, and
return its output.  Used by tests that check MPI programs (the tests in
tests/mpi/ and end-to-end runs of the CLI)."""
from __future__ import annotations

import subprocess
from pathlib import Path

from hpcnn.launcher import child_env, find_mpiexec

ROOT = Path(__file__).resolve().parents[1]


def mpiexec() -> str:
    """hpcnn's own choice of launcher (the MPICH wheel's beside this Python,
    else the one on PATH)."""
    found = find_mpiexec()
    if not found:
        raise RuntimeError("mpiexec not found: pip install mpich (or load your site's MPI)")
    return found


def mpi_env(extra: dict | None = None) -> dict:
    env = child_env(PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.pop("PYTEST_CURRENT_TEST", None)
    if extra:
        env.update(extra)
    return env


def run_mpi(nprocs: int, args: list[str], timeout: float = 600, env: dict | None = None,
            cwd=None) -> subprocess.CompletedProcess:
    """Run ``mpiexec -n nprocs args...``; kill everything after ``timeout``."""
    cmd = [mpiexec(), "-n", str(nprocs)] + [str(a) for a in args]
    return subprocess.run(cmd, cwd=cwd or ROOT, env=mpi_env(env), capture_output=True,
                          text=True, timeout=timeout)
