"""Training-step time (forward + backward + AdamW step) of BitLinear models against nn.Linear, side by side.

    python benchmarks/bench_train_step.py                                  # quick: dim 256, 8 x 128 tokens
    nice -n 19 python benchmarks/bench_train_step.py --dims 256 512 --batch 32 --seq 128 --threads 1
    python benchmarks/bench_train_step.py --skip model --compile            # + torch.compile'd variants

Two families, each timed in interleaved rounds (every variant once per round, so all see the same
machine load), medians reported with the fastest round:

(a) ``BitNetTransformer`` with weights ``1.58``, ``1`` and ``fp`` (nn.Linear) at each ``--dims``;
(b) a plain nanoGPT-like torch decoder written here with ``nn.Linear`` against the same model after
    ``bitnet.replace_linears_in_hf(model, norm=True, exclude=["lm_head"])`` (drop-in BitLinear with
    its own RMSNorm).

With ``--reference`` (the default) the BitLinear variants are also timed on the reference path
(``bitnet.nn.bitlinear.fused_bitlinear(False)``: the composed quantisers differentiated by autograd),
so the effect of the fused implementation is measured in the same run. Ratios are to ``fp``
(``nn.Linear``), from medians of the wall-clock time and of the process CPU time of a step (with one
thread the CPU time ignores the time the process waits for a busy machine's cores).
A script, not a test: run it on a quiet machine (``uptime``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from bitnet import BitNetTransformer, replace_linears_in_hf
from bitnet.bench import cpu_model
from bitnet.nn.bitlinear import fused_bitlinear


class Block(nn.Module):
    """nanoGPT-style pre-LayerNorm block: causal self-attention and a GELU MLP, plain nn.Linear."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.attn_proj = nn.Linear(dim, dim)
        self.c_fc = nn.Linear(dim, 4 * dim)
        self.mlp_proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class TinyGPT(nn.Module):
    """Token + position embeddings, ``depth`` blocks, final LayerNorm, ``lm_head``."""

    def __init__(self, vocab: int, dim: int, depth: int, heads: int, max_len: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make_step(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, reference: bool,
              compile: bool = False):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    loss_fn = torch.compile(model.loss) if compile else model.loss

    def step() -> tuple[float, float]:
        with fused_bitlinear(False) if reference else contextlib.nullcontext():
            t0, c0 = time.perf_counter(), time.process_time()
            opt.zero_grad(set_to_none=True)
            loss_fn(tokens, targets).backward()
            opt.step()
            return time.perf_counter() - t0, time.process_time() - c0
    return step


def run_family(title: str, variants: dict, rounds: int, base: str) -> None:
    for step in variants.values():                                   # warm-up (allocator, first-call costs)
        step()
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for _ in range(rounds):
        for name, step in variants.items():
            w, c = step()
            wall[name].append(w)
            cpu[name].append(c)
    ref_w, ref_c = statistics.median(wall[base]), statistics.median(cpu[base])
    print(f"\n{title}")
    print(f"  {'variant':<24} {'wall s':>8} {'best':>7} {'x ' + base:>10} {'cpu s':>8} {'x ' + base:>10}")
    for name in variants:
        mw, mc = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"  {name:<24} {mw:8.3f} {min(wall[name]):7.3f} {mw / ref_w:10.2f} {mc:8.3f} {mc / ref_c:10.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[256])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the reference-path (unfused) BitLinear variants")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd variants of family (b) (BitLinear takes its reference path "
                        "under the compiler; the first, compiling step is the warm-up)")
    p.add_argument("--skip", nargs="*", default=[], choices=["model", "dropin"], help="families to skip")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; {a.threads} thread(s); "
          f"batch {a.batch} x {a.seq} tokens, depth {a.depth}, vocab {a.vocab}, {a.rounds} rounds")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    for dim in a.dims:
        if "model" not in a.skip:
            variants = {}
            for weights in ("1.58", "1", "fp"):
                torch.manual_seed(0)
                model = BitNetTransformer(a.vocab, dim, a.depth, heads=a.heads, max_seq_len=a.seq, weights=weights)
                name = "fp" if weights == "fp" else f"b{weights}"
                variants[name] = make_step(model, x, y, reference=False)
                if a.reference and weights != "fp":
                    variants[name + " (reference)"] = make_step(copy.deepcopy(model), x, y, reference=True)
            run_family(f"(a) BitNetTransformer dim {dim}: training step", variants, a.rounds, "fp")
        if "dropin" not in a.skip:
            torch.manual_seed(0)
            fp = TinyGPT(a.vocab, dim, a.depth, a.heads, a.seq)
            bit = replace_linears_in_hf(copy.deepcopy(fp), norm=True, exclude=["lm_head"])
            variants = {"nn.Linear": make_step(fp, x, y, reference=False),
                        "drop-in BitLinear": make_step(bit, x, y, reference=False)}
            if a.reference:
                variants["drop-in (reference)"] = make_step(copy.deepcopy(bit), x, y, reference=True)
            if a.compile:
                variants["nn.Linear compiled"] = make_step(copy.deepcopy(fp), x, y, False, compile=True)
                variants["drop-in compiled"] = make_step(copy.deepcopy(bit), x, y, False, compile=True)
            run_family(f"(b) nanoGPT-like decoder dim {dim}, nn.Linear vs replace_linears_in_hf(norm=True)",
                       variants, a.rounds, "nn.Linear")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
