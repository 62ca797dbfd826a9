"""Evaluation on held-out text: perplexity and bits per byte with sliding windows (``bitnet eval``).

Sliding windows (as in Hugging Face's perplexity guide and lm-evaluation-harness's rolling
loglikelihood): every token after the first is predicted exactly once; a window holds up to
``context`` input tokens and advances by ``stride``, scoring only the targets that no earlier window
scored, so each prediction sees at least ``context - stride`` tokens of history (except at the start):

    tokens  t0 t1 ... t(n-1)      window w: inputs t[b : b+L], targets t[b+1 : b+L+1]
    ppl = exp(sum NLL / (n - 1)),  bits per byte = sum NLL / ln 2 / (UTF-8 bytes of t1..t(n-1))

``stride == context`` gives disjoint windows (fastest); smaller strides give every prediction more
history (lower, more faithful perplexity) at ``context / stride`` times the compute.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def windows(n: int, context: int, stride: int, first_target: int = 1) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, first_scored)`` over ``n`` tokens: inputs ``[begin, end)``, targets
    ``[begin + 1, end + 1)``, of which targets at index >= ``first_scored`` are scored.
    Every target index in ``[first_target, n)`` is scored exactly once."""
    if context < 1 or not 1 <= stride <= context:
        raise ValueError(f"need context >= 1 and 1 <= stride <= context, got context={context}, stride={stride}")
    out, scored, begin = [], first_target - 1, 0         # targets <= scored are done
    while scored < n - 1:
        end = min(begin + context, n - 1)                # last target index = end
        begin = max(0, end - context)                    # the last window still gets a full context
        out.append((begin, end, scored + 1))
        scored = end
        begin += stride
    return out


@torch.inference_mode()
def token_nll(model: nn.Module, ids: list[int] | torch.Tensor, context: int | None = None,
              stride: int | None = None, batch_size: int = 8, first_target: int = 1) -> torch.Tensor:
    """Negative log-likelihood (nats, float64) of each target ``ids[first_target:]`` given what precedes it,
    computed with sliding windows of ``context`` tokens advancing by ``stride`` (default ``context // 2``)."""
    ids = torch.as_tensor(ids, dtype=torch.int64).flatten().cpu()
    n = ids.numel()
    if n < 2 or not 1 <= first_target < n:
        raise ValueError(f"need at least 2 tokens and 1 <= first_target < {n}; got {n} tokens")
    context = min(context or model.max_seq_len, model.max_seq_len)
    stride = stride or max(1, context // 2)
    device = next(iter(model.parameters()), next(iter(model.buffers()), torch.empty(0))).device
    nll = torch.zeros(n, dtype=torch.float64)
    wins = windows(n, context, stride, first_target)
    by_len: dict[int, list] = {}
    for w in wins:
        by_len.setdefault(w[1] - w[0], []).append(w)
    for length, group in by_len.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            x = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)                  # (B, L)
            y = torch.stack([ids[b + 1:e + 1] for b, e, _ in chunk]).to(device)          # (B, L)
            logp = F.log_softmax(model(x).float(), dim=-1)                               # (B, L, V)
            tok = -logp.gather(-1, y[..., None])[..., 0].double().cpu()                  # (B, L)
            for row, (b, e, first) in enumerate(chunk):
                nll[first:e + 1] = tok[row, first - b - 1:]
    return nll[first_target:]


def evaluate_text(model: nn.Module, tokenizer, text: str, context: int | None = None, stride: int | None = None,
                  batch_size: int = 8) -> dict:
    """Perplexity and bits per byte of ``text``; returns a dict of the numbers and the settings."""
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty string")
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise ValueError(f"text must encode to at least 2 tokens, got {len(ids)}")
    context = min(context or model.max_seq_len, model.max_seq_len)
    stride = stride or max(1, context // 2)
    t0 = time.perf_counter()
    nll = token_nll(model, ids, context, stride, batch_size)
    seconds = time.perf_counter() - t0
    total = float(nll.sum())
    n_bytes = len(text.encode("utf-8")) - len(tokenizer.decode(ids[:1]).encode("utf-8"))
    return {
        "tokens": len(ids), "predicted_tokens": int(nll.numel()), "bytes": n_bytes,
        "nll": total / nll.numel(), "perplexity": math.exp(total / nll.numel()),
        "bits_per_byte": total / math.log(2) / max(n_bytes, 1),
        "bits_per_token": total / math.log(2) / nll.numel(),
        "context": context, "stride": stride, "seconds": seconds,
    }


def read_text(path, max_bytes: int | None = None) -> str:
    """UTF-8 text of a file, or of every ``*.txt`` file of a folder (sorted, joined with newlines)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no .txt files in {path}")
        text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    elif path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
    else:
        raise FileNotFoundError(f"--data not found: {path}")
    if max_bytes is not None:
        text = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    return text


# --------------------------------------------------------------------------------------------- CLI

def add_parser(subparsers) -> argparse.ArgumentParser:
    from .cli import add_model_arguments

    p = subparsers.add_parser("eval", help="perplexity and bits per byte on held-out text",
                              description="Perplexity and bits per byte of a model on a text file "
                                          "(sliding windows). Prints a JSON object.")
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="text file, or a folder of .txt files")
    p.add_argument("--context", type=int, default=None, help="window length (default: the model's max_seq_len)")
    p.add_argument("--stride", type=int, default=None, help="window step (default: context // 2)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--max-bytes", type=int, default=None, help="evaluate only the first N bytes")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .cli import apply_threads
    from .generate import BitNetInference

    for name in ("context", "stride", "batch_size", "max_bytes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.stride is not None and args.context is not None and args.stride > args.context:
        raise ValueError(f"--stride ({args.stride}) must not exceed --context ({args.context})")
    from .loading import check_device

    apply_threads(args)
    check_device(args.device)                          # before reading the data: a bad device fails at once
    text = read_text(args.data, args.max_bytes)
    inf = BitNetInference(device=args.device, pack=args.pack).load_model(args.model)
    result = evaluate_text(inf.model, inf.tokenizer, text, args.context, args.stride, args.batch_size)
    result = {"model": str(args.model), "data": str(args.data), **result}
    print(json.dumps(result))
    print(f"perplexity {result['perplexity']:.4f}  bits/byte {result['bits_per_byte']:.4f}  "
          f"({result['predicted_tokens']} tokens, context {result['context']}, stride {result['stride']}, "
          f"{result['seconds']:.1f} s)", file=sys.stderr)
    return 0
