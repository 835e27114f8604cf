"""``hpcnn models [--json]``: every model of the zoo with its parameter count
and forward FLOPs per sample at its default input size."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--classes", type=int, default=None, metavar="K",
                   help="build every model with K classes instead of its default")


def model_rows(num_classes=None) -> list[dict]:
    from hpcnn.models.registry import MODELS, build_model
    rows = []
    for name, spec in MODELS.items():
        g = build_model(name, batch=1, num_classes=num_classes)
        rows.append({
            "name": name,
            "params": g.num_params(),
            "forward_flops_per_sample": g.forward_flops() // g.batch,
            "input_shape": list(spec.input_shape),
            "num_classes": g.meta["num_classes"],
            "min_image_size": spec.min_size,
            "layers": len(g) - 1,
            "small": spec.small,
            "description": spec.description,
        })
    return rows


def format_table(rows) -> str:
    head = f"{'model':16s} {'parameters':>13s} {'GFLOPs/sample':>14s} {'input':>11s} {'classes':>8s}  description"
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(str(d) for d in r["input_shape"])
        lines.append(f"{r['name']:16s} {r['params']:13,d} {r['forward_flops_per_sample'] / 1e9:14.4f} "
                     f"{shape:>11s} {r['num_classes']:8d}  {r['description']}")
    lines.append("FLOPs: forward pass of one sample at the default input size, a multiply-add "
                 "counted as 2 (loss excluded).")
    return "\n".join(lines)


def run(args) -> int:
    from hpcnn.models.registry import ModelError
    try:
        rows = model_rows(args.classes)
    except ModelError as exc:
        raise SystemExit(f"hpcnn models: {exc}")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    return 0
