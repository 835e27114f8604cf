"""An emulated cluster of N nodes on one machine, for tests and benchmarks.

Every node is a network namespace with one veth link to a bridge in a
"switch" namespace; processes started on a node also get their own UTS
namespace, so that ``hostname`` (and with it MPI's and hpcnn's node-local
logic) sees the node's name.  Each link can be shaped with tc (rate and
delay, both directions).  MPI jobs are launched with MPICH's Hydra running
inside node 0, its ssh launcher replaced by a script that enters the target
node's namespaces, and ``UCX_TLS=tcp,self``: without it UCX sees one host
and moves the data through shared memory, and the shaped link carries
nothing (``link_bytes`` reads the link's byte counters to check).

Everything made carries the cluster's name (its prefix): namespaces
``Pn0 .. PnK`` (also the nodes' host names; no '-' in them, which MPICH's
parser of Slurm node lists rejects) and ``P-sw``, veth ends
``P-K`` (node side) and ``P-Ks`` (switch side), the bridge ``P-br``, and
/etc/hosts lines ending in ``# hpcnn-cluster:P``.  The nodes' addresses lie
in a private /24 (10.X.Y.0) chosen from the name and unused by other
clusters.  A state file, ``/run/hpcnn-cluster/P/state.json``, records what
was made as it is made, so that ``down()`` (or ``hpcnn cluster down`` from
another process) removes exactly that, also after a crash half-way up.

Needs root (namespaces, links, tc, /etc/hosts) and the programs ip, tc and
unshare (iproute2, util-linux).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hpcnn.launcher import child_env, find_mpiexec

#: where the state of every cluster lives (one directory per cluster)
STATE_ROOT = Path(os.environ.get("HPCNN_CLUSTER_STATE", "/run/hpcnn-cluster"))
HOSTS_FILE = Path("/etc/hosts")
MARK = "# hpcnn-cluster:"
TOOLS = ("ip", "tc", "unshare")
MIN_NODES, MAX_NODES = 2, 8
_NAME = re.compile(r"[a-z][a-z0-9]{0,9}")
_RATE = re.compile(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps|tbps)", re.I)
_DELAY = re.compile(r"\d+(?:\.\d+)?(us|ms|s)")
_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"
# what the MPI ranks need so that every message between two nodes crosses
# the emulated link (see the module docstring)
MPI_ENV = {"UCX_TLS": "tcp,self"}
_RANK_VARS = (b"PMI_RANK=", b"PMIX_RANK=", b"OMPI_COMM_WORLD_RANK=", b"SLURM_PROCID=")


class ClusterError(RuntimeError):
    """The emulated cluster cannot be made, used or removed; the message
    says what is wrong and what to do."""


def _path() -> str:
    return os.environ.get("PATH", "/usr/bin:/bin") + ":" + _SBIN


def which(tool: str) -> str | None:
    return shutil.which(tool, path=_path())


def unavailable() -> str | None:
    """Why an emulated cluster cannot run here (None when it can)."""
    if not hasattr(os, "geteuid") or not sys.platform.startswith("linux"):
        return "the emulated cluster needs Linux (network namespaces)"
    if os.geteuid() != 0:
        return ("the emulated cluster needs root: it creates network namespaces, veth links and a "
                "bridge, shapes them with tc and adds its node names to /etc/hosts; run it as root "
                "(e.g. sudo hpcnn cluster up)")
    missing = [t for t in TOOLS if which(t) is None]
    if missing:
        return (f"the emulated cluster needs {', '.join(missing)} (not found on PATH or in {_SBIN}); "
                f"install iproute2 (ip, tc) and util-linux (unshare), e.g. apt-get install iproute2 util-linux")
    return None


def rate_bytes(rate: str) -> float:
    """A tc rate ('1gbit', '100mbit', '125mbps') in bytes per second."""
    m = _RATE.fullmatch(rate.strip())
    if not m:
        raise ClusterError(f"rate {rate!r} is not a tc rate; write e.g. 1gbit, 100mbit or 10gbit")
    value, unit = float(m.group(1)), m.group(2).lower()
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[unit[0] if unit[0] in "kmgt" else ""]
    return value * scale / (8 if unit.endswith("bit") else 1)


def _check_delay(delay: str) -> str:
    if not _DELAY.fullmatch(delay.strip()):
        raise ClusterError(f"delay {delay!r} is not a tc time; write e.g. 100us, 1ms or 0.5ms")
    return delay.strip()


def _cgroup_mounts() -> list[str]:
    """Shell commands that mount the cgroup file systems as this process
    sees them below /sys/fs/cgroup (tmpfs, v1 hierarchies, cgroup2)."""
    cmds = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return cmds
    skip = {"rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec", "xattr", "clone_children"}
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        where, kind, opts = fields[4], rest[0], rest[2].split(",")
        if where != "/sys/fs/cgroup" and not where.startswith("/sys/fs/cgroup/"):
            continue
        q = shlex.quote(where)
        if kind == "tmpfs":
            cmds.append(f"mount -t tmpfs -o mode=755 tmpfs {q}")
        elif kind == "cgroup":
            keep = ",".join(o for o in opts if o not in skip and not o.startswith("release_agent=")) or "none"
            cmds.append(f"mkdir -p {q} && mount -t cgroup -o {shlex.quote(keep)} cgroup {q}")
        elif kind == "cgroup2":
            cmds.append(f"mkdir -p {q} && mount -t cgroup2 cgroup2 {q}")
    return cmds


def node_init() -> str:
    """What a process started on a node runs first (``$0`` is the node's
    name): `ip netns exec` mounts a fresh /sys, so that /sys/class/net shows
    the node's links, and that hides the cgroup file systems below it, which
    slurmd needs; mount them again (private to the process's mount
    namespace), then take the node's host name."""
    mounts = " ; ".join(f"{{ {c} ; }} 2>/dev/null" for c in _cgroup_mounts())
    return (f"{{ {mounts} ; }} ; " if mounts else "") + 'hostname "$0"'


