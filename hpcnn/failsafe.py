"""No hangs, nothing lost: what a job does when something goes wrong.

- ``abort_on_exception``: an uncaught exception on any rank prints that
  rank's traceback (prefixed with the rank) and aborts every rank through
  MPI_Abort, so the job ends within seconds instead of leaving the other
  ranks waiting in a collective.
- ``StopSignals``: SIGTERM (what Slurm sends at the time limit or on
  preemption) and SIGUSR1 set a flag; the job loop agrees on it at the next
  step boundary, writes a checkpoint and exits cleanly.
- ``StallWatchdog``: every rank reports each finished step to rank 0 in the
  background; when some ranks lag behind the others (or nobody progresses)
  for longer than the stall limit, rank 0 names the ranks that have not
  arrived.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback


def abort_on_exception(comm, stream=None):
    """Install a sys.excepthook (and threading.excepthook) that prints the
    traceback with the rank and calls ``comm.Abort(1)``."""
    rank = comm.Get_rank()

    def hook(exc_type, exc, tb):
        out = stream or sys.stderr
        try:
            text = "".join(traceback.format_exception(exc_type, exc, tb))
            prefix = f"[hpcnn rank {rank}] "
            out.write("".join(prefix + line + "\n" for line in text.rstrip().splitlines()))
            out.write(f"[hpcnn rank {rank}] aborting all ranks\n")
            out.flush()
        finally:
            comm.Abort(1)

    sys.excepthook = hook

    def thread_hook(args):
        hook(args.exc_type, args.exc_value, args.exc_traceback)

    threading.excepthook = thread_hook
    return hook


class StopSignals:
    """Record SIGTERM/SIGUSR1 (and SIGINT when asked) instead of dying; the
    job loop polls ``requested`` at step boundaries."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.requested = None
        self._old = {}
        for s in signals:
            try:
                self._old[s] = signal.signal(s, self._handler)
            except (ValueError, OSError):  # not the main thread, or unsupported
                pass

    def _handler(self, signum, frame):
        # the first signal is the reason; later ones (a batch script passing
        # the stop on to the ranks that Slurm signalled already) change nothing
        if self.requested is None:
            self.requested = signal.Signals(signum).name

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


class StallWatchdog:
    """Background heartbeats of finished steps, checked by rank 0.

    Every rank calls ``arrived(step)`` after each step.  Non-zero ranks send
    the step number to rank 0 (a small non-blocking message on a duplicated
    communicator); rank 0's thread receives them and, when the slowest rank
    has been behind the fastest for more than ``limit`` seconds (or no rank
    finished a step for that long), prints which ranks have not arrived.
    Needs MPI_THREAD_MULTIPLE; without it the watchdog stays off and says so.
    """

    TAG = 4242

    def __init__(self, comm, limit: float = 300.0, stream=None, poll: float = 0.5):
        from mpi4py import MPI
        self.MPI = MPI
        self.limit = float(limit)
        self.stream = stream or sys.stderr
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.enabled = self.size > 1 and MPI.Query_thread() >= MPI.THREAD_MULTIPLE
        self.reports: list[str] = []
        self._pending = []
        if not self.enabled:
            return
        self.comm = comm.Dup()
        self.poll = poll
        self._stop = threading.Event()
        self.last = [-1] * self.size
        self.when = [time.monotonic()] * self.size
        self._reported = None
        self._sent = 0
        self._received = [0] * self.size
        if self.rank == 0:
            self._thread = threading.Thread(target=self._watch, name="hpcnn-stall-watchdog", daemon=True)
            self._thread.start()

    def arrived(self, step: int):
        if not self.enabled:
            return
        if self.rank == 0:
            self.last[0], self.when[0] = step, time.monotonic()
            return
        import numpy as np
        buf = np.array([step], dtype=np.int64)
        self._pending = [(r, b) for r, b in self._pending if not r.Test()]
        self._pending.append((self.comm.Isend(buf, dest=0, tag=self.TAG), buf))
        self._sent += 1

    def _watch(self):
        import numpy as np
        MPI = self.MPI
        status = MPI.Status()
        buf = np.zeros(1, dtype=np.int64)
        while not self._stop.is_set():
            while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=self.TAG, status=status):
                src = status.Get_source()
                self.comm.Recv(buf, source=src, tag=self.TAG)
                self._received[src] += 1
                self.last[src], self.when[src] = int(buf[0]), time.monotonic()
            now = time.monotonic()
            ahead = max(self.last)
            behind = [r for r in range(self.size) if self.last[r] < ahead]
            if behind:
                since = now - min(self.when[r] for r in range(self.size) if self.last[r] == ahead)
                key = (ahead, tuple(behind))
                if since > self.limit and self._reported != key:
                    self._report(f"stall: ranks {behind} have not finished step {ahead} "
                                 f"{since:.0f} s after the first rank did (last steps: "
                                 f"{dict((r, self.last[r]) for r in behind)})")
                    self._reported = key
            else:
                since = now - max(self.when)
                key = ("all", ahead)
                if since > self.limit and self._reported != key:
                    self._report(f"stall: no rank has finished a step for {since:.0f} s "
                                 f"(all at step {ahead})")
                    self._reported = key
            self._stop.wait(self.poll)

    def _report(self, msg):
        self.reports.append(msg)
        self.stream.write(f"[hpcnn watchdog] {msg}\n")
        self.stream.flush()

    def abandon(self):
        """Stop the thread without communicating (error paths)."""
        if self.enabled and self.rank == 0:
            self._stop.set()
        self.enabled = False

    def close(self):
        """Stop the thread and receive every heartbeat still in flight
        (collective)."""
        if not self.enabled:
            return
        if self.rank == 0:
            self._stop.set()
            self._thread.join(timeout=10)
        counts = self.comm.gather(self._sent, root=0)
        if self.rank == 0:
            import numpy as np
            buf = np.zeros(1, dtype=np.int64)
            for src in range(1, self.size):
                while self._received[src] < counts[src]:
                    self.comm.Recv(buf, source=src, tag=self.TAG)
                    self._received[src] += 1
        else:
            for r, _ in self._pending:
                r.Wait()
            self._pending = []
        self.comm.Barrier()
        self.comm.Free()
        self.enabled = False


def pid_info() -> str:
    return f"host {os.uname().nodename} pid {os.getpid()}"
