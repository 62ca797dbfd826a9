"""``bitnet bench``: kernel table (packed ternary vs torch F.linear) and end-to-end batch-1 decode /
prefill of random BitNetTransformer models (packed vs fp32 vs bf16) against the memory-bandwidth bound."""

from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark kernels and whole-model decode on this machine",
                              description=__doc__)
    p.add_argument("--threads", type=int, default=None, help="threads (torch and native); default: all cores")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel table")
    p.add_argument("--no-decode", action="store_true", help="skip the end-to-end decode benchmark")
    p.add_argument("--batches", default="1,8,64", help="kernel table token counts (comma separated)")
    p.add_argument("--shapes", default="small,bitnetcpp,2b4t",
                   help="decode model shapes: small, bitnetcpp (vocab 32000), 2b4t (vocab 128256)")
    p.add_argument("--kinds", default="packed,fp32,bf16", help="packed, fp32, bf16 (comma separated)")
    p.add_argument("--layers", type=int, default=None,
                   help="time only N blocks of every model and extrapolate the per-layer cost to full depth")
    p.add_argument("--dense-layers", type=int, default=4,
                   help="blocks timed for the fp32/bf16 baselines (extrapolated; 0 = full depth)")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps")
    p.add_argument("--prefill", type=int, default=128, help="prompt length of the prefill timing (0: skip)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from . import bench, ops

    if args.threads:
        torch.set_num_threads(args.threads)
        ops.set_num_threads(args.threads)
    bw = bench.memory_bandwidth_gbs()
    if not args.no_kernels:
        rows = bench.run_kernel_bench(batches=[int(b) for b in args.batches.split(",") if b.strip()])
        bench.print_kernel_bench(rows, bw)
        print()
    if not args.no_decode:
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
        for s in shapes:
            if s not in bench.MODEL_SHAPES:
                raise ValueError(f"unknown shape {s!r}; choose from {', '.join(bench.MODEL_SHAPES)}")
        bench.print_decode_bench([], bw, header=True)
        rows = bench.run_decode_bench(shapes=shapes, kinds=kinds, layers=args.layers,
                                      dense_layers=args.dense_layers or None, steps=args.steps,
                                      prefill_len=args.prefill, bandwidth=bw, log=sys.stdout)
        print(f"reference: {bench.BITNETCPP_REFERENCE}")
        for r in rows:
            if r["kind"] == "packed" and r["fraction_of_bound"] is not None:
                goal = "meets" if r["fraction_of_bound"] >= 0.7 else "misses"
                print(f"{r['shape']}: packed decode at {r['fraction_of_bound']:.0%} of the bandwidth bound "
                      f"({goal} the 70% goal)")
    return 0
