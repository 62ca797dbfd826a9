"""Serving: the continuous-batching :class:`Engine` and an OpenAI-compatible HTTP API (``bitnet serve``).

The HTTP part needs FastAPI and uvicorn (``pip install ".[serve]"`` from a clone); the engine needs only torch.
"""

from .engine import Engine, EngineDeadError, QueueFullError, Request, SamplingParams, collect

__all__ = ["Engine", "EngineDeadError", "QueueFullError", "Request", "SamplingParams", "collect", "create_app", "load_engine",
           "ServerThread"]


def __getattr__(name):
    if name == "create_app":
        from .app import create_app
        return create_app
    if name in ("load_engine", "ServerThread"):
        from . import server
        return getattr(server, name)
    raise AttributeError(f"module 'bitnet.serve' has no attribute {name!r}")
