"""Experiment: TQ1 (1.6 bits/weight, base 3) vs I2 (2 bits/weight) batch-1 GEMV, side by side in one run.

    python benchmarks/bench_tq1.py --threads 1                      # 2B4T shapes, L2- and L3-exceeding sets
    python benchmarks/bench_tq1.py --threads 1 --sets hot l2 --reps 30 --isa avx2

Both kernels get the same int8 activations and are called straight through ctypes (preallocated
outputs: no torch allocation inside the timed loop). Per shape and "set":

* ``hot``:  one matrix called over and over (weights in L2 / L3): the kernels' compute cost;
* ``l2``:   round robin over enough matrices to exceed L2 (~32 MB of I2): weights come from L3, as in
            a model that fits in this Xeon's large L3;
* ``dram``: round robin over ~1.2 GB of I2 (0.96 GB of TQ1), more than the L3: weights from memory,
            as in decode of BitNet-b1.58-2B-4T (0.85 GB of weights per token).

Each repetition times one sweep of each format, in alternating order; medians over repetitions (and
the fastest sweep) are printed with us per call, weight GB/s and the TQ1/I2 time ratio (< 1: TQ1
faster). Also prints the bytes per decoded token of the 2B4T shape for both layouts. A script, not a
test: no assertions except that both kernels agree with the reference on one matrix first.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

from bitnet.bench import BITNET_2B4T_SHAPES, cpu_model
from bitnet.ops import cpu, tq1
from bitnet.quant import pack_i2, ternary_matmul_reference
from bitnet.quant.tq1 import pack_tq1, tq1_matmul_reference, tq1_row_bytes

SET_MB = {"hot": 0, "l2": 32, "dram": 1200}
"""I2 megabytes of distinct matrices in a round-robin set (0: one matrix)."""


def _random_i2(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    # random valid I2 bytes (four codes in {0, 1, 2}), as bitnet.bench.build_random_model
    valid = torch.tensor([b for b in range(256) if all((b >> s) & 3 != 3 for s in (0, 2, 4, 6))], dtype=torch.uint8)
    return valid[torch.randint(0, len(valid), (n, pack_i2(torch.zeros(1, k)).shape[1]), generator=g)]


def _random_tq1(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (n, tq1_row_bytes(k)), generator=g, dtype=torch.uint8)   # every byte decodes


def _caller(fn, x: torch.Tensor, w: torch.Tensor, k: int, out: torch.Tensor, isa: int):
    n = w.shape[0]
    args = (x.data_ptr(), 1, k, k, w.data_ptr(), n, w.shape[1], out.data_ptr(), n, isa)

    def call():
        rc = fn(*args)
        if rc != 0:
            raise RuntimeError(f"native call failed: {rc}")
    return call


def _sweep(calls) -> float:
    t0 = time.perf_counter()
    for c in calls:
        c()
    return (time.perf_counter() - t0) / len(calls)


def run(shapes, sets, reps: int, isa, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    isa_id = cpu.isa_id(isa)
    rows = []
    for n, k in shapes:
        # correctness of both kernels on one matrix of this shape, same weights
        w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
        xq = torch.randint(-128, 128, (1, k), generator=g, dtype=torch.int8)
        wi2, wt = pack_i2(w), pack_tq1(w)
        ref = ternary_matmul_reference(xq, wi2, k)
        assert torch.equal(cpu.matmul_int(xq, wi2, k, isa=isa), ref)
        assert torch.equal(tq1.matmul_int(xq, wt, k, isa=isa), ref)
        assert torch.equal(tq1_matmul_reference(xq, wt, k), ref)
        for s in sets:
            count = max(1, int(SET_MB[s] * 2**20 // wi2.numel()))
            i2s = [_random_i2(n, k, g) for _ in range(count)]
            tq1s = [_random_tq1(n, k, g) for _ in range(count)]
            out = torch.empty(1, n, dtype=torch.int32)
            calls = {
                "i2": [_caller(cpu._lib.bitnet_matmul_int, xq, w_, k, out, isa_id) for w_ in i2s],
                "tq1": [_caller(tq1._lib.bitnet_tq1_matmul_int, xq, w_, k, out, isa_id) for w_ in tq1s],
            }
            if count == 1:   # hot: many calls per sample so that one sample is not a few microseconds
                calls = {f: c * 64 for f, c in calls.items()}
            for f in calls:
                _sweep(calls[f])   # warm-up (page faults, caches)
            times = {"i2": [], "tq1": []}
            for r in range(reps):
                order = ("i2", "tq1") if r % 2 == 0 else ("tq1", "i2")
                for f in order:
                    times[f].append(_sweep(calls[f]))
            row = {"N": n, "K": k, "set": s, "matrices": count}
            for f, ws in (("i2", i2s[0]), ("tq1", tq1s[0])):
                med, mn = statistics.median(times[f]), min(times[f])
                row[f"{f}_bytes"] = ws.numel()
                row[f"{f}_us"] = med * 1e6
                row[f"{f}_min_us"] = mn * 1e6
                row[f"{f}_GBps"] = ws.numel() / med / 1e9
            row["ratio"] = row["tq1_us"] / row["i2_us"]
            rows.append(row)
            print(f"{n:>5} x {k:<5} {s:>4} ({count:>3} mat) | I2 {row['i2_bytes'] / 1e6:6.2f} MB {row['i2_us']:8.1f} us "
                  f"{row['i2_GBps']:6.1f} GB/s | TQ1 {row['tq1_bytes'] / 1e6:6.2f} MB {row['tq1_us']:8.1f} us "
                  f"{row['tq1_GBps']:6.1f} GB/s | TQ1/I2 time {row['ratio']:.3f}", flush=True)
            del i2s, tq1s, calls
    return rows


def bytes_per_token_2b4t() -> dict:
    """Weight bytes read per decoded token of BitNet-b1.58-2B-4T (30 layers): ternary linears in I2 vs
    TQ1, plus the int8 head (128256 x 2560 + fp32 row scales) and one fp32 embedding row; no KV cache."""
    per_layer = [(2560, 2560), (640, 2560), (640, 2560), (2560, 2560), (6912, 2560), (6912, 2560), (2560, 6912)]
    i2 = 30 * sum(n * pack_i2(torch.zeros(1, k)).shape[1] for n, k in per_layer)
    t1 = 30 * sum(n * tq1_row_bytes(k) for n, k in per_layer)
    head = 128256 * 2560 + 128256 * 4 + 2560 * 4
    return {"i2_ternary": i2, "tq1_ternary": t1, "head_and_row": head, "i2_total": i2 + head, "tq1_total": t1 + head}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=str, nargs="+", default=None, help="NxK, e.g. 6912x2560 (default: 2B4T)")
    p.add_argument("--sets", nargs="+", default=["hot", "l2", "dram"], choices=list(SET_MB))
    p.add_argument("--reps", type=int, default=15, help="timed sweeps of each format per shape and set")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--isa", type=str, default=None, help="native ISA of both kernels (default: the best)")
    a = p.parse_args()
    if not tq1.available():
        raise SystemExit(f"the native TQ1 kernels are not available: {tq1.LOAD_ERROR}")
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes] if a.shapes else BITNET_2B4T_SHAPES
    cpu.set_num_threads(a.threads)
    torch.set_num_threads(1)
    print(f"cpu: {cpu_model()} | threads {cpu.get_num_threads()} | I2 isa {a.isa or cpu.default_isa()} | "
          f"TQ1 kernel {tq1.kernel_name(a.isa)} | {a.reps} sweeps each, medians, alternating order")
    rows = run(shapes, a.sets, a.reps, a.isa)
    for s in a.sets:
        sub = [r for r in rows if r["set"] == s]
        i2 = sum(r["i2_us"] for r in sub)
        t1 = sum(r["tq1_us"] for r in sub)
        print(f"{s:>4}: sum over shapes I2 {i2:8.1f} us, TQ1 {t1:8.1f} us, TQ1/I2 time {t1 / i2:.3f}")
    b = bytes_per_token_2b4t()
    print(f"2B4T bytes/token (weights, no KV): I2 {b['i2_total'] / 1e6:.1f} MB (ternary {b['i2_ternary'] / 1e6:.1f}), "
          f"TQ1 {b['tq1_total'] / 1e6:.1f} MB (ternary {b['tq1_ternary'] / 1e6:.1f}); head {b['head_and_row'] / 1e6:.1f} MB; "
          f"TQ1/I2 bytes {b['tq1_total'] / b['i2_total']:.3f}")


if __name__ == "__main__":
    main()
