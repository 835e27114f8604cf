"""``hpcnn train JOB.toml``: the job loop, as every rank runs it.

Launch with ``mpiexec -n N hpcnn train JOB.toml`` or ``srun hpcnn train
JOB.toml``.  Every rank reads the job file; rank 0 searches (or loads) the
plan and broadcasts it; every rank validates it, builds its share of the
network, reads only its own box of each batch from the HDF5 file, and trains.
Rank 0 shows progress, writes the metrics file and, at the end, a per-layer
table of predicted against measured time.

Failure handling (hpcnn.failsafe, hpcnn.job_errors): errors that every
rank sees (a bad job file, a missing data file, a plan for another world
size) end every rank with one clear message and exit status 2; an
unexpected exception on one rank aborts all ranks with that rank's
traceback; a NaN or infinite loss stops the job naming the step (status 3);
SIGTERM/SIGUSR1 write a checkpoint at the next step boundary and exit with
status 0.  Faults for the tests of these paths: hpcnn.fault_injection.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcnn.fault_injection import Faults
from hpcnn.job_errors import EXIT_DIVERGED, JobFailure, agree


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


def job_layout(comm) -> list[int]:
    """Ranks on each node of the job, first node first (collective): nodes
    as MPI groups the ranks that share memory."""
    from hpcnn.calibration.links import node_layout
    node_of, hosts, node = node_layout(comm)
    node.Free()
    return [node_of.count(i) for i in range(len(hosts))]


def choose_plan(job, graph, world: int, per_node: list[int] | None = None, warn=None) -> tuple:
    """(Plan, the search's report or None) that ``plan.mode`` names for
    ``graph`` on ``world`` ranks: "search", "data-parallel" (the baseline
    the benchmarks run under that name) or a plan file.  A search first
    passes ``warn`` the line that says when the machine file does not fit
    the job (its ranks ``per_node`` on each node, or this hpcnn's cost
    model)."""
    from hpcnn.strategy.baselines import data_parallel
    from hpcnn.strategy.plan import Plan
    mode = job["plan"]["mode"]
    if mode == "search":
        from hpcnn.strategy import search_plan
        from hpcnn.strategy.machine import load_machine, stale_warning
        machine = load_machine(job["plan"]["machine"])
        line = stale_warning(machine, per_node)
        if line and warn is not None:
            warn(line)
        return search_plan(graph, world, machine, memory_gib=job["plan"]["memory_gib"] or None)
    plan = data_parallel(graph, world) if mode == "data-parallel" else Plan.load(job.resolve(mode))
    if job["plan"]["memory_gib"]:
        from hpcnn.strategy.planner import check_plan_memory
        check_plan_memory(graph, plan, world, job["plan"]["machine"], job["plan"]["memory_gib"],
                          dtype=job["job"]["dtype"])
    return plan, None


def augmentations(job):
    """(training transform, evaluation transform) of a job's [augment]
    section (the reader drops one that leaves the images as stored)."""
    from hpcnn.data.augment import Augmentation
    a, j = job["augment"], job
    geometry = a["random_resized_crop"] or a["resize"] > 0
    size = j["model"]["image_size"] or None
    size = size if geometry else None
    common = dict(size=size, resize=a["resize"], seed=j["job"]["seed"])
    train = Augmentation(random_resized_crop=a["random_resized_crop"], scale=a["crop_scale"],
                         ratio=a["crop_ratio"], flip=a["flip"], **common)
    test = Augmentation(**common)
    return train, test


@dataclass
class Position:
    """Where a run is: the next step, epoch and batch of the epoch, the step
    of the last checkpoint, images trained, and what stopped it (a signal's
    name, or None)."""
    step: int = 0
    epoch: int = 0
    batch: int = 0
    checkpointed: int = 0
    images: int = 0
    stopped: str | None = None


class Trainer:
    def __init__(self, job, comm, trace_steps=20):
        self.job, self.comm = job, comm
        self.rank, self.world = comm.Get_rank(), comm.Get_size()
        self.trace_steps = trace_steps
        self.tracing = bool(job["log"]["trace"])
        self.ckdir = job.resolve(job["checkpoint"]["dir"]) if job["checkpoint"]["dir"] else None

    def log(self, text):
        if self.rank == 0:
            if getattr(self, "progress", None) is not None:
                self.progress.message(text)
            else:
                print(text, file=sys.stderr, flush=True)

    # ---- set-up ---------------------------------------------------------------
    def augmentations(self):
        """(training transform, evaluation transform) of the [augment]
        section (the reader drops one that leaves the images as stored)."""
        return augmentations(self.job)

    def open_data(self):
        """The training and test splits, read in micro-batches (the global
        batch over train.accumulate), transformed and normalised as the
        [augment] section says."""
        from hpcnn.data.hdf5_dataset import HDF5Dataset
        from hpcnn.data.hdf5_format import DataError
        j = self.job
        dtype = np.dtype(j["job"]["dtype"])
        path = j.resolve(j["data"]["path"])
        self.accumulate = j["train"]["accumulate"]
        micro = j["train"]["batch"] // self.accumulate
        a = j["augment"]
        norm = dict(mean=a["mean"] or None, std=a["std"] or None)

        def open_all():
            try:
                train_aug, test_aug = self.augmentations()
            except ValueError as exc:
                raise DataError(str(exc)) from None
            train = HDF5Dataset(path, j["data"]["train"] or None, batch_size=micro,
                                shuffle=True, seed=j["job"]["seed"], drop_last=True, dtype=dtype,
                                transform=train_aug, **norm)
            test = None
            if j["data"]["test"]:
                test = HDF5Dataset(path, j["data"]["test"], batch_size=micro,
                                   shuffle=False, drop_last=False, dtype=dtype, transform=test_aug, **norm)
            if train.num_batches < self.accumulate:
                raise DataError(f"group {train.group!r} of {str(path)!r} has {train.num_samples} samples, "
                                f"fewer than train.batch = {j['train']['batch']}; use a smaller batch")
            return train, test

        self.train_data, self.test_data = agree(self.comm, open_all, (DataError, OSError))
        # steps per epoch: the micro-batches of one step are consecutive in
        # the epoch's order, so a step sees the samples it would see whole
        self.batches_per_epoch = self.train_data.num_batches // self.accumulate
        if j["data"]["limit"]:
            self.batches_per_epoch = max(1, min(self.batches_per_epoch,
                                                j["data"]["limit"] // j["train"]["batch"]))

    def build_graph(self):
        from hpcnn.graph import GraphError
        from hpcnn.models.sources import build_network
        j = self.job
        # the samples' shape and classes: the training split's (an evaluation
        # opens only the test split)
        d = self.train_data if self.train_data is not None else self.test_data
        c, *spatial = d.sample_shape
        h, w = spatial[-2:]
        size = j["model"]["image_size"] or h
        if len(spatial) == 3 and (size != h or len(set(spatial)) != 1):
            raise JobFailure(f"model.image_size = {size} but the data's volumes are "
                             f"{'x'.join(map(str, spatial))}; the volume networks take cubes of the data's side "
                             f"(leave model.image_size at 0, or write the data at that size)")
        if len(spatial) == 2 and (size != h or h != w):
            how = (f"set model.image_size = {h}" if h == w else
                   "set augment.resize (and model.image_size) for a square centre crop")
            raise JobFailure(f"model.image_size = {size} but the data's images are {h}x{w}"
                             f"{' after augmentation' if d.transform is not None else ''}; resize the data, "
                             f"{how}, or crop with augment.random_resized_crop / augment.resize")
        classes = j["model"]["num_classes"] or d.num_classes
        # the network is built for the micro-batch (train.accumulate of them per step)
        self.graph = agree(self.comm, lambda: build_network(j["model"], j["train"]["batch"] // self.accumulate,
                                                            tuple(d.sample_shape), classes, j.resolve),
                           (GraphError, KeyError, ValueError))
        loss_kind = self.graph[self.graph.loss_name].kind
        want = "mse" if d.task == "regression" else "softmax_xent"
        if loss_kind != want:
            raise JobFailure(f"the data set {str(d.path)!r} is a {d.task} task but model "
                             f"{self.graph.name!r} ends in a {loss_kind} loss: train a "
                             f"{'regression model (cosmoflow, volume_small)' if want == 'mse' else 'classifier'} "
                             f"on it")
        eps = j["train"]["label_smoothing"]
        if eps:
            self.graph[self.graph.loss_name].op.label_smoothing = eps

    def make_plan(self):
        from hpcnn.strategy.plan import Plan, PlanError
        j, g = self.job, self.graph
        text, err, self.plan_report = None, None, None
        t0 = time.perf_counter()
        # where the ranks are, for the search to say when its machine file
        # was calibrated on another layout (collective: every rank)
        per_node = job_layout(self.comm) if j["plan"]["mode"] == "search" else None
        if self.rank == 0:
            try:
                plan, self.plan_report = choose_plan(j, g, self.world, per_node, warn=self.log)
                text = plan.to_json()
            except (PlanError, OSError, ValueError, KeyError) as exc:
                err = f"plan: {exc}"
        text, err = self.comm.bcast((text, err), root=0)
        if err:
            raise JobFailure(err)
        plan = Plan.from_json(text)
        agree(self.comm, lambda: plan.validate(g, self.world), (PlanError,))
        self.plan = self.try_plans(plan) if j["plan"]["mode"] == "search" else plan
        self.search_seconds = time.perf_counter() - t0
        if self.rank == 0 and j["plan"]["save"]:
            self.plan.save(j.resolve(j["plan"]["save"]))

    def try_plans(self, plan):
        """After a search: time the candidates ``plan.trials`` asks for on
        the first training batches and return the fastest (the plan itself
        when there is nothing to try).  Leaves no trace in the run."""
        from hpcnn.runtime.plan_trials import candidates, fastest, format_trials, run_trials, trials_wanted
        from hpcnn.strategy.plan import Plan
        j, g, rep = self.job, self.graph, self.plan_report
        cands = None
        if self.rank == 0:
            k = trials_wanted(j["plan"]["trials"], rep, plan, j["plan"]["trial_tolerance"])
            if k > 0 and rep is not None:
                base = {n: Plan(g.name, self.world, g.batch, b["configs"], name=n)
                        for n, b in rep.get("baselines", {}).items()}
                cands = [(c.name, c.plan.to_json(), c.predicted_s) for c in candidates(plan, rep, base, k)]
        cands = self.comm.bcast(cands, root=0)
        if not cands or len(cands) < 2:
            return plan
        from hpcnn.runtime.plan_trials import Candidate
        cands = [Candidate(n, Plan.from_json(t), p) for n, t, p in cands]
        data, nb = self.train_data, self.train_data.num_batches

        def batch(box, i):
            rows = data.batch_indices(0, i % nb)
            x = None if box is None else data.read_rows(rows[box[0][0]:box[0][1]], box[1:])
            return x, data.labels[rows]

        self.log(f"timing {len(cands)} candidate plans ({j['plan']['trial_steps']} steps each after one "
                 f"warm-up, up to {j['plan']['trial_rounds']} rounds): {', '.join(c.name for c in cands)}")
        run_trials(self.comm, g, cands, batch, self.make_optimizer,
                   dtype=np.dtype(j["job"]["dtype"]), seed=j["job"]["seed"], steps=j["plan"]["trial_steps"],
                   rounds=j["plan"]["trial_rounds"], log=self.log)
        best = fastest(cands, j["plan"]["trial_margin"])
        self.log(format_trials(cands, best))
        chosen = best.plan
        chosen.meta = dict(plan.meta)
        chosen.meta["trials"] = [{"name": c.name, "predicted_s": c.predicted_s, "measured_s": c.measured_s,
                                  "steps_s": c.steps_s} for c in cands]
        chosen.meta["chosen"] = best.name
        if best.name != "searched":
            self.plan_report = None        # its per-layer predictions are the searched plan's
        return chosen

    def make_optimizer(self):
        """A fresh optimiser of the [optimizer] section (not yet attached
        to a model)."""
        from hpcnn.runtime.optimizers import make_optimizer
        o = self.job["optimizer"]
        return make_optimizer(o["kind"], lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"],
                              weight_decay=o["weight_decay"], betas=tuple(o["betas"]), eps=o["eps"] or None,
                              trust_coefficient=o["trust_coefficient"], clip_norm=o["clip_norm"],
                              exclude_bias_and_norm=o["exclude_bias_and_norm"],
                              weight_decay_mode=o["weight_decay_mode"])

    def setup_training(self):
        """The distributed model, the optimiser (attached to it: layer-wise
        norms and clipping sum over its shards) and the learning-rate
        schedule; the step limit."""
        from hpcnn.runtime.executor import DistributedModel
        from hpcnn.runtime.lr_schedule import Schedule
        j = self.job
        self.model = DistributedModel(self.graph, self.plan, self.comm, dtype=np.dtype(j["job"]["dtype"]),
                                      seed=j["job"]["seed"], trace=True)
        opt = j["optimizer"]
        self.opt = self.make_optimizer().attach(self.model)
        self.epochs, bpe = j["train"]["epochs"], self.batches_per_epoch
        self.total = self.epochs * bpe
        if j["train"]["max_steps"]:
            self.total = min(self.total, j["train"]["max_steps"])
        sch = j["schedule"]
        self.schedule = Schedule(sch["kind"], opt["lr"], total_steps=self.epochs * bpe,
                                 warmup_steps=int(sch["warmup_epochs"] * bpe),
                                 milestones=[int(m * bpe) for m in sch["milestones"]], gamma=sch["gamma"])

    # ---- the run ----------------------------------------------------------------
    def run(self) -> int:
        """Set up, resume, train epoch after epoch until the step limit, the
        last epoch or a stop signal, and report.  Returns the exit status
        (0, also after a stop signal); errors all ranks agree on raise
        JobFailure."""
        from hpcnn.failsafe import StallWatchdog, StopSignals
        from hpcnn.progress import MetricsWriter, Progress

        j = self.job
        self.stop = StopSignals()
        self.faults = Faults(self.rank)
        self.open_data()
        self.build_graph()
        self.make_plan()
        # From here to the end the watchdog watches the run (heartbeats, and
        # progress by phase: start-up, training steps, evaluation batches,
        # the last checkpoint, the report).
        self.watchdog = StallWatchdog(self.comm, j["log"]["stall_seconds"],
                                      end_after=j["log"]["stall_end_seconds"],
                                      peer_timeout=j["log"]["heartbeat_timeout"], phase="start-up after the plan",
                                      unit=None)
        self.faults.at("start-up")
        collective_cleanup = False    # only when every rank ends the run together
        try:
            self.setup_training()
            pos = self.resume()
            self.describe()
            self.progress = Progress(self.total, j["log"]["progress"], j["train"]["log_every"],
                                     initial=min(pos.step, self.total)) if self.rank == 0 else None
            self.metrics = MetricsWriter(j["log"]["metrics"] if self.rank == 0 else None)
            self.node_time: dict = {}
            self.trace_events, self.trace_t0 = [], time.perf_counter()
            t_run = time.perf_counter()
            while pos.step < self.total and pos.epoch < self.epochs and not pos.stopped:
                self.run_epoch(pos)
                if not pos.stopped and pos.batch >= self.batches_per_epoch:
                    self.end_epoch(pos)
            self._close_progress()
            status = self.report(pos, time.perf_counter() - t_run)
            collective_cleanup = True
        except JobFailure:
            collective_cleanup = True   # agreed on every rank (a bad checkpoint, the loss is global)
            raise
        finally:
            # After an unexpected exception on this rank the others may be
            # inside a collective: no communication here, the exception hook
            # aborts the job.
            if collective_cleanup:
                self.watchdog.close()
            else:
                self.watchdog.abandon()
            self._close_progress()
        return status

    def _close_progress(self):
        if getattr(self, "progress", None) is not None:
            self.progress.close()
        self.progress = None

    def phase(self, name: str, unit: str | None = None, done: int = -1):
        """The run enters phase ``name`` (for the watchdog; a fault of the
        tests may stall this rank first, HPCNN_FAULT sleep-at)."""
        self.faults.at(name.replace(" ", "-"))
        self.watchdog.phase(name, unit, done)

    # ---- the steps of the run ---------------------------------------------------------
    def resume(self) -> "Position":
        """Where training starts: the beginning, or the latest checkpoint in
        checkpoint.dir when checkpoint.resume is set (every rank loads its
        share)."""
        from hpcnn.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
        pos = Position()
        if self.ckdir is None or not self.job["checkpoint"]["resume"]:
            return pos
        latest = latest_checkpoint(self.ckdir)
        if latest is None:
            return pos
        meta = agree(self.comm, lambda: load_checkpoint(latest, self.model, self.opt),
                     (CheckpointError, OSError))
        if not meta.get("optimizer_restored", True):
            saved = meta.get("optimizer", {}).get("kind", "sgd") if isinstance(meta.get("optimizer"), dict) else "sgd"
            self.log(f"checkpoint {latest} was written by optimizer.kind = {saved!r}; {self.opt.kind} starts "
                     f"with fresh state (the parameters are restored)")
        pos.step, pos.epoch = int(meta["step"]), int(meta["epoch"])
        pos.batch = int(meta.get("batch_in_epoch", 0))
        if pos.batch >= self.batches_per_epoch:
            pos.epoch, pos.batch = pos.epoch + 1, 0
        pos.checkpointed = pos.step
        self.log(f"resumed from {latest} at step {pos.step} (epoch {pos.epoch}, batch {pos.batch}; "
                 f"written on {meta.get('world')} ranks)")
        return pos

    def run_epoch(self, pos: "Position") -> None:
        """The batches of epoch ``pos.epoch`` from ``pos.batch`` on, until the
        epoch ends, the step limit is reached or the ranks agree to stop."""
        self.phase("training", "step", done=pos.step - 1)
        box = self.model.input_box()
        k = self.accumulate
        # the micro-batches of step b are batches b*k .. b*k + k-1 of the epoch
        items = [(pos.epoch, b * k + i) for b in range(pos.batch, self.batches_per_epoch) for i in range(k)]
        reader = self.train_data.prefetch(items, box=box if box is not None else
                                          ((0, 0), (0, 0), (0, 0), (0, 0)),
                                          depth=max(1, self.job["data"]["prefetch"] * k))
        try:
            micro = []
            for batch in reader:
                micro.append(batch)
                if len(micro) < k:
                    continue
                self.train_step(pos, micro, box is not None)
                self.faults.after_step(pos.step)
                self.watchdog.arrived(pos.step)
                pos.step += 1
                pos.batch = micro[-1].index // k + 1
                micro = []
                if self.checkpoint_or_stop(pos) or pos.step >= self.total:
                    break
        finally:
            reader.close()

    def train_step(self, pos: "Position", micro: list, has_input: bool) -> None:
        """One training step on the micro-batches ``micro`` (one, or
        train.accumulate of them): the update, the divergence check, the
        time accounting, progress and metrics."""
        from hpcnn.runtime.accumulation import accumulated_step
        j = self.job
        t0 = time.perf_counter()
        lr = self.schedule(pos.step)
        feeds = [(b.x if has_input else None, self.train_data.batch_labels(pos.epoch, b.index)) for b in micro]
        if len(feeds) == 1:
            loss = self.model.train_step(feeds[0][0], feeds[0][1], self.opt, lr=lr, step=pos.step)
        else:
            loss = accumulated_step(self.model, feeds, self.opt, lr=lr, step=pos.step)
        if not math.isfinite(loss):
            raise JobFailure(
                f"the loss is {loss} at step {pos.step} (epoch {pos.epoch}, batch {pos.batch}): "
                f"training diverged; lower optimizer.lr (now {lr:.4g}) or check the data. "
                f"The last good checkpoint is kept.", EXIT_DIVERGED)
        dt = time.perf_counter() - t0
        self._account(pos.step)
        images = self.graph.batch * len(micro)
        pos.images += images
        if self.rank == 0:
            ips = images / dt if dt > 0 else 0.0
            self.progress.update(pos.step, loss, ips, lr, pos.epoch)
            if (pos.step + 1) % j["train"]["log_every"] == 0:
                extra = {} if self.opt.last_grad_norm is None else {"grad_norm": self.opt.last_grad_norm}
                self.metrics.write(kind="train", step=pos.step + 1, epoch=pos.epoch, loss=loss, lr=lr,
                                   images_per_s=ips, step_seconds=dt,
                                   bytes_sent_rank0=sum(self.model.step_bytes().values()), **extra)

    def checkpoint_or_stop(self, pos: "Position") -> bool:
        """After a step: agree whether a stop signal arrived on any rank;
        write a checkpoint then, or every checkpoint.every_steps steps.
        True when the run stops."""
        stop_now = self.comm.allreduce(1 if self.stop.requested else 0)
        every = self.job["checkpoint"]["every_steps"]
        if self.ckdir is not None and (stop_now or (every and pos.step % every == 0)):
            self.checkpoint(pos)
        if stop_now:
            pos.stopped = self.stop.requested or "a signal on another rank"
        return bool(stop_now)

    def end_epoch(self, pos: "Position") -> None:
        """After an epoch's last batch: the test accuracy every
        train.eval_every epochs (unless the run ends now and reports it
        anyway), the next epoch, and its checkpoint when checkpoints are
        written per epoch."""
        j = self.job
        ev = j["train"]["eval_every"]
        if self.test_data is not None and ev and (pos.epoch + 1) % ev == 0 and pos.step < self.total:
            self.phase(f"evaluation after epoch {pos.epoch + 1}", "batch")
            key, value, note = self.test_metric()
            self.log(f"epoch {pos.epoch + 1}/{self.epochs}: {key.replace('_', ' ')} {value:.4f}{note}")
            self.metrics.write(kind="eval", step=pos.step, epoch=pos.epoch + 1, **{key: value})
        pos.epoch, pos.batch = pos.epoch + 1, 0
        if self.ckdir is not None and not j["checkpoint"]["every_steps"] and pos.checkpointed != pos.step:
            self.phase(f"checkpoint after epoch {pos.epoch}")
            self.checkpoint(pos)

    def report(self, pos: "Position", elapsed: float) -> int:
        """The end of the run: after a stop, say so; otherwise the last
        checkpoint, the final test accuracy, throughput, the per-layer table
        and the trace.  Returns the exit status."""
        if pos.stopped:
            self.log(f"stopped by {pos.stopped} at step {pos.step}"
                     + (f"; checkpoint written to {self.ckdir}" if self.ckdir is not None else
                        " (no checkpoint.dir: nothing saved)"))
            self.metrics.write(kind="stopped", step=pos.step, signal=pos.stopped)
            self.metrics.close()
            return 0
        if self.ckdir is not None and pos.checkpointed != pos.step:
            self.phase("last checkpoint")
            self.checkpoint(pos)
        acc, final = None, {}
        if self.test_data is not None:
            self.phase("final evaluation", "batch")
            key, acc, note = self.test_metric()
            final = {key: acc}
            self.log(f"final {key.replace('_', ' ')} {acc:.4f}{note} after {pos.step} steps")
        if pos.images and self.rank == 0:
            self.log(f"trained {pos.images} images in {elapsed:.1f} s ({pos.images / elapsed:.1f} images/s "
                     f"on {self.world} ranks)")
        final.setdefault("test_accuracy", None)
        self.metrics.write(kind="final", step=pos.step, **final, seconds=elapsed,
                           images_per_s=pos.images / elapsed if elapsed > 0 else None)
        self.metrics.close()
        self.phase("report")
        self.layer_table(pos.step)
        if self.tracing:
            self.write_trace(self.trace_events, self.trace_t0)
        return 0

    # ---- pieces of the steps ---------------------------------------------------------
    def _account(self, step):
        """Per-node measured time from the executor's events (summed over
        steps after the first, which warms caches), and the trace."""
        ev = self.model.events
        if step > 0:
            for cat, node, t0, t1 in ev:
                key = (node, cat)
                self.node_time[key] = self.node_time.get(key, 0.0) + (t1 - t0)
            self._timed_steps = getattr(self, "_timed_steps", 0) + 1
        if self.tracing and step < self.trace_steps:
            self.trace_events.extend(ev)
            self.trace_events.extend(self.model.flights)
        self.model.events = []
        self.model.flights = []

    def checkpoint(self, pos: "Position"):
        """A checkpoint of the model and optimiser at ``pos``."""
        self.save(self.ckdir, pos.step, pos.epoch, pos.batch)
        pos.checkpointed = pos.step

    def test_metric(self) -> tuple:
        """(metric name, value, note) on the test split: the accuracy of a
        classifier; the mean squared error per target of a regression
        network, noted beside the variance of the test targets (the error of
        always predicting their mean)."""
        if self.test_data.task != "regression":
            return "test_accuracy", self.test_accuracy(), ""
        loss = self.test_loss()
        var = float(np.var(self.test_data.labels.astype(np.float64), axis=0).mean())
        return "test_loss", loss, f" (variance of the targets {var:.4f})"

    def _test_batches(self, on_batch=None):
        """(x, labels, valid) of every test batch (the last short one padded
        with repeated samples that ``valid`` leaves out).  ``on_batch(index,
        batches)`` after each batch (progress)."""
        d, B = self.test_data, self.graph.batch
        box = self.model.input_box()
        for index in range(d.num_batches):
            rows = d.batch_indices(0, index)
            n = len(rows)
            if n < B:
                rows = np.concatenate([rows, np.resize(rows, B - n)])
            x = None
            if box is not None:
                x = d.read_rows(rows[box[0][0]:box[0][1]], box[1:])
            yield x, d.labels[rows], np.arange(B) < n
            if getattr(self, "watchdog", None) is not None:
                self.watchdog.arrived(index)
            if on_batch is not None:
                on_batch(index, d.num_batches)

    def test_loss(self) -> float:
        """Mean loss per sample (per target, for MSE) over the test split in
        inference mode."""
        total = count = 0
        for x, labels, valid in self._test_batches():
            t, k = self.model.mean_loss(x, labels, valid=valid)
            total += t
            count += k
        return total / max(1, count)

    def test_accuracy(self) -> float:
        """Accuracy on the test split (all of it: the last short batch is
        padded and the padding is not counted)."""
        return self.evaluate()[0]

    def evaluate(self, on_batch=None) -> tuple:
        """(accuracy, mean loss, samples) on the test split in inference
        mode, all of it: the last short batch is padded and the padding is
        not counted.  A classifier's loss is the plain cross-entropy; a
        regression network has no accuracy (None) and its loss is the mean
        squared error per target."""
        correct = count = 0
        total = 0.0
        regression = self.test_data.task == "regression"
        for x, labels, valid in self._test_batches(on_batch):
            if regression:
                t, k = self.model.mean_loss(x, labels, valid=valid)
                total += t
                count += k
                continue
            c, k, loss = self.model.evaluate_batch(x, labels, valid=valid)
            correct += c
            count += k
            total += loss
        acc = None if regression else correct / max(1, count)
        return acc, total / max(1, count), count

    def save(self, ckdir, step, epoch, batch_in_epoch):
        from hpcnn.checkpoint import save_checkpoint
        j = self.job
        meta = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "seed": j["job"]["seed"], "plan": self.plan.to_dict(), "job": j.data,
                "network": {"input_shape": list(self.graph[self.graph.input_name].shape),
                            "num_classes": int(self.graph[self.graph.logits_name].shape[1]),
                            "job_dir": str(Path(j.resolve(".")).resolve())},
                "rng": {"kind": "counter-based", "seed": j["job"]["seed"], "step": step,
                        "shuffle": "permutation(seed, epoch)"}}
        return save_checkpoint(ckdir, self.model, self.opt, self.comm, meta, keep=j["checkpoint"]["keep"],
                               on_tensor=self.faults.checkpoint_hook())

    def describe(self):
        if self.rank != 0:
            return
        g, p, j = self.graph, self.plan, self.job
        batch = (f"global batch {g.batch}" if self.accumulate == 1 else
                 f"global batch {g.batch * self.accumulate} in {self.accumulate} micro-batches of {g.batch}")
        lines = [f"job {j['job']['name']}: model {g.name} ({g.num_params():,d} parameters), "
                 f"{batch}, {self.world} ranks, plan {p.name or j['plan']['mode']} "
                 f"({self.search_seconds:.2f} s)"]
        extras = [f"optimizer {self.opt.describe()}"]
        if self.opt.clip_norm:
            extras.append(f"gradients clipped to norm {self.opt.clip_norm:g}")
        if j["train"]["label_smoothing"]:
            extras.append(f"label smoothing {j['train']['label_smoothing']:g}")
        for name, d in (("training", self.train_data), ("evaluation", self.test_data)):
            if d is not None and d.transform is not None:
                extras.append(f"{name} images: {d.transform.describe()} to "
                              f"{d.sample_shape[1]}x{d.sample_shape[2]} from {d.stored_shape[1]}x{d.stored_shape[2]}")
        lines.append("  " + "; ".join(extras))
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
