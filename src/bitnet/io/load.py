"""Loading a model from a run folder, a ``.safetensors`` file or a plain state dict: the files found,
the config checked against the tensor shapes, and only then the model built and filled."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..io_checks import (CheckpointError, check_fields_against_shapes, check_model_config, check_tensor_values,
                         first_line, inside, parse_aliases, short_repr)
from ..storage.pack import pack
from ..storage.packed_io import expand_tensors
from .config import _config_from, model_config_in, read_config, verify_checkpoint
from .device import resolve_device
from .journal import recover_checkpoint
from .layout import CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, STATE_DICT_SUFFIXES
from .safetensors_files import _read_safetensors, read_safetensors_header, read_state_dict
from .state import _expanded_shapes, infer_config, load_state_into, check_state_shapes, materialize_tables


def resolve_checkpoint(path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a run folder, a .safetensors file or a state-dict file.

    A run folder's weights file is config.json's ``files.model``, which must lie inside the folder."""
    weights_file, cfg_file, _ = _locate(path, None)
    return weights_file, cfg_file


def _locate(path, saved: dict | None) -> tuple[Path, Path | None, dict | None]:
    """(weights file, config.json or None, its checked content or None) of ``path``. config.json is read
    at most once, and not at all when the caller has read it already (``saved``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_dir():
        cfg = path.parent / CONFIG_FILE
        if not cfg.is_file():
            return path, None, None
        return path, cfg, read_config(cfg) if saved is None else saved
    if saved is None:
        recover_checkpoint(path)
    cfg = path / CONFIG_FILE
    model_file = path / MODEL_FILE
    if cfg.is_file():
        saved = read_config(cfg) if saved is None else saved
        files = saved.get("files") or {}
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
    return (model_file, cfg, saved) if cfg.is_file() else (model_file, None, None)


def load_model(path, device=None, *, config: dict | str | os.PathLike | None = None, **overrides) -> nn.Module:
    """Load a BitNetTransformer in eval mode (:func:`load_checkpoint` without the config.json it read).

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
    return load_checkpoint(path, device, config=config, **overrides)[0]


def load_checkpoint(path, device=None, *, config: dict | str | os.PathLike | None = None,
                    run_config: dict | None = None, **overrides) -> tuple[nn.Module, dict | None]:
    """:func:`load_model`, also returning the checkpoint's config.json (None when it has none), which is
    read once for the whole load. ``run_config``: that file's content when the caller has read it already
    (with :func:`~bitnet.io.read_config`, or read and checked with :func:`~bitnet.io.config.check_config`
    after :func:`~bitnet.io.recover_checkpoint`); it is then not read again."""
    from ..models import BitNetTransformer

    device = torch.device("cpu") if device is None else resolve_device(device)
    weights_file, cfg_file, saved = _locate(path, run_config)
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
        cfg, cfg_source = _config_from(config)
    elif saved is not None:
        cfg_source = str(cfg_file)
        cfg = model_config_in(saved, cfg_source)
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
        pack(model)
    check_state_shapes(model, shapes, aliases, weights_file)
    if tensors is None:
        tensors = _read_safetensors(weights_file, device="cpu")[0]
    if packed:
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
    return model.to(device).eval(), saved
