"""Helpers of the MPI tests: agree on a verdict collectively, and end every
rank promptly when one raises (no rank may be left waiting in a collective)."""
from __future__ import annotations

import sys
import traceback

from mpi4py import MPI

WORLD = MPI.COMM_WORLD


def run_or_abort(fn, *args, **kw):
    """Call fn; on an exception print it with the rank and abort every rank
    (the others may be blocked in a collective the failing rank never reaches)."""
    try:
        return fn(*args, **kw)
    except Exception:
        sys.stderr.write(f"\n[rank {WORLD.Get_rank()}] " + traceback.format_exc())
        sys.stderr.flush()
        WORLD.Abort(1)


def agree(problems: list, what: str = "") -> None:
    """Gather every rank's problems and assert that there are none, on
    every rank at once."""
    everyone = WORLD.allgather(list(problems))
    bad = [(r, p) for r, ps in enumerate(everyone) for p in ps]
    msg = "\n".join(f"rank {r}: {p}" for r, p in bad[:30])
    assert not bad, f"{what}: {len(bad)} problem(s)\n{msg}"
