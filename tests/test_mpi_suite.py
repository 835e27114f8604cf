"""Runs the tests in tests/mpi/ under mpiexec at 2, 3 and 4 ranks.

Each file in tests/mpi/ is an ordinary pytest module whose tests use
MPI.COMM_WORLD (marked ``@pytest.mark.mpi``); pytest-mpi runs them only
with ``--with-mpi``.  Every rank runs the same tests; a test decides its
verdict collectively (allreduce) so that no rank is left waiting.

The whole suite runs with the executor's defaults (each plan's transport
measured, overlap on); the equivalence tests run again, unchanged, on each
transport alone, with overlap on and off between them."""
import sys

import pytest

from mpi_launch import ROOT, run_mpi


@pytest.mark.parametrize("nprocs", [2, 3, 4])
def test_mpi_suite(nprocs):
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "mpi").glob("test_*.py"))
    assert files, "tests/mpi holds no test files"
    # tee-sys: a rank that aborts the job (mpi_helpers.run_or_abort) has its
    # traceback in the output, not only in pytest's capture, which dies with it
    r = run_mpi(nprocs, [sys.executable, "-m", "pytest", "-q", "--with-mpi", "-x", "--capture=tee-sys",
                         "-p", "no:cacheprovider", "--timeout=600"] + files, timeout=1500)
    tail = (r.stdout[-6000:] + "\n--- stderr ---\n" + r.stderr[-3000:])
    assert r.returncode == 0, f"MPI tests failed at {nprocs} ranks:\n{tail}"
    assert " passed" in r.stdout, tail


VARIANTS = [("p2p", "0"), ("neighbor", "1"), ("alltoallw", "0")]


@pytest.mark.parametrize("transport,overlap", VARIANTS, ids=[f"{t}-overlap{o}" for t, o in VARIANTS])
@pytest.mark.parametrize("nprocs", [2, 3, 4])
def test_mpi_equivalence_on_each_transport(nprocs, transport, overlap):
    files = [str((ROOT / "tests" / "mpi" / f).relative_to(ROOT))
             for f in ("test_equivalence.py", "test_halo_pieces.py")]
    env = {"HPCNN_TRANSPORT": transport, "HPCNN_OVERLAP": overlap}
    r = run_mpi(nprocs, [sys.executable, "-m", "pytest", "-q", "--with-mpi", "-x", "--capture=tee-sys",
                         "-p", "no:cacheprovider", "--timeout=600"] + files, timeout=1500, env=env)
    tail = (r.stdout[-6000:] + "\n--- stderr ---\n" + r.stderr[-3000:])
    assert r.returncode == 0, f"MPI equivalence tests failed at {nprocs} ranks on {transport} " \
                              f"(overlap {overlap}):\n{tail}"
    assert " passed" in r.stdout, tail
