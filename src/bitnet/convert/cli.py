"""``bitnet pack``: turn a model (anything :func:`bitnet.load` accepts) into our packed run folder on disk."""

from __future__ import annotations

import argparse
import json
import shutil
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..cli import MODEL_HELP

    p = subparsers.add_parser("pack", help="pack a model to 2-bit weights (or 1.6-bit base 3) as a bitnet run folder",
                              description="Load a model, pack every BitLinear (bitnet.pack) and save the packed "
                                          "model as a new run folder that loads without fp weights. Hugging Face "
                                          "tokenizer and generation_config.json files are copied beside it.")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="folder for the packed checkpoint")
    p.add_argument("--compact", action="store_true", help="store weights in base 3, 5 per byte (1.6 bits/weight)")
    p.set_defaults(func=run)
    return p


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def run(args: argparse.Namespace) -> int:
    from ..io import CONFIG_FILE, save_checkpoint
    from ..loading import load
    from .pack import weight_bytes

    loaded = load(args.model, device="cpu", pack=False, compact_embeddings=False)
    model = loaded.model
    before = weight_bytes(model)
    from .pack import is_packed, pack

    if not is_packed(model):
        pack(model)
    out = save_checkpoint(args.out, model, tokenizer=loaded.tokenizer, compact=args.compact)
    folder = loaded.path if loaded.path is not None and loaded.path.is_dir() else None
    if folder is not None and folder.resolve() != out.resolve():
        for name in TOKENIZER_FILES:                    # the tokenizer travels with the weights
            if (folder / name).is_file():
                shutil.copyfile(folder / name, out / name)
    after = weight_bytes(model)
    size = (out / "model.safetensors").stat().st_size
    print(json.dumps({"out": str(out), "linear_weight_bytes_before": before["linear"],
                      "linear_weight_bytes_after": after["linear"], "file_bytes": size,
                      "config": str(out / CONFIG_FILE)}))
    sys.stdout.flush()
    return 0
