"""MPI latency and bandwidth inside a node and between nodes, and the
collectives hpcnn uses, measured in one MPI job.

``measure_links(launch)`` runs ``LAUNCH... python -m mpi4py -m
hpcnn.calibration.links`` (this module is its own worker).  Where the ranks
run is the launcher's business: ``mpiexec -n 2`` puts two ranks on this node
(the intra-node link only); an emulated cluster's mpiexec, ``mpiexec -hosts
A,B -ppn 2`` or ``srun`` inside an allocation put them on several nodes.
The worker finds its layout itself (host names from
``MPI.Get_processor_name``, nodes from ``COMM_TYPE_SHARED``; R ranks on each
of N nodes, in any order) and measures what that layout has:

- ping-pong (Send/Recv, one way = half a round trip) between two ranks of
  the first node (``links.intra_node``; R >= 2) and between the first ranks
  of the first two nodes (``links.inter_node``; N >= 2): latency from the
  smallest message, bandwidth from the slope of time over size of the three
  largest messages (a constant cost per message, such as a token bucket's
  burst, drops out); messages grow up to 64 MiB, or until one of 2 MiB or
  more takes 25 ms;
- the collectives of a job, at its sizes (up to the 4 MiB gradient bucket):
  in-place float32 Allreduce over the ranks of each node at once, over one
  rank per node, and over all ranks (gradient buckets of replica groups);
  exchanges (Isend/Irecv with a partner, every pair at once, as halos and
  redistributions do) inside a node and across nodes; Alltoallv over all
  ranks.

Every timing is the best of ``rounds`` rounds (the slowest rank's time of
a round, divided by its repetitions); a round repeats an operation until it
has taken ``target`` seconds.  Ranks that take no part in an operation wait
for the others asleep, not polling in a barrier, so that they leave the
cores to those that do (a node with fewer cores than ranks, such as an
emulated one).  Rank 0 prints one line, ``TAG {json}``.  The
figures of a link are named ``links.<link>.*``, those of a collective
``collectives.<op>.<scope>`` in the machine file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

#: message sizes (bytes) of the ping-pong, up to ``max_bytes``; they stop
#: growing once a message of at least 2 MiB takes ``LONG_S`` one way
PINGPONG_SIZES = [8, 64, 512, 4096, 32768, 262144] + [1 << k for k in range(20, 27)]
LONG_S = 0.025
#: buffer sizes (bytes per rank) of the collectives, up to ``collective_bytes``
COLLECTIVE_SIZES = [8, 65536] + [1 << k for k in range(20, 27)]
#: the largest ping-pong message by default (64 MiB: larger than a token
#: bucket's burst at 10 Gbit/s, 5 MB, which a shorter message rides on)
DEFAULT_MAX_BYTES = 64 << 20
#: the largest collective buffer: hpcnn's gradient bucket (executor.bucket_bytes)
COLLECTIVE_BYTES = 4 << 20
#: messages from this size on give the bandwidth (the three largest of them)
BANDWIDTH_FROM = 1 << 20

#: the module the launcher starts: this one
WORKER = "hpcnn.calibration.links"
#: how rank 0 prints its result
TAG = "HPCNN_CALIBRATE_LINKS "


# ---------------------------------------------------------------- fits and records
def fit_link(times: dict) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s) from times per size: latency is the
    time of the smallest size, bandwidth the inverse slope of time over the
    three largest sizes of 1 MiB or more (least squares; one such size: its
    time less the latency; none: the two largest)."""
    sizes = sorted(times)
    lat = float(times[sizes[0]])
    big = ([s for s in sizes if s >= BANDWIDTH_FROM] or sizes[-2:])[-3:]
    slope = None
    if len(big) >= 2:
        slope = float(np.polyfit(np.array(big, dtype=float), np.array([times[s] for s in big]), 1)[0])
    if slope is None or not slope > 0:
        bw = float(np.median([s / max(times[s] - lat, 1e-12) for s in big]))
    else:
        bw = 1.0 / slope
    return bw, lat


