"""Abuse test of ``bitnet serve``: concurrent clients mixing good requests with hostile ones.

    # starts its own server (a subprocess on 127.0.0.1) on a tiny random model
    python benchmarks/abuse_test.py --clients 8 --requests 200 --threads 1
    # a server already running on this machine (give its pid for the memory figures)
    python benchmarks/abuse_test.py --url http://127.0.0.1:8000 --pid 12345

Good requests are greedy completions (streamed or not) with distinct prompts, compared with the text
the same prompt gets when sent alone first (``exact`` / ``drift`` / ``mixed`` as in
benchmarks/load_test.py). Bad requests, one kind at a time, each with the status it must get:
a seed beyond ``manual_seed``'s range, out-of-range numbers, a lone surrogate, JSON nested 50,000 deep,
invalid JSON, ``text/plain`` bodies, an unknown ``model``, a declared body over the size limit, a
prompt over the context, streams with bad settings, and streams whose client hangs up. Besides,
``--slowloris`` connections drip header lines until the server cuts them off, and /health is probed
all along.

Printed: requests, successes, status codes per bad-input kind, 5xx count, lost / mixed good answers,
hung-up streams and the slots still busy after, the slowloris connections closed, /health probes, and
the server's resident memory (RSS) before and after. Exit status 1 when anything is off: a 5xx, a bad
request not refused with its status, a good answer lost or mixed, a slowloris connection still open,
/health not ok, or slots still busy. Bounded: --requests in total, --max-seconds, 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import (classify, one_request, percentile, random_model, served_model, start_server,  # noqa: E402
                       stop_server)

JSON = {"content-type": "application/json"}


def rss_mib(pid) -> float | None:
    """Resident memory of process ``pid`` in MiB (Linux /proc), None when unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def bad_kinds(model: str, context: int, max_body: int) -> dict:
    """name -> (make(i) -> (path, headers, body bytes), statuses it must get)."""
    chat = "/v1/chat/completions"
    comp = "/v1/completions"
    msgs = [{"role": "user", "content": "hello"}]
    numbers = [("seed", -(1 << 63) - 1), ("temperature", -1), ("temperature", 1e-300), ("top_p", 0), ("top_k", 0),
               ("max_tokens", 10 ** 400), ("n", 2), ("repetition_penalty", 0), ("presence_penalty", 10 ** 400),
               ("top_k", 1.5)]

    def js(obj):
        return json.dumps(obj).encode()

    return {
        "huge_seed": (lambda i: (chat, JSON, js({"model": model, "messages": msgs, "temperature": 1,
                                                 "seed": 18446744073709551616 + i})), {400}),
        "bad_number": (lambda i: (comp, JSON, js({"model": model, "prompt": "hi", "max_tokens": 4,
                                                  numbers[i % len(numbers)][0]: numbers[i % len(numbers)][1]})), {400}),
        "surrogate": (lambda i: (chat, JSON, js({"model": model, "messages": [{"role": "user", "content": "a\ud800b"}]})),
                      {400}),
        "deep_json": (lambda i: (chat, JSON, b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"), {400}),
        "bad_json": (lambda i: (comp, JSON, b'{"prompt": "hi", '), {400}),
        "text_plain": (lambda i: (comp, {"content-type": "text/plain"}, js({"model": model, "prompt": "hi"})), {415}),
        "unknown_model": (lambda i: (comp, JSON, js({"model": "../../etc/passwd", "prompt": "hi", "max_tokens": 4})),
                          {404}),
        "too_long": (lambda i: (comp, JSON, js({"model": model, "prompt": "z" * (context + 10)})), {400}),
        "stream_bad": (lambda i: (chat, JSON, js({"model": model, "messages": msgs, "stream": True,
                                                  "seed": 1 << 70})), {400}),
        "stream_model": (lambda i: (comp, JSON, js({"model": "nope", "prompt": "hi", "stream": True})), {404}),
        # body size: declared over the limit (the server must refuse it before reading it)
        "oversized": (None, {413}),
        # a stream whose client hangs up after the first chunk (no status: the slot must come free)
        "hang_up": (None, set()),
    }


async def raw_oversized(host, port, max_body) -> int:
    """A POST that declares ``max_body + 1`` bytes and sends only its headers: the status the server answers
    (sending body bytes the server never reads would make its close a TCP reset that can eat the answer)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {max_body + 1}\r\n\r\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 30)
        return int(line.split()[1]) if line.startswith(b"HTTP/1.1 ") else -1
    finally:
        writer.close()


async def hang_up(client, url, model, prompt) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": 200, "stream": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        async for _ in resp.aiter_lines():
            break                                             # leave after the first line


async def slowloris(host, port, wait) -> tuple[bool, float]:
    """Drip a header line every 0.5 s; (closed by the server, seconds until then)."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n".encode())
    try:
        while time.perf_counter() - t0 < wait:
            try:
                if await asyncio.wait_for(reader.read(65536), 0.5) == b"":
                    return True, time.perf_counter() - t0
            except asyncio.TimeoutError:
                pass
            except (ConnectionError, OSError):              # closed with our drip unread: a reset
                return True, time.perf_counter() - t0
            try:
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
            except (ConnectionError, OSError):
                return True, time.perf_counter() - t0
        return False, time.perf_counter() - t0
    finally:
        writer.close()


async def abuse(url, model, prompts, reference, args, context, max_body):
    import httpx

    host, port = url[len("http://"):].split(":")
    port = int(port)
    kinds = bad_kinds(model, context, max_body)
    rng = random.Random(args.seed)
    n_good = round(args.requests * args.good_fraction)
    bad = sorted(kinds) * (args.requests // len(kinds) + 1)           # every kind in turn, then shuffled
    plan = ["good"] * n_good + bad[:args.requests - n_good]
    rng.shuffle(plan)
    statuses: dict[str, Counter] = defaultdict(Counter)
    sent: Counter = Counter()
    good, errors = {}, []
    health = []
    todo = list(enumerate(plan))
    deadline = time.perf_counter() + args.max_seconds
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.max_seconds + 60), limits=limits) as client:
        async def probe():
            while not done.is_set():
                t0 = time.perf_counter()
                try:
                    r = await client.get(url + "/health")
                    health.append((r.status_code, time.perf_counter() - t0))
                except httpx.HTTPError as e:
                    health.append((type(e).__name__, time.perf_counter() - t0))
                try:
                    await asyncio.wait_for(done.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass

        async def worker():
            while todo and time.perf_counter() < deadline:
                i, kind = todo.pop(0)
                sent[kind] += 1
                try:
                    if kind == "good":
                        p = i % len(prompts)
                        if i % 2:
                            good[i] = await one_request(client, url, prompts[p], args.max_tokens, model)
                        else:
                            body = {"model": model, "prompt": prompts[p], "max_tokens": args.max_tokens, "temperature": 0}
                            r = await client.post(url + "/v1/completions", json=body)
                            statuses["good"][r.status_code] += 1
                            if r.status_code == 200:
                                c = r.json()
                                good[i] = {"text": c["choices"][0]["text"], "finish": c["choices"][0]["finish_reason"],
                                           "tokens": c["usage"]["completion_tokens"]}
                            continue
                        statuses["good"][200] += 1
                    elif kind == "oversized":
                        statuses[kind][await raw_oversized(host, port, max_body)] += 1
                    elif kind == "hang_up":
                        await hang_up(client, url, model, prompts[i % len(prompts)])
                        statuses[kind]["hung up"] += 1
                    else:
                        path, headers, content = kinds[kind][0](i)
                        r = await client.post(url + path, content=content, headers=headers)
                        statuses[kind][r.status_code] += 1
                        if r.status_code >= 400:
                            err = r.json().get("error", {})
                            if set(err) != {"message", "type", "param", "code"}:
                                statuses[kind]["not OpenAI's error shape"] += 1
                except Exception as e:  # counted: a good request that raised is lost
                    statuses[kind][type(e).__name__] += 1
                    errors.append(f"{kind} #{i}: {type(e).__name__}: {e}"[:300])

        t0 = time.perf_counter()
        probing = asyncio.create_task(probe())
        lorises = [asyncio.create_task(slowloris(host, port, args.slowloris_wait)) for _ in range(args.slowloris)]
        await asyncio.gather(*(worker() for _ in range(args.clients)))
        wall = time.perf_counter() - t0
        loris = await asyncio.gather(*lorises)
        done.set()
        await probing
        # hung-up streams must have freed their slots
        busy_deadline = time.perf_counter() + 30
        while True:
            stats = (await client.get(url + "/health")).json()
            if stats.get("active", 0) == 0 or time.perf_counter() > busy_deadline:
                break
            await asyncio.sleep(0.2)
        final = await client.get(url + "/health")
        ok_after = await client.post(url + "/v1/completions", json={"model": model, "prompt": prompts[0],
                                                                    "max_tokens": args.max_tokens, "temperature": 0})
    return dict(plan=plan, kinds=kinds, statuses=statuses, sent=sent, good=good, errors=errors, health=health,
                wall=wall, loris=loris, busy_after=stats.get("active", 0), final=final, ok_after=ok_after,
                skipped=len(todo))


def report(res, reference, prompts, args) -> bool:
    ok = True
    statuses, kinds = res["statuses"], res["kinds"]
    total = sum(res["sent"].values())
    print(f"abuse: clients={args.clients} requests={total} (not run: {res['skipped']}) wall={res['wall']:.1f}s")
    good = res["good"]
    lost = [i for i in range(len(res["plan"])) if res["plan"][i] == "good" and i < total
            and (i not in good or good[i]["finish"] is None or good[i]["tokens"] != args.max_tokens)]
    exact, drift, mixed = classify(good, reference, len(prompts))
    print(f"  good            sent={res['sent']['good']:<4} ok={len(good) - len([i for i in lost if i in good]):<4} "
          f"lost={len(lost)} exact={len(exact)} drift={len(drift)} mixed={len(mixed)}")
    ok &= not lost and not mixed
    five = 0
    print(f"  {'kind':<15} {'sent':>4}  statuses (expected)")
    for kind in sorted(k for k in statuses if k != "good"):
        got = statuses[kind]
        expected = kinds[kind][1]
        five += sum(n for s, n in got.items() if isinstance(s, int) and s >= 500)
        bad = {s: n for s, n in got.items() if (s not in expected and s != "hung up") or (not expected and s != "hung up")}
        ok &= not bad
        shown = " ".join(f"{s}x{n}" for s, n in sorted(got.items(), key=lambda x: str(x[0])))
        print(f"  {kind:<15} {res['sent'][kind]:>4}  {shown:<24} ({'/'.join(map(str, sorted(expected))) or 'none'})"
              + ("  UNEXPECTED" if bad else ""))
    five += sum(n for s, n in statuses["good"].items() if isinstance(s, int) and s >= 500)
    print(f"5xx: {five}")
    ok &= five == 0
    closed = [t for c, t in res["loris"] if c]
    if res["loris"]:
        print(f"slowloris: {len(res['loris'])} connections, {len(closed)} closed by the server"
              + (f" after {min(closed):.1f}-{max(closed):.1f} s" if closed else ""))
        ok &= len(closed) == len(res["loris"])
    print(f"hung-up streams: {statuses['hang_up']['hung up']}, slots still busy after: {res['busy_after']}")
    ok &= res["busy_after"] == 0
    hs = res["health"]
    codes = Counter(c for c, _ in hs)
    print(f"/health during abuse: {len(hs)} probes {dict(codes)}, latency p50/max "
          f"{percentile([t for _, t in hs], 50):.3f}/{max((t for _, t in hs), default=float('nan')):.3f} s; "
          f"after: {res['final'].status_code} {res['final'].json().get('status')}")
    ok &= set(codes) <= {200} and res["final"].status_code == 200
    after = res["ok_after"]
    ok &= after.status_code == 200 and after.json()["choices"][0]["text"] == reference[0]
    for e in res["errors"][:5]:
        print("   ", e)
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server on 127.0.0.1 (default: start one on a tiny random model)")
    p.add_argument("--pid", type=int, default=None, help="pid of the --url server, for its RSS")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--requests", type=int, default=200, help="requests in all (default 200)")
    p.add_argument("--good-fraction", type=float, default=0.5, help="share of good requests (default 0.5)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per good request (default 16)")
    p.add_argument("--prompts", type=int, default=8, help="distinct good prompts (default 8)")
    p.add_argument("--slowloris", type=int, default=4, help="slowloris connections (default 4)")
    p.add_argument("--slowloris-wait", type=float, default=None,
                   help="seconds a slowloris connection waits to be cut off (default: header timeout + 10)")
    p.add_argument("--max-seconds", type=float, default=300, help="time limit of the abuse phase (default 300)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("server started by this script")
    g.add_argument("--slots", type=int, default=4)
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--pack", action="store_true")
    g.add_argument("--dim", type=int, default=64)
    g.add_argument("--depth", type=int, default=2)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--max-seq-len", type=int, default=256)
    g.add_argument("--max-body-bytes", type=int, default=1 << 20)
    g.add_argument("--header-timeout", type=float, default=2.0)
    args = p.parse_args(argv)
    if min(args.clients, args.requests, args.max_tokens, args.prompts) < 1 or args.slowloris < 0:
        p.error("--clients, --requests, --max-tokens, --prompts must be >= 1 and --slowloris >= 0")
    if args.url and not args.url.startswith("http://127.0.0.1:"):
        p.error("--url must be http://127.0.0.1:PORT (this script attacks local servers only)")
    if args.slowloris_wait is None:
        args.slowloris_wait = args.header_timeout + 10

    proc, tmp = None, None
    try:
        if args.url:
            url, pid = args.url.rstrip("/"), args.pid
        else:
            tmp = tempfile.TemporaryDirectory()
            model_path = random_model(args, tmp.name)
            proc, url = start_server(model_path, args, extra=["--max-body-bytes", str(args.max_body_bytes),
                                                              "--header-timeout", str(args.header_timeout)])
            pid = proc.pid
        import httpx

        model = served_model(url)
        health = httpx.get(url + "/health", timeout=30).json()
        context, max_body = health["context"], health["max_body_bytes"]
        print(f"server: {url} pid={pid} model={model} context={context} slots={health['slots']} "
              f"max_body_bytes={max_body}", flush=True)
        prompts = [f"Abuse test {i:02d}: good prompt " + "klmnopqrst"[i % 10] * (i % 5) for i in range(args.prompts)]

        async def alone():
            async with httpx.AsyncClient(timeout=120) as c:
                return [await one_request(c, url, q, args.max_tokens, model) for q in prompts]
        reference = [r["text"] for r in asyncio.run(alone())]
        before = rss_mib(pid) if pid else None
        res = asyncio.run(abuse(url, model, prompts, reference, args, context, max_body))
        after = rss_mib(pid) if pid else None
        ok = report(res, reference, prompts, args)
        if before is not None and after is not None:
            print(f"server RSS: {before:.1f} MiB before, {after:.1f} MiB after ({after - before:+.1f})")
        print("checks:", "ok" if ok else "FAILED (see above)")
        return 0 if ok else 1
    finally:
        stop_server(proc, tmp)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
