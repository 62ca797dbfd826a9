"""Ternary kernels vs torch F.linear (fp32 / bf16) at the BitNet-b1.58-2B-4T layer shapes.

    python benchmarks/bench_kernels.py                 # batches 1 8 64 512, all cores
    python benchmarks/bench_kernels.py --threads 2 --batches 1 8 --no-bf16
    python benchmarks/bench_kernels.py --threads 2 --isas --batches 8 64 128 512   # per-ISA table

Prints the CPU, the thread count, a memory-bandwidth probe and, per shape and batch, the time of
ours (bitnet.ops.bitlinear_packed) and of F.linear side by side, the speed ratios and the effective
GB/s of packed weight bytes. Timings are medians; run on an idle machine. With --isas, one table of
every native ISA side by side (GMAC/s, % of each ISA's measured int8 peak, ratio to torch bf16).
"""

from __future__ import annotations

import argparse
import json

from bitnet.bench import (BITNET_2B4T_SHAPES, memory_bandwidth_gbs, print_isa_bench, print_kernel_bench,
                          run_isa_bench, run_kernel_bench)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 512])
    p.add_argument("--shapes", type=str, nargs="+", default=None, help="NxK, e.g. 6912x2560")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--budget", type=float, default=0.3, help="seconds per measurement")
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--json", type=str, default=None, help="also write the rows to this file")
    p.add_argument("--isas", nargs="*", default=None,
                   help="per-ISA table instead: the named native ISAs (none named: every supported one)")
    a = p.parse_args()
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes] if a.shapes else BITNET_2B4T_SHAPES
    if a.isas is not None:
        rows = run_isa_bench(a.batches, shapes, a.isas or None, a.threads, a.budget, bf16=not a.no_bf16)
        print_isa_bench(rows)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"rows": rows}, f, indent=1)
        return
    bw = memory_bandwidth_gbs()
    rows = run_kernel_bench(a.batches, shapes, a.threads, a.budget, bf16=not a.no_bf16)
    print_kernel_bench(rows, bw)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"bandwidth": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
