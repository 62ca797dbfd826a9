"""Kernel benchmark: packed ternary linear vs torch ``F.linear`` (fp32, bf16), measured side by side.

Called by ``benchmarks/bench_kernels.py`` and the ``bitnet bench`` CLI subcommand::

    rows = run_kernel_bench(batches=(1, 8, 64, 512), threads=2)
    print_kernel_bench(rows)

"ours" is :func:`bitnet.ops.bitlinear_packed` (per-token int8 quantisation of x + 2-bit matmul +
rescale, the call a packed layer makes), on CPU tensors; F.linear gets the same x and the
dequantised weight. The three are called in turn (round robin), so ours reads its weights from
memory as in a whole model ("cold"); ours is also timed alone ("hot", weights in cache). Medians and
fastest calls are both kept; the table shows the fastest (on a busy machine, load only adds time).
No assertions: a script, not a test.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import ops
from .quant import pack_i2

BITNET_2B4T_SHAPES = ((2560, 2560), (640, 2560), (6912, 2560), (2560, 6912))
"""(N, K) of the linear layers of BitNet-b1.58-2B-4T: q/o, k/v, gate/up, down."""


def cpu_model() -> str:
    """CPU model name (from /proc/cpuinfo on Linux, else platform)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time(fn: Callable[[], object], budget_s: float, min_reps: int = 3, max_reps: int = 200) -> tuple[float, float]:
    """(median, min) seconds of fn() over repeated calls within ~budget_s (after one warm-up call)."""
    med, mn = _time_side_by_side([fn], budget_s, min_reps, max_reps)
    return med[0], mn[0]


