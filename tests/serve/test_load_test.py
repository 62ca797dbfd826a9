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


# a model of 2B4T's kind (GQA, ff_mult 2.7, a vocabulary far past the 256 byte values), small enough to test
TINY_GQA = dict(num_tokens=1000, dim=64, depth=2, heads=4, kv_heads=2, ff_mult=2.7)


def test_id_tokenizer_round_trips_bytes_and_names_every_other_id(tmp_path):
    """The tokenizer of --shape models: text -> its UTF-8 bytes (the ByteTokenizer's ids), ids >= 256 ->
    their own distinct text, so a random model's samples always decode."""
    pytest.importorskip("transformers")
    from bitnet.tokenizer import ByteTokenizer, HFTokenizer

    mod = load_script()
    mod.write_id_tokenizer(tmp_path, 1000)
    tok = HFTokenizer(str(tmp_path))
    assert tok.vocab_size == 1000
    text = "Request 007: the quick brown fox \u00e9\u4e2d\t\n "
    assert tok.encode(text) == ByteTokenizer().encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([256, 65, 999]) == "<256>A<999>"
    decoder = tok.stream_decoder(skip_special_tokens=True)
    assert "".join(decoder.feed(i) for i in [72, 999, 195, 169, 300]) + decoder.flush() == "H<999>\u00e9<300>"
    with pytest.raises(ValueError, match="256 byte values"):
        mod.write_id_tokenizer(tmp_path, 200)


def test_random_shape_model_is_served_and_decodes_ids_past_the_bytes(tmp_path, monkeypatch):
    """--random --shape: a packed random model saved with the id tokenizer; `bitnet serve` (a real
    subprocess) loads it back and streams the same greedy tokens the checkpoint generates in process,
    including ids >= 256 (which a ByteTokenizer could not decode)."""
    pytest.importorskip("transformers")
    pytest.importorskip("uvicorn")
    import argparse

    import httpx
    import torch

    import bitnet
    import bitnet.bench
    from bitnet.generate import generate
    from bitnet.storage import is_packed

    monkeypatch.setitem(bitnet.bench.MODEL_SHAPES, "tiny-gqa", TINY_GQA)
    mod = load_script()
    args = argparse.Namespace(shape="tiny-gqa", depth=None, max_seq_len=96, seed=0, slots=2, pack=True, threads=1,
                              kv_dtype=None)
    run = mod.random_model(args, tmp_path)
    loaded = bitnet.load(run)
    assert is_packed(loaded.model) and loaded.model.num_tokens == 1000 and len(loaded.model.layers) == 2
    assert loaded.model.layers[0].attn.kv_heads == 2
    prompt = "Request 001: the quick brown fox"
    with torch.no_grad():
        ids = generate(loaded.model.eval(), loaded.tokenizer.encode(prompt), 24, temperature=0)
    assert max(ids) >= 256                                  # the random model does sample past the bytes
    proc, url = mod.start_server(run, args)
    try:
        r = httpx.post(url + "/v1/completions", json={"model": "bench", "prompt": prompt, "max_tokens": 24,
                                                      "temperature": 0}, timeout=120)
    finally:
        mod.stop_server(proc)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == loaded.tokenizer.decode(ids)
    assert r.json()["usage"]["completion_tokens"] == 24


def test_load_test_serves_a_random_model_of_a_named_shape(monkeypatch, capsys):
    """The whole script on --random --shape: server subprocess, batched answers equal answers alone."""
    pytest.importorskip("transformers")
    pytest.importorskip("uvicorn")
    import bitnet.bench

    monkeypatch.setitem(bitnet.bench.MODEL_SHAPES, "tiny-gqa", TINY_GQA)
    rc = load_script().main(["--random", "--shape", "tiny-gqa", "--depth", "1", "--pack", "--clients", "1,4",
                             "--requests", "8", "--max-tokens", "12", "--prompts", "4", "--slots", "4",
                             "--max-seq-len", "96", "--threads", "1", "--exact"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "clients=4" in out and "lost=0" in out and "mixed=0" in out and "drift=0" in out and "errors=0" in out
    assert "load average" in out and "machine at the end" in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "x", "--shape", "2b4t"], "describe the model of --random"),
    (["--random", "--shape", "2b4t", "--dim", "64"], "--shape sets the width and heads"),
    (["--random", "--depth", "0"], "--depth must be >= 1"),
])
def test_shape_arguments_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit):
        load_script().main(argv)
    assert message in capsys.readouterr().err
