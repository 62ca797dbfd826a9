"""A run's log: log.csv rows (one per logged step) and the loss curves drawn from it (loss.png)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

from .resume import LOG_FIELDS


def plot_log(log_path: Path, out_path: Path) -> Path | None:
    """Loss curves (train and validation, nats) from log.csv as a PNG; None without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(log_path.open()))
    tr = [(int(r["step"]), float(r["train_loss"])) for r in rows if r["train_loss"]]
    va = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="validation", lw=1.5)
    return save_plot(fig, ax, out_path, "loss (nats / byte)", log_path.parent.name)


def save_plot(fig, ax, out_path: Path, ylabel: str, title: str) -> Path:
    """Label a loss-per-step plot (grid, legend), write it to ``out_path`` and close the figure."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


class CSVLog:
    """log.csv, appended row by row (flushed: a killed run keeps its rows); the header when it is new."""

    def __init__(self, path: Path):
        new = not path.exists() or path.stat().st_size == 0
        self.file = path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=LOG_FIELDS)
        if new:
            self.writer.writeheader()

    def write(self, **row) -> None:
        self.writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in LOG_FIELDS})
        self.file.flush()

    def close(self) -> None:
        self.file.close()
