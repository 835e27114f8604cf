"""The pieces of hpcnn train's failure handling that run in one process:
HPCNN_FAULT's parsing and the faults it injects (tests/test_train_job.py
runs them in real jobs), and the collective agreement on an error
(MPI.COMM_SELF, a world of one)."""
import pytest
from mpi4py import MPI

from hpcnn.fault_injection import Faults
from hpcnn.job_errors import EXIT_USAGE, JobFailure, agree


def test_faults_are_parsed_per_rank():
    spec = "raise:3:1, sleep:2:0:0.01,kill:5:2,kill-in-checkpoint:0"
    f0, f1, f2 = (Faults(r, spec) for r in range(3))
    assert f1.items == f0.items and len(f0.items) == 4
    assert f0.checkpoint_hook() is not None and f1.checkpoint_hook() is None
    f0.after_step(3)                       # rank 1's fault
    f0.after_step(2)                       # a short stall on rank 0
    with pytest.raises(RuntimeError, match="injected fault on rank 1 after step 3"):
        f1.after_step(3)
    f1.after_step(4)
    assert Faults(0, "").items == [] and Faults(0, "").checkpoint_hook() is None


def test_faults_read_the_environment(monkeypatch):
    monkeypatch.setenv("HPCNN_FAULT", "raise:0:0")
    with pytest.raises(RuntimeError, match="HPCNN_FAULT"):
        Faults(0).after_step(0)


@pytest.mark.parametrize("bad", ["raise:3", "explode:1:1", "sleep:1:0", "kill:x:0"])
def test_a_bad_fault_is_named(bad):
    with pytest.raises(JobFailure, match=f"HPCNN_FAULT: cannot parse '{bad}'") as e:
        Faults(0, f"raise:1:0,{bad}")
    assert e.value.code == EXIT_USAGE


def test_agree_turns_an_expected_error_into_one_job_failure():
    assert agree(MPI.COMM_SELF, lambda: 7, ValueError) == 7

    def bad():
        raise ValueError("the job file names no model")
    with pytest.raises(JobFailure, match="^the job file names no model$") as e:
        agree(MPI.COMM_SELF, bad, ValueError)
    assert e.value.code == EXIT_USAGE
    with pytest.raises(KeyError):               # not expected: not agreed, raised as it is
        agree(MPI.COMM_SELF, lambda: {}["x"], ValueError)
