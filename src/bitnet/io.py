"""Checkpoints: safetensors + JSON, atomic saves, and loading from run folders or plain state dicts.

Run-folder layout (what :func:`save_checkpoint` writes and :func:`load_model` reads)::

    run/
      model.safetensors      model tensors; metadata "bitnet.config" repeats the model config (JSON)
                             and "bitnet.aliases" lists tied tensors that were left out
      config.json            {"format": "bitnet", "format_version": 1, "model_type": "BitNetTransformer",
                              "model_config": {...}, "tokenizer": {...}, "train_state": {"step": ...},
                              "train_config": {...}, "files": {...}}
      optimizer.safetensors  (training only) optimizer tensors "state.<param>.<name>", RNG states
                             "rng.<name>"; metadata "bitnet.optimizer" holds param_groups and scalars

Every file is written to a temporary file in the same folder, fsynced, then ``os.replace``-d over
the old one (config.json last), so a crash mid-save leaves the previous checkpoint readable.
No pickle anywhere: ``.pth``/``.pt`` state dicts are read with ``torch.load(weights_only=True)``.

Tied weights (``tie_embeddings=True``: ``head.weight`` *is* ``embed.weight``) cannot be stored twice
in safetensors; the duplicate is dropped at save time and re-tied at load time.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

FORMAT = "bitnet"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be read (corrupt, wrong keys, wrong shapes)."""


# --------------------------------------------------------------------------------------------- device

def resolve_device(device=None) -> torch.device:
    """``None``/``"auto"`` picks cuda, then mps, then cpu; anything else goes to ``torch.device``."""
    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from e


# --------------------------------------------------------------------------------------------- atomic

def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, fsync it, then replace ``path``.

    If ``write`` raises, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path, text: str) -> Path:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, write)


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    """Atomically write ``tensors`` (made contiguous, moved to CPU) as a safetensors file."""
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


# --------------------------------------------------------------------------------------------- model

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


def save_model(model: nn.Module, path, metadata: dict[str, str] | None = None, compact: bool = False) -> Path:
    """Atomically write the model tensors (tied duplicates dropped) to a safetensors file ``path``.

    ``compact=True`` stores the 2-bit weights of a packed model in base 3 (1.6 bits per weight).
    """
    from .convert.packed_io import compact_tensors, packed_in_features

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
    return save_safetensors(tensors, path, meta)


