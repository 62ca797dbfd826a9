"""``bitnet generate``: load a model (anything :func:`bitnet.load` accepts) and stream a continuation."""

from __future__ import annotations

import argparse
import sys

from ..cli import add_model_arguments, add_sampling_arguments, apply_threads, sampling_kwargs

DEFAULT_MAX_NEW_TOKENS = 256


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate text from a model (streams to stdout)",
                              description="Generate a continuation of --prompt with a model.")
    add_model_arguments(p)
    p.add_argument("--prompt", help="prompt text (default: read from stdin)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"(default: the checkpoint's generation_config.json, else {DEFAULT_MAX_NEW_TOKENS})")
    add_sampling_arguments(p)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--context-overflow", choices=("shift", "stop"), default="shift",
                   help="at the model's max_seq_len: slide the window (default) or stop")
    p.add_argument("--no-echo", action="store_true", help="print only the continuation, not the prompt")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .inference import BitNetInference
    from .sampling import check_sampling_args, check_seed

    check_sampling_args(**sampling_kwargs(args))   # the flags given, before any output (unset: checkpoint defaults)
    check_seed(args.seed)
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    apply_threads(args)
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise ValueError("give --prompt TEXT or pipe the prompt on stdin")
        prompt = sys.stdin.read()
    inf = BitNetInference(device=args.device, pack=args.pack, context_overflow=args.context_overflow,
                          **sampling_kwargs(args)).load_model(args.model)
    max_new = args.max_new_tokens
    if max_new is None:
        max_new = int(inf.loaded.generation.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    if not args.no_echo:
        sys.stdout.write(prompt)
    for piece in inf.stream(prompt, max_new, seed=args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[{inf.finish_reason}]", file=sys.stderr)
    return 0