def _run(argv, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=_path())
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and r.returncode != 0:
        raise ClusterError(f"`{shlex.join(map(str, argv))}` failed with status {r.returncode}: "
                           f"{(r.stderr or r.stdout).strip()}")
    return r


@dataclass
class Node:
    index: int
    name: str        # network namespace, host name and /etc/hosts name
    addr: str        # IPv4 address on the cluster's /24
    dev: str         # the link's end inside the node
    port: str        # the link's end on the bridge (in the switch namespace)


class EmulatedCluster:
    """``nodes`` nodes (2 to 8) named ``PREFIXn0 ...``; links shaped to
    ``rate`` (a tc rate: '1gbit', '100mbit'; None = unshaped) and ``delay``
    (a tc time, one way per link end: '1ms'; None = none).  Use it as a
    context manager (``up()`` on entry, ``down()`` on exit, also after an
    error)."""

    def __init__(self, nodes: int = 2, rate: str | None = None, delay: str | None = None,
                 prefix: str | None = None, state_root: Path | str | None = None,
                 hosts_file: Path | str | None = None):
        if not isinstance(nodes, int) or not MIN_NODES <= nodes <= MAX_NODES:
            raise ClusterError(f"nodes={nodes!r}: an emulated cluster has {MIN_NODES} to {MAX_NODES} nodes")
        prefix = prefix or f"hc{os.getpid()}"
        if not _NAME.fullmatch(prefix):
            raise ClusterError(f"cluster name {prefix!r}: use 1 to 10 lower-case letters and digits, starting "
                               f"with a letter (it prefixes interface names, which the kernel limits to 15 "
                               f"characters)")
        if rate is not None:
            rate_bytes(rate)
        if delay is not None:
            _check_delay(delay)
        self.prefix = prefix
        self.count = nodes
        self.rate, self.delay = rate, delay
        self.state_root = Path(state_root) if state_root else STATE_ROOT
        self.hosts_file = Path(hosts_file) if hosts_file else HOSTS_FILE
        self.switch = f"{prefix}-sw"
        self.bridge = f"{prefix}-br"
        self.subnet: str | None = None
        self.nodes: list[Node] = []
        self.made: list[dict] = []
        self.is_up = False

    # ------------------------------------------------------------ state file
    @property
    def dir(self) -> Path:
        return self.state_root / self.prefix

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def exec_script(self) -> Path:
        return self.dir / "node-exec"

    def _save(self):
        state = {"name": self.prefix, "nodes": [asdict(n) for n in self.nodes], "subnet": self.subnet,
                 "switch": self.switch, "bridge": self.bridge, "rate": self.rate, "delay": self.delay,
                 "made": self.made, "up": self.is_up, "pid": os.getpid(), "time": time.time()}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_file)

    @classmethod
    def attach(cls, name: str | None = None, state_root: Path | str | None = None) -> "EmulatedCluster":
        """The cluster ``name`` that is up (made by this or another process),
        from its state file; without a name, the only one that is up."""
        root = Path(state_root) if state_root else STATE_ROOT
        if name is None:
            names = list_clusters(root)
            if len(names) != 1:
                raise ClusterError("no emulated cluster is up (start one with hpcnn cluster up)" if not names
                                   else f"several emulated clusters are up ({', '.join(names)}); name one "
                                        f"with --name")
            name = names[0]
        f = root / name / "state.json"
        try:
            state = json.loads(f.read_text())
        except FileNotFoundError:
            raise ClusterError(f"no emulated cluster named {name!r} ({f} does not exist); "
                               f"`hpcnn cluster status` lists those that are up") from None
        except (OSError, ValueError) as exc:
            raise ClusterError(f"cannot read the state of cluster {name!r} from {f}: {exc}") from None
        c = cls(max(MIN_NODES, len(state["nodes"]) or MIN_NODES), state.get("rate"), state.get("delay"),
                prefix=state["name"], state_root=root)
        c.nodes = [Node(**n) for n in state["nodes"]]
        c.count = len(c.nodes) or c.count
        c.subnet = state.get("subnet")
        c.made = list(state.get("made", []))
        c.is_up = bool(state.get("up"))
        return c

    # ------------------------------------------------------------ up / down
    def __enter__(self) -> "EmulatedCluster":
        self.up()
        return self

    def __exit__(self, *exc):
        self.down()
        return False

    def up(self) -> "EmulatedCluster":
        """Make the namespaces, links, bridge, /etc/hosts lines and launcher
        script, and shape the links.  On any failure everything made so far
        is removed and ClusterError says what failed."""
        if self.is_up:
            return self
        reason = unavailable()
        if reason:
            raise ClusterError(reason)
        self.state_root.mkdir(parents=True, exist_ok=True)
        try:
            self.dir.mkdir()
        except FileExistsError:
            raise ClusterError(f"an emulated cluster named {self.prefix!r} exists already ({self.state_file}); "
                               f"remove it with `hpcnn cluster down --name {self.prefix}` or choose "
                               f"another name") from None
        try:
            with _lock(self.state_root):
                self.subnet = self._pick_subnet()
                base = self.subnet.rsplit(".", 1)[0]
                p = self.prefix
                # node names without '-': Hydra's parser of Slurm node lists rejects them
                self.nodes = [Node(i, f"{p}n{i}", f"{base}.{i + 1}", f"{p}-{i}", f"{p}-{i}s")
                              for i in range(self.count)]
                self._save()          # the subnet is taken from here on
            for ns in [self.switch] + [n.name for n in self.nodes]:
                self.made.append({"netns": ns})
                self._save()
                _run(["ip", "netns", "add", ns])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            sw = self.switch
            _run(["ip", "-n", sw, "link", "add", self.bridge, "type", "bridge"])
            _run(["ip", "-n", sw, "link", "set", self.bridge, "up"])
            for n in self.nodes:
                _run(["ip", "link", "add", n.dev, "netns", n.name, "type", "veth", "peer", "name", n.port,
                      "netns", sw])
                _run(["ip", "-n", sw, "link", "set", n.port, "master", self.bridge])
                _run(["ip", "-n", sw, "link", "set", n.port, "up"])
                _run(["ip", "-n", n.name, "addr", "add", f"{n.addr}/24", "dev", n.dev])
                _run(["ip", "-n", n.name, "link", "set", n.dev, "up"])
            lines = [f"{n.addr}\t{n.name}\t{MARK}{self.prefix}" for n in self.nodes]
            self.made.append({"hosts": str(self.hosts_file)})
            self._save()
            _edit_hosts(self.hosts_file, self.prefix, add=lines, lock_dir=self.state_root)
            self._write_exec_script()
            self.shape(self.rate, self.delay)
            self.is_up = True
            self._save()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> list[str]:
        """Remove everything this cluster made (recorded in its state file):
        end the processes in its namespaces, delete the namespaces (which
        removes the links and the bridge), drop its /etc/hosts lines and its
        state directory.  Idempotent; returns what was removed."""
        removed = []
        for item in reversed(self.made):
            if "netns" in item:
                ns = item["netns"]
                self._kill_ns(ns)
                if _run(["ip", "netns", "del", ns], check=False).returncode == 0:
                    removed.append(f"netns {ns}")
            elif "hosts" in item:
                n = _edit_hosts(Path(item["hosts"]), self.prefix, add=[], lock_dir=self.state_root)
                if n:
                    removed.append(f"{n} line(s) of {item['hosts']}")
        self.made = []
        self.is_up = False
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
            removed.append(f"state {self.dir}")
        return removed

    def _pick_subnet(self) -> str:
        """10.X.Y.0/24 from the name's hash, skipping subnets that another
        cluster's state, /etc/hosts or this machine's addresses use."""
        used = set()
        for name in list_clusters(self.state_root):
            try:
                used.add(json.loads((self.state_root / name / "state.json").read_text()).get("subnet"))
            except (OSError, ValueError):
                pass
        text = ""
        try:
            text = self.hosts_file.read_text()
        except OSError:
            pass
        text += _run(["ip", "-4", "addr"], check=False).stdout + _run(["ip", "-4", "route"], check=False).stdout
        used |= {f"10.{a}.{b}.0/24" for a, b in re.findall(r"\b10\.(\d+)\.(\d+)\.\d+", text)}
        h = int.from_bytes(hashlib.sha256(self.prefix.encode()).digest()[:4], "big")
        for k in range(128 * 256):
            v = (h + k) % (128 * 256)
            subnet = f"10.{100 + v // 256}.{v % 256}.0/24"
            if subnet not in used:
                return subnet
        raise ClusterError("no free 10.X.Y.0/24 subnet for the emulated cluster")

    def _write_exec_script(self):
        """Hydra's ssh launcher runs ``SCRIPT [ssh options] HOST COMMAND...``
        and expects COMMAND to be run by a shell on HOST; this script runs it
        in HOST's namespace under HOST's name."""
        names = " ".join(n.name for n in self.nodes)
        text = f"""#!/bin/sh
# Written by hpcnn.cluster for the emulated cluster {self.prefix}: Hydra's ssh
# launcher calls "$0 [ssh options] HOST COMMAND..."; run COMMAND (a shell
# command line, as ssh would) on HOST, one of: {names}
while [ $# -gt 0 ]; do
    case "$1" in
        -[bcDEeFIiJLlmOopQRSWw]) shift 2 ;;
        -*) shift ;;
        *) break ;;
    esac
done
host=$1
shift
case " {names} " in
    *" $host "*) ;;
    *) echo "hpcnn cluster {self.prefix}: '$host' is not a node of this cluster ({names})" >&2; exit 255 ;;
esac
PATH="$PATH:{_SBIN}"
exec ip netns exec "$host" unshare --uts sh -c {shlex.quote(node_init() + ' && eval "exec $1"')} "$host" "$*"
"""
        self.exec_script.write_text(text)
        self.exec_script.chmod(0o755)

    def _kill_ns(self, ns: str, sig=signal.SIGKILL) -> list[int]:
        """Kill every process in network namespace ``ns`` (they can only be
        this cluster's: the namespace is its own)."""
        killed = []
        for _ in range(20):
            r = _run(["ip", "netns", "pids", ns], check=False)
            pids = [int(p) for p in r.stdout.split() if p.isdigit() and int(p) != os.getpid()]
            if r.returncode != 0 or not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        return sorted(set(killed))

    # ------------------------------------------------------------ nodes
    def node(self, which) -> Node:
        """A node by index or name."""
        self._require_up()
        for n in self.nodes:
            if which == n.index or which == n.name:
                return n
        raise ClusterError(f"no node {which!r} in cluster {self.prefix} (nodes: "
                           f"{', '.join(n.name for n in self.nodes)}, or 0..{len(self.nodes) - 1})")

    @property
    def hostnames(self) -> list[str]:
        return [n.name for n in self.nodes]

    def _require_up(self):
        if not self.is_up and not self.nodes:
            raise ClusterError(f"cluster {self.prefix} is not up; call up() (or hpcnn cluster up) first")

    def exec_argv(self, node, argv) -> list[str]:
        """``argv`` run on ``node``: in its network namespace, with its host
        name (a UTS namespace of its own)."""
        n = self.node(node)
        return ["ip", "netns", "exec", n.name, "unshare", "--uts", "sh", "-c", node_init() + ' && exec "$@"',
                n.name, *[str(a) for a in argv]]

    def kill_node(self, node, ranks_only: bool = False) -> list[int]:
        """SIGKILL every process running on ``node`` (in its namespace), or
        with ``ranks_only`` just its MPI ranks (processes with a rank from
        a launcher in their environment, not the launcher's own daemons);
        returns their process ids."""
        if not ranks_only:
            return self._kill_ns(self.node(node).name)
        pids = self.ranks(node)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def ranks(self, node) -> list[int]:
        """Process ids of the MPI ranks running on ``node``: processes whose
        environment holds a rank given by a launcher (Hydra's PMI_RANK,
        PMIx, Open MPI or Slurm's srun)."""
        out = []
        for pid in self.processes(node):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(e.startswith(_RANK_VARS) for e in env):
                out.append(pid)
        return out

    def processes(self, node) -> list[int]:
        r = _run(["ip", "netns", "pids", self.node(node).name], check=False)
        return [int(p) for p in r.stdout.split() if p.isdigit()]

    # ------------------------------------------------------------ links
    def set_link(self, node, up: bool):
        """Bring ``node``'s link up or down at the switch (like a cable
        pulled out: the node's end loses its carrier and packets vanish)."""
        n = self.node(node)
        _run(["ip", "-n", self.switch, "link", "set", n.port, "up" if up else "down"])

    def link_up(self, node) -> bool:
        n = self.node(node)
        r = _run(["ip", "-n", self.switch, "-j", "link", "show", "dev", n.port], check=False)
        try:
            return "UP" in json.loads(r.stdout)[0]["flags"]
        except (ValueError, IndexError, KeyError):
            return False

    def link_bytes(self) -> dict[str, dict[str, int]]:
        """Per node, the bytes its link sent (tx) and received (rx), read
        from the kernel's counters of the node's end (``ip -s link``)."""
        self._require_up()
        out = {}
        for n in self.nodes:
            r = _run(["ip", "-n", n.name, "-j", "-s", "link", "show", "dev", n.dev])
            stats = json.loads(r.stdout)[0]["stats64"]
            out[n.name] = {"tx": int(stats["tx"]["bytes"]), "rx": int(stats["rx"]["bytes"])}
        return out

    def shape(self, rate: str | None = None, delay: str | None = None):
        """Shape every link, both directions: ``rate`` with a token bucket
        (tbf), ``delay`` with netem (the delay applies at each end, so a
        round trip between two nodes takes 4 x delay); both None = unshaped."""
        self._require_up()
        if rate is not None:
            rate_bytes(rate)
        if delay is not None:
            delay = _check_delay(delay)
        tbf = []
        if rate is not None:
            # the bucket holds 100 us of traffic and at least 64 KiB (a GSO
            # packet): tbf's watchdog is a high-resolution timer, so a bucket
            # that small keeps the rate (1 MiB and 64 MiB messages both at
            # 119 MB/s at 1gbit, about 1.1 GB/s at 10gbit), where one of
            # 4 ms let every message up to 0.5 MB (1gbit) or 5 MB (10gbit)
            # through at once after a pause -- a link no switch has
            burst = max(64 * 1024, int(rate_bytes(rate) * 1e-4))
            tbf = ["tbf", "rate", rate, "burst", str(burst), "latency", "100ms"]
        ends = [(ns, dev) for n in self.nodes for ns, dev in ((n.name, n.dev), (self.switch, n.port))]
        try:
            for ns, dev in ends:
                _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
                if delay is not None:
                    _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem",
                          "delay", delay, "limit", "100000"])
                    if tbf:
                        _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", *tbf])
                elif tbf:
                    _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *tbf])
        except ClusterError as exc:
            # all or nothing: the links as they were (or unshaped)
            previous = (self.rate, self.delay)
            for ns, dev in ends:
                _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
            self.rate = self.delay = None
            now = "unshaped"
            if previous != (None, None) and previous != (rate, delay):
                try:
                    self.shape(*previous)
                    now = "shaped as before (" + ", ".join(f"{k} {v}" for k, v in zip(("rate", "delay"), previous)
                                                           if v) + ")"
                except ClusterError:
                    pass
            if self.dir.exists():
                self._save()
            if "netem" in str(exc) and "unknown" in str(exc):
                raise ClusterError(f"this kernel has no netem queueing discipline (CONFIG_NET_SCH_NETEM, module "
                                   f"sch_netem), so a link delay cannot be emulated here; shape the rate only "
                                   f"(the links are {now})") from None
            raise ClusterError(f"{exc} (the links are {now})") from None
        self.rate, self.delay = rate, delay
        if self.dir.exists():
            self._save()

    def qdiscs(self) -> dict[str, str]:
        """What tc says about each node's end of its link."""
        return {n.name: _run(["tc", "-n", n.name, "qdisc", "show", "dev", n.dev], check=False).stdout.strip()
                for n in self.nodes}

    # ------------------------------------------------------------ MPI jobs
    def mpiexec(self) -> str:
        exe = find_mpiexec()
        if exe is None:
            raise ClusterError("no mpiexec found: install MPICH (pip install mpich), whose Hydra launcher "
                               "the emulated cluster uses")
        r = _run([exe, "--version"], check=False, timeout=30)
        if "hydra" not in (r.stdout + r.stderr).lower():
            raise ClusterError(f"{exe} is not MPICH's Hydra (its --version does not say so); the emulated "
                               f"cluster needs Hydra's ssh launcher: pip install mpich")
        return exe

    def placement(self, n: int, ppn: int | None = None) -> tuple[int, list[str]]:
        """ranks per node and the nodes used for ``n`` ranks."""
        if n < 1:
            raise ClusterError(f"n={n}: a job needs at least one rank")
        ppn = ppn or math.ceil(n / len(self.nodes))
        need = math.ceil(n / ppn)
        if need > len(self.nodes):
            raise ClusterError(f"{n} ranks at {ppn} per node need {need} nodes, but cluster {self.prefix} has "
                               f"{len(self.nodes)}; raise --ppn or make a bigger cluster")
        return ppn, self.hostnames[:need]

    def job_env(self, env: dict | None = None) -> dict:
        """The environment of a job's launcher and ranks: this one, with
        this hpcnn importable, this Python's directory first on PATH (a
        virtual environment's programs), the cluster's MPI settings and
        ``env``."""
        e = child_env(**MPI_ENV)
        bindir = str(Path(sys.executable).parent)
        e["PATH"] = os.pathsep.join([bindir, e.get("PATH", "/usr/bin:/bin")])
        if sys.prefix != sys.base_prefix:
            e.setdefault("VIRTUAL_ENV", sys.prefix)
        e.update({k: str(v) for k, v in (env or {}).items()})
        return e

    def mpiexec_argv(self, n: int, argv, ppn: int | None = None, env: dict | None = None,
                     mpiexec_args=()) -> list[str]:
        """The command line (to run from this machine's root namespace) that
        starts ``argv`` as ``n`` MPI ranks, ``ppn`` per node (default: as
        few per node as fit), Hydra running on node 0."""
        ppn, hosts = self.placement(n, ppn)
        e = self.job_env(env)
        genv = []
        for k in ["PATH", "PYTHONPATH", *MPI_ENV, *(env or {})]:
            if k in e:
                genv += ["-genv", k, e[k]]
        cmd = [self.mpiexec(), "-launcher", "ssh", "-launcher-exec", str(self.exec_script),
               "-hosts", ",".join(hosts), "-n", str(n), "-ppn", str(ppn), *genv, *mpiexec_args,
               *[str(a) for a in argv]]
        return self.exec_argv(0, cmd)

    def popen(self, n: int, argv, ppn: int | None = None, env: dict | None = None, cwd=None,
              **kw) -> subprocess.Popen:
        """Start an MPI job across the nodes (see mpiexec_argv); its own
        process group, so that it can be ended as a whole."""
        cmd = self.mpiexec_argv(n, argv, ppn=ppn, env=env)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(cmd, env=self.job_env(env), cwd=cwd, text=True, start_new_session=True, **kw)

    def run(self, argv, n: int, ppn: int | None = None, env: dict | None = None, timeout: float | None = None,
            cwd=None, capture: bool = True) -> subprocess.CompletedProcess:
        """Run an MPI job across the nodes and wait for it; after
        ``timeout`` seconds its processes are killed and ClusterError says
        so (with what it printed)."""
        kw = {} if capture else {"stdout": None, "stderr": None}
        p = self.popen(n, argv, ppn=ppn, env=env, cwd=cwd, **kw)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(p)
            out, err = p.communicate()
            raise ClusterError(f"`{shlex.join(map(str, argv))}` on {n} ranks did not end within {timeout:.0f} s; "
                               f"killed.\n--- stdout ---\n{(out or '')[-3000:]}\n--- stderr ---\n"
                               f"{(err or '')[-3000:]}") from None
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def check(self, nbytes: int = 16 << 20, ppn: int = 1, timeout: float = 120, env: dict | None = None) -> dict:
        """Prove that ranks on different nodes talk over the emulated link:
        run ``hpcnn.cluster.probe`` on every node (``ppn`` ranks each), in
        which rank 0 and a rank on node 1 send each other ``nbytes``, and
        read the link counters of nodes 0 and 1 around it.  Returns the
        probe's report (every rank's host, node-local rank, ranks per node
        and BLAS threads) with ``link`` (bytes each node's link sent and
        received during the job) and ``mb_per_s``; ``env`` goes to the
        ranks (on top of the cluster's MPI settings).  Raises ClusterError when
        the links carried less than the bytes sent (the data took another
        path, e.g. shared memory)."""
        from hpcnn.cluster.probe import TAG
        n = ppn * len(self.nodes)
        before = self.link_bytes()
        r = self.run([sys.executable, "-m", "hpcnn.cluster.probe", str(nbytes)], n=n, ppn=ppn, env=env,
                     timeout=timeout)
        after = self.link_bytes()
        lines = [line for line in r.stdout.splitlines() if line.startswith(TAG)]
        if r.returncode != 0 or not lines:
            raise ClusterError(f"the probe job failed (status {r.returncode}):\n{r.stdout[-3000:]}\n"
                               f"{r.stderr[-3000:]}")
        rep = json.loads(lines[-1][len(TAG):])
        rep["link"] = {k: {d: after[k][d] - before[k][d] for d in ("tx", "rx")} for k in after}
        n0, n1 = self.nodes[0].name, self.nodes[1].name
        rep["mb_per_s"] = 2 * rep["bytes"] / rep["seconds"] / 1e6 if rep.get("seconds") else None
        carried = min(rep["link"][n0]["tx"], rep["link"][n0]["rx"], rep["link"][n1]["tx"], rep["link"][n1]["rx"])
        if rep["peer"] is None or carried < rep["bytes"]:
            raise ClusterError(
                f"ranks on {n0} and {n1} exchanged {rep['bytes']:,d} bytes each way but the links carried "
                f"{carried:,d} (per node: {rep['link']}): the messages did not cross the emulated link. "
                f"MPICH's UCX must use TCP only (UCX_TLS={MPI_ENV['UCX_TLS']}), or it treats the nodes as one "
                f"host and uses shared memory")
        return rep

    # ------------------------------------------------------------ reports
    def status(self) -> dict:
        self._require_up()
        nbytes = self.link_bytes()
        return {"name": self.prefix, "subnet": self.subnet, "rate": self.rate, "delay": self.delay,
                "nodes": [{"name": n.name, "addr": n.addr, "link": "up" if self.link_up(n.index) else "down",
                           "processes": len(self.processes(n.index)), **nbytes[n.name]} for n in self.nodes]}

    def describe(self) -> str:
        s = self.status()
        shaped = ", ".join(x for x in (s["rate"] and f"rate {s['rate']}", s["delay"] and f"delay {s['delay']}")
                           if x) or "unshaped"
        lines = [f"cluster {s['name']}: {len(s['nodes'])} nodes on {s['subnet']}, links {shaped}"]
        for n in s["nodes"]:
            lines.append(f"  {n['name']:14s} {n['addr']:15s} link {n['link']:4s} tx {n['tx']:>14,d} B  "
                         f"rx {n['rx']:>14,d} B  {n['processes']} process(es)")
        return "\n".join(lines)


def list_clusters(state_root: Path | str | None = None) -> list[str]:
    """Names of the clusters whose state lies under ``state_root``."""
    root = Path(state_root) if state_root else STATE_ROOT
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "state.json").exists() and _NAME.fullmatch(p.name))


class _lock:
    """An exclusive lock file in ``dir`` (subnet choice, /etc/hosts edits)."""

    def __init__(self, dir: Path):
        self.path = Path(dir) / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _edit_hosts(path: Path, prefix: str, add: list[str], lock_dir: Path) -> int:
    """Drop the lines marked for cluster ``prefix`` from ``path`` and append
    ``add``; in place (/etc/hosts may be a bind mount that cannot be
    replaced).  Returns the number of lines dropped."""
    mark = f"{MARK}{prefix}"
    with _lock(lock_dir):
        try:
            f = open(path, "r+")
        except FileNotFoundError:
            if not add:
                return 0
            f = open(path, "w+")
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            lines = f.read().splitlines()
            keep = [line for line in lines if not line.rstrip().endswith(mark)]
            dropped = len(lines) - len(keep)
            if dropped == 0 and not add:
                return 0
            f.seek(0)
            f.truncate()
            f.write("\n".join(keep + add) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return dropped


def _kill_group(p: subprocess.Popen):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
