"""Import a GGUF file of architecture ``bitnet`` (llama.cpp) as a packed :class:`bitnet.BitNetTransformer`.

Reads what :func:`bitnet.convert.gguf_export.export_gguf` writes and what llama.cpp's converters write
(``convert_hf_to_gguf.py`` for ``BitnetForCausalLM`` / ``BitNetForCausalLM`` checkpoints):

* metadata ``bitnet.{context_length, embedding_length, block_count, feed_forward_length,
  attention.head_count, attention.head_count_kv, attention.layer_norm_rms_epsilon}`` (required),
  ``bitnet.rope.freq_base`` (default 10000), ``bitnet.hidden_activation`` (when absent: ``"relu2"`` if
  the file's ``general.*`` names say BitNet b1.58 2B4T, else ``"silu"``, what llama.cpp's bitnet graph runs);
* tensors ``token_embd``, ``output_norm``, optional ``output`` (an untied head), and per block
  ``blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_sub_norm, attn_output, ffn_norm, ffn_gate, ffn_up,
  ffn_sub_norm, ffn_down}.weight``, each linear with an optional F32 ``.scale`` that multiplies it.

Linear weights may be TQ2_0, TQ1_0 or any type gguf's ``quants`` module dequantises (F32, F16, BF16,
Q8_0, ...). Either way the dequantised values must be ternary x one scale: ``v = t * d`` with
``t`` in {-1, 0, +1} and a single ``d`` over the whole tensor (our files store ``d = 1`` per TQ block
and the per-tensor scale in ``.scale``; llama.cpp's converter stores ``d = mean|W|`` in every block).
The ternary codes and ``w_scale = d * scale`` are recovered exactly and packed into the I2 layout
(:mod:`bitnet.quant.packing`); anything else (per-block scales that differ, non-ternary values) is
refused with an error naming the file and the tensor.

Tokenizer: a "llama" vocabulary whose first 256 tokens are the ``<0xNN>`` byte tokens (id 32 may be
``"▁"``, the space token our exporter writes for llama.cpp) is this package's byte tokenizer
(:class:`bitnet.tokenizer.ByteTokenizer`, tokens 256.. as its special tokens); a "gpt2" BPE vocabulary
with merges becomes a Hugging Face fast tokenizer (byte-level BPE, special tokens, bos/eos and chat
template of the file) wrapped in :class:`bitnet.tokenizer.HFTokenizer`; any other vocabulary (e.g. a
SentencePiece "llama" vocabulary with scores) gives ``None``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..io import CheckpointError, load_state_into, materialize_tables

GGUF_MAGIC = b"GGUF"
LINEARS = {"attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj", "attn_output": "attn.out_proj",
           "ffn_gate": "ffn.gate", "ffn_up": "ffn.up", "ffn_down": "ffn.down"}
"""GGUF linear name in block N -> our module path inside ``layers.N``."""
NORMS = {"attn_norm": "attn_norm", "attn_sub_norm": "attn.sub_norm", "ffn_norm": "ffn_norm",
         "ffn_sub_norm": "ffn.post_norm"}
"""GGUF norm name in block N -> our RMSNorm path inside ``layers.N``."""
ACTIVATIONS = ("silu", "gelu", "relu2")
HEADS = ("int8", "fp")
_TOKEN_CONTROL = 3


class GGUFImportError(CheckpointError):
    """A GGUF file that cannot be read as a packed bitnet model (the message names the file)."""


def load_gguf(path: str | os.PathLike, device=None, head: str = "int8", activation: str | None = None):
    """Read a GGUF file of arch ``bitnet`` into a packed :class:`bitnet.BitNetTransformer` (eval mode).

    Args:
        path: the ``.gguf`` file.
        device: where to put the model (default cpu; the fused native decode path runs on cpu).
        head: ``"int8"`` (default, as :func:`bitnet.pack`: int8 output head, the embedding table stays
            float32) or ``"fp"`` (float32 head).
        activation: override the FFN gate activation (``"silu"``, ``"gelu"``, ``"relu2"``); by default
            ``bitnet.hidden_activation`` of the file, else ``"silu"``.
    Returns:
        ``(model, tokenizer)``: tokenizer is a ByteTokenizer, an HFTokenizer, or None for a vocabulary
        that is neither ours nor a byte-level BPE (see the module docstring).
    Raises:
        FileNotFoundError for a missing file; :class:`GGUFImportError` (a ValueError) naming the file for
        a file that is not GGUF, of another architecture, with a missing key or tensor, a wrong shape, or
        a linear weight that is not ternary x one scale.
    """
    try:
        import gguf
    except ImportError as err:
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf "
                          "(or pip install '.[hf]' from a clone of bitnet)") from err
    from ..io import resolve_device
    from ..models import BitNetTransformer
    from ..nn.int8_linear import Int8Linear
    from .pack import pack

    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    path = Path(path)
    reader = open_gguf(path)
    meta = _Meta(reader, path)
    arch = meta.get("general.architecture")
    if arch != "bitnet":
        raise GGUFImportError(f"{path}: general.architecture is {arch!r}; only 'bitnet' GGUF files can be imported")
    cfg = _model_config(meta, path, activation)
    tensors = {t.name: t for t in reader.tensors}
    state = _state_dict(tensors, cfg, path, gguf)
    tied = "head.weight" not in state
    cfg["tie_embeddings"] = tied
    with torch.device("meta"):
        model = BitNetTransformer(**cfg)
    pack(model, head="fp")
    if tied:
        model.head.weight = model.embed.weight
    load_state_into(model, state, {"head.weight": "embed.weight"} if tied else {}, path, assign=True)
    if tied:
        model.head.weight = model.embed.weight
    for layer in model.layers:                          # the file has one rms eps for every norm
        layer.ffn.post_norm.eps = cfg["norm_eps"]
    materialize_tables(model)
    if head == "int8":
        model.head = Int8Linear.from_linear(model.head)
    device = torch.device("cpu") if device is None else resolve_device(device)
    return model.to(device).eval(), tokenizer_from_gguf(meta)


def open_gguf(path: Path):
    """A ``gguf.GGUFReader`` of ``path``, with errors that name the file."""
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFImportError(f"{path}: not a GGUF file (first bytes {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError) as err:
        raise GGUFImportError(f"{path}: corrupt or truncated GGUF file ({err})") from err


class _Meta:
    """Typed access to a GGUF reader's key/value fields, errors naming the file and key."""

    def __init__(self, reader, path: Path):
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise GGUFImportError(f"{self.path}: missing metadata key {key!r}")
        return value