def save_checkpoint(
    run_dir,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    train_state: dict | None = None,
    train_config: dict | None = None,
    tokenizer=None,
    rng_states: dict[str, torch.Tensor] | None = None,
    compact: bool = False,
) -> Path:
    """Write ``model.safetensors``, optionally ``optimizer.safetensors``, then ``config.json`` into ``run_dir``.

    Each file is replaced atomically; config.json (which names the step) is written last.
    ``compact`` stores a packed model's weights in base 3 (see :func:`save_model`). Returns the run folder.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    files = {"model": MODEL_FILE}
    if optimizer is not None:
        save_optimizer(optimizer, run_dir / OPTIMIZER_FILE, extra_tensors=rng_states)
        files["optimizer"] = OPTIMIZER_FILE
    save_model(model, run_dir / MODEL_FILE, compact=compact)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": type(model).__name__,
        "model_config": model_config(model),
        "tokenizer": tokenizer.to_config() if tokenizer is not None else {"type": "bytes", "special_tokens": []},
        "train_state": train_state or {},
        "train_config": train_config or {},
        "files": files,
    }
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(config, indent=2, default=str) + "\n")
    return run_dir


# --------------------------------------------------------------------------------------------- optimizer

def save_optimizer(optimizer: torch.optim.Optimizer, path,
                   extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Optimizer state as safetensors: tensors ``state.<i>.<name>``, the rest as JSON metadata."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    for name, value in (extra_tensors or {}).items():
        tensors[f"rng.{name}"] = value
    meta = {"format": FORMAT, "bitnet.optimizer": json.dumps(
        {"type": type(optimizer).__name__, "param_groups": sd["param_groups"], "scalars": scalars})}
    return save_safetensors(tensors, path, meta)


def load_optimizer(optimizer: torch.optim.Optimizer, path, device=None) -> dict[str, torch.Tensor]:
    """Restore ``optimizer`` from :func:`save_optimizer`'s file; returns the extra (``rng.*``) tensors."""
    tensors, meta = _read_safetensors(path, device="cpu")
    if "bitnet.optimizer" not in meta:
        raise CheckpointError(f"{path} is not a bitnet optimizer file (no 'bitnet.optimizer' metadata)")
    info = json.loads(meta["bitnet.optimizer"])
    if info["type"] != type(optimizer).__name__:
        raise CheckpointError(f"{path} holds {info['type']} state, cannot load into {type(optimizer).__name__}")
    state: dict[int, dict[str, Any]] = {}
    extras = {}
    for key, value in tensors.items():
        if key.startswith("rng."):
            extras[key[4:]] = value
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in info["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = info["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except ValueError as e:
        raise CheckpointError(f"optimizer state in {path} does not fit this model: {e}") from e
    return extras


# --------------------------------------------------------------------------------------------- loading

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
        raise CheckpointError(f"cannot read safetensors checkpoint {path}: {e}") from e
    return tensors, meta


def _unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """Accept ``state_dict`` as saved by tutorials, or common wrappers ({'model': sd}, {'state_dict': sd})."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict", "module"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
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
            f"cannot read {path} with torch.load(weights_only=True): {e}. Only plain state dicts are "
            "loaded (no pickled modules); re-save with torch.save(model.state_dict(), path)"
        ) from e
    return _unwrap_state_dict(obj, path), {}


_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


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
        return state[key]

    num_tokens, dim = need("embed.weight").shape
    layers = {int(m.group(1)) for k in state if (m := _LAYER_RE.match(k))}
    if not layers:
        raise CheckpointError(f"{source} has no 'layers.N.*' tensors; cannot infer depth")
    hidden = need("layers.0.ffn.up.weight").shape[0]
    kv_dim = need("layers.0.attn.k_proj.weight").shape[0]
    if heads is None:
        heads = guess_heads(dim, kv_dim)
        warnings.warn(f"{source}: number of heads is not stored in a state dict; guessed heads={heads} "
                      "(pass heads=... or a config to be sure)", stacklevel=3)
    head_dim = dim // heads
    ff_mult = hidden / dim
    if int(dim * ff_mult) != hidden:
        ff_mult = (hidden + 0.5) / dim
    return dict(num_tokens=int(num_tokens), dim=int(dim), depth=max(layers) + 1, heads=int(heads),
                ff_mult=ff_mult, kv_heads=kv_dim // head_dim, tie_embeddings="head.weight" not in state)


def resolve_checkpoint(path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a run folder, a .safetensors file or a state-dict file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        cfg = path / CONFIG_FILE
        model_file = path / MODEL_FILE
        if cfg.is_file():
            try:
                model_file = path / json.loads(cfg.read_text())["files"]["model"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"cannot read {cfg}: {e}") from e
        if not model_file.is_file():
            found = sorted(p for p in path.iterdir() if p.suffix in (".safetensors",) + STATE_DICT_SUFFIXES)
            found = [p for p in found if p.name != OPTIMIZER_FILE]
            if len(found) != 1:
                raise FileNotFoundError(
                    f"no {MODEL_FILE} in run folder {path}" + (f" and several candidates: {[p.name for p in found]}"
                                                               if found else "")
                )
            model_file = found[0]
        return model_file, cfg if cfg.is_file() else None
    cfg = path.parent / CONFIG_FILE
    return path, cfg if cfg.is_file() else None


def read_config(path) -> dict:
    """The config.json of a run folder (or beside a checkpoint file); FileNotFoundError if none."""
    path = Path(path)
    cfg = path / CONFIG_FILE if path.is_dir() else (path if path.suffix == ".json" else path.parent / CONFIG_FILE)
    if not cfg.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} found for {path}")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"corrupt JSON in {cfg}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg} must hold a JSON object")
    return data


def _config_from(config, path: Path) -> dict:
    if isinstance(config, dict):
        return dict(config.get("model_config", config))
    data = read_config(config)
    return dict(data.get("model_config", data))


def load_state_into(model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str], source,
                    assign: bool = False) -> None:
    """``model.load_state_dict`` with tied tensors restored and errors that name the tensor and the file."""
    expected = model.state_dict()
    tied_here = split_tied(expected)[1]
    tensors = dict(tensors)
    for dst, src in {**aliases, **tied_here}.items():
        if dst not in tensors and src in tensors:
            tensors[dst] = tensors[src]
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match {type(model).__name__}: missing tensors {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}"
            f"{'...' if len(unexpected) > 8 else ''}"
        )
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source}: tensor {k!r} has shape {tuple(tensors[k].shape)}, the model expects {tuple(v.shape)}"
            )
    model.load_state_dict(tensors, strict=True, assign=assign)


def load_model(path, device=None, *, config: dict | str | os.PathLike | None = None, **overrides) -> nn.Module:
    """Load a BitNetTransformer in eval mode.

    Args:
        path: a run folder (``config.json`` + ``model.safetensors``), a ``.safetensors`` file (its
            config from a ``config.json`` beside it, else from the file's metadata), or a plain state
            dict ``.pth``/``.pt`` (read with ``torch.load(weights_only=True)``).
        device: where to put the model (default cpu; ``"auto"`` picks cuda/mps/cpu).
        config: model config as a dict or a JSON file, overriding what the checkpoint says.
        **overrides: single constructor kwargs (``heads=``, ``max_seq_len=``, ``weights="fp"``, ...).

    Without any config the shape is inferred from the tensors (:func:`infer_config`).
    Raises FileNotFoundError for a missing path and :class:`CheckpointError` (a ValueError) for
    corrupt files, missing/unexpected tensors or wrong shapes, naming the file and tensor.
    """
    from .models import BitNetTransformer

    device = torch.device("cpu") if device is None else resolve_device(device)
    weights_file, cfg_file = resolve_checkpoint(path)
    tensors, meta = read_state_dict(weights_file, device="cpu")
    aliases = json.loads(meta.get("bitnet.aliases", "{}"))
    if config is not None:
        cfg = _config_from(config, weights_file)
    elif cfg_file is not None:
        cfg = _config_from(cfg_file, weights_file)
    elif "bitnet.config" in meta:
        cfg = json.loads(meta["bitnet.config"])
    else:
        cfg = infer_config({**tensors, **{k: tensors[v] for k, v in aliases.items() if v in tensors}},
                           heads=overrides.get("heads"), source=str(weights_file))
    cfg.update(overrides)
    if cfg.pop("model_type", "BitNetTransformer") != "BitNetTransformer":
        raise CheckpointError(f"{weights_file}: only BitNetTransformer checkpoints are supported")
    packed = bool(cfg.pop("packed", False))
    try:
        # a packed model is built on the meta device and its 2-bit tensors assigned: no fp weights ever exist
        with torch.device("meta" if packed else "cpu"):
            model = BitNetTransformer(**cfg)
    except TypeError as e:
        raise CheckpointError(f"model config for {weights_file} is not valid BitNetTransformer kwargs: {e}") from e
    if packed:
        from .convert.pack import pack
        from .convert.packed_io import expand_tensors

        pack(model)
        load_state_into(model, expand_tensors(tensors, meta), aliases, weights_file, assign=True)
        materialize_tables(model)
    else:
        load_state_into(model, tensors, aliases, weights_file)
    return model.to(device).eval()


def materialize_tables(model: nn.Module) -> None:
    """Rebuild derived, non-persistent buffers (rotary tables) that a meta-device construction left empty."""
    from .nn.rotary import RotaryEmbedding

    for module in model.modules():
        if isinstance(module, RotaryEmbedding) and module.cos.is_meta:
            module.build_tables(torch.device("cpu"))
