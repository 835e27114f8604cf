"""Measure hpcnn's runtime on this machine with P ranks running at once:
what the runtime figures of jobs of P ranks on one node are fitted from
(``hpcnn.strategy.runtime_fit``, ``hpcnn.strategy.machine.RuntimeFigures``).

Everything here is collective over an mpi4py communicator of P ranks, and
every rank works at the same moment, so that what is measured is what a
training step of P ranks sees.  On a node with fewer cores than ranks (or
cores shared with other work) that differs a lot from one rank alone: ranks
share the cores, a rank waiting in MPI keeps polling, and every collective
or exchange costs scheduling time -- milliseconds rather than microseconds
-- because the ranks it waits for may not be running.

1. ``profile_tiles``: op tiles (``TileJob``), forward + backward through the
   op API, every rank running the same tile back to back at the same time
   (at least ~20 ms in all); the figure is the mean over ranks of the mean
   time per run: the compute a rank gets when all ranks compute.
2. ``measure_copy``: bytes per second of copying a tile into a region.
3. Training steps of the synthetic networks of
   ``runtime_fit.synthetic_networks``, run by hpcnn's own executor
   (``TimedNetwork``); ``runtime_fit.fit_samples`` fits the figures to them.

``Sampler`` takes the measurements in rounds (collective) and pools them;
``runtime_figures`` samples and fits.  ``measure_runtime`` (``hpcnn
calibrate``) starts ``mpiexec -n P python -m mpi4py -m
hpcnn.calibration.runtime_sampler SPEC OUT``, whose ``main`` writes the
figures.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hpcnn.calibration.tiles import TileJob, by_flops, model_specs, plan_tile_jobs, random_tile, tile_jobs
from hpcnn.launcher import child_env, find_mpiexec
from hpcnn.strategy.runtime_fit import fit_samples, synthetic_networks

#: the module mpiexec starts: this one
WORKER = "hpcnn.calibration.runtime_sampler"


# ---- op tiles ----------------------------------------------------------------------------
def tile_time(job: TileJob, dtype, repeats, rng, comm=None, min_total=0.02) -> float:
    """Mean seconds of forward + backward of one tile, over runs back to
    back (at least ``repeats`` and about ``min_total`` seconds).  With
    ``comm``, every rank runs the tile at once, makes the same number of
    runs, and the figure is the mean over ranks."""
    op = job.node.op
    xs, params, buffers, ctx = random_tile(job, dtype, rng)

    def once():
        y, saved = op.forward(xs, params, buffers, ctx)
        op.backward(np.ones_like(y), saved, params, ctx)

    t = time.perf_counter()
    once()                                     # warm-up
    first = time.perf_counter() - t
    if comm is not None:
        from mpi4py import MPI
        first = comm.allreduce(first, op=MPI.MAX)
    n = int(min(200, max(repeats, math.ceil(min_total / max(first, 1e-6)))))
    t = time.perf_counter()
    for _ in range(n):
        once()
    mean = (time.perf_counter() - t) / n
    if comm is not None:
        from mpi4py import MPI
        mean = comm.allreduce(mean, op=MPI.SUM) / comm.Get_size()
    return mean


def profile_tiles(comm, jobs: dict, dtype, repeats=5, budget=None) -> dict:
    """{key: seconds} for ``jobs`` ({key: TileJob}, the same on every rank),
    every rank running each tile at the same time; most flops first when a
    ``budget`` (seconds) may cut the list short."""
    from mpi4py import MPI
    rng = np.random.default_rng(comm.Get_rank())
    out = {}
    t_end = None if budget is None else time.perf_counter() + budget
    for key in by_flops(jobs):
        if t_end is not None and comm.allreduce(time.perf_counter() > t_end, op=MPI.LOR):
            break
        comm.Barrier()
        out[key] = tile_time(jobs[key], dtype, repeats, rng, comm)
    return out


def within_budget(jobs: dict, budget, rounds, P, repeats, solo, slots, min_total=0.02) -> dict:
    """The tiles of ``jobs`` ({key: TileJob}; most flops first) whose
    estimated timing fits ``budget`` seconds over ``rounds`` rounds: a tile
    costs about max(repeats runs, min_total) at its solo time (``solo``,
    else 1 ms) slowed by P / slots."""
    if budget is None:
        return jobs
    out, spent = {}, 0.0
    slow = max(1.0, P / max(1, slots))
    for k in by_flops(jobs):
        t = solo.get(k, 1e-3) * slow
        cost = rounds * max(repeats * t, min_total) + rounds * 2e-3
        if spent + cost > budget and out:
            break
        out[k] = jobs[k]
        spent += cost
    return out


# ---- memory copies -------------------------------------------------------------------------
def measure_copy(comm, nbytes=2 << 20, runs=50) -> float:
    """Bytes per second of copying a tile into a region (every rank at once;
    mean over ranks)."""
    from mpi4py import MPI
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    dst[...] = src
    comm.Barrier()
    t = time.perf_counter()
    for _ in range(runs):
        dst[...] = src
    per = (time.perf_counter() - t) / runs
    per = comm.allreduce(per, op=MPI.SUM) / comm.Get_size()
    return float(nbytes / per) if per > 0 else float("inf")


# ---- training steps ------------------------------------------------------------------------
class TimedNetwork:
    """A network under a plan, built once (collective), whose training
    steps are timed on demand: the slowest rank's step, from a barrier."""

    def __init__(self, comm, name, g, plan, dtype, warmup=3):
        from hpcnn.backend import Backend
        from hpcnn.runtime.executor import DistributedModel
        from hpcnn.runtime.sgd import SGD
        self.comm, self.name, self.graph, self.plan = comm, name, g, plan
        dt = np.dtype(dtype)
        self.dm = DistributedModel(g, plan, comm, dtype=dt, seed=0, backend=Backend("numpy"), setup=False)
        rng = np.random.default_rng(0)
        x = rng.standard_normal(g[g.input_name].shape).astype(dt)
        self.y = rng.integers(0, g[g.logits_name].shape[1], size=g.batch)
        box = self.dm.input_box()
        self.xt = x[box.slices()] if box is not None else None
        self.sgd = SGD(lr=0.01, momentum=0.9)          # as hpcnn bench model trains
        self.step = 0
        self.times: list = []
        for _ in range(warmup):
            self._one()

    def _one(self):
        self.dm.train_step(self.xt, self.y, self.sgd, step=self.step)
        self.step += 1

    def run(self, steps: int) -> list:
        from mpi4py import MPI
        out = []
        for _ in range(steps):
            self.comm.Barrier()
            t = time.perf_counter()
            self._one()
            out.append(self.comm.allreduce(time.perf_counter() - t, op=MPI.MAX))
        self.times.extend(out)
        return out

    def free(self):
        self.dm.free()


