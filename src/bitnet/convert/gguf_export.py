"""Export a ternary model to GGUF (llama.cpp), architecture ``bitnet``, tensor types TQ2_0 / TQ1_0.

Supported models: :class:`bitnet.BitNetTransformer` (weights "1.58"/"1", sub-norms on, tied
embeddings), ``bitnet.hf.BitLlamaForCausalLM`` (``sub_norm=True``, ``tie_word_embeddings=True``) and
``bitnet.hf.BitNetForCausalLM`` (the official layout). Layers may be in training form (BitLinear) or
packed. Facts followed (DESIGN.md "Storage formats"):

* keys ``bitnet.{context_length, embedding_length, block_count, feed_forward_length,
  attention.head_count, attention.head_count_kv, attention.layer_norm_rms_epsilon, rope.freq_base}``,
  ``general.file_type`` 37 (TQ2_0) / 36 (TQ1_0), ``tokenizer.ggml.model`` + ``tokenizer.ggml.tokens``;
* ``bitnet.hidden_activation`` only for "relu2" and "gelu" models, with a warning: llama.cpp builds
  that hard-code SiLU in the bitnet FFN run them wrongly, and the one proposed build that reads the key
  maps "silu"/"gelu" to a fused gate+up op and aborts on our separate gate tensor. A "silu" model is
  written without the key (what every llama.cpp build runs correctly; :mod:`.gguf_import` reads a
  missing key as "silu"). "gelu" keeps its key so that the file still says what the model is;
* byte-level models get a "llama" vocabulary of ``<0xNN>`` byte tokens with id 32 spelled ``"▁"`` (a
  normal token), ``add_bos_token`` / ``add_eos_token`` / ``add_space_prefix`` false: llama.cpp's
  SentencePiece tokeniser turns every space into "▁", which then maps to id 32, and adds neither a
  BOS nor a leading space, so it gives exactly our byte ids (a literal "▁" in text becomes id 32 too);
* tensors ``token_embd``, ``output_norm``, ``blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_sub_norm,
  attn_output, ffn_norm, ffn_gate, ffn_up, ffn_sub_norm, ffn_down}`` (+ F32 ``.scale`` [1] per linear,
  the factor the ternary values are multiplied by); no ``output.weight`` (head tied to embeddings);
* the ternary values themselves go to gguf's TQ quantiser (it rescales each 256-block by its absmax,
  so they come back exactly), never raw fp weights; rows (in_features) must be multiples of 256;
* torch (out, in) arrays are passed as they are (gguf reverses the shape); rotary is rotate-half
  (NEOX) in all our models, so Q/K are not permuted.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import nn

from ..nn.bitlinear import BitLinear
from ..quant import unpack_i2

FTYPES = ("TQ2_0", "TQ1_0")
QK_K = 256


def ternary_and_scale(module: nn.Module, norm_exported: bool = False) -> tuple[torch.Tensor, float]:
    """(values (out, in) float32 in {-1, 0, 1}, scale) of a BitLinear / packed linear.

    ``norm_exported``: the layer's input norm is written separately (attn_sub_norm / ffn_sub_norm).
    """
    if isinstance(module, BitLinear):
        if module.norm is not None and not norm_exported:
            raise ValueError("a BitLinear with its own input norm (norm=True) has no GGUF bitnet equivalent")
        q, s = module.quantized_weight()
        return q.detach().float(), float(s)
    if hasattr(module, "w_packed") and hasattr(module, "w_scale"):
        return unpack_i2(module.w_packed, module.in_features, torch.float32), float(module.w_scale)
    raise TypeError(f"expected a BitLinear or packed BitLinear, got {type(module).__name__}")


def _collect_bitnet_transformer(model) -> tuple[dict, list]:
    cfg = model.config
    if not cfg.get("tie_embeddings") and model.head.weight is not model.embed.weight:
        raise ValueError("GGUF arch 'bitnet' ties the output head to the embeddings: build the model with "
                         "tie_embeddings=True")
    if cfg["weights"] == "fp":
        raise ValueError("weights='fp' model has no ternary weights to export; use weights='1.58'")
    hp = dict(context_length=cfg["max_seq_len"], embedding_length=cfg["dim"], block_count=cfg["depth"],
              feed_forward_length=model.layers[0].ffn.up.out_features, head_count=cfg["heads"],
              head_count_kv=cfg["kv_heads"], rms_eps=cfg["norm_eps"], rope_base=cfg["rope_base"],
              activation=cfg["activation"], vocab_size=cfg["num_tokens"])
    items = [("token_embd.weight", "embed", model.embed.weight), ("output_norm.weight", "norm", model.norm.weight)]
    for i, blk in enumerate(model.layers):
        if blk.attn.sub_norm is None or blk.ffn.post_norm is None or blk.ffn.gate is None:
            raise ValueError(f"layers.{i}: GGUF bitnet needs attention sub_norm, a gated FFN and its post_norm")
        p = f"blk.{i}."
        items += [(p + "attn_norm.weight", "norm", blk.attn_norm.weight),
                  (p + "attn_q", "linear", blk.attn.q_proj), (p + "attn_k", "linear", blk.attn.k_proj),
                  (p + "attn_v", "linear", blk.attn.v_proj),
                  (p + "attn_sub_norm.weight", "norm", blk.attn.sub_norm.weight),
                  (p + "attn_output", "linear", blk.attn.out_proj),
                  (p + "ffn_norm.weight", "norm", blk.ffn_norm.weight),
                  (p + "ffn_gate", "linear", blk.ffn.gate), (p + "ffn_up", "linear", blk.ffn.up),
                  (p + "ffn_sub_norm.weight", "norm", blk.ffn.post_norm.weight),
                  (p + "ffn_down", "linear", blk.ffn.down)]
    return hp, items


def _collect_llama(model) -> tuple[dict, list]:
    c = model.config
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        raise ValueError("GGUF arch 'bitnet' ties the output head to the embeddings: use tie_word_embeddings=True")
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
    hp = dict(context_length=c.max_position_embeddings, embedding_length=c.hidden_size,
              block_count=c.num_hidden_layers, feed_forward_length=c.intermediate_size,
              head_count=c.num_attention_heads, head_count_kv=c.num_key_value_heads, rms_eps=c.rms_norm_eps,
              rope_base=float(rope), activation=c.hidden_act, vocab_size=c.vocab_size)
    items = [("token_embd.weight", "embed", model.model.embed_tokens.weight),
             ("output_norm.weight", "norm", model.model.norm.weight)]
    for i, layer in enumerate(model.model.layers):
        a, m, p = layer.self_attn, layer.mlp, f"blk.{i}."
        for lin, what in ((a.o_proj, "attn_sub_norm"), (m.down_proj, "ffn_sub_norm")):
            if getattr(lin, "norm", None) is None:
                raise ValueError(f"model.layers.{i}: GGUF bitnet needs the {what} (BitLlamaConfig(sub_norm=True))")
        items += [(p + "attn_norm.weight", "norm", layer.input_layernorm.weight),
                  (p + "attn_q", "linear", a.q_proj), (p + "attn_k", "linear", a.k_proj),
                  (p + "attn_v", "linear", a.v_proj),
                  (p + "attn_sub_norm.weight", "norm", a.o_proj.norm.weight),
                  (p + "attn_output", "linear_sub", a.o_proj),
                  (p + "ffn_norm.weight", "norm", layer.post_attention_layernorm.weight),
                  (p + "ffn_gate", "linear", m.gate_proj), (p + "ffn_up", "linear", m.up_proj),
                  (p + "ffn_sub_norm.weight", "norm", m.down_proj.norm.weight),
                  (p + "ffn_down", "linear_sub", m.down_proj)]
    return hp, items


SPACE_TOKEN = "\u2581"
"""What llama.cpp's SentencePiece tokeniser turns a space into; the byte vocabulary's token 32."""


def _byte_vocab(n: int, special: tuple[str, ...] = ()) -> tuple[list[str], list[int]]:
    """A "llama" vocabulary for byte-level models: ids 0..255 are the ``<0xNN>`` byte tokens (id 32 is
    ``"▁"``, see the module docstring), then the tokenizer's special tokens, then ``<extra_N>`` padding."""
    tokens = [SPACE_TOKEN if i == 0x20 else f"<0x{i:02X}>" for i in range(min(n, 256))]
    types = [1 if i == 0x20 else 6 for i in range(min(n, 256))]          # 1 = NORMAL, 6 = BYTE
    tokens += list(special)
    types += [3] * len(special)                                           # 3 = CONTROL
    tokens += [f"<extra_{i}>" for i in range(len(tokens), n)]
    types += [4] * (n - len(types))                                        # 4 = USER_DEFINED
    return tokens, types


