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
