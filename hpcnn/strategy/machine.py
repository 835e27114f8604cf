"""Machine descriptions: the figures the cost model needs, as JSON files.

A machine is a number of identical nodes, ``ranks_per_node`` MPI ranks on
each (one per GPU, or one per core), placed in blocks (ranks 0..R-1 on the
first node, R..2R-1 on the second, ...).  It says how fast one rank computes
(a roofline: peak floating-point rate and memory bandwidth, each with an
efficiency factor, plus a fixed overhead per op), and how fast ranks talk
(bandwidth and latency inside a node, and of each node's network port).
Gradients are synchronised by an allreduce over each parameter's replicas
(what hpcnn does); ``"gradient_sync": "parameter_server"`` prices the paper's
parameter server instead (for comparisons with its numbers).
A machine may carry a *measured* table of op times (written by
``hpcnn calibrate``) that the cost model prefers to the roofline.

A calibrated machine may also carry ``runtime`` figures per job size (the
number of ranks sharing the node): op tiles timed while every rank computes
at once (so oversubscribed cores and shared memory bandwidth are in the
figure), the cost of hpcnn's exchanges and allreduces as they occur between
computations (latency and bandwidth; with more ranks than cores a
collective costs scheduling time, milliseconds rather than microseconds),
and the executor's own time per layer and per step.  See
``RuntimeFigures``; the cost model uses them for jobs of that size.

A file written by ``hpcnn calibrate`` also records the layout its links
were measured on (``nodes``, ``ranks_per_node`` and the node names,
``hosts``) and the version of the cost model whose terms its figures are in
(``cost_model_version``); ``stale_warning`` says when a job's layout or
this hpcnn's cost model no longer fits them.

Files live in ``hpcnn/machines/`` (``Machine.load('paper_p100_cluster')``)
or anywhere (``Machine.load('path/to/file.json')``).  Every figure a file
assumes is listed under ``figures`` with its source.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

MACHINE_SCHEMA_VERSION = 1
#: The version of the cost model that the figures of a machine file are
#: meant for; ``hpcnn calibrate`` writes it as ``cost_model_version`` (files
#: without it are version 1).  Bump it whenever the cost model changes what a
#: figure means (what a latency or bandwidth covers, which runtime figures it
#: reads and how), so that jobs searching with an older file say that it
#: needs re-calibrating.
#: Version 3: op tiles are timed in the memory layout the runtime feeds them
#: (channels-last), the roofline has a fixed cost and a rate per op kind,
#: the per-byte figures of exchanges and allreduces are measured directly
#: instead of fitted, and allreduces across nodes are priced by the measured
#: collectives.
#: Version 4: a layer that reads the network's input is priced by its own
#: tile (the node-cost cache keyed it by op and shapes alone, so the fitted
#: runtime figures of older files -- skew above all -- absorbed the
#: mispriced compute of the calibration networks), and the fitted waits
#: after a stretch of compute stop growing within 4 ms (``skew_cap_s`` and
#: ``exchange_skew_cap_s`` are finite; older fits could leave them unbounded).
COST_MODEL_VERSION = 4
MACHINES_DIR = Path(__file__).resolve().parents[1] / "machines"


#: the op kind whose measured efficiency stands in for a kind the machine
#: file has no figure for (the same kind of kernel on one more axis)
KIND_FALLBACK = {"conv3d": "conv2d", "maxpool3d": "maxpool2d", "avgpool3d": "avgpool2d",
                 "mse": "softmax_xent", "tanh": "sigmoid"}


def _kind_in(table: dict, kind):
    """``kind``, or its 2-D counterpart when only that has a figure in ``table``."""
    if kind not in table and KIND_FALLBACK.get(kind) in table:
        return KIND_FALLBACK[kind]
    return kind


class MachineError(ValueError):
    """A machine file that is missing, malformed or lacks a figure."""


@dataclass(frozen=True)
class Link:
    bandwidth: float      # bytes per second, one direction
    latency: float        # seconds per message

    def time(self, nbytes: float, messages: float = 1.0) -> float:
        return nbytes / self.bandwidth + messages * self.latency


@dataclass
class RuntimeFigures:
    """hpcnn's runtime on this machine for jobs of ``ranks`` ranks per node
    (all measured by ``hpcnn calibrate`` with that many ranks running):

    ops              op-tile times (forward + backward) taken while every
                     rank runs the same tile; keyed like ``measured.ops``
    compute_factor   median of (time with every rank running) / (time alone)
                     over the tiles measured both ways: applied to tiles
                     that have only a solo time
    exchange         an exchange (one direction) between computations:
                     latency per exchange that moves data, bandwidth of the
                     busiest rank's bytes
    copy_bandwidth   bytes per second of assembling a rank's input region
                     (or summing its gradient) from its own tile
    allreduce_latency {group size: seconds} of one allreduce between
                     computations; allreduce_bandwidth for its bytes
    node_overhead_s  executor time per layer and step beyond the op itself
    step_overhead_s  per step: loss reduction, optimiser, bookkeeping
    tile_inflation   a layer inside a step costs (1 + tile_inflation) times
                     its tile's figure: its data are colder, and BLAS threads
                     idler, than in a tile timed over and over
    skew, skew_cap_s after each stretch of compute that ends in a
                     reduction (batch-norm statistics, the loss, the
                     gradients), the ranks wait min(skew * stretch,
                     skew_cap_s) for the slowest, whose share of the cores
                     varies by up to a few scheduler time slices
    exchange_skew, exchange_skew_cap_s
                     the same after a stretch that ends in an exchange that
                     moves data (None: as after a reduction); measured apart
                     because the two waits differ when ranks outnumber cores
    nodes            the nodes the figures were measured on (1: one node,
                     ``ranks`` ranks on it; more: a job of ``ranks`` ranks
                     across that many nodes, ``hpcnn calibrate --cluster``).
                     The per-byte figures of exchanges and allreduces are
                     those inside a node either way; bytes across nodes are
                     priced by the inter-node link and collectives.
    """
    ranks: int
    ops: dict = field(default_factory=dict)
    compute_factor: float = 1.0
    exchange: Link | None = None
    copy_bandwidth: float | None = None
    allreduce_latency: dict = field(default_factory=dict)
    allreduce_bandwidth: float | None = None
    node_overhead_s: float = 0.0
    step_overhead_s: float = 0.0
    tile_inflation: float = 0.0
    skew: float = 0.0
    skew_cap_s: float = math.inf
    exchange_skew: float | None = None
    exchange_skew_cap_s: float = math.inf
    blas_threads: int | None = None
    nodes: int = 1

    def wait_after(self, stretch: float, exchange: bool) -> float:
        """Seconds the ranks wait for the slowest after ``stretch`` seconds
        of compute that end in an exchange (``exchange``) or a reduction."""
        if stretch <= 0:
            return 0.0
        if exchange and self.exchange_skew is not None:
            return min(self.exchange_skew * stretch, self.exchange_skew_cap_s)
        return min(self.skew * stretch, self.skew_cap_s)

    def allreduce_alpha(self, group: int) -> float | None:
        """Latency of an allreduce over ``group`` ranks: the measured figure,
        else that of the nearest measured group size scaled by
        ceil(log2 group) (the steps of a tree or recursive doubling)."""
        if group <= 1:
            return 0.0
        lat = self.allreduce_latency
        if not lat:
            return None
        if group in lat:
            return float(lat[group])
        near = min(lat, key=lambda g: (abs(math.log2(g) - math.log2(group)), g))
        return float(lat[near]) * math.ceil(math.log2(group)) / max(1, math.ceil(math.log2(near)))

    def to_dict(self) -> dict:
        d = {"ranks": self.ranks, "compute_factor": self.compute_factor,
             "node_overhead_s": self.node_overhead_s, "step_overhead_s": self.step_overhead_s,
             "tile_inflation": self.tile_inflation, "skew": self.skew}
        if math.isfinite(self.skew_cap_s):
            d["skew_cap_s"] = self.skew_cap_s
        if self.exchange_skew is not None:
            d["exchange_skew"] = self.exchange_skew
            if math.isfinite(self.exchange_skew_cap_s):
                d["exchange_skew_cap_s"] = self.exchange_skew_cap_s
        if self.blas_threads is not None:
            d["blas_threads"] = self.blas_threads
        if self.nodes != 1:
            d["nodes"] = self.nodes
        if self.exchange is not None:
            d["exchange"] = {"latency": self.exchange.latency, "bandwidth": self.exchange.bandwidth}
        if self.copy_bandwidth is not None:
            d["copy_bandwidth"] = self.copy_bandwidth
        if self.allreduce_latency:
            d["allreduce"] = {"latency": {str(k): v for k, v in sorted(self.allreduce_latency.items())},
                              "bandwidth": self.allreduce_bandwidth}
        d["ops"] = self.ops
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "runtime figures") -> "RuntimeFigures":
        try:
            ex = d.get("exchange")
            ar = d.get("allreduce") or {}
            rf = cls(ranks=int(d["ranks"]), ops=dict(d.get("ops", {})),
                     compute_factor=float(d.get("compute_factor", 1.0)),
                     exchange=Link(float(ex["bandwidth"]), float(ex["latency"])) if ex else None,
                     copy_bandwidth=float(d["copy_bandwidth"]) if d.get("copy_bandwidth") else None,
                     allreduce_latency={int(k): float(v) for k, v in ar.get("latency", {}).items()},
                     allreduce_bandwidth=float(ar["bandwidth"]) if ar.get("bandwidth") else None,
                     node_overhead_s=float(d.get("node_overhead_s", 0.0)),
                     step_overhead_s=float(d.get("step_overhead_s", 0.0)),
                     tile_inflation=float(d.get("tile_inflation", 0.0)),
                     skew=float(d.get("skew", 0.0)),
                     skew_cap_s=float(d.get("skew_cap_s", math.inf)),
                     exchange_skew=float(d["exchange_skew"]) if d.get("exchange_skew") is not None else None,
                     exchange_skew_cap_s=float(d.get("exchange_skew_cap_s", math.inf)),
                     blas_threads=d.get("blas_threads"), nodes=int(d.get("nodes", 1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise MachineError(f"{where}: malformed ({exc!r}); re-run hpcnn calibrate") from None
        if rf.exchange is not None and not (rf.exchange.bandwidth > 0 and rf.exchange.latency >= 0):
            raise MachineError(f"{where}: exchange needs a positive bandwidth, got {rf.exchange}")
        return rf


@dataclass
class Machine:
    name: str
    ranks_per_node: int
    nodes: int
    device: dict
    intra: Link
    inter: Link
    slots_per_node: int | None = None
    gradient_sync: str = "allreduce"
    description: str = ""
    figures: list = field(default_factory=list)
    measured: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)       # {ranks: RuntimeFigures}
    #: measured training steps of whole plans (``hpcnn plan --trials K
    #: --update-machine``): what the planner trusts over its prediction
    measured_plans: list = field(default_factory=list)
    path: str | None = None
    hosts: list = field(default_factory=list)          # nodes the links were calibrated on ([]: not recorded)
    cost_model_version: int = COST_MODEL_VERSION
    #: the collectives ``hpcnn calibrate`` measured ({name: {"group",
    #: "latency", "bandwidth", "bus_bandwidth"}}, names as
    #: ``collectives.allreduce.inter_node``); the cost model prices
    #: allreduces across nodes with them
    collectives: dict = field(default_factory=dict)

    # ---- compute ---------------------------------------------------------
    @property
    def peak_flops(self) -> float:
        return float(self.device["peak_flops"])

    @property
    def memory_bandwidth(self) -> float:
        return float(self.device["memory_bandwidth"])

    @property
    def memory_bytes(self) -> float:
        return float(self.device.get("memory_bytes", math.inf))

    def efficiency(self, kind: str) -> float:
        """Share of the peak flop rate an op of ``kind`` reaches on large
        tiles (``device.kind_efficiency``, else ``compute_efficiency``).  A
        kind without a figure of its own takes its 2-D counterpart's
        (``KIND_FALLBACK``: a machine calibrated before the 3-D ops existed
        prices conv3d as conv2d); the same for the two figures below."""
        per = self.device.get("kind_efficiency", {})
        return float(per.get(_kind_in(per, kind), self.device.get("compute_efficiency", 1.0)))

    def memory_efficiency(self, kind: str | None = None) -> float:
        """Share of the memory bandwidth an op of ``kind`` reaches
        (``device.kind_memory_efficiency``, else ``memory_efficiency``)."""
        per = self.device.get("kind_memory_efficiency", {}) if kind is not None else {}
        return float(per.get(_kind_in(per, kind), self.device.get("memory_efficiency", 1.0)))

    def op_overhead(self, kind: str | None = None) -> float:
        """Fixed seconds of one call of an op of ``kind``, forward and
        backward (``device.kind_overhead_s``, else ``op_overhead_s``)."""
        per = self.device.get("kind_overhead_s", {}) if kind is not None else {}
        return float(per.get(_kind_in(per, kind), self.device.get("op_overhead_s", 0.0)))

    def roofline(self, kind: str, flops: float, nbytes: float, ops: int = 1) -> float:
        """Seconds to do ``flops`` floating-point operations touching
        ``nbytes`` bytes of memory (the slower of the two) plus the fixed
        cost of ``ops`` calls of an op of ``kind``."""
        t_f = flops / (self.peak_flops * self.efficiency(kind))
        t_m = nbytes / (self.memory_bandwidth * self.memory_efficiency(kind))
        return max(t_f, t_m) + ops * self.op_overhead(kind)

    def oversubscription(self, ranks: int) -> float:
        """Slow-down of compute when more ranks share a node than it has
        compute slots (cores of a CPU node; 1 for GPU nodes)."""
        slots = self.slots_per_node or self.ranks_per_node
        on_node = min(int(ranks), self.ranks_per_node)
        return max(1.0, on_node / slots)

    # ---- measured plans ------------------------------------------------------
    @staticmethod
    def plan_key(graph, ranks: int, plan, dtype: str) -> dict:
        """What identifies a measured plan: the network (name, batch, input
        shape), the job size, the dtype and every layer's configuration."""
        return {"model": graph.name, "batch": int(graph.batch), "input": list(graph[graph.input_name].shape),
                "ranks": int(ranks), "dtype": str(dtype),
                "configs": json.dumps(plan.configs, sort_keys=True), "rank_lists": json.dumps(plan.ranks, sort_keys=True)}

    def record_plan_step(self, graph, ranks: int, plan, dtype: str, measured_s: float, **extra) -> None:
        """Remember the measured step of ``plan`` (replacing an older one)."""
        key = self.plan_key(graph, ranks, plan, dtype)
        self.measured_plans = [m for m in self.measured_plans if {k: m.get(k) for k in key} != key]
        self.measured_plans.append(dict(key, measured_s=float(measured_s), **extra))

    def measured_step(self, graph, ranks: int, plan, dtype: str) -> float | None:
        """The measured step of ``plan`` on this machine, if it was measured."""
        key = self.plan_key(graph, ranks, plan, dtype)
        for m in self.measured_plans:
            if {k: m.get(k) for k in key} == key:
                return float(m["measured_s"])
        return None

    def runtime_at(self, ranks: int) -> RuntimeFigures | None:
        """The runtime figures for a job of ``ranks`` ranks: those calibrated
        with that many ranks (on one node, or across nodes on a file
        calibrated across them), else those with as many ranks on the node
        (min(ranks, ranks_per_node)), else None (the cost model then uses
        the links and the roofline)."""
        if int(ranks) in self.runtime:
            return self.runtime[int(ranks)]
        on_node = min(int(ranks), self.ranks_per_node)
        return self.runtime.get(on_node)

    def allreduce_across(self, group: int, share: float = 1.0):
        """(latency s, bus bandwidth B/s) of an allreduce over ``group``
        ranks that spans nodes, from the measured collectives: over all
        ranks when ``group`` is their number (``allreduce.all_ranks``, or
        ``allreduce.inter_node`` with one rank per node), else the
        inter-node one with its bandwidth shared by ``share`` groups at once
        and its latency scaled by the steps, ceil(log2 group).  None when
        the file has no such measurement (the link model prices it then)."""
        c = self.collectives
        for name in ("allreduce.all_ranks", "allreduce.inter_node"):
            f = c.get(name)
            if f and int(f.get("group", 0)) == int(group) and f.get("bus_bandwidth"):
                return float(f["latency"]), float(f["bus_bandwidth"])
        f = c.get("allreduce.inter_node")
        if not f or not f.get("bus_bandwidth"):
            return None
        g0 = max(2, int(f.get("group", 2)))
        steps = math.ceil(math.log2(max(2, group))) / math.ceil(math.log2(g0))
        return float(f["latency"]) * steps, float(f["bus_bandwidth"]) / max(1.0, float(share))

    # ---- placement -----------------------------------------------------------
    def node_of(self, rank: int) -> int:
        return int(rank) // self.ranks_per_node

    def nodes_for(self, ranks: int) -> int:
        return -(-int(ranks) // self.ranks_per_node)

    # ---- serialisation -----------------------------------------------------
    def to_dict(self) -> dict:
        d = {"schema_version": MACHINE_SCHEMA_VERSION, "name": self.name,
             "description": self.description, "nodes": self.nodes,
             "ranks_per_node": self.ranks_per_node, "device": self.device,
             "links": {"intra_node": {"bandwidth": self.intra.bandwidth, "latency": self.intra.latency},
                       "inter_node": {"bandwidth": self.inter.bandwidth, "latency": self.inter.latency}},
             "figures": self.figures, "cost_model_version": self.cost_model_version}
        if self.hosts:
            d["hosts"] = list(self.hosts)
        if self.slots_per_node is not None:
            d["slots_per_node"] = self.slots_per_node
        if self.gradient_sync != "allreduce":
            d["gradient_sync"] = self.gradient_sync
        if self.measured:
            d["measured"] = self.measured
        if self.collectives:
            d["collectives"] = self.collectives
        if self.measured_plans:
            d["measured_plans"] = self.measured_plans
        if self.runtime:
            d["runtime"] = {str(k): v.to_dict() for k, v in sorted(self.runtime.items())}
        return d

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, d: dict, path=None) -> "Machine":
        where = f"machine file {path}" if path else "machine description"
        if not isinstance(d, dict) or d.get("schema_version") != MACHINE_SCHEMA_VERSION:
            raise MachineError(f"{where}: schema_version must be {MACHINE_SCHEMA_VERSION}, "
                               f"got {d.get('schema_version') if isinstance(d, dict) else d!r}")
        try:
            dev = dict(d["device"])
            for k in ("peak_flops", "memory_bandwidth"):
                if not float(dev[k]) > 0:
                    raise MachineError(f"{where}: device.{k} must be positive, got {dev[k]!r}")
            links = d["links"]
            intra = Link(float(links["intra_node"]["bandwidth"]), float(links["intra_node"]["latency"]))
            inter = Link(float(links["inter_node"]["bandwidth"]), float(links["inter_node"]["latency"]))
            for nm, l in (("intra_node", intra), ("inter_node", inter)):
                if not (l.bandwidth > 0 and l.latency >= 0):
                    raise MachineError(f"{where}: links.{nm} needs a positive bandwidth and a "
                                       f"non-negative latency, got {l}")
            sync = d.get("gradient_sync", "allreduce")
            if sync not in ("allreduce", "parameter_server"):
                raise MachineError(f"{where}: gradient_sync must be 'allreduce' or 'parameter_server', "
                                   f"got {sync!r}")
            rpn = int(d["ranks_per_node"])
            if rpn < 1:
                raise MachineError(f"{where}: ranks_per_node must be at least 1, got {rpn}")
            version = d.get("cost_model_version", 1)
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise MachineError(f"{where}: cost_model_version must be a positive integer, got {version!r}")
            hosts = d.get("hosts", [])
            if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
                raise MachineError(f"{where}: hosts must be a list of node names, got {hosts!r}")
            coll = d.get("collectives", {})
            if not isinstance(coll, dict) or not all(isinstance(v, dict) for v in coll.values()):
                raise MachineError(f"{where}: collectives must map names to figures, got {coll!r}")
            runtime = {}
            for k, v in (d.get("runtime") or {}).items():
                rf = RuntimeFigures.from_dict(v, f"{where}: runtime.{k}")
                if rf.ranks != int(k):
                    raise MachineError(f"{where}: runtime.{k} says ranks {rf.ranks}")
                runtime[rf.ranks] = rf
            return cls(name=str(d["name"]), ranks_per_node=rpn, nodes=int(d.get("nodes", 1)),
                       device=dev, intra=intra, inter=inter,
                       slots_per_node=d.get("slots_per_node"), gradient_sync=sync,
                       description=d.get("description", ""),
                       figures=list(d.get("figures", [])), measured=dict(d.get("measured", {})),
                       runtime=runtime, measured_plans=list(d.get("measured_plans", [])),
                       path=str(path) if path else None, hosts=list(hosts), cost_model_version=version,
                       collectives=dict(coll))
        except KeyError as exc:
            raise MachineError(f"{where}: missing the key {exc.args[0]!r}") from None

    @classmethod
    def load(cls, name_or_path) -> "Machine":
        """A machine by file path, or by name from hpcnn/machines/."""
        p = Path(str(name_or_path))
        if not p.is_file():
            q = MACHINES_DIR / (str(name_or_path) + ("" if str(name_or_path).endswith(".json") else ".json"))
            if not q.is_file():
                known = ", ".join(sorted(x.stem for x in MACHINES_DIR.glob("*.json")))
                raise MachineError(f"machine {str(name_or_path)!r} is neither a file nor a known "
                                   f"machine ({known}); run `hpcnn calibrate` to describe this one")
            p = q
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise MachineError(f"machine file {p} is not valid JSON: {exc}") from None
        return cls.from_dict(d, p)


