"""Checkpoints: safetensors + JSON, atomic saves, and loading from run folders or plain state dicts.

Run-folder layout (what :func:`save_checkpoint` writes and :func:`load_model` reads)::

    run/
      model.safetensors      model tensors; metadata "bitnet.config" repeats the model config (JSON),
                             "bitnet.aliases" lists tied tensors that were left out and
                             "bitnet.checkpoint_id" names the save the file belongs to
      config.json            {"format": "bitnet", "format_version": 1, "model_type": "BitNetTransformer",
                              "model_config": {...}, "tokenizer": {...}, "train_state": {"step": ...},
                              "train_config": {...}, "files": {...}, "checkpoint": {"id": ..., "step": ...}}
      optimizer.safetensors  (training only) optimizer tensors "state.<param>.<name>", RNG states
                             "rng.<name>"; metadata "bitnet.optimizer" holds param_groups and scalars,
                             "bitnet.checkpoint_id" the save it belongs to

**A save is one atomic unit.** :func:`save_checkpoint` writes every file of the new set to a temporary
file beside it (fsynced), then the *journal* ``.checkpoint-pending.json`` (itself atomically: temporary
file + rename) that names the temporary files and holds the new config.json: that is the commit point.
Only then are the files renamed over the old ones, config.json last, and the journal removed. A crash
before the commit point leaves the previous set untouched (plus temporary files, which
:func:`remove_stale_temps` deletes); a crash after it is completed by :func:`recover_checkpoint`, which
every reader of a run folder runs first (:func:`read_config`, :func:`load_model`, ``bitnet train
--resume``). Each file carries the id of its save and config.json names it, so a set whose files come
from different saves (an interrupted save of an older version, a file copied in by hand) is refused
with an error naming the folder and the file. Folders written before save ids existed load as before.

No pickle anywhere: ``.pth``/``.pt`` state dicts are read with ``torch.load(weights_only=True)``.
Untrusted files are checked before use: files named by a config (``files.model``) must lie inside its
folder; a model config is type-checked and compared with the tensor shapes of the file (read from the
safetensors header) before any model is built; float tensors must be finite and packed 2-bit codes in
{0, 1, 2}. Every such error is one line naming the file and the field or tensor (the checks live in
:mod:`bitnet.io_checks`).

Tied weights (``tie_embeddings=True``: ``head.weight`` *is* ``embed.weight``) cannot be stored twice
in safetensors; the duplicate is dropped at save time and re-tied at load time.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .io_checks import (LAYER_RE, MAX_SEQ_LEN, CheckpointError, check_fields_against_shapes,  # noqa: F401
                        check_model_config, check_tensor_values, first_line, inside, parse_aliases, plain_name,
                        positive_int, short_repr)

FORMAT = "bitnet"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
PENDING_FILE = ".checkpoint-pending.json"
"""The journal of a save in progress (see the module docstring); completed by :func:`recover_checkpoint`."""
CHECKPOINT_ID_KEY = "bitnet.checkpoint_id"
"""safetensors metadata key: the id of the save a file belongs to (config.json's ``checkpoint.id``)."""
RUN_FILES = (MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE, PENDING_FILE, "log.csv", "loss.png")
"""Files of a run folder whose temporary files (``.<name>.*.tmp``) :func:`remove_stale_temps` deletes."""
STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")



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


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _stage(path: Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` for a temporary file beside ``path`` and fsync it; returns the temporary
    file (``path`` is untouched). If ``write`` raises, the temporary file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink(Path(tmp))
        raise
    return Path(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, fsync it, then replace ``path``.

    If ``write`` raises, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = _stage(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path, text: str) -> Path:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, write)


def _safetensors_writer(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None):
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return lambda tmp: save_file(flat, tmp, metadata=metadata)


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    """Atomically write ``tensors`` (made contiguous, moved to CPU) as a safetensors file."""
    return atomic_write(path, _safetensors_writer(tensors, metadata))


def remove_stale_temps(run_dir) -> list[Path]:
    """Delete the temporary files that killed saves left in ``run_dir`` (``.<name>.*.tmp`` for the names
    of :data:`RUN_FILES`), except those a pending save still needs. Returns the deleted paths.

    Call it only while no other process writes to ``run_dir`` (``bitnet train`` does, at start)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    keep: set = set()
    if (run_dir / PENDING_FILE).is_file():
        try:
            keep = set(json.loads((run_dir / PENDING_FILE).read_text(encoding="utf-8"))["renames"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    removed = []
    for tmp in run_dir.iterdir():
        name = tmp.name
        if name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in RUN_FILES) and name not in keep \
                and tmp.is_file():
            _unlink(tmp)
            removed.append(tmp)
    return removed


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


def _model_payload(model: nn.Module, metadata: dict[str, str] | None, compact: bool) -> tuple[dict, dict]:
    """(tensors, metadata) of :func:`save_model`'s file."""
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
    return tensors, meta


def save_model(model: nn.Module, path, metadata: dict[str, str] | None = None, compact: bool = False) -> Path:
    """Atomically write the model tensors (tied duplicates dropped) to a safetensors file ``path``.

    ``compact=True`` stores the 2-bit weights of a packed model in base 3 (1.6 bits per weight).
    """
    tensors, meta = _model_payload(model, metadata, compact)
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
    """Write ``model.safetensors``, optionally ``optimizer.safetensors``, and ``config.json`` into ``run_dir``
    as one atomic unit: after a crash at any moment the folder holds the previous set or this one (the
    latter completed by :func:`recover_checkpoint`), never a mix. See the module docstring.

    ``compact`` stores a packed model's weights in base 3 (see :func:`save_model`). Returns the run folder.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(run_dir)                           # an earlier interrupted save goes first
    save_id = uuid.uuid4().hex
    files = {"model": MODEL_FILE}
    payloads = []
    if optimizer is not None:
        tensors, meta = _optimizer_payload(optimizer, rng_states)
        payloads.append((OPTIMIZER_FILE, tensors, {**meta, CHECKPOINT_ID_KEY: save_id}))
        files["optimizer"] = OPTIMIZER_FILE
    payloads.append((MODEL_FILE, *_model_payload(model, {CHECKPOINT_ID_KEY: save_id}, compact)))
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": type(model).__name__,
        "model_config": model_config(model),
        "tokenizer": tokenizer.to_config() if tokenizer is not None else {"type": "bytes", "special_tokens": []},
        "train_state": train_state or {},
        "train_config": train_config or {},
        "files": files,
        "checkpoint": {"id": save_id, "step": (train_state or {}).get("step")},
    }
    config = json.loads(json.dumps(config, default=str))  # exactly what config.json will hold
    staged: dict[str, Path] = {}
    try:
        for name, tensors, meta in payloads:
            staged[name] = _stage(run_dir / name, _safetensors_writer(tensors, meta))
        journal = {"id": save_id, "renames": {name: tmp.name for name, tmp in staged.items()}, "config": config}
        atomic_write_text(run_dir / PENDING_FILE, json.dumps(journal) + "\n")      # the commit point
    except BaseException:
        for tmp in staged.values():
            _unlink(tmp)
        raise
    recover_checkpoint(run_dir)                           # rename the new files into place
    return run_dir


def recover_checkpoint(run_dir) -> bool:
    """Complete a save of ``run_dir`` interrupted after its commit point (the journal
    ``.checkpoint-pending.json`` exists): rename its files into place, write its config.json, remove the
    journal. Idempotent (a crash inside is completed by the next call); True when there was a save to
    complete. Raises :class:`CheckpointError` when the journal is unreadable or a file it needs is gone."""
    run_dir = Path(run_dir)
    pending = run_dir / PENDING_FILE
    if not pending.is_file():
        return False
    try:
        journal = json.loads(pending.read_text(encoding="utf-8"))
        save_id, renames, config = journal["id"], journal["renames"], journal["config"]
        if not (isinstance(save_id, str) and isinstance(renames, dict) and isinstance(config, dict)):
            raise TypeError("id, renames or config has the wrong type")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{pending}: unreadable journal of an interrupted save ({e}); delete it to keep "
                              f"the previous checkpoint of {run_dir}") from e
    for name, tmp in renames.items():
        if name not in (MODEL_FILE, OPTIMIZER_FILE) or not isinstance(tmp, str) or not plain_name(tmp):
            raise CheckpointError(f"{pending}: the journal names an unexpected file {name!r} -> {tmp!r}")
        src, dst = run_dir / tmp, run_dir / name
        if src.is_file():
            os.replace(src, dst)
        elif file_checkpoint_id(dst) != save_id:
            raise CheckpointError(f"{run_dir}: an interrupted save cannot be completed: {tmp} is gone and {name} "
                                  f"is not from that save; delete {PENDING_FILE} to keep the previous checkpoint")
    _fsync_dir(run_dir)
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    os.unlink(pending)
    _fsync_dir(run_dir)
    return True


def file_checkpoint_id(path) -> str | None:
    """The save id in a safetensors file's metadata (None when it has none or is not safetensors)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    return read_safetensors_header(path)[1].get(CHECKPOINT_ID_KEY)


def verify_checkpoint(run_dir, config: dict | None = None, roles=("model",)) -> None:
    """Refuse a torn checkpoint: each file of ``roles`` (keys of config.json's ``files``) must carry the
    save id that config.json's ``checkpoint.id`` names. Folders written before save ids are not checked."""
    run_dir = Path(run_dir)
    config = read_config(run_dir) if config is None else config
    ckpt = config.get("checkpoint")
    if ckpt is None:
        return
    cfg_file = run_dir / CONFIG_FILE
    files = config.get("files") or {}
    for role in roles:
        if role not in files:
            raise CheckpointError(f"{cfg_file}: files.{role} is missing: this checkpoint has no {role} file")
        path = inside(run_dir, files[role], cfg_file, f"files.{role}")
        if not path.is_file():
            raise CheckpointError(f"{run_dir}: {files[role]} (files.{role} of {CONFIG_FILE}) is missing")
        got = file_checkpoint_id(path)
        if got != ckpt["id"]:
            raise CheckpointError(
                f"{run_dir} holds a torn checkpoint: {files[role]} is from another save than {CONFIG_FILE} "
                f"(checkpoint id {got or 'none'}, {CONFIG_FILE} names {ckpt['id']}); resume from another copy "
                "of the run or start a new one")


# --------------------------------------------------------------------------------------------- optimizer

def _optimizer_payload(optimizer: torch.optim.Optimizer,
                       extra_tensors: dict[str, torch.Tensor] | None) -> tuple[dict, dict]:
    """(tensors, metadata) of :func:`save_optimizer`'s file."""
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
    return tensors, meta


def save_optimizer(optimizer: torch.optim.Optimizer, path,
                   extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Optimizer state as safetensors: tensors ``state.<i>.<name>``, the rest as JSON metadata."""
    tensors, meta = _optimizer_payload(optimizer, extra_tensors)
    return save_safetensors(tensors, path, meta)


def load_optimizer(optimizer: torch.optim.Optimizer, path, device=None) -> dict[str, torch.Tensor]:
    """Restore ``optimizer`` from :func:`save_optimizer`'s file; returns the extra (``rng.*``) tensors."""
    tensors, meta = _read_safetensors(path, device="cpu")
    if "bitnet.optimizer" not in meta:
        raise CheckpointError(f"{path} is not a bitnet optimizer file (no 'bitnet.optimizer' metadata)")
    try:
        info = json.loads(meta["bitnet.optimizer"])
        kind, groups, scalars = info["type"], info["param_groups"], info["scalars"]
        if not (isinstance(kind, str) and isinstance(groups, list) and all(isinstance(g, dict) for g in groups)
                and isinstance(scalars, dict) and all(isinstance(v, dict) for v in scalars.values())):
            raise TypeError("type, param_groups or scalars has the wrong type")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: metadata 'bitnet.optimizer' is not a valid optimizer description ({e})") from e
    if kind != type(optimizer).__name__:
        raise CheckpointError(f"{path} holds {kind} state, cannot load into {type(optimizer).__name__}")
    state: dict[int, dict[str, Any]] = {}
    extras = {}
    try:
        for key, value in tensors.items():
            if key.startswith("rng."):
                extras[key[4:]] = value
                continue
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
        for idx, values in scalars.items():
            state.setdefault(int(idx), {}).update(values)
    except ValueError as e:
        raise CheckpointError(f"{path}: tensor names must be 'state.<index>.<name>' or 'rng.<name>' ({e})") from e
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"optimizer state in {path} does not fit this model: {e}") from e
    return extras


# --------------------------------------------------------------------------------------------- loading

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


def resolve_checkpoint(path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a run folder, a .safetensors file or a state-dict file.

    A run folder's weights file is config.json's ``files.model``, which must lie inside the folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        recover_checkpoint(path)
        cfg = path / CONFIG_FILE
        model_file = path / MODEL_FILE
        if cfg.is_file():
            files = read_config(path).get("files") or {}
            if "model" in files:
                model_file = inside(path, files["model"], cfg, "files.model")
        if not model_file.is_file():
            found = sorted(p for p in path.iterdir() if p.suffix in (".safetensors",) + STATE_DICT_SUFFIXES)
            found = [p for p in found if p.name != OPTIMIZER_FILE]
            if len(found) != 1:
                raise FileNotFoundError(
                    f"no {model_file.name} in run folder {path}" + (
                        f" and several candidates: {[p.name for p in found]}" if found else "")
                )
            model_file = found[0]
        return model_file, cfg if cfg.is_file() else None
    cfg = path.parent / CONFIG_FILE
    return path, cfg if cfg.is_file() else None


# Fields of config.json that must be JSON objects when present (the tokenizer may also be null: bytes).
_OBJECT_FIELDS = ("model_config", "train_state", "train_config", "files", "checkpoint")


def read_json_object(path) -> dict:
    """The JSON object in ``path``; CheckpointError naming the file when it is unreadable, not JSON, or
    not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:          # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"corrupt JSON in {path}: {first_line(e)}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_config(path) -> dict:
    """The config.json of a run folder (or beside a checkpoint file); FileNotFoundError if none.

    An interrupted save of the folder is completed first (:func:`recover_checkpoint`). The fields this
    package reads are type-checked: errors name the file and the field."""
    path = Path(path)
    cfg = path / CONFIG_FILE if path.is_dir() else (path if path.suffix == ".json" else path.parent / CONFIG_FILE)
    if cfg.name == CONFIG_FILE:
        recover_checkpoint(cfg.parent)
    if not cfg.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} found for {path}")
    data = read_json_object(cfg)
    for field in _OBJECT_FIELDS:
        if field in data and not isinstance(data[field], dict):
            raise CheckpointError(f"{cfg}: {field} must be a JSON object, got {short_repr(data[field])}")
    if "tokenizer" in data and data["tokenizer"] is not None and not isinstance(data["tokenizer"], dict):
        raise CheckpointError(f"{cfg}: tokenizer must be a JSON object (or null: bytes), got {short_repr(data['tokenizer'])}")
    for role, name in (data.get("files") or {}).items():
        inside(cfg.parent, name, cfg, f"files.{role}")
    ckpt = data.get("checkpoint")
    if ckpt is not None and not (isinstance(ckpt.get("id"), str) and ckpt["id"]):
        raise CheckpointError(f"{cfg}: checkpoint.id must be a non-empty string, got {short_repr(ckpt.get('id'))}")
    return data


def read_tokenizer(path):
    """The tokenizer stored in the config.json of a run folder (or beside a checkpoint file), built by
    :func:`bitnet.tokenizer.tokenizer_from_config`; errors name the file and the field."""
    from .tokenizer import tokenizer_from_config

    path = Path(path)
    cfg = path / CONFIG_FILE if path.is_dir() else (path if path.suffix == ".json" else path.parent / CONFIG_FILE)
    return tokenizer_from_config(read_config(path).get("tokenizer"), source=cfg)


def _config_from(config, path: Path) -> tuple[dict, str]:
    """(model config, where it came from) of a ``config=`` argument or a config.json file."""
    if isinstance(config, dict):
        cfg = config.get("model_config", config)
        source = "the config argument"
    else:
        data = read_config(config)
        cfg = data.get("model_config", data)
        source = str(config if Path(config).suffix == ".json" else Path(config) / CONFIG_FILE)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source}: model_config must be a JSON object, got {short_repr(cfg)}")
    return dict(cfg), source


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


def load_model(path, device=None, *, config: dict | str | os.PathLike | None = None, **overrides) -> nn.Module:
    """Load a BitNetTransformer in eval mode.

    Args:
        path: a run folder (``config.json`` + ``model.safetensors``), a ``.safetensors`` file (its
            config from a ``config.json`` beside it, else from the file's metadata), or a plain state
            dict ``.pth``/``.pt`` (read with ``torch.load(weights_only=True)``).
        device: where to put the model (default cpu; ``"auto"`` picks cuda/mps/cpu).
        config: model config as a dict or a JSON file, overriding what the checkpoint says.
        **overrides: single constructor kwargs (``heads=``, ``max_seq_len=``, ``weights="fp"``, ...).

    Without any config the shape is inferred from the tensors (:func:`infer_config`). The config is
    checked against the tensor shapes before the model is built.
    Raises FileNotFoundError for a missing path and :class:`CheckpointError` (a ValueError) for
    corrupt files, torn checkpoints, bad config fields, missing/unexpected tensors, wrong shapes and
    non-finite or illegal values, naming the file and the field or tensor.
    """
    from .models import BitNetTransformer

    device = torch.device("cpu") if device is None else resolve_device(device)
    weights_file, cfg_file = resolve_checkpoint(path)
    saved = read_config(cfg_file) if cfg_file is not None else None
    if saved is not None and saved.get("checkpoint") is not None:
        named = (saved.get("files") or {}).get("model", MODEL_FILE)
        if (cfg_file.parent / named).resolve() == weights_file.resolve():
            verify_checkpoint(cfg_file.parent, saved)
    if weights_file.suffix == ".safetensors":
        shapes, meta = read_safetensors_header(weights_file)
        tensors = None
    else:
        tensors, meta = read_state_dict(weights_file, device="cpu")
        shapes = tensors
    aliases = parse_aliases(meta, weights_file)
    if config is not None:
        cfg, cfg_source = _config_from(config, weights_file)
    elif cfg_file is not None:
        cfg, cfg_source = _config_from(cfg_file, weights_file)
    elif "bitnet.config" in meta:
        cfg_source = f"{weights_file} (metadata 'bitnet.config')"
        try:
            cfg = json.loads(meta["bitnet.config"])
        except ValueError as e:
            raise CheckpointError(f"{cfg_source} is not JSON ({first_line(e)})") from e
    else:
        cfg_source = str(weights_file)
        cfg = infer_config({**shapes, **{k: shapes[v] for k, v in aliases.items() if v in shapes}},
                           heads=overrides.get("heads"), source=str(weights_file))
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_source}: model_config must be a JSON object, got {short_repr(cfg)}")
    cfg = check_model_config({**cfg, **overrides}, cfg_source)
    cfg.pop("model_type", None)
    packed = bool(cfg.pop("packed", False))
    for field in ("num_tokens", "dim", "depth"):
        if field not in cfg:
            raise CheckpointError(f"{cfg_source}: model_config.{field} is missing")
    shapes = _expanded_shapes(shapes, meta, weights_file)
    check_fields_against_shapes(cfg, shapes, packed, weights_file, cfg_source)
    try:
        with torch.device("meta"):                   # nothing allocated until the file is known to fit
            model = BitNetTransformer(**cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_source}: model_config is not valid BitNetTransformer kwargs: {e}") from e
    if packed:
        from .convert.pack import pack

        pack(model)
    check_state_shapes(model, shapes, aliases, weights_file)
    if tensors is None:
        tensors = _read_safetensors(weights_file, device="cpu")[0]
    if packed:
        from .convert.packed_io import expand_tensors

        try:
            tensors = expand_tensors(tensors, meta)
        except ValueError as e:
            raise CheckpointError(f"{weights_file}: {e}") from e
    check_tensor_values(tensors, weights_file)
    if packed:
        # a packed model is built on the meta device and its 2-bit tensors assigned: no fp weights ever exist
        load_state_into(model, tensors, aliases, weights_file, assign=True)
        materialize_tables(model)
    else:
        with torch.device("cpu"):
            model = BitNetTransformer(**cfg)
        load_state_into(model, tensors, aliases, weights_file)
    return model.to(device).eval()


def _expanded_shapes(shapes: dict[str, torch.Tensor], meta: dict[str, str], source) -> dict[str, torch.Tensor]:
    """Shapes with base-3 ``*.w_base3`` entries (compact files) replaced by the I2 ``*.w_packed`` they expand to."""
    from .convert.packed_io import COMPACT_KEY
    from .quant import padded_in_features

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
    from .nn.rotary import RotaryEmbedding

    for module in model.modules():
        if isinstance(module, RotaryEmbedding) and module.cos.is_meta:
            module.build_tables(torch.device("cpu"))
