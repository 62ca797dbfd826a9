"""Triton ternary kernels vs torch bf16 ``F.linear`` on a GPU, at the BitNet-b1.58-2B-4T linear shapes.

What it does, in one run, side by side:
  1. correctness at every shape: exact int32 equality with ``ternary_matmul_reference`` for the GEMV and the
     GEMM, the fused-epilogue linear within float32 rounding, the activation quantiser bit for bit;
  2. timings (``triton.testing.do_bench``: CUDA events, L2 flushed before each run, median) for
     M = 1 (decode, GEMV) and M = 8, 64, 512 (GEMM; M <= 8 also times the other kernel), of
       - int:   triton_ternary_matmul_int         (int8 x I2 -> int32)
       - lin:   triton_ternary_linear             (same, fused * w_scale / x_scale)
       - q+lin: triton_quantize_activations + lin (from bf16 activations: the whole BitLinear)
       - bf16:  torch F.linear with a bf16 weight (the dense baseline)
     and the effective bandwidth of the *weight bytes* (N * Kp/4 for I2, N * K * 2 for bf16) in GB/s
     and in % of the HBM peak (H100 SXM 3.35 TB/s; detected from the device name or --peak-gbps).

Usage:
  python benchmarks/bench_triton_gpu.py                 # on a CUDA machine (autotunes first: ~1 min)
  python benchmarks/bench_triton_gpu.py --dry-run       # tiny shapes on CPU under TRITON_INTERPRET=1
  python benchmarks/bench_triton_gpu.py --compile-only  # compile every autotune config for sm_90, no GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Triton chooses interpreter vs compiler when it is imported: decide before anything imports it.
if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bitnet.ops import triton_backend as tb  # noqa: E402
from bitnet.quant import activation_quant_int8, pack_i2, padded_in_features, ternary_matmul_reference  # noqa: E402

# (name, N, K) of BitNet-b1.58-2B-4T: hidden 2560, intermediate 6912, 20 heads x 128, 5 KV heads x 128.
SHAPES_2B4T = [("q/o_proj", 2560, 2560), ("k/v_proj", 640, 2560), ("gate/up", 6912, 2560), ("down", 2560, 6912)]
SHAPES_DRY = [("q/o_proj", 24, 160), ("k/v_proj", 6, 160), ("gate/up", 40, 160), ("down", 24, 300)]
MS_GPU = (1, 8, 64, 512)
MS_DRY = (1, 9)


def hbm_peak_gbps(device: torch.device) -> float | None:
    """Nominal HBM bandwidth of known data-centre GPUs, GB/s (None if unknown)."""
    name = torch.cuda.get_device_name(device)
    if "H200" in name:
        return 4800.0
    if "H100" in name:
        return 2000.0 if "PCIe" in name else (3900.0 if "NVL" in name else 3350.0)
    if "A100" in name:
        return 2039.0 if torch.cuda.get_device_properties(device).total_memory > 50e9 else 1555.0
    if "L40" in name:
        return 864.0
    return None


def make_weight(n: int, k: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-1, 2, (n, k), generator=g)                         # ternary (N, K)
    return w, pack_i2(w).to(device)


def check_shape(name, n, k, ms, device) -> None:
    """Correctness at one shape; raises AssertionError with the shape on any mismatch."""
    w, packed = make_weight(n, k, device, seed=n * 7 + k)
    w_scale = torch.tensor(0.0173, dtype=torch.float32, device=device)
    bias = torch.randn(n, device=device, dtype=torch.float32)
    for m in ms:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16) * 3
        xq, xs = activation_quant_int8(x)
        tq, ts = tb.triton_quantize_activations(x)
        assert torch.equal(tq, xq) and torch.equal(ts, xs), f"activation quant mismatch at {name} M={m}"
        ref = ternary_matmul_reference(xq, packed, k)
        kernels = ("gemv", "gemm") if m <= 8 else ("gemm",)
        for kernel in kernels:
            got = tb.triton_ternary_matmul_int(xq, packed, k, kernel=kernel)
            assert torch.equal(got, ref), (
                f"int mismatch at {name} N={n} K={k} M={m} kernel={kernel}: "
                f"{int((got != ref).sum())} wrong, max |diff| {int((got - ref).abs().max())}"
            )
            y = tb.triton_ternary_linear(xq, xs, packed, w_scale, k, bias, kernel=kernel)
            torch.testing.assert_close(y, ref.float() * w_scale / xs + bias, rtol=1e-6, atol=1e-5,
                                       msg=lambda s: f"linear mismatch at {name} M={m} {kernel}: {s}")
    print(f"  ok  {name:9s} N={n:5d} K={k:5d}  M in {ms}")


def timer(device):
    """A function fn -> milliseconds: do_bench on CUDA, a perf_counter loop on CPU (dry run)."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_time(fn):
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    return cpu_time


