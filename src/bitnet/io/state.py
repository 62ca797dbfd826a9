"""A model's tensors in a checkpoint: tied duplicates dropped and restored, the file's payload (compact
base 3 for packed models), shapes checked against the model, the config inferred from shapes alone, and
the derived tables a meta-device construction leaves empty."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from ..io_checks import LAYER_RE, CheckpointError, first_line, positive_int
from ..quant import padded_in_features
from ..storage.packed_io import COMPACT_KEY, compact_tensors, packed_in_features
from .layout import FORMAT
from .safetensors_files import save_safetensors


def split_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one: returns (unique tensors, {dropped: kept})."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen.setdefault(key, name)
            unique[name] = t
    return unique, aliases


def model_config(model: nn.Module) -> dict:
    """The constructor kwargs of ``model`` (its ``.config`` dict); TypeError for models without one."""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, dict):
        raise TypeError(
            f"{type(model).__name__} has no .config dict; only models built from a config "
            "(such as BitNetTransformer) can be saved as bitnet checkpoints"
        )
    return dict(cfg)


def _model_payload(model: nn.Module, metadata: dict[str, str] | None, compact: bool) -> tuple[dict, dict]:
    """(tensors, metadata) of :func:`save_model`'s file."""
    tensors, aliases = split_tied(model.state_dict())
    meta = {"format": FORMAT, "bitnet.model_type": type(model).__name__,
            "bitnet.config": json.dumps(model_config(model)), "bitnet.aliases": json.dumps(aliases)}
    if compact:
        layers = packed_in_features(model)
        if not layers:
            raise ValueError("compact=True needs a packed model: call bitnet.pack(model) first")
        tensors, compact_meta = compact_tensors(tensors, layers)
        meta.update(compact_meta)
    meta.update(metadata or {})
    return tensors, meta


def save_model(model: nn.Module, path, metadata: dict[str, str] | None = None, compact: bool = False) -> Path:
    """Atomically write the model tensors (tied duplicates dropped) to a safetensors file ``path``.

    ``compact=True`` stores the 2-bit weights of a packed model in base 3 (1.6 bits per weight).
    """
    tensors, meta = _model_payload(model, metadata, compact)
    return save_safetensors(tensors, path, meta)



def check_state_shapes(model: nn.Module, shapes: dict[str, torch.Tensor], aliases: dict[str, str], source) -> None:
    """CheckpointError naming the tensor and ``source`` when ``shapes`` (tensors, meta tensors allowed) has
    other keys or shapes than ``model``'s state dict (after restoring the tied ``aliases``)."""
    expected = model.state_dict()
    tied_here = split_tied(expected)[1] if not any(t.is_meta for t in expected.values()) else {}
    shapes = dict(shapes)
    for dst, src in {**aliases, **tied_here}.items():
        if dst not in shapes and src in shapes:
            shapes[dst] = shapes[src]
    if getattr(model, "config", {}).get("tie_embeddings") and "head.weight" in expected \
            and "head.weight" not in shapes and "embed.weight" in shapes:
        shapes["head.weight"] = shapes["embed.weight"]       # meta models do not show their ties by storage
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match {type(model).__name__}: missing tensors {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}"
            f"{'...' if len(unexpected) > 8 else ''}"
        )
    for k, v in expected.items():
        if tuple(shapes[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source}: tensor {k!r} has shape {tuple(shapes[k].shape)}, the model expects {tuple(v.shape)}"
            )


def load_state_into(model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str], source,
                    assign: bool = False) -> None:
    """``model.load_state_dict`` with tied tensors restored and errors that name the tensor and the file."""
    tied_here = split_tied(model.state_dict())[1]
    tensors = dict(tensors)
    for dst, src in {**aliases, **tied_here}.items():
        if dst not in tensors and src in tensors:
            tensors[dst] = tensors[src]
    check_state_shapes(model, tensors, {}, source)
    model.load_state_dict(tensors, strict=True, assign=assign)