def _time_side_by_side(fns: Sequence[Callable[[], object]], budget_s: float, min_reps: int = 3,
                       max_reps: int = 200) -> tuple[list[float], list[float]]:
    """Median and min seconds of each fn, called in turn (round robin) so that all see the same
    machine load: the ratios stay meaningful on a shared machine."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    reps = 0
    while reps < max_reps and (reps < min_reps or time.perf_counter() - start < budget_s):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
        reps += 1
    return [statistics.median(t) for t in times], [min(t) for t in times]


def memory_bandwidth_gbs(mbytes: int = 256, reps: int = 5) -> dict:
    """Rough memory bandwidth probe with torch on CPU: read (sum) and copy of a large buffer, GB/s."""
    n = mbytes * (1 << 20) // 4
    a = torch.ones(n, dtype=torch.float32)
    b = torch.empty_like(a)
    _, t_read = _time(lambda: a.sum(), 0.5, min_reps=reps)
    _, t_copy = _time(lambda: b.copy_(a), 0.5, min_reps=reps)
    nbytes = a.numel() * 4
    return {"read_GBps": nbytes / t_read / 1e9, "copy_GBps": 2 * nbytes / t_copy / 1e9}


def run_kernel_bench(
    batches: Sequence[int] = (1, 8, 64, 512),
    shapes: Iterable[tuple[int, int]] = BITNET_2B4T_SHAPES,
    threads: Optional[int] = None,
    budget_s: float = 0.3,
    bf16: bool = True,
    seed: int = 0,
) -> list[dict]:
    """Time ours vs torch F.linear fp32 / bf16 for every (N, K) shape and batch M.

    Args:
        batches: token counts M (1 = decode GEMV, larger = prefill GEMM).
        shapes: (N, K) = (out_features, in_features).
        threads: threads for both torch and the native backend (None: leave as they are).
        budget_s: time spent per measurement (at least 3 calls each).
        bf16: also time torch bf16 F.linear (slow on CPUs without AMX / avx512_bf16).
    Returns:
        one dict per (shape, batch): N, K, M; medians ours_ms (called in turn with F.linear: weights
        cold), ours_hot_ms (alone: weights in cache), fp32_ms, bf16_ms (None if not run); the same
        as *_min_ms (fastest call); speedup_fp32 / speedup_fp32_hot / speedup_bf16 (ratios of the
        fastest calls); weight_GBps(_hot) = packed weight bytes / our fastest time; backend, isa, threads.
    """
    if threads is not None:
        torch.set_num_threads(threads)
        ops.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n, k in shapes:
        w = torch.randint(-1, 2, (n, k), generator=g).to(torch.float32)
        w_scale = torch.tensor(0.02)
        packed = pack_i2(w)
        w_fp32 = w * w_scale
        w_bf16 = w_fp32.to(torch.bfloat16)
        for m in batches:
            x = torch.randn(m, k, generator=g)
            x_bf16 = x.to(torch.bfloat16)
            ours_fn = lambda: ops.bitlinear_packed(x, packed, w_scale, k)  # noqa: E731
            fns = [ours_fn, lambda: F.linear(x, w_fp32)]
            if bf16:
                fns.append(lambda: F.linear(x_bf16, w_bf16))
            # in turn: F.linear streams its large weights between our calls, so ours reads its
            # weights from memory (cold), as in a whole model whose weights do not fit in cache
            med, mins = _time_side_by_side(fns, budget_s * len(fns), min_reps=2 if m >= 64 else 5)
            # alone: our weights stay in cache (hot), as in a per-layer micro-benchmark
            hot, hot_min = _time(ours_fn, budget_s, min_reps=2 if m >= 64 else 5)
            b16, b16_min = (med[2], mins[2]) if bf16 else (None, None)
            rows.append({
                "N": n, "K": k, "M": m,
                "ours_ms": med[0] * 1e3, "ours_hot_ms": hot * 1e3, "fp32_ms": med[1] * 1e3,
                "bf16_ms": None if b16 is None else b16 * 1e3,
                "ours_min_ms": mins[0] * 1e3, "ours_hot_min_ms": hot_min * 1e3, "fp32_min_ms": mins[1] * 1e3,
                "bf16_min_ms": None if b16_min is None else b16_min * 1e3,
                "speedup_fp32": mins[1] / mins[0], "speedup_fp32_hot": mins[1] / hot_min,
                "speedup_bf16": None if b16_min is None else b16_min / mins[0],
                "weight_GBps": packed.numel() / mins[0] / 1e9, "weight_GBps_hot": packed.numel() / hot_min / 1e9,
                "backend": ops.backend("cpu"), "isa": ops.native_info()["isa"], "threads": ops.get_num_threads(),
            })
    return rows


def print_kernel_bench(rows: list[dict], bandwidth: Optional[dict] = None, file=None) -> None:
    """Print the rows of :func:`run_kernel_bench` as a table, with the CPU, threads and bandwidth probe."""
    info = ops.native_info()
    pr = (lambda *a: print(*a, file=file))
    pr(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); torch {torch.__version__}, "
       f"torch threads {torch.get_num_threads()}")
    pr(f"bitnet backend: {ops.backend('cpu')}, isa {info['isa']}, native threads "
       f"{info['threads']} (supported ISAs: {', '.join(info['isas_supported']) or '-'})")
    if bandwidth:
        pr(f"memory bandwidth probe: read {bandwidth['read_GBps']:.1f} GB/s, copy {bandwidth['copy_GBps']:.1f} GB/s")
    pr("times: fastest of repeated calls (a shared machine's load only ever adds time); 'cold' = ours called in"
       " turn with F.linear (its weights come from memory), 'hot' = ours alone (weights in cache)")
    hdr = (f"{'N x K':>11} {'M':>4} | {'cold ms':>8} {'hot ms':>8} {'fp32 ms':>8} {'bf16 ms':>8} | "
           f"{'x fp32':>6} {'hot':>6} {'x bf16':>6} | {'GB/s':>5} {'hot':>5}")
    if bandwidth:
        hdr += f" | {'BW-bound ms':>11}"
    pr(hdr)
    pr("-" * len(hdr))
    for r in rows:
        b16 = f"{r['bf16_min_ms']:8.3f}" if r["bf16_min_ms"] is not None else f"{'-':>8}"
        sb16 = f"{r['speedup_bf16']:6.1f}" if r["speedup_bf16"] is not None else f"{'-':>6}"
        line = (f"{r['N']:>5}x{r['K']:<5} {r['M']:>4} | {r['ours_min_ms']:8.3f} {r['ours_hot_min_ms']:8.3f} "
                f"{r['fp32_min_ms']:8.3f} {b16} | {r['speedup_fp32']:6.1f} {r['speedup_fp32_hot']:6.1f} {sb16} | "
                f"{r['weight_GBps']:5.1f} {r['weight_GBps_hot']:5.1f}")
        if bandwidth:
            # time to stream the packed weights once at the probed read bandwidth (decode lower bound)
            line += f" | {r['N'] * ((r['K'] + 127) // 128 * 32) / (bandwidth['read_GBps'] * 1e9) * 1e3:11.3f}"
        pr(line)


class _PeakProbes:
    """Called in a round robin: runs every ISA's register-only int8 peak probe (~20 ms each), at most once
    per ``every_s`` seconds (the first call always), and keeps each ISA's best reading in ``best``."""

    def __init__(self, isas: Sequence[str], every_s: float = 0.1):
        from .ops import cpu as native

        self._probe, self._isas, self._every_s = native.isa_peak_gmacs, list(isas), every_s
        self._last = None
        self.best = {i: 0.0 for i in self._isas}

    def __call__(self) -> None:
        now = time.perf_counter()
        if self._last is not None and now - self._last < self._every_s:
            return
        for i in self._isas:
            self.best[i] = max(self.best[i], self._probe(i))
        self._last = time.perf_counter()


