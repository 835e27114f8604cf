"""Where arrays live: the array module (NumPy or CuPy), device choice per
node-local rank, host/device copies, BLAS thread limits and the probe of
whether MPI accepts device buffers.

Nothing else in hpcnn decides where arrays live.  Every other module asks
``get_backend()`` for the array module ``xp`` and uses ``to_host`` /
``to_device`` for copies, so the same code runs on NumPy and on CuPy.

Environment:
    HPCNN_BACKEND=numpy|cupy|auto   force a backend (default auto: CuPy when
                                    it imports and sees a GPU, else NumPy)
    HPCNN_CUDA_AWARE=0|1            override the CUDA-aware MPI probe
"""
from __future__ import annotations

import os
import threading

import numpy as np

__all__ = [
    "Backend", "BackendError", "get_backend", "set_backend", "array_module",
    "to_host", "limit_blas_threads", "probe_cuda_aware", "local_rank_from_env",
]


class BackendError(RuntimeError):
    """The requested backend cannot be used here."""


def _cupy_or_reason():
    """Return (cupy module, None) when CuPy imports and sees a GPU, else
    (None, reason)."""
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA install
        return None, f"CuPy does not import ({type(exc).__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return None, f"CuPy imports but CUDA reports no device ({exc})"
    if n < 1:
        return None, "CuPy imports but no GPU is visible"
    return cupy, None


class Backend:
    """One array module and the operations that move arrays between host and
    device.  ``xp`` is ``numpy`` or ``cupy``."""

    def __init__(self, name: str):
        if name == "numpy":
            self.xp = np
            self.name = "numpy"
            self.is_gpu = False
        elif name == "cupy":
            cp, why = _cupy_or_reason()
            if cp is None:
                raise BackendError(
                    f"HPCNN_BACKEND=cupy was requested but {why}. Install "
                    "cupy-cuda12x (pip install 'hpcnn[gpu]') on a machine with "
                    "an NVIDIA GPU, or set HPCNN_BACKEND=numpy.")
            self.xp = cp
            self.name = "cupy"
            self.is_gpu = True
        else:
            raise BackendError(
                f"unknown backend {name!r}: HPCNN_BACKEND must be numpy, cupy or auto")
        self.device_id = None
        self.cuda_aware = False

    # --- device choice -------------------------------------------------
    def select_device(self, local_rank: int) -> int | None:
        """Bind this process to GPU ``local_rank % ngpus`` (one CUDA device per
        node-local rank).  No-op on NumPy.  Returns the device id."""
        if not self.is_gpu:
            return None
        ndev = self.xp.cuda.runtime.getDeviceCount()
        dev = int(local_rank) % ndev
        self.xp.cuda.Device(dev).use()
        self.device_id = dev
        return dev

    def device_name(self) -> str:
        if not self.is_gpu:
            return "cpu"
        props = self.xp.cuda.runtime.getDeviceProperties(self.device_id or 0)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    # --- copies ----------------------------------------------------------
    def to_device(self, a, dtype=None):
        """Copy a host (NumPy) array to where this backend computes."""
        if self.is_gpu:
            return self.xp.asarray(a, dtype=dtype)
        return np.asarray(a, dtype=dtype)

    def to_host(self, a):
        return to_host(a)

    def synchronize(self):
        """Wait for queued device work (call before handing buffers to MPI)."""
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()

    def is_device_array(self, a) -> bool:
        return self.is_gpu and isinstance(a, self.xp.ndarray)

    def __repr__(self):
        return f"Backend({self.name!r})"


_lock = threading.Lock()
_current: Backend | None = None


def get_backend() -> Backend:
    """The process-wide backend, chosen once from HPCNN_BACKEND."""
    global _current
    with _lock:
        if _current is None:
            want = os.environ.get("HPCNN_BACKEND", "auto").strip().lower() or "auto"
            if want == "auto":
                cp, _ = _cupy_or_reason()
                _current = Backend("cupy" if cp is not None else "numpy")
            else:
                _current = Backend(want)
        return _current


def set_backend(name: str) -> Backend:
    """Choose the backend explicitly (tests, benchmarks)."""
    global _current
    with _lock:
        _current = Backend(name)
        return _current


def array_module(a):
    """numpy or cupy, whichever owns array ``a``."""
    if type(a).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np