def _model_config(meta: _Meta, path: Path, activation: str | None) -> dict:
    dim = int(meta.need("bitnet.embedding_length"))
    heads = int(meta.need("bitnet.attention.head_count"))
    hidden = int(meta.need("bitnet.feed_forward_length"))
    if heads <= 0 or dim % heads:
        raise GGUFImportError(f"{path}: bitnet.attention.head_count={heads} does not divide embedding_length={dim}")
    rope_dim = meta.get("bitnet.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != dim // heads:
        raise GGUFImportError(f"{path}: bitnet.rope.dimension_count={rope_dim}; only full-head rotary "
                              f"({dim // heads}) is supported")
    scaling = meta.get("bitnet.rope.scaling.type")
    factor = meta.get("bitnet.rope.scaling.factor")
    if scaling not in (None, "none", "linear") or (factor is not None and float(factor) != 1.0):
        raise GGUFImportError(f"{path}: rope scaling {scaling!r} x {factor} is not supported (only none / 1.0)")
    act = activation if activation is not None else meta.get("bitnet.hidden_activation") or _default_activation(meta)
    if act not in ACTIVATIONS:
        raise GGUFImportError(f"{path}: hidden activation {act!r} is not one of {', '.join(ACTIVATIONS)}")
    return dict(dim=dim, depth=int(meta.need("bitnet.block_count")), heads=heads,
                kv_heads=int(meta.need("bitnet.attention.head_count_kv")),
                ff_mult=hidden // dim if hidden % dim == 0 else (hidden + 0.5) / dim,   # int(dim * ff_mult) == hidden
                max_seq_len=int(meta.need("bitnet.context_length")), activation=act,
                rope_base=_f32_decimal(meta.get("bitnet.rope.freq_base", 10000.0)),
                norm_eps=_f32_decimal(meta.need("bitnet.attention.layer_norm_rms_epsilon")))


def _default_activation(meta: _Meta) -> str:
    """Activation of a file without ``bitnet.hidden_activation``: "relu2" for microsoft's BitNet b1.58 2B4T
    (llama.cpp's converter names the file after the checkpoint and writes no activation key, yet that model
    uses squared ReLU), else "silu" (1bitLLM's bitnet_b1_58 models, our silu exports, llama.cpp's graph)."""
    names = " ".join(str(meta.get(k) or "") for k in ("general.name", "general.basename", "general.finetune",
                                                      "general.size_label", "general.source.huggingface.repository"))
    squashed = names.lower().replace("-", "").replace("_", "").replace(" ", "")
    return "relu2" if "2b4t" in squashed else "silu"


def _f32_decimal(value) -> float:
    """The shortest decimal that a GGUF float32 value stands for (1e-6 stored as float32 reads back as
    9.99999997e-07; the writer meant 1e-6, and the norms then compute exactly as the exported model)."""
    return float(str(np.float32(value)))


def _array(tensor, gguf) -> np.ndarray:
    """Dequantised float32 values of a GGUF tensor in torch order (reversed ggml dims)."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


def ternary_and_scale_of(values: np.ndarray, name: str, path) -> tuple[np.ndarray, float]:
    """(t int8 in {-1, 0, 1}, d) with ``values == t * d`` exactly; GGUFImportError when no such pair exists."""
    mag = np.abs(values)
    d = float(mag.max()) if mag.size else 0.0
    if not np.all((mag == d) | (mag == 0)):
        other = float(mag[(mag != d) & (mag != 0)].flat[0])
        raise GGUFImportError(f"{path}: tensor {name} is not ternary x one scale (magnitudes {d!r} and {other!r}: "
                              f"blocks with different scales or non-ternary weights cannot be packed exactly)")
    return np.sign(values).astype(np.int8), d


def _state_dict(tensors: dict, cfg: dict, path: Path, gguf) -> dict[str, torch.Tensor]:
    from ..quant import pack_i2

    def need(name):
        if name not in tensors:
            raise GGUFImportError(f"{path}: missing tensor {name!r}")
        return tensors[name]

    def f32(name):
        return torch.from_numpy(_array(need(name), gguf).copy())

    embed = f32("token_embd.weight")                                        # (vocab, dim)
    if embed.dim() != 2 or embed.shape[1] != cfg["dim"]:
        raise GGUFImportError(f"{path}: token_embd.weight has shape {tuple(embed.shape)}, expected (vocab, {cfg['dim']})")
    cfg["num_tokens"] = int(embed.shape[0])
    state = {"embed.weight": embed, "norm.weight": f32("output_norm.weight")}
    if "output.weight" in tensors:
        state["head.weight"] = f32("output.weight")
    for i in range(cfg["depth"]):
        p, q = f"blk.{i}.", f"layers.{i}."
        for gname, ours in NORMS.items():
            state[q + ours + ".weight"] = f32(p + gname + ".weight")
        for gname, ours in LINEARS.items():
            name = p + gname + ".weight"
            t, d = ternary_and_scale_of(_array(need(name), gguf), name, path)
            scale = np.float32(d)
            if p + gname + ".scale" in tensors:
                extra = _array(tensors[p + gname + ".scale"], gguf).reshape(-1)
                if extra.size != 1:
                    raise GGUFImportError(f"{path}: {p + gname}.scale must hold one value, has {extra.size}")
                scale = np.float32(scale * extra[0])                         # exact when d == 1 (our files)
            state[q + ours + ".w_packed"] = pack_i2(torch.from_numpy(t))
            state[q + ours + ".w_scale"] = torch.tensor(float(scale), dtype=torch.float32)
    return state


# ------------------------------------------------------------------------------------------------
# Tokenizer

def _is_byte_vocab(tokens: list[str]) -> bool:
    if len(tokens) < 256:
        return False
    return all(tok == f"<0x{i:02X}>" or (i == 0x20 and tok == "\u2581") for i, tok in enumerate(tokens[:256]))


def tokenizer_from_gguf(meta: _Meta):
    """The tokenizer a GGUF file describes: ByteTokenizer, HFTokenizer (byte-level BPE) or None."""
    from ..tokenizer import ByteTokenizer

    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    if model == "llama" and _is_byte_vocab(tokens):
        special = tokens[256:]
        if len(set(special)) == len(special) and all(special):
            return ByteTokenizer(special)
        return ByteTokenizer()
    if model == "gpt2" and meta.get("tokenizer.ggml.merges"):
        return _bpe_tokenizer(meta, tokens)
    return None


# Split patterns of the byte-level BPE pre-tokenisers llama.cpp names in tokenizer.ggml.pre
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _bpe_tokenizer(meta: _Meta, tokens: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ..tokenizer import HFTokenizer

    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    if meta.get("tokenizer.ggml.pre") in ("llama-bpe", "llama3", "smaug-bpe"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:                                                     # GPT-2's own split
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    specials = [t for t, kind in zip(tokens, types) if kind == _TOKEN_CONTROL]
    kwargs = {}
    for key, attr in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token"), ("unknown", "unk_token")):
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        if tid is not None and 0 <= int(tid) < len(tokens):
            kwargs[attr] = tokens[int(tid)]
    template = meta.get("tokenizer.chat_template")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=specials, **kwargs)
    if template:
        hf.chat_template = template
    return HFTokenizer(hf)


__all__ = ["GGUFImportError", "load_gguf", "open_gguf", "ternary_and_scale_of", "tokenizer_from_gguf"]
