"""benchmarks/load_test.py against the test server: it runs, counts every request, finds nothing mixed."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "load_test.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bitnet_load_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_load_test_script(server, capsys):
    mod = load_script()
    rc = mod.main(["--url", server.url, "--clients", "1,3", "--requests", "6", "--max-tokens", "8", "--prompts", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "clients=3" in out and "lost=0" in out and "mixed=0" in out and "speed-up" in out


def test_classify_tells_drift_from_mixing():
    mod = load_script()
    ref = ["abcdef", "xyzuvw"]
    results = {0: {"text": "abcdef"}, 1: {"text": "xyzuQQ"}, 2: {"text": "xyzuvw"}, 3: {"text": "Qbcdef"}}
    exact, drift, mixed = mod.classify(results, ref, 2)
    assert exact == [0] and drift == [1] and sorted(mixed) == [2, 3]



@pytest.mark.parametrize("kv_dtype", [None, "float16"])
def test_batched_answers_equal_answers_alone_on_the_packed_native_server(model_dir, capsys, kv_dtype):
    """Batch invariance end to end: with ``--exact`` every batched answer must equal the same prompt's
    answer alone (no drift) on a packed model served by the native CPU kernels, with float32 and float16
    KV caches."""

    from bitnet.generate import BitNetInference
    from bitnet.runtime import native_decode
    from bitnet.serve import Engine

    from .conftest import http_parts

    inference = BitNetInference(device="cpu").load_model(model_dir, pack=True)
    if not native_decode(inference.model):
        pytest.skip("the native CPU backend is not available")
    create_app, ServerThread = http_parts()
    engine = Engine(inference.model, inference.tokenizer, slots=4, max_queue=32, kv_dtype=kv_dtype)
    with ServerThread(create_app(engine, "tiny")) as srv:
        rc = load_script().main(["--url", srv.url, "--clients", "1,4", "--requests", "12", "--max-tokens", "24",
                                 "--prompts", "6", "--exact"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "drift=0" in out and "mixed=0" in out and "lost=0" in out
    assert f"server: KV caches {kv_dtype or 'float32'}" in out


def test_kv_dtype_needs_a_server_of_its_own(capsys):
    with pytest.raises(SystemExit):
        load_script().main(["--url", "http://127.0.0.1:1", "--kv-dtype", "float16"])
    assert "--kv-dtype sets up the server this script starts" in capsys.readouterr().err
