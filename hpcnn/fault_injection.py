"""Fault injection for the tests of a job's failure paths (never set in
normal runs).  ``HPCNN_FAULT`` is a comma-separated list of

    raise:STEP:RANK          raise an exception after step STEP on RANK
    kill:STEP:RANK           SIGKILL the rank after step STEP
    sleep:STEP:RANK:SECONDS  stall the rank after step STEP
    sleep-at:PHASE:RANK:SECONDS
                             stall the rank where the run's phase PHASE begins:
                             start-up (after the plan), training, last-checkpoint,
                             final-evaluation, report, evaluation-after-epoch-E,
                             checkpoint-after-epoch-E
    kill-in-checkpoint:RANK  SIGKILL rank RANK (0 writes) in the middle of a checkpoint write

``hpcnn train`` calls ``Faults.after_step`` after every step, ``Faults.at``
where each phase begins, and passes ``checkpoint_hook()`` to the checkpoint
writer.
"""
from __future__ import annotations

import os
import signal
import time

from hpcnn.job_errors import JobFailure


class Faults:
    """The faults of ``spec`` (default: ``HPCNN_FAULT``) that concern ``rank``."""

    def __init__(self, rank: int, spec: str | None = None):
        spec = os.environ.get("HPCNN_FAULT", "") if spec is None else spec
        self.rank, self.items = rank, []
        for part in filter(None, (x.strip() for x in spec.split(","))):
            f = part.split(":")
            try:
                if f[0] in ("raise", "kill"):
                    self.items.append((f[0], int(f[1]), int(f[2]), 0.0))
                elif f[0] == "sleep":
                    self.items.append((f[0], int(f[1]), int(f[2]), float(f[3])))
                elif f[0] == "sleep-at" and f[1]:
                    self.items.append((f[0], f[1], int(f[2]), float(f[3])))
                elif f[0] == "kill-in-checkpoint":
                    self.items.append((f[0], -1, int(f[1]), 0.0))
                else:
                    raise ValueError
            except (ValueError, IndexError):
                raise JobFailure(f"HPCNN_FAULT: cannot parse {part!r}") from None

    def after_step(self, step: int):
        for kind, s, r, secs in self.items:
            if r != self.rank or s != step:
                continue
            if kind == "raise":
                raise RuntimeError(f"injected fault on rank {r} after step {s} (HPCNN_FAULT)")
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "sleep":
                time.sleep(secs)

    def at(self, phase: str):
        """Where phase ``phase`` of the run begins (its name, '-' for spaces)."""
        for kind, where, r, secs in self.items:
            if kind == "sleep-at" and r == self.rank and where == phase:
                time.sleep(secs)

    def checkpoint_hook(self):
        """None, or a hook for the checkpoint writer that kills this rank
        half-way through the tensors."""
        if not any(k == "kill-in-checkpoint" and r == self.rank for k, _, r, _ in self.items):
            return None

        def hook(i, n, path):
            if i >= n // 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return hook
