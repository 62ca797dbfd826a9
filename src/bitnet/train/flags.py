"""The TrainConfig flags of ``bitnet train`` and ``bitnet compare``: added to a parser, and turned back
into TrainConfig keyword arguments. Below both commands (``bitnet.train.cli`` and
:mod:`bitnet.train.compare` import it), so the library part of ``compare`` needs no command module."""

from __future__ import annotations

import argparse

from ..nn.layers import WEIGHTS_CHOICES

# flag -> TrainConfig field; flags default to None so TrainConfig keeps the single set of defaults
_FIELDS = {
    "data": "data", "out": "out", "steps": "steps", "weights": "weights", "dim": "dim", "depth": "depth",
    "heads": "heads", "kv_heads": "kv_heads", "ff_mult": "ff_mult", "seq_len": "seq_len",
    "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "lr", "warmup_steps": "warmup_steps",
    "weight_decay": "weight_decay", "grad_clip": "grad_clip", "device": "device", "amp": "amp",
    "eval_every": "eval_every", "eval_batches": "eval_batches", "save_every": "save_every",
    "log_every": "log_every", "seed": "seed", "bits": "bits", "val_fraction": "val_fraction",
    "max_time": "max_time", "stop_at": "stop_at", "activation": "activation", "threads": "threads",
    "fsdp": "fsdp", "tie_embeddings": "tie_embeddings",
}


def add_train_flags(p: argparse.ArgumentParser, compare: bool = False) -> None:
    """The TrainConfig flags (shared with ``bitnet compare``, which sets --weights itself)."""
    p.add_argument("--data", nargs="+",
                   help="'default' (embedded KJV Bible, else Python stdlib source), 'kjv', 'stdlib', "
                        "an enwik8 file (.gz/.zip ok), text file(s) or a folder")
    p.add_argument("--out", help="run folder (default runs/<timestamp>)")
    p.add_argument("--steps", type=int, help="total optimizer steps (default 1000)")
    if not compare:
        p.add_argument("--weights", choices=WEIGHTS_CHOICES, help="1.58 ternary (default), 1 binary, fp baseline")
    p.add_argument("--bits", type=int, help="activation bits (default 8)")
    p.add_argument("--dim", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--ff-mult", type=float)
    p.add_argument("--activation", choices=("silu", "gelu", "relu2"))
    p.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="share the embedding matrix with the output head (needed for GGUF export)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (default 1.5e-3)")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float, help="stage-1 weight decay (default 0.1; 0 in stage 2)")
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--device", help="auto (default), cpu, cuda, mps")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--amp", choices=("auto", "bf16", "off"))
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--max-time", type=float, help="stop (with a checkpoint) after this many seconds of training")
    p.add_argument("--stop-at", type=int, help="stop after this step without changing the schedule")
    p.add_argument("--seed", type=int)
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                   help="under torchrun: shard parameters, gradients and optimizer state over the ranks "
                        "(torch.distributed.fsdp.fully_shard) instead of replicating them (DDP)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="no loss.png")


def config_kwargs(args: argparse.Namespace) -> dict:
    """TrainConfig keyword arguments for the flags that were given."""
    given = {field: getattr(args, flag) for flag, field in _FIELDS.items() if getattr(args, flag, None) is not None}
    if "data" in given:                                   # one spec, or several text files joined
        given["data"] = given["data"][0] if len(given["data"]) == 1 else list(given["data"])
    if args.no_progress:
        given["progress"] = False
    if args.no_plot:
        given["plot"] = False
    return given
