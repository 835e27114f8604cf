"""Plan: one configuration (a degree per output dimension, and the ranks
used) per layer of a graph, saved as JSON with a schema version.

The runtime executes a Plan; the search produces one; baselines (data
parallel, model parallel, OWT) are Plans built by ``hpcnn.strategy.baselines``.
Every rank validates the plan it receives against its graph and world size.
"""
from __future__ import annotations

import json
from pathlib import Path

from hpcnn.parallel.layout import DIM_NAMES, Layout, LayoutError, degrees_from_config

SCHEMA_VERSION = 1


class PlanError(ValueError):
    """A plan that does not fit the model, the world size or a layer."""


class Plan:
    """Per-layer configurations.

    configs[node] = {"n": pn, "c": pc, "h": ph, "w": pw} (missing dims are 1);
    ranks[node]   = explicit world ranks (optional; default 0..k-1).
    """

    def __init__(self, model: str, world: int, batch: int, configs: dict,
                 ranks: dict | None = None, meta: dict | None = None, name: str = ""):
        self.model = str(model)
        self.world = int(world)
        self.batch = int(batch)
        self.configs = {k: {d: int(v) for d, v in c.items() if int(v) != 1 or d == "n"}
                        for k, c in configs.items()}
        self.ranks = {k: [int(r) for r in v] for k, v in (ranks or {}).items()}
        self.meta = dict(meta or {})
        self.name = name

    # ---- layouts -----------------------------------------------------------
    def config(self, node: str) -> dict:
        return dict(self.configs.get(node, {"n": 1}))

    def layout(self, graph, node: str) -> Layout:
        """The layout of ``node``'s output tensor under this plan."""
        shape = graph[node].shape
        try:
            deg = degrees_from_config(shape, self.config(node))
            return Layout(shape, deg, self.ranks.get(node), world=self.world)
        except LayoutError as exc:
            raise PlanError(f"plan {self.name or self.model!r}, layer {node!r}: {exc}") from None

    def layouts(self, graph) -> dict[str, Layout]:
        return {n.name: self.layout(graph, n.name) for n in graph}

    def validate(self, graph, world: int | None = None) -> None:
        """Raise PlanError (naming the layer and the value) unless this plan
        fits ``graph`` and a job of ``world`` ranks."""
        if world is not None and world != self.world:
            raise PlanError(f"the plan was made for {self.world} ranks but the job has {world}; "
                            f"search a new plan or pass one for {world} ranks")
        if self.model and graph.name and self.model != graph.name:
            raise PlanError(f"the plan is for model {self.model!r} but the job runs {graph.name!r}")
        if graph.batch != self.batch:
            raise PlanError(f"the plan is for global batch {self.batch} but the job's batch is {graph.batch}")
        missing = [n.name for n in graph if n.name not in self.configs]
        if missing:
            raise PlanError(f"the plan has no configuration for layer(s) {missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}")
        extra = [k for k in self.configs if k not in graph.nodes]
        if extra:
            raise PlanError(f"the plan names layer(s) {extra[:5]} that model {graph.name!r} does not have")
        for n in graph:
            L = self.layout(graph, n.name)
            split = [d for d, deg in zip(L.dims, L.degrees) if deg > 1]
            bad = [d for d in split if d not in n.op.splittable]
            if bad:
                raise PlanError(f"layer {n.name!r} ({n.kind}) cannot be split over {bad}; "
                                f"it may be split over {list(n.op.splittable)} "
                                f"(configuration {self.config(n.name)})")

    # ---- serialisation ---------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"schema_version": SCHEMA_VERSION, "model": self.model, "world": self.world,
             "batch": self.batch, "name": self.name, "configs": self.configs}
        if self.ranks:
            d["ranks"] = self.ranks
        if self.meta:
            d["meta"] = self.meta
        return d

    def to_json(self, indent=1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or "schema_version" not in d:
            raise PlanError("not an hpcnn plan: the JSON has no schema_version")
        if d["schema_version"] != SCHEMA_VERSION:
            raise PlanError(f"plan schema version {d['schema_version']} is not supported "
                            f"(this hpcnn reads version {SCHEMA_VERSION})")
        for key in ("model", "world", "batch", "configs"):
            if key not in d:
                raise PlanError(f"plan is missing the key {key!r}")
        return cls(d["model"], d["world"], d["batch"], d["configs"], d.get("ranks"),
                   d.get("meta"), d.get("name", ""))

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from None
        return cls.from_dict(d)

    def save(self, path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path) -> "Plan":
        p = Path(path)
        if not p.is_file():
            raise PlanError(f"plan file {str(p)!r} does not exist")
        return cls.from_json(p.read_text())

    def __eq__(self, other):
        return isinstance(other, Plan) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"Plan({self.name or self.model!r}, world={self.world}, {len(self.configs)} layers)"


def uniform_plan(graph, world: int, config: dict, name: str = "", fallback=None) -> Plan:
    """A plan giving every layer ``config`` where the layer allows it.

    Degrees are capped by each layer's splittable dimensions and sizes; a
    dimension the layer cannot split is dropped (``fallback`` may instead map
    a layer to its own config)."""
    configs = {}
    for n in graph:
        want = dict(fallback(n) if fallback is not None and fallback(n) is not None else config)
        names = DIM_NAMES[len(n.shape)]
        c = {}
        for d in names:
            deg = int(want.get(d, 1))
            if d not in n.op.splittable:
                deg = 1
            deg = max(1, min(deg, n.shape[names.index(d)]))
            c[d] = deg
        configs[n.name] = c
    return Plan(graph.name, world, graph.batch, configs, name=name)
