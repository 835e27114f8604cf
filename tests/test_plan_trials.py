"""Measured trials of candidate plans (hpcnn.runtime.plan_trials): which
candidates are tried, that the fastest measured one is kept, that a job
trained after trials is bitwise the job trained with the chosen plan given,
and that measurements written into a machine file steer the next search."""
import copy
import dataclasses
import json
import sys

import h5py
import numpy as np
import pytest

from hpcnn.models import build_model
from hpcnn.runtime.plan_trials import Candidate, candidates, fastest, format_trials, trials_wanted, undecided
from hpcnn.strategy.machine import load_machine
from hpcnn.strategy.plan import Plan
from hpcnn.strategy.planner import search_plan
from mpi_launch import ROOT, run_mpi


def _report_and_plans(model="lenet5", ranks=2, batch=8):
    g = build_model(model, batch=batch)
    plan, rep = search_plan(g, ranks, "paper_p100_cluster")
    base = {n: Plan(g.name, ranks, g.batch, b["configs"], name=n) for n, b in rep["baselines"].items()}
    return g, plan, rep, base


def test_candidates_are_the_cheapest_distinct_plans_with_data_parallelism():
    g, plan, rep, base = _report_and_plans()
    for k in (1, 2, 3, 4):
        cands = candidates(plan, rep, base, k)
        names = [c.name for c in cands]
        assert 1 <= len(cands) <= k + 1
        keys = [json.dumps(c.plan.configs, sort_keys=True) for c in cands]
        assert len(set(keys)) == len(keys)                      # distinct plans
        dp = json.dumps(base["data-parallel"].configs, sort_keys=True)
        assert dp in keys                                        # data parallelism always
        assert names[0] == "searched"                            # the cheapest predicted
        preds = [c.predicted_s for c in cands if c.name != "data-parallel"]
        assert preds == sorted(preds)
    assert len(candidates(plan, rep, base, 4)) == len({json.dumps(p.configs, sort_keys=True)
                                                         for p in list(base.values()) + [plan]})


def test_auto_trials_only_when_another_plan_is_predicted_close():
    g, plan, rep, base = _report_and_plans()
    assert trials_wanted(0, rep, plan, 0.25) == 0 and trials_wanted(5, rep, plan, 0.25) == 5
    far = copy.deepcopy(rep)
    for b in far["baselines"].values():
        b["total_s"] = rep["predicted"]["total_s"] * 2
    assert trials_wanted("auto", far, plan, 0.25) == 0
    near = copy.deepcopy(far)
    near["baselines"]["owt"]["total_s"] = rep["predicted"]["total_s"] * 1.1
    near["baselines"]["owt"]["configs"] = {"x": {"n": 1}}
    assert trials_wanted("auto", near, plan, 0.25) == 3
    assert trials_wanted("auto", None, plan, 0.25) == 0
    with pytest.raises(ValueError, match="auto"):
        trials_wanted("sometimes", rep, plan, 0.25)


def test_the_fastest_measured_candidate_wins_and_the_table_says_so():
    c = [Candidate("searched", None, 1.0, 0.30), Candidate("data-parallel", None, 1.2, 0.20),
         Candidate("owt", None, 0.9, 0.20)]
    best = fastest(c)
    assert best.name in ("data-parallel", "owt") and best.measured_s == 0.20
    assert fastest([Candidate("searched", None, 1.0, 0.2), Candidate("owt", None, 1.0, 0.2)]).name == "searched"
    close = [Candidate("searched", None, 1.0, 0.200), Candidate("owt", None, 1.0, 0.195)]
    assert fastest(close).name == "owt" and fastest(close, margin=0.05).name == "searched"
    assert fastest([Candidate("searched", None, 1.0, 0.2), Candidate("owt", None, 1.0, 0.1)], 0.05).name == "owt"
    text = format_trials(c, best)
    assert "<- chosen" in text and "+233.3%" in text        # (1.0 - 0.3) / 0.3 for the searched plan


def test_measured_steps_in_the_machine_file_steer_the_search(tmp_path):
    g, plan, rep, base = _report_and_plans()
    m = copy.deepcopy(load_machine("paper_p100_cluster"))
    slower = base["model-parallel"]
    assert slower.configs != plan.configs
    m.record_plan_step(g, 2, plan, "float32", 0.5)
    m.record_plan_step(g, 2, slower, "float32", 0.1, name="model-parallel")
    m.save(tmp_path / "m.json")
    back = load_machine(tmp_path / "m.json")
    assert back.measured_step(g, 2, slower, "float32") == 0.1
    assert back.measured_step(g, 4, slower, "float32") is None          # another job size
    got, rep2 = search_plan(g, 2, back)
    assert got.configs == slower.configs and rep2["chosen"] == "model-parallel"
    assert "measured faster" in rep2["status"] and rep2["measured"]["model-parallel"] == 0.1
    # a measurement that says the searched plan is fastest keeps it
    back.record_plan_step(g, 2, plan, "float32", 0.05)
    again, rep3 = search_plan(g, 2, back)
    assert again.configs == plan.configs and rep3["chosen"] == "searched"


def _wrong_machine(path):
    """A machine file wrong on purpose: messages cost a second each, so the
    search keeps every layer on one rank (no communication at all), which
    leaves the other rank idle."""
    m = load_machine("local")
    m.runtime = {}
    m.intra = dataclasses.replace(m.intra, bandwidth=1.0, latency=1.0)
    m.inter = dataclasses.replace(m.inter, bandwidth=1.0, latency=1.0)
    m.save(path)
    return m


