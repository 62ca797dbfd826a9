"""A tiny random model saved to disk, and real uvicorn servers on 127.0.0.1 serving it."""

import threading
import time

import pytest
import torch
from torch import nn

from bitnet import BitNetTransformer
from bitnet.generate import BitNetInference
from bitnet.io import save_checkpoint
from bitnet.serve import Engine
from bitnet.tokenizer import ByteTokenizer


def http_parts():
    """create_app and ServerThread, or skip the test when the 'serve' extra (FastAPI, uvicorn) is missing."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from bitnet.serve.app import create_app
    from bitnet.serve.server import ServerThread

    return create_app, ServerThread


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = BitNetTransformer(ByteTokenizer().vocab_size, 64, 2, heads=4, max_seq_len=256)
    run = tmp_path_factory.mktemp("tiny") / "tiny-run"
    save_checkpoint(run, model, tokenizer=ByteTokenizer())
    return run


@pytest.fixture(scope="session")
def inference(model_dir):
    return BitNetInference(device="cpu").load_model(model_dir)


@pytest.fixture(scope="session")
def server(inference):
    """A running server with 4 slots (session-wide: starting one costs ~0.5 s)."""
    create_app, ServerThread = http_parts()
    engine = Engine(inference.model, inference.tokenizer, slots=4, max_queue=32)
    with ServerThread(create_app(engine, "tiny", aliases=("tiny-run",))) as srv:
        srv.engine = engine
        yield srv


class SlowModel(nn.Module):
    """The model with a pause in every forward, so that requests stay in their slots for a while."""

    def __init__(self, model, delay=0.02):
        super().__init__()
        self.inner, self.delay = model, delay
        self.max_seq_len, self.num_tokens = model.max_seq_len, model.num_tokens

    def new_caches(self, *args, **kwargs):
        return self.inner.new_caches(*args, **kwargs)

    def forward(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner(*args, **kwargs)


@pytest.fixture
def slow_server(inference):
    create_app, ServerThread = http_parts()
    engine = Engine(SlowModel(inference.model), inference.tokenizer, slots=2, max_queue=2)
    with ServerThread(create_app(engine, "slow")) as srv:
        srv.engine = engine
        yield srv


class Gate:
    """A pause a test controls: ``wait()`` blocks (up to 60 s) until ``open()``; ``entered`` is set on arrival."""

    def __init__(self):
        self.entered, self.opened = threading.Event(), threading.Event()

    def wait(self):
        self.entered.set()
        self.opened.wait(60)

    def open(self):
        self.opened.set()


class GatedTokenizer:
    """The real tokenizer, pausing at a gate before it encodes a text longer than ``min_chars``."""

    def __init__(self, tokenizer, gate: Gate, min_chars: int = 1 << 20):
        self.inner, self.gate, self.min_chars = tokenizer, gate, min_chars

    def encode(self, text, *args, **kwargs):
        if len(text) >= self.min_chars:
            self.gate.wait()
        return self.inner.encode(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class GatedModel(SlowModel):
    """The model, pausing at a gate in every forward while the gate is armed (``gate`` not None)."""

    def __init__(self, model):
        super().__init__(model, delay=0)
        self.gate = None

    def forward(self, *args, **kwargs):
        if self.gate is not None:
            self.gate.wait()
        return self.inner(*args, **kwargs)
