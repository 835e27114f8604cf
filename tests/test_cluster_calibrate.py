"""``hpcnn calibrate`` across nodes (issue 10, part 4).

Anywhere: a launch that cannot measure across nodes (no such cluster, one
host, every rank on one node) is a clear error before anything is timed.

As root, on an emulated cluster of two nodes (2 ranks on each):
- the calibrated inter-node bandwidth is the shaped rate (within 20%) at
  1 Gbit/s and at 100 Mbit/s, the bytes crossed the links, the intra-node
  link is measured on a node, and the file records the node count, ranks
  per node, node names and this hpcnn's cost-model version, with the
  collectives hpcnn uses;
- a plan or a job on another layout than the calibrated one says so at
  start; on the calibrated layout it does not;
- the path for a real cluster, ``--hosts A,B`` (MPICH's mpiexec), run from
  node 0 with Hydra's ssh replaced by the cluster's node launcher, measures
  the same layout and link.

Root only (skipped, with the reason, otherwise)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hpcnn.cluster import EmulatedCluster, unavailable
from hpcnn.cluster.emulated import rate_bytes
from hpcnn.strategy.machine import COST_MODEL_VERSION, load_machine
from mpi_launch import ROOT, mpi_env

PY = sys.executable
#: what the issue asks of the calibrated inter-node bandwidth against the shaping
WITHIN = 0.20
#: the quick part of hpcnn calibrate: one small model's tiles, no time budget, no runtime figures
QUICK = ["--model", "lenet5", "--ranks", "1", "--batch", "4", "--repeats", "1", "--budget", "0", "--no-runtime"]


def calibrate(out, *argv, timeout=300):
    return subprocess.run([PY, "-m", "hpcnn", "calibrate", *QUICK, "-o", str(out), *argv], cwd=ROOT,
                          env=mpi_env(), capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------- anywhere
@pytest.mark.parametrize("argv,msg", [
    (["--cluster", "nosuch"], "--cluster nosuch: no emulated cluster named 'nosuch'"),
    (["--hosts", "onlyone"], "--hosts onlyone: name at least two nodes"),
    (["--launcher", "mpiexec -n 2"], "the launcher started every rank on one node"),
    (["--link-max-mib", "0.5"], "--link-max-mib must be at least 1"),
])
def test_a_launch_that_cannot_cross_nodes_is_a_clear_error(tmp_path, argv, msg):
    if argv[0] == "--launcher":
        argv = ["--launcher", f"{os.path.join(os.path.dirname(PY), 'mpiexec')} -n 2"]
    r = calibrate(tmp_path / "m.json", *argv, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "m.json").exists()           # before the tiles: nothing written


# --------------------------------------------------------------- two nodes, root
@pytest.fixture(scope="module")
def cluster():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with EmulatedCluster(2, rate="1gbit", prefix=f"hk{os.getpid()}") as c:
        yield c


def calibrate_on(cluster, out, *argv):
    before = cluster.link_bytes()
    r = calibrate(out, "--cluster", cluster.prefix, *argv)
    after = cluster.link_bytes()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r, {k: after[k]["tx"] - before[k]["tx"] for k in after}


@pytest.fixture(scope="module")
def calibrated(cluster, tmp_path_factory):
    """A machine file calibrated on the cluster at 1 Gbit/s (and what the
    links carried meanwhile)."""
    out = tmp_path_factory.mktemp("calibrated") / "cluster.json"
    cluster.shape("1gbit")
    r, moved = calibrate_on(cluster, out)
    print(r.stdout)
    return out, moved


def check_calibrated(cluster, path, rate):
    m = load_machine(path)
    assert (m.nodes, m.ranks_per_node, m.hosts) == (2, 2, cluster.hostnames)
    assert m.cost_model_version == COST_MODEL_VERSION
    want = rate_bytes(rate)
    got = m.inter.bandwidth
    print(f"{rate}: inter-node {got / 1e6:.1f} MB/s (shaped {want / 1e6:.1f} MB/s), latency "
          f"{m.inter.latency * 1e6:.0f} us; intra-node {m.intra.bandwidth / 1e6:.0f} MB/s")
    assert abs(got / want - 1) <= WITHIN, f"inter-node bandwidth {got / 1e6:.1f} MB/s, shaped {want / 1e6:.1f} MB/s"
    figures = {f["figure"]: f for f in m.figures}
    for link in ("intra_node", "inter_node"):
        f = figures[f"links.{link}.bandwidth"]
        assert not f["assumed"] and f["value"] == getattr(m, link.split("_")[0]).bandwidth, f
    assert not any("NOT MEASURED" in f["source"] for f in m.figures)
    # the intra-node pair talks through no link: faster than the shaping
    assert m.intra.bandwidth > 2 * want
    for name in ("allreduce.intra_node", "allreduce.inter_node", "allreduce.all_ranks", "exchange.intra_node",
                 "exchange.inter_node", "alltoallv.all_ranks"):
        c = figures[f"collectives.{name}"]["value"]
        assert c["bandwidth"] > 0 and c["latency"] > 0 and len(c["seconds"]) >= 4, (name, c)
    # an allreduce between the nodes is bound by the link, as the cost model's term says
    across = figures["collectives.allreduce.inter_node"]["value"]
    assert abs(across["bus_bandwidth"] / want - 1) <= 0.5, across
    return m


def test_calibrated_inter_node_bandwidth_is_the_shaped_rate_at_1gbit(cluster, calibrated):
    path, moved = calibrated
    check_calibrated(cluster, path, "1gbit")
    # the measurement crossed the emulated link (a 4 MiB ping-pong alone moves more than this)
    assert min(moved.values()) > 16 << 20, moved


def test_calibrated_inter_node_bandwidth_is_the_shaped_rate_at_100mbit(cluster, tmp_path):
    cluster.shape("100mbit")
    try:
        r, moved = calibrate_on(cluster, tmp_path / "slow.json", "--link-max-mib", "2")
    finally:
        cluster.shape("1gbit")
    print(r.stdout)
    check_calibrated(cluster, tmp_path / "slow.json", "100mbit")
    assert min(moved.values()) > 8 << 20, moved


def test_another_layout_than_the_calibrated_one_is_named_at_start(cluster, calibrated, tmp_path):
    path, _ = calibrated
    plan = [PY, "-m", "hpcnn", "plan", "--model", "lenet5", "--batch", "8", "--machine", str(path)]
    r = subprocess.run(plan + ["--ranks", "4"], cwd=ROOT, env=mpi_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr      # 2 nodes x 2, as calibrated
    # a job across the nodes, 1 rank on each: the layout comes from MPI
    d = subprocess.run([PY, "-m", "hpcnn", "data", "digits", "-o", str(tmp_path / "digits.h5")], cwd=ROOT,
                       env=mpi_env(), capture_output=True, text=True, timeout=120)
    assert d.returncode == 0, d.stderr
    args = [PY, "-m", "hpcnn", "train", str(ROOT / "jobs" / "digits.toml"), "--set", "log.progress='lines'",
            "--set", f"data.path='{tmp_path / 'digits.h5'}'", "--set", "data.test=''", "--set", "log.metrics=''",
            "--set", "checkpoint.dir=''", "--set", "train.max_steps=1", "--set", f"plan.machine='{path}'"]
    r = cluster.run(args, n=2, ppn=1, cwd=tmp_path, env=mpi_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    n0, n1 = cluster.hostnames
    lines = [line for line in r.stderr.splitlines() if "hpcnn: warning: machine file" in line]
    assert len(lines) == 1, r.stderr[-3000:]
    assert (f"calibrated on 2 nodes x 2 ranks ({n0}, {n1}), this job runs on 2 nodes x 1 rank" in lines[0]
            and "re-run hpcnn calibrate with the job's layout" in lines[0]), lines


def test_hosts_from_a_node_of_the_cluster(cluster, tmp_path):
    """`hpcnn calibrate --hosts n0,n1` as on a real cluster, started on node
    0; the ssh Hydra would use is the cluster's node launcher here."""
    cluster.shape("1gbit")
    e = cluster.job_env()
    extra = (f"-launcher ssh -launcher-exec {cluster.exec_script} -genv UCX_TLS {e['UCX_TLS']} "
             f"-genv PATH {e['PATH']} -genv PYTHONPATH {e['PYTHONPATH']}")
    out = tmp_path / "hosts.json"
    argv = cluster.exec_argv(0, [PY, "-m", "hpcnn", "calibrate", *QUICK, "-o", str(out), "--hosts",
                                 ",".join(cluster.hostnames), "--ppn", "2", "--mpiexec-args", extra])
    r = subprocess.run(argv, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"mpiexec on {', '.join(cluster.hostnames)} (2 ranks each)" in r.stdout, r.stdout
    check_calibrated(cluster, out, "1gbit")