@dataclass(frozen=True)
class LinkMeasurement:
    """One link's ping-pong: the one-way times and the figures fitted to them."""
    link: str                # "intra_node" or "inter_node"
    times: dict              # {message bytes: one-way seconds}
    bandwidth: float
    latency: float

    @classmethod
    def fit(cls, link: str, times: dict) -> "LinkMeasurement":
        bw, lat = fit_link(times)
        return cls(link, dict(times), bw, lat)

    def figures(self, source: str) -> list:
        """The machine file's figure entries of this link."""
        return [
            {"figure": f"links.{self.link}.latency", "value": self.latency, "assumed": False,
             "source": f"{source}: one-way time of an 8-byte message, MPI ping-pong (Send/Recv)"},
            {"figure": f"links.{self.link}.bandwidth", "value": self.bandwidth, "assumed": False,
             "source": f"{source}: MPI ping-pong, inverse slope of the one-way time over messages of "
                       f"1 MiB and more"},
            {"figure": f"links.{self.link}.pingpong_one_way_s",
             "value": {str(k): v for k, v in sorted(self.times.items())}, "assumed": False, "source": source}]


@dataclass
class LinkReport:
    """What one measurement job found: its layout, its links, its collectives."""
    hosts: list                  # node names, first node first
    per_node: list               # ranks on each node
    links: dict                  # {"intra_node" / "inter_node": LinkMeasurement}, those the layout has
    collectives: dict            # {"allreduce.inter_node": {...}, ...}
    mpi: str = ""
    ranks: int = 0
    raw: dict = field(default_factory=dict)

    @property
    def nodes(self) -> int:
        return len(self.hosts)

    @property
    def ranks_per_node(self) -> int:
        return self.per_node[0]

    @classmethod
    def from_worker(cls, d: dict) -> "LinkReport":
        links = {k: LinkMeasurement.fit(k, {int(s): t for s, t in v.items()}) for k, v in d["pingpong"].items()}
        return cls(hosts=list(d["hosts"]), per_node=list(d["per_node"]), links=links,
                   collectives=dict(d["collectives"]), mpi=d.get("mpi", ""), ranks=int(d["ranks"]), raw=d)

    def layout(self) -> str:
        return (f"{self.nodes} node(s) x {self.ranks_per_node} rank(s) ({', '.join(self.hosts)})")

    def figures(self, source: str) -> list:
        out = []
        for m in self.links.values():
            out += m.figures(f"{source} ({self.layout()})")
        for name, c in sorted(self.collectives.items()):
            value = {k: v for k, v in c.items() if k != "what"}
            out.append({"figure": f"collectives.{name}", "value": value, "assumed": False,
                        "source": f"{source} ({self.layout()}): {c['what']}; seconds per call by buffer bytes "
                                  f"per rank, latency = the smallest, bandwidth = inverse slope from 1 MiB on"})
        return out


def fit_collective(seconds: dict, group: int, bus: bool) -> dict:
    """Latency and bandwidth (buffer bytes per second) of a collective; for
    an allreduce also ``bus_bandwidth``, the link rate that the cost model's
    reduce-scatter + allgather term, 2 (g-1)/g bytes / bandwidth, implies."""
    bw, lat = fit_link(seconds)
    out = {"group": group, "seconds": {str(k): v for k, v in sorted(seconds.items())}, "latency": lat,
           "bandwidth": bw}
    if bus and group > 1:
        out["bus_bandwidth"] = bw * 2.0 * (group - 1) / group
    return out


# ---------------------------------------------------------------- the launch
class LinkMeasurementError(RuntimeError):
    """The measurement job failed or found a layout it cannot measure."""


def worker_argv(max_bytes: int = DEFAULT_MAX_BYTES, target: float = 0.05, rounds: int = 3,
                collective_bytes: int = COLLECTIVE_BYTES) -> list[str]:
    """The worker's command line (appended to a launcher's)."""
    return [sys.executable, "-m", "mpi4py", "-m", WORKER, "--max-bytes", str(int(max_bytes)),
            "--collective-bytes", str(int(collective_bytes)), "--target", str(target), "--rounds", str(int(rounds))]


