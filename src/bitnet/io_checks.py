"""Checks of untrusted checkpoint files, each error one line naming the file and the field or tensor.

Used by :mod:`bitnet.io` before a file's content is trusted: the names a config gives to files
(:func:`inside`), a model config's types and ranges (:func:`check_model_config`) and its agreement with
the tensor shapes of the file (:func:`check_fields_against_shapes`, before any model is built), metadata
(:func:`parse_aliases`) and tensor values (:func:`check_tensor_values`: finite floats, legal 2-bit codes).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

LAYER_RE = re.compile(r"^layers\.(\d+)\.")
"""Matches the state-dict keys of block N of a BitNetTransformer."""
MAX_SEQ_LEN = 1 << 20
"""Largest ``max_seq_len`` a loaded config may ask for: every layer builds rotary tables of
``max_seq_len x head_dim`` floats when the model is made (and a server KV caches of that length)."""


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be read (corrupt, wrong keys, wrong shapes)."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def short_repr(value, limit: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") and "\0" not in name


def inside(folder, name, source, field: str) -> Path:
    """``folder / name`` for a file name read from ``source`` (at ``field``); CheckpointError unless it is
    a relative path that stays inside ``folder`` (not absolute, no ``..``). Symbolic links placed in the
    folder are followed as they are (a Hugging Face snapshot links its files into a blob store)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointError(f"{source}: {field} must be the name of a file inside {folder}, got {short_repr(name)}")
    rel = Path(name)
    if rel.is_absolute() or rel.drive or ".." in rel.parts or "\\" in name:
        raise CheckpointError(f"{source}: {field} = {name!r} points outside the folder {folder}; the files a "
                              "config names must lie inside its folder")
    return Path(folder) / rel


def positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_model_config(cfg, source) -> dict:
    """Type- and range-check BitNetTransformer kwargs read from a file; returns a copy. CheckpointError
    naming ``source`` and the field (``model_config.<field>``) otherwise. ``packed`` and ``model_type``
    (this package's own keys) are allowed too."""
    import inspect

    from .models import BitNetTransformer
    from .nn.feedforward import ACTIVATIONS
    from .nn.layers import WEIGHTS_CHOICES

    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source}: model_config must be a JSON object, got {short_repr(cfg)}")
    allowed = set(inspect.signature(BitNetTransformer).parameters) | {"packed", "model_type"}
    for key in cfg:
        if key not in allowed:
            raise CheckpointError(f"{source}: model_config.{key} is not a BitNetTransformer argument "
                                  f"(allowed: {', '.join(sorted(allowed))})")

    def check(field, ok, allowed_text):
        if field in cfg and not ok(cfg[field]):
            raise CheckpointError(f"{source}: model_config.{field} must be {allowed_text}, got {short_repr(cfg[field])}")

    for field in ("num_tokens", "dim", "depth", "heads"):
        check(field, positive_int, "a positive integer")
    check("max_seq_len", lambda v: positive_int(v) and v <= MAX_SEQ_LEN, f"an integer in [1, {MAX_SEQ_LEN}]")
    check("kv_heads", lambda v: v is None or positive_int(v), "null or a positive integer")
    check("ff_mult", lambda v: _number(v) and 0 < v <= 1024, "a number in (0, 1024]")
    check("weights", lambda v: isinstance(v, str) and v in WEIGHTS_CHOICES, f"one of {WEIGHTS_CHOICES}")
    check("bits", lambda v: positive_int(v) and 2 <= v <= 8, "an integer in 2..8")
    check("dropout", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)")
    check("activation", lambda v: isinstance(v, str) and v in ACTIVATIONS, f"one of {ACTIVATIONS}")
    for field in ("rope_base", "norm_eps"):
        check(field, lambda v: _number(v) and v > 0, "a number > 0")
    for field in ("tie_embeddings", "packed"):
        check(field, lambda v: isinstance(v, bool), "true or false")
    check("model_type", lambda v: v == "BitNetTransformer", "'BitNetTransformer' (the only model bitnet loads)")
    dim, heads, kv = cfg.get("dim"), cfg.get("heads", 8), cfg.get("kv_heads")
    if dim is not None and dim % heads:
        raise CheckpointError(f"{source}: model_config.heads={heads} must divide dim={dim}")
    if dim is not None and kv is not None and heads % kv:
        raise CheckpointError(f"{source}: model_config.kv_heads={kv} must divide heads={heads}")
    return dict(cfg)


