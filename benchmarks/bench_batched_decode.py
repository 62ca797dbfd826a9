"""Cost of one batched decode step (one token per row) against one row alone, on packed random models.

For B = 1, 2, 4, 8, 16 rows: ``model(tokens (B, 1), caches, positions (B,))``, i.e. the native fused
blocks of every layer (bitnet/models/fused_block.py -> csrc/block.cpp), the final norm and the head.
The B values are timed in rounds (one call each per round, medians), so that all see the same machine
load; printed: ms per step, tokens/s (B / step) and the speed-up in tokens/s over B = 1 (B x the
step-time ratio). Perfect batching (weights read once per step for all rows) approaches B; the KV cache
each row reads (grows with the position) and the attention do not shrink with batching.

KV-cache dtypes (``--kv-dtype float32,float16,int8``, the default: all three): every (dtype, B) pair is timed
in the same rounds, and the table puts them side by side with each one's speed-up over the first dtype at
each B. A float16 cache halves the bytes a step reads from the caches, an int8 one quarters them (plus one
float32 scale per key/value vector); entries are rounded when written, the math stays float32.

Shapes: ``load`` is the server load test's model (dim 1024, 12 layers, 16 heads); ``2b4t`` the blocks of
BitNet-b1.58-2B-4T (dim 2560, 20 heads / 5 KV heads, hidden 6912) at reduced depth (``--depth-2b4t``,
default 4). Both use a 256-token vocabulary (the step, not the head, is measured). ``2b4t-full`` is the
whole model: 30 layers and the 128256-row int8 head (AMX-INT8 where the CPU has it).

    python benchmarks/bench_batched_decode.py --threads 2 --torch-threads 1 --pos 100
    python benchmarks/bench_batched_decode.py --shapes load --batches 1,4,16 --kv-dtype float32,float16,int8
    python benchmarks/bench_batched_decode.py --shapes 2b4t-full --batches 1,16     # the whole 2B4T model
    BITNET_NATIVE_LIB=/path/to/other/_bitnet_native.so python benchmarks/bench_batched_decode.py  # A/B a build
"""

from __future__ import annotations

import argparse
import sys

import torch

from bitnet.bench import MODEL_SHAPES, _time_side_by_side, build_random_model, cpu_model
from bitnet.nn.attention import kv_dtype
from bitnet.ops import cpu

SHAPES = {
    "load": (dict(dim=1024, depth=12, heads=16, num_tokens=256), None),
    "2b4t": (dict(MODEL_SHAPES["2b4t"], num_tokens=256), 4),
    "2b4t-full": (dict(MODEL_SHAPES["2b4t"]), None),
}


KV_BYTES = {"float32": 4, "float16": 2, "int8": 1}      # bytes per cached entry (int8: + a scale per vector)


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _kv_dtypes(text: str) -> list[str]:
    names = text.split(",")
    for n in names:
        if n not in KV_BYTES:
            raise argparse.ArgumentTypeError(f"expected comma-separated KV-cache dtypes of {', '.join(KV_BYTES)}, "
                                             f"got {text!r}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"KV-cache dtypes repeat in {text!r}")
    return names


def time_batches(model, batches, pos: int, budget_s: float, kv_dtypes=("float32",)) -> dict[tuple[str, int], float]:
    """Median seconds of one decode step per (KV-cache dtype, batch size B) (all rows at position ``pos``),
    all timed in the same rounds."""
    max_len = pos + 2
    keys, fns = [], []
    for name in kv_dtypes:
        for b in batches:
            caches = model.new_caches(b, max_len, dtype=kv_dtype(name, "--kv-dtype"))
            tokens = torch.randint(0, 256, (b, 1))                   # both shapes: vocabulary 256
            positions = torch.full((b,), pos, dtype=torch.int64)
            keys.append((name, b))
            fns.append(lambda c=caches, t=tokens, p=positions: model(t, c, p))
    with torch.inference_mode():
        med, _ = _time_side_by_side(fns, budget_s, min_reps=5)
    return dict(zip(keys, med))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="load,2b4t", help=f"comma-separated, of: {', '.join(SHAPES)}")
    ap.add_argument("--batches", type=_positive_ints, default=[1, 2, 4, 8, 16], help="batch sizes (first: the base)")
    ap.add_argument("--pos", type=int, default=100, help="position of every row (cache length - 1), default 100")
    ap.add_argument("--threads", type=int, default=2, help="native threads (the blocks), default 2")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch threads (embedding, final norm, head), default 1: torch's spinning OpenMP "
                         "workers beside the native pool's on 2 cores made the 2b4t B=16 step 2.6x slower")
    ap.add_argument("--depth-2b4t", type=int, default=4, help="blocks of the 2b4t shape, default 4 (of 30)")
    ap.add_argument("--budget", type=float, default=10.0, help="seconds of timing per shape, default 10")
    ap.add_argument("--kv-dtype", type=_kv_dtypes, default=list(KV_BYTES),
                    help="comma-separated KV-cache dtypes timed side by side, of float32, float16, int8 "
                         "(default all)")
    args = ap.parse_args(argv)
    shapes = args.shapes.split(",")
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"--shapes: unknown shape {s!r} (known: {', '.join(SHAPES)})")
    if args.pos < 0 or min(args.threads, args.torch_threads, args.depth_2b4t) < 1:
        ap.error("--pos must be >= 0, --threads, --torch-threads and --depth-2b4t >= 1")
    if not cpu.available():
        print(f"native library not loaded: {cpu.LOAD_ERROR}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.torch_threads)
    cpu.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()}; ISA {cpu.default_isa()}; {args.threads} native / {args.torch_threads} torch "
          f"threads; rows at position {args.pos}; library {cpu.LIB_PATH}")
    for name in shapes:
        shape, depth = SHAPES[name]
        depth = args.depth_2b4t if name == "2b4t" else depth
        model = build_random_model(shape, "packed", depth=depth, max_seq_len=args.pos + 2)
        times = time_batches(model, args.batches, args.pos, args.budget, args.kv_dtype)
        layers = len(model.layers)
        of = "" if depth is None else f" (of {MODEL_SHAPES[name]['depth']})"
        kv_mb = {b: 2 * layers * b * model.layers[0].attn.kv_heads * (args.pos + 1) * model.layers[0].attn.head_dim / 1e6
                 for b in args.batches}                               # elements (millions) a step reads
        head_dim = model.layers[0].attn.head_dim
        print(f"\n{name}: dim {shape['dim']}, {layers} layers{of}, {shape['heads']} heads")
        b0 = args.batches[0]
        head = f"{'B':>4}"
        for kv in args.kv_dtype:
            head += f" | {kv + ' ms/step':>16} {'tok/s':>7} {'x vs B=' + str(b0):>9} {'KV MB':>6}"
        for kv in args.kv_dtype[1:]:
            head += f" | {kv + '/' + args.kv_dtype[0] + ' tok/s':>22}"
        print(head)
        for b in args.batches:
            line = f"{b:>4}"
            for kv in args.kv_dtype:
                t, base = times[(kv, b)], times[(kv, b0)] / b0        # seconds per token at the base B
                size = KV_BYTES[kv] + (4 / head_dim if kv == "int8" else 0)
                line += f" | {t * 1e3:>16.2f} {b / t:>7.0f} {base / (t / b):>9.2f} {kv_mb[b] * size:>6.1f}"
            for kv in args.kv_dtype[1:]:
                line += f" | {times[(args.kv_dtype[0], b)] / times[(kv, b)]:>22.2f}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
