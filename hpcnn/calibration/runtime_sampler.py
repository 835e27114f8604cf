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
2. ``measure_copy``: bytes per second of copying a tile into a region;
   ``measure_transfer``: seconds per byte of hpcnn's exchanges and of an
   allreduce, measured directly.
3. Training steps of the synthetic networks of
   ``runtime_fit.synthetic_networks``, run by hpcnn's own executor
   (``TimedNetwork``); ``runtime_fit.fit_samples`` fits the figures to them.

``Sampler`` takes the measurements in rounds (collective) and pools them;
``runtime_figures`` samples and fits.  ``measure_runtime`` (``hpcnn
calibrate``) starts ``mpiexec -n P python -m mpi4py -m
hpcnn.calibration.runtime_sampler MACHINE SPEC`` (on this node, or under the
launcher of a cluster), whose ``main`` prints the figures.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
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


# ---- bytes through exchanges and allreduces ----------------------------------------------------
#: the activations of the exchange measurement, (samples per rank, channels,
#: side): a small and a large one, whose difference gives the cost per byte
TRANSFER_SHAPES = ((2, 32, 16), (8, 64, 32))
#: float32 elements of the allreduce measurement: 64 KiB and the 4 MiB bucket
ALLREDUCE_ELEMENTS = (1 << 14, 1 << 20)


def _median_time(comm, fn, reps):
    from mpi4py import MPI
    fn()
    times = []
    for _ in range(reps):
        comm.Barrier()
        t = time.perf_counter()
        fn()
        times.append(comm.allreduce(time.perf_counter() - t, op=MPI.MAX))
    return float(np.median(times))


def measure_transfer(comm, copy_bandwidth: float, dtype="float32", reps=7) -> dict:
    """Seconds per byte of hpcnn's exchanges and allreduces at P ranks,
    measured directly (collective): the cost model's per-byte terms, which
    the steps of the synthetic networks cannot tell apart from their
    latencies and waits (a fit of them alone put them at zero: bytes free).

    - exchange: a redistribution of a channels-last activation from a
      sample split to a channel split through ``parallel.comm`` (cutting
      the pieces out of the tile, the messages, writing them into the
      region), forward and adjoint, at two sizes: the difference of the
      times less assembling the region (``copy_bandwidth``, priced apart)
      over the difference of the busiest rank's bytes;
    - allreduce: an in-place float32 Allreduce over the P ranks of 64 KiB and
      of the 4 MiB gradient bucket: the difference of the times over that
      of the bytes 2 (P-1)/P cross each rank's link (the cost model's term).

    Every node measures at once, among its own ranks: these are the
    figures inside a node (bytes across nodes are priced by the links).
    Returns {"exchange_s_per_byte", "allreduce_s_per_byte"} (empty with one
    rank on a node)."""
    from mpi4py import MPI
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        sizes = comm.allgather(node.Get_size())
        if min(sizes) < 2 or len(set(sizes)) != 1:
            return {}
        return _transfer_on(node, comm, copy_bandwidth, dtype, reps)
    finally:
        node.Free()


