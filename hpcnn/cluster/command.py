"""``hpcnn cluster up|run|down|status|check|shape|link|kill``: an emulated
cluster of several nodes on this machine (docs/cluster.md).

    hpcnn cluster up --nodes 2 --rate 1gbit            # prints the cluster's name
    hpcnn cluster check                                # ranks on two nodes talk over the link
    hpcnn cluster run -n 4 --ppn 2 -- hpcnn train jobs/digits.toml
    hpcnn cluster status
    hpcnn cluster down

The cluster outlives the command (its state is in /run/hpcnn-cluster/NAME);
``--name`` picks one when several are up.  Needs root.
"""
from __future__ import annotations

import argparse
import json
import sys

from hpcnn.cluster.emulated import MAX_NODES, MIN_NODES, STATE_ROOT, ClusterError, EmulatedCluster, list_clusters


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def named(sp):
        sp.add_argument("--name", default=None, help="the cluster (default: the only one that is up)")
        return sp

    up = sub.add_parser("up", help="make a cluster of network namespaces joined by a bridge")
    up.add_argument("--nodes", type=int, default=2, help=f"number of nodes, {MIN_NODES} to {MAX_NODES} (default 2)")
    up.add_argument("--rate", default=None, help="shape every link to this tc rate, e.g. 1gbit, 100mbit "
                                                 "(default: unshaped)")
    up.add_argument("--delay", default=None, help="add this one-way delay at each end of a link, e.g. 100us")
    up.add_argument("--name", default=None, help="its name, 1-10 lower-case letters/digits (default: hc<pid>); "
                                                 "it prefixes every namespace, link and host name")
    run = named(sub.add_parser("run", help="run a command as MPI ranks across the nodes (Hydra on node 0)"))
    run.add_argument("-n", type=int, required=True, help="number of ranks")
    run.add_argument("--ppn", type=int, default=None, help="ranks per node (default: as few as fit)")
    run.add_argument("--timeout", type=float, default=None, help="kill the job after this many seconds")
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    down = sub.add_parser("down", help="remove a cluster and everything it made")
    down.add_argument("--name", default=None, help="the cluster (default: the only one that is up)")
    down.add_argument("--all", action="store_true", help=f"remove every cluster recorded in {STATE_ROOT}")
    st = sub.add_parser("status", help="nodes, addresses, link state, byte counters, shaping")
    st.add_argument("--name", default=None, help="only this cluster (default: every one that is up)")
    st.add_argument("--json", action="store_true", help="print JSON")
    ck = named(sub.add_parser("check", help="prove that ranks on two nodes talk over the emulated link"))
    ck.add_argument("--mib", type=float, default=16, help="MiB sent each way (default 16)")
    ck.add_argument("--ppn", type=int, default=1, help="ranks per node (default 1)")
    sh = named(sub.add_parser("shape", help="change every link's rate and delay (none given: unshaped)"))
    sh.add_argument("--rate", default=None)
    sh.add_argument("--delay", default=None)
    ln = named(sub.add_parser("link", help="bring a node's link down or up (fault injection)"))
    ln.add_argument("node", help="node index or name")
    ln.add_argument("state", choices=["up", "down"])
    kl = named(sub.add_parser("kill", help="kill the processes on a node (fault injection)"))
    kl.add_argument("node", help="node index or name")
    kl.add_argument("--ranks-only", action="store_true", help="only its MPI ranks, not the launcher's daemons")


def _node(text: str):
    return int(text) if text.isdigit() else text


def run(args) -> int:
    try:
        return _run(args)
    except ClusterError as exc:
        print(f"hpcnn cluster {args.action}: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    a = args.action
    if a == "up":
        c = EmulatedCluster(args.nodes, rate=args.rate, delay=args.delay, prefix=args.name)
        c.up()
        print(c.describe())
        print(f"run jobs with: hpcnn cluster run --name {c.prefix} -n {2 * len(c.nodes)} --ppn 2 -- COMMAND\n"
              f"remove it with: hpcnn cluster down --name {c.prefix}")
        return 0
    if a == "down":
        names = list_clusters() if args.all else [args.name]
        if args.all and not names:
            print("no emulated cluster is up")
        for name in names:
            c = EmulatedCluster.attach(name)
            removed = c.down()
            print(f"cluster {c.prefix} removed: {', '.join(removed) or 'nothing was left'}")
        return 0
    if a == "status":
        names = [args.name] if args.name else list_clusters()
        states = [EmulatedCluster.attach(n).status() for n in names]
        if args.json:
            print(json.dumps(states, indent=1))
        elif not names:
            print("no emulated cluster is up (hpcnn cluster up makes one)")
        else:
            print("\n".join(EmulatedCluster.attach(n).describe() for n in names))
        return 0
    c = EmulatedCluster.attach(args.name)
    if a == "run":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not argv:
            raise ClusterError("no command given: hpcnn cluster run -n 4 --ppn 2 -- COMMAND [ARGS...]")
        return c.run(argv, n=args.n, ppn=args.ppn, timeout=args.timeout, capture=False).returncode
    if a == "check":
        rep = c.check(int(args.mib * (1 << 20)), ppn=args.ppn)
        for r in rep["ranks"]:
            print(f"rank {r['rank']}: node {r['host']}, node-local rank {r['local_rank']} of {r['local_size']} "
                  f"(launcher says {r['launcher_local_rank']}), {r['blas_threads']} BLAS thread(s)")
        moved = ", ".join(f"{k} tx {v['tx']:,d} B rx {v['rx']:,d} B" for k, v in rep["link"].items())
        print(f"rank 0 sent {rep['bytes']:,d} bytes to rank {rep['peer']} and got them back in "
              f"{rep['seconds']:.3f} s ({rep['mb_per_s']:.0f} MB/s); the links carried: {moved}")
        return 0
    if a == "shape":
        c.shape(args.rate, args.delay)
        print(c.describe())
        return 0
    if a == "link":
        c.set_link(_node(args.node), args.state == "up")
        print(c.describe())
        return 0
    if a == "kill":
        pids = c.kill_node(_node(args.node), ranks_only=args.ranks_only)
        print(f"killed {len(pids)} process(es) on {c.node(_node(args.node)).name}: {pids}")
        return 0
    raise ClusterError(f"unknown action {a}")