def _rows(shapes: dict[str, torch.Tensor], layer: str) -> int | None:
    """Output rows of a linear layer in a (packed or not) state dict: dim 0 of weight / w_packed / w_int8."""
    for suffix in (".weight", ".w_packed", ".w_int8"):
        t = shapes.get(layer + suffix)
        if t is not None and t.dim() >= 1:
            return int(t.shape[0])
    return None


def check_fields_against_shapes(cfg: dict, shapes: dict[str, torch.Tensor], packed: bool, weights_file,
                                 cfg_source: str) -> None:
    """CheckpointError naming the config field that the file's tensor shapes contradict (before any model
    is built from ``cfg``, so that a wrong size never allocates)."""
    def mismatch(field, value, evidence):
        raise CheckpointError(f"{cfg_source}: model_config.{field}={value!r} does not match the tensors of "
                              f"{weights_file} ({evidence})")

    emb = shapes.get("embed.weight")
    if emb is not None and emb.dim() == 2:
        if cfg["num_tokens"] != emb.shape[0]:
            mismatch("num_tokens", cfg["num_tokens"], f"embed.weight has {emb.shape[0]} rows")
        if cfg["dim"] != emb.shape[1]:
            mismatch("dim", cfg["dim"], f"embed.weight has {emb.shape[1]} columns")
    layers = {int(m.group(1)) for k in shapes if (m := LAYER_RE.match(k))}
    if layers and cfg["depth"] != max(layers) + 1:
        mismatch("depth", cfg["depth"], f"the file has layers 0..{max(layers)}")
    dim, heads = cfg["dim"], cfg.get("heads", 8)
    kv_rows = _rows(shapes, "layers.0.attn.k_proj")
    kv_heads = cfg.get("kv_heads") or heads
    if kv_rows is not None and kv_rows != kv_heads * (dim // heads):
        mismatch("kv_heads", cfg.get("kv_heads"), f"layers.0.attn.k_proj has {kv_rows} rows = kv_heads x head_dim "
                 f"{dim // heads}" + ("" if kv_rows % (dim // heads) else "; heads does not fit either"))
    hidden = _rows(shapes, "layers.0.ffn.up")
    if hidden is not None and hidden != int(dim * cfg.get("ff_mult", 4)):
        mismatch("ff_mult", cfg.get("ff_mult", 4), f"layers.0.ffn.up has {hidden} rows = dim x ff_mult")
    if not packed and layers and "tie_embeddings" in cfg and cfg["tie_embeddings"] == ("head.weight" in shapes):
        mismatch("tie_embeddings", cfg["tie_embeddings"],
                 "the file has a separate head.weight" if "head.weight" in shapes else "the file has no head.weight")


def parse_aliases(meta: dict[str, str], source) -> dict[str, str]:
    """The ``bitnet.aliases`` metadata: {dropped tensor: kept tensor}."""
    try:
        aliases = json.loads(meta.get("bitnet.aliases", "{}"))
    except ValueError as e:
        raise CheckpointError(f"{source}: metadata 'bitnet.aliases' is not JSON ({first_line(e)})") from e
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise CheckpointError(f"{source}: metadata 'bitnet.aliases' must map tensor names to tensor names, "
                              f"got {short_repr(aliases)}")
    return aliases


def check_tensor_values(tensors: dict[str, torch.Tensor], source) -> None:
    """CheckpointError naming the tensor and ``source`` for a float tensor holding NaN or inf, or an I2
    packed weight (``*.w_packed``) holding the 2-bit code 3 (only 0, 1, 2 = -1, 0, +1 are defined)."""
    chunk = 1 << 24                                        # elements per check: bounded temporary memory
    for name, t in tensors.items():
        flat = t.reshape(-1)
        if t.dtype.is_floating_point:
            for i in range(0, flat.numel(), chunk):
                if not bool(torch.isfinite(flat[i:i + chunk]).all()):
                    raise CheckpointError(f"{source}: tensor {name!r} holds NaN or infinite values")
        elif name.endswith(".w_packed") and t.dtype == torch.uint8:
            for i in range(0, flat.numel(), chunk):
                part = flat[i:i + chunk]
                if bool((part & (part >> 1) & 0x55).any()):           # both bits of a 2-bit field set
                    raise CheckpointError(f"{source}: tensor {name!r} holds the 2-bit code 3, which is not a "
                                          "ternary weight (codes 0, 1, 2 = -1, 0, +1)")