def _transfer_on(comm, world, copy_bandwidth, dtype, reps) -> dict:
    """``measure_transfer`` among the ranks of ``comm`` (one node); the
    figures are reduced over ``world`` (every node's, the slowest)."""
    from mpi4py import MPI

    from hpcnn.backend import Backend
    from hpcnn.parallel import ExchangePlan, Layout
    from hpcnn.parallel.comm import Communicator
    P, me = comm.Get_size(), comm.Get_rank()
    dt = np.dtype(dtype)
    cm = Communicator(comm, Backend("numpy"))
    points = []
    for per, C, S in TRANSFER_SHAPES:
        shape = (per * P, C, S, S)
        src, dst = Layout(shape, (P, 1, 1, 1)), Layout(shape, (1, P, 1, 1))
        plan = ExchangePlan.compile(src, dst.boxes(), dt.itemsize)
        box, need = src.box(me), plan.need(me)
        n, c, h, w = box.shape
        tile = np.ones((n, h, w, c), dt).transpose(0, 3, 1, 2)
        grad = np.ones((need.shape[0], need.shape[2], need.shape[3], need.shape[1]), dt).transpose(0, 3, 1, 2)
        fwd = _median_time(comm, lambda: cm.exchange(plan, tile, dt, tag=11), reps)
        bwd = _median_time(comm, lambda: cm.exchange_adjoint(plan, grad, None, dt, tag=12), reps)
        region = float(np.prod(dst.box(0).shape)) * dt.itemsize
        points.append((float(plan.max_rank_bytes()), 0.5 * (fwd + bwd) - region / copy_bandwidth))
    (b0, t0), (b1, t1) = points
    x = max((t1 - t0) / (b1 - b0), 1e-13)
    buf = np.ones(ALLREDUCE_ELEMENTS[-1], np.float32)
    ar = []
    for k in ALLREDUCE_ELEMENTS:
        part = buf[:k]
        ar.append((2.0 * (P - 1) / P * k * 4, _median_time(
            comm, lambda: comm.Allreduce(MPI.IN_PLACE, [part, MPI.FLOAT], op=MPI.SUM), reps)))
    (a0, s0), (a1, s1) = ar
    cm.free()
    got = {"exchange_s_per_byte": x, "allreduce_s_per_byte": max((s1 - s0) / (a1 - a0), 1e-13)}
    return {k: world.allreduce(v, op=MPI.MAX) for k, v in got.items()}


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
        self.y = g.random_labels(rng)
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
        from hpcnn.calibration.links import node_layout
        self.comm, self.dtype, self.repeats, self.steps = comm, dtype, repeats, steps
        self.P = comm.Get_size()
        self.info = setup_node(comm, get_backend(), verbose=False)
        node_of, self.hosts, node = node_layout(comm)
        node.Free()
        self.per_node = [node_of.count(i) for i in range(len(self.hosts))]
        self.jobs = dict(jobs)
        self.networks = [TimedNetwork(comm, net.name, net.graph, net.plan, dtype)
                         for net in synthetic_networks(self.P)]
        for net in self.networks:
            for key, job in plan_tile_jobs(net.graph, [net.plan], dtype).items():
                self.jobs.setdefault(key, job)
        self.keys = by_flops(self.jobs)          # the same order on every rank
        self.ops: dict = {}
        self.copy: list = []
        self.transfer: dict = {}
        self.load: list = []

    def _tiles(self, keys):
        got = profile_tiles(self.comm, {k: self.jobs[k] for k in keys}, self.dtype, self.repeats)
        for k, v in got.items():
            self.ops.setdefault(k, []).append(v)

    def _copy(self):
        self.copy.append(measure_copy(self.comm))
        self.load.append(os.getloadavg()[0])
        for k, v in measure_transfer(self.comm, float(np.median(self.copy)), self.dtype).items():
            self.transfer.setdefault(k, []).append(v)

    def items(self, chunks: int = 4) -> list:
        """One round: the tiles in ``chunks`` parts, the copy bandwidth and
        the bytes through exchanges and allreduces, and ``steps`` steps of
        every synthetic network, spread evenly."""
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
        return {"ranks": self.P, "blas_threads": self.info.blas_threads, "nodes": len(self.hosts),
                "ranks_per_node": min(self.per_node), "hosts": list(self.hosts),
                "ops": {k: list(v) for k, v in self.ops.items()},
                "copy_bandwidth": list(self.copy),
                "transfer": {k: list(v) for k, v in self.transfer.items()},
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


#: how the worker's rank 0 prints its result
TAG = "HPCNN_RUNTIME_FIGURES "


def measure_runtime(machine_path, P: int, spec: RuntimeSpec, timeout=3600, launch=None, env=None):
    """Start ``mpiexec -n P python -m mpi4py -m
    hpcnn.calibration.runtime_sampler MACHINE SPEC`` (or the worker under
    ``launch``, a launcher's command line that starts P ranks, e.g. across
    the nodes of a cluster, in environment ``env``) and read its
    RuntimeFigures (and raw measurements) from what its rank 0 prints."""
    from hpcnn.strategy.machine import RuntimeFigures
    if launch is None:
        exe = find_mpiexec()
        if exe is None:
            raise RuntimeError("mpiexec not found: install an MPI (pip install mpich) or pass --no-runtime")
        launch = [exe, "-n", str(P)]
    e = child_env() if env is None else dict(env)
    r = subprocess.run([*launch, sys.executable, "-m", "mpi4py", "-m", WORKER,
                        str(Path(machine_path).resolve()), spec.to_json()],
                       env=e, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(TAG)]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"the runtime measurement with {P} ranks failed (exit {r.returncode}): "
                           f"{(r.stderr or r.stdout)[-2000:]}")
    res = json.loads(lines[-1][len(TAG):])
    return RuntimeFigures.from_dict(res["figures"]), res["raw"]


def main(argv=None) -> int:
    """Worker of ``hpcnn calibrate``: ``mpiexec -n P python -m mpi4py -m
    hpcnn.calibration.runtime_sampler MACHINE.json SPEC``.  MACHINE is the
    machine file so far (its solo tile times), SPEC a RuntimeSpec as JSON;
    rank 0 prints ``TAG {"figures", "raw"}``."""
    from mpi4py import MPI

    from hpcnn.strategy.machine import Machine
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: mpiexec -n P python -m mpi4py -m hpcnn.calibration.runtime_sampler "
              "MACHINE.json SPEC-JSON (started by hpcnn calibrate)", file=sys.stderr)
        return 2
    machine = Machine.load(argv[0])
    spec = RuntimeSpec.from_json(argv[1])
    comm = MPI.COMM_WORLD
    P = comm.Get_size()
    solo = (machine.measured or {}).get("ops", {})
    jobs = tile_jobs(model_specs(spec.models), [P], spec.batch, spec.dtype, spec.max_kinds)
    jobs = within_budget(jobs, spec.budget, spec.rounds, P, spec.repeats, solo, machine.slots_per_node or 1)
    rf, raw = runtime_figures(comm, machine, jobs, spec.dtype, spec.repeats, spec.rounds,
                              solo_ops=(machine.measured or {}).get("ops"))
    if comm.Get_rank() == 0:
        sys.stdout.write(TAG + json.dumps({"figures": rf.to_dict(), "raw": raw}) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