def run_isa_bench(batches: Sequence[int] = (1, 8, 64, 128, 512),
                  shapes: Iterable[tuple[int, int]] = BITNET_2B4T_SHAPES,
                  isas: Optional[Sequence[str]] = None, threads: Optional[int] = None,
                  budget_s: float = 0.3, bf16: bool = True, seed: int = 0) -> list[dict]:
    """The packed linear (quantise + ternary matmul + rescale) on each native ISA, side by side (called
    in turn with torch's bf16 ``F.linear`` of the same shape), in GMAC/s and as a fraction of the ISA's
    measured single-core int8 peak times the thread count (:func:`bitnet.ops.cpu.isa_peak_gmacs`).

    The peak probe runs inside each cell's round robin too (at most every ~0.1 s, and at least once), so
    that the fraction compares the fastest call with the best probe of the same seconds: a probe taken
    once per run moved by up to 1.5x between runs on a shared machine, and with it every percentage.

    Returns one dict per (shape, M, isa): N, K, M, isa, ms (median), min_ms, gmacs (from the fastest
    call), peak_gmacs (per core, the best probe of that cell), fraction_of_peak, bf16_ms / bf16_min_ms,
    vs_bf16 (ratio of the fastest calls), threads.
    """
    from .ops import cpu as native

    if threads is not None:
        torch.set_num_threads(threads)
        native.set_num_threads(threads)
    isas = list(isas) if isas else [i for i in native.supported_isas() if i != "scalar"]
    nthreads = native.get_num_threads()
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n, k in shapes:
        w = torch.randint(-1, 2, (n, k), generator=g).to(torch.float32)
        packed = pack_i2(w)
        w_bf16 = (w * 0.02).to(torch.bfloat16)
        for m in batches:
            x = torch.randn(m, k, generator=g)
            x_bf16 = x.to(torch.bfloat16)
            fns = [(lambda isa=isa: native.bitlinear(x, packed, 0.02, k, None, 8, isa=isa)) for isa in isas]
            if bf16:
                fns.append(lambda: F.linear(x_bf16, w_bf16))
            probe = _PeakProbes(isas)
            # the probe runs first in each round; med / mins keep only the timed calls (isas, then bf16)
            med, mins = _time_side_by_side([probe] + fns, budget_s * len(fns), min_reps=2 if m >= 64 else 5)
            med, mins = med[1:], mins[1:]
            for j, isa in enumerate(isas):
                gmacs = m * n * k / mins[j] / 1e9
                peak = probe.best[isa] * nthreads
                rows.append({
                    "N": n, "K": k, "M": m, "isa": isa, "ms": med[j] * 1e3, "min_ms": mins[j] * 1e3,
                    "gmacs": gmacs, "peak_gmacs": probe.best[isa], "fraction_of_peak": gmacs / peak if peak else None,
                    "bf16_ms": med[-1] * 1e3 if bf16 else None, "bf16_min_ms": mins[-1] * 1e3 if bf16 else None,
                    "vs_bf16": mins[-1] / mins[j] if bf16 else None, "threads": nthreads,
                })
    return rows


