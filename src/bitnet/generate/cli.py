"""``bitnet generate``: load a checkpoint and stream a continuation of a prompt to stdout."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate text from a checkpoint (streams to stdout)",
                              description="Generate a continuation of --prompt with a trained model.")
    p.add_argument("model", help="run folder, .safetensors file or state-dict .pth")
    p.add_argument("--prompt", help="prompt text (default: read from stdin)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--context-overflow", choices=("shift", "stop"), default="shift",
                   help="at the model's max_seq_len: slide the window (default) or stop")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, mps")
    p.add_argument("--pack", action="store_true", help="pack BitLinear weights to 2 bits (bitnet.pack)")
    p.add_argument("--no-echo", action="store_true", help="print only the continuation, not the prompt")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .inference import BitNetInference
    from .sampling import check_sampling_args, check_seed

    check_sampling_args(args.temperature, args.top_k, args.top_p, args.repetition_penalty)   # before any output
    check_seed(args.seed)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise ValueError("give --prompt TEXT or pipe the prompt on stdin")
        prompt = sys.stdin.read()
    inf = BitNetInference(device=args.device, pack=args.pack).load_model(args.model)
    if not args.no_echo:
        sys.stdout.write(prompt)
    for piece in inf.stream(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            context_overflow=args.context_overflow):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[{inf.finish_reason}]", file=sys.stderr)
    return 0