class Sampler:
    """Everything the figures are fitted from, sampled in rounds (collective):
    the op tiles of ``jobs`` ({key: TileJob}) and of the synthetic networks,
    the copy bandwidth, and the synthetic networks' training steps.
    ``items()`` gives one round as a list of small collective pieces of
    work, so that a caller can interleave its own (``hpcnn bench model``
    times its plans between them): a change of the machine's load then
    touches calibration and measurement alike.  ``samples()`` pools what was
    measured."""

    def __init__(self, comm, jobs: dict, dtype="float32", repeats=5, steps=3):
        from hpcnn.backend import get_backend
        from hpcnn.runtime.node_setup import setup_node
        self.comm, self.dtype, self.repeats, self.steps = comm, dtype, repeats, steps
        self.P = comm.Get_size()
        self.info = setup_node(comm, get_backend(), verbose=False)
        self.jobs = dict(jobs)
        self.networks = [TimedNetwork(comm, net.name, net.graph, net.plan, dtype)
                         for net in synthetic_networks(self.P)]
        for net in self.networks:
            for key, job in plan_tile_jobs(net.graph, [net.plan], dtype).items():
                self.jobs.setdefault(key, job)
        self.keys = by_flops(self.jobs)          # the same order on every rank
        self.ops: dict = {}
        self.copy: list = []
        self.load: list = []

    def _tiles(self, keys):
        got = profile_tiles(self.comm, {k: self.jobs[k] for k in keys}, self.dtype, self.repeats)
        for k, v in got.items():
            self.ops.setdefault(k, []).append(v)

    def _copy(self):
        self.copy.append(measure_copy(self.comm))
        self.load.append(os.getloadavg()[0])

    def items(self, chunks: int = 4) -> list:
        """One round: the tiles in ``chunks`` parts, the copy bandwidth, and
        ``steps`` steps of every synthetic network, spread evenly."""
        parts = [self.keys[c::chunks] for c in range(chunks)]
        tiles = [lambda ks=ks: self._tiles(ks) for ks in parts if ks]
        nets = [lambda n=n: n.run(self.steps) for n in self.networks]
        out, k = [], max(1, len(nets) // max(1, len(tiles)))
        for i, t in enumerate(tiles):
            out.append(t)
            out.extend(nets[i * k:(i + 1) * k])
        out.extend(nets[len(tiles) * k:])
        out.append(self._copy)
        return out

    def run_round(self):
        for item in self.items():
            item()

    def work(self, rounds: int, chunks: int = 4) -> list:
        """``rounds`` rounds of ``items`` in one list."""
        return [it for _ in range(rounds) for it in self.items(chunks)]

    def samples(self) -> dict:
        """The pooled measurements (plain data, the same on every rank), as
        ``runtime_fit.fit_samples`` reads them."""
        return {"ranks": self.P, "blas_threads": self.info.blas_threads,
                "ops": {k: list(v) for k, v in self.ops.items()},
                "copy_bandwidth": list(self.copy),
                "networks": {n.name: list(n.times) for n in self.networks},
                "load_average": list(self.load)}

    def free(self):
        for n in self.networks:
            n.free()


def interleave(a: list, b: list) -> list:
    """The items of ``a`` and ``b`` merged so that each list is spread
    evenly over the result (each keeps its own order)."""
    if not a or not b:
        return list(a) + list(b)
    keyed = [((i + 0.5) / len(a), 0, x) for i, x in enumerate(a)] + \
            [((j + 0.5) / len(b), 1, x) for j, x in enumerate(b)]
    return [x for _, _, x in sorted(keyed, key=lambda t: (t[0], t[1]))]


def runtime_figures(comm, machine, jobs: dict, dtype="float32", repeats=5, rounds=3,
                    solo_ops: dict | None = None, steps=4):
    """RuntimeFigures for P = comm's size (collective; every rank gets them)
    and a dict of the raw measurements: ``rounds`` rounds of a Sampler, the
    fit on rank 0.  ``jobs``: the op tiles to time ({key: TileJob});
    ``solo_ops``: times of tiles alone (the machine file's), for the
    slow-down factor of tiles not timed here."""
    sampler = Sampler(comm, jobs, dtype, repeats, steps)
    for _ in range(rounds):
        sampler.run_round()
    samples = sampler.samples()
    sampler.free()
    res = fit_samples(machine, samples, dtype, solo_ops) if comm.Get_rank() == 0 else None
    rf, fit = comm.bcast(res, root=0)
    raw = {"fit": fit, "tiles": {"count": len(rf.ops), "of": len(jobs)},
           "load_average": samples["load_average"]}
    return rf, raw


# ---- the worker of hpcnn calibrate -------------------------------------------------------------
@dataclass(frozen=True)
class RuntimeSpec:
    """What the worker measures: the op tiles of ``models`` (NAME or
    NAME@SIDE) at batch ``batch``, within ``budget`` seconds of tiles, in
    ``rounds`` rounds of ``repeats`` runs per tile."""
    models: tuple
    batch: int
    dtype: str = "float32"
    repeats: int = 5
    budget: float | None = None
    rounds: int = 3
    max_kinds: int = 2

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "models": list(self.models)})

    @classmethod
    def from_json(cls, text: str) -> "RuntimeSpec":
        d = json.loads(text)
        return cls(**{**d, "models": tuple(d["models"])})