def measure_links(launch: list[str], env: dict | None = None, timeout: float = 600,
                  max_bytes: int = DEFAULT_MAX_BYTES, target: float = 0.05, rounds: int = 3,
                  collective_bytes: int = COLLECTIVE_BYTES) -> LinkReport:
    """Run the worker under ``launch`` (a launcher's command line that
    starts the ranks of what follows it) and return what it measured.
    Raises LinkMeasurementError when the job fails or ends after ``timeout``
    seconds (its process group is killed)."""
    from hpcnn.launcher import child_env
    argv = [*launch, *worker_argv(max_bytes, target, rounds, collective_bytes)]
    e = child_env() if env is None else dict(env)
    e.setdefault("OMP_NUM_THREADS", "1")
    p = subprocess.Popen(argv, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        out, err = p.communicate()
        raise LinkMeasurementError(f"the link measurement did not end within {timeout:.0f} s and was killed "
                                   f"(`{shlex.join(argv)}`); stderr:\n{err[-2000:]}") from None
    lines = [line for line in out.splitlines() if line.startswith(TAG)]
    if p.returncode != 0 or not lines:
        raise LinkMeasurementError(f"the link measurement failed (exit {p.returncode}, `{shlex.join(argv)}`):\n"
                                   f"{(err or out)[-3000:]}")
    d = json.loads(lines[-1][len(TAG):])
    if "error" in d:
        raise LinkMeasurementError(d["error"])
    return LinkReport.from_worker(d)


# ---------------------------------------------------------------- the worker
def sizes_upto(sizes, max_bytes: int) -> list[int]:
    return [s for s in sizes if s <= max_bytes]


def _settle(comm):
    """Wait for every rank without spinning: ranks that take no part in an
    operation sleep here instead of polling in a barrier, which on a node
    with fewer cores than ranks would take the cores from those that do."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(2e-4)


def _timed(comm, op, target: float, rounds: int) -> float:
    """Seconds per call of ``op`` (collective over ``comm``; ranks outside
    the operation pass a no-op): the best of ``rounds`` rounds of the
    slowest rank's time, a round repeating ``op`` for about ``target`` s."""
    from mpi4py import MPI
    comm.Barrier()
    t = MPI.Wtime()
    op()                                           # also the warm-up
    took = MPI.Wtime() - t
    _settle(comm)
    first = comm.allreduce(took, op=MPI.MAX)
    reps = int(min(1000, max(1, math.ceil(target / max(first, 1e-7)))))
    best = math.inf
    for _ in range(rounds):
        comm.Barrier()
        t = MPI.Wtime()
        for _ in range(reps):
            op()
        took = MPI.Wtime() - t
        _settle(comm)
        best = min(best, comm.allreduce(took, op=MPI.MAX) / reps)
    return best


def node_layout(comm):
    """(node index of every rank, node names, this rank's node communicator;
    collective): ranks that share memory (MPI's COMM_TYPE_SHARED) are a
    node, nodes are numbered by their lowest rank and named by its
    ``MPI.Get_processor_name``."""
    from mpi4py import MPI
    rank = comm.Get_rank()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    leader = node.allreduce(rank, op=MPI.MIN)     # the node's lowest rank names it
    info = comm.allgather((leader, MPI.Get_processor_name()))
    leaders = sorted({lead for lead, _ in info})
    node_of = [leaders.index(lead) for lead, _ in info]
    hosts = [info[lead][1] for lead in leaders]
    return node_of, hosts, node


def measure(comm, max_bytes: int = DEFAULT_MAX_BYTES, target: float = 0.05, rounds: int = 3,
            collective_bytes: int = COLLECTIVE_BYTES) -> dict:
    """The worker's measurements (collective over ``comm``); see the module."""
    from mpi4py import MPI
    rank, n = comm.Get_rank(), comm.Get_size()
    node_of, hosts, node = node_layout(comm)
    members = [[r for r in range(n) if node_of[r] == i] for i in range(len(hosts))]
    per_node = [len(m) for m in members]
    me = members[node_of[rank]].index(rank)       # this rank's index on its node
    res = {"hosts": hosts, "per_node": per_node, "ranks": n, "pingpong": {}, "collectives": {},
           "mpi": " ".join(MPI.Get_library_version().strip().splitlines()[0].split())}
    if len(set(per_node)) != 1:
        res["error"] = (f"the ranks are not spread evenly over the nodes ({dict(zip(hosts, per_node))}): "
                        f"start the same number of ranks on every node (e.g. mpiexec -ppn R, srun "
                        f"--ntasks-per-node=R)")
        return res
    R, N = per_node[0], len(hosts)
    if n < 2:
        res["error"] = "one rank cannot measure a link: start at least 2 ranks"
        return res
    coll_bytes = min(max_bytes, collective_bytes)
    buf = np.zeros(max_bytes, dtype=np.uint8)

    def pingpong(a, b):
        times = {}
        for size in sizes_upto(PINGPONG_SIZES, max_bytes):
            if size > 2 * BANDWIDTH_FROM and max((t for s, t in times.items() if s >= 2 * BANDWIDTH_FROM),
                                                 default=0.0) >= LONG_S:
                break                              # the same on every rank: the times are reduced
            msg = buf[:size]

            def op():
                if rank == a:
                    comm.Send([msg, MPI.BYTE], dest=b, tag=7)
                    comm.Recv([msg, MPI.BYTE], source=b, tag=7)
                elif rank == b:
                    comm.Recv([msg, MPI.BYTE], source=a, tag=7)
                    comm.Send([msg, MPI.BYTE], dest=a, tag=7)
            times[size] = _timed(comm, op, target, rounds) / 2.0
        return times

    if R >= 2:
        res["pingpong"]["intra_node"] = pingpong(members[0][0], members[0][1])
    if N >= 2:
        res["pingpong"]["inter_node"] = pingpong(members[0][0], members[1][0])

    def collective(name, what, group, run, sub=None, bus=False):
        seconds = {}
        for size in sizes_upto(COLLECTIVE_SIZES, coll_bytes):
            seconds[size] = _timed(comm, lambda: run(sub, size), target, rounds)
        res["collectives"][name] = {"what": what, **fit_collective(seconds, group, bus)}

    fbuf = np.zeros(coll_bytes // 4, dtype=np.float32)

    def allreduce(c, size):
        if c is not None:
            c.Allreduce(MPI.IN_PLACE, [fbuf[:max(1, size // 4)], MPI.FLOAT], op=MPI.SUM)

    def subcomm(color):
        c = comm.Split(MPI.UNDEFINED if color is None else color, key=rank)
        return None if c == MPI.COMM_NULL else c

    if R >= 2:
        collective("allreduce.intra_node", f"in-place float32 Allreduce over the {R} ranks of a node, every "
                                           f"node at once", R, allreduce, node, bus=True)
    if N >= 2:
        across = subcomm(0 if me == 0 else None)
        collective("allreduce.inter_node", f"in-place float32 Allreduce over one rank on each of the {N} "
                                           f"nodes", N, allreduce, across, bus=True)
        if R >= 2:
            collective("allreduce.all_ranks", f"in-place float32 Allreduce over all {n} ranks", n, allreduce,
                       comm, bus=True)
    rbuf = np.zeros(coll_bytes, dtype=np.uint8)

    def exchange(partner, size):
        if partner is None:
            return
        reqs = [comm.Irecv([rbuf[:size], MPI.BYTE], source=partner, tag=9),
                comm.Isend([buf[:size], MPI.BYTE], dest=partner, tag=9)]
        MPI.Request.Waitall(reqs)

    if R >= 2:
        mate = me ^ 1
        partner = members[node_of[rank]][mate] if mate < R else None
        collective("exchange.intra_node", f"Isend/Irecv of the bytes with a partner on the same node, the "
                                          f"{R // 2} pair(s) of every node at once", 2, exchange, partner)
    if N >= 2:
        other = node_of[rank] ^ 1
        partner = members[other][me] if other < N else None
        collective("exchange.inter_node", f"Isend/Irecv of the bytes with the rank of the same index on the "
                                          f"neighbouring node, all {R} rank(s) of a node at once (they share "
                                          f"its link)", 2, exchange, partner)

    def alltoallv(c, size):
        part = size // (n - 1)
        counts = [0 if r == rank else part for r in range(n)]
        displs = [0] * n
        for r in range(1, n):
            displs[r] = displs[r - 1] + counts[r - 1]
        c.Alltoallv([buf, counts, displs, MPI.BYTE], [rbuf, counts, displs, MPI.BYTE])

    collective("alltoallv.all_ranks", f"Alltoallv over all {n} ranks, the bytes split evenly over the other "
                                      f"ranks", n, alltoallv, comm)
    node.Free()
    return res


def main(argv=None) -> int:
    """Worker of ``measure_links`` (started by hpcnn calibrate under a
    launcher); rank 0 prints ``TAG {json}``."""
    from mpi4py import MPI
    p = argparse.ArgumentParser(prog="python -m mpi4py -m hpcnn.calibration.links",
                                description="MPI link figures (started by hpcnn calibrate)")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    p.add_argument("--collective-bytes", type=int, default=COLLECTIVE_BYTES)
    p.add_argument("--target", type=float, default=0.05)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    comm = MPI.COMM_WORLD
    res = measure(comm, a.max_bytes, a.target, a.rounds, a.collective_bytes)
    if comm.Get_rank() == 0:
        sys.stdout.write(TAG + json.dumps(res) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
