"""The sbatch scripts in slurm/, run for real on a Slurm cluster of two
nodes (two slurmd daemons) started on this machine (tests/slurm_cluster.py).

- a short training job with srun, through slurm/hpcnn-one-node.sbatch (2
  ranks on one node) and slurm/hpcnn-multi-node.sbatch (2 nodes, 1 rank
  each): loss lines, a clean end, a checkpoint that h5py reads;
- preemption: ``scontrol requeue`` of a running one-node job; the ranks
  checkpoint on SIGTERM, Slurm starts the job again and it resumes from that
  checkpoint;
- the time-limit warning (``--signal=B:USR1@...``, sent here at once with
  ``scancel --batch --signal=USR1``) to a two-node job with the mpiexec
  launcher: the ranks checkpoint and stop, the script requeues the job, and
  it resumes and finishes.

Skipped (with the reason) only when not root; a failure to install or start
Slurm fails with the daemons' logs.
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

from mpi_launch import ROOT, mpiexec
from slurm_cluster import SlurmCluster, SlurmClusterError, skip_reason

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLURM_DIR = ROOT / "slurm"
NODES = 2
RANKS = 2
# this machine has 2 cores: 2 ranks in all, one core and one (fake) GPU each
LAYOUTS = {
    "hpcnn-one-node.sbatch": ["--nodes=1", f"--ntasks-per-node={RANKS}", f"--gpus-per-node={RANKS}"],
    "hpcnn-multi-node.sbatch": [f"--nodes={NODES}", "--ntasks-per-node=1", "--gpus-per-node=1"],
}
COMMON_OPTIONS = ["--cpus-per-task=1", "--time=10"]

# --- stand-in for `hpcnn train`, used until it lands on main ---------------
STANDIN = '''
import argparse, os, sys, time
import h5py
from mpi4py import MPI
from hpcnn.job import Job
from hpcnn.failsafe import StopSignals
from hpcnn.checkpoint import latest_checkpoint, checkpoint_name

p = argparse.ArgumentParser()
p.add_argument("command", choices=["train"])
p.add_argument("job")
p.add_argument("--set", action="append", default=[])
a = p.parse_args()
job = Job.load(a.job, a.set)
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
stop = StopSignals()
ck = job["checkpoint"]
step = 0
if ck["dir"] and ck["resume"]:
    last = latest_checkpoint(ck["dir"])
    if last is not None:
        with h5py.File(last, "r") as f:
            step = int(f.attrs["step"])
        if rank == 0:
            print(f"resumed from {last} at step {step}", flush=True)
total = job["train"]["max_steps"]

def save(step):
    if rank == 0 and ck["dir"]:
        os.makedirs(ck["dir"], exist_ok=True)
        path = os.path.join(ck["dir"], checkpoint_name(step))
        with h5py.File(path + ".tmp", "w") as f:
            f.attrs["step"] = step
        os.replace(path + ".tmp", path)
    comm.Barrier()

while step < total:
    time.sleep(0.2)
    step += 1
    if rank == 0 and step % job["train"]["log_every"] == 0:
        print(f"step {step} loss {1.0 / step:.4f}", flush=True)
    stopping = comm.allreduce(stop.requested is not None, op=MPI.LOR)
    if stopping or (ck["every_steps"] and step % ck["every_steps"] == 0) or step == total:
        save(step)
    if stopping:
        if rank == 0:
            print(f"stopped by {stop.requested or 'a signal'} at step {step}", flush=True)
        sys.exit(0)
if rank == 0:
    print(f"finished {step} steps, accuracy 0.9", flush=True)
'''

# What each rank sees of the launch: its rank, node, node-local rank as hpcnn
# reads it (the GPU it will use) and the GPUs Slurm made visible.
PROBE = '''
import os
from mpi4py import MPI
from hpcnn.backend import local_rank_from_env
c = MPI.COMM_WORLD
print(f"probe: rank {c.rank} of {c.size} node {os.environ.get('SLURMD_NODENAME')} "
      f"local rank {local_rank_from_env()} gpus {os.environ.get('CUDA_VISIBLE_DEVICES')}", flush=True)
'''

JOB_TOML = '''
[job]
name = "slurm-test"
[model]
name = "lenet5"
[data]
path = "data/digits.h5"
[train]
log_every = 5
[checkpoint]
every_steps = 10
'''


@pytest.fixture(scope="module")
def cluster():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(nodes=NODES)
    try:
        c.start()          # a failure here is a test error with the daemons' logs
        yield c
    finally:
        c.stop()
        c.cleanup()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The submit directory: the job file and the command to run."""
    d = tmp_path_factory.mktemp("slurm-submit")
    (d / "digits.toml").write_text(JOB_TOML)
    (d / "standin_train.py").write_text(STANDIN)
    (d / "probe_launch.py").write_text(PROBE)
    return d