def measure_runtime(machine_path, P: int, spec: RuntimeSpec, timeout=3600):
    """Start ``mpiexec -n P python -m mpi4py -m
    hpcnn.calibration.runtime_sampler SPEC OUT`` and read its
    RuntimeFigures (and raw measurements)."""
    from hpcnn.strategy.machine import RuntimeFigures
    exe = find_mpiexec()
    if exe is None:
        raise RuntimeError("mpiexec not found: install an MPI (pip install mpich) or pass --no-runtime")
    env = child_env()
    with tempfile.TemporaryDirectory() as d:
        spec_path = Path(d) / "spec.json"
        out = Path(d) / "runtime.json"
        spec_path.write_text(spec.to_json())
        r = subprocess.run([exe, "-n", str(P), sys.executable, "-m", "mpi4py", "-m", WORKER,
                            str(machine_path), str(spec_path), str(out)],
                           env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0 or not out.exists():
            raise RuntimeError(f"the runtime measurement with {P} ranks failed (exit {r.returncode}): "
                               f"{r.stderr[-2000:]}")
        res = json.loads(out.read_text())
    return RuntimeFigures.from_dict(res["figures"]), res["raw"]


def main(argv=None) -> int:
    """Worker of ``hpcnn calibrate``: ``mpiexec -n P python -m mpi4py -m
    hpcnn.calibration.runtime_sampler MACHINE.json SPEC.json OUT.json``.
    MACHINE is the machine file so far (its solo tile times), SPEC a
    RuntimeSpec; rank 0 writes the figures."""
    from mpi4py import MPI

    from hpcnn.strategy.machine import Machine
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: mpiexec -n P python -m mpi4py -m hpcnn.calibration.runtime_sampler "
              "MACHINE.json SPEC.json OUT.json (started by hpcnn calibrate)", file=sys.stderr)
        return 2
    machine = Machine.load(argv[0])
    spec = RuntimeSpec.from_json(Path(argv[1]).read_text())
    comm = MPI.COMM_WORLD
    P = comm.Get_size()
    solo = (machine.measured or {}).get("ops", {})
    jobs = tile_jobs(model_specs(spec.models), [P], spec.batch, spec.dtype, spec.max_kinds)
    jobs = within_budget(jobs, spec.budget, spec.rounds, P, spec.repeats, solo, machine.slots_per_node or 1)
    rf, raw = runtime_figures(comm, machine, jobs, spec.dtype, spec.repeats, spec.rounds,
                              solo_ops=(machine.measured or {}).get("ops"))
    if comm.Get_rank() == 0:
        Path(argv[2]).write_text(json.dumps({"figures": rf.to_dict(), "raw": raw}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
