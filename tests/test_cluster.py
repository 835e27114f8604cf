"""The emulated cluster (hpcnn.cluster) and hpcnn across its nodes.

On a cluster of two nodes (network namespaces joined by a bridge, links
shaped to 1 Gbit/s), shared by the tests of this module:

- up/down: namespaces, links, host names, /etc/hosts lines and state made
  and removed exactly, also when making it fails half-way; no root, no
  cluster (the command says why);
- the link's byte counters show that ranks on two nodes talk over it, and
  the check fails when UCX is left to use shared memory;
- node-local logic (hpcnn's setup_node) sees the ranks of its node only: 2
  per node at 4 ranks, 1 per node at 2;
- the MPI equivalence suite (tests/mpi/: every exchange kind, halos across
  the node boundary, rank subsets) at 4 ranks, 2 per node, equals the
  sequential run (1e-9, float64), with traffic on the links;
- the README's default job trains across 2 nodes to the accuracy it reaches
  on one (>= 97%).

Root only (skipped, with the reason, otherwise)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpcnn.cluster import ClusterError, EmulatedCluster, list_clusters, unavailable
from mpi_launch import ROOT, mpi_env, run_mpi

PY = sys.executable
REASON = unavailable()
needs_root = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def cluster():
    if REASON:
        pytest.skip(REASON)
    with EmulatedCluster(2, rate="1gbit", prefix=f"ht{os.getpid()}") as c:
        yield c


def netns() -> set[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, env=dict(os.environ, PATH=os.environ["PATH"] + ":/usr/sbin:/sbin"))
    return {line.split()[0] for line in r.stdout.splitlines() if line.strip()}


def sent(before, after) -> dict:
    return {k: after[k]["tx"] - before[k]["tx"] for k in after}


# --------------------------------------------------------------- up / down
@needs_root
def test_up_makes_and_down_removes_exactly_what_it_made(tmp_path):
    name = f"hu{os.getpid()}"
    c = EmulatedCluster(3, rate="100mbit", prefix=name, state_root=tmp_path)
    with c:
        assert {f"{name}n0", f"{name}n1", f"{name}n2", f"{name}-sw"} <= netns()
        hosts = Path("/etc/hosts").read_text()
        for n in c.nodes:
            assert f"{n.addr}\t{n.name}\t# hpcnn-cluster:{name}" in hosts
            r = subprocess.run(c.exec_argv(n.index, ["hostname"]), capture_output=True, text=True)
            assert r.stdout.strip() == n.name, r
        assert "rate 100Mbit" in c.qdiscs()[c.nodes[0].name]
        # another process finds it by name
        assert list_clusters(tmp_path) == [name]
        same = EmulatedCluster.attach(name, state_root=tmp_path)
        assert [n.addr for n in same.nodes] == [n.addr for n in c.nodes]
        # the name is taken
        with pytest.raises(ClusterError, match="exists already"):
            EmulatedCluster(2, prefix=name, state_root=tmp_path).up()
        assert f"{name}n0" in netns()
    assert not {ns for ns in netns() if ns.startswith(name)}
    assert f"hpcnn-cluster:{name}" not in Path("/etc/hosts").read_text()
    assert not (tmp_path / name).exists()
    assert c.down() == []           # idempotent


@needs_root
def test_a_failure_half_way_up_removes_what_was_made(tmp_path):
    name = f"hf{os.getpid()}"
    bad_hosts = tmp_path / "no-such-dir" / "hosts"     # fails after the namespaces exist
    c = EmulatedCluster(2, prefix=name, state_root=tmp_path, hosts_file=bad_hosts)
    with pytest.raises(FileNotFoundError):
        c.up()
    assert not {ns for ns in netns() if ns.startswith(name)}
    assert not (tmp_path / name).exists()


def test_refuses_without_root_saying_why(tmp_path):
    """`hpcnn cluster up` as an unprivileged user: a message that says root
    is needed and why, exit status 2, nothing made."""
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PY, "-m", "hpcnn"]
    else:
        cmd = [PY, "-m", "hpcnn"]
    r = subprocess.run(cmd + ["cluster", "up", "--name", "hn"], capture_output=True, text=True, cwd=tmp_path,
                       env=mpi_env({"HPCNN_CLUSTER_STATE": str(tmp_path / "state")}), timeout=60)
    assert r.returncode == 2, r
    assert "needs root" in r.stderr and "network namespaces" in r.stderr and "run it as root" in r.stderr, r.stderr
    assert not (tmp_path / "state" / "hn").exists()


def test_bad_arguments_name_what_is_wrong():
    with pytest.raises(ClusterError, match="2 to 8 nodes"):
        EmulatedCluster(1)
    with pytest.raises(ClusterError, match="not a tc rate"):
        EmulatedCluster(2, rate="fast")
    with pytest.raises(ClusterError, match="lower-case letters"):
        EmulatedCluster(2, prefix="Bad-Name")


# --------------------------------------------------------------- traffic
def test_ranks_on_two_nodes_talk_over_the_link(cluster):
    rep = cluster.check(nbytes=8 << 20)
    assert [r["host"] for r in rep["ranks"]] == cluster.hostnames
    n0, n1 = cluster.hostnames
    for node in (n0, n1):
        assert rep["link"][node]["tx"] >= rep["bytes"] and rep["link"][node]["rx"] >= rep["bytes"], rep
    # 1 Gbit/s is 125 MB/s: a transfer cannot beat the shaping
    assert rep["mb_per_s"] < 125 * 1.05, rep


def test_the_check_fails_when_ucx_may_use_shared_memory(cluster):
    """The trap the check exists for: with all UCX transports allowed, the
    two namespaces look like one host and the bytes bypass the link."""
    with pytest.raises(ClusterError, match="did not cross the emulated link"):
        cluster.check(nbytes=8 << 20, env={"UCX_TLS": "all"})


def test_node_local_setup_sees_the_ranks_of_its_node(cluster):
    """hpcnn's setup_node across 2 nodes: at 4 ranks, 2 per node (node-local
    ranks 0 and 1 on each, the GPU each would use; the cores shared by 2);
    at 2 ranks, 1 per node with all the cores."""
    for ppn in (2, 1):
        rep = cluster.check(nbytes=1 << 16, ppn=ppn)
        by_node: dict = {}
        for r in rep["ranks"]:
            by_node.setdefault(r["host"], []).append(r)
            assert r["local_size"] == ppn, rep
            assert r["blas_threads"] == max(1, r["cores"] // ppn), rep
            # the launcher's node-local rank (what picks the GPU under mpiexec) agrees
            assert r["launcher_local_rank"] == r["local_rank"], rep
        assert sorted(by_node) == cluster.hostnames, rep
        for node, ranks in by_node.items():
            assert sorted(r["local_rank"] for r in ranks) == list(range(ppn)), rep


# --------------------------------------------------------------- hpcnn across the nodes
def test_mpi_equivalence_suite_across_two_nodes(cluster):
    """tests/mpi at 4 ranks, 2 per node: halos between ranks 1 and 2 cross
    the link (h4, w4), zigzag plans change layout on every edge, plans on
    rank subsets; every parameter, gradient and loss within 1e-9 of the
    sequential run."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "mpi").glob("test_*.py"))
    before = cluster.link_bytes()
    r = cluster.run([PY, "-m", "pytest", "-q", "--with-mpi", "-x", "--capture=tee-sys", "-p", "no:cacheprovider",
                     "--timeout=600", *files], n=4, ppn=2, cwd=ROOT, env=mpi_env(), timeout=900)
    moved = sent(before, cluster.link_bytes())
    tail = r.stdout[-5000:] + "\n--- stderr ---\n" + r.stderr[-3000:]
    assert r.returncode == 0, tail
    counts = [int(m) for m in re.findall(r"(?m)^(\d+) passed", r.stdout)]
    assert len(counts) == 4 and len(set(counts)) == 1 and counts[0] > 20, tail
    print(f"tests/mpi at 4 ranks on 2 nodes: {counts[0]} passed on every rank; links sent {moved} bytes")
    assert min(moved.values()) > 1 << 20, f"the links carried {moved} bytes"


