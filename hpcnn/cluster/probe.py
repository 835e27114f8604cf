"""The MPI program of ``EmulatedCluster.check`` (``hpcnn cluster check``):
run as ``python -m hpcnn.cluster.probe NBYTES`` on every rank of a job
across the nodes.

Every rank runs hpcnn's node set-up (``setup_node``: ranks per node, BLAS
threads, the node-local rank that picks a GPU) and reports it with its host
name and the node-local rank its launcher announced; then rank 0 and the
first rank on another node send each other NBYTES.  Rank 0 prints one line,
``HPCNN_CLUSTER_PROBE {json}``."""
from __future__ import annotations

import json
import os
import socket
import sys
import time

TAG = "HPCNN_CLUSTER_PROBE "


def main(argv=None) -> int:
    import numpy as np
    from mpi4py import MPI

    from hpcnn.backend import local_rank_from_env
    from hpcnn.runtime.node_setup import setup_node

    argv = sys.argv[1:] if argv is None else argv
    nbytes = max(8, int(argv[0]) if argv else 16 << 20) // 8 * 8
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    info = setup_node(comm, verbose=False)
    me = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "local_rank": info.local_rank,
          "local_size": info.local_size, "blas_threads": info.blas_threads, "cores": info.cores,
          "launcher_local_rank": local_rank_from_env(-1)}
    ranks = comm.allgather(me)
    peer = next((r["rank"] for r in ranks if r["host"] != ranks[0]["host"]), None)
    seconds = None
    if peer is not None and rank in (0, peer):
        buf = np.ones(nbytes // 8, dtype=np.float64)
        other = peer if rank == 0 else 0
        t0 = time.perf_counter()
        if rank == 0:
            comm.Send(buf, dest=other, tag=7)
            comm.Recv(buf, source=other, tag=8)
        else:
            comm.Recv(buf, source=other, tag=7)
            comm.Send(buf, dest=other, tag=8)
        seconds = time.perf_counter() - t0
    comm.Barrier()
    if rank == 0:
        sys.stdout.write(TAG + json.dumps({"ranks": ranks, "peer": peer, "bytes": nbytes,
                                           "seconds": seconds}) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
