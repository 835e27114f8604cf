"""Draws docs/img/strategy-layer.png: how a plan is made, from the index math
of parallel/ to the plan a job trains with.  Run: python docs/figures/strategy_layer.py"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

# (x, y, width, title, body, colour)
BOXES = {
    "overlap": (0.2, 0.3, 3.0, "parallel/overlap.py", "chunk x interval overlaps,\naxis by axis", "#cfe6ef"),
    "xplan": (0.2, 2.0, 3.0, "parallel/exchange_plan.py", "the boxes the runtime moves", "#cfe6ef"),
    "counts": (3.6, 0.3, 3.2, "parallel/exchange_counts.py", "bytes and messages per rank,\nnode ports, all pairs", "#cfe6ef"),
    "space": (7.2, 0.3, 2.8, "config_space.py", "configurations per layer,\nfold groups", "#dcefd2"),
    "tiles": (7.2, 2.0, 2.8, "tile_geometry.py", "representative tile\nof a configuration", "#dcefd2"),
    "machine": (10.4, 0.3, 2.8, "machine.py + runtime_fit.py", "measured figures,\nfitted runtime terms", "#dcefd2"),
    "cost": (3.6, 2.0, 3.2, "cost_model.py", "t_c + t_s per layer,\nt_x per edge (the paper)", "#dcefd2"),
    "search": (3.6, 3.7, 3.2, "search.py", "node and edge elimination\n(exact)", "#dcefd2"),
    "pricing": (7.2, 3.7, 2.8, "plan_pricing.py", "a whole plan: buckets,\nwaits, overheads", "#dcefd2"),
    "planner": (5.4, 5.4, 3.2, "planner.py", "searched plan vs baselines,\nmeasured steps if known", "#dcefd2"),
    "trials": (9.4, 5.4, 3.4, "runtime/plan_trials.py", "time the close candidates,\nkeep the fastest", "#f3f0c4"),
    "job": (5.4, 7.0, 3.2, "train.py / hpcnn plan", "the plan a job trains with", "#f4d6d6"),
}
ARROWS = [("overlap", "xplan"), ("overlap", "counts"), ("counts", "cost"), ("space", "cost"),
          ("tiles", "cost"), ("machine", "cost"), ("cost", "search"), ("cost", "pricing"),
          ("search", "planner"), ("pricing", "planner"), ("planner", "trials"), ("trials", "job")]


def _centre(b, top=False, bottom=False):
    x, y, w = b[0], b[1], b[2]
    return (x + w / 2, y + (1.1 if top else 0.0 if bottom else 0.55))


def main(out=Path(__file__).resolve().parents[1] / "img" / "strategy-layer.png"):
    fig, ax = plt.subplots(figsize=(11, 6.8))
    ax.set_xlim(0, 13.4)
    ax.set_ylim(0, 9.4)
    ax.axis("off")
    for x, y, w, title, body, colour in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), w, 1.1, boxstyle="round,pad=0.03", fc=colour, ec="#555555", lw=0.8))
        ax.text(x + 0.12, y + 0.85, title, fontsize=8.3, fontweight="bold", va="center", family="monospace")
        ax.text(x + 0.12, y + 0.38, body, fontsize=8.2, va="center")
    for a, b in ARROWS:
        pa, pb = BOXES[a], BOXES[b]
        start = _centre(pa, top=pb[1] > pa[1])
        end = _centre(pb, bottom=pb[1] > pa[1])
        if pb[1] == pa[1]:
            start = (pa[0] + pa[2], pa[1] + 0.55) if pb[0] > pa[0] else (pa[0], pa[1] + 0.55)
            end = (pb[0], pb[1] + 0.55) if pb[0] > pa[0] else (pb[0] + pb[2], pb[1] + 0.55)
        ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", lw=1.1, color="#333333"))
    ax.text(0.2, 9.1, "How a plan is made: one piece of index math, the paper's cost model and search, "
            "then the clock", fontsize=11.5, fontweight="bold")
    ax.text(0.2, 8.65, "blue: parallel/ (index math, no MPI)   green: strategy/ (no MPI)   "
            "yellow: runtime/ (MPI)   red: the job", fontsize=8.5)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
