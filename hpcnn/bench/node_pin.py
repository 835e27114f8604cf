"""``python -m hpcnn.bench.node_pin PREFIX COMMAND...``: run COMMAND on the
core of its emulated node.

On an emulated cluster (``hpcnn.cluster``) every node runs on the same
machine's cores, so a rank of one node competes with the ranks of the
others for them.  ``hpcnn bench cluster`` starts each rank through this
module: on node i of the cluster named PREFIX (host name ``PREFIXni``) the
process is bound to the i-th core this process may use (modulo their
number) and then becomes COMMAND.  Two nodes on a 2-core machine are then
two 1-core nodes: the ranks of one node share its core (hpcnn's node setup
sees one core and gives each rank one BLAS thread), and a node computes
as fast whatever the other does.  On another host (not a node of PREFIX)
COMMAND runs unbound.
"""
from __future__ import annotations

import os
import socket
import sys


def node_index(prefix: str, host: str) -> int | None:
    """The node number in ``host`` = PREFIXnI, else None."""
    head = prefix + "n"
    tail = host[len(head):]
    return int(tail) if host.startswith(head) and tail.isdigit() else None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: python -m hpcnn.bench.node_pin PREFIX COMMAND... (started by hpcnn bench cluster)",
              file=sys.stderr)
        return 2
    prefix, cmd = argv[0], argv[1:]
    i = node_index(prefix, socket.gethostname())
    if i is not None and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[i % len(cores)]})
    os.execvp(cmd[0], cmd)
    return 127


if __name__ == "__main__":
    sys.exit(main())
