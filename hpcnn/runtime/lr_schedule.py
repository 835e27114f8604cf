"""Learning-rate schedules as functions of the step (0-based)."""
from __future__ import annotations

import math


class Schedule:
    def __init__(self, kind="constant", lr=0.1, total_steps=1, warmup_steps=0,
                 milestones=(), gamma=0.1, min_lr=0.0):
        if kind not in ("constant", "step", "cosine"):
            raise ValueError(f"schedule must be constant, step or cosine, got {kind!r}")
        self.kind, self.lr = kind, float(lr)
        self.total = max(1, int(total_steps))
        self.warmup = max(0, int(warmup_steps))
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma, self.min_lr = float(gamma), float(min_lr)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.lr
        if self.kind == "step":
            return self.lr * self.gamma ** sum(step >= m for m in self.milestones)
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t))
