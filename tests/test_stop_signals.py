"""hpcnn.failsafe.StopSignals: a stop signal is recorded, not fatal, and the
first one is the reason reported (under Slurm the ranks get SIGTERM from
slurmstepd and then SIGUSR1 from the batch script passing the stop on)."""
import os
import signal

from hpcnn.failsafe import StopSignals


def test_first_stop_signal_is_the_reason():
    stop = StopSignals()
    try:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested == "SIGTERM"
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is not stop._handler


def test_sigusr1_alone_stops_too():
    stop = StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested == "SIGUSR1"
    finally:
        stop.restore()
