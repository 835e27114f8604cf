"""``hpcnn train JOB.toml``: the job loop, as every rank runs it.

Launch with ``mpiexec -n N hpcnn train JOB.toml`` or ``srun hpcnn train
JOB.toml``.  Every rank reads the job file; rank 0 searches (or loads) the
plan and broadcasts it; every rank validates it, builds its share of the
network, reads only its own box of each batch from the HDF5 file, and trains.
Rank 0 shows progress, writes the metrics file and, at the end, a per-layer
table of predicted against measured time.

Failure handling (hpcnn.failsafe): errors that every rank sees (a bad job
file, a missing data file, a plan for another world size) end every rank
with one clear message and exit status 2; an unexpected exception on one rank
aborts all ranks with that rank's traceback; a NaN or infinite loss stops the
job naming the step (status 3); SIGTERM/SIGUSR1 write a checkpoint at the
next step boundary and exit with status 0.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

EXIT_USAGE, EXIT_DIVERGED = 2, 3


class Faults:
    """Fault injection for tests of the failure paths (never set in normal
    runs).  HPCNN_FAULT is a comma-separated list of
        raise:STEP:RANK          raise an exception after step STEP on RANK
        kill:STEP:RANK           SIGKILL the rank after step STEP
        sleep:STEP:RANK:SECONDS  stall the rank after step STEP
        kill-in-checkpoint:RANK  SIGKILL rank RANK (0 writes) in the middle of a checkpoint write
    """

    def __init__(self, rank: int, spec: str | None = None):
        spec = os.environ.get("HPCNN_FAULT", "") if spec is None else spec
        self.rank, self.items = rank, []
        for part in filter(None, (x.strip() for x in spec.split(","))):
            f = part.split(":")
            try:
                if f[0] in ("raise", "kill"):
                    self.items.append((f[0], int(f[1]), int(f[2]), 0.0))
                elif f[0] == "sleep":
                    self.items.append((f[0], int(f[1]), int(f[2]), float(f[3])))
                elif f[0] == "kill-in-checkpoint":
                    self.items.append((f[0], -1, int(f[1]), 0.0))
                else:
                    raise ValueError
            except (ValueError, IndexError):
                raise JobFailure(f"HPCNN_FAULT: cannot parse {part!r}") from None

    def after_step(self, step: int):
        for kind, s, r, secs in self.items:
            if r != self.rank or s != step:
                continue
            if kind == "raise":
                raise RuntimeError(f"injected fault on rank {r} after step {s} (HPCNN_FAULT)")
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "sleep":
                time.sleep(secs)

    def checkpoint_hook(self):
        if not any(k == "kill-in-checkpoint" and r == self.rank for k, _, r, _ in self.items):
            return None

        def hook(i, n, path):
            if i >= n // 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return hook


class JobFailure(Exception):
    """An error every rank agrees on: printed once by rank 0, exit status ``code``."""

    def __init__(self, msg, code=EXIT_USAGE):
        super().__init__(msg)
        self.code = code


def add_arguments(p):
    p.add_argument("job", help="job file (TOML), e.g. jobs/digits.toml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a job key, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--plan", default=None, help="use this plan JSON file (overrides plan.mode)")
    p.add_argument("--trace", default=None, help="write a Chrome-trace timeline of every rank here")
    p.add_argument("--trace-steps", type=int, default=20, help="steps recorded in the trace (default 20)")
    p.add_argument("--metrics", default=None, help="JSON-lines metrics file (overrides log.metrics)")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")


def run(args) -> int:
    from mpi4py import MPI

    from hpcnn.failsafe import abort_on_exception
    from hpcnn.job import Job, JobError

    comm = MPI.COMM_WORLD
    abort_on_exception(comm)
    rank = comm.Get_rank()
    overrides = list(args.set)
    if args.plan:
        overrides.append(f"plan.mode={json.dumps(args.plan)}")
    if args.trace:
        overrides.append(f"log.trace={json.dumps(args.trace)}")
    if args.metrics:
        overrides.append(f"log.metrics={json.dumps(args.metrics)}")
    if args.no_resume:
        overrides.append("checkpoint.resume=false")
    try:
        job = agree(comm, lambda: Job.load(args.job, overrides), JobError)
        trainer = Trainer(job, comm, trace_steps=args.trace_steps)
        return trainer.run()
    except JobFailure as exc:
        if rank == 0:
            print(f"hpcnn train: {exc}", file=sys.stderr, flush=True)
        return exc.code


def agree(comm, fn, expected=(Exception,)):
    """Run ``fn`` on every rank; if it raises one of ``expected`` on any
    rank, every rank raises JobFailure with the first failing rank's
    message.  Keeps ranks in step: nobody continues alone into a collective."""
    err = None
    try:
        out = fn()
    except expected as exc:  # noqa: PERF203
        out, err = None, str(exc)
    errs = comm.allgather(err)
    bad = [(r, e) for r, e in enumerate(errs) if e is not None]
    if bad:
        r, e = bad[0]
        where = "" if all(x == e for x in errs) else f" (rank {r})"
        raise JobFailure(f"{e}{where}")
    return out


class Trainer:
    def __init__(self, job, comm, trace_steps=20):
        self.job, self.comm = job, comm
        self.rank, self.world = comm.Get_rank(), comm.Get_size()
        self.trace_steps = trace_steps

    def log(self, text):
        if self.rank == 0:
            if getattr(self, "progress", None) is not None:
                self.progress.message(text)
            else:
                print(text, file=sys.stderr, flush=True)

    # ---- set-up ---------------------------------------------------------------
    def open_data(self):
        from hpcnn.data.hdf5_dataset import HDF5Dataset
        from hpcnn.data.hdf5_format import DataError
        j = self.job
        dtype = np.dtype(j["job"]["dtype"])
        path = j.resolve(j["data"]["path"])

        def open_all():
            train = HDF5Dataset(path, j["data"]["train"] or None, batch_size=j["train"]["batch"],
                                shuffle=True, seed=j["job"]["seed"], drop_last=True, dtype=dtype)
            test = None
            if j["data"]["test"]:
                test = HDF5Dataset(path, j["data"]["test"], batch_size=j["train"]["batch"],
                                   shuffle=False, drop_last=False, dtype=dtype)
            return train, test

        self.train_data, self.test_data = agree(self.comm, open_all, (DataError, OSError))
        self.batches_per_epoch = self.train_data.num_batches
        if j["data"]["limit"]:
            self.batches_per_epoch = max(1, min(self.batches_per_epoch,
                                                j["data"]["limit"] // j["train"]["batch"]))

    def build_graph(self):
        from hpcnn.graph import GraphError
        from hpcnn.models import build_model
        j, d = self.job, self.train_data
        c, h, w = d.sample_shape
        size = j["model"]["image_size"] or h
        if size != h or h != w:
            raise JobFailure(f"model.image_size = {size} but the data's images are {h}x{w}; "
                             f"resize the data or set model.image_size = {h}")
        classes = j["model"]["num_classes"] or d.num_classes
        self.graph = agree(self.comm, lambda: build_model(
            j["model"]["name"], batch=j["train"]["batch"], image_size=size,
            num_classes=classes, in_channels=c), (GraphError, KeyError, ValueError))

    def make_plan(self):
        from hpcnn.strategy.plan import Plan, PlanError, data_parallel
        j, g = self.job, self.graph
        mode = j["plan"]["mode"]
        text, err, self.plan_report = None, None, None
        t0 = time.perf_counter()
        if self.rank == 0:
            try:
                if mode == "search":
                    from hpcnn.strategy import search_plan
                    from hpcnn.strategy.machine import load_machine
                    machine = load_machine(j["plan"]["machine"])
                    mem = j["plan"]["memory_gib"] or None
                    plan, self.plan_report = search_plan(g, self.world, machine, memory_gib=mem)
                elif mode == "data-parallel":
                    plan = data_parallel(g, self.world)
                else:
                    plan = Plan.load(j.resolve(mode))
                text = plan.to_json()
            except (PlanError, OSError, ValueError, KeyError) as exc:
                err = f"plan: {exc}"
        text, err = self.comm.bcast((text, err), root=0)
        if err:
            raise JobFailure(err)
        plan = Plan.from_json(text)
        agree(self.comm, lambda: plan.validate(g, self.world), (PlanError,))
        self.plan = plan
        self.search_seconds = time.perf_counter() - t0
        if self.rank == 0 and j["plan"]["save"]:
            plan.save(j.resolve(j["plan"]["save"]))

    # ---- the run ----------------------------------------------------------------
    def run(self) -> int:
        from hpcnn.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
        from hpcnn.failsafe import StallWatchdog, StopSignals
        from hpcnn.progress import MetricsWriter, Progress
        from hpcnn.runtime.executor import DistributedModel
        from hpcnn.runtime.lr_schedule import Schedule
        from hpcnn.runtime.sgd import SGD

        j = self.job
        self.stop = StopSignals()
        self.faults = Faults(self.rank)
        self.open_data()
        self.build_graph()
        self.make_plan()
        tracing = bool(j["log"]["trace"])
        self.model = DistributedModel(self.graph, self.plan, self.comm, dtype=np.dtype(j["job"]["dtype"]),
                                      seed=j["job"]["seed"], trace=True)
        opt = j["optimizer"]
        self.opt = SGD(lr=opt["lr"], momentum=opt["momentum"], nesterov=opt["nesterov"],
                       weight_decay=opt["weight_decay"])
        epochs, bpe = j["train"]["epochs"], self.batches_per_epoch
        total = epochs * bpe
        if j["train"]["max_steps"]:
            total = min(total, j["train"]["max_steps"])
        sch = j["schedule"]
        self.schedule = Schedule(sch["kind"], opt["lr"], total_steps=epochs * bpe,
                                 warmup_steps=int(sch["warmup_epochs"] * bpe),
                                 milestones=[int(m * bpe) for m in sch["milestones"]], gamma=sch["gamma"])
        # ---- resume
        step, epoch, start_batch = 0, 0, 0
        ckdir = j.resolve(j["checkpoint"]["dir"]) if j["checkpoint"]["dir"] else None
        if ckdir is not None and j["checkpoint"]["resume"]:
            latest = latest_checkpoint(ckdir)
            if latest is not None:
                meta = agree(self.comm, lambda: load_checkpoint(latest, self.model, self.opt),
                             (CheckpointError, OSError))
                step, epoch = int(meta["step"]), int(meta["epoch"])
                start_batch = int(meta.get("batch_in_epoch", 0))
                if start_batch >= bpe:
                    epoch, start_batch = epoch + 1, 0
                self.log(f"resumed from {latest} at step {step} (epoch {epoch}, batch {start_batch}; "
                         f"written on {meta.get('world')} ranks)")
        self.describe()
        self.progress = Progress(total, j["log"]["progress"], j["train"]["log_every"],
                                 initial=min(step, total)) if self.rank == 0 else None
        metrics = MetricsWriter(j["log"]["metrics"] if self.rank == 0 else None)
        watchdog = StallWatchdog(self.comm, j["log"]["stall_seconds"], end_after=j["log"]["stall_end_seconds"],
                                 peer_timeout=j["log"]["heartbeat_timeout"])
        self.node_time: dict = {}
        trace_events, trace_t0 = [], time.perf_counter()
        stopped = None
        last_ck_step = step
        t_run = time.perf_counter()
        images = 0
        collective_cleanup = False    # only when every rank leaves the loop together
        try:
            while step < total and epoch < epochs:
                box = self.model.input_box()
                items = [(epoch, b) for b in range(start_batch, bpe)]
                reader = self.train_data.prefetch(items, box=box if box is not None else
                                                  ((0, 0), (0, 0), (0, 0), (0, 0)),
                                                  depth=max(1, j["data"]["prefetch"]))
                try:
                    for batch in reader:
                        t0 = time.perf_counter()
                        labels = self.train_data.batch_labels(epoch, batch.index)
                        x = batch.x if box is not None else None
                        lr = self.schedule(step)
                        loss = self.model.train_step(x, labels, self.opt, lr=lr, step=step)
                        if not math.isfinite(loss):
                            raise JobFailure(
                                f"the loss is {loss} at step {step} (epoch {epoch}, batch {batch.index}): "
                                f"training diverged; lower optimizer.lr (now {lr:.4g}) or check the data. "
                                f"The last good checkpoint is kept.", EXIT_DIVERGED)
                        dt = time.perf_counter() - t0
                        self._account(step, tracing, trace_events)
                        images += self.graph.batch
                        if self.rank == 0:
                            ips = self.graph.batch / dt if dt > 0 else 0.0
                            self.progress.update(step, loss, ips, lr, epoch)
                            if (step + 1) % j["train"]["log_every"] == 0:
                                metrics.write(kind="train", step=step + 1, epoch=epoch, loss=loss, lr=lr,
                                              images_per_s=ips, step_seconds=dt,
                                              bytes_sent_rank0=sum(self.model.step_bytes().values()))
                        self.faults.after_step(step)
                        watchdog.arrived(step)
                        step += 1
                        start_batch = batch.index + 1
                        stop_now = self.comm.allreduce(1 if self.stop.requested else 0)
                        every = j["checkpoint"]["every_steps"]
                        if ckdir is not None and (stop_now or (every and step % every == 0)):
                            self.save(ckdir, step, epoch, start_batch)
                            last_ck_step = step
                        if stop_now:
                            stopped = self.stop.requested or "a signal on another rank"
                            break
                        if step >= total:
                            break
                finally:
                    reader.close()
                if stopped:
                    break
                if start_batch >= bpe:      # epoch finished
                    ev = j["train"]["eval_every"]
                    if self.test_data is not None and ev and (epoch + 1) % ev == 0 and step < total:
                        acc = self.evaluate()
                        self.log(f"epoch {epoch + 1}/{epochs}: test accuracy {acc:.4f}")
                        metrics.write(kind="eval", step=step, epoch=epoch + 1, test_accuracy=acc)
                    epoch, start_batch = epoch + 1, 0
                    if ckdir is not None and not j["checkpoint"]["every_steps"] and last_ck_step != step:
                        self.save(ckdir, step, epoch, start_batch)
                        last_ck_step = step
            collective_cleanup = True
        except JobFailure:
            collective_cleanup = True   # agreed on every rank (the loss is global)
            raise
        finally:
            # After an unexpected exception on this rank the others may be
            # inside a collective: no communication here, the exception hook
            # aborts the job.
            if collective_cleanup:
                watchdog.close()
            else:
                watchdog.abandon()
            if self.progress is not None:
                self.progress.close()
            self.progress = None
        elapsed = time.perf_counter() - t_run
        if stopped:
            self.log(f"stopped by {stopped} at step {step}"
                     + (f"; checkpoint written to {ckdir}" if ckdir is not None else
                        " (no checkpoint.dir: nothing saved)"))
            metrics.write(kind="stopped", step=step, signal=stopped)
            metrics.close()
            return 0
        if ckdir is not None and last_ck_step != step:
            self.save(ckdir, step, epoch, start_batch)
        acc = None
        if self.test_data is not None:
            acc = self.evaluate()
            self.log(f"final test accuracy {acc:.4f} after {step} steps")
        if images and self.rank == 0:
            self.log(f"trained {images} images in {elapsed:.1f} s ({images / elapsed:.1f} images/s "
                     f"on {self.world} ranks)")
        metrics.write(kind="final", step=step, test_accuracy=acc, seconds=elapsed,
                      images_per_s=images / elapsed if elapsed > 0 else None)
        metrics.close()
        self.layer_table(step)
        if tracing:
            self.write_trace(trace_events, trace_t0)
        return 0

    # ---- pieces of the loop ---------------------------------------------------------
    def _account(self, step, tracing, trace_events):
        """Per-node measured time from the executor's events (summed over
        steps after the first, which warms caches), and the trace."""
        ev = self.model.events
        if step > 0:
            for cat, node, t0, t1 in ev:
                key = (node, cat)
                self.node_time[key] = self.node_time.get(key, 0.0) + (t1 - t0)
            self._timed_steps = getattr(self, "_timed_steps", 0) + 1
        if tracing and step < self.trace_steps:
            trace_events.extend(ev)
        self.model.events = []

    def evaluate(self) -> float:
        """Accuracy on the test split (all of it: the last short batch is
        padded and the padding is not counted)."""
        d, B = self.test_data, self.graph.batch
        box = self.model.input_box()
        correct = count = 0
        for index in range(d.num_batches):
            rows = d.batch_indices(0, index)
            n = len(rows)
            if n < B:
                rows = np.concatenate([rows, np.resize(rows, B - n)])
            labels = d.labels[rows]
            valid = np.arange(B) < n
            x = None
            if box is not None:
                x = d.read_rows(rows[box[0][0]:box[0][1]], box[1:])
            c, k = self.model.evaluate(x, labels, valid=valid)
            correct += c
            count += k
        return correct / max(1, count)

    def save(self, ckdir, step, epoch, batch_in_epoch):
        from hpcnn.checkpoint import save_checkpoint
        j = self.job
        meta = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "seed": j["job"]["seed"], "plan": self.plan.to_dict(), "job": j.data,
                "rng": {"kind": "counter-based", "seed": j["job"]["seed"], "step": step,
                        "shuffle": "permutation(seed, epoch)"}}
        return save_checkpoint(ckdir, self.model, self.opt, self.comm, meta, keep=j["checkpoint"]["keep"],
                               on_tensor=self.faults.checkpoint_hook())

    def describe(self):
        if self.rank != 0:
            return
        g, p = self.graph, self.plan
        lines = [f"job {self.job['job']['name']}: model {g.name} ({g.num_params():,d} parameters), "
                 f"global batch {g.batch}, {self.world} ranks, plan {p.name or self.job['plan']['mode']} "
                 f"({self.search_seconds:.2f} s)"]
        distinct = {}
        for n in g:
            c = json.dumps(p.config(n.name), sort_keys=True)
            distinct.setdefault(c, []).append(n.name)
        for c, nodes in distinct.items():
            lines.append(f"  {c}: {len(nodes)} layers ({nodes[0]} .. {nodes[-1]})")
        self.log("\n".join(lines))

    def layer_table(self, steps):
        """Per-layer measured time (mean over steps, max over ranks) beside
        the cost model's prediction when the plan was searched."""
        n_steps = getattr(self, "_timed_steps", 0)
        if n_steps == 0:
            return
        local = {f"{node}|{cat}": t / n_steps for (node, cat), t in self.node_time.items()}
        allt = self.comm.gather(local, root=0)
        if self.rank != 0:
            return
        keys = sorted({k for d in allt for k in d})
        worst = {k: max(d.get(k, 0.0) for d in allt) for k in keys}
        per_node: dict = {}
        for k, t in worst.items():
            node, cat = k.split("|", 1)
            per_node.setdefault(node, {})[cat] = t
        pred = {}
        rep = self.plan_report
        if rep is not None:
            for row in getattr(rep, "layers", []) or []:
                pred[row["node"]] = row
        lines = ["per-layer time (ms per step, slowest rank; measured vs predicted by the cost model; "
                 "comm: exchanges and reductions):",
                 f"  {'layer':28s} {'config':18s} {'compute':>9s} {'pred':>8s} {'comm':>9s} {'pred':>8s}"]
        for n in self.graph:
            if n.kind == "input":
                continue
            m = per_node.get(n.name, {})
            comp = sum(v for c, v in m.items() if c in ("forward", "backward", "compute"))
            comm = sum(v for c, v in m.items() if c not in ("forward", "backward", "compute"))
            pr = pred.get(n.name, {})
            cfg = ",".join(f"{d}{v}" for d, v in self.plan.config(n.name).items() if v > 1) or "1"
            pc = pr.get("t_c")
            # measured comm holds exchanges and reductions (batch-norm
            # statistics, gradients): predicted is t_x + t_s alike
            px = pr["t_x"] + pr.get("t_s", 0.0) if "t_x" in pr else None
            lines.append(f"  {n.name[:28]:28s} {cfg[:18]:18s} {comp * 1e3:9.2f} "
                         f"{(pc * 1e3 if pc is not None else float('nan')):8.2f} {comm * 1e3:9.2f} "
                         f"{(px * 1e3 if px is not None else float('nan')):8.2f}")
        self.log("\n".join(lines))

    def write_trace(self, events, t0):
        from hpcnn.progress import chrome_trace
        allev = self.comm.gather(events, root=0)
        t0s = self.comm.gather(t0, root=0)
        if self.rank == 0:
            path = Path(self.job.resolve(self.job["log"]["trace"]))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(chrome_trace(allev, t0s)))
            self.log(f"trace of {min(self.trace_steps, 10**9)} steps written to {path}")
