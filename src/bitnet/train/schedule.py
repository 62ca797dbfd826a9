"""The two-stage schedule of the BitNet b1.58 training recipe (FAQ of 2402.17764, 2B4T report).

- warmup: learning rate rises linearly from ``peak_lr / warmup_steps`` to ``peak_lr``;
- stage 1 (until ``split`` of the run): peak learning rate, weight decay ``weight_decay`` (0.1);
- stage 2 (the rest, "cooldown"): the learning rate drops at once to ``stage2_ratio * peak_lr`` and
  follows a cosine down to ``min_ratio * peak_lr``; weight decay 0.

1-bit models tolerate (and want) a high learning rate early; the sudden drop and the removal of
weight decay let the latent weights settle, which shows as a quick fall of the loss after ``split``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TwoStageSchedule:
    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    split: float = 0.5
    stage2_ratio: float = 0.4
    min_ratio: float = 0.02
    weight_decay: float = 0.1

    def __post_init__(self):
        if self.peak_lr <= 0:
            raise ValueError(f"peak_lr must be > 0, got {self.peak_lr!r}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps!r}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps!r}")
        if not 0.0 < self.split <= 1.0:
            raise ValueError(f"split must be in (0, 1], got {self.split!r}")
        if not 0.0 < self.stage2_ratio <= 1.0 or not 0.0 <= self.min_ratio <= self.stage2_ratio:
            raise ValueError(f"need 0 <= min_ratio <= stage2_ratio <= 1, got {self.min_ratio!r}, {self.stage2_ratio!r}")

    @property
    def split_step(self) -> int:
        return max(self.warmup_steps, int(round(self.total_steps * self.split)))

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if step < self.split_step:
            return self.peak_lr
        span = max(1, self.total_steps - self.split_step)
        progress = min(1.0, (step - self.split_step) / span)
        lo, hi = self.min_ratio * self.peak_lr, self.stage2_ratio * self.peak_lr
        return lo + (hi - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def wd(self, step: int) -> float:
        """Weight decay of step ``step``: ``weight_decay`` in stage 1, 0 in stage 2."""
        return self.weight_decay if step < self.split_step else 0.0

    def stage(self, step: int) -> int:
        return 1 if step < self.split_step else 2
