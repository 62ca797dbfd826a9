"""Chat: turn a list of messages into a prompt, and ``bitnet chat``, a terminal chat with history.

Prompt format: the tokenizer's own chat template when it has one (Hugging Face tokenizers with a
``chat_template``), else plain turns::

    System: {system}
    User: {user}
    Assistant: {assistant}
    User: {user}
    Assistant:

with ``"\\nUser:"`` as a stop string so the model's answer ends where it would start the next turn.
"""

from __future__ import annotations

import argparse
import sys

from .loading import stop_token_ids  # noqa: F401  (re-exported: the stop ids of chat answers)

ROLES = ("system", "user", "assistant")
PLAIN_STOP = ("\nUser:",)


def message_text(content) -> str:
    """Text of an OpenAI message ``content``: a string or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("message content parts must be {'type': 'text', 'text': str} (only text is supported)")
            parts.append(part["text"])
        return "".join(parts)
    raise ValueError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


def check_messages(messages) -> list[dict]:
    """Normalised ``[{"role", "content": str}]``; ValueError naming the bad message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if role == "developer":                               # OpenAI's newer name for system
            role = "system"
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {ROLES}, got {role!r}")
        try:
            text = message_text(m.get("content"))
        except ValueError as e:
            raise ValueError(f"messages[{i}].content: {e}") from None
        out.append({"role": role, "content": text})
    return out


def chat_template_of(tokenizer):
    """The Hugging Face tokenizer behind ``tokenizer`` if it has a chat template, else None."""
    hf = getattr(tokenizer, "hf", None)
    if hf is not None and getattr(hf, "chat_template", None):
        return hf
    return None


def format_chat(messages, tokenizer=None) -> tuple[str, tuple[str, ...]]:
    """(prompt text ending where the assistant speaks next, stop strings) for ``messages``."""
    messages = check_messages(messages)
    hf = chat_template_of(tokenizer)
    if hf is not None:
        return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), ()
    lines = [f"{m['role'].capitalize()}: {m['content'].strip()}" for m in messages]
    return "\n".join(lines) + "\nAssistant:", PLAIN_STOP


def fit_history(messages: list[dict], tokenizer, budget: int) -> tuple[list[dict], int]:
    """Drop the oldest non-system turns until the formatted prompt has at most ``budget`` tokens.

    Returns (kept messages, number of dropped messages). The last message is never dropped; if it
    alone does not fit, ValueError.
    """
    kept = list(messages)
    dropped = 0
    while True:
        prompt, _ = format_chat(kept, tokenizer)
        if len(tokenizer.encode(prompt)) <= budget:
            return kept, dropped
        idx = next((i for i, m in enumerate(kept[:-1]) if m["role"] != "system"), None)
        if idx is None:
            raise ValueError(f"the last message alone is longer than the context ({budget} tokens for the prompt); "
                             "shorten it or /reset")
        del kept[idx]
        dropped += 1


# --------------------------------------------------------------------------------------------- CLI

HELP = "commands: /reset (forget the conversation), /exit (quit), /help"


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .cli import add_model_arguments, add_sampling_arguments

    p = subparsers.add_parser("chat", help="chat with a model in the terminal (streams tokens)",
                              description="Terminal chat with history, in the model's chat template when its "
                                          "tokenizer has one. Type a message and press Enter. " + HELP)
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="system message at the start of the conversation")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens per answer (default: the checkpoint's generation_config.json, else 256; "
                        "at most half the context)")
    add_sampling_arguments(p)
    p.add_argument("--seed", type=int, default=None, help="seed of the first answer (then seed+1, ...)")
    p.add_argument("--stats", action="store_true",
                   help="after each answer print tokens, time to first token and decode tok/s on stderr")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, stdin=None, stdout=None) -> int:
    from .cli import apply_threads, sampling_kwargs
    from .generate import BitNetInference
    from .generate.inference import DEFAULT_SAMPLING
    from .generate.sampling import check_sampling_args

    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    apply_threads(args)
    check_sampling_args(**{**DEFAULT_SAMPLING, **sampling_kwargs(args)})       # bad flags fail before loading
    inf = BitNetInference(device=args.device, pack=args.pack, **sampling_kwargs(args)).load_model(args.model)
    tok, ctx = inf.tokenizer, inf.model.max_seq_len
    if ctx < 2:
        raise ValueError("the model's context is too short to chat")
    max_new = args.max_new_tokens or int(inf.loaded.generation.get("max_new_tokens", 256))
    reply_budget = min(max_new, max(1, ctx // 2))
    templated = chat_template_of(tok) is not None
    interactive = stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = list(system)
    seed = args.seed
    style = "its chat template" if templated else "plain turns"
    out.write(f"bitnet chat ({inf.loaded.name}, context {ctx} tokens, {style}). {HELP}\n")
    out.flush()
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = stdin.readline()
        if not line:                                          # EOF
            break
        line = line.rstrip("\n")
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            history = list(system)
            out.write("[conversation reset]\n")
            out.flush()
            continue
        if cmd == "/help":
            out.write(HELP + "\n")
            out.flush()
            continue
        history.append({"role": "user", "content": line})
        try:
            history, dropped = fit_history(history, tok, ctx - reply_budget)
        except ValueError as e:
            history.pop()
            out.write(f"[error: {e}]\n")
            out.flush()
            continue
        if dropped:
            out.write(f"[context full: dropped the {dropped} oldest message(s)]\n")
        prompt, stops = format_chat(history, tok)
        out.write("Assistant:")
        out.flush()
        answer = ""
        pending = ""
        for piece in inf.stream(prompt, reply_budget, seed=seed, special_tokens=not templated):
            pending += piece
            hit = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                pending = pending[:hit]
                break
            safe = len(pending) - max((n for s in stops for n in range(len(s), 0, -1)
                                       if pending.endswith(s[:n])), default=0)
            out.write(pending[:safe])
            out.flush()
            answer += pending[:safe]
            pending = pending[safe:]
        out.write(pending + "\n")
        out.flush()
        if getattr(args, "stats", False):
            st = inf.stats
            rate = "n/a" if st["decode_tok_s"] is None else f"{st['decode_tok_s']:.2f}"
            ttft = "n/a" if st["ttft_s"] is None else f"{st['ttft_s']:.3f}"
            print(f"[stats] prompt_tokens={st['prompt_tokens']} new_tokens={st['new_tokens']} ttft_s={ttft} "
                  f"decode_tok_s={rate} finish={inf.finish_reason}", file=sys.stderr, flush=True)
        answer += pending
        history.append({"role": "assistant", "content": answer.strip()})
        if seed is not None:
            seed += 1
    return 0
