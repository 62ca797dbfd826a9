"""Experiment: batch-1 decode of a random BitNet-b1.58-2B-4T-shape model, I2 vs TQ1 weights, in one run.

    python benchmarks/bench_tq1_decode.py --threads 1                  # full 30 layers (~4.5 GB RAM)
    python benchmarks/bench_tq1_decode.py --threads 1 --depth 8 --rounds 20

Two models with the same random weights (``bitnet.bench.build_random_model``; the second repacked with
``bitnet.convert.tq1.repack_tq1``); each round runs one decode step of each variant, in alternating
order (so that all variants see the same machine load):

* ``i2 fused``:   the I2 model on its default path (one native call per block);
* ``i2 modules``: the I2 model with the fused block switched off (one native call per linear);
* ``tq1 fused``:  the TQ1 model on the same fused path (its linear sets have format TQ1);
* ``tq1 modules``: the TQ1 model with the fused block switched off.

* ``i2 linears`` / ``tq1 linears``: only the token's matmuls (every projection in model order, then the
  int8 head), straight native calls: the weight streaming of a step without attention, norms or Python.

``tq1`` vs ``i2`` on the same path is the like-for-like comparison of the weight formats (``tq1 fused``
vs ``i2 fused``: the default path). Per variant: median and fastest step (tok/s), the bytes read per
token (``bitnet.bench.decode_bytes_per_token``) and the median time against ``i2 fused``.
The two models' weights (0.85 + 0.75 GB) exceed this Xeon's L3, so every step reads from memory.
Checks first that both models give the same logits, on each path (fused: bit for bit as well).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bitnet import ops
from bitnet.bench import MODEL_SHAPES, build_random_model, cpu_model, decode_bytes_per_token
from bitnet.convert.tq1 import repack_tq1
from bitnet.models.fused_block import fused_path, native_block_calls
from bitnet.nn import Int8Linear, PackedBitLinear
from bitnet.nn.tq1_linear import PackedTQ1BitLinear
from bitnet.ops import cpu, tq1
from bitnet.runtime import torch_threads


def linear_calls(model) -> list:
    """One token's matmuls of ``model`` (every projection in model order, then the int8 head) as native
    calls on a preallocated random input: the weight streaming of a decode step without attention,
    norms or Python between the calls."""
    import bitnet.ops.int8  # noqa: F401  (declares bitnet_int8_linear on the library)

    g = torch.Generator().manual_seed(1)
    keep, calls = [], []
    for m in model.modules():
        if isinstance(m, (PackedBitLinear, Int8Linear)):
            x = torch.randn(1, m.in_features, generator=g)
            out = torch.empty(1, m.out_features)
            keep += [x, out]
            if type(m) is PackedTQ1BitLinear:
                fn, w = tq1._lib.bitnet_tq1_bitlinear, m.w_tq1
                args = (x.data_ptr(), 1, m.in_features, m.in_features, 8, 1e-5, w.data_ptr(), m.out_features,
                        w.shape[1], float(m.w_scale), None, out.data_ptr(), m.out_features, -1)
            elif type(m) is PackedBitLinear:
                fn, w = cpu._lib.bitnet_bitlinear, m.w_packed
                args = (x.data_ptr(), 1, m.in_features, m.in_features, 8, 1e-5, w.data_ptr(), m.out_features,
                        w.shape[1], float(m.w_scale), None, out.data_ptr(), m.out_features, -1)
            else:
                fn, w = cpu._lib.bitnet_int8_linear, m.w_int8
                args = (x.data_ptr(), 1, m.in_features, m.in_features, 8, 1e-5, w.data_ptr(), m.out_features,
                        w.shape[1], m.w_scale.data_ptr(), None, out.data_ptr(), m.out_features, -1)
            calls.append((fn, args))

    def run():
        for fn, args in calls:
            if fn(*args) != 0:
                raise RuntimeError("native call failed")
    run.keep = keep
    return run


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="2b4t", choices=list(MODEL_SHAPES))
    p.add_argument("--depth", type=int, default=None, help="blocks to build (default: the shape's)")
    p.add_argument("--rounds", type=int, default=60, help="rounds of one decode step of each variant")
    p.add_argument("--steps", type=int, default=8, help="positions cycled through (context prompt..prompt+steps)")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    if not tq1.available():
        raise SystemExit(f"the native TQ1 kernels are not available: {tq1.LOAD_ERROR}")
    ops.set_num_threads(a.threads)
    shape = MODEL_SHAPES[a.shape]
    t0 = time.perf_counter()
    i2 = build_random_model(shape, "packed", depth=a.depth, max_seq_len=a.prompt + a.steps + 8, seed=0)
    t1 = time.perf_counter()
    q1 = repack_tq1(build_random_model(shape, "packed", depth=a.depth, max_seq_len=a.prompt + a.steps + 8, seed=0))
    t2 = time.perf_counter()
    depth = len(i2.layers)
    print(f"cpu: {cpu_model()} | native threads {ops.get_num_threads()}, torch threads 1 | {a.shape} x {depth} "
          f"layers | ISA {cpu.default_isa()}, TQ1 kernel {tq1.kernel_name()} | built in {t1 - t0:.0f} s, TQ1 repack {t2 - t1:.0f} s", flush=True)

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, i2.num_tokens, (1, a.prompt), generator=g)
    tok = torch.randint(0, i2.num_tokens, (1, 1), generator=g)
    with torch_threads(1):
        with fused_path(False):
            same = torch.equal(i2(prompt[:, :4]), q1(prompt[:, :4]))
        calls = native_block_calls()
        same_fused = torch.equal(i2(prompt[:, :4]), q1(prompt[:, :4]))
        ran = native_block_calls() - calls == 2 * depth
        print(f"same logits (4 tokens): module path {same}, fused path {same_fused} (native blocks ran: {ran})",
              flush=True)
        caches = {}
        for name, model in (("i2", i2), ("tq1", q1)):
            caches[name] = model.new_caches(1, a.prompt + a.steps + 1)
            model(prompt, caches=caches[name], start_pos=0)
        variants = {"i2 fused": ("i2", i2, True), "tq1 fused": ("tq1", q1, True), "i2 modules": ("i2", i2, False),
                    "tq1 modules": ("tq1", q1, False),
                    "i2 linears": ("i2", linear_calls(i2), None), "tq1 linears": ("tq1", linear_calls(q1), None)}
        times = {v: [] for v in variants}
        for r in range(a.rounds):           # one step of each variant per round: all see the same load
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            pos = a.prompt + r % a.steps
            for v in order:
                cname, model, fused = variants[v]
                if fused is None:                     # the linears only: one token's matmuls
                    s = time.perf_counter()
                    model()
                    times[v].append(time.perf_counter() - s)
                    continue
                with fused_path(fused):
                    s = time.perf_counter()
                    model(tok, caches=caches[cname], start_pos=pos)
                    times[v].append(time.perf_counter() - s)
    ctx = a.prompt + a.steps // 2
    bytes_tok = {"i2": decode_bytes_per_token(i2, ctx), "tq1": decode_bytes_per_token(q1, ctx)}
    base = statistics.median(times["i2 fused"])
    print(f"{'variant':>12} | {'MB/token':>9} | {'tok/s median':>12} | {'tok/s fastest':>13} | {'GB/s (median)':>13} "
          f"| time / i2 fused")
    for v, (cname, _, _) in variants.items():
        med, mn = statistics.median(times[v]), min(times[v])
        b = bytes_tok[cname]["total"]
        print(f"{v:>12} | {b / 1e6:9.1f} | {1 / med:12.2f} | {1 / mn:13.2f} | {b / med / 1e9:13.2f} | {med / base:.3f}")
    print(f"resident MB: i2 {bytes_tok['i2']['resident'] / 1e6:.0f}, tq1 {bytes_tok['tq1']['resident'] / 1e6:.0f}; "
          f"{a.rounds} steps per variant (one per round, order alternating), context {a.prompt}..{a.prompt + a.steps}")


if __name__ == "__main__":
    main()
