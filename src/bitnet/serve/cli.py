"""``bitnet serve``: an OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..cli import add_model_arguments

    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, chat page at /)",
        description="Serve a model over HTTP with continuous batching. Needs the 'serve' extra: "
                    "pip install '.[serve]' (from a clone).")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    p.add_argument("--model-name", default=None, help="id reported by /v1/models (default: the folder or file name, or the Hub id)")
    p.add_argument("--slots", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; more get HTTP 429 (default 64)")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per sequence, prompt + completion (default: the model's max_seq_len)")
    p.add_argument("--kv-dtype", default=None, choices=["float32", "float16", "int8"],
                   help="what the KV caches store (default: the model's dtype, float32 on the CPU); float16 halves "
                        "the cache bytes each decode step reads, int8 quarters them (one float32 scale per key/value "
                        "vector); keys/values rounded when written, math in float32")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024,
                   help="largest request body accepted; larger ones get HTTP 413 (default 16 MiB)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client may take to send a request's headers before it is disconnected "
                        "(default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may take to arrive; slower ones get HTTP 408 (default 30)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..cli import apply_threads

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ValueError(f"bitnet serve needs FastAPI and uvicorn: pip install \".[serve]\" from a clone ({e})") from None
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    apply_threads(args)
    if args.max_body_bytes < 1:
        raise ValueError(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    for flag, value in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout)):
        if not value > 0:
            raise ValueError(f"{flag} must be a number of seconds > 0, got {value}")
    from .app import create_app
    from .server import default_model_name, load_engine, uvicorn_config

    engine = load_engine(args.model, slots=args.slots, max_queue=args.max_queue, context=args.context,
                         device=args.device, pack=args.pack, kv_dtype=args.kv_dtype)
    name = default_model_name(args.model)
    app = create_app(engine, args.model_name or name, aliases=(name,),
                     max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout)
    uvicorn.Server(uvicorn_config(app, host=args.host, port=args.port, log_level=args.log_level,
                                  header_timeout=args.header_timeout)).run()
    return 0