def _losses(metrics):
    rows = [json.loads(line) for line in open(metrics)]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def _tensors(ckdir):
    files = sorted(p for p in ckdir.iterdir() if p.suffix == ".h5")
    out = {}
    with h5py.File(files[-1], "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


@pytest.mark.slow
def test_a_trialled_job_is_the_job_with_the_chosen_plan(tmp_path):
    """With a machine file that prices communication absurdly, the search
    puts every layer on one rank; trials time it beside data parallelism and
    the baselines and keep the fastest measured.  The job that follows is
    bitwise the job run with that plan given: same losses, same weights and
    optimiser state in its checkpoint."""
    data = tmp_path / "digits.h5"
    r = run_mpi(1, [sys.executable, "-m", "hpcnn", "data", "digits", "-o", str(data)], timeout=300)
    assert r.returncode == 0, r.stderr
    machine = tmp_path / "wrong.json"
    _wrong_machine(machine)
    common = [f"data.path={json.dumps(str(data))}", "train.epochs=1", "train.max_steps=8", "train.log_every=1",
              "train.batch=128", "checkpoint.every_steps=4"]

    def train(name, extra, plan=None):
        sets = common + [f"checkpoint.dir={json.dumps(str(tmp_path / name))}",
                         f"log.metrics={json.dumps(str(tmp_path / (name + '.jsonl')))}"] + extra
        args = [sys.executable, "-m", "hpcnn", "train", str(ROOT / "jobs" / "digits.toml")]
        for s in sets:
            args += ["--set", s]
        if plan:
            args += ["--plan", str(plan)]
        r = run_mpi(2, args, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stderr

    log = train("trialled", [f"plan.machine={json.dumps(str(machine))}", "plan.trials=3",
                             f"plan.save={json.dumps(str(tmp_path / 'chosen.json'))}"])
    assert "plan trials" in log, log[-3000:]
    chosen = Plan.load(tmp_path / "chosen.json")
    trials = chosen.meta["trials"]
    names = [t["name"] for t in trials]
    assert "searched" in names and len(trials) >= 2
    best = min(trials, key=lambda t: t["measured_s"])
    searched = next(t for t in trials if t["name"] == "searched")
    want = best["name"] if best["measured_s"] < searched["measured_s"] * 0.95 else "searched"
    assert chosen.meta["chosen"] == want
    train("given", [], plan=tmp_path / "chosen.json")
    assert _losses(tmp_path / "trialled.jsonl") == _losses(tmp_path / "given.jsonl")
    a, b = _tensors(tmp_path / "trialled"), _tensors(tmp_path / "given")
    assert a.keys() == b.keys() and a
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_undecided_candidates_are_the_fastest_and_those_whose_steps_overlap_it():
    a = Candidate("searched", None, 1.0, 0.20, [0.19, 0.20, 0.21])
    b = Candidate("owt", None, 1.0, 0.22, [0.205, 0.22, 0.25])     # reaches below a's slowest step
    c = Candidate("data-parallel", None, 1.0, 0.40, [0.39, 0.40, 0.41])
    assert undecided([c, b, a]) == [a, b]
    b.steps_s = [0.215, 0.22, 0.25]
    assert undecided([a, b, c]) == []
    assert undecided([a]) == [] and undecided([]) == []


def test_trial_rounds_time_again_only_what_the_clock_has_not_told_apart(monkeypatch):
    """run_trials with a scripted clock: per plan, the durations of its
    successive steps.  After round 1 owt's steps overlap with the
    searched plan's, data parallelism's do not: rounds 2 and 3 time those
    two again (in turns, reversed order in round 2); the medians are over
    all timed steps, and with rounds=1 the first round's order stands."""
    from mpi4py import MPI

    import hpcnn.runtime.executor as executor
    import hpcnn.runtime.plan_trials as trials
    script = {"searched": [9, 0.20, 0.22, 0.21, 9, 0.20, 0.20, 0.20, 9, 0.20, 0.20, 0.20],
              "owt": [9, 0.19, 0.19, 0.30, 9, 0.23, 0.24, 0.23, 9, 0.23, 0.24, 0.23],
              "data-parallel": [9, 0.50, 0.52, 0.51]}
    clock, order = [0.0], []

    class FakeModel:
        def __init__(self, graph, plan, comm, dtype=None, seed=0):
            self.name, order[len(order):] = plan, [plan]

        def input_box(self):
            return None

        def train_step(self, x, labels, opt, step=0):
            clock[0] += script[self.name].pop(0)

        def free(self):
            pass

    monkeypatch.setattr(executor, "DistributedModel", FakeModel)
    monkeypatch.setattr(trials.time, "perf_counter", lambda: clock[0])

    def cands():
        return [Candidate(n, n, 1.0) for n in ("searched", "owt", "data-parallel")]

    one = trials.run_trials(MPI.COMM_SELF, None, cands(), lambda box, i: (None, None), lambda: None,
                            steps=3, rounds=3)
    assert order == ["searched", "owt", "data-parallel", "owt", "searched", "searched", "owt"]
    by = {c.name: c for c in one}
    assert [len(by[n].steps_s) for n in ("searched", "owt", "data-parallel")] == [9, 9, 3]
    assert [by[n].rounds for n in ("searched", "owt", "data-parallel")] == [3, 3, 1]
    assert by["searched"].measured_s == pytest.approx(0.20) and by["owt"].measured_s == pytest.approx(0.23)
    assert trials.fastest(one).name == "searched"
    # one round: owt's first three steps (median 0.19) would have won
    script.update(searched=[9, 0.20, 0.22, 0.21], owt=[9, 0.19, 0.19, 0.30], **{"data-parallel": [9, 0.5, 0.5, 0.5]})
    order.clear()
    first = trials.run_trials(MPI.COMM_SELF, None, cands(), lambda box, i: (None, None), lambda: None,
                              steps=3, rounds=1)
    assert order == ["searched", "owt", "data-parallel"] and trials.fastest(first).name == "owt"
