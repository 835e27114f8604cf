"""Faults that MPI itself never reports: the stall watchdog (hpcnn.failsafe)
ends the job with a message that names what was lost.

Without root, on this machine (mpiexec), under an MPI that grants only
MPI_THREAD_SINGLE (mpi4py's MPI4PY_RC_THREAD_LEVEL):
- a rank that makes no progress is reported, then ends the job after
  log.stall_end_seconds;
- a rank that falls silent (stopped with SIGSTOP, as a hung node would be)
  ends the job after log.heartbeat_timeout, named;
- the watchdog covers the whole run after the plan, not only the training
  loop: a rank that stalls where the start-up, the last checkpoint or the
  final evaluation begins ends the job after log.stall_end_seconds.

As root, on an emulated cluster of two nodes (4 ranks, 2 per node, the
default job with a checkpoint every 5 steps):
- node 1's link goes down mid-step (``ip link set ... down``): every rank,
  on both sides, ends within 60 s; rank 0 names the ranks and the node it
  lost, the job's exit status is not 0, and the last checkpoint loads and
  resumes;
- node 1's ranks are all killed: every other rank ends within 60 s, the
  output names the node, the last checkpoint loads.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hpcnn.cluster import EmulatedCluster, unavailable
from mpi_launch import ROOT, mpi_env, mpiexec, run_mpi

PY = sys.executable
SINGLE = {"MPI4PY_RC_THREAD_LEVEL": "single"}
# what the issue asks: every surviving rank ends within this after the fault
END_WITHIN = 60


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("digits")
    r = subprocess.run([PY, "-m", "hpcnn", "data", "digits", "-o", str(d / "digits.h5")], cwd=ROOT, env=mpi_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return d / "digits.h5"


def train_args(digits, ckdir=None, *sets):
    args = [PY, "-m", "hpcnn", "train", str(ROOT / "jobs" / "digits.toml"), "--set", "log.progress='lines'",
            "--set", f"data.path='{digits}'", "--set", "log.metrics=''",
            "--set", f"checkpoint.dir='{ckdir}'" if ckdir else "checkpoint.dir=''"]
    for s in sets:
        args += ["--set", s]
    return args


class Job:
    """A running MPI job whose output is collected in the background."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []
        self.threads = [threading.Thread(target=self._pump, args=(s, buf), daemon=True)
                        for s, buf in ((proc.stdout, self.out), (proc.stderr, self.err))]
        for t in self.threads:
            t.start()

    @staticmethod
    def _pump(stream, buf):
        for line in stream:
            buf.append(line)

    def text(self) -> str:
        return "".join(self.out) + "\n--- stderr ---\n" + "".join(self.err)

    def wait_for_line(self, pattern: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(re.search(pattern, line) for line in list(self.err)):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        pytest.fail(f"no line matching {pattern!r} within {timeout} s:\n{self.text()[-4000:]}")

    def finish(self, timeout: float) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        for t in self.threads:
            t.join(timeout=10)
        return self.proc.returncode


def descendants(pid: int) -> list[int]:
    """Processes below ``pid`` (only this test's own)."""
    children: dict = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def rank_pid(job_pid: int, rank: int) -> int | None:
    for pid in descendants(job_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PMI_RANK={rank}".encode() in env:
            return pid
    return None


def assert_checkpoint_loads(ckdir: Path, digits, tmp_path) -> int:
    """The newest checkpoint is intact: `hpcnn ckpt inspect` reads it and a
    new run on this machine resumes from it.  Returns its step."""
    cks = sorted(ckdir.glob("ckpt-*.h5"))
    assert cks, f"no checkpoint in {ckdir}"
    step = int(re.fullmatch(r"ckpt-(\d+)\.h5", cks[-1].name).group(1))
    r = subprocess.run([PY, "-m", "hpcnn", "ckpt", "inspect", str(cks[-1])], env=mpi_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "params/" in r.stdout, r.stdout + r.stderr
    r = run_mpi(2, train_args(digits, ckdir, f"train.max_steps={step + 2}", "data.test=''"), cwd=tmp_path,
                timeout=120)
    assert r.returncode == 0 and f"at step {step}" in r.stderr and "resumed from" in r.stderr, r.stderr[-3000:]
    return step


# --------------------------------------------------------------- one machine, no root
def test_mpi_grants_only_thread_single_here():
    """The precondition of the two tests below: the MPI they run under
    really grants MPI_THREAD_SINGLE."""
    r = subprocess.run([PY, "-c", "from mpi4py import MPI; print(MPI.Query_thread() == MPI.THREAD_SINGLE)"],
                       env=mpi_env(SINGLE), capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "True", r.stdout + r.stderr


def test_no_progress_ends_the_job_at_thread_single(digits, tmp_path):
    t0 = time.monotonic()
    r = run_mpi(3, train_args(digits, None, "log.stall_seconds=1", "log.stall_end_seconds=4"), cwd=tmp_path,
                env={**SINGLE, "HPCNN_FAULT": "sleep:2:2:120"}, timeout=120)
    took = time.monotonic() - t0
    err = r.stderr
    assert r.returncode != 0, err[-3000:]
    assert "[hpcnn watchdog] stall: ranks [2] have not finished step 2" in err, err[-3000:]
    assert re.search(r"longer than log\.stall_end_seconds = 4; ending the job \(exit status 4\)", err), err[-3000:]
    # rank 0 tells the others why (the launcher, ending the job when rank 0
    # exits, may cut one of them short before its message is out)
    told = [rank for rank in (1, 2) if re.search(rf"rank {rank} on node \S+: rank 0 ended the job: stall", err)]
    assert told, err[-3000:]
    assert took < 60, f"took {took:.0f} s for a 4 s limit (the faulty rank sleeps 120 s)"


def test_a_silent_rank_ends_the_job_at_thread_single(digits, tmp_path):
    job = Job(subprocess.Popen([mpiexec(), "-n", "3", *train_args(digits, None, "train.epochs=50", "train.log_every=1",
                                                                    "log.heartbeat_timeout=5")],
                               cwd=tmp_path, env=mpi_env(SINGLE), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True))
    stopped = None
    try:
        job.wait_for_line(r"^step 3/")
        stopped = rank_pid(job.proc.pid, 2)
        assert stopped is not None, job.text()[-3000:]
        os.kill(stopped, signal.SIGSTOP)        # alive, connected, silent: a hung node
        t0 = time.monotonic()
        rc = job.finish(timeout=END_WITHIN)
        took = time.monotonic() - t0
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if job.proc.poll() is None:
            os.killpg(job.proc.pid, signal.SIGKILL)
    err = "".join(job.err)
    assert rc != 0, job.text()[-3000:]
    assert re.search(r"rank 2 on node \S+ unreachable: no heartbeat for 5 s \(log\.heartbeat_timeout = 5\); "
                     r"ending the job \(exit status 4\)", err), job.text()[-3000:]
    assert took < END_WITHIN, f"{took:.0f} s"


@pytest.mark.parametrize("phase,sets,message", [
    ("start-up", [], r"stall: no rank has moved on for \d+ s \(all in the start-up after the plan\)"),
    ("last-checkpoint", ["checkpoint.every_steps=0"],
     r"stall: ranks \[2\] have not reached the last checkpoint \d+ s after the first rank did \(they are in: "
     r"rank 2: training, step 2 done\)"),
    ("final-evaluation", [],
     r"stall: ranks \[2\] have not reached the final evaluation \d+ s after the first rank did"),
])
def test_a_stall_outside_the_training_loop_ends_the_job(digits, tmp_path, phase, sets, message):
    """Rank 2 stalls (120 s) where a phase outside the training steps begins;
    the others wait for it in a collective.  The watchdog, there from the
    plan to the end of the run, reports it and ends the job after
    log.stall_end_seconds instead of letting the job wait."""
    ck = tmp_path / "ck" if phase == "last-checkpoint" else None
    t0 = time.monotonic()
    r = run_mpi(3, train_args(digits, ck, "train.max_steps=3", "log.stall_seconds=1", "log.stall_end_seconds=4",
                              *sets), cwd=tmp_path, env={**SINGLE, "HPCNN_FAULT": f"sleep-at:{phase}:2:120"},
                timeout=150)
    took = time.monotonic() - t0
    err = r.stderr
    assert r.returncode != 0, err[-3000:]
    assert re.search(r"\[hpcnn watchdog\] " + message, err), err[-3000:]
    assert re.search(r"longer than log\.stall_end_seconds = 4; ending the job \(exit status 4\)", err), err[-3000:]
    assert took < 60, f"took {took:.0f} s for a 4 s limit (the faulty rank sleeps 120 s)"


# --------------------------------------------------------------- two nodes, root
@pytest.fixture(scope="module")
def cluster():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with EmulatedCluster(2, rate="1gbit", prefix=f"hx{os.getpid()}") as c:
        yield c


def start_training(cluster, digits, tmp_path) -> tuple[Job, Path]:
    ck = tmp_path / "ck"
    args = train_args(digits, ck, "train.epochs=50", "train.log_every=1", "checkpoint.every_steps=5",
                      "checkpoint.keep=2")
    job = Job(cluster.popen(4, args, ppn=2, cwd=tmp_path, env=mpi_env()))
    job.wait_for_line(r"^step 12/")
    assert list(ck.glob("ckpt-*.h5")), job.text()[-3000:]
    return job, ck


def wait_until_no_ranks(cluster, t0, limit) -> float:
    """Seconds from ``t0`` until no MPI rank runs on any node."""
    while time.monotonic() - t0 < limit + 30:
        if not any(cluster.ranks(n.index) for n in cluster.nodes):
            return time.monotonic() - t0
        time.sleep(0.25)
    return float("inf")


def test_link_down_mid_step_ends_every_rank(cluster, digits, tmp_path):
    n0, n1 = cluster.hostnames
    job, ck = start_training(cluster, digits, tmp_path)
    try:
        t0 = time.monotonic()
        cluster.set_link(1, False)
        took = wait_until_no_ranks(cluster, t0, END_WITHIN)
    finally:
        cluster.set_link(1, True)     # lets Hydra hear from its proxy on node 1 again
    rc = job.finish(timeout=60)
    err = "".join(job.err)
    print(f"link down: every rank ended {took:.1f} s after the fault; mpiexec exit status {rc}")
    assert took <= END_WITHIN, f"ranks still running {END_WITHIN} s after the link went down:\n{job.text()[-3000:]}"
    assert rc != 0, job.text()[-3000:]
    assert re.search(rf"\[hpcnn watchdog\] ranks 2, 3 on node {n1} unreachable: no heartbeat for 30 s "
                     r"\(log\.heartbeat_timeout = 30\); ending the job \(exit status 4\)", err), job.text()[-4000:]
    assert re.search(rf"rank 1 on node {n0}: rank 0 ended the job: ranks 2, 3 on node {n1} unreachable", err), \
        job.text()[-4000:]
    assert_checkpoint_loads(ck, digits, tmp_path)


def test_killed_ranks_of_a_node_end_every_rank(cluster, digits, tmp_path):
    n1 = cluster.hostnames[1]
    job, ck = start_training(cluster, digits, tmp_path)
    t0 = time.monotonic()
    killed = cluster.kill_node(1, ranks_only=True)
    assert len(killed) == 2, killed
    took = wait_until_no_ranks(cluster, t0, END_WITHIN)
    rc = job.finish(timeout=60)
    text = job.text()
    ours = re.search(rf"\[hpcnn watchdog\] ranks 2, 3 on node {n1} ended without finishing the job", text)
    hydra = re.search(rf"RUNNING AT {n1}", text)
    print(f"ranks killed: every rank ended {took:.1f} s after the fault; mpiexec exit status {rc}; "
          f"named by the watchdog: {bool(ours)}, by mpiexec: {bool(hydra)}")
    assert took <= END_WITHIN, f"ranks still running {END_WITHIN} s after node 1's were killed:\n{text[-3000:]}"
    assert rc != 0, text[-3000:]
    # the watchdog and mpiexec race to end the job; each names the node
    assert ours or hydra, f"nothing names {n1}:\n{text[-4000:]}"
    assert_checkpoint_loads(ck, digits, tmp_path)
