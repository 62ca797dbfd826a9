"""The int8 LM head (bitnet.ops.int8.int8_linear) per native ISA, side by side, at a vocabulary-sized shape.

    python benchmarks/bench_int8_head.py --threads 1                       # N=128256, K=2560 (BitNet-2B4T)
    python benchmarks/bench_int8_head.py --threads 2 --isas avx2 amx --batches 1 16

Prints the CPU model, the thread count and, per batch M (tokens per call), the median ms per call of
every ISA (interleaved rounds on the same weights, so all see the same machine load), the time ratio
first ISA / each other one (its speed-up) and the effective GB/s of int8 weight bytes read (N * K per call).
"""

from __future__ import annotations

import argparse

import torch

from bitnet.bench import _time_side_by_side, cpu_model
from bitnet.ops import cpu as native
from bitnet.ops import int8 as I


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=128256, help="output rows (vocabulary)")
    p.add_argument("--k", type=int, default=2560, help="hidden size")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    p.add_argument("--isas", nargs="+", default=["avx2", "amx"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget", type=float, default=2.0, help="seconds per batch size (all ISAs together)")
    a = p.parse_args()
    have = native.supported_isas() if native.available() else []
    isas = [i for i in a.isas if i in have]
    if not isas:
        raise SystemExit(f"--isas: none of {a.isas} is supported here (supported: {have})")
    native.set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    w_q = torch.randint(-127, 128, (a.n, a.k), generator=g, dtype=torch.int8)
    w_s = torch.rand(a.n, generator=g) + 0.5
    print(f"cpu: {cpu_model()}  threads: {a.threads}  supported ISAs: {' '.join(have)}")
    print(f"int8 head N={a.n} K={a.k} ({a.n * a.k / 1e6:.0f} MB of int8 weights), ms per call (median)")
    print(f"{'M':>4} " + " ".join(f"{i + ' ms':>10}" for i in isas) + " " +
          " ".join(f"{isas[0] + '/' + i:>12}" for i in isas[1:]) + " " + " ".join(f"{i + ' GB/s':>10}" for i in isas))
    for m in a.batches:
        x = torch.randn(m, a.k, generator=g)
        fns = [lambda isa=isa: I.int8_linear(x, w_q, w_s, isa=isa) for isa in isas]
        outs = [f() for f in fns]
        assert all(torch.equal(o, outs[0]) for o in outs), "ISAs disagree"
        med, _ = _time_side_by_side(fns, a.budget, min_reps=3)
        print(f"{m:>4} " + " ".join(f"{t * 1e3:>10.2f}" for t in med) + " " +
              " ".join(f"{med[0] / t:>11.2f}x" for t in med[1:]) + " " +
              " ".join(f"{a.n * a.k / t / 1e9:>10.1f}" for t in med))


if __name__ == "__main__":
    main()
