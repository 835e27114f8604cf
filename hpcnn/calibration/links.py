"""MPI latency and bandwidth of one link, by ping-pong between two ranks.

``measure_link`` starts ``mpiexec -n 2 [ARGS] python -m mpi4py -m
hpcnn.calibration.links OUT.json`` (this module is its own worker) and fits
the one-way times: latency from the smallest message, bandwidth from the
largest.  Where the two ranks run is up to the launcher's arguments: by
default both on this node (the intra-node link); on a cluster, arguments
that put one rank on each of two nodes measure the inter-node link.  The
figures of a link are named ``links.<link>.*`` in the machine file.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcnn.launcher import child_env, find_mpiexec

#: message sizes (bytes) of the ping-pong
PINGPONG_SIZES = [8, 64, 512, 4096, 32768, 262144, 1 << 21, 1 << 23]

#: the module mpiexec starts: this one
WORKER = "hpcnn.calibration.links"


def pingpong(comm, sizes=PINGPONG_SIZES) -> dict:
    """{size: one-way seconds} between ranks 0 and 1 of ``comm`` (collective;
    other ranks only take part in the barriers): the best of three rounds of
    Send/Recv round trips, halved."""
    from mpi4py import MPI
    rank = comm.Get_rank()
    res = {}
    for size in sizes:
        buf = np.zeros(size, dtype=np.uint8)
        reps = max(5, min(1000, (1 << 24) // max(size, 1)))
        comm.Barrier()
        best = np.inf
        for _ in range(3):
            t = MPI.Wtime()
            for _ in range(reps):
                if rank == 0:
                    comm.Send([buf, MPI.BYTE], dest=1, tag=7)
                    comm.Recv([buf, MPI.BYTE], source=1, tag=7)
                elif rank == 1:
                    comm.Recv([buf, MPI.BYTE], source=0, tag=7)
                    comm.Send([buf, MPI.BYTE], dest=0, tag=7)
            best = min(best, (MPI.Wtime() - t) / reps / 2.0)    # one way
        res[size] = best
    return res


def measure_mpi(mpiexec_args=(), timeout=300) -> dict:
    """{size: one-way seconds} between two ranks placed by ``mpiexec -n 2
    *mpiexec_args`` (default: two ranks of this node)."""
    exe = find_mpiexec()
    if exe is None:
        raise RuntimeError("mpiexec not found: install an MPI (pip install mpich) or pass --no-mpi")
    env = child_env()
    env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "pingpong.json"
        r = subprocess.run([exe, "-n", "2", *mpiexec_args, sys.executable, "-m", "mpi4py", "-m", WORKER,
                            str(out)], env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0 or not out.exists():
            raise RuntimeError(f"the MPI ping-pong failed (exit {r.returncode}): {r.stderr[-2000:]}")
        return {int(k): v for k, v in json.loads(out.read_text()).items()}


def fit_link(times: dict) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s) from one-way times: latency from the
    smallest message, bandwidth from the largest ones."""
    sizes = sorted(times)
    lat = times[sizes[0]]
    big = [s for s in sizes if s >= (1 << 20)] or sizes[-2:]
    bw = float(np.median([s / max(times[s] - lat, 1e-12) for s in big]))
    return bw, float(lat)


@dataclass(frozen=True)
class LinkMeasurement:
    """One link's ping-pong: the one-way times and the figures fitted to them."""
    link: str                # "intra_node" or "inter_node"
    times: dict              # {message bytes: one-way seconds}
    bandwidth: float
    latency: float

    def figures(self, source: str) -> list:
        """The machine file's figure entries of this link."""
        return [
            {"figure": f"links.{self.link}.latency", "value": self.latency, "assumed": False,
             "source": f"{source}: one-way time of an 8-byte message, MPI ping-pong (Send/Recv)"},
            {"figure": f"links.{self.link}.bandwidth", "value": self.bandwidth, "assumed": False,
             "source": f"{source}: MPI ping-pong of 2-8 MiB messages, one way"},
            {"figure": f"links.{self.link}.pingpong_one_way_s",
             "value": {str(k): v for k, v in self.times.items()}, "assumed": False, "source": source}]


def measure_link(link: str, mpiexec_args=(), timeout=300) -> LinkMeasurement:
    """Ping-pong between two ranks placed by ``mpiexec_args`` and the fit."""
    times = measure_mpi(mpiexec_args, timeout)
    bw, lat = fit_link(times)
    return LinkMeasurement(link, times, bw, lat)


def main(argv=None) -> int:
    """Worker of ``measure_mpi``: ``mpiexec -n 2 python -m mpi4py -m
    hpcnn.calibration.links OUT.json``; rank 0 writes the one-way times."""
    from mpi4py import MPI
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: mpiexec -n 2 python -m mpi4py -m hpcnn.calibration.links OUT.json "
              "(started by hpcnn calibrate)", file=sys.stderr)
        return 2
    comm = MPI.COMM_WORLD
    res = pingpong(comm)
    if comm.Get_rank() == 0:
        Path(argv[0]).write_text(json.dumps({str(k): v for k, v in res.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
