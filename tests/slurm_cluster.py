"""A real Slurm cluster on this one machine, for tests of slurm/.

``SlurmCluster`` installs Debian's Slurm and MUNGE packages when they are
missing, writes a MUNGE key, ``slurm.conf`` and ``gres.conf`` into a private
temporary directory (clients and daemons find it through ``SLURM_CONF``; the
MUNGE socket, state, spool, pid and log files all live there too, and the
ports are free ones picked at start), runs ``munged``, ``slurmctld`` and
``slurmd`` in the foreground as children of this process, and waits until
``sinfo`` shows the nodes idle.  With ``nodes=N > 1`` it runs N slurmd
daemons on this machine, so that multi-node job scripts run for real: each
node offers all of this machine's cores and ``gpus`` GPUs.  Given an
``emulated`` cluster (hpcnn.cluster.EmulatedCluster, network namespaces
joined by a bridge), each slurmd runs on a node of its own: in that node's
namespace, under its host name, at its address; slurmctld runs on the first
node, and the client commands (sbatch, squeue, ...) run there too, as on a
login node.  Without one, the slurmd daemons share this machine's name and
address, each with its own port (Debian's Slurm is built with
multiple-slurmd support).  Leaving the ``with`` block (also after an
error) cancels every job of the cluster, waits for them to go, and stops the
three daemons it started.  Nothing outside the temporary directory is
touched except the package installation.

Each node offers ``GPUS`` GPUs whose device files are links to harmless
character devices (/dev/null, /dev/zero): Slurm only needs files to hand out,
so ``--gpus-per-node`` works and sets ``CUDA_VISIBLE_DEVICES`` on a machine
without GPUs.

Needs root (to install packages and to run slurmd, which starts jobs as their
users): ``skip_reason()`` says why the cluster cannot run here, and a test
skips with that reason.  Anything else that goes wrong raises
``SlurmClusterError`` with the daemons' logs in the message.

Run by hand to get a cluster to play with::

    sudo python tests/slurm_cluster.py [NODES]   # prints the SLURM_CONF to export
    sudo hpcnn cluster up --name lab && sudo python tests/slurm_cluster.py 2 --emulated lab
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
PROGRAMS = ["slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun", "munged"]
GPUS = 2
# job states after which a job does not run again by itself
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class SlurmClusterError(RuntimeError):
    """Slurm could not be installed or started, or a job did not behave."""


def skip_reason() -> str | None:
    """Why a Slurm cluster cannot run on this machine (None when it can).
    Only not being root counts: a missing package is installed, and a broken
    installation is an error, not a reason to skip."""
    if not hasattr(os, "geteuid"):
        return "the Slurm test cluster needs a POSIX system with root"
    if os.geteuid() != 0:
        return ("the Slurm test cluster needs root (to install slurmctld/slurmd/munge with "
                "apt-get and to run slurmd); run the tests as root to include it")
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"({path}: {exc})"
    return "\n".join(text[-lines:]) if text else "(empty)"


def ensure_packages(timeout: float = 300) -> str:
    """Install Slurm and MUNGE with apt-get unless every program is already
    there.  Returns what was done; raises SlurmClusterError on failure."""
    missing = [p for p in PROGRAMS if not shutil.which(p, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if not missing:
        return "Slurm and MUNGE already installed"
    apt = shutil.which("apt-get")
    if apt is None:
        raise SlurmClusterError(f"{', '.join(missing)} missing and there is no apt-get to install "
                                f"{' '.join(PACKAGES)}; install Slurm and MUNGE by hand")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log = []

    def apt_get(*args):
        r = subprocess.run([apt, *args], env=env, capture_output=True, text=True, timeout=timeout)
        log.append(f"$ apt-get {' '.join(args)} -> {r.returncode}\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
        return r.returncode == 0

    install = ("install", "-y", "-q", "--no-install-recommends", *PACKAGES)
    # the package lists may be stale or absent: update once and retry
    if not apt_get(*install) and not (apt_get("update", "-q") and apt_get(*install)):
        raise SlurmClusterError("apt-get could not install " + " ".join(PACKAGES) + ":\n" + "\n".join(log))
    return "installed " + " ".join(PACKAGES)


class SlurmCluster:
    """A Slurm cluster of ``nodes`` nodes on this machine, configured in a
    temporary directory (see the module docstring).  Use as a context
    manager; ``env`` is the environment for Slurm client commands and jobs,
    ``nodes`` the node names."""

    def __init__(self, nodes: int = 1, cpus: int | None = None, gpus: int = GPUS, kill_wait: int = 15,
                 start_timeout: float = 60, extra_conf: str = "", emulated=None):
        self.cpus = cpus or os.cpu_count() or 1
        self.gpus = gpus
        self.kill_wait = kill_wait
        self.start_timeout = start_timeout
        self.extra_conf = extra_conf
        self.dir: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.emulated = emulated
        if emulated is not None:
            if nodes > len(emulated.nodes):
                raise SlurmClusterError(f"{nodes} Slurm nodes on an emulated cluster of {len(emulated.nodes)}")
            # a node per namespace; the controller on the first, at its address
            self.nodes = emulated.hostnames[:nodes]
            host = self.nodes[0]
            self.host_addr = emulated.node(0).addr
        else:
            host = socket.gethostname().split(".")[0]
            # one node: this machine's name; several: node1..nodeN, all on this machine
            self.nodes = [host] if nodes == 1 else [f"node{i}" for i in range(1, nodes + 1)]
            self.host_addr = "127.0.0.1"
        self.host = host
        self.partition = "hpcnn"
        # a clean client environment, even when the tests run inside a Slurm job
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
        self.env["PATH"] = self.env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        if emulated is not None:
            # the jobs' MPI ranks must talk over the emulated links (TCP), not
            # through shared memory (see hpcnn/cluster/emulated.py)
            from hpcnn.cluster.emulated import MPI_ENV
            self.env.update(MPI_ENV)
        self.installed = ""

    # ---------------------------------------------------------------- setup
    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self):
        reason = skip_reason()
        if reason:
            raise SlurmClusterError(reason)
        self.installed = ensure_packages()
        self.dir = Path(tempfile.mkdtemp(prefix="hpcnn-slurm-"))
        os.chmod(self.dir, 0o755)
        for sub in ("munge", "state", "spool", "log", "run", "dev"):
            (self.dir / sub).mkdir(mode=0o755)
        self._write_munge_key()
        self._write_config()
        self.env["SLURM_CONF"] = str(self.dir / "slurm.conf")
        self._start("munged", ["munged", "--foreground", "--force",
                               f"--socket={self.munge_socket}",
                               f"--key-file={self.dir / 'munge' / 'munge.key'}",
                               f"--pid-file={self.dir / 'run' / 'munged.pid'}",
                               f"--seed-file={self.dir / 'munge' / 'munged.seed'}",
                               f"--log-file={self.dir / 'log' / 'munged.log'}"])
        self._wait_for(lambda: Path(self.munge_socket).exists(), "munged to create its socket")
        self._start("slurmctld", ["slurmctld", "-D", "-c", "-f", self.env["SLURM_CONF"]], node=0)
        self._wait_for(lambda: self.run(["scontrol", "ping"], check=False).stdout.find("UP") >= 0,
                       "slurmctld to answer `scontrol ping`")
        for node in self.nodes:
            self._start(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", self.env["SLURM_CONF"]], node=node)
        self._wait_for(self._nodes_idle, f"nodes {','.join(self.nodes)} to be idle in sinfo")

    @property
    def munge_socket(self) -> str:
        return str(self.dir / "munge" / "munge.socket")

    def _write_munge_key(self):
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o400)

    def _hardware(self) -> str:
        """The node's sockets/cores/threads as slurmd detects them (so that
        slurmd does not report a mismatch), with the CPU count we were given."""
        r = subprocess.run(["slurmd", "-C"], env=self.env, capture_output=True, text=True, timeout=30)
        hw = dict(re.findall(r"(Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|CPUs)=(\d+)", r.stdout))
        if r.returncode != 0 or len(hw) < 5 or int(hw["CPUs"]) != self.cpus:
            return f"CPUs={self.cpus}"
        return " ".join(f"{k}={hw[k]}" for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket",
                                                   "ThreadsPerCore"))

    def _write_config(self):
        d = self.dir
        mem_mib = 1024
        # GPUs: links to harmless character devices, which is all Slurm checks
        # (it hands out their indexes and sets CUDA_VISIBLE_DEVICES)
        devices = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"]
        if self.gpus > len(devices):
            raise SlurmClusterError(f"gpus={self.gpus}: the test cluster can fake at most {len(devices)} GPUs")
        for i in range(self.gpus):
            (d / "dev" / f"fakegpu{i}").symlink_to(devices[i])
        multi = len(self.nodes) > 1
        emulated = self.emulated is not None
        # in a node's namespace every port is free; on this machine pick free ones
        ctld_port = 6817 if emulated else _free_port()
        conf = f"""\
