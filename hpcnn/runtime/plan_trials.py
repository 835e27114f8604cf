"""Measured trials of candidate plans: the search's choice checked by the clock.

A cost model is a prediction.  When the searched plan is predicted within
the model's own error of another plan (a baseline, or data parallelism),
the prediction cannot tell them apart; a few training steps of each can.
``run_trials`` builds each candidate's ``DistributedModel`` (collective),
times ``steps`` training steps after ``warmup`` ones on the same batches
(each step: a barrier, the step, the slowest rank's time), frees it, and
returns the candidates with their measured medians.  Candidates whose steps
overlap with the fastest's are timed again, in turns, for up to ``rounds``
rounds in all: a few steps on a shared machine often cannot separate plans
7% apart, more of them can.  Every rank gets the
same figures (they are reduced with MAX), so every rank picks the same
plan without a broadcast.

Nothing a trial does survives it: parameters are a pure function of the
seed, each candidate has its own model and optimiser (both dropped), data
reads are pure functions of (epoch, batch), and dropout masks of (seed,
step).  The run that follows is exactly the run with the chosen plan given
(tests/test_plan_trials.py checks it bitwise).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Candidate", "candidates", "run_trials", "time_in_rounds", "undecided", "fastest", "trials_wanted",
           "format_trials", "add_trial_arguments", "trial_argv"]


@dataclass
class Candidate:
    """A plan to try: its name (searched, data-parallel, ...), the plan and
    the cost model's prediction of its step (seconds, None if unpriced)."""
    name: str
    plan: object
    predicted_s: float | None
    measured_s: float | None = None
    steps_s: list = field(default_factory=list)
    rounds: int = 0

    @property
    def error(self) -> float | None:
        """(predicted - measured) / measured."""
        if self.predicted_s is None or not self.measured_s:
            return None
        return (self.predicted_s - self.measured_s) / self.measured_s


def candidates(plan, report, baseline_plans: dict, k: int) -> list[Candidate]:
    """The ``k`` cheapest predicted of the searched ``plan`` and the
    baselines (distinct plans only), and data parallelism when it is not
    among them.  ``report``: the search's report (its ``predicted`` and
    ``baselines`` totals)."""
    pred = {"searched": report["predicted"]["total_s"]}
    pred.update({n: b["total_s"] for n, b in report.get("baselines", {}).items()})
    pool = [Candidate("searched", plan, pred["searched"])]
    pool += [Candidate(n, p, pred.get(n)) for n, p in baseline_plans.items()]
    pool.sort(key=lambda c: (c.predicted_s if c.predicted_s is not None else float("inf"), c.name != "searched"))
    out, seen, dp = [], set(), None
    for c in pool:
        key = repr(sorted(c.plan.configs.items())) + repr(sorted(c.plan.ranks.items()))
        if key in seen:
            continue
        seen.add(key)
        if len(out) < k:
            out.append(c)
        elif c.name == "data-parallel":
            dp = c
    return out + ([dp] if dp is not None else [])


def trials_wanted(setting, report, plan, tolerance: float) -> int:
    """How many candidates to try for the job setting ``plan.trials``: an
    integer K (0: none), or "auto": 3 when a plan other than the searched
    ``plan`` is predicted within ``tolerance`` (the model's own relative
    error) of it, else none."""
    if isinstance(setting, bool) or not (isinstance(setting, int) or setting == "auto"):
        raise ValueError(f"plan.trials must be an integer or \"auto\", got {setting!r}")
    if isinstance(setting, int):
        return max(0, setting)
    if report is None:
        return 0
    best = report["predicted"]["total_s"]
    close = [n for n, b in report.get("baselines", {}).items()
             if b["total_s"] <= best * (1.0 + tolerance) and b.get("configs") != plan.configs]
    return 3 if close else 0


def undecided(cands: list) -> list:
    """The candidates the clock has not told apart yet: the fastest by
    median and every other whose timed steps reach below the fastest's
    slowest step (their ranges overlap), fastest first; empty when the
    fastest's every step beats every step of the others."""
    timed = [c for c in cands if c.steps_s]
    if len(timed) < 2:
        return []
    lead = min(timed, key=lambda c: (c.measured_s, c.name != "searched"))
    close = [c for c in timed if c is not lead and min(c.steps_s) <= max(lead.steps_s)]
    return [lead] + close if close else []


