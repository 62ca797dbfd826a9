"""benchmarks/abuse_test.py against a real server: every bad kind refused as it must be, nothing lost."""

import importlib.util
import os
from pathlib import Path

import pytest

from bitnet.serve import Engine

from .conftest import http_parts

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "abuse_test.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bitnet_abuse_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def quick_server(inference):
    create_app, ServerThread = http_parts()
    engine = Engine(inference.model, inference.tokenizer, slots=3, max_queue=64)
    with ServerThread(create_app(engine, "tiny"), header_timeout=0.5) as srv:
        yield srv


def test_abuse_script(quick_server, capsys):
    mod = load_script()
    rc = mod.main(["--url", quick_server.url, "--pid", str(os.getpid()), "--clients", "4", "--requests", "40",
                   "--max-tokens", "4", "--prompts", "3", "--slowloris", "2", "--slowloris-wait", "15", "--seed", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "5xx: 0" in out and "mixed=0" in out and "lost=0" in out and "checks: ok" in out
    assert "2 closed by the server" in out and "server RSS:" in out
    for kind in ("huge_seed", "surrogate", "text_plain", "unknown_model"):
        assert kind in out


def test_abuse_script_refuses_remote_urls():
    mod = load_script()
    with pytest.raises(SystemExit):
        mod.main(["--url", "http://example.com:80"])