def to_host(a):
    """A NumPy array with the values of ``a`` (a no-op for NumPy arrays)."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def local_rank_from_env(default: int = 0) -> int:
    """The node-local rank as the launcher reports it (Slurm, MPICH/Hydra,
    Open MPI), used to pick one GPU per node-local rank."""
    for var in ("SLURM_LOCALID", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
                "PMI_LOCAL_RANK", "LOCAL_RANK"):
        v = os.environ.get(var)
        if v is not None and v.strip().isdigit():
            return int(v)
    return default


_blas_limiter = None


def limit_blas_threads(n: int):
    """Limit the BLAS (OpenBLAS/MKL) and OpenMP thread pools of this process
    to ``n`` threads, so that ranks sharing a node do not oversubscribe its
    cores.  Returns the number applied."""
    global _blas_limiter
    n = max(1, int(n))
    from threadpoolctl import threadpool_limits
    _blas_limiter = threadpool_limits(limits=n)
    return n


# Launcher variables that would make a child process join the parent's MPI
# job instead of starting as an MPI singleton.
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "HYDI_", "MPI_LOCAL", "MPIEXEC_", "OMPI_",
                      "SLURM_", "PALS_", "I_MPI_HYDRA", "MPICH_INTERFACE")

_CHILD_PROBE = r"""
import sys
import cupy as cp
from mpi4py import MPI
cp.cuda.Device(int(sys.argv[1])).use()
c = MPI.COMM_SELF
a = cp.arange(1, 9, dtype=cp.float64)
b = cp.zeros(8, dtype=cp.float64)
o = cp.zeros(8, dtype=cp.float64)
cp.cuda.get_current_stream().synchronize()
c.Sendrecv(a, dest=0, recvbuf=b, source=0)
c.Allreduce(a, o)
print("DEVICE-BUFFERS-OK" if bool(cp.all(b == a)) and bool(cp.all(o == a)) else "DEVICE-BUFFERS-WRONG")
"""


def _device_buffers_survive_in_child(device: int, timeout: float = 120.0) -> bool:
    """Hand CuPy buffers to MPI in a child process (an MPI singleton).  An
    MPI that is not CUDA-aware usually crashes (reads device memory as host
    memory) rather than failing cleanly, so this must not happen in the
    ranks themselves.  True when the child got the right values."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    try:
        r = subprocess.run([sys.executable, "-c", _CHILD_PROBE, str(int(device))], env=env,
                           capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "DEVICE-BUFFERS-OK" in r.stdout


def probe_cuda_aware(comm, backend: Backend | None = None) -> bool:
    """Whether MPI on ``comm`` accepts device (CuPy) buffers.

    HPCNN_CUDA_AWARE=0|1 decides without probing.  Otherwise each rank first
    hands small CuPy buffers to MPI in a child process (a non-CUDA-aware MPI
    crashes there, not here); only when every rank's child succeeded does
    every rank check a Send/Recv ring and an Allreduce on a small CuPy array
    itself.  The answer is True only when every rank got the right values
    (agreed by host Allreduces), so all ranks take the same path.  On NumPy
    the answer is False (nothing to stage)."""
    backend = backend or get_backend()
    forced = os.environ.get("HPCNN_CUDA_AWARE")
    if forced is not None and forced.strip() in ("0", "1"):
        backend.cuda_aware = backend.is_gpu and forced.strip() == "1"
        return backend.cuda_aware
    if not backend.is_gpu:
        backend.cuda_aware = False
        return False
    from mpi4py import MPI  # only here: backend itself does not need MPI
    child_ok = int(_device_buffers_survive_in_child(backend.device_id or 0))
    if not comm.allreduce(child_ok, op=MPI.MIN):
        backend.cuda_aware = False
        return False
    cp = backend.xp
    ok = 1
    try:
        size, rank = comm.Get_size(), comm.Get_rank()
        send = cp.full(8, rank + 1, dtype=cp.float64)
        recv = cp.zeros(8, dtype=cp.float64)
        backend.synchronize()
        if size > 1:
            comm.Sendrecv(send, dest=(rank + 1) % size, recvbuf=recv,
                          source=(rank - 1) % size)
            ok &= int(bool(cp.all(recv == ((rank - 1) % size) + 1)))
        out = cp.zeros(8, dtype=cp.float64)
        comm.Allreduce(send, out)
        ok &= int(bool(cp.all(out == size * (size + 1) / 2)))
    except Exception:
        ok = 0
    agreed = comm.allreduce(ok, op=MPI.MIN)
    backend.cuda_aware = bool(agreed)
    return backend.cuda_aware
