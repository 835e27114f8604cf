"""The sbatch scripts in slurm/, run for real on a Slurm cluster of two
nodes started on this machine (tests/slurm_cluster.py): each node a network
namespace of an emulated cluster (hpcnn.cluster.EmulatedCluster) with its own
slurmd, host name and address, so that a two-node job's ranks talk over the
emulated link.

Every training job is the real ``python -m hpcnn train digits.toml`` (the
default job of jobs/, on data made by ``hpcnn data digits``), 2 ranks:

- the launch itself, with a probe program instead of training: one MPI
  world, ranks spread over the nodes, a node-local rank (= GPU) per rank,
  for both scripts and both launchers;
- a short training job with srun, through slurm/hpcnn-one-node.sbatch (2
  ranks on one node) and slurm/hpcnn-multi-node.sbatch (2 nodes, 1 rank
  each): loss lines, the final accuracy, the metrics file, a checkpoint with
  the parameters that h5py and ``hpcnn ckpt inspect`` read;
- preemption: ``scontrol requeue`` of a running two-node job (srun); the
  ranks checkpoint on SIGTERM, Slurm starts the job again on both nodes and
  it resumes from that checkpoint;
- the time-limit warning (``--signal=B:USR1@...``, sent here at once with
  ``scancel --batch --signal=USR1``) to a one-node job with srun and to a
  two-node job with the mpiexec launcher: the ranks checkpoint and stop, the
  script requeues the job, and it resumes and finishes;
- errors: a missing job file, a bad job key (exit status 2, one message).

Skipped (with the reason) only when not root or when the emulated cluster's
tools (ip, tc, unshare) are missing; a failure to install or start Slurm
fails with the daemons' logs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import pytest

from hpcnn.cluster import EmulatedCluster, unavailable
from mpi_launch import ROOT, mpi_env, mpiexec
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
# jobs/digits.toml checkpoints only at epoch ends and logs every 10 steps
TRAIN_SETS = ["checkpoint.every_steps=10", "train.log_every=5"]
# Measured on this cluster (digits job, 2 ranks, a checkpoint every 10 steps):
# 14 steps/s on the 2-core machine under load from other work, 30 steps/s
# without, plus 2-4 s to start a run.  The short test trains SHORT_STEPS
# (about 1 s); the requeue tests train LONG_STEPS (13-28 s, 20 epochs of 22
# steps), so that the requeue, sent right after the first checkpoint (step
# 10), lands long before the job would end.
SHORT_STEPS = 15
LONG_STEPS = 400
LONG_SETS = [f"train.max_steps={LONG_STEPS}", "train.epochs=20"]

# What each rank sees of the launch: its rank, node, node-local rank as hpcnn
# reads it (the GPU it will use) and the GPUs Slurm made visible.
PROBE = '''
import os
from mpi4py import MPI
from hpcnn.backend import local_rank_from_env
c = MPI.COMM_WORLD
line = (f"probe: rank {c.rank} of {c.size} node {os.environ.get('SLURMD_NODENAME')} "
        f"local rank {local_rank_from_env()} gpus {os.environ.get('CUDA_VISIBLE_DEVICES')}\\n")
os.write(1, line.encode())   # one write: print() writes the newline apart, and ranks interleave
'''

@pytest.fixture(scope="module")
def cluster():
    reason = skip_reason() or unavailable()
    if reason:
        pytest.skip(reason)
    with EmulatedCluster(NODES, rate="1gbit", prefix=f"hs{os.getpid()}") as nodes:
        c = SlurmCluster(nodes=NODES, emulated=nodes)
        try:
            c.start()          # a failure here is a test error with the daemons' logs
            yield c
        finally:
            c.stop()
            c.cleanup()


@pytest.fixture(scope="module")
def workdir():
    """The submit directory: the digits data and job file (whose data.path,
    data/digits.h5, is relative to it) and the launch probe.  A directory of
    its own, not pytest's tmp_path: another pytest session of the same user
    prunes old numbered tmp_path directories, maybe while a job runs."""
    d = Path(tempfile.mkdtemp(prefix="hpcnn-slurm-submit-"))
    try:
        r = subprocess.run([sys.executable, "-m", "hpcnn", "data", "digits", "-o", str(d / "data" / "digits.h5")],
                           cwd=d, env=mpi_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"hpcnn data digits failed ({r.returncode}):\n{r.stdout}{r.stderr}"
        shutil.copy(ROOT / "jobs" / "digits.toml", d / "digits.toml")
        (d / "probe_launch.py").write_text(PROBE)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def job_env(launcher: str, command: str | None = None) -> dict:
    """Environment exported to the job (sbatch passes the submitter's).
    Without ``command`` the scripts run their default, ``python -m hpcnn``."""
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
    if command:
        env["HPCNN_COMMAND"] = command
    return env


def submit(cluster, workdir, script, name, launcher, *sets, command=None):
    """sbatch ``script digits.toml --set ...`` as job ``name``; returns the
    job id, its output file and its checkpoint directory."""
    sets = [*TRAIN_SETS, *sets]
    job_id = cluster.sbatch(SLURM_DIR / script, "digits.toml", *[a for s in sets for a in ("--set", s)],
                            cwd=workdir, env=job_env(launcher, command),
                            options=["-J", name, *LAYOUTS[script], *COMMON_OPTIONS])
    return job_id, workdir / f"hpcnn-{name}-{job_id}.out", workdir / "runs" / name / "checkpoints"


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"(no output file {path})"


def runs_of(output: str) -> list[str]:
    """The output split at the scripts' 'run N' header lines."""
    parts = re.split(r"(?m)^(?=hpcnn-slurm: job \d+ .* run \d+ on )", output)
    return [p for p in parts if p.startswith("hpcnn-slurm: job")]


def resumed_step(text: str) -> int | None:
    """The step of hpcnn train's 'resumed from PATH at step N' line."""
    m = re.search(r"resumed from \S+ at step (\d+)", text)
    return int(m.group(1)) if m else None


def stopped_step(text: str, signal: str = "SIGTERM") -> int | None:
    """The step of hpcnn train's 'stopped by SIGNAL at step N' line."""
    m = re.search(rf"stopped by {signal} at step (\d+)", text)
    return int(m.group(1)) if m else None


def checkpoint_step(path: Path) -> int:
    with h5py.File(path, "r") as f:
        return int(f.attrs["step"])


def checkpoints(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob("ckpt-*.h5"))


def wait_for_checkpoint(cluster, job_id, ckpt_dir, output, timeout=120) -> int:
    """Wait for the job's first checkpoint; returns its step (from the file
    name: hpcnn writes under a temporary name and renames, and may already be
    deleting old ones)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = checkpoints(ckpt_dir)
        if found:
            return int(re.fullmatch(r"ckpt-(\d+)\.h5", found[0].name).group(1))
        state = cluster.job(job_id).get("JobState")
        if state not in ("PENDING", "CONFIGURING", "RUNNING"):
            pytest.fail(f"job {job_id} is {state} before its first checkpoint:\n{read(output)}")
        time.sleep(0.2)
    pytest.fail(f"no checkpoint in {ckpt_dir} after {timeout} s:\n{read(output)}\n{cluster.logs()}")


def assert_trained(text: str, steps: int, ckpt_dir: Path):
    """A run that ended: loss lines, the final accuracy after ``steps``, no
    traceback, and its last checkpoint at ``steps``: an HDF5 file with the
    parameters that `hpcnn ckpt inspect` reads."""
    assert re.search(r"(?m)^step \d+/\d+ epoch \d+ loss \d+\.\d+", text), f"no loss lines:\n{text}"
    assert re.search(rf"final test accuracy (0|1)\.\d+ after {steps} steps", text), \
        f"no final accuracy after {steps} steps:\n{text}"
    assert "Traceback" not in text, text
    cks = checkpoints(ckpt_dir)
    assert cks, f"no checkpoint in {ckpt_dir}:\n{text}"
    with h5py.File(cks[-1], "r") as f:
        assert int(f.attrs["step"]) == steps, f"{cks[-1]}: step {f.attrs['step']}, expected {steps}"
        assert "params" in f and len(f["params"]) > 0, f"{cks[-1]} has no /params: {list(f)}"
    r = subprocess.run([sys.executable, "-m", "hpcnn", "ckpt", "inspect", str(cks[-1])], env=mpi_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "params/" in r.stdout, \
        f"hpcnn ckpt inspect {cks[-1]} failed ({r.returncode}):\n{r.stdout}{r.stderr}"


def metrics_of(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    assert path.exists(), f"no metrics file {path}"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    found = re.findall(r"(?m)^probe: rank (\d+) of (\d+) node (\S+) local rank (\d+) gpus (\S+)$", text)
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
    name = script.split(".")[0]
    before = cluster.emulated.link_bytes()
    job_id, output, ckpt_dir = submit(cluster, workdir, script, name, "srun", f"train.max_steps={SHORT_STEPS}")
    info = wait_done(cluster, job_id, output)
    after = cluster.emulated.link_bytes()
    text = read(output)
    assert_completed(info, output)
    nodes = NODES if script == "hpcnn-multi-node.sbatch" else 1
    assert f"on {nodes} node(s)" in text and f"{RANKS} ranks, launcher srun" in text, text
    # --gpus-per-node took effect: the node's (fake) GPUs are visible to the job
    assert re.search(r"CUDA_VISIBLE_DEVICES=0(,\d)*;", text), text
    assert f"global batch 64, {RANKS} ranks" in text, f"not one MPI world of {RANKS} ranks:\n{text}"
    # each rank keeps to its --cpus-per-task=1 although the host has more cores
    assert "1 BLAS thread(s) per rank" in text, text
    assert "resumed from" not in text, f"a fresh run resumed:\n{text}"
    assert_trained(text, SHORT_STEPS, ckpt_dir)
    records = metrics_of(ckpt_dir.parent)
    kinds = [r["kind"] for r in records]
    assert "train" in kinds and kinds[-1] == "final" and records[-1]["step"] == SHORT_STEPS, records
    if nodes > 1:
        # the gradients crossed the emulated link: every step each of the two
        # ranks sends at least its whole gradient (float32) to the other
        params = int(re.search(r"\(([\d,]+) parameters\)", text).group(1).replace(",", ""))
        sent = {k: after[k]["tx"] - before[k]["tx"] for k in after}
        assert min(sent.values()) >= SHORT_STEPS * params * 4, \
            f"the nodes' links sent {sent} bytes, less than {SHORT_STEPS} steps of gradients:\n{text}"


def two_runs(cluster, job_id, output) -> tuple:
    """Wait until the requeued job has run again and completed; the output
    of its first and second run, and the whole output."""
    info = wait_through_requeue(cluster, job_id, output)
    text = read(output)
    assert_completed(info, output)
    runs = runs_of(text)
    assert len(runs) == 2, f"expected 2 runs of job {job_id} (Restarts={info.get('Restarts')}):\n{text}"
    return runs[0], runs[1], text


def test_requeue_resumes_from_checkpoint(cluster, workdir):
    """``scontrol requeue`` of a two-node job (srun): it stops with a
    checkpoint, runs again on both nodes and resumes from it."""
    job_id, output, ckpt_dir = submit(cluster, workdir, "hpcnn-multi-node.sbatch", "preempted", "srun",
                                      *LONG_SETS)
    first_ckpt = wait_for_checkpoint(cluster, job_id, ckpt_dir, output)
    cluster.run(["scontrol", "requeue", str(job_id)])
    first, second, text = two_runs(cluster, job_id, output)
    assert f"on {NODES} node(s)" in first and f"on {NODES} node(s)" in second, text
    # on a requeue Slurm signals the job step's tasks (SIGTERM) and the batch
    # shell, which passes the stop on as SIGUSR1 through srun: whichever
    # reaches the ranks first names the stop; both end it cleanly
    stopped = stopped_step(first, "SIG(?:TERM|USR1)")
    assert stopped is not None, f"the ranks did not stop cleanly on SIGTERM or SIGUSR1:\n{text}"
    # the batch script saw them end (it was not killed after KillWait)
    assert "ranks finished with status 0" in first, text
    assert "final test accuracy" not in first, f"the first run finished before the requeue:\n{text}"
    step = resumed_step(second)
    # the checkpoint written on that stop is the one the second run starts from
    assert step is not None and first_ckpt <= stopped == step < LONG_STEPS, \
        f"second run did not resume from the checkpoint written on the stop (step {stopped}):\n{text}"
    assert_trained(second, LONG_STEPS, ckpt_dir)
    kinds = [r["kind"] for r in metrics_of(ckpt_dir.parent)]
    assert kinds.count("stopped") == 1 and kinds[-1] == "final", kinds
    assert "stopped by" not in second, f"the resumed run was stopped too:\n{text}"


@pytest.mark.parametrize("script,launcher", [("hpcnn-one-node.sbatch", "srun"),
                                             ("hpcnn-multi-node.sbatch", "mpiexec")])
def test_time_limit_signal_checkpoints_and_requeues(cluster, workdir, script, launcher):
    name = f"timelimit-{launcher}"
    job_id, output, ckpt_dir = submit(cluster, workdir, script, name, launcher, *LONG_SETS)
    first_ckpt = wait_for_checkpoint(cluster, job_id, ckpt_dir, output)
    # what `#SBATCH --signal=B:USR1@180` sends 3 minutes before the limit
    cluster.run(["scancel", "--batch", "--signal=USR1", str(job_id)])
    first, second, text = two_runs(cluster, job_id, output)
    nodes = NODES if script == "hpcnn-multi-node.sbatch" else 1
    assert f"on {nodes} node(s)" in first and f"launcher {launcher}" in first, text
    # the script stops the ranks with SIGUSR1 through srun (which would turn
    # a SIGTERM into SIGKILL) and with SIGTERM through mpiexec
    stopped = stopped_step(first, "SIGUSR1" if launcher == "srun" else "SIGTERM")
    assert stopped is not None and "ranks finished with status 0" in first and "requeueing job" in first, text
    step = resumed_step(second)
    assert step is not None and first_ckpt <= stopped == step < LONG_STEPS, \
        f"second run did not resume from the checkpoint written on the signal (step {stopped}):\n{text}"
    assert "stopped by" not in second, f"the resumed run was stopped too:\n{text}"
    assert_trained(second, LONG_STEPS, ckpt_dir)


def test_bad_job_file_fails_with_a_message(cluster, workdir):
    """A missing job file stops the script before the launch; a bad key
    stops hpcnn train on every rank with one message, and its exit status
    (2) is the job's."""
    script = "hpcnn-one-node.sbatch"
    job_id = cluster.sbatch(SLURM_DIR / script, "no-such-job.toml", cwd=workdir, env=job_env("srun"),
                            options=["-J", "nojob", *LAYOUTS[script], *COMMON_OPTIONS])
    output = workdir / f"hpcnn-nojob-{job_id}.out"
    info = wait_done(cluster, job_id, output, timeout=60)
    text = read(output)
    assert info.get("JobState") == "FAILED" and info.get("ExitCode") == "2:0", f"{info}\n{text}"
    assert "job file 'no-such-job.toml' not found" in text, text

    job_id, output, _ = submit(cluster, workdir, script, "badkey", "srun", "train.no_such_key=1")
    info = wait_done(cluster, job_id, output, timeout=60)
    text = read(output)
    assert info.get("JobState") == "FAILED" and info.get("ExitCode") == "2:0", f"{info}\n{text}"
    assert text.count("--set train.no_such_key: unknown key") == 1, text
    assert "Traceback" not in text, text


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