def run_trials(comm, graph, cands: list, batch_fn, make_optimizer, dtype=np.float32, seed=0,
               steps: int = 3, warmup: int = 1, rounds: int = 1, log=None) -> list:
    """Time every candidate (collective over ``comm``, an mpi4py
    communicator).  ``batch_fn(box, i)`` gives this rank's input tile
    (``box`` its input box under the candidate, None: feed None) and the
    whole batch's labels for trial step i; ``make_optimizer()`` a fresh
    optimiser.  After the first round, up to ``rounds - 1`` more rounds
    time again, in turns and in the opposite order each round (a drifting
    load then favours none), the candidates the clock has not told apart
    (``undecided``).  Returns ``cands`` with ``measured_s`` (median of all
    their timed steps), ``steps_s`` and ``rounds`` filled in."""
    from mpi4py import MPI

    from hpcnn.runtime.executor import DistributedModel

    def time_one(c):
        dm = DistributedModel(graph, c.plan, comm, dtype=np.dtype(dtype), seed=seed)
        opt = make_optimizer()
        if hasattr(opt, "attach"):
            opt.attach(dm)        # layer-wise norms and clipping sum over this candidate's shards
        box = dm.input_box()
        times = []
        for i in range(warmup + steps):
            x, labels = batch_fn(box, i)
            comm.Barrier()
            t = time.perf_counter()
            dm.train_step(x, labels, opt, step=i)
            dt = comm.allreduce(time.perf_counter() - t, op=MPI.MAX)
            if i >= warmup:
                times.append(dt)
        if hasattr(opt, "free"):
            opt.free()
        dm.free()
        c.steps_s = c.steps_s + times
        c.measured_s = statistics.median(c.steps_s)
        c.rounds += 1
        if log is not None:
            pred = f"{c.predicted_s * 1e3:.1f} ms" if c.predicted_s is not None else "-"
            log(f"trial {c.name}: measured {c.measured_s * 1e3:.1f} ms per step "
                f"(steps {', '.join(f'{t * 1e3:.1f}' for t in times)}), predicted {pred}")

    for c in cands:
        c.steps_s, c.measured_s, c.rounds = [], None, 0
    return time_in_rounds(cands, time_one, rounds, log)


def time_in_rounds(cands: list, time_one, rounds: int, log=None) -> list:
    """Round 1: ``time_one(c)`` for every candidate (it appends to
    ``c.steps_s`` and sets ``c.measured_s`` and ``c.rounds``); then, for up
    to ``rounds - 1`` more rounds, those ``undecided`` leaves, in the first
    round's order reversed every other round.  Returns ``cands``."""
    for c in cands:
        time_one(c)
    for r in range(1, max(1, int(rounds))):
        again = undecided(cands)
        if not again:
            break
        if log is not None:
            log(f"trial round {r + 1}: {', '.join(c.name for c in again)} not told apart "
                f"(their steps overlap): timing them again")
        turn = [c for c in cands if any(c is a for a in again)]
        for c in (turn if r % 2 == 0 else turn[::-1]):
            time_one(c)
    return cands


def add_trial_arguments(p, steps_help: str = "timed steps per trial (default 3)") -> None:
    """The options of a command that runs trials, with a job's defaults
    (plan.trial_steps, plan.trial_rounds, plan.trial_margin)."""
    p.add_argument("--trial-steps", type=int, default=3, metavar="S", help=steps_help)
    p.add_argument("--trial-rounds", type=int, default=3, metavar="N",
                   help="rounds of trials at most: after the first, the candidates whose steps overlap "
                        "with the fastest's are timed again (default 3)")
    p.add_argument("--trial-margin", type=float, default=0.05, metavar="F",
                   help="another plan replaces the searched one only when faster by more than this "
                        "fraction (default 0.05)")


def trial_argv(args) -> list:
    """Those options as given, to pass on to a command launched inside."""
    return ["--trial-steps", str(args.trial_steps), "--trial-rounds", str(args.trial_rounds),
            "--trial-margin", str(args.trial_margin)]


def fastest(cands: list, margin: float = 0.0) -> Candidate:
    """The candidate with the least measured step; the searched plan (the
    first among equals) stays unless another is faster by more than
    ``margin`` (relative), so that noise between a few steps does not swap
    plans from one run of a job to the next."""
    best = min(cands, key=lambda c: (c.measured_s, c.name != "searched"))
    searched = next((c for c in cands if c.name == "searched"), None)
    if searched is not None and best.measured_s >= searched.measured_s * (1.0 - margin):
        return searched
    return best


def format_trials(cands: list, chosen: Candidate) -> str:
    lines = ["plan trials (ms per step, slowest rank, median of the timed steps; predicted beside measured):",
             f"  {'plan':16s} {'measured':>9s} {'steps':>5s} {'predicted':>10s} {'error':>7s}"]
    for c in cands:
        pred = f"{c.predicted_s * 1e3:10.1f}" if c.predicted_s is not None else f"{'-':>10s}"
        err = f"{c.error * 100:+6.1f}%" if c.error is not None else f"{'-':>7s}"
        mark = "  <- chosen" if c is chosen else ""
        lines.append(f"  {c.name:16s} {c.measured_s * 1e3:9.1f} {len(c.steps_s):5d} {pred} {err}{mark}")
    return "\n".join(lines)