def export_gguf(model: nn.Module, path: str | os.PathLike, ftype: str = "TQ2_0", tokenizer=None,
                embed_dtype: str = "f16", name: str | None = None) -> str:
    """Write ``model`` as a GGUF file (arch ``bitnet``) and return the path.

    Args:
        ftype: ``"TQ2_0"`` (2.0625 bits/weight) or ``"TQ1_0"`` (1.6875 bits/weight).
        tokenizer: a Hugging Face tokenizer (its vocabulary is written as a "gpt2" BPE vocab with merges),
            a :class:`bitnet.tokenizer.ByteTokenizer` (its special tokens follow the bytes, "<eos>" is the
            eos token) or None: then the model must be byte-level (vocab >= 256 with ids 0..255 = bytes),
            written as a "llama" vocab of ``<0xNN>`` tokens that llama.cpp tokenises as our bytes.
        embed_dtype: ``"f16"`` or ``"f32"`` for token_embd; norms and scales are always F32.
    Raises:
        ValueError naming the tensor when a linear's in_features is not a multiple of 256.
    """
    import gguf

    if ftype not in FTYPES:
        raise ValueError(f"ftype must be one of {FTYPES}, got {ftype!r}")
    if embed_dtype not in ("f16", "f32"):
        raise ValueError(f"embed_dtype must be 'f16' or 'f32', got {embed_dtype!r}")
    if hasattr(model, "layers") and hasattr(model, "embed") and isinstance(getattr(model, "config", None), dict):
        hp, items = _collect_bitnet_transformer(model)
    elif hasattr(model, "model") and hasattr(getattr(model, "model"), "layers") and hasattr(model, "lm_head"):
        hp, items = _collect_llama(model)
    else:
        raise TypeError(f"export_gguf supports BitNetTransformer, BitLlamaForCausalLM and BitNetForCausalLM, "
                        f"got {type(model).__name__}")
    qtype = getattr(gguf.GGMLQuantizationType, ftype)
    # check every linear before writing anything
    for gname, kind, obj in items:
        if kind.startswith("linear") and obj.in_features % QK_K:
            raise ValueError(f"{gname}.weight: in_features={obj.in_features} (row length) must be a multiple of "
                             f"{QK_K} for {ftype}")

    path = os.fspath(path)
    w = gguf.GGUFWriter(path, arch="bitnet")
    w.add_name(name or type(model).__name__)
    w.add_context_length(int(hp["context_length"]))
    w.add_embedding_length(int(hp["embedding_length"]))
    w.add_block_count(int(hp["block_count"]))
    w.add_feed_forward_length(int(hp["feed_forward_length"]))
    w.add_head_count(int(hp["head_count"]))
    w.add_head_count_kv(int(hp["head_count_kv"]))
    w.add_layer_norm_rms_eps(float(hp["rms_eps"]))
    w.add_rope_freq_base(float(hp["rope_base"]))
    w.add_rope_dimension_count(int(hp["embedding_length"]) // int(hp["head_count"]))
    activation = str(hp["activation"])
    if activation != "silu":
        w.add_string("bitnet.hidden_activation", activation)
        warnings.warn(f"{path}: the model's FFN activation is {activation!r}; llama.cpp builds that hard-code SiLU "
                      f"in the bitnet graph run this file wrongly (bitnet's own GGUF import reads it correctly)",
                      UserWarning, stacklevel=2)
    w.add_file_type(int(getattr(gguf.LlamaFileType, "MOSTLY_" + ftype)))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(w, tokenizer, int(hp["vocab_size"]))

    for gname, kind, obj in items:
        if kind == "embed":
            arr = obj.detach().float().cpu().numpy()
            w.add_tensor(gname, arr.astype(np.float16 if embed_dtype == "f16" else np.float32))
        elif kind == "norm":
            w.add_tensor(gname, obj.detach().float().cpu().numpy().astype(np.float32))
        else:
            values, scale = ternary_and_scale(obj, norm_exported=kind == "linear_sub")
            data = gguf.quants.quantize(values.cpu().numpy().astype(np.float32), qtype)   # exact for ternary
            w.add_tensor(gname + ".weight", data, raw_dtype=qtype)
            w.add_tensor(gname + ".scale", np.array([scale], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_tokenizer(w, tokenizer, vocab_size: int) -> None:
    if tokenizer is None or getattr(tokenizer, "kind", None) == "bytes":
        if vocab_size < 256:
            raise ValueError(f"without a tokenizer the model must be byte-level (vocab >= 256), got {vocab_size}")
        special = tuple(getattr(tokenizer, "special_tokens", ()))
        if 256 + len(special) > vocab_size:
            raise ValueError(f"tokenizer has {256 + len(special)} tokens but the model only {vocab_size}")
        tokens, types = _byte_vocab(vocab_size, special)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores([0.0] * len(tokens))
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(False)
        eos = getattr(tokenizer, "eos_id", None)
        if eos is not None:
            w.add_eos_token_id(int(eos))
        return
    import json

    if getattr(tokenizer, "kind", None) == "hf":                 # bitnet.tokenizer.HFTokenizer
        tokenizer = tokenizer.hf
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ValueError(f"tokenizer has {len(vocab)} tokens but the model only {vocab_size}")
    inv = {i: t for t, i in vocab.items()}
    tokens = [inv.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    special = set(getattr(tokenizer, "all_special_tokens", []))
    types = [3 if t in special else (5 if i not in inv else 1) for i, t in enumerate(tokens)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    model_json = json.loads(tokenizer.backend_tokenizer.to_str())["model"] if hasattr(tokenizer, "backend_tokenizer") else {}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_json.get("merges", [])]
    if merges:
        w.add_token_merges(merges)
    for attr, adder in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                        ("pad_token_id", w.add_pad_token_id), ("unk_token_id", w.add_unk_token_id)):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            adder(int(tid))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        w.add_chat_template(template)


def read_gguf_linear(path: str | os.PathLike, name: str) -> tuple[np.ndarray, float]:
    """(dequantised values (out, in), scale) of linear ``name`` (e.g. ``"blk.0.attn_q"``) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(os.fspath(path))
    tensors = {t.name: t for t in reader.tensors}
    t = tensors[name + ".weight"]
    values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
    return values, float(np.asarray(tensors[name + ".scale"].data).reshape(-1)[0])


__all__ = ["FTYPES", "export_gguf", "read_gguf_linear", "ternary_and_scale"]