def print_isa_bench(rows: list[dict], file=None) -> None:
    """Print the rows of :func:`run_isa_bench`: one line per shape and M, one column group per ISA."""
    from .ops import cpu as native

    pr = (lambda *a: print(*a, file=file))
    if not rows:
        return
    isas = list(dict.fromkeys(r["isa"] for r in rows))
    pr(f"CPU: {native.cpu_name() or cpu_model()}; native threads {rows[0]['threads']}; torch {torch.__version__}")
    span = {i: (min(r["peak_gmacs"] for r in rows if r["isa"] == i), max(r["peak_gmacs"] for r in rows if r["isa"] == i))
            for i in isas}
    pr("int8 peak per core (registers only, probed in each cell's rounds; range over the cells): " +
       ", ".join(f"{i} {span[i][0]:.0f}-{span[i][1]:.0f} GMAC/s" for i in isas))
    pr("per ISA: fastest ms | GMAC/s | % of (peak x threads); 'x bf16' = torch bf16 F.linear time / ours")
    hdr = f"{'N x K':>11} {'M':>4} | " + " | ".join(f"{i:>24}" for i in isas) + f" | {'bf16 ms':>8} | " + \
          " ".join(f"{'x bf16 ' + i:>14}" for i in isas)
    pr(hdr)
    pr("-" * len(hdr))
    by = {}
    for r in rows:
        by.setdefault((r["N"], r["K"], r["M"]), {})[r["isa"]] = r
    for (n, k, m), group in by.items():
        cells = []
        for i in isas:
            r = group[i]
            frac = f"{100 * r['fraction_of_peak']:3.0f}%" if r["fraction_of_peak"] is not None else "   -"
            cells.append(f"{r['min_ms']:8.3f} {r['gmacs']:7.0f} {frac:>6}")
        any_r = next(iter(group.values()))
        b16 = f"{any_r['bf16_min_ms']:8.3f}" if any_r["bf16_min_ms"] is not None else f"{'-':>8}"
        ratios = " ".join(f"{group[i]['vs_bf16']:14.2f}" if group[i]["vs_bf16"] is not None else f"{'-':>14}"
                          for i in isas)
        pr(f"{n:>5}x{k:<5} {m:>4} | " + " | ".join(f"{c:>24}" for c in cells) + f" | {b16} | {ratios}")


# ------------------------------------------------------------------------------------------------
# End-to-end decode / prefill of whole models (``bitnet bench``, ``benchmarks/bench_decode.py``)

MODEL_SHAPES = {
    # BitNet-b1.58-2B-4T: hidden 2560, intermediate 6912 (ff_mult 2.7), 30 layers, 20 heads, 5 KV heads
    "2b4t": dict(num_tokens=128256, dim=2560, depth=30, heads=20, kv_heads=5, ff_mult=2.7),
    # the shape bitnet.cpp reports on (same blocks, no GQA, vocab 32000)
    "bitnetcpp": dict(num_tokens=32000, dim=2560, depth=30, heads=20, kv_heads=20, ff_mult=2.7),
    "small": dict(num_tokens=32000, dim=1024, depth=12, heads=16, kv_heads=16, ff_mult=2.75),
}
"""Model shapes (BitNetTransformer kwargs) of the decode benchmark."""

