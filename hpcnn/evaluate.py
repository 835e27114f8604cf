"""``hpcnn eval JOB.toml --checkpoint F``: the test accuracy and loss of a
checkpoint, under any plan and rank count.

Launch in one process (``hpcnn eval ...``) or under ``mpiexec -n N``.  It is
the training job's own evaluation: every rank reads the job file, opens the
test split with the job's evaluation transform, builds the network,
rank 0 searches (or loads) the plan for this rank count, and every rank
reads only its own box of the checkpoint (a checkpoint written on 4 ranks
under one plan evaluates on 2 under another).  No trial steps, no training.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from hpcnn.job_errors import JobFailure, agree
from hpcnn.train import Trainer


def add_arguments(p):
    p.add_argument("job", help="the job file (TOML) that trained the checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="F",
                   help="a checkpoint file (ckpt-<step>.h5), or a directory: its newest checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a job key, e.g. --set data.test=val (repeatable)")
    p.add_argument("--plan", default=None, help="search, data-parallel or a plan JSON file (overrides plan.mode)")
    p.add_argument("--batch", type=int, default=None,
                   help="samples per evaluated batch (default: the job's micro-batch)")
    p.add_argument("-o", "--output", default=None, metavar="RESULT.json",
                   help="also write the result as JSON (accuracy, loss, samples, step, ...)")


class Evaluator(Trainer):
    """The Trainer's data, graph, plan and evaluation, with the model's
    parameters and statistics read from a checkpoint."""

    def open_data(self):
        from hpcnn.data.hdf5_dataset import HDF5Dataset
        from hpcnn.data.hdf5_format import DataError
        j = self.job
        if not j["data"]["test"]:
            raise JobFailure("data.test is '' (no evaluation split): name the group to evaluate, e.g. "
                             "--set data.test=test")
        self.accumulate = j["train"]["accumulate"]
        micro = j["train"]["batch"] // self.accumulate
        a = j["augment"]
        path = j.resolve(j["data"]["path"])

        def open_test():
            try:
                _, test_aug = self.augmentations()
            except ValueError as exc:
                raise DataError(str(exc)) from None
            return HDF5Dataset(path, j["data"]["test"], batch_size=micro, shuffle=False, drop_last=False,
                               dtype=np.dtype(j["job"]["dtype"]), transform=test_aug,
                               mean=a["mean"] or None, std=a["std"] or None)

        self.train_data = None
        self.test_data = agree(self.comm, open_test, (DataError, OSError))

    def load(self, path):
        """The model under this run's plan, filled from checkpoint ``path``
        (every rank reads its own boxes); the checkpoint's metadata."""
        from hpcnn.checkpoint import CheckpointError, load_checkpoint, read_meta
        from hpcnn.runtime.executor import DistributedModel
        j, g = self.job, self.graph

        def check():
            meta = read_meta(path)
            net = meta.get("network")
            if isinstance(net, dict):
                want = list(g[g.input_name].shape[1:])
                saved = list(net.get("input_shape", [None])[1:])
                classes = int(g[g.logits_name].shape[1])
                if saved != want or int(net.get("num_classes", classes)) != classes:
                    raise CheckpointError(
                        f"checkpoint {str(path)!r} holds a network for images {saved} and "
                        f"{net.get('num_classes')} classes, but this job's network takes {want} and "
                        f"{classes}: evaluate it with the job file that trained it")
            return meta

        agree(self.comm, check, (CheckpointError, OSError))
        self.model = DistributedModel(g, self.plan, self.comm, dtype=np.dtype(j["job"]["dtype"]),
                                      seed=j["job"]["seed"])

        def fill():
            try:
                return load_checkpoint(path, self.model)
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}; is it a checkpoint of this job's network? Evaluate it with "
                                      f"the job file that trained it") from None
        return agree(self.comm, fill, (CheckpointError, OSError))


def _checkpoint_path(given) -> Path:
    from hpcnn.checkpoint import CheckpointError, latest_checkpoint
    p = Path(given).expanduser()
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(f"directory {str(p)!r} holds no checkpoint (ckpt-<step>.h5)")
        return latest
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist: give a ckpt-<step>.h5 file "
                              f"or the job's checkpoint.dir")
    return p


def run(args) -> int:
    from mpi4py import MPI

    from hpcnn.checkpoint import CheckpointError
    from hpcnn.failsafe import abort_on_exception
    from hpcnn.job import Job, JobError

    comm = MPI.COMM_WORLD
    abort_on_exception(comm)
    rank = comm.Get_rank()
    # an evaluation searches (or loads) a plan for its rank count but times no
    # candidates, and neither writes nor resumes checkpoints
    overrides = list(args.set) + ["plan.trials=0", "checkpoint.dir=''", "log.metrics=''", "log.trace=''"]
    if args.plan:
        overrides.append(f"plan.mode={json.dumps(args.plan)}")
    if args.batch is not None:
        if args.batch < 1:
            if rank == 0:
                print(f"hpcnn eval: --batch must be a positive number of samples, got {args.batch}",
                      file=sys.stderr)
            return 2
        overrides += [f"train.batch={args.batch}", "train.accumulate=1"]
    try:
        path = agree(comm, lambda: _checkpoint_path(args.checkpoint), (CheckpointError,))
        job = agree(comm, lambda: Job.load(args.job, overrides), JobError)
        ev = Evaluator(job, comm)
        ev.open_data()
        ev.build_graph()
        ev.make_plan()
        meta = ev.load(path)
        t0 = time.perf_counter()
        acc, loss, count = ev.evaluate()
        seconds = time.perf_counter() - t0
    except JobFailure as exc:
        if rank == 0:
            print(f"hpcnn eval: {exc}", file=sys.stderr, flush=True)
        return exc.code
    ev.model.free()
    if rank == 0:
        result = {"checkpoint": str(path), "step": meta.get("step"), "model": ev.graph.name,
                  "split": job["data"]["test"], "samples": count, "accuracy": acc, "loss": loss,
                  "ranks": ev.world, "plan": ev.plan.name or job["plan"]["mode"], "seconds": seconds}
        score = (f"test accuracy {acc:.4f}, loss {loss:.4f}" if acc is not None else
                 f"test loss {loss:.4f} (mean squared error per target)")
        print(f"{path} (step {meta.get('step')}, {ev.graph.name}): {score} "
              f"on {count} samples of {job['data']['test']!r} ({ev.world} ranks, plan "
              f"{result['plan']}, {seconds:.1f} s)", flush=True)
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return 0
