"""``hpcnn ckpt inspect FILE``: what a checkpoint holds."""
from __future__ import annotations

import sys


def add_arguments(p):
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    sp = sub.add_parser("inspect", help="print a checkpoint's metadata and tensors")
    sp.add_argument("file", help="checkpoint file (ckpt-<step>.h5)")
    sp = sub.add_parser("list", help="list the checkpoints of a directory, oldest first")
    sp.add_argument("dir")


def run(args) -> int:
    from hpcnn.checkpoint import CheckpointError, inspect, list_checkpoints, read_meta
    try:
        if args.action == "inspect":
            print(inspect(args.file))
        else:
            for p in list_checkpoints(args.dir):
                m = read_meta(p)
                print(f"{p}  step {m.get('step')}  epoch {m.get('epoch')}  world {m.get('world')}")
    except CheckpointError as exc:
        print(f"hpcnn ckpt: {exc}", file=sys.stderr)
        return 1
    return 0