def job_env(workdir: Path, launcher: str, command: str | None = None) -> dict:
    """Environment exported to the job (sbatch passes the submitter's)."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HPCNN_LAUNCHER": launcher}
    if (Path(sys.prefix) / "bin" / "activate").exists():
        env["HPCNN_VENV"] = sys.prefix
    else:
        env["HPCNN_PYTHON"] = sys.executable
    if launcher == "srun":
        env["HPCNN_SRUN_MPI"] = "pmi2"      # Slurm's PMI-2 server speaks to MPICH's PMI client
    else:
        env["HPCNN_MPIEXEC"] = mpiexec()
    env["HPCNN_COMMAND"] = command or f"python {workdir / 'standin_train.py'}"
    return env


def submit(cluster, workdir, script, name, launcher, *sets, command=None):
    job_id = cluster.sbatch(SLURM_DIR / script, "digits.toml", *[a for s in sets for a in ("--set", s)],
                            cwd=workdir, env=job_env(workdir, launcher, command),
                            options=["-J", name, *LAYOUTS[script], *COMMON_OPTIONS])
    return job_id, workdir / f"hpcnn-{name}-{job_id}.out", workdir / "runs" / name / "checkpoints"


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"(no output file {path})"


def runs_of(output: str) -> list[str]:
    """The output split at the scripts' 'run N' header lines."""
    parts = re.split(r"(?m)^(?=hpcnn-slurm: job \d+ .* run \d+ on )", output)
    return [p for p in parts if p.startswith("hpcnn-slurm: job")]


def resumed_step(text: str) -> int | None:
    for line in text.splitlines():
        if "resumed from" in line:
            m = re.search(r"\bstep\D{0,3}(\d+)", line) or re.search(r"ckpt-(\d+)", line)
            assert m, f"no step in the resume line {line!r}"
            return int(m.group(1))
    return None


def checkpoint_step(path: Path) -> int:
    import h5py
    with h5py.File(path, "r") as f:
        return int(f.attrs["step"])


def checkpoints(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob("ckpt-*.h5"))