BITNETCPP_REFERENCE = "bitnet.cpp on a 2-core Xeon, vocab-32000 shape: 13.6-16.2 tok/s decode, 42 tok/s prefill (128)"


@torch.no_grad()
def build_random_model(shape: dict, kind: str = "packed", depth: Optional[int] = None, max_seq_len: int = 512,
                       seed: int = 0) -> torch.nn.Module:
    """A randomly initialised BitNetTransformer of ``shape`` without ever materialising fp weights when
    ``kind="packed"`` (built on the meta device, packed, buffers filled with random ternary codes / int8
    head). ``kind="fp32"`` / ``"bf16"``: the dense baseline of the same shape (``weights="fp"``).
    ``depth`` overrides the number of blocks (time a few layers of a big model)."""
    from .convert.pack import pack
    from .models import BitNetTransformer
    from .nn.rotary import RotaryEmbedding

    if kind not in ("packed", "fp32", "bf16"):
        raise ValueError(f"kind must be packed, fp32 or bf16, got {kind!r}")
    cfg = dict(shape, max_seq_len=max_seq_len)
    if depth is not None:
        cfg["depth"] = depth
    if kind != "packed":
        cfg["weights"] = "fp"
    with torch.device("meta"):
        model = BitNetTransformer(**cfg)
    if kind == "packed":
        pack(model)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    valid = torch.tensor([b for b in range(256) if all((b >> s) & 3 != 3 for s in (0, 2, 4, 6))], dtype=torch.uint8)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.dtype == torch.uint8:                                    # I2 codes in {0, 1, 2}
            t.copy_(valid[torch.randint(0, len(valid), t.shape, generator=g)])
        elif t.dtype == torch.int8:                                   # int8 head
            t.copy_(torch.randint(-127, 128, t.shape, generator=g, dtype=torch.int8))
        elif t.is_floating_point():
            if name.endswith("w_scale"):
                t.fill_(0.02 if t.dim() == 0 else 0.02 / 127 * 3)
            elif t.dim() == 1:
                t.fill_(1.0)                                          # norm weights
            else:
                t.normal_(0.0, 0.02, generator=g)
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.build_tables(torch.device("cpu"))
    if kind == "bf16":
        model.to(torch.bfloat16)
    return model.eval()


def decode_bytes_per_token(model: torch.nn.Module, context: int) -> dict:
    """Bytes read per decoded token: all weights except the embedding table (one row is read), plus the
    KV cache up to ``context`` tokens."""
    from .convert.pack import weight_bytes

    wb = weight_bytes(model)
    emb = model.embed.weight
    weights = wb["total"] - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()
    a = model.layers[0].attn
    cache_el = 2 if emb.dtype == torch.bfloat16 else 4
    kv = len(model.layers) * 2 * a.kv_heads * a.head_dim * context * cache_el
    return {"weights": weights, "kv": kv, "total": weights + kv, "resident": wb["total"]}


