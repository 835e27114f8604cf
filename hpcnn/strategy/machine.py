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
MACHINES_DIR = Path(__file__).resolve().parents[1] / "machines"


class MachineError(ValueError):
    """A machine file that is missing, malformed or lacks a figure."""


@dataclass(frozen=True)
class Link:
    bandwidth: float      # bytes per second, one direction
    latency: float        # seconds per message

    def time(self, nbytes: float, messages: float = 1.0) -> float:
        return nbytes / self.bandwidth + messages * self.latency


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
    path: str | None = None

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
        per = self.device.get("kind_efficiency", {})
        return float(per.get(kind, self.device.get("compute_efficiency", 1.0)))

    def roofline(self, kind: str, flops: float, nbytes: float, ops: int = 1) -> float:
        """Seconds to do ``flops`` floating-point operations touching
        ``nbytes`` bytes of memory (the slower of the two) plus the fixed
        overhead of ``ops`` op invocations."""
        t_f = flops / (self.peak_flops * self.efficiency(kind))
        t_m = nbytes / (self.memory_bandwidth * float(self.device.get("memory_efficiency", 1.0)))
        return max(t_f, t_m) + ops * float(self.device.get("op_overhead_s", 0.0))

    def oversubscription(self, ranks: int) -> float:
        """Slow-down of compute when more ranks share a node than it has
        compute slots (cores of a CPU node; 1 for GPU nodes)."""
        slots = self.slots_per_node or self.ranks_per_node
        on_node = min(int(ranks), self.ranks_per_node)
        return max(1.0, on_node / slots)

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
             "figures": self.figures}
        if self.slots_per_node is not None:
            d["slots_per_node"] = self.slots_per_node
        if self.gradient_sync != "allreduce":
            d["gradient_sync"] = self.gradient_sync
        if self.measured:
            d["measured"] = self.measured
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
            return cls(name=str(d["name"]), ranks_per_node=rpn, nodes=int(d.get("nodes", 1)),
                       device=dev, intra=intra, inter=inter,
                       slots_per_node=d.get("slots_per_node"), gradient_sync=sync,
                       description=d.get("description", ""),
                       figures=list(d.get("figures", [])), measured=dict(d.get("measured", {})),
                       path=str(path) if path else None)
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
