"""Batch-1 decode of a random packed BitNet-2B4T-shaped model on a GPU: eager steps vs the captured
step (``CapturedDecoder``: torch.compile fullgraph + CUDA graphs), tokens/s side by side, and the
fraction of the HBM-bandwidth bound (bytes read per token / peak bandwidth).

    python benchmarks/bench_gpu_decode.py                  # CUDA, 2b4t shape (compiles first: minutes)
    python benchmarks/bench_gpu_decode.py --dry-run        # tiny model on CPU, compile backend "eager"
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from bitnet.bench import MODEL_SHAPES, build_random_model, decode_bytes_per_token  # noqa: E402
from bitnet.generate.captured import CapturedDecoder  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(fn, tok, steps, device) -> float:
    """Fastest of ``steps`` calls of fn(tok), seconds."""
    best = float("inf")
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn(tok)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="2b4t", choices=sorted(MODEL_SHAPES))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--peak-gbps", type=float, default=3350.0, help="HBM peak (H100 SXM: 3350)")
    p.add_argument("--dry-run", action="store_true", help="tiny model on CPU (checks the script runs)")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    shape = dict(MODEL_SHAPES[args.shape])
    if args.dry_run:
        shape.update(num_tokens=300, dim=64, depth=2, heads=4, kv_heads=2)
    model = build_random_model(shape, "packed", max_seq_len=256).to(device)
    prompt = torch.randint(0, shape["num_tokens"], (1, 16), device=device)
    per_token = decode_bytes_per_token(model, 32)["total"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    print(f"device: {name}; shape {args.shape}; bytes read per token {per_token / 1e6:.1f} MB")

    caches = model.new_caches(1, 256)
    pos = {"p": 16}
    with torch.inference_mode():
        model(prompt, caches=caches, start_pos=0, logits_to_keep=1)

        def eager(tok):
            model(tok, caches=caches, start_pos=pos["p"])
            pos["p"] += 1

        tok = prompt[:, -1:]
        t_eager = time_steps(eager, tok, args.steps, device)
    dec = CapturedDecoder(model, batch=1, max_len=256, backend="eager" if args.dry_run else "inductor")
    dec.prefill(prompt)
    t0 = time.perf_counter()
    dec.step(tok)                                            # compile + capture
    compile_s = time.perf_counter() - t0
    t_captured = time_steps(dec.step, tok, args.steps, device)
    bound = args.peak_gbps * 1e9 / per_token
    print(f"{'path':10s} {'tok/s':>9s} {'x eager':>8s} {'% of HBM bound':>15s}")
    for label, t in (("eager", t_eager), ("captured", t_captured)):
        print(f"{label:10s} {1 / t:9.1f} {t_eager / t:8.2f} {100 / t / bound:14.1f}%")
    print(f"(compile + capture of the step: {compile_s:.1f} s; HBM bound {bound:.0f} tok/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
