"""A tiny random model saved to disk, and real uvicorn servers on 127.0.0.1 serving it."""

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
    with ServerThread(create_app(engine, "tiny")) as srv:
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
