"""Per-process start-up of a distributed run: how many ranks share this
node, the BLAS threads each may use, the GPU each uses and whether MPI
accepts device buffers.  Done once per process; rank 0 reports it."""
from __future__ import annotations

import os
from dataclasses import dataclass

from mpi4py import MPI

from hpcnn.backend import get_backend, limit_blas_threads
from hpcnn.parallel.comm import detect_cuda_aware


@dataclass
class NodeInfo:
    local_rank: int
    local_size: int
    cores: int
    blas_threads: int
    backend: str
    device: str
    cuda_aware: bool

    def describe(self) -> str:
        s = (f"hpcnn: {self.local_size} rank(s) on this node with {self.cores} cores: "
             f"{self.blas_threads} BLAS thread(s) per rank; backend {self.backend}")
        if self.backend == "cupy":
            s += (f" on {self.device}; MPI {'accepts' if self.cuda_aware else 'does not accept'} "
                  f"device buffers ({'direct' if self.cuda_aware else 'staged through host memory'}"
                  f"{', forced by HPCNN_CUDA_AWARE' if os.environ.get('HPCNN_CUDA_AWARE', '').strip() in ('0', '1') else ''})")
        return s


_done: dict = {}


def setup_node(comm=None, backend=None, verbose: bool = True, blas: bool = True) -> NodeInfo:
    """Limit BLAS threads to the node's cores divided by its ranks (at most
    SLURM_CPUS_PER_TASK under Slurm), bind one
    GPU per node-local rank (CuPy) and probe CUDA-aware MPI.  Collective
    over ``comm`` on the first call of the process for a backend kind; later
    calls return the same answer without communicating (the cache key must
    be the same on every rank, so it is the backend's name only)."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    backend = backend or get_backend()
    key = backend.name
    if key in _done:
        info = _done[key]
        if backend.is_gpu and backend.device_id is None:
            backend.select_device(info.local_rank)   # local: no communication
        return info
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    local_rank, local_size = node.Get_rank(), node.Get_size()
    node.Free()
    # the CPUs this process may run on (a cpuset, taskset or container may
    # give it fewer than the machine has); its node's ranks share them
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // local_size)
    # Under Slurm a task owns the cores it was given (--cpus-per-task), not
    # a share of the whole node, which other jobs (or, with several slurmd
    # on one host, other nodes) may be using.
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) > 0:
        threads = min(threads, int(per_task))
    if blas:
        limit_blas_threads(threads)
    device = "cpu"
    if backend.is_gpu:
        backend.select_device(local_rank)
        device = backend.device_name()
    cuda_aware = detect_cuda_aware(comm, backend)
    info = NodeInfo(local_rank, local_size, cores, threads, backend.name, device, cuda_aware)
    if verbose and comm.Get_rank() == 0:
        print(info.describe(), flush=True)
    _done[key] = info
    return info


def node_info(backend_name: str = "numpy") -> NodeInfo | None:
    """What ``setup_node`` found for this backend kind (None before it ran)."""
    return _done.get(backend_name)