def wait_for_checkpoint(cluster, job_id, ckpt_dir, output, timeout=120) -> int:
    """Wait for the job's first checkpoint; returns its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if checkpoints(ckpt_dir):
            return checkpoint_step(checkpoints(ckpt_dir)[0])
        state = cluster.job(job_id).get("JobState")
        if state not in ("PENDING", "CONFIGURING", "RUNNING"):
            pytest.fail(f"job {job_id} is {state} before its first checkpoint:\n{read(output)}")
        time.sleep(0.2)
    pytest.fail(f"no checkpoint in {ckpt_dir} after {timeout} s:\n{read(output)}\n{cluster.logs()}")


def wait_done(cluster, job_id, output, timeout=120) -> dict:
    try:
        return cluster.wait_job(job_id, timeout)
    except SlurmClusterError as exc:
        pytest.fail(f"{exc}\n--- job output ---\n{read(output)}")


def wait_through_requeue(cluster, job_id, output, timeout=180):
    """Wait until the job ran again after a requeue and ended.  Slurm holds a
    requeued job for about two minutes (Reason=BeginTime); the test releases
    it at once with `scontrol update StartTime=now`."""
    def done(info):
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
        return int(info.get("Restarts", "0")) >= 1 and info.get("JobState") in ("COMPLETED", "FAILED",
                                                                                   "CANCELLED", "TIMEOUT")
    try:
        return cluster.wait_job(job_id, timeout, until=done)
    except SlurmClusterError as exc:
        pytest.fail(f"{exc}\n--- job output ---\n{read(output)}")


def assert_completed(info, output):
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", \
        f"job ended {info.get('JobState')} with exit code {info.get('ExitCode')}:\n{read(output)}"


@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
@pytest.mark.parametrize("script", ["hpcnn-one-node.sbatch", "hpcnn-multi-node.sbatch"])
def test_each_rank_gets_its_own_gpu(cluster, workdir, script, launcher):
    """The launch as the ranks see it: every rank of one MPI world, spread
    over the nodes, each with its own node-local rank -- the GPU that hpcnn
    selects -- and the node's GPUs visible."""
    name = f"probe-{script.split('.')[0]}-{launcher}"
    job_id, output, _ = submit(cluster, workdir, script, name, launcher,
                               command=f"python {workdir / 'probe_launch.py'}")
    info = wait_done(cluster, job_id, output)
    text = read(output)
    assert_completed(info, output)
    found = re.findall(r"probe: rank (\d+) of (\d+) node (\S+) local rank (\d+) gpus (\S+)", text)
    assert sorted(int(r) for r, *_ in found) == list(range(RANKS)), text
    assert {int(size) for _, size, *_ in found} == {RANKS}, f"not one MPI world:\n{text}"
    nodes = NODES if script == "hpcnn-multi-node.sbatch" else 1
    per_node: dict = {}
    for _, _, node, local, gpus in found:
        per_node.setdefault(node, []).append(int(local))
        assert re.fullmatch(r"0(,\d)*", gpus), f"no GPUs visible to the rank:\n{text}"
    assert len(per_node) == nodes, f"ranks on {sorted(per_node)}, expected {nodes} nodes:\n{text}"
    for node, local in per_node.items():
        assert sorted(local) == list(range(RANKS // nodes)), \
            f"node-local ranks {sorted(local)} on {node} (two ranks would share a GPU):\n{text}"


@pytest.mark.parametrize("script", ["hpcnn-one-node.sbatch", "hpcnn-multi-node.sbatch"])
def test_job_trains_and_checkpoints(cluster, workdir, script):
    steps = 12
    name = script.split(".")[0]
    job_id, output, ckpt_dir = submit(cluster, workdir, script, name, "srun", f"train.max_steps={steps}")
    info = wait_done(cluster, job_id, output)
    text = read(output)
    assert_completed(info, output)
    nodes = NODES if script == "hpcnn-multi-node.sbatch" else 1
    assert f"on {nodes} node(s)" in text and f"{RANKS} ranks, launcher srun" in text, text
    # --gpus-per-node took effect: the node's (fake) GPUs are visible to the job
    assert re.search(r"CUDA_VISIBLE_DEVICES=0(,\d)*;", text), text
    assert re.search(r"(?m)^.*\bloss\b.*\d", text), f"no loss lines:\n{text}"
    assert re.search(r"(?i)accuracy|finished", text), f"no completion line:\n{text}"
    assert "Traceback" not in text, text
    assert "resumed from" not in text, f"a fresh run resumed:\n{text}"
    cks = checkpoints(ckpt_dir)
    assert cks, f"no checkpoint in {ckpt_dir}:\n{text}"
    assert checkpoint_step(cks[-1]) == steps


def test_requeue_resumes_from_checkpoint(cluster, workdir):
    steps = 60
    job_id, output, ckpt_dir = submit(cluster, workdir, "hpcnn-one-node.sbatch", "preempted", "srun",
                                      f"train.max_steps={steps}")
    first_ckpt = wait_for_checkpoint(cluster, job_id, ckpt_dir, output)
    cluster.run(["scontrol", "requeue", str(job_id)])
    info = wait_through_requeue(cluster, job_id, output)
    text = read(output)
    assert_completed(info, output)
    runs = runs_of(text)
    assert len(runs) == 2, f"expected 2 runs of job {job_id} (Restarts={info.get('Restarts')}):\n{text}"
    first, second = runs
    assert "stopped by SIGTERM" in first, f"the ranks did not stop cleanly on SIGTERM:\n{text}"
    step = resumed_step(second)
    assert step is not None and first_ckpt <= step < steps, \
        f"second run did not resume from a checkpoint (the first was at step {first_ckpt}):\n{text}"
    assert re.search(r"(?i)accuracy|finished", second), f"resumed run did not finish:\n{text}"
    assert checkpoint_step(checkpoints(ckpt_dir)[-1]) == steps


def test_time_limit_signal_checkpoints_and_requeues(cluster, workdir):
    steps = 60
    job_id, output, ckpt_dir = submit(cluster, workdir, "hpcnn-multi-node.sbatch", "timelimit", "mpiexec",
                                      f"train.max_steps={steps}")
    first_ckpt = wait_for_checkpoint(cluster, job_id, ckpt_dir, output)
    # what `#SBATCH --signal=B:USR1@180` sends 3 minutes before the limit
    cluster.run(["scancel", "--batch", "--signal=USR1", str(job_id)])
    info = wait_through_requeue(cluster, job_id, output)
    text = read(output)
    assert_completed(info, output)
    runs = runs_of(text)
    assert len(runs) == 2, f"expected 2 runs of job {job_id} (Restarts={info.get('Restarts')}):\n{text}"
    first, second = runs
    assert f"on {NODES} node(s)" in first and "launcher mpiexec" in first, text
    assert "stopped by SIGTERM" in first and "requeueing job" in first, text
    step = resumed_step(second)
    assert step is not None and first_ckpt <= step < steps, \
        f"second run did not resume from a checkpoint (the first was at step {first_ckpt}):\n{text}"
    assert re.search(r"(?i)accuracy|finished", second), f"resumed run did not finish:\n{text}"
    assert checkpoint_step(checkpoints(ckpt_dir)[-1]) == steps


def test_bad_job_file_fails_with_a_message(cluster, workdir):
    script = "hpcnn-one-node.sbatch"
    job_id = cluster.sbatch(SLURM_DIR / script, "no-such-job.toml", cwd=workdir, env=job_env(workdir, "srun"),
                            options=["-J", "nojob", *LAYOUTS[script], *COMMON_OPTIONS])
    output = workdir / f"hpcnn-nojob-{job_id}.out"
    info = wait_done(cluster, job_id, output, timeout=60)
    text = read(output)
    assert info.get("JobState") == "FAILED" and info.get("ExitCode") == "2:0", f"{info}\n{text}"
    assert "job file 'no-such-job.toml' not found" in text, text


def test_cluster_that_cannot_start_reports_the_daemon_logs():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(extra_conf="NoSuchSlurmOption=1", start_timeout=30)
    with pytest.raises(SlurmClusterError) as err:
        with c:
            pass
    c.cleanup()
    assert "slurmctld" in str(err.value) and "NoSuchSlurmOption" in str(err.value), str(err.value)
