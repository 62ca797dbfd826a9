"""``bitnet serve`` as a real process: start, answer one request, shut down on SIGTERM."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bitnet_serve_command(model_dir):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bitnet", "serve", str(model_dir), "--host", "127.0.0.1",
                             "--port", str(port), "--slots", "2", "--threads", "1", "--log-level", "warning",
                             "--model-name", "served", "--max-body-bytes", "2048", "--header-timeout", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"server did not come up: {proc.stdout.read() if proc.poll() is not None else ''}")
                time.sleep(0.2)
        assert health["slots"] == 2 and health["model"] == "served" and health["max_body_bytes"] == 2048
        for model in ("served", "tiny-run"):                    # --model-name, and the checkpoint's name
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                           json={"model": model, "prompt": "Hi", "max_tokens": 4, "temperature": 0}).json()
            assert r["usage"]["completion_tokens"] == 4 and r["model"] == "served"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={"model": "other", "prompt": "Hi"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={"prompt": "x" * 3000})
        assert r.status_code == 413
        with socket.create_connection(("127.0.0.1", port)) as sock:     # --header-timeout: a silent client is cut off
            sock.settimeout(30)
            assert sock.recv(100).startswith(b"HTTP/1.1 408")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _wait_healthy(proc, port):
    deadline = time.monotonic() + 120
    while True:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not come up: {proc.stdout.read() if proc.poll() is not None else ''}")
            time.sleep(0.2)


@pytest.mark.parametrize("kv_dtype", ["float16", "int8"])
def test_bitnet_serve_with_a_narrow_kv_cache(model_dir, kv_dtype):
    """``--kv-dtype float16`` / ``int8`` on the packed model: /health reports it, and concurrent greedy
    requests (rows of one batched step over those caches) get exactly what each prompt gets alone."""
    import concurrent.futures

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bitnet", "serve", str(model_dir), "--host", "127.0.0.1",
                             "--port", str(port), "--slots", "4", "--threads", "1", "--log-level", "warning",
                             "--pack", "--kv-dtype", kv_dtype],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert _wait_healthy(proc, port)["kv_dtype"] == kv_dtype
        url = f"http://127.0.0.1:{port}/v1/completions"

        def complete(prompt):
            r = httpx.post(url, timeout=120, json={"prompt": prompt, "max_tokens": 24, "temperature": 0}).json()
            assert r["usage"]["completion_tokens"] == 24
            return r["choices"][0]["text"]

        prompts = [f"Prompt {i}: {'ab' * i}" for i in range(6)]
        alone = [complete(p) for p in prompts]
        assert len(set(alone)) == len(alone)
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(complete, prompts))
        assert together == alone
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["active"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_bitnet_serve_rejects_a_bad_kv_dtype(model_dir):
    r = subprocess.run([sys.executable, "-m", "bitnet", "serve", str(model_dir), "--kv-dtype", "fp8"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "--kv-dtype: invalid choice: 'fp8' (choose from 'float32', 'float16', 'int8')" in r.stderr
