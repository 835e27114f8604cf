"""Draws docs/img/design-layers.png: the layers of hpcnn and what each
holds.  Run: python docs/figures/design_layers.py"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

LAYERS = [
    ("8  job, CLI, benchmarks",
     "train.py cli.py job*.py failsafe.py fault_injection.py progress.py bench/ cluster/command.py",
     "#f4d6d6"),
    ("7  data, checkpoints, calibration, cluster",
     "data/ (HDF5 box reads)  checkpoint.py (whole tensors)  calibration/  cluster/ (emulated)",
     "#f6e3c9"),
    ("6  runtime", "runtime/executor.py (per-rank program)   sequential.py (the reference)   sgd.py",
     "#f3f0c4"),
    ("5  strategy (no MPI)", "config_space  cost_model  plan_pricing  search (elimination)  plan.py",
     "#dcefd2"),
    ("4  parallel", "box  layout  overlap  exchange_plan  exchange_counts (pure data)  |  comm  groups (MPI)",
     "#cfe6ef"),
    ("3  graph and models", "graph.py (DAG, whole-tensor shapes)   models/ (LeNet .. Inception-v3)",
     "#d9dcf3"),
    ("2  ops (no communication)", "conv, pool, linear, batch norm, ...: shapes, geometry, tile math",
     "#e6d8ef"),
    ("1  backend", "NumPy or CuPy, device per local rank, host/device copies, CUDA-aware probe",
     "#e4e4e4"),
]


def main(out=Path(__file__).resolve().parents[1] / "img" / "design-layers.png"):
    fig, ax = plt.subplots(figsize=(10, 6.4))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, len(LAYERS) + 0.6)
    ax.axis("off")
    for i, (title, body, color) in enumerate(LAYERS):
        y = len(LAYERS) - 1 - i + 0.15
        ax.add_patch(FancyBboxPatch((0.2, y), 9.1, 0.72, boxstyle="round,pad=0.02",
                                    fc=color, ec="#555555", lw=0.8))
        ax.text(0.35, y + 0.47, title, fontsize=11, fontweight="bold", va="center")
        ax.text(0.35, y + 0.18, body, fontsize=8.6, va="center", family="monospace")
    ax.annotate("", xy=(9.65, 0.3), xytext=(9.65, len(LAYERS) - 0.2),
                arrowprops=dict(arrowstyle="->", lw=1.5, color="#333333"))
    ax.text(9.78, len(LAYERS) / 2, "imports only downwards", rotation=90, va="center", fontsize=9)
    ax.text(0.2, len(LAYERS) + 0.3, "hpcnn: layers of the code (each layer imports only from the layers below it)",
            fontsize=12, fontweight="bold")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