def _expanded_shapes(shapes: dict[str, torch.Tensor], meta: dict[str, str], source) -> dict[str, torch.Tensor]:
    """Shapes with base-3 ``*.w_base3`` entries (compact files) replaced by the I2 ``*.w_packed`` they expand to."""
    if COMPACT_KEY not in meta:
        return shapes
    try:
        compact = json.loads(meta[COMPACT_KEY])
        if not isinstance(compact, dict):
            raise TypeError("not an object")
        out = {}
        for name, t in shapes.items():
            if name in compact:
                n, k = (int(v) for v in compact[name])
                if n < 1 or k < 1 or t.dim() != 1 or t.shape[0] != math.ceil(n * k / 5):
                    raise ValueError(f"{name} has {tuple(t.shape)} bytes, not the ceil({n} * {k} / 5) of its shape")
                out[name[: -len(".w_base3")] + ".w_packed"] = torch.empty(n, padded_in_features(k) // 4,
                                                                        dtype=torch.uint8, device="meta")
            else:
                out[name] = t
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: metadata '{COMPACT_KEY}' is not a valid {{tensor: [rows, columns]}} map "
                              f"({first_line(e)})") from e
    return out


def materialize_tables(model: nn.Module) -> None:
    """Rebuild derived, non-persistent buffers (rotary tables) that a meta-device construction left empty."""
    from ..nn.rotary import RotaryEmbedding

    for module in model.modules():
        if isinstance(module, RotaryEmbedding) and module.cos.is_meta:
            module.build_tables(torch.device("cpu"))


def guess_heads(dim: int, kv_dim: int) -> int:
    """A head count consistent with the shapes: 8 (BitNetTransformer's default) when possible, else
    head_dim 64, 128, 32, 16 in that order. Shapes cannot determine heads; pass ``heads=`` when known."""
    candidates = [8] + [dim // hd for hd in (64, 128, 32, 16) if dim % hd == 0] + [4, 2, 1]
    for h in candidates:
        if h <= 0 or dim % h:
            continue
        hd = dim // h
        if hd % 2 == 0 and kv_dim % hd == 0 and h % (kv_dim // hd) == 0:
            return h
    raise CheckpointError(f"no head count fits dim={dim} and k_proj width {kv_dim}; pass heads=")


def infer_config(state: dict[str, torch.Tensor], heads: int | None = None, source: str = "state dict") -> dict:
    """BitNetTransformer kwargs from the tensor shapes of a state dict.

    Read from shapes: ``num_tokens, dim`` (embed.weight), ``depth`` (highest ``layers.N``), ``ff_mult``
    (ffn.up.weight rows / dim), ``kv_heads`` (k_proj rows / head_dim), ``tie_embeddings`` (head.weight
    absent). Not visible in shapes, so defaulted: ``heads`` (see :func:`guess_heads`, with a warning),
    ``weights="1.58"``, ``bits=8``, ``activation="silu"``, ``max_seq_len=2048``. Override any of them.
    """
    def need(key):
        if key not in state:
            raise CheckpointError(f"{source} has no tensor {key!r}; cannot infer a BitNetTransformer from it")
        if state[key].dim() < 1 or (key == "embed.weight" and state[key].dim() != 2):
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(state[key].shape)}, not a matrix")
        return state[key]

    num_tokens, dim = need("embed.weight").shape
    layers = {int(m.group(1)) for k in state if (m := LAYER_RE.match(k))}
    if not layers:
        raise CheckpointError(f"{source} has no 'layers.N.*' tensors; cannot infer depth")
    hidden = need("layers.0.ffn.up.weight").shape[0]
    kv_dim = need("layers.0.attn.k_proj.weight").shape[0]
    if heads is None:
        heads = guess_heads(dim, kv_dim)
        warnings.warn(f"{source}: number of heads is not stored in a state dict; guessed heads={heads} "
                      "(pass heads=... or a config to be sure)", stacklevel=3)
    if not positive_int(heads) or dim % heads:
        raise CheckpointError(f"{source}: heads={heads!r} must be a positive integer dividing dim={dim}")
    head_dim = dim // heads
    ff_mult = hidden / dim
    if int(dim * ff_mult) != hidden:
        ff_mult = (hidden + 0.5) / dim
    return dict(num_tokens=int(num_tokens), dim=int(dim), depth=max(layers) + 1, heads=int(heads),
                ff_mult=ff_mult, kv_heads=kv_dim // head_dim, tie_embeddings="head.weight" not in state)