def bench(shapes, ms, device, peak_gbps) -> None:
    ms_of = timer(device)
    fmt_peak = (lambda gbps: f"{100 * gbps / peak_gbps:5.1f}%") if peak_gbps else (lambda gbps: "  n/a ")
    head = (f"{'shape':9s} {'N':>5s} {'K':>5s} {'M':>4s} {'kernel':6s} | {'int us':>8s} {'lin us':>8s} "
            f"{'q+lin us':>8s} {'bf16 us':>8s} {'bf16/lin':>8s} | {'I2 GB/s':>8s} {'%peak':>6s} | "
            f"{'bf16 GB/s':>9s} {'%peak':>6s}")
    print(head)
    print("-" * len(head))
    for name, n, k in shapes:
        _, packed = make_weight(n, k, device, seed=1)
        w_bf16 = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        w_scale = torch.tensor(0.0173, dtype=torch.float32, device=device)
        i2_bytes = n * padded_in_features(k) // 4
        bf16_bytes = n * k * 2
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            xq, xs = tb.triton_quantize_activations(x)
            t_bf16 = ms_of(lambda: F.linear(x, w_bf16))
            auto = "gemv" if m <= tb.GEMV_MAX_M else "gemm"
            for kernel in (("gemv", "gemm") if m <= 8 else ("gemm",)):
                t_int = ms_of(lambda: tb.triton_ternary_matmul_int(xq, packed, k, kernel=kernel))
                t_lin = ms_of(lambda: tb.triton_ternary_linear(xq, xs, packed, w_scale, k, kernel=kernel))

                def full():
                    q, s = tb.triton_quantize_activations(x)
                    return tb.triton_ternary_linear(q, s, packed, w_scale, k, kernel=kernel)

                t_full = ms_of(full)
                gbps = i2_bytes / (t_lin * 1e-3) / 1e9
                gbps_bf16 = bf16_bytes / (t_bf16 * 1e-3) / 1e9
                mark = "*" if kernel == auto else " "
                print(f"{name:9s} {n:5d} {k:5d} {m:4d} {kernel:5s}{mark} | {t_int * 1e3:8.1f} {t_lin * 1e3:8.1f} "
                      f"{t_full * 1e3:8.1f} {t_bf16 * 1e3:8.1f} {t_bf16 / t_lin:7.2f}x | {gbps:8.1f} {fmt_peak(gbps)} | "
                      f"{gbps_bf16:9.1f} {fmt_peak(gbps_bf16)}")
    print("(* = the kernel kernel='auto' picks; GB/s counts weight bytes only; us = microseconds, median)")


def compile_only() -> None:
    """Compile every autotune config of every kernel for sm_90 with Triton's bundled ptxas (no GPU needed)."""
    tb._require_triton()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", 90, 32)
    common = dict(x_ptr="*i8", w_ptr="*u8", xs_ptr="*fp32", ws_ptr="*fp32", b_ptr="*bf16")
    ints = ("N", "K", "KBLOCKS", "BLOCKS_PER_SPLIT", "stride_xm", "stride_wn", "stride_om", "stride_xs")
    jobs = []
    for cfg in tb._gemv_configs():
        for float_out, split in ((True, 1), (False, 4)):
            sig = dict(common, out_ptr="*fp32" if float_out else "*i32", **{a: "i32" for a in ints})
            consts = dict(cfg.kwargs, SPLIT_K=split, FLOAT_OUT=float_out, HAS_BIAS=float_out)
            jobs.append((tb._gemv_body, sig, consts, cfg))
    ints = ("M", "N", "K", "KBLOCKS", "M_BUCKET", "stride_xm", "stride_wn", "stride_om", "stride_xs")
    for cfg in tb._gemm_configs():
        for float_out in (True, False):
            sig = dict(common, out_ptr="*fp32" if float_out else "*i32", **{a: "i32" for a in ints})
            consts = dict(cfg.kwargs, FLOAT_OUT=float_out, HAS_BIAS=float_out)
            jobs.append((tb._gemm_body, sig, consts, cfg))
    sig = dict(x_ptr="*bf16", q_ptr="*i8", s_ptr="*fp32", K="i32", stride_xm="i32", stride_qm="i32", eps="fp32")
    jobs.append((tb._act_quant_body, sig, dict(QP=127, BLOCK_K=1024, INTERPRET=False), triton.Config({})))
    for body, sig, consts, cfg in jobs:
        for c in consts:
            sig[c] = "constexpr"
        t = time.perf_counter()
        kernel = triton.compile(ASTSource(JITFunction(body), sig, consts), target=target,
                                options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        ptx = kernel.asm["ptx"]
        mma = "wgmma.s8" if "s32.s8.s8" in ptx and "wgmma" in ptx else ("mma.s8" if "s32.s8.s8" in ptx else "-")
        print(f"  ok  {body.__name__:16s} {consts} warps={cfg.num_warps} stages={cfg.num_stages} "
              f"tensor-core={mma} "
              f"({time.perf_counter() - t:.1f}s)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--compile-only", action="store_true", help="compile all kernel configs for sm_90; no GPU")
    ap.add_argument("--peak-gbps", type=float, default=None, help="HBM peak in GB/s (default: from device name)")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness pass")
    args = ap.parse_args(argv)
    if not tb.TRITON_AVAILABLE:
        print("triton is not installed: pip install triton", file=sys.stderr)
        return 2
    if args.compile_only:
        compile_only()
        return 0
    if args.dry_run:
        if not tb.interpret_mode():
            print("--dry-run needs TRITON_INTERPRET=1 before triton is imported", file=sys.stderr)
            return 2
        device, shapes, ms, peak = torch.device("cpu"), SHAPES_DRY, MS_DRY, args.peak_gbps
        print("DRY RUN: Triton interpreter on CPU, tiny shapes; timings are meaningless")
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --dry-run (CPU interpreter) or --compile-only", file=sys.stderr)
            return 2
        device, shapes, ms = torch.device("cuda"), SHAPES_2B4T, MS_GPU
        peak = args.peak_gbps or hbm_peak_gbps(device)
        print(f"device: {torch.cuda.get_device_name(device)}  HBM peak: {peak or 'unknown'} GB/s  "
              f"torch {torch.__version__}  GEMV_MAX_M={tb.GEMV_MAX_M}")
    if not args.no_check:
        print("correctness vs reference:")
        for name, n, k in shapes:
            check_shape(name, n, k, ms, device)
    bench(shapes, ms, device, peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
