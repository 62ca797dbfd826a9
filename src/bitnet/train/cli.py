"""``bitnet train``: parse flags, call :func:`bitnet.train.train` by keyword."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .flags import _FIELDS, add_train_flags, config_kwargs  # noqa: F401  (importable here as before)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="train a BitNet transformer on bytes",
        description="Train a byte-level BitNetTransformer (paper recipe: AdamW (0.9, 0.95), warmup, two-stage "
                    "LR / weight decay). Unset flags take TrainConfig defaults.")
    add_train_flags(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out (its saved settings, "
                                                         "overridden by the flags given)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..io import CONFIG_FILE, PENDING_FILE
    from .trainer import TrainConfig, config_from_run, train

    given = config_kwargs(args)
    if args.resume:
        if args.out is None:
            raise ValueError("--resume needs --out, the run folder to continue")
        if not any((Path(args.out) / name).is_file() for name in (CONFIG_FILE, PENDING_FILE)):
            raise FileNotFoundError(f"--resume: no checkpoint in {args.out}")
        cfg = config_from_run(args.out, **given, resume=True)
    else:
        cfg = TrainConfig(**given)
    result = train(cfg)
    if result.get("rank", 0) == 0:                        # under torchrun only rank 0 reports
        print(json.dumps(result, indent=2, default=str))
    return 0
