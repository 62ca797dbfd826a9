"""Build a server from a checkpoint and run it: in the foreground (``bitnet serve``) or in a thread."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from .engine import Engine
from .protocol import DEFAULT_HEADER_TIMEOUT, header_timeout_protocol


def load_engine(model_path, *, slots: int = 8, max_queue: int = 64, context: int | None = None,
                device=None, pack: bool | None = None, kv_dtype=None) -> Engine:
    """An :class:`Engine` (not started) around the model at ``model_path`` (anything :func:`bitnet.load`
    accepts; packed on the CPU unless ``pack=False``) and its tokenizer, which carries the chat template
    and stop ids. ``kv_dtype``: what the KV caches store (see :class:`Engine`)."""
    from ..generate import BitNetInference

    inf = BitNetInference(device=device, pack=pack).load_model(model_path)
    return Engine(inf.model, inf.tokenizer, slots=slots, max_queue=max_queue, context=context, kv_dtype=kv_dtype)


def default_model_name(model_path) -> str:
    """The id ``/v1/models`` reports: a file's stem, a folder's name, or a Hub id as given."""
    p = Path(model_path)
    if not p.exists():
        return str(model_path)
    return p.stem if p.is_file() else p.resolve().name


def uvicorn_config(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
                   header_timeout: float = DEFAULT_HEADER_TIMEOUT):
    """uvicorn settings for serving ``app``: its HTTP protocol closes connections whose request headers
    take longer than ``header_timeout`` seconds (see :mod:`bitnet.serve.protocol`)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                          http=header_timeout_protocol(header_timeout))


class ServerThread:
    """uvicorn serving ``app`` on ``host:port`` in a background thread (port 0 = a free port), with the
    header time bound of :func:`uvicorn_config`.

    ``with ServerThread(app) as srv: srv.url`` -> ``"http://127.0.0.1:PORT"``.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 header_timeout: float = DEFAULT_HEADER_TIMEOUT):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(app, host=host, port=self.port, log_level=log_level,
                                                    header_timeout=header_timeout))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="bitnet-uvicorn")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
