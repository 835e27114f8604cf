"""The ``hpcnn`` command.

Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only
when their subcommand runs, so ``hpcnn models`` does not start MPI.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "models": ("hpcnn.models.listing", "list the model zoo (parameters, FLOPs)"),
    "data": ("hpcnn.data.commands", "make HDF5 data sets (digits, convert, synth)"),
    "train": ("hpcnn.train", "train a job (launch with mpiexec or srun)"),
    "plan": ("hpcnn.plan_command", "search the per-layer parallel strategy"),
    "calibrate": ("hpcnn.calibration.command", "measure this machine's cost-model table"),
    "bench": ("hpcnn.bench.commands", "benchmarks against PyTorch and MPI"),
    "ckpt": ("hpcnn.checkpoint_command", "inspect HDF5 checkpoints"),
    "eval": ("hpcnn.evaluate", "test accuracy and loss of a checkpoint (any plan and rank count)"),
    "predict": ("hpcnn.predict", "logits of an ONNX model or a checkpoint for images (.npy or HDF5)"),
    "export": ("hpcnn.onnx_export", "write a trained checkpoint as an ONNX model"),
    "cluster": ("hpcnn.cluster.command", "an emulated multi-node cluster on this machine (root)"),
}


def build_parser() -> argparse.ArgumentParser:
    from hpcnn import __version__
    p = argparse.ArgumentParser(prog="hpcnn", description="Layer-wise parallel CNN training with MPI.")
    p.add_argument("--version", action="version", version=f"hpcnn {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(_module=mod)
        # subcommand arguments are added lazily (see main)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # find the subcommand to import only its module
    cmd = next((a for a in argv if not a.startswith("-")), None)
    if cmd not in COMMANDS:
        if cmd is None and not argv:
            parser.print_help()
            return 2
        parser.parse_args(argv)  # prints the error / help and exits
        return 2
    mod = importlib.import_module(COMMANDS[cmd][0])
    p = argparse.ArgumentParser(prog=f"hpcnn {cmd}", description=COMMANDS[cmd][1])
    mod.add_arguments(p)
    idx = argv.index(cmd)
    args = p.parse_args(argv[:idx] + argv[idx + 1:])
    return int(mod.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
