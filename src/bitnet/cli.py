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
