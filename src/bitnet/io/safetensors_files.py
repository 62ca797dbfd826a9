"""Tensor files: safetensors written atomically and read (whole or header only), plain state dicts read
with ``torch.load(weights_only=True)``; every read error names the file."""

from __future__ import annotations

from pathlib import Path

import torch

from ..io_checks import CheckpointError, first_line
from .atomic import atomic_write
from .layout import STATE_DICT_SUFFIXES


def _safetensors_writer(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None):
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return lambda tmp: save_file(flat, tmp, metadata=metadata)


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    """Atomically write ``tensors`` (made contiguous, moved to CPU) as a safetensors file."""
    return atomic_write(path, _safetensors_writer(tensors, metadata))



def read_safetensors_header(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file as meta tensors (shape and dtype, no data) and its metadata:
    what a file claims, read without loading it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            shapes = {}
            for k in f.keys():
                sl = f.get_slice(k)
                shapes[k] = torch.empty(sl.get_shape(), dtype=dtypes.get(sl.get_dtype(), torch.uint8), device="meta")
    except Exception as e:  # safetensors raises SafetensorError / OSError for damaged files
        raise CheckpointError(f"cannot read safetensors checkpoint {path}: {first_line(e)}") from e
    return shapes, meta


def _read_safetensors(path, device="cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises SafetensorError / OSError for damaged files
        raise CheckpointError(f"cannot read safetensors checkpoint {path}: {first_line(e)}") from e
    return tensors, meta


def _unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """Accept ``state_dict`` as saved by tutorials, or common wrappers ({'model': sd}, {'state_dict': sd})."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict", "module"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()) \
            or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(
            f"{path} does not hold a state dict of tensors (got {type(obj).__name__}); "
            "save models with torch.save(model.state_dict(), path)"
        )
    prefixes = ("module.", "_orig_mod.", "model.")  # DataParallel, torch.compile, wrapper modules
    out = {}
    for k, v in obj.items():
        for p in prefixes:
            if k.startswith(p) and any(x.startswith(p + "embed.") for x in obj):
                k = k[len(p):]
        out[k] = v
    return out


def read_state_dict(path, device="cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors`` file or a ``.pth``/``.pt`` state dict (weights_only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, device)
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise CheckpointError(
            f"unknown checkpoint type {path.suffix!r} for {path}: expected .safetensors or one of {STATE_DICT_SUFFIXES}"
        )
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # UnpicklingError (not weights-only), RuntimeError / EOFError (truncated)
        raise CheckpointError(
            f"cannot read {path} with torch.load(weights_only=True): {first_line(e)}. Only plain state dicts "
            "are loaded (no pickled modules); re-save with torch.save(model.state_dict(), path)"
        ) from e
    return _unwrap_state_dict(obj, path), {}