def _accuracy(text: str) -> float:
    m = re.findall(r"final test accuracy (\d\.\d+)", text)
    assert m, text[-3000:]
    return float(m[-1])


def test_default_job_trains_across_two_nodes(cluster, tmp_path):
    """The README's default job (jobs/digits.toml on `hpcnn data digits`) at
    4 ranks, 2 per node, reaches the accuracy it reaches on one node."""
    r = subprocess.run([PY, "-m", "hpcnn", "data", "digits", "-o", "data/digits.h5"], cwd=tmp_path, env=mpi_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    args = [PY, "-m", "hpcnn", "train", str(ROOT / "jobs" / "digits.toml"), "--set", "log.progress='lines'"]
    before = cluster.link_bytes()
    two = cluster.run(args, n=4, ppn=2, cwd=tmp_path, env=mpi_env(), timeout=600)
    moved = sent(before, cluster.link_bytes())
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 rank(s) on this node" in two.stdout + two.stderr, two.stdout
    one = run_mpi(4, args + ["--no-resume", "--set", "checkpoint.dir=''", "--set", "log.metrics=''"], cwd=tmp_path,
                  timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "4 rank(s) on this node" in one.stdout + one.stderr, one.stdout
    a2, a1 = _accuracy(two.stderr), _accuracy(one.stderr)
    print(f"digits job: test accuracy {a2:.4f} on 2 nodes x 2 ranks, {a1:.4f} on 1 node x 4 ranks; "
          f"links sent {moved} bytes")
    assert a2 >= 0.97 and a1 >= 0.97, (a2, a1)
    assert abs(a2 - a1) <= 0.015, f"2 nodes {a2:.4f} against one node {a1:.4f}"
    assert min(moved.values()) > 1 << 20, f"the links carried {moved} bytes"
    assert list((tmp_path / "runs" / "digits" / "checkpoints").glob("ckpt-*.h5"))