# test cluster of {len(self.nodes)} node(s) on one machine, written by tests/slurm_cluster.py
ClusterName=hpcnntest
SlurmctldHost={self.host}({self.host_addr})
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={d}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
KillWait={self.kill_wait}
MinJobAge=600
GresTypes=gpu
"""
        hardware = self._hardware()
        gres = f"Gres=gpu:{self.gpus} " if self.gpus else ""
        for node in self.nodes:
            if emulated:
                # a node of the emulated cluster: its own name, address and host name
                where = f"NodeHostname={node} NodeAddr={self.emulated.node(node).addr} Port=6818"
            else:
                # several slurmd on one machine: same address, a port each
                where = (f"NodeHostname={self.host} " if multi else "") + f"NodeAddr=127.0.0.1 Port={_free_port()}"
            conf += f"NodeName={node} {where} {hardware} RealMemory={mem_mib} {gres}State=UNKNOWN\n"
        conf += (f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES "
                 f"MaxTime=INFINITE State=UP\n{self.extra_conf}\n")
        (d / "slurm.conf").write_text(conf)
        gres_conf = "AutoDetect=off\n"
        if self.gpus:
            gres_conf += f"NodeName={','.join(self.nodes)} Name=gpu File={d}/dev/fakegpu[0-{self.gpus - 1}]\n"
        (d / "gres.conf").write_text(gres_conf)
        (d / "plugstack.conf").write_text("")

    def _start(self, name: str, cmd: list[str], node=None):
        """Start a daemon; on an emulated cluster, on ``node`` (index or name)."""
        if node is not None and self.emulated is not None:
            cmd = self.emulated.exec_argv(node, cmd)
        # what a daemon prints before it opens its log file (bad options or config)
        out = open(self.dir / "log" / f"{name}.out", "wb")
        try:
            self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=self.env,
                                                cwd=self.dir, start_new_session=True)
        except OSError as exc:
            raise SlurmClusterError(f"could not start {name} ({' '.join(cmd)}): {exc}") from None
        finally:
            out.close()

    def _wait_for(self, ready, what: str):
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmClusterError(f"{name} exited with status {p.returncode} while waiting for "
                                            f"{what}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise SlurmClusterError(f"timed out after {self.start_timeout:.0f} s waiting for {what}\n{self.logs()}")

    def _nodes_idle(self) -> bool:
        r = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
        state = dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)
        return r.returncode == 0 and all(state.get(n) == "idle" for n in self.nodes)

    # ------------------------------------------------------------- commands
    def run(self, cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster (on an emulated
        cluster: on its first node, where slurmctld is reachable)."""
        argv = [str(c) for c in cmd]
        if self.emulated is not None:
            argv = self.emulated.exec_argv(0, argv)
        r = subprocess.run(argv, env=kw.pop("env", self.env), capture_output=True,
                           text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise SlurmClusterError(f"`{' '.join(map(str, cmd))}` failed with status {r.returncode}:\n"
                                    f"{r.stdout}{r.stderr}\n{self.logs()}")
        return r

    def sbatch(self, script, *args, cwd=None, env: dict | None = None, options=()) -> int:
        """Submit ``script args...`` (``options`` go to sbatch before the
        script and override its #SBATCH lines); returns the job id."""
        e = dict(self.env)
        e.update(env or {})
        r = self.run(["sbatch", "--parsable", *options, script, *args], cwd=cwd, env=e)
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if r.returncode != 0:
            return {}
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", r.stdout))

    def wait_job(self, job_id: int, timeout: float, until=None, poll: float = 1.0) -> dict[str, str]:
        """Poll until the job is in a final state (or ``until(info)`` is
        true); returns its `scontrol show job` fields."""
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            done = until(info) if until else info.get("JobState") in FINAL_STATES
            if done:
                return info
            time.sleep(poll)
        raise SlurmClusterError(f"job {job_id} still not done after {timeout:.0f} s: {info}\n"
                                f"{self.run(['squeue', '-a'], check=False).stdout}\n{self.logs()}")

    def logs(self, lines: int = 40) -> str:
        """The tail of every daemon log, for error messages."""
        if self.dir is None:
            return "(no cluster directory)"
        parts = []
        for f in sorted((self.dir / "log").glob("*")):
            log = f.with_suffix(".log")
            if f.suffix == ".out" and log.exists() and log.stat().st_size > 0:
                continue  # the daemon's log file holds the same, with times
            parts.append(f"--- {f} ---\n{_tail(f, lines)}")
        return "\n".join(parts)

    # ------------------------------------------------------------- teardown
    def stop(self):
        """Cancel every job, wait for them to end, stop the daemons this
        object started.  Safe to call twice."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "-p", self.partition], check=False)
            deadline = time.monotonic() + self.kill_wait + 15
            while time.monotonic() < deadline:
                r = self.run(["squeue", "-h", "-t", "all", "-p", self.partition, "-o", "%T"], check=False)
                if r.returncode != 0 or not set(r.stdout.split()) - FINAL_STATES:
                    break
                time.sleep(0.5)
        for name in [f"slurmd-{n}" for n in self.nodes] + ["slurmctld", "munged"]:
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=15)

    def cleanup(self):
        """Remove the temporary directory (after stop)."""
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


if __name__ == "__main__":
    import argparse
    import signal
    import sys
    ap = argparse.ArgumentParser(description="a Slurm cluster on this machine, until Ctrl-C")
    ap.add_argument("nodes", type=int, nargs="?", default=1)
    ap.add_argument("--emulated", default=None, metavar="NAME",
                    help="put each slurmd on a node of this emulated cluster (hpcnn cluster up --name NAME)")
    opts = ap.parse_args()
    reason = skip_reason()
    if reason:
        sys.exit(reason)
    emulated = None
    if opts.emulated:
        from hpcnn.cluster import EmulatedCluster
        emulated = EmulatedCluster.attach(opts.emulated)

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    c = SlurmCluster(nodes=opts.nodes, emulated=emulated)
    try:
        with c:
            print(f"{c.installed}; cluster up in {c.dir}")
            print(f"export SLURM_CONF={c.env['SLURM_CONF']}")
            if emulated is not None:
                print(f"client commands run on the first node: ip netns exec {c.nodes[0]} sbatch ...; "
                      f"export UCX_TLS=tcp,self for MPI jobs")
            print("Ctrl-C stops it")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        c.cleanup()
