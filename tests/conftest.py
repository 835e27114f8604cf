"""Test-suite configuration.

tests/mpi/ holds tests that need several MPI ranks; tests/test_mpi_suite.py
runs them under mpiexec with --with-mpi.  A plain pytest run does not collect
them itself (they would only be skipped)."""
from pathlib import Path

import pytest

_MPI_DIR = Path(__file__).parent / "mpi"


def pytest_ignore_collect(collection_path, config):
    try:
        with_mpi = config.getoption("--with-mpi")
    except ValueError:
        with_mpi = False
    p = Path(collection_path)
    if not with_mpi and (p == _MPI_DIR or _MPI_DIR in p.parents):
        return True
    return None


@pytest.fixture(params=["fast", "reference"])
def kernels(request):
    """Run a test with each kernel set (the fast channels-last GEMM kernels
    and the reference fallback), restoring the one in use after."""
    from hpcnn.ops import kernel_set
    from hpcnn.ops.kernel_set import kernel_state, restore_kernel_state
    before = kernel_state()
    kernel_set(request.param)
    yield request.param
    restore_kernel_state(before)


@pytest.fixture
def numpy_kernels():
    """A function that sets the kernel set for the rest of the test; the one
    in use before comes back after.  ("compiled" needs Numba, a dependency
    of hpcnn: where it is missing, kernel_set raises and the test fails.)"""
    from hpcnn.ops import kernel_set
    from hpcnn.ops.kernel_set import kernel_state, restore_kernel_state
    before = kernel_state()
    yield kernel_set
    restore_kernel_state(before)