def time_decode(model: torch.nn.Module, steps: int = 8, prompt_len: int = 16, prefill_len: int = 128,
                seed: int = 0) -> dict:
    """Batch-1 decode and prefill times of ``model`` through :class:`bitnet.generate.Decoder` (as generation
    runs it): prefill ``prompt_len`` tokens, then ``steps`` one-token steps (each timed); separately a
    ``prefill_len``-token prefill (fastest of 2 if quick). Seconds."""
    from .generate.decoder import Decoder

    g = torch.Generator().manual_seed(seed)
    n = model.num_tokens
    dec = Decoder(model, 1, prompt_len + steps + 1)
    dec.prefill(torch.randint(0, n, (prompt_len,), generator=g))
    tok = int(torch.randint(0, n, (1,), generator=g))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        dec.step([tok])
        times.append(time.perf_counter() - t0)
    prefill = []
    if prefill_len:
        long = torch.randint(0, n, (prefill_len,), generator=g)
        dec = Decoder(model, 1, prefill_len)
        for _ in range(2):
            dec.reset()
            t0 = time.perf_counter()
            dec.prefill(long)                                             # last row of logits, as generation
            prefill.append(time.perf_counter() - t0)
            if prefill[-1] > 5:
                break
    return {"step_min_s": min(times), "step_median_s": statistics.median(times),
            "prefill_s": min(prefill) if prefill else None, "context": prompt_len + steps // 2}


@torch.no_grad()
def _time_head(model: torch.nn.Module) -> float:
    """Fastest time of the final norm + head on one token (decode steps and prefills compute one row)."""
    x1 = torch.randn(1, 1, model.embed.weight.shape[1]).to(model.embed.weight.dtype)
    _, t1 = _time(lambda: model.head(model.norm(x1)), 0.3, min_reps=3, max_reps=20)
    return t1


def run_decode_bench(shapes: Sequence[str] = ("small", "bitnetcpp", "2b4t"), kinds: Sequence[str] = ("packed", "fp32", "bf16"),
                     layers: Optional[int] = None, dense_layers: Optional[int] = 4, steps: int = 8,
                     prefill_len: int = 128, threads: Optional[int] = None, bandwidth: Optional[dict] = None,
                     shape_overrides: Optional[dict] = None, log=None) -> list[dict]:
    """End-to-end batch-1 decode tokens/s, prefill tokens/s and bytes per token of random models.

    Args:
        shapes: keys of :data:`MODEL_SHAPES` (or of ``shape_overrides``, a dict name -> kwargs).
        kinds: "packed" (ours: 2-bit layers, int8 head), "fp32", "bf16" (dense baselines, weights="fp").
        layers: build only this many blocks of every model and extrapolate to the full depth.
        dense_layers: the same for fp32 / bf16 only (default 4: a dense 2B4T needs ~11 GB); None = full.
        steps: timed decode steps (fastest and median kept). prefill_len: prompt of the prefill timing.
        bandwidth: :func:`memory_bandwidth_gbs` result; the bandwidth bound is read_GBps / bytes per token.
    Returns one dict per (shape, kind): shape, kind, depth, timed_depth, extrapolated, decode_tok_s
    (fastest step), decode_tok_s_median, prefill_tok_s, bytes_per_token, weight_bytes_per_token,
    kv_bytes_per_token, resident_bytes, bound_tok_s, fraction_of_bound (None without bandwidth).
    Extrapolation: per-token time = head time + depth * (time of the timed model - head time) / timed depth.
    """
    if threads is not None:
        torch.set_num_threads(threads)
        ops.set_num_threads(threads)
    table = dict(MODEL_SHAPES, **(shape_overrides or {}))
    rows = []
    for sname in shapes:
        shape = table[sname]
        full_depth = shape["depth"]
        for kind in kinds:
            depth = layers if layers is not None else (dense_layers if kind != "packed" else None)
            depth = min(depth, full_depth) if depth is not None else full_depth
            t0 = time.perf_counter()
            model = build_random_model(shape, kind, depth=depth, max_seq_len=max(prefill_len, 64) + steps + 32)
            build_s = time.perf_counter() - t0
            r = time_decode(model, steps=steps, prefill_len=prefill_len)
            step_min, step_med, pre = r["step_min_s"], r["step_median_s"], r["prefill_s"]
            bpt = decode_bytes_per_token(model, r["context"])
            extrapolated = depth != full_depth
            if extrapolated:
                h1 = _time_head(model)
                scale = full_depth / depth
                step_min = h1 + (step_min - h1) * scale
                step_med = h1 + (step_med - h1) * scale
                if pre is not None:
                    pre = h1 + (pre - h1) * scale
                # bytes: blocks scale with depth; head / norm / one embedding row do not
                per_block_w = (bpt["weights"] - _head_bytes(model)) / depth
                bpt = {"weights": int(_head_bytes(model) + per_block_w * full_depth),
                       "kv": int(bpt["kv"] * scale),
                       "resident": int(bpt["resident"] + (bpt["weights"] - _head_bytes(model)) * (scale - 1))}
                bpt["total"] = bpt["weights"] + bpt["kv"]
            tok_s = 1.0 / step_min
            bound = bandwidth["read_GBps"] * 1e9 / bpt["total"] if bandwidth else None
            row = {"shape": sname, "kind": kind, "depth": full_depth, "timed_depth": depth,
                   "extrapolated": extrapolated, "decode_tok_s": tok_s, "decode_tok_s_median": 1.0 / step_med,
                   "prefill_tok_s": (prefill_len / pre) if pre else None, "prefill_len": prefill_len,
                   "bytes_per_token": bpt["total"], "weight_bytes_per_token": bpt["weights"],
                   "kv_bytes_per_token": bpt["kv"], "resident_bytes": bpt["resident"],
                   "bound_tok_s": bound, "fraction_of_bound": (tok_s / bound) if bound else None,
                   "build_s": build_s, "threads": ops.get_num_threads(), "torch_threads": torch.get_num_threads()}
            rows.append(row)
            if log is not None:
                print_decode_bench([row], header=False, file=log)
            del model
    return rows


def _head_bytes(model) -> int:
    h = model.head
    return sum(t.numel() * t.element_size() for t in list(h.parameters()) + list(h.buffers())) + sum(
        t.numel() * t.element_size() for t in model.norm.parameters())


def print_decode_bench(rows: list[dict], bandwidth: Optional[dict] = None, header: bool = True, file=None) -> None:
    """Print the rows of :func:`run_decode_bench`."""
    pr = (lambda *a: print(*a, file=file, flush=True))
    if header:
        info = ops.native_info()
        pr(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); native threads {info['threads']}, torch threads "
           f"{torch.get_num_threads()}, isa {info['isa']}")
        if bandwidth:
            pr(f"memory bandwidth probe: read {bandwidth['read_GBps']:.1f} GB/s, copy {bandwidth['copy_GBps']:.1f} GB/s")
        pr("decode: batch 1, fastest step (median in brackets); bound = read bandwidth / bytes per token "
           "(weights read per token incl. head + KV cache); '*' = timed with fewer layers, per-layer cost "
           "extrapolated to full depth (head timed separately)")
        pr(f"{'shape':>9} {'kind':>6} {'layers':>7} | {'tok/s':>6} {'(med)':>7} | {'MB/tok':>7} {'resident MB':>11} | "
           f"{'bound':>6} {'frac':>5} | {'prefill tok/s':>13}")
    for r in rows:
        lay = f"{r['timed_depth']}/{r['depth']}" + ("*" if r["extrapolated"] else "")
        bound = f"{r['bound_tok_s']:6.1f}" if r["bound_tok_s"] else f"{'-':>6}"
        frac = f"{r['fraction_of_bound']:5.0%}" if r["fraction_of_bound"] else f"{'-':>5}"
        pre = f"{r['prefill_tok_s']:13.1f}" if r["prefill_tok_s"] else f"{'-':>13}"
        pr(f"{r['shape']:>9} {r['kind']:>6} {lay:>7} | {r['decode_tok_s']:6.2f} ({r['decode_tok_s_median']:5.2f}) | "
           f"{r['bytes_per_token'] / 1e6:7.1f} {r['resident_bytes'] / 1e6:11.1f} | {bound} {frac} | {pre}")
