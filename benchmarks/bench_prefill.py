"""Prefill tokens/s of a packed model per native ISA against torch's dense bf16 model, side by side.

    python benchmarks/bench_prefill.py                          # bitnetcpp shape, 128 tokens, 2 threads
    python benchmarks/bench_prefill.py --shape 2b4t --prompts 128 512 --isas avx512vnni amx

One packed random model (``bitnet.bench.build_random_model``) and the dense bf16 model of the same
shape (``weights="fp"``, full depth unless --dense-layers) are built once; then every round times one
prefill per ISA (``bitnet.ops.cpu.set_default_isa``) and one of the bf16 model, in turn, so that all
sides see the same machine load. Prefill = the prompt through every block with a KV cache, logits of
the last position (as generation does). Prints the CPU, its matrix/vector ISAs, medians and fastest
rounds, and the ratios. A script, not a test: run it on a quiet machine (``uptime``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bitnet.bench import MODEL_SHAPES, build_random_model, cpu_model
from bitnet.ops import cpu as native


def cpu_flags() -> str:
    """The matrix/vector extensions /proc/cpuinfo lists that the kernels can use."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    keep = ("avx2", "avx_vnni", "avx512_vnni", "amx_int8", "amx_bf16")
    return " ".join(k for k in keep if k in flags) or "none of " + ", ".join(keep)


@torch.no_grad()
def prefill_seconds(model, tokens: torch.Tensor) -> float:
    caches = model.new_caches(1, tokens.shape[1])
    t0 = time.perf_counter()
    model(tokens, caches=caches, start_pos=0, logits_to_keep=1)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="bitnetcpp", choices=sorted(MODEL_SHAPES))
    p.add_argument("--prompts", type=int, nargs="+", default=[128], help="prompt lengths")
    p.add_argument("--isas", nargs="+", default=None, help="native ISAs to time (default: the vector and matrix ones here)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dense-layers", type=int, default=0,
                   help="blocks of the bf16 model (0: full depth); fewer are extrapolated per block")
    p.add_argument("--no-bf16", action="store_true")
    a = p.parse_args()
    if not native.available():
        raise SystemExit(f"the native library did not load: {native.LOAD_ERROR}")
    here = native.supported_isas()
    isas = a.isas or [i for i in ("avx2", "avx512vnni", "amx") if i in here]
    for isa in isas:
        native.isa_id(isa)  # a clear error for an ISA this CPU lacks
    shape = MODEL_SHAPES[a.shape]
    depth = shape["depth"]
    native.set_num_threads(a.threads)
    print(f"CPU: {cpu_model()} | ISA flags: {cpu_flags()} | threads: {a.threads} | shape {a.shape} "
          f"(dim {shape['dim']}, {depth} layers, vocab {shape['num_tokens']})")
    longest = max(a.prompts)
    packed = build_random_model(shape, "packed", max_seq_len=longest + 8)
    dense_depth = a.dense_layers or depth
    dense = None if a.no_bf16 else build_random_model(shape, "bf16", depth=dense_depth, max_seq_len=longest + 8)
    g = torch.Generator().manual_seed(0)
    before = native.default_isa()
    for n in a.prompts:
        tokens = torch.randint(0, shape["num_tokens"], (1, n), generator=g)
        times: dict[str, list[float]] = {isa: [] for isa in isas}
        if dense is not None:
            times["bf16"] = []
        for r in range(a.rounds + 1):                       # round 0 warms up, not counted
            for isa in isas:
                native.set_default_isa(isa)
                torch.set_num_threads(1)                    # the native pool does the work
                t = prefill_seconds(packed, tokens)
                if r:
                    times[isa].append(t)
            if dense is not None:
                torch.set_num_threads(a.threads)
                t = prefill_seconds(dense, tokens) * depth / dense_depth
                if r:
                    times["bf16"].append(t)
        native.set_default_isa(None if before is None else before)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\nprefill of {n} tokens, {a.rounds} rounds (median / fastest tok/s):")
        for k, v in times.items():
            kind = "packed ternary, native " + k if k != "bf16" else (
                f"dense bf16 (torch {torch.__version__})" + (f", {dense_depth}/{depth} blocks extrapolated" if dense_depth != depth else ""))
            ratios = ""
            if "bf16" in med and k != "bf16":
                ratios += f"  {med['bf16'] / med[k]:.2f}x bf16"
            if k != isas[0] and k != "bf16":
                ratios += f"  {med[isas[0]] / med[k]:.2f}x {isas[0]}"
            print(f"  {kind:<48} {n / med[k]:8.1f} / {n / min(v):8.1f}{ratios}")


if __name__ == "__main__":
    main()
