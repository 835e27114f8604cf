"""What a running job shows and records: a progress bar on a terminal (plain
lines otherwise), a JSON-lines metrics file, and a per-rank timeline in
Chrome-trace format (chrome://tracing or https://ui.perfetto.dev)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class Progress:
    """Rank 0's view of training: ``update(step, loss, images_per_s)``.

    mode: 'bar' (tqdm), 'lines' (a plain line every ``every`` steps), 'off',
    or 'auto' (bar on a terminal, lines otherwise)."""

    def __init__(self, total_steps: int, mode: str = "auto", every: int = 10, stream=None,
                 initial: int = 0, desc: str = "train"):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if hasattr(self.stream, "isatty") and self.stream.isatty() else "lines"
        self.mode, self.every, self.total = mode, max(1, every), total_steps
        self.t0 = time.perf_counter()
        self.start_step = initial
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=initial, desc=desc, file=self.stream,
                            dynamic_ncols=True, unit="step")

    def update(self, step: int, loss: float, images_per_s: float, lr: float, epoch: int):
        done = step + 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}", lr=f"{lr:.3g}")
        elif self.mode == "lines" and (done % self.every == 0 or done == self.total):
            el = time.perf_counter() - self.t0
            rate = (done - self.start_step) / el if el > 0 else 0.0
            eta = (self.total - done) / rate if rate > 0 else float("nan")
            self.stream.write(f"step {done}/{self.total} epoch {epoch} loss {loss:.4f} "
                              f"{images_per_s:.1f} img/s lr {lr:.4g} eta {_fmt_time(eta)}\n")
            self.stream.flush()

    def message(self, text: str):
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        elif self.mode != "off" or True:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _fmt_time(s):
    if s != s or s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class MetricsWriter:
    """Append one JSON object per line (rank 0 only)."""

    def __init__(self, path: str | None):
        self.f = None
        if path:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(p, "a", buffering=1)

    def write(self, **record):
        if self.f is not None:
            record.setdefault("time", time.time())
            self.f.write(json.dumps(record) + "\n")

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None


def chrome_trace(events_by_rank: list, t0: float) -> dict:
    """Chrome trace JSON from per-rank lists of (category, name, start,
    end) in seconds (time.perf_counter of each rank, aligned by ``t0`` per
    rank when given as a list).  Events whose category ends in " in flight"
    (exchanges between their start and their completion, while the rank
    computes) go on a second row of the rank, "in flight"."""
    out = []
    for rank, events in enumerate(events_by_rank):
        base = t0[rank] if isinstance(t0, (list, tuple)) else t0
        out.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
                    "args": {"name": f"rank {rank}"}})
        rows = set()
        for cat, name, start, end in events:
            tid = 1 if cat.endswith(" in flight") else 0
            rows.add(tid)
            out.append({"name": name, "cat": cat, "ph": "X", "pid": rank, "tid": tid,
                        "ts": (start - base) * 1e6, "dur": max(0.0, (end - start) * 1e6)})
        if 1 in rows:
            out.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": 1,
                        "args": {"name": "in flight"}})
    return {"traceEvents": out, "displayTimeUnit": "ms"}
