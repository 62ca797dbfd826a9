"""Load test of ``bitnet serve``: N concurrent streaming clients, throughput, latency, and correctness.

    # against a running server
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --clients 1,16
    # start a server itself (subprocess) on a checkpoint, or on a random model of a given shape
    python benchmarks/load_test.py --model runs/kjv --clients 1,16
    python benchmarks/load_test.py --random --dim 512 --depth 8 --clients 1,16 [--pack]
    # a packed random model of a named shape (bitnet.bench.MODEL_SHAPES), never materialising fp weights
    python benchmarks/load_test.py --random --shape 2b4t --max-seq-len 128 --clients 1,16 --slots 16
    # the server's KV caches in float16 (half the cache bytes per decode step)
    python benchmarks/load_test.py --random --dim 1024 --depth 12 --heads 16 --pack --kv-dtype float16

For every client count it prints total generated tokens/s, request latency p50/p90/p99, time to
first token p50, and checks that no request was lost (each ends with a finish reason and the
token count it asked for) and none was mixed with another. Every request is greedy (temperature 0)
with a distinct prompt and is compared with the text the same prompt gets when sent alone
(measured first, one request at a time):

- ``exact``: identical text;
- ``drift``: identical for a while, then different. A packed model on the native CPU backend is
  batch-invariant (integer matmuls, per-row float epilogues, per-row attention: a row's logits are
  bit for bit the same alone, in any batch and in a padded group prefill), so it shows no drift, and
  ``--exact`` makes drift an error. Other backends (fp matmuls, GPU) reduce floats in an order that
  depends on the batch shape; a 1e-7 difference can move an int8 activation across a rounding step,
  so a near-tie between the two best tokens of a random model can flip. Reported, not an error;
- ``mixed``: the text shares a longer prefix with ANOTHER prompt's reference than with its own,
  or its first piece differs (the first token comes from a batch-1 prefill, so it must match). Error.

Exit status 1 when a request is lost, fails, or is mixed (or drifts, with ``--exact``). The number of
requests and the time per phase are bounded (--requests, --max-seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def percentile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def served_model(url) -> str:
    """The id the server at ``url`` serves (``model`` must name it: unknown ids get 404)."""
    import httpx

    return httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


async def one_request(client, url, prompt, max_tokens, model="bench"):
    """Stream one greedy completion; returns dict(text, tokens, finish, latency, ttft)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, finish, tokens = None, [], None, None
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                if c.get("text"):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(c["text"])
                if c.get("finish_reason"):
                    finish = c["finish_reason"]
    return {"text": "".join(text), "tokens": tokens, "finish": finish, "latency": time.perf_counter() - t0,
            "ttft": ttft if ttft is not None else float("nan")}


async def phase(url, prompts, clients, requests, max_tokens, max_seconds, model="bench"):
    """``clients`` concurrent clients share ``requests`` requests (prompt i = prompts[i % len]) within a deadline."""
    import httpx

    todo = list(range(requests))
    results, errors = {}, []
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(max_seconds + 60), limits=limits) as client:
        async def worker():
            while todo and time.perf_counter() < deadline:
                i = todo.pop(0)
                try:
                    results[i] = await one_request(client, url, prompts[i % len(prompts)], max_tokens, model)
                except Exception as e:  # counted as lost below
                    errors.append(f"request {i}: {type(e).__name__}: {e}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return results, errors, wall, len(todo)


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def classify(results, reference, n_prompts):
    """Split request ids into exact / drift / mixed (see the module docstring)."""
    exact, drift, mixed = [], [], []
    for i, r in results.items():
        own = reference[i % n_prompts]
        if r["text"] == own:
            exact.append(i)
            continue
        mine = common_prefix(r["text"], own)
        others = max((common_prefix(r["text"], ref) for j, ref in enumerate(reference) if j != i % n_prompts),
                     default=0)
        (mixed if mine == 0 or others > mine else drift).append(i)
    return exact, drift, mixed


def report(name, clients, results, errors, wall, skipped, reference, prompts, max_tokens, exact_only=False):
    lat = [r["latency"] for r in results.values()]
    ttft = [r["ttft"] for r in results.values()]
    tokens = sum(r["tokens"] or 0 for r in results.values())
    lost = [i for i, r in results.items() if r["finish"] is None or r["tokens"] != max_tokens]
    exact, drift, mixed = classify(results, reference, len(prompts)) if reference is not None else ([], [], [])
    tps = tokens / wall if wall else float("nan")
    print(f"{name:>8} clients={clients:<3} requests={len(results):<4} tokens={tokens:<6} wall={wall:7.2f}s "
          f"tokens/s={tps:8.1f}  latency p50/p90/p99={percentile(lat, 50):.2f}/{percentile(lat, 90):.2f}/"
          f"{percentile(lat, 99):.2f}s  ttft p50={percentile(ttft, 50):.3f}s  "
          f"errors={len(errors)} lost={len(lost)} exact={len(exact)} drift={len(drift)} mixed={len(mixed)} "
          f"not_run={skipped}", flush=True)
    for e in errors[:5]:
        print("   ", e)
    return tps, not errors and not lost and not mixed and not (exact_only and drift)


def engine_counters(url) -> dict | None:
    """The engine's counters from ``/health`` (steps, prefills, decoded_rows), or None if it has none."""
    import httpx

    body = httpx.get(url + "/health", timeout=30).json()
    return body if "prefills" in body and "decoded_rows" in body else None


def report_engine(before, after, requests: int) -> None:
    """What the engine did in a phase: decode steps, rows per step, prefill forwards per request."""
    if before is None or after is None:
        return
    steps = after["steps"] - before["steps"]
    rows = after["decoded_rows"] - before["decoded_rows"]
    prefills = after["prefills"] - before["prefills"]
    print(f"  engine: {steps} decode steps, {rows / max(steps, 1):.1f} rows per step, {prefills} prefill forwards "
          f"for {requests} requests ({requests / max(prefills, 1):.1f} prompts per prefill)", flush=True)


def load_average() -> str:
    """The 1/5/15-minute load averages (other jobs on a shared machine slow every phase), as text."""
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, args, extra=()):
    """``bitnet serve MODEL`` on a free 127.0.0.1 port (``extra``: more flags); (process, url) once /health is ok."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "bitnet", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--slots", str(args.slots), "--max-queue", "1024", "--log-level", "warning", "--model-name", "bench"]
    if args.pack:
        cmd.append("--pack")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.kv_dtype:
        cmd += ["--kv-dtype", args.kv_dtype]
    proc = subprocess.Popen(cmd + list(extra))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            httpx.get(url + "/health", timeout=2).raise_for_status()
            return proc, url
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("server did not start")
            time.sleep(0.3)


def stop_server(proc, tmp=None) -> None:
    """SIGTERM the server started by :func:`start_server` (kill it after 30 s), then remove ``tmp``."""
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    if tmp is not None:
        tmp.cleanup()


def byte_level_alphabet() -> dict[int, str]:
    """The printable character a byte-level BPE vocabulary uses for each byte value 0..255: printable
    Latin-1 bytes stand for themselves, the others (controls, space, soft hyphen) for U+0100 onwards,
    in byte order (the alphabet of ``tokenizers.pre_tokenizers.ByteLevel``)."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    shifted = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}


