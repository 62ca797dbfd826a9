"""The ``bitnet`` command (also ``python -m bitnet``): one subcommand per module, thin wrappers.

Each module listed in :data:`SUBCOMMANDS` provides ``add_parser(subparsers)``, which adds its
subparser and sets ``func=callable(args) -> int | None`` on it. Adding a subcommand = one line here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = [
    "bitnet.train.cli",        # bitnet train
    "bitnet.train.compare",    # bitnet compare
    "bitnet.generate.cli",     # bitnet generate
    "bitnet.serve.cli",        # bitnet serve
    "bitnet.chat",             # bitnet chat
    "bitnet.evaluate",         # bitnet eval
    "bitnet.convert.cli",      # bitnet pack
    "bitnet.bench_cli",
]


MODEL_HELP = ("what to load: a run folder, .safetensors or state-dict .pth; a Hugging Face folder (official "
              "BitNet layout, or BitLlama); a Hub id such as microsoft/bitnet-b1.58-2B-4T (from the local "
              "huggingface_hub cache); or a .gguf file")


def add_model_arguments(p: argparse.ArgumentParser, pack_default: str = "on the CPU") -> None:
    """The MODEL positional plus ``--device`` and ``--pack/--no-pack``, shared by the commands that load a model."""
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--device", default=None, help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                   help=f"run packed 2-bit weights with an int8 head (default: {pack_default}); --no-pack keeps "
                        "fp weights (official BitNet and GGUF checkpoints are ternary and always run packed)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch and of the native kernels (default: all cores)")


def apply_threads(args: argparse.Namespace) -> None:
    """``--threads N``: torch's intra-op threads and the native kernels' pool (ValueError for N < 1)."""
    n = getattr(args, "threads", None)
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    import torch

    from . import ops

    torch.set_num_threads(n)
    ops.set_num_threads(n)


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """Sampling flags; unset ones fall back to the checkpoint's generation_config.json, then to the defaults
    of :data:`bitnet.generate.inference.DEFAULT_SAMPLING`."""
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the checkpoint's generation_config.json, else 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="(default: generation_config.json, else off)")
    p.add_argument("--top-p", type=float, default=None, help="(default: generation_config.json, else 0.95)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="(default: generation_config.json, else 1.0)")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling flags that were given (the rest stay with the checkpoint's defaults)."""
    names = ("temperature", "top_k", "top_p", "repetition_penalty")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="bitnet", description="Train and run 1-bit / 1.58-bit transformers.")
    parser.add_argument("--version", action="version", version=f"bitnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        parser.exit(1, f"bitnet {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