def block_layout(ranks: int, ranks_per_node: int) -> list[int]:
    """Ranks on each node when ``ranks`` ranks fill nodes of
    ``ranks_per_node`` in blocks (how a machine places them)."""
    ranks, rpn = int(ranks), max(1, int(ranks_per_node))
    return [min(rpn, ranks - i) for i in range(0, ranks, rpn)] or [0]


def even_layout(ranks: int, nodes: int) -> list[int]:
    """Ranks on each of ``nodes`` nodes when ``ranks`` are spread evenly."""
    base, extra = divmod(int(ranks), max(1, int(nodes)))
    return [base + 1] * extra + [base] * (max(1, int(nodes)) - extra)


def _layout_text(per_node: list[int], hosts=()) -> str:
    n = len(per_node)
    nodes = f"{n} node{'s' if n != 1 else ''}"
    if len(set(per_node)) == 1:
        text = f"{nodes} x {per_node[0]} rank{'s' if per_node[0] != 1 else ''}"
    else:
        text = f"{nodes} with {', '.join(map(str, per_node))} ranks"
    return text + (f" ({', '.join(hosts)})" if hosts else "")


def stale_warning(machine: Machine, per_node: list[int] | None = None) -> str | None:
    """One line saying why ``machine`` does not fit a job whose ranks sit
    ``per_node[i]`` on its node i (None: no layout known), or None when it
    fits:

    - its links were calibrated (``hosts`` recorded) on another layout: a
      different node count, or, for a file calibrated across nodes,
      different ranks on a node (a file calibrated on one node holds for any
      number of ranks on it: its runtime figures are per job size);
    - its ``cost_model_version`` is not this hpcnn's ``COST_MODEL_VERSION``.

    The line says what differs and to re-run ``hpcnn calibrate``."""
    where = machine.path or machine.name
    what, layout = [], False
    if per_node and machine.hosts:
        mine = [machine.ranks_per_node] * machine.nodes
        if len(per_node) != machine.nodes or (machine.nodes > 1 and any(r != machine.ranks_per_node
                                                                        for r in per_node)):
            calibrated = (_layout_text(mine, machine.hosts) if machine.nodes > 1
                          else f"1 node ({', '.join(machine.hosts)}; links.inter_node not measured)")
            what.append(f"calibrated on {calibrated}, this job runs on {_layout_text(per_node)}")
            layout = True
    v = machine.cost_model_version
    if v < COST_MODEL_VERSION:
        what.append(f"written for cost-model version {v}, older than this hpcnn's {COST_MODEL_VERSION}")
    elif v > COST_MODEL_VERSION:
        what.append(f"written for cost-model version {v} by a newer hpcnn (this one's is {COST_MODEL_VERSION})")
    if not what:
        return None
    if layout:
        todo = ("re-run hpcnn calibrate with the job's layout (--hosts NODE,NODE --ppn R, --launcher srun "
                "inside a Slurm allocation, or --cluster NAME; docs/cluster.md)")
    else:
        todo = "re-run hpcnn calibrate to measure it again (docs/cluster.md, Calibration)"
    return (f"hpcnn: warning: machine file {where}: {'; '.join(what)}. The plan search prices this job "
            f"with figures that may not fit it: {todo}")


def parameter_server_time(nbytes: float, group: int, link: Link) -> float:
    """Gradient synchronisation through a parameter server holding the
    shard (the paper's assumption): every replica pushes its gradient and
    pulls the new values, so the server's link carries ``group`` shards each
    way."""
    if group <= 1 or nbytes <= 0:
        return 0.0
    return group * nbytes / link.bandwidth + 2 * link.latency


def allreduce_time(nbytes: float, group: int, link: Link, share: float = 1.0) -> float:
    """Allreduce of ``nbytes`` over ``group`` ranks: reduce-scatter plus
    allgather (Rabenseifner; what MPI libraries use for large messages):
    2 (g-1)/g of the bytes cross each rank's link, in 2 ceil(log2 g) steps.
    ``share``: how many such allreduces share the link at once."""
    if group <= 1 or nbytes <= 0:
        return 0.0
    steps = 2 * math.ceil(math.log2(group))
    return 2.0 * (group - 1) / group * nbytes * share / link.bandwidth + steps * link.latency


def load_machine(name_or_path) -> Machine:
    """A machine by name (hpcnn/machines/NAME.json) or by file path."""
    return Machine.load(name_or_path)