def write_id_tokenizer(folder: Path, vocab_size: int) -> None:
    """A Hugging Face tokenizer (``tokenizer.json`` + ``tokenizer_config.json`` in ``folder``) for a random
    model of ``vocab_size`` >= 256 tokens: text encodes to its UTF-8 bytes (id = byte value, as the
    ByteTokenizer does: the same prompts, the same ids), and every id 256.. decodes to its own text
    ``"<id>"``, so any token a random model samples has a distinct, decodable text (a ByteTokenizer
    cannot decode ids >= 256 and ends such a request with an error)."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise SystemExit("--random --shape needs the 'hf' extra for its tokenizer (tokenizers, transformers): "
                         "pip install '.[hf]' from a clone") from None
    if vocab_size < 256:
        raise ValueError(f"the model's vocabulary must hold the 256 byte values, got {vocab_size} tokens")
    vocab = {ch: b for b, ch in byte_level_alphabet().items()}
    vocab.update({f"<{i}>": i for i in range(256, vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))          # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}))


def random_model(args, folder):
    """Save a random model for the server: ``--shape`` (packed, built without fp weights, by
    :func:`bitnet.bench.build_random_model`) or ``--dim/--depth/--heads`` (a 256-token model with the
    ByteTokenizer). Returns the run folder."""
    import torch

    from bitnet.io import save_checkpoint

    if args.shape:
        from bitnet.bench import MODEL_SHAPES, build_random_model
        from bitnet.tokenizer import HFTokenizer

        shape = MODEL_SHAPES[args.shape]
        model = build_random_model(shape, "packed", depth=args.depth, max_seq_len=args.max_seq_len, seed=args.seed)
        run = Path(folder) / f"random-{args.shape}-l{len(model.layers)}"
        (run / "tokenizer").mkdir(parents=True)
        write_id_tokenizer(run / "tokenizer", model.num_tokens)
        tokenizer = HFTokenizer(str(run / "tokenizer"))
        tokenizer.name = "tokenizer"                 # config.json names it relative to the run folder
        saved = save_checkpoint(run, model, tokenizer=tokenizer)
        del model
        return saved
    from bitnet import BitNetTransformer
    from bitnet.tokenizer import ByteTokenizer

    torch.manual_seed(args.seed)
    dim, depth, heads = args.dim or 512, 8 if args.depth is None else args.depth, args.heads or 8
    model = BitNetTransformer(256, dim, depth, heads=heads, max_seq_len=args.max_seq_len)
    return save_checkpoint(Path(folder) / f"random-d{dim}-l{depth}", model, tokenizer=ByteTokenizer())


def main(argv=None):
    from bitnet.bench import MODEL_SHAPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    src.add_argument("--model", help="checkpoint to serve (starts `bitnet serve` as a subprocess)")
    src.add_argument("--random", action="store_true",
                     help="serve a randomly initialised model of --shape, or of --dim/--depth/--heads")
    p.add_argument("--clients", default="1,16", help="comma-separated client counts (default 1,16)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per phase (default: 4 per client, at least 8)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--max-seconds", type=float, default=120, help="time limit per phase (default 120)")
    p.add_argument("--prompts", type=int, default=16, help="distinct prompts (default 16)")
    p.add_argument("--rounds", type=int, default=1, help="repeat all phases, report medians (default 1)")
    p.add_argument("--no-verify", action="store_true", help="skip the one-at-a-time reference pass")
    p.add_argument("--exact", action="store_true",
                   help="fail on drift too: every answer must equal its prompt's answer alone (batch invariance)")
    g = p.add_argument_group("server started by this script")
    g.add_argument("--slots", type=int, default=16)
    g.add_argument("--pack", action="store_true")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--kv-dtype", choices=["float32", "float16", "int8"], default=None,
                   help="what the server's KV caches store (bitnet serve --kv-dtype; default: the model's dtype)")
    g.add_argument("--shape", choices=sorted(MODEL_SHAPES), default=None,
                   help="--random: a packed model of this shape of bitnet.bench.MODEL_SHAPES (e.g. 2b4t: hidden 2560, "
                        "30 layers, GQA, vocabulary 128256), built without fp weights; needs the 'hf' extra "
                        "(its tokenizer)")
    g.add_argument("--dim", type=int, default=None, help="--random without --shape: width (default 512)")
    g.add_argument("--depth", type=int, default=None,
                   help="--random: blocks (default 8, or the --shape's depth)")
    g.add_argument("--heads", type=int, default=None, help="--random without --shape: heads (default 8)")
    g.add_argument("--max-seq-len", type=int, default=512)
    g.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if (args.shape or args.dim or args.heads or args.depth is not None) and not args.random:
        p.error("--shape, --dim, --depth and --heads describe the model of --random")
    if args.shape and (args.dim or args.heads):
        p.error("--shape sets the width and heads; --dim and --heads are for --random without --shape")
    if args.depth is not None and args.depth < 1:
        p.error(f"--depth must be >= 1, got {args.depth}")
    counts = [int(c) for c in args.clients.split(",")]
    if any(c < 1 for c in counts) or min(args.max_tokens, args.prompts, args.rounds) < 1:
        p.error("--clients, --max-tokens, --prompts and --rounds must be >= 1")
    if args.url and args.kv_dtype:
        p.error("--kv-dtype sets up the server this script starts; with --url the running server decides")

    proc, tmp = None, None
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            model = args.model
            if args.random:
                tmp = tempfile.TemporaryDirectory()
                model = random_model(args, tmp.name)
            proc, url = start_server(model, args)
        model = served_model(url)
        import httpx

        from bitnet.bench import cpu_model

        print(f"machine: {cpu_model()} ({os.cpu_count()} logical CPUs); {load_average()}", flush=True)

        print(f"server: KV caches {httpx.get(url + '/health', timeout=30).json().get('kv_dtype', '?')}", flush=True)
        prompts = [f"Request {i:03d}: the quick brown fox #{i} " + "abcdefghij"[i % 10] * (i % 7) for i in range(args.prompts)]
        reference = None
        if not args.no_verify:
            res, errors, wall, _ = asyncio.run(phase(url, prompts, 1, len(prompts), args.max_tokens, args.max_seconds * 4,
                                                     model))
            if errors or len(res) != len(prompts):
                raise SystemExit(f"reference pass failed: {errors[:3]}")
            reference = [res[i]["text"] for i in range(len(prompts))]
            print(f"reference: {len(prompts)} prompts alone, {args.max_tokens} tokens each, "
                  f"{len(prompts) * args.max_tokens / wall:.1f} tokens/s", flush=True)
        ok, tps = True, {}
        for _ in range(args.rounds):                  # rounds interleave the phases (noisy shared machines)
            for c in counts:
                n = args.requests or max(8, 4 * c)
                before = engine_counters(url)
                res, errors, wall, skipped = asyncio.run(phase(url, prompts, c, n, args.max_tokens, args.max_seconds, model))
                value, good = report("phase", c, res, errors, wall, skipped, reference, prompts, args.max_tokens,
                                     args.exact)
                report_engine(before, engine_counters(url), len(res))
                tps.setdefault(c, []).append(value)
                ok &= good
        med = {c: percentile(v, 50) for c, v in tps.items()}
        if len(med) > 1:
            base = med[counts[0]]
            print(f"median tokens/s over {args.rounds} round(s):",
                  ", ".join(f"{c} clients {v:.1f}" for c, v in med.items()))
            print("speed-up vs", counts[0], "client(s):",
                  ", ".join(f"{c} clients x{med[c] / base:.2f}" for c in med if c != counts[0]))
        print(f"machine at the end: {load_average()}")
        what = "lost, mixed or drifted" if args.exact else "lost or mixed"
        print("checks:", f"ok (nothing {what})" if ok else f"FAILED (see errors / lost / mixed{' / drift' * args.exact} above)")
        return 0 if ok else 1
    finally:
        stop_server(proc, tmp)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
