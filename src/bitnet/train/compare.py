"""``bitnet compare``: train b1.58, b1 and the full-precision baseline with identical settings, side by side.

``compare(TrainConfig(...), weights=("1.58", "1", "fp"), out="runs/compare")`` trains one run per weight
kind into ``out/<kind>/`` (``out/b1.58``, ``out/b1``, ``out/fp``; same data, seed, steps, shape, schedule:
only ``TrainConfig.weights`` differs), then writes into ``out``::

    compare.csv   one row per run: weights, params, final train / val loss, val bpb, tokens/s, time
    compare.md    the same table in Markdown
    compare.png   the validation-loss curves on one plot (skipped, with a note, without matplotlib)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import Sequence

from ..nn.layers import WEIGHTS_CHOICES
from .trainer import TrainConfig, save_plot, train

COLUMNS = ("weights", "params", "final_train_loss", "final_val_loss", "val_bpb", "tokens_per_s", "time_s",
           "run_dir")


def _name(weights: str) -> str:
    return "fp" if weights == "fp" else f"b{weights}"


def _fmt(v, digits=4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def write_table(rows: list[dict], out: Path) -> tuple[Path, Path]:
    """``compare.csv`` and ``compare.md`` from :func:`compare`'s rows."""
    csv_path, md_path = out / "compare.csv", out / "compare.md"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k), 1 if k in ("tokens_per_s", "time_s") else 4) for k in COLUMNS})
    md_path.write_text(markdown_table(rows) + "\n")
    return csv_path, md_path


def markdown_table(rows: list[dict]) -> str:
    head = "| weights | params | final train loss | final val loss | val bpb | tokens/s | time (s) |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {_name(r['weights'])} | {r['params']:,} | {_fmt(r['final_train_loss'])} | "
                     f"{_fmt(r['final_val_loss'])} | {_fmt(r['val_bpb'])} | {r['tokens_per_s']:,.0f} | "
                     f"{r['time_s']:.1f} |")
    return "\n".join(lines)


def throughput_line(rows: list[dict]) -> str:
    """One line of training tokens/s per run, side by side, with the ratio to ``fp`` when it ran."""
    fp = next((r["tokens_per_s"] for r in rows if r["weights"] == "fp"), None)
    parts = []
    for r in rows:
        ratio = f" ({r['tokens_per_s'] / fp:.2f}x fp)" if fp and r["weights"] != "fp" else ""
        parts.append(f"{_name(r['weights'])} {r['tokens_per_s']:,.0f}{ratio}")
    return "training tokens/s: " + " | ".join(parts)


def plot_compare(rows: list[dict], out_path: Path) -> Path | None:
    """Validation loss of every run against the step, on one plot; None without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        log = list(csv.DictReader((Path(r["run_dir"]) / "log.csv").open()))
        pts = [(int(x["step"]), float(x["val_loss"])) for x in log if x["val_loss"]]
        if pts:
            ax.plot(*zip(*pts), "o-", ms=3, lw=1.5, label=_name(r["weights"]))
    return save_plot(fig, ax, out_path, "validation loss (nats / byte)", "BitNet b1.58 vs b1 vs full precision")


def compare(config: TrainConfig | None = None, weights: Sequence[str] = ("1.58", "1", "fp"),
            out: str | Path | None = None) -> list[dict]:
    """Train one run per entry of ``weights`` (everything else from ``config``) into ``out/<b1.58|b1|fp>``;
    write ``compare.csv``, ``compare.md`` and ``compare.png`` into ``out``. Returns one dict per run
    (the :func:`~bitnet.train.train` result plus ``weights``, ``val_bpb``, ``time_s``)."""
    cfg = config or TrainConfig()
    bad = [w for w in weights if w not in WEIGHTS_CHOICES]
    if bad or not weights:
        raise ValueError(f"weights must be a non-empty subset of {WEIGHTS_CHOICES}, got {tuple(weights)!r}")
    if len(set(weights)) != len(weights):
        raise ValueError(f"weights has duplicates: {tuple(weights)!r}")
    root = Path(out or cfg.out or "runs/compare")
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for w in weights:
        res = train(dataclasses.replace(cfg, weights=w, out=str(root / _name(w))))
        rows.append({**res, "weights": w, "val_bpb": res["final_val_bpb"], "time_s": res["elapsed"]})
    write_table(rows, root)
    plot = plot_compare(rows, root / "compare.png")
    if plot is None:
        print("bitnet compare: matplotlib is not installed, compare.png skipped (pip install matplotlib)",
              file=sys.stderr)
    return rows


# ------------------------------------------------------------------------------------------------- CLI

def add_parser(subparsers) -> argparse.ArgumentParser:
    from .flags import add_train_flags

    p = subparsers.add_parser(
        "compare", help="train b1.58, b1 and fp with the same settings and tabulate",
        description="Train the same BitNetTransformer with ternary (1.58), binary (1) and full-precision (fp) "
                    "weights on the same data, seed and schedule, each into OUT/<kind>; write OUT/compare.csv, "
                    "compare.md and compare.png. Training flags are those of `bitnet train`.")
    add_train_flags(p, compare=True)
    p.add_argument("--kinds", nargs="+", choices=WEIGHTS_CHOICES, default=["1.58", "1", "fp"],
                   help="weight kinds to train (default: 1.58 1 fp)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .flags import config_kwargs

    given = config_kwargs(args)
    out = given.pop("out", None) or "runs/compare"
    rows = compare(TrainConfig(**given), weights=tuple(args.kinds), out=out)
    print(markdown_table(rows))
    print("\n" + throughput_line(rows))
    print(f"\nwritten: {Path(out) / 'compare.csv'}, {Path(out) / 'compare.md'}"
          + (f", {Path(out) / 'compare.png'}" if (Path(out) / "compare.png").is_file() else ""))
    return 0
