"""Errors a job's ranks agree on, and the exit statuses of ``hpcnn train``.

An error that one rank sees while the others go on would leave them waiting
in the next collective.  ``agree`` runs a step on every rank and, if it
fails anywhere, makes every rank raise the same ``JobFailure``: rank 0
prints its message once and every rank exits with its status.
"""
from __future__ import annotations

#: exit statuses: a bad job, data, plan or fault specification; a loss that
#: is no longer finite
EXIT_USAGE, EXIT_DIVERGED = 2, 3


class JobFailure(Exception):
    """An error every rank agrees on: printed once by rank 0, exit status ``code``."""

    def __init__(self, msg, code=EXIT_USAGE):
        super().__init__(msg)
        self.code = code


def agree(comm, fn, expected=(Exception,)):
    """Run ``fn`` on every rank; if it raises one of ``expected`` on any
    rank, every rank raises JobFailure with the first failing rank's
    message.  Keeps ranks in step: nobody continues alone into a collective."""
    err = None
    try:
        out = fn()
    except expected as exc:  # noqa: PERF203
        out, err = None, str(exc)
    errs = comm.allgather(err)
    bad = [(r, e) for r, e in enumerate(errs) if e is not None]
    if bad:
        r, e = bad[0]
        where = "" if all(x == e for x in errs) else f" (rank {r})"
        raise JobFailure(f"{e}{where}")
    return out
