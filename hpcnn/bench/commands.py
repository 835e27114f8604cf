"""``hpcnn bench WHAT``: benchmarks.  Each WHAT lives in its own module
(add_arguments(parser), run(args) -> int), imported only when it runs."""
from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "kernels": ("hpcnn.bench.kernels", "conv layers and a ResNet-18 training step against PyTorch CPU"),
    "comm": ("hpcnn.bench.comm", "halo exchange and redistribution against a plain MPI Alltoallv"),
    "model": ("hpcnn.bench.model", "predicted against measured iteration time for several plans"),
    "search": ("hpcnn.bench.search", "strategy search time at 4 to 256 ranks"),
    "train": ("hpcnn.bench.train", "training throughput against PyTorch and PyTorch DDP"),
    "cluster": ("hpcnn.bench.cluster", "searched plan against the baselines on an emulated cluster, "
                                       "predicted against measured (root)"),
}

def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for name, (mod, help_) in BENCHES.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(_bench_module=mod)
        try:
            importlib.import_module(mod).add_arguments(sp)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
            sp.set_defaults(_missing=True)

def run(args) -> int:
    if getattr(args, "_missing", False):
        raise SystemExit(f"hpcnn bench {args.bench}: not available in this build")
    return importlib.import_module(args._bench_module).run(args)
