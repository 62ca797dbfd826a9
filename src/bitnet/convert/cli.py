"""``bitnet pack``: turn a trained checkpoint into its packed 2-bit inference form on disk."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("pack", help="pack a trained checkpoint to 2-bit weights (or 1.6-bit base 3)",
                              description="Load a checkpoint, pack every BitLinear (bitnet.pack) and save the "
                                          "packed model as a new run folder that loads without fp weights.")
    p.add_argument("model", help="run folder, .safetensors file or state-dict .pth")
    p.add_argument("--out", required=True, help="folder for the packed checkpoint")
    p.add_argument("--compact", action="store_true", help="store weights in base 3, 5 per byte (1.6 bits/weight)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..io import load_model, read_tokenizer, save_checkpoint, CONFIG_FILE
    from ..tokenizer import ByteTokenizer
    from .pack import pack, weight_bytes

    model = load_model(args.model)
    before = weight_bytes(model)
    pack(model)
    try:
        tokenizer = read_tokenizer(args.model)
    except FileNotFoundError:
        tokenizer = ByteTokenizer()
    out = save_checkpoint(args.out, model, tokenizer=tokenizer, compact=args.compact)
    after = weight_bytes(model)
    size = (out / "model.safetensors").stat().st_size
    print(json.dumps({"out": str(out), "linear_weight_bytes_before": before["linear"],
                      "linear_weight_bytes_after": after["linear"], "file_bytes": size,
                      "config": str(out / CONFIG_FILE)}))
    sys.stdout.flush()
    return 0
